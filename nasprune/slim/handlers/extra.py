"""Handlers for layer types defined outside torch.nn: torchvision's channels-first LayerNorm
and nasprune's own zero-padding shortcut."""
from __future__ import annotations

import numpy as np

from nasprune.models.cifar_resnet import ChannelZeroPad
from nasprune.slim.handlers.base import LayerHandler, register
from nasprune.slim.handlers.norm import LayerNormHandler, MaskedLayerNorm


@register
class ChannelZeroPadHandler(LayerHandler):
    """Option-A shortcut: subsample, then zero channels before and after the input's. The pad
    channels are created here, so they can be pruned; the input's channels keep their order."""
    types = (ChannelZeroPad,)
    roles = {"in": (), "out": ()}

    def trace(self, ctx, call):
        m = call.module
        x, info = call.fields[0], call.infos[0]
        in_atoms = ctx.channels(x, info.shape, 1, call.name)
        pads = ctx.producer(call.name, "pad", m.before + m.after)
        out_atoms = np.concatenate([pads[:m.before], in_atoms, pads[m.before:]])
        ctx.record(call.name, self, "in", in_atoms)
        ctx.record(call.name, self, "out", out_atoms)
        return ctx.along(out_atoms, 1, len(call.out.shape))

    def slim(self, m, keep):
        kout, kin = keep.get("out"), keep.get("in")
        if kout is not None:
            before = int((kout < m.before).sum())
            after = int((kout >= m.before + m.in_channels).sum())
            m.before, m.after = before, after
        if kin is not None:
            m.in_channels = len(kin)

    def mask(self, m, removed):
        return None

    def primary(self, m, role):
        return ("shortcut", 0)


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
