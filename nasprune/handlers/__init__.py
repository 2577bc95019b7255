"""Registry of per-layer-type pruning handlers. ``handler_for(module)`` finds one;
``register`` adds a new layer type (see ``base.LayerHandler``)."""
from nasprune.handlers.base import LayerHandler, ModuleCall, handler_for, register, slice_tensor
from nasprune.handlers import layers, norm, stateless, extra  # noqa: F401  (registers handlers)
from nasprune.handlers.norm import MaskedGroupNorm, MaskedLayerNorm

__all__ = ["LayerHandler", "ModuleCall", "handler_for", "register", "slice_tensor",
           "MaskedGroupNorm", "MaskedLayerNorm"]
