"""Handlers for layers that pass channels through: BatchNorm, InstanceNorm, GroupNorm,
LayerNorm, PReLU; and the masked normalisation layers of the masked reference.

GroupNorm and LayerNorm compute statistics across channels, so zeroing a channel is not the
same as removing it. Their masked stand-ins compute statistics over kept channels only, which
is exactly what the slimmed layer computes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from nasprune.handlers.base import LayerHandler, register, slice_tensor


class _ChannelHandler(LayerHandler):
    """A layer that keeps each channel where it is, with per-channel parameters."""
    keeps_shape = True
    roles = {"channel": (("weight", 0), ("bias", 0))}
    tensors = ("weight", "bias")

    def channel_dim(self, m, ndim: int) -> int:
        return 1 if ndim > 1 else 0

    def trace(self, ctx, call):
        x, info = call.fields[0], call.infos[0]
        atoms = ctx.channels(x, info.shape, self.channel_dim(call.module, len(info.shape)), call.name)
        self.tie(ctx, call.module, atoms)
        ctx.record(call.name, self, "channel", atoms)
        return x

    def tie(self, ctx, m, atoms) -> None:
        """Extra constraints between this layer's channels (none by default)."""

    def slim(self, m, keep):
        k = keep.get("channel")
        if k is None:
            return
        for name in self.tensors:
            slice_tensor(m, name, 0, k)
        self.resize(m, len(k))

    def resize(self, m, n: int) -> None:
        raise NotImplementedError


@register
class BatchNormHandler(_ChannelHandler):
    types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
             nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    roles = {"channel": (("weight", 0), ("bias", 0), ("running_mean", 0))}
    tensors = ("weight", "bias", "running_mean", "running_var")

    def channel_dim(self, m, ndim):
        if isinstance(m, _InstanceNorm) and ndim == m._get_no_batch_dim():
            return 0
        return 1

    def resize(self, m, n):
        m.num_features = n

    def mask(self, m, removed):
        gone = removed.get("channel")
        if gone is not None and m.weight is not None:
            with torch.no_grad():
                m.weight[gone] = 0
                m.bias[gone] = 0
        return None


@register
class GroupNormHandler(_ChannelHandler):
    types = (nn.GroupNorm,)

    def tie(self, ctx, m, atoms):
        if m.num_groups < m.num_channels:  # keep every group the same size: tie stripes
            ctx.tie(atoms, m.num_groups)

    def resize(self, m, n):
        if m.num_groups == m.num_channels:  # one channel per group: groups go with channels
            m.num_groups = n
        m.num_channels = n

    def mask(self, m, removed):
        gone = removed.get("channel")
        if gone is None or not bool(gone.any()):
            return None
        return MaskedGroupNorm(m, ~gone)


@register
class LayerNormHandler(_ChannelHandler):
    """LayerNorm over the last dim (channels last, as in transformers and ConvNeXt blocks)."""
    types = (nn.LayerNorm,)

    def trace(self, ctx, call):
        m = call.module
        x, info = call.fields[0], call.infos[0]
        nd = len(info.shape)
        k = len(m.normalized_shape)
        if k > 1:
            if any(d >= nd - k for d in ctx.varying(x)):
                reason = f"LayerNorm over several dims at {call.name}"
                ctx.block_field(x, reason)
                ctx.notes.append((call.name, reason))
            return x
        atoms = ctx.channels(x, info.shape, nd - 1, call.name)
        ctx.record(call.name, self, "channel", atoms)
        return x

    def resize(self, m, n):
        m.normalized_shape = (n,)

    def mask(self, m, removed):
        gone = removed.get("channel")
        if gone is None or not bool(gone.any()):
            return None
        return MaskedLayerNorm(m, ~gone, channel_dim=-1)


@register
class PReLUHandler(_ChannelHandler):
    types = (nn.PReLU,)
    roles = {"channel": (("weight", 0),)}
    tensors = ("weight",)

    def trace(self, ctx, call):
        if call.module.num_parameters == 1:
            return call.fields[0]
        return super().trace(ctx, call)

    def resize(self, m, n):
        m.num_parameters = n

    def mask(self, m, removed):
        return None  # a zeroed slope is not a removed channel; consumers drop it anyway


# ------------------------------------------------------------------ masked reference layers
class MaskedLayerNorm(nn.Module):
    """LayerNorm (over one channel dim) whose statistics skip removed channels."""

    def __init__(self, norm: nn.Module, keep: torch.Tensor, channel_dim: int):
        super().__init__()
        self.eps = norm.eps
        self.channel_dim = channel_dim
        self.weight = norm.weight
        self.bias = norm.bias
        self.register_buffer("keep", keep.to(torch.float32))

    def forward(self, x):
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        keep = self.keep.view(shape).to(x.dtype)
        count = self.keep.sum()
        mean = (x * keep).sum(self.channel_dim, keepdim=True) / count
        var = (((x - mean) * keep) ** 2).sum(self.channel_dim, keepdim=True) / count
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y * keep


class MaskedGroupNorm(nn.Module):
    """GroupNorm whose per-group statistics skip removed channels."""

    def __init__(self, norm: nn.GroupNorm, keep: torch.Tensor):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.register_buffer("keep", keep.to(torch.float32))

    def forward(self, x):
        n, c = x.shape[:2]
        g = self.num_groups
        xs = x.reshape(n, g, c // g, -1)
        keep = self.keep.view(1, g, c // g, 1).to(x.dtype)
        count = keep.sum(dim=2, keepdim=True) * xs.shape[-1]
        mean = (xs * keep).sum(dim=(2, 3), keepdim=True) / count
        var = (((xs - mean) * keep) ** 2).sum(dim=(2, 3), keepdim=True) / count
        y = ((xs - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        shape = (1, c) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y * self.keep.view(shape).to(x.dtype)
