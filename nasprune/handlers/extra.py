"""Handlers for layer types defined outside torch.nn: torchvision's channels-first LayerNorm.
nasprune's own layers register theirs beside them (nasprune.models, nasprune.nn)."""
from __future__ import annotations

from nasprune.handlers.base import register
from nasprune.handlers.norm import LayerNormHandler, MaskedLayerNorm


try:
    from torchvision.models.convnext import LayerNorm2d

    @register
    class LayerNorm2dHandler(LayerNormHandler):
        """torchvision's LayerNorm2d: LayerNorm over dim 1 of an N,C,H,W tensor."""
        types = (LayerNorm2d,)
        exact = True

        def trace(self, ctx, call):
            x, info = call.fields[0], call.infos[0]
            atoms = ctx.channels(x, info.shape, 1, call.name)
            ctx.record(call.name, self, "channel", atoms)
            return x

        def mask(self, m, removed):
            gone = removed.get("channel")
            if gone is None or not bool(gone.any()):
                return None
            return MaskedLayerNorm(m, ~gone, channel_dim=1)
except ImportError:  # pragma: no cover - torchvision is optional
    pass
