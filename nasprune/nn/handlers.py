"""Pruning handlers of nasprune's own layers (see nasprune.handlers), registered on import of
nasprune.nn, so a model built of them traces, counts, slims and saves like one of plain layers.

- GatedConv2d: an nn.Conv2d whose `gate` follows the output channels.
- GatedConvBNAct2d: a producer, conv -> BN -> activation -> gate as one layer: its output channels
  carry conv.weight (dim 0), conv.bias, the BN's tensors and `gate`; its input channels conv.weight
  (dim 1); grouped and depthwise convs tie channels as the conv handler does.
- ChannelGate: passes channels through along its `dim`, like a per-channel affine.
- ChannelSelect: a producer of its own output channels that reads its input channels (a gather,
  no MACs): slimming its output keeps rows of `index` and `weight`, slimming its input renumbers
  `index` (an output channel whose source is gone reads zero: weight 0).
"""
from __future__ import annotations

import dataclasses

import torch

from nasprune.handlers.base import LayerHandler, handler_for, register, slice_tensor
from nasprune.handlers.layers import ConvHandler
from nasprune.handlers.norm import _ChannelHandler
from nasprune.nn.gate import ChannelGate
from nasprune.nn.gated_conv import GatedConv2d, GatedConvBNAct2d
from nasprune.nn.select import ChannelSelect


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


@register
class ChannelSelectHandler(LayerHandler):
    """ChannelSelect: fresh output channels (a producer, so a gate follows it and its output is a
    channel group of its own) gathered from its input channels. Counted among the layers, at
    zero MACs, so that the gated network gates it and the cost model reads its widths."""
    types = (ChannelSelect,)
    roles = {"out": (("weight", 0), ("index", 0)), "in": ()}
    counts = True

    def trace(self, ctx, call):
        m = call.module
        x, info = call.fields[0], call.infos[0]
        ndim = len(info.shape)
        dim = m.dim % ndim
        in_atoms = ctx.channels(x, info.shape, dim, call.name)
        out_atoms = ctx.producer(call.name, "out", m.out_channels)
        ctx.record(call.name, self, "in", in_atoms)
        ctx.record(call.name, self, "out", out_atoms)
        return ctx.along(out_atoms, dim, len(call.out.shape))

    def slim(self, m, keep):
        k_out, k_in = keep.get("out"), keep.get("in")
        if k_out is not None:
            slice_tensor(m, "index", 0, k_out)
            slice_tensor(m, "weight", 0, k_out)
        if k_in is not None:
            position = torch.full((m.in_channels,), -1, dtype=torch.long)
            position[k_in] = torch.arange(len(k_in))
            index = position[m.index.cpu()]
            lost = index < 0
            m.index = index.clamp_min(0).to(m.index.device)
            if bool(lost.any()):
                m.weight = m.weight.masked_fill(lost.to(m.weight.device), 0)
            m.in_channels = len(k_in)
        m.refresh()

    def mask(self, m, removed):
        gone_out, gone_in = removed.get("out"), removed.get("in")
        with torch.no_grad():
            if gone_out is not None and bool(gone_out.any()):
                m.weight[gone_out.to(m.weight.device)] = 0
            if gone_in is not None and bool(gone_in.any()):
                m.weight[gone_in.to(m.index.device)[m.index]] = 0
        m.refresh()
        return None

    def macs(self, m, in_width, out_width, in_shape, out_shape):
        return 0
