"""Pruning handlers of nasprune's own layers (see nasprune.handlers), registered on import of
nasprune.nn, so a model built of them traces, counts, slims and saves like one of plain layers.

- GatedConv2d: an nn.Conv2d whose `gate` follows the output channels.
- GatedConvBNAct2d: a producer, conv -> BN -> activation -> gate as one layer: its output channels
  carry conv.weight (dim 0), conv.bias, the BN's tensors and `gate`; its input channels conv.weight
  (dim 1); grouped and depthwise convs tie channels as the conv handler does.
- ChannelGate: passes channels through along its `dim`, like a per-channel affine.
"""
from __future__ import annotations

import dataclasses

import torch

from nasprune.handlers.base import handler_for, register, slice_tensor
from nasprune.handlers.layers import ConvHandler
from nasprune.handlers.norm import _ChannelHandler
from nasprune.nn.gate import ChannelGate
from nasprune.nn.gated_conv import GatedConv2d, GatedConvBNAct2d


def _slim_gate(m, kept: torch.Tensor | None) -> None:
    """Cut a gated layer's `gate` (and its per-channel state) to the ``kept`` channels."""
    if kept is None:
        return
    slice_tensor(m, "gate", 0, kept)
    m._active = None  # the open-channel cache indexes the old width
    if getattr(m, "_taylor", None) is not None:
        m._taylor = m._taylor.index_select(0, kept.to(m._taylor.device))


def _mask_gate(m, gone: torch.Tensor | None) -> None:
    if gone is not None and bool(gone.any()):
        with torch.no_grad():
            m.gate[gone.to(m.gate.device)] = 0


@register
class GatedConvHandler(ConvHandler):
    """GatedConv2d: nn.Conv2d's handler, plus `gate` on the output channels. Registered on the
    type itself: the nn.Conv2d handler never applies to it (its forward is its own), while a
    subclass that keeps GatedConv2d's forward gets this one."""
    types = (GatedConv2d,)
    roles = {"out": ConvHandler.roles["out"] + (("gate", 0),), "in": ConvHandler.roles["in"]}

    def slim(self, m, keep):
        super().slim(m, keep)
        _slim_gate(m, keep.get("out"))

    def mask(self, m, removed):
        super().mask(m, removed)
        _mask_gate(m, removed.get("out"))


@register
class GatedConvBNActHandler(ConvHandler):
    """GatedConvBNAct2d: the conv handler applied to its `conv` (trace, slim, mask, MACs), the BN
    handler to its `bn`, and `gate` cut with the output channels."""
    types = (GatedConvBNAct2d,)
    roles = {"out": (("conv.weight", 0), ("conv.bias", 0), ("bn.weight", 0), ("bn.bias", 0),
                     ("bn.running_mean", 0), ("bn.running_var", 0), ("gate", 0)),
             "in": (("conv.weight", 1),)}

    def trace(self, ctx, call):
        return super().trace(ctx, dataclasses.replace(call, module=call.module.conv))

    def slim(self, m, keep):
        super().slim(m.conv, keep)
        handler_for(m.bn).slim(m.bn, {"channel": keep.get("out")})
        _slim_gate(m, keep.get("out"))

    def mask(self, m, removed):
        super().mask(m.conv, removed)
        handler_for(m.bn).mask(m.bn, {"channel": removed.get("out")})
        _mask_gate(m, removed.get("out"))

    def macs(self, m, in_width, out_width, in_shape, out_shape):
        return super().macs(m.conv, in_width, out_width, in_shape, out_shape)

    def counted_module(self, m):
        return m.conv


@register
class ChannelGateHandler(_ChannelHandler):
    """ChannelGate: each channel stays where it is along the gate's `dim`, scaled by its gate."""
    types = (ChannelGate,)
    roles = {"channel": (("gate", 0),)}

    def channel_dim(self, m, ndim):
        return m.dim % ndim

    def slim(self, m, keep):
        kept = keep.get("channel")
        if kept is not None:
            _slim_gate(m, kept)
            m.channels = len(kept)
