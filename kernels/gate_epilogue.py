"""Triton gate_epilogue (forward) and gate_epilogue_backward.

Forward, per output channel c with source channel s = src[c] (s = c without out_index):
    y[:, c] = gate[c] * act(scale[c] * z[:, s] + shift[c]),   zero where s < 0 or gate[c] == 0
(those channels are written as zeros without reading z). One read of z and one write of y.

Backward, with u = scale z + shift and m = act'(u) (relu'(0) = 0), one sweep over (dy, z) per
z channel k (output channel c = out_index[k]) writes dz = dy gate m scale and per-program fp32
partial sums of dgate = sum dy act(u), dshift = sum dy gate m, dscale = sum dy gate m z; a tiny
second kernel adds the partials per channel in a fixed order (deterministic, no atomics) and writes
them in the parameters' dtypes, zero for output channels with no source. With batch statistics
(mean, invstd: batch norm in training) the sweep only reduces, and a second sweep writes dz with
the gradient through the statistics, which needs the finished sums.

Layouts (see _layout): channels-first kernels tile [rows, BI] over (row, position); channels-last
kernels tile [rows, BC] over (position, channel). Math in fp32 whatever the input dtypes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _layout

__all__ = ["gate_epilogue", "gate_epilogue_backward"]

_AXIS1_MAX = 65535  # CUDA limit on grid dimensions 1 and 2


# ---------------------------------------------------------------------------------------------
# forward


@triton.autotune(configs=_layout.tile_configs(), key=["inner", "BI", "RELU", "HAS_INDEX"])
@triton.jit
def _fwd_cf_kernel(z_ptr, y_ptr, scale_ptr, shift_ptr, gate_ptr, src_ptr, rows, K, C_out, inner,
                   RELU: tl.constexpr, HAS_INDEX: tl.constexpr, TILE: tl.constexpr,
                   BI: tl.constexpr):
    """Channels first. y is (rows = outer * C_out, inner), z is (outer * K, inner). Program
    (rb, ib) writes rows [rb * BR, (rb + 1) * BR) at the columns ib * BI + [0, BI), and again
    every grid1 * BI further (grid dimension 1 is capped at 65535)."""
    BR: tl.constexpr = TILE // BI
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < rows
    o = r // C_out
    c = r - o * C_out
    g = tl.load(gate_ptr + c, mask=rmask, other=0.0).to(tl.float32)
    a = tl.load(scale_ptr + c, mask=rmask, other=0.0).to(tl.float32)
    b = tl.load(shift_ptr + c, mask=rmask, other=0.0).to(tl.float32)
    if HAS_INDEX:
        s = tl.load(src_ptr + c, mask=rmask, other=-1)
        active = rmask & (g != 0.0) & (s >= 0)
        s = tl.maximum(s, 0)
    else:
        s = c
        active = rmask & (g != 0.0)
    y_row = r.to(tl.int64) * inner
    z_row = (o.to(tl.int64) * K + s) * inner
    cols = tl.arange(0, BI)
    step = tl.num_programs(1) * BI
    for i0 in range(tl.program_id(1) * BI, inner, step):
        i = i0 + cols
        imask = (i < inner)[None, :]
        zv = tl.load(z_ptr + (z_row[:, None] + i[None, :]), mask=active[:, None] & imask,
                     other=0.0).to(tl.float32)
        u = a[:, None] * zv + b[:, None]
        if RELU:
            u = tl.maximum(u, 0.0)
        yv = tl.where(active[:, None], g[:, None] * u, 0.0)
        tl.store(y_ptr + (y_row[:, None] + i[None, :]), yv.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & imask)


@triton.autotune(configs=_layout.tile_configs(), key=["C_out", "BC", "RELU", "HAS_INDEX"])
@triton.jit
def _fwd_cl_kernel(z_ptr, y_ptr, scale_ptr, shift_ptr, gate_ptr, src_ptr, outer, K, C_out,
                   RELU: tl.constexpr, HAS_INDEX: tl.constexpr, TILE: tl.constexpr,
                   BC: tl.constexpr):
    """Channels last. y is (outer, C_out), z is (outer, K). Program (rb, cb) writes a [BR, BC]
    tile."""
    BR: tl.constexpr = TILE // BC
    o = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    rmask = o < outer
    cmask = c < C_out
    g = tl.load(gate_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    a = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_INDEX:
        s = tl.load(src_ptr + c, mask=cmask, other=-1)
        active = cmask & (g != 0.0) & (s >= 0)
        s = tl.maximum(s, 0)
    else:
        s = c
        active = cmask & (g != 0.0)
    o64 = o.to(tl.int64)
    zv = tl.load(z_ptr + ((o64 * K)[:, None] + s[None, :]), mask=rmask[:, None] & active[None, :],
                 other=0.0).to(tl.float32)
    u = a[None, :] * zv + b[None, :]
    if RELU:
        u = tl.maximum(u, 0.0)
    yv = tl.where(active[None, :], g[None, :] * u, 0.0)
    tl.store(y_ptr + ((o64 * C_out)[:, None] + c[None, :]), yv.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------------------------------------
# backward


# MODE of the backward sweep: FUSED writes dz and the partial sums in one pass; with batch
# statistics, REDUCE only takes the partial sums and then BN_DZ writes dz, which needs them.
FUSED, REDUCE, BN_DZ = 0, 1, 2


@triton.jit
def _bwd_terms(d, zv, a, b, g, RELU: tl.constexpr):
    """Per element: dy * act(u), du, du * z and dz = du * scale, with du = dy * gate * act'(u)."""
    u = a * zv + b
    if RELU:
        on = u > 0.0
        act = tl.where(on, u, 0.0)
        du = tl.where(on, d * g, 0.0)
    else:
        act = u
        du = d * g
    return d * act, du, du * zv, du * a


@triton.jit
def _bn_coefficients(sums_ptr, stat_mean_ptr, stat_invstd_ptr, k, c, K, inv_count, mask):
    """dz = scale * (du - c0 - c1 * (z - mean)) through the batch statistics, from the fp32 sums
    (dscale, dshift) of z channel k: c0 = dshift / M, c1 = invstd^2 (dscale - mean dshift) / M."""
    m = tl.load(stat_mean_ptr + c, mask=mask, other=0.0).to(tl.float32)
    istd = tl.load(stat_invstd_ptr + c, mask=mask, other=0.0).to(tl.float32)
    s_scale = tl.load(sums_ptr + k, mask=mask, other=0.0)
    s_shift = tl.load(sums_ptr + K + k, mask=mask, other=0.0)
    return m, s_shift * inv_count, istd * istd * (s_scale - m * s_shift) * inv_count


@triton.jit
def _bwd_tile(dy_ptr, z_ptr, dz_ptr, y_offs, z_offs, mask, a, b, g, m, c0, c1, s_g, s_b, s_a,
              RELU: tl.constexpr, MODE: tl.constexpr):
    """One tile of the backward, either layout. MODE 0 and 1 add its dgate, dshift and dscale
    terms to the running sums; MODE 0 stores the epilogue's dz, MODE 2 the dz through the batch
    statistics (m, c0, c1 from _bn_coefficients; unused otherwise)."""
    zv = tl.load(z_ptr + z_offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(dy_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
    t_g, t_b, t_a, dzv = _bwd_terms(d, zv, a, b, g, RELU)
    if MODE != 2:
        s_g += t_g
        s_b += t_b
        s_a += t_a
    if MODE == 2:
        dzv = a * (t_b - c0 - c1 * (zv - m))
    if MODE != 1:
        tl.store(dz_ptr + z_offs, dzv.to(dz_ptr.dtype.element_ty), mask=mask)
    return s_g, s_b, s_a


@triton.autotune(configs=_layout.tile_configs(), key=["inner", "BI", "RELU", "HAS_INDEX", "MODE"])
@triton.jit
def _bwd_cf_kernel(dy_ptr, z_ptr, dz_ptr, scale_ptr, shift_ptr, gate_ptr, index_ptr, part_ptr,
                   stat_mean_ptr, stat_invstd_ptr, sums_ptr, inv_count, outer, K, C_out, inner,
                   P, RELU: tl.constexpr, HAS_INDEX: tl.constexpr, MODE: tl.constexpr,
                   TILE: tl.constexpr, BI: tl.constexpr):
    """Channels first. z, dz are (outer, K, inner), dy is (outer, C_out, inner). Program (k, p)
    takes an equal share of z channel k's [BR, BI] tiles and writes its sums to part (3, K, P):
    dscale, dshift, dgate."""
    BR: tl.constexpr = TILE // BI
    k = tl.program_id(0)
    p = tl.program_id(1)
    if HAS_INDEX:
        c = tl.load(index_ptr + k)
    else:
        c = k
    a = tl.load(scale_ptr + c).to(tl.float32)
    b = tl.load(shift_ptr + c).to(tl.float32)
    g = tl.load(gate_ptr + c).to(tl.float32)
    if MODE == 2:
        m, c0, c1 = _bn_coefficients(sums_ptr, stat_mean_ptr, stat_invstd_ptr, k, c, K, inv_count,
                                     True)
    else:
        m, c0, c1 = 0.0, 0.0, 0.0
    n_bi = tl.cdiv(inner, BI)
    units = tl.cdiv(outer, BR) * n_bi
    per = tl.cdiv(units, P)
    u_start = p * per
    u_end = tl.minimum(u_start + per, units)
    z_k = k.to(tl.int64) * inner  # channel k's offset in z and dz, c's in dy
    dy_c = c.to(tl.int64) * inner
    z_stride = tl.cast(K, tl.int64) * inner
    dy_stride = tl.cast(C_out, tl.int64) * inner
    rows = tl.arange(0, BR)
    cols = tl.arange(0, BI)
    s_g = tl.zeros([BR, BI], dtype=tl.float32)
    s_b = tl.zeros([BR, BI], dtype=tl.float32)
    s_a = tl.zeros([BR, BI], dtype=tl.float32)
    for u in range(u_start, u_end):
        rb = u // n_bi
        ib = u - rb * n_bi
        o = rb * BR + rows
        i = ib * BI + cols
        mask = (o < outer)[:, None] & (i < inner)[None, :]
        o64 = o.to(tl.int64)
        z_offs = (z_k + o64 * z_stride)[:, None] + i[None, :]
        y_offs = (dy_c + o64 * dy_stride)[:, None] + i[None, :]
        s_g, s_b, s_a = _bwd_tile(dy_ptr, z_ptr, dz_ptr, y_offs, z_offs, mask, a, b, g, m, c0, c1,
                                  s_g, s_b, s_a, RELU, MODE)
    if MODE != 2:
        at = k * P + p
        tl.store(part_ptr + at, tl.sum(tl.sum(s_a, axis=1), axis=0))
        tl.store(part_ptr + K * P + at, tl.sum(tl.sum(s_b, axis=1), axis=0))
        tl.store(part_ptr + 2 * K * P + at, tl.sum(tl.sum(s_g, axis=1), axis=0))


@triton.autotune(configs=_layout.tile_configs(), key=["K", "BC", "RELU", "HAS_INDEX", "MODE"])
@triton.jit
def _bwd_cl_kernel(dy_ptr, z_ptr, dz_ptr, scale_ptr, shift_ptr, gate_ptr, index_ptr, part_ptr,
                   stat_mean_ptr, stat_invstd_ptr, sums_ptr, inv_count, outer, K, C_out, P,
                   RELU: tl.constexpr, HAS_INDEX: tl.constexpr, MODE: tl.constexpr,
                   TILE: tl.constexpr, BC: tl.constexpr):
    """Channels last. z, dz are (outer, K), dy is (outer, C_out). Program (kb, p) takes an equal
    share of the row blocks for z channels [kb * BC, (kb + 1) * BC); part is (3, K, P)."""
    BR: tl.constexpr = TILE // BC
    kb = tl.program_id(0)
    p = tl.program_id(1)
    k = kb * BC + tl.arange(0, BC)
    kmask = k < K
    if HAS_INDEX:
        c = tl.load(index_ptr + k, mask=kmask, other=0)
    else:
        c = k
    a = tl.load(scale_ptr + c, mask=kmask, other=0.0).to(tl.float32)[None, :]
    b = tl.load(shift_ptr + c, mask=kmask, other=0.0).to(tl.float32)[None, :]
    g = tl.load(gate_ptr + c, mask=kmask, other=0.0).to(tl.float32)[None, :]
    if MODE == 2:
        m, c0, c1 = _bn_coefficients(sums_ptr, stat_mean_ptr, stat_invstd_ptr, k, c, K, inv_count,
                                     kmask)
        m = m[None, :]
        c0 = c0[None, :]
        c1 = c1[None, :]
    else:
        m, c0, c1 = 0.0, 0.0, 0.0
    n_rb = tl.cdiv(outer, BR)
    per = tl.cdiv(n_rb, P)
    b_start = p * per
    b_end = tl.minimum(b_start + per, n_rb)
    rows = tl.arange(0, BR)
    s_g = tl.zeros([BR, BC], dtype=tl.float32)
    s_b = tl.zeros([BR, BC], dtype=tl.float32)
    s_a = tl.zeros([BR, BC], dtype=tl.float32)
    for rb in range(b_start, b_end):
        o = (rb * BR + rows).to(tl.int64)
        mask = (o < outer)[:, None] & kmask[None, :]
        z_offs = (o * K)[:, None] + k[None, :]
        y_offs = (o * C_out)[:, None] + c[None, :]
        s_g, s_b, s_a = _bwd_tile(dy_ptr, z_ptr, dz_ptr, y_offs, z_offs, mask, a, b, g, m, c0, c1,
                                  s_g, s_b, s_a, RELU, MODE)
    if MODE != 2:
        at = k * P + p
        tl.store(part_ptr + at, tl.sum(s_a, axis=0), mask=kmask)
        tl.store(part_ptr + K * P + at, tl.sum(s_b, axis=0), mask=kmask)
        tl.store(part_ptr + 2 * K * P + at, tl.sum(s_g, axis=0), mask=kmask)


@triton.jit
def _bwd_finalize_kernel(part_ptr, src_ptr, dscale_ptr, dshift_ptr, dgate_ptr, sums_ptr, K, P,
                         HAS_INDEX: tl.constexpr, WRITE_SUMS: tl.constexpr, BP: tl.constexpr):
    """One program per output channel c: adds the P partials of its z channel (src[c], or c) in
    a fixed order and stores them in the output dtypes, zero when src[c] < 0; with WRITE_SUMS
    also the fp32 (dscale, dshift) per z channel to sums (2, K)."""
    c = tl.program_id(0)
    if HAS_INDEX:
        k = tl.load(src_ptr + c)
    else:
        k = c
    present = k >= 0
    k = tl.maximum(k, 0)
    ps = tl.arange(0, BP)
    s_a = tl.zeros([BP], dtype=tl.float32)
    s_b = tl.zeros([BP], dtype=tl.float32)
    s_g = tl.zeros([BP], dtype=tl.float32)
    for p0 in range(0, P, BP):
        p = p0 + ps
        m = p < P
        at = k * P + p
        s_a += tl.load(part_ptr + at, mask=m, other=0.0)
        s_b += tl.load(part_ptr + K * P + at, mask=m, other=0.0)
        s_g += tl.load(part_ptr + 2 * K * P + at, mask=m, other=0.0)
    d_a = tl.where(present, tl.sum(s_a, axis=0), 0.0)
    d_b = tl.where(present, tl.sum(s_b, axis=0), 0.0)
    d_g = tl.where(present, tl.sum(s_g, axis=0), 0.0)
    tl.store(dscale_ptr + c, d_a.to(dscale_ptr.dtype.element_ty))
    tl.store(dshift_ptr + c, d_b.to(dshift_ptr.dtype.element_ty))
    tl.store(dgate_ptr + c, d_g.to(dgate_ptr.dtype.element_ty))
    if WRITE_SUMS:
        tl.store(sums_ptr + k, d_a, mask=present)
        tl.store(sums_ptr + K + k, d_b, mask=present)


# ---------------------------------------------------------------------------------------------
# Python entry points (arguments are validated by the caller: nasprune.ops)


def _source_map(out_index: torch.Tensor, out_channels: int) -> torch.Tensor:
    """int32 (C_out,): the z channel feeding each output channel, -1 where none does."""
    src = torch.full((out_channels,), -1, dtype=torch.int32, device=out_index.device)
    src[out_index] = torch.arange(out_index.numel(), dtype=torch.int32, device=out_index.device)
    return src


def _output_shape(z: torch.Tensor, out_channels: int) -> tuple[int, ...]:
    shape = list(z.shape)
    shape[1] = out_channels
    return tuple(shape)


def _params(*ps: torch.Tensor) -> list[torch.Tensor]:
    return [p.contiguous() for p in ps]


def gate_epilogue(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, gate: torch.Tensor,
                  act: str, out_index: torch.Tensor | None = None,
                  mean: torch.Tensor | None = None, invstd: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """y = gate * act(scale * z + shift) per channel, in z's dtype and memory format; with
    out_index, z[:, k] feeds output channel out_index[k] and the other channels are zero.
    mean and invstd (batch statistics) only matter to the backward and are ignored here."""
    view = _layout.channel_view(z)
    C_out = gate.numel()
    y = torch.empty(_output_shape(z, C_out), dtype=z.dtype, device=z.device,
                    memory_format=view.memory_format)
    if y.numel() == 0:
        return y
    zc = _layout.in_layout(z, view)
    scale, shift, gate = _params(scale, shift, gate)
    has_index = out_index is not None
    src = _source_map(out_index, C_out) if has_index else gate  # any pointer when unused
    relu = act == "relu"
    if view.channels_last:
        BC = _layout.channel_block(C_out)
        grid = lambda meta: (triton.cdiv(view.outer, meta["TILE"] // BC), triton.cdiv(C_out, BC))
        _fwd_cl_kernel[grid](zc, y, scale, shift, gate, src, view.outer, view.channels, C_out,
                             RELU=relu, HAS_INDEX=has_index, BC=BC)
    else:
        BI = _layout.inner_block(view.inner)
        rows = view.outer * C_out
        grid = lambda meta: (triton.cdiv(rows, meta["TILE"] // BI),
                             min(triton.cdiv(view.inner, BI), _AXIS1_MAX))
        _fwd_cf_kernel[grid](zc, y, scale, shift, gate, src, rows, view.channels, C_out,
                             view.inner, RELU=relu, HAS_INDEX=has_index, BI=BI)
    return y


def gate_epilogue_backward(dy: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                           shift: torch.Tensor, gate: torch.Tensor, act: str,
                           out_index: torch.Tensor | None = None,
                           mean: torch.Tensor | None = None, invstd: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, dscale, dshift, dgate) of gate_epilogue: dz like z (dtype and memory format), the
    per-channel gradients in the dtypes of scale, shift and gate (zero for absent channels).

    With batch statistics (mean, invstd of z per output channel; scale = weight * invstd,
    shift = bias - mean * scale) dz also carries the gradient through them, as in
    nasprune.ops.reference: a reduction sweep over (dy, z), then a dz sweep."""
    view = _layout.channel_view(z)
    C_out, K = gate.numel(), view.channels
    dev = z.device
    dz = torch.empty(z.shape, dtype=z.dtype, device=dev, memory_format=view.memory_format)
    dscale = torch.empty(C_out, dtype=scale.dtype, device=dev)
    dshift = torch.empty(C_out, dtype=shift.dtype, device=dev)
    dgate = torch.empty(C_out, dtype=gate.dtype, device=dev)
    if C_out == 0:
        return dz, dscale, dshift, dgate
    if z.numel() == 0:
        for t in (dscale, dshift, dgate):
            t.zero_()
        return dz, dscale, dshift, dgate
    zc = _layout.in_layout(z, view)
    dyc = _layout.in_layout(dy, view)
    scale, shift, gate = _params(scale, shift, gate)
    has_index = out_index is not None
    index = out_index.contiguous() if has_index else gate  # any pointer when unused
    src = _source_map(out_index, C_out) if has_index else gate
    bn = mean is not None
    if bn:
        mean, invstd = _params(mean, invstd)
        sums = torch.empty((2, K), dtype=torch.float32, device=dev)
    else:
        mean = invstd = sums = gate
    relu = act == "relu"
    inv_count = 1.0 / view.per_channel
    if view.channels_last:
        BC = _layout.channel_block(K)
        groups = triton.cdiv(K, BC)
        P = _layout.split_programs(groups, view.outer * BC, dev)

        def sweep(mode, part):
            _bwd_cl_kernel[(groups, P)](dyc, zc, dz, scale, shift, gate, index, part, mean,
                                        invstd, sums, inv_count, view.outer, K, C_out, P,
                                        RELU=relu, HAS_INDEX=has_index, MODE=mode, BC=BC)
    else:
        BI = _layout.inner_block(view.inner)
        P = _layout.split_programs(K, view.per_channel, dev)

        def sweep(mode, part):
            _bwd_cf_kernel[(K, P)](dyc, zc, dz, scale, shift, gate, index, part, mean, invstd,
                                   sums, inv_count, view.outer, K, C_out, view.inner, P,
                                   RELU=relu, HAS_INDEX=has_index, MODE=mode, BI=BI)
    part = torch.empty((3, K, P), dtype=torch.float32, device=dev)
    BP, warps = _layout.reduce_block(P)
    sweep(REDUCE if bn else FUSED, part)
    _bwd_finalize_kernel[(C_out,)](part, src, dscale, dshift, dgate, sums, K, P,
                                   HAS_INDEX=has_index, WRITE_SUMS=bn, BP=BP,
                                   num_warps=warps)
    if bn:
        sweep(BN_DZ, part)
    return dz, dscale, dshift, dgate
