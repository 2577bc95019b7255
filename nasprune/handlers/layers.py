"""Handlers for layers with weights that create channels: convolutions, Linear, Embedding."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nasprune.handlers.base import LayerHandler, ModuleCall, prod, register, slice_dims, slice_tensor


def _groups_uniform(keep: torch.Tensor, groups: int, per_group: int, what: str) -> torch.Tensor:
    """Local indices kept in each group of a grouped layer; every group must keep the same."""
    if len(keep) % groups:
        raise ValueError(f"{what}: {len(keep)} kept channels do not split into {groups} equal groups")
    local = (keep % per_group).view(groups, -1)
    if not bool((local == local[:1]).all()) or not bool(((keep // per_group).view(groups, -1)
                                                        == torch.arange(groups).view(-1, 1)).all()):
        raise ValueError(f"{what}: the groups would keep different channels")
    return local[0]


class _ConvLikeHandler(LayerHandler):
    """What Conv and ConvTranspose share. The weight holds role ``lead`` whole on dim 0 and role
    ``stripe`` per group on dim 1; the bias follows "out". A depthwise-like layer (one input channel
    per group) ties each input channel to its group's outputs: pruning removes whole groups. Other
    grouped layers keep their group count: channel j of every group is removed together (a stripe)."""
    counts = True
    lead: str = ""    # role on weight dim 0
    stripe: str = ""  # role on weight dim 1 (channels within one group)

    @staticmethod
    def depthwise(m) -> bool:
        return m.groups > 1 and m.in_channels == m.groups

    @staticmethod
    def _channels(m) -> dict:
        return {"in": m.in_channels, "out": m.out_channels}

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
        lead, stripe = self.lead, self.stripe
        k_lead, k_stripe = keep.get(lead), keep.get(stripe)
        g, dw = m.groups, self.depthwise(m)
        per_group = {role: n // g for role, n in self._channels(m).items()}
        weight_stripe = None
        if k_lead is not None and g > 1 and not dw:
            _groups_uniform(k_lead, g, per_group[lead], f"{type(m).__name__} {lead} channels")
        if k_stripe is not None and not dw:
            weight_stripe = k_stripe if g == 1 else _groups_uniform(
                k_stripe, g, per_group[stripe], f"{type(m).__name__} {stripe} channels")
        slice_dims(m, "weight", {0: k_lead, 1: weight_stripe})
        for role, kept in ((lead, k_lead), (stripe, k_stripe)):
            if kept is None:
                continue
            if role == "out":
                slice_tensor(m, "bias", 0, kept)
                m.out_channels = len(kept)
            else:
                m.in_channels = len(kept)
                if dw:
                    m.groups = len(kept)

    def mask(self, m, removed):
        lead, stripe = self.lead, self.stripe
        gone_lead, gone_stripe = removed.get(lead), removed.get(stripe)
        with torch.no_grad():
            if gone_lead is not None and bool(gone_lead.any()):
                m.weight[gone_lead] = 0
                if lead == "out" and m.bias is not None:
                    m.bias[gone_lead] = 0
            if gone_stripe is not None and bool(gone_stripe.any()):
                if stripe == "out" and m.bias is not None:
                    m.bias[gone_stripe] = 0
                g = m.groups
                channels = self._channels(m)
                lead_g, stripe_g = channels[lead] // g, channels[stripe] // g
                hit = torch.zeros(g, stripe_g, dtype=torch.bool)
                p = gone_stripe.nonzero().view(-1)
                hit[p // stripe_g, p % stripe_g] = True
                rows = hit[torch.arange(channels[lead]) // lead_g]  # (weight dim 0, stripe_g)
                m.weight.mul_((~rows).to(m.weight.dtype).view(rows.shape + (1,) * (m.weight.dim() - 2)))
        return None


@register
class ConvHandler(_ConvLikeHandler):
    """Conv1d/2d/3d: weight is (out, in/groups, k...)."""
    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    roles = {"out": (("weight", 0), ("bias", 0)), "in": (("weight", 1),)}
    lead, stripe = "out", "in"

    def slim(self, m, keep):
        super().slim(m, keep)
        if m.out_channels % m.groups or m.in_channels % m.groups:
            raise ValueError(f"{type(m).__name__}: {m.in_channels}->{m.out_channels} channels do not fit {m.groups} groups")

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
class ConvTransposeHandler(_ConvLikeHandler):
    """ConvTranspose1d/2d/3d: weight is (in, out/groups, k...)."""
    types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    roles = {"in": (("weight", 0),), "out": (("weight", 1), ("bias", 0))}
    lead, stripe = "in", "out"

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
