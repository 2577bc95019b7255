"""Triton channel_stats: per-channel mean and biased variance of an (N, C, *) tensor, in fp32.

Every value is first shifted by its channel's first element (exact for nearby values), so the
moments are taken of data centred near zero. Two stages, both deterministic:
  1. a grid of (channel or channel block, P) programs; each walks its share of the channel's
     elements tile by tile, takes every tile's exact moments in registers (tile mean, then the sum
     of squared deviations from it) and folds them into its running (count, mean, M2) with Chan's
     formula, then writes that partial;
  2. one program per channel merges the P partials: mean = sum(n_p mean_p) / n, then
     M2 = sum(M2_p + n_p (mean_p - mean)^2).
Nothing ever forms E[x^2] - E[x]^2, so |mean| >> std stays accurate to fp32 rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _layout

__all__ = ["channel_stats"]


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """(count, mean, M2) of the union of two sets; n_b > 0."""
    n = n_a + n_b
    frac = n_b / n
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * (n_a * frac)


@triton.autotune(configs=_layout.tile_configs(), key=["inner", "BI"])
@triton.jit
def _stats_cf_kernel(z_ptr, part_ptr, outer, C, inner, P, TILE: tl.constexpr, BI: tl.constexpr):
    """Channels first: z[o, c, i] at (o * C + c) * inner + i. Program (c, p) takes an equal share
    of channel c's [BR, BI] tiles; part is (3, C, P): mean, M2, count."""
    BR: tl.constexpr = TILE // BI
    c = tl.program_id(0)
    p = tl.program_id(1)
    n_bi = tl.cdiv(inner, BI)
    units = tl.cdiv(outer, BR) * n_bi
    per = tl.cdiv(units, P)
    u_start = p * per
    u_end = tl.minimum(u_start + per, units)
    rows = tl.arange(0, BR)
    cols = tl.arange(0, BI)
    shift = tl.load(z_ptr + c.to(tl.int64) * inner).to(tl.float32)  # z[0, c, 0]
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for u in range(u_start, u_end):
        rb = u // n_bi
        ib = u - rb * n_bi
        o = rb * BR + rows
        i = ib * BI + cols
        mask = (o < outer)[:, None] & (i < inner)[None, :]
        offs = ((o.to(tl.int64) * C + c) * inner)[:, None] + i[None, :]
        x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift, 0.0)
        n_b = (tl.minimum(outer - rb * BR, BR) * tl.minimum(inner - ib * BI, BI)).to(tl.float32)
        mean_b = tl.sum(tl.sum(x, axis=1), axis=0) / n_b
        d = tl.where(mask, x - mean_b, 0.0)
        m2_b = tl.sum(tl.sum(d * d, axis=1), axis=0)
        n, mean, m2 = _chan_merge(n, mean, m2, n_b, mean_b, m2_b)
    at = c * P + p
    tl.store(part_ptr + at, mean)
    tl.store(part_ptr + C * P + at, m2)
    tl.store(part_ptr + 2 * C * P + at, n)


@triton.autotune(configs=_layout.tile_configs(), key=["C", "BC"])
@triton.jit
def _stats_cl_kernel(z_ptr, part_ptr, outer, C, P, TILE: tl.constexpr, BC: tl.constexpr):
    """Channels last: z[o, c] at o * C + c. Program (cb, p) takes an equal share of the row blocks
    for channels [cb * BC, (cb + 1) * BC); part is (3, C, P)."""
    BR: tl.constexpr = TILE // BC
    cb = tl.program_id(0)
    p = tl.program_id(1)
    cols = cb * BC + tl.arange(0, BC)
    cmask = cols < C
    n_rb = tl.cdiv(outer, BR)
    per = tl.cdiv(n_rb, P)
    b_start = p * per
    b_end = tl.minimum(b_start + per, n_rb)
    rows = tl.arange(0, BR)
    shift = tl.load(z_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # z[0, c]
    n = 0.0
    mean = tl.zeros([BC], dtype=tl.float32)
    m2 = tl.zeros([BC], dtype=tl.float32)
    for b in range(b_start, b_end):
        o = b * BR + rows
        mask = (o < outer)[:, None] & cmask[None, :]
        offs = (o.to(tl.int64) * C)[:, None] + cols[None, :]
        x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift[None, :], 0.0)
        n_b = tl.minimum(outer - b * BR, BR).to(tl.float32)
        mean_b = tl.sum(x, axis=0) / n_b
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        n, mean, m2 = _chan_merge(n, mean, m2, n_b, mean_b, m2_b)
    at = cols * P + p
    tl.store(part_ptr + at, mean, mask=cmask)
    tl.store(part_ptr + C * P + at, m2, mask=cmask)
    tl.store(part_ptr + 2 * C * P + at, mean * 0.0 + n, mask=cmask)


@triton.jit
def _stats_finalize_kernel(z_ptr, part_ptr, mean_ptr, var_ptr, C, P, first_stride,
                           BP: tl.constexpr):
    """One program per channel: merges the P partials (mean, M2, count) of `part` (3, C, P), whose
    means are of z - z[first element of the channel], at z_ptr + c * first_stride."""
    c = tl.program_id(0)
    shift = tl.load(z_ptr + c.to(tl.int64) * first_stride).to(tl.float32)
    ps = tl.arange(0, BP)
    s_n = tl.zeros([BP], dtype=tl.float32)
    s_w = tl.zeros([BP], dtype=tl.float32)
    for p0 in range(0, P, BP):
        p = p0 + ps
        m = p < P
        mu = tl.load(part_ptr + c * P + p, mask=m, other=0.0)
        cnt = tl.load(part_ptr + 2 * C * P + c * P + p, mask=m, other=0.0)
        s_n += cnt
        s_w += cnt * mu
    n = tl.sum(s_n, axis=0)
    mean = tl.sum(s_w, axis=0) / n
    s_m2 = tl.zeros([BP], dtype=tl.float32)
    for p0 in range(0, P, BP):
        p = p0 + ps
        m = p < P
        mu = tl.load(part_ptr + c * P + p, mask=m, other=0.0)
        m2 = tl.load(part_ptr + C * P + c * P + p, mask=m, other=0.0)
        cnt = tl.load(part_ptr + 2 * C * P + c * P + p, mask=m, other=0.0)
        dev = mu - mean
        s_m2 += m2 + cnt * dev * dev
    tl.store(mean_ptr + c, mean + shift)
    tl.store(var_ptr + c, tl.sum(s_m2, axis=0) / n)


def channel_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var) of z (N, C, *) over every dimension but 1, both fp32;
    NaN where a channel has no elements (as torch.var_mean)."""
    view = _layout.channel_view(z)
    C = view.channels
    mean = torch.empty(C, dtype=torch.float32, device=z.device)
    var = torch.empty(C, dtype=torch.float32, device=z.device)
    if C == 0:
        return mean, var
    if view.per_channel == 0:
        mean.fill_(float("nan"))
        var.fill_(float("nan"))
        return mean, var
    zc = _layout.in_layout(z, view)
    if view.channels_last:
        BC = _layout.channel_block(C)
        groups = triton.cdiv(C, BC)
        P = _layout.split_programs(groups, view.outer * BC, z.device)
        part = torch.empty((3, C, P), dtype=torch.float32, device=z.device)
        _stats_cl_kernel[(groups, P)](zc, part, view.outer, C, P, BC=BC)
    else:
        BI = _layout.inner_block(view.inner)
        P = _layout.split_programs(C, view.per_channel, z.device)
        part = torch.empty((3, C, P), dtype=torch.float32, device=z.device)
        _stats_cf_kernel[(C, P)](zc, part, view.outer, C, view.inner, P, BI=BI)
    BP, warps = _layout.reduce_block(P)
    _stats_finalize_kernel[(C,)](zc, part, mean, var, C, P, 1 if view.channels_last else view.inner,
                                 BP=BP, num_warps=warps)
    return mean, var
