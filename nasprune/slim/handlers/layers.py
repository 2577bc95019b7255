"""Handlers for layers with weights that create channels: convolutions, Linear, Embedding."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nasprune.slim.handlers.base import LayerHandler, ModuleCall, prod, register, slice_dims, slice_tensor


def _groups_uniform(keep: torch.Tensor, groups: int, per_group: int, what: str) -> torch.Tensor:
    """Local indices kept in each group of a grouped layer; every group must keep the same."""
    if len(keep) % groups:
        raise ValueError(f"{what}: {len(keep)} kept channels do not split into {groups} equal groups")
    local = (keep % per_group).view(groups, -1)
    if not bool((local == local[:1]).all()) or not bool(((keep // per_group).view(groups, -1)
                                                        == torch.arange(groups).view(-1, 1)).all()):
        raise ValueError(f"{what}: the groups would keep different channels")
    return local[0]


@register
class ConvHandler(LayerHandler):
    """Conv1d/2d/3d. A depthwise-like conv (one input channel per group) ties each input channel
    to its group's outputs: pruning removes whole groups. Other grouped convs keep their group
    count: channel j of every group is removed together (a stripe)."""
    counts = True
    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    roles = {"out": (("weight", 0), ("bias", 0)), "in": (("weight", 1),)}

    @staticmethod
    def depthwise(m) -> bool:
        return m.groups > 1 and m.in_channels == m.groups

    def trace(self, ctx, call: ModuleCall):
        m = call.module
        x, info = call.fields[0], call.infos[0]
        nd = len(info.shape)
        cdim = nd - len(m.kernel_size) - 1
        in_atoms = ctx.channels(x, info.shape, cdim, call.name)
        out_atoms = ctx.producer(call.name, "out", m.out_channels)
        g = m.groups
        if self.depthwise(m):
            ctx.atoms.union(np.repeat(in_atoms, m.out_channels // g), out_atoms)
        elif g > 1:
            ctx.tie(in_atoms, g)
            ctx.tie(out_atoms, g)
        ctx.record(call.name, self, "in", in_atoms)
        ctx.record(call.name, self, "out", out_atoms)
        return ctx.along(out_atoms, cdim, len(call.out.shape))

    def slim(self, m, keep):
        kin, kout = keep.get("in"), keep.get("out")
        g, dw = m.groups, self.depthwise(m)
        cin_g, cout_g = m.in_channels // g, m.out_channels // g
        weight_in = None
        if kout is not None and g > 1 and not dw:
            _groups_uniform(kout, g, cout_g, f"{type(m).__name__} out channels")
        if kin is not None and not dw:
            weight_in = kin if g == 1 else _groups_uniform(kin, g, cin_g, f"{type(m).__name__} in channels")
        slice_dims(m, "weight", {0: kout, 1: weight_in})
        if kout is not None:
            slice_tensor(m, "bias", 0, kout)
            m.out_channels = len(kout)
        if kin is not None:
            m.in_channels = len(kin)
            if dw:
                m.groups = len(kin)
        if m.out_channels % m.groups or m.in_channels % m.groups:
            raise ValueError(f"{type(m).__name__}: {m.in_channels}->{m.out_channels} channels do not fit {m.groups} groups")

    def mask(self, m, removed):
        gone_out, gone_in = removed.get("out"), removed.get("in")
        with torch.no_grad():
            if gone_out is not None and bool(gone_out.any()):
                m.weight[gone_out] = 0
                if m.bias is not None:
                    m.bias[gone_out] = 0
            if gone_in is not None and bool(gone_in.any()):
                g = m.groups
                cin_g, cout_g = m.in_channels // g, m.out_channels // g
                hit = torch.zeros(g, cin_g, dtype=torch.bool)
                p = gone_in.nonzero().view(-1)
                hit[p // cin_g, p % cin_g] = True
                rows = hit[torch.arange(m.out_channels) // cout_g]  # (out, cin_g)
                m.weight.mul_((~rows).to(m.weight.dtype).view(rows.shape + (1,) * (m.weight.dim() - 2)))
        return None

    def macs(self, m, in_width, out_width, in_shape, out_shape):
        batched = len(out_shape) == len(m.kernel_size) + 2
        positions = prod(out_shape[2:] if batched else out_shape[1:])
        per_position = prod(m.kernel_size)
        if self.depthwise(m):  # groups follow the channels: one input channel per output
            total = per_position * positions * out_width * (m.in_channels // m.groups)
        elif isinstance(in_width, int) and isinstance(out_width, int):
            total = per_position * positions * (in_width // m.groups) * out_width
        else:
            total = per_position * positions * in_width * out_width / m.groups
        if m.bias is not None:
            total = total + positions  # TAS counts one add per output position for a bias
        return total


@register
class ConvTransposeHandler(LayerHandler):
    """ConvTranspose1d/2d/3d: weight is (in, out/groups, k...)."""
    counts = True
    types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    roles = {"in": (("weight", 0),), "out": (("weight", 1), ("bias", 0))}

    @staticmethod
    def depthwise(m) -> bool:
        return m.groups > 1 and m.in_channels == m.groups

    def trace(self, ctx, call):
        m = call.module
        x, info = call.fields[0], call.infos[0]
        nd = len(info.shape)
        cdim = nd - len(m.kernel_size) - 1
        in_atoms = ctx.channels(x, info.shape, cdim, call.name)
        out_atoms = ctx.producer(call.name, "out", m.out_channels)
        g = m.groups
        if self.depthwise(m):
            ctx.atoms.union(np.repeat(in_atoms, m.out_channels // g), out_atoms)
        elif g > 1:
            ctx.tie(in_atoms, g)
            ctx.tie(out_atoms, g)
        ctx.record(call.name, self, "in", in_atoms)
        ctx.record(call.name, self, "out", out_atoms)
        return ctx.along(out_atoms, cdim, len(call.out.shape))

    def slim(self, m, keep):
        kin, kout = keep.get("in"), keep.get("out")
        g, dw = m.groups, self.depthwise(m)
        cin_g, cout_g = m.in_channels // g, m.out_channels // g
        weight_out = None
        if kin is not None and g > 1 and not dw:
            _groups_uniform(kin, g, cin_g, f"{type(m).__name__} in channels")
        if kout is not None and not dw:
            weight_out = kout if g == 1 else _groups_uniform(kout, g, cout_g, f"{type(m).__name__} out channels")
        slice_dims(m, "weight", {0: kin, 1: weight_out})
        if kin is not None:
            m.in_channels = len(kin)
            if dw:
                m.groups = len(kin)
        if kout is not None:
            slice_tensor(m, "bias", 0, kout)
            m.out_channels = len(kout)

    def mask(self, m, removed):
        gone_out, gone_in = removed.get("out"), removed.get("in")
        with torch.no_grad():
            if gone_in is not None and bool(gone_in.any()):
                m.weight[gone_in] = 0
            if gone_out is not None and bool(gone_out.any()):
                if m.bias is not None:
                    m.bias[gone_out] = 0
                g = m.groups
                cin_g, cout_g = m.in_channels // g, m.out_channels // g
                hit = torch.zeros(g, cout_g, dtype=torch.bool)
                q = gone_out.nonzero().view(-1)
                hit[q // cout_g, q % cout_g] = True
                rows = hit[torch.arange(m.in_channels) // cin_g]  # (in, cout_g)
                m.weight.mul_((~rows).to(m.weight.dtype).view(rows.shape + (1,) * (m.weight.dim() - 2)))
        return None

    def macs(self, m, in_width, out_width, in_shape, out_shape):
        batched = len(in_shape) == len(m.kernel_size) + 2
        in_positions = prod(in_shape[2:] if batched else in_shape[1:])
        out_positions = prod(out_shape[2:] if batched else out_shape[1:])
        per_position = prod(m.kernel_size)
        if self.depthwise(m):
            total = per_position * in_positions * in_width * (m.out_channels // m.groups)
        elif isinstance(in_width, int) and isinstance(out_width, int):
            total = per_position * in_positions * in_width * (out_width // m.groups)
        else:
            total = per_position * in_positions * in_width * out_width / m.groups
        if m.bias is not None:
            total = total + out_positions
        return total


@register
class LinearHandler(LayerHandler):
    counts = True
    types = (nn.Linear,)
    roles = {"out": (("weight", 0), ("bias", 0)), "in": (("weight", 1),)}

    def trace(self, ctx, call):
        m = call.module
        x, info = call.fields[0], call.infos[0]
        nd = len(info.shape)
        in_atoms = ctx.channels(x, info.shape, nd - 1, call.name)
        out_atoms = ctx.producer(call.name, "out", m.out_features)
        ctx.record(call.name, self, "in", in_atoms)
        ctx.record(call.name, self, "out", out_atoms)
        return ctx.along(out_atoms, len(call.out.shape) - 1, len(call.out.shape))

    def slim(self, m, keep):
        slice_dims(m, "weight", {0: keep.get("out"), 1: keep.get("in")})
        if keep.get("out") is not None:
            slice_tensor(m, "bias", 0, keep["out"])
            m.out_features = len(keep["out"])
        if keep.get("in") is not None:
            m.in_features = len(keep["in"])

    def macs(self, m, in_width, out_width, in_shape, out_shape):
        positions = prod(in_shape[1:-1]) if len(in_shape) > 1 else 1
        return positions * in_width * out_width  # TAS counts no bias for a fully connected layer


@register
class EmbeddingHandler(LayerHandler):
    types = (nn.Embedding,)
    roles = {"out": (("weight", 1),)}

    def trace(self, ctx, call):
        m = call.module
        out_atoms = ctx.producer(call.name, "out", m.embedding_dim)
        ctx.record(call.name, self, "out", out_atoms)
        nd = len(call.out.shape)
        return ctx.along(out_atoms, nd - 1, nd)

    def slim(self, m, keep):
        if keep.get("out") is not None:
            slice_tensor(m, "weight", 1, keep["out"])
            m.embedding_dim = len(keep["out"])
