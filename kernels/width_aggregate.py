"""Triton width_aggregate (forward) and width_aggregate_backward.

Candidate j (width c_j clamped to [1, C], weight w_j) feeds output channel o < C_max = max_j c_j
from channels lo_j(o) + e, e < len_j(o) (1 or 2), with weight w_j / len_j(o) (adaptive average
pooling along channels). Each output channel thus reads T = next_pow2(2K) "slots" t = 2j + e:

    u[:, o] = sum_t coef[t, o] z[:, src[t, o]] + sum_t bias[t, o],   y = act(u),   y[:, C_max:] = 0,
    coef = w_j scale[j, src] / len_j(o) (zero for unused slots), bias = w_j shift[j, src] / len_j(o).

Every kernel derives C_max and the slots from `widths` in-kernel: no host synchronisation.

Backward, with du = dy act'(u):
  out pass   per output channel o (program (o, p) or (channel block, p)): recomputes u from z,
             stores du (relu only; for identity du = dy) and per-program fp32 partial sums of
             SD[o] = sum du and PT[t, o] = sum du z[:, src[t, o]];
  in pass    per input channel i: dz[:, i] = sum_j w_j scale[j, i] sum_{o in A_j(i)} du[:, o] / len_j(o)
             over the contiguous range A_j(i) = [floor(i C_max / c_j), ceil((i + 1) C_max / c_j));
  finalise   adds the partials in a fixed order (deterministic, no atomics), then per candidate j
             R1[j, i] = sum_{o in A_j(i)} SD[o] / len_j(o), R2[j, i] likewise from PT[slot of i, o],
             dshift = w_j R1, dscale = w_j R2, dweights[j] = sum_i scale[j, i] R2 + shift[j, i] R1.

Tiles carry the slot (or candidate) axis first: [T, rows, positions] for channels-first tensors,
[T, positions, channels] for channels-last ones. Math in fp32 whatever the input dtypes.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["width_aggregate", "width_aggregate_backward"]

# Read once, at import: the autotune configs are built when the kernels are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per tile (slot axis included) and warps tried on a GPU; one small tile when
# interpreting (about 1 ms per program instance there).
GPU_TILES = ((2048, 4), (4096, 4), (4096, 8))
INTERPRET_TILE = 256
MIN_TILE = INTERPRET_TILE if INTERPRET else min(t for t, _ in GPU_TILES)
_AXIS1_MAX = 65535  # CUDA limit on grid dimensions 1 and 2


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"TILE": INTERPRET_TILE}, num_warps=1)]
    return [triton.Config({"TILE": t}, num_warps=w) for t, w in GPU_TILES]


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# geometry shared by the kernels


@triton.jit
def _cmax(widths_ptr, K, C, KP: tl.constexpr):
    """C_max = max_j clamp(widths[j], 1, C)."""
    j = tl.arange(0, KP)
    c = tl.load(widths_ptr + j, mask=j < K, other=1)
    return tl.max(tl.minimum(tl.maximum(c, 1), C), axis=0)


@triton.jit
def _slots(t, o, live, widths_ptr, weights_ptr, scale_ptr, shift_ptr, K, C, cm):
    """Slot t = 2 j + e of output channel o (broadcast together; `live` masks o): the source
    channel, the coefficient of z, the bias term and whether the slot is used."""
    j = t // 2
    e = t - 2 * j
    has_j = j < K
    c = tl.load(widths_ptr + j, mask=has_j, other=1)
    c = tl.minimum(tl.maximum(c, 1), C)
    w = tl.load(weights_ptr + j, mask=has_j, other=0.0).to(tl.float32)
    lo = (o * c) // cm
    ln = ((o + 1) * c + cm - 1) // cm - lo
    ok = has_j & live & (e < ln)
    src = tl.where(ok, lo + e, 0)
    wl = w / ln.to(tl.float32)
    a = tl.load(scale_ptr + j * C + src, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(shift_ptr + j * C + src, mask=ok, other=0.0).to(tl.float32)
    return src, tl.where(ok, wl * a, 0.0), tl.where(ok, wl * b, 0.0), ok


@triton.jit
def _adjoint(i, valid, c, cm):
    """The outputs A(i) = [alo, ahi) that input channel i (< c) of a width-c candidate feeds."""
    alo = (i * cm) // c
    ahi = tl.minimum(((i + 1) * cm + c - 1) // c, cm)
    return alo, ahi, tl.where(valid, ahi - alo, 0)


@triton.jit
def _inv_len(o, c, cm):
    lo = (o * c) // cm
    ln = ((o + 1) * c + cm - 1) // cm - lo
    return lo, 1.0 / ln.to(tl.float32)


# ---------------------------------------------------------------------------------------------
# forward


@triton.autotune(configs=_configs(), key=["C", "inner", "K", "RELU", "T", "BI"])
@triton.jit
def _fwd_cf_kernel(z_ptr, y_ptr, scale_ptr, shift_ptr, widths_ptr, weights_ptr, rows, C, inner, K,
                   RELU: tl.constexpr, T: tl.constexpr, KP: tl.constexpr, TILE: tl.constexpr,
                   BI: tl.constexpr):
    """Channels first: y and z are (rows = N * C, inner). Program (rb, ib) writes rows
    [rb * BR, (rb + 1) * BR) at columns ib * BI + k * (grid1 * BI) + [0, BI)."""
    BR: tl.constexpr = TILE // (T * BI)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < rows
    n = r // C
    o = r - n * C
    cm = _cmax(widths_ptr, K, C, KP)
    live = rmask & (o < cm)
    src, coef, bias, ok = _slots(tl.arange(0, T)[:, None], o[None, :], live[None, :], widths_ptr,
                                 weights_ptr, scale_ptr, shift_ptr, K, C, cm)  # [T, BR]
    beta = tl.sum(bias, axis=0)
    z_rows = ((n.to(tl.int64) * C)[None, :] + src) * inner
    y_rows = r.to(tl.int64) * inner
    cols = tl.arange(0, BI)
    step = tl.num_programs(1) * BI
    for i0 in range(tl.program_id(1) * BI, inner, step):
        i = i0 + cols
        imask = i < inner
        x = tl.load(z_ptr + (z_rows[:, :, None] + i[None, None, :]),
                    mask=ok[:, :, None] & imask[None, None, :], other=0.0).to(tl.float32)
        u = tl.sum(coef[:, :, None] * x, axis=0) + beta[:, None]
        if RELU:
            u = tl.maximum(u, 0.0)
        yv = tl.where(live[:, None], u, 0.0)
        tl.store(y_ptr + (y_rows[:, None] + i[None, :]), yv.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & imask[None, :])


@triton.autotune(configs=_configs(), key=["C", "K", "RELU", "T", "BC"])
@triton.jit
def _fwd_cl_kernel(z_ptr, y_ptr, scale_ptr, shift_ptr, widths_ptr, weights_ptr, outer, C, K,
                   RELU: tl.constexpr, T: tl.constexpr, KP: tl.constexpr, TILE: tl.constexpr,
                   BC: tl.constexpr):
    """Channels last: y and z are (outer, C). Program (qb, ob) writes a [BR, BC] tile."""
    BR: tl.constexpr = TILE // (T * BC)
    q = tl.program_id(0) * BR + tl.arange(0, BR)
    o = tl.program_id(1) * BC + tl.arange(0, BC)
    qmask = q < outer
    omask = o < C
    cm = _cmax(widths_ptr, K, C, KP)
    live = omask & (o < cm)
    src, coef, bias, ok = _slots(tl.arange(0, T)[:, None], o[None, :], live[None, :], widths_ptr,
                                 weights_ptr, scale_ptr, shift_ptr, K, C, cm)  # [T, BC]
    beta = tl.sum(bias, axis=0)
    q_rows = q.to(tl.int64) * C
    x = tl.load(z_ptr + (q_rows[None, :, None] + src[:, None, :]),
                mask=ok[:, None, :] & qmask[None, :, None], other=0.0).to(tl.float32)
    u = tl.sum(coef[:, None, :] * x, axis=0) + beta[None, :]
    if RELU:
        u = tl.maximum(u, 0.0)
    yv = tl.where(live[None, :], u, 0.0)
    tl.store(y_ptr + (q_rows[:, None] + o[None, :]), yv.to(y_ptr.dtype.element_ty),
             mask=qmask[:, None] & omask[None, :])


# ---------------------------------------------------------------------------------------------
# backward: the out pass (du and the per-output-channel sums)


@triton.autotune(configs=_configs(), key=["C", "inner", "K", "RELU", "T", "BI"])
@triton.jit
def _bwd_out_cf_kernel(dy_ptr, z_ptr, du_ptr, scale_ptr, shift_ptr, widths_ptr, weights_ptr,
                       part_ptr, outer, C, inner, K, P, RELU: tl.constexpr, T: tl.constexpr,
                       KP: tl.constexpr, TILE: tl.constexpr, BI: tl.constexpr):
    """Channels first. Program (o, p) takes an equal share of output channel o's [BR, BI] tiles
    (BR samples, BI positions) and writes its sums to part (1 + T, C, P): SD, then PT per slot."""
    BR: tl.constexpr = TILE // (T * BI)
    o = tl.program_id(0)
    p = tl.program_id(1)
    cm = _cmax(widths_ptr, K, C, KP)
    if o < cm:
        t = tl.arange(0, T)
        src, coef, bias, ok = _slots(t, o, t >= 0, widths_ptr, weights_ptr, scale_ptr, shift_ptr,
                                     K, C, cm)  # [T]
        beta = tl.sum(bias, axis=0)
        n_bi = tl.cdiv(inner, BI)
        units = tl.cdiv(outer, BR) * n_bi
        per = tl.cdiv(units, P)
        u_start = p * per
        u_end = tl.minimum(u_start + per, units)
        sample = tl.cast(C, tl.int64) * inner
        src_off = src.to(tl.int64) * inner
        rows = tl.arange(0, BR)
        cols = tl.arange(0, BI)
        s_d = tl.zeros([BR, BI], dtype=tl.float32)
        s_p = tl.zeros([T, BR, BI], dtype=tl.float32)
        for unit in range(u_start, u_end):
            rb = unit // n_bi
            ib = unit - rb * n_bi
            n = rb * BR + rows
            i = ib * BI + cols
            mask = (n < outer)[:, None] & (i < inner)[None, :]
            n_off = n.to(tl.int64) * sample
            x = tl.load(z_ptr + (n_off[None, :, None] + src_off[:, None, None] + i[None, None, :]),
                        mask=ok[:, None, None] & mask[None, :, :], other=0.0).to(tl.float32)
            offs = (n_off + o.to(tl.int64) * inner)[:, None] + i[None, :]
            d = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if RELU:
                u = tl.sum(coef[:, None, None] * x, axis=0) + beta
                d = tl.where(u > 0.0, d, 0.0)
                tl.store(du_ptr + offs, d.to(du_ptr.dtype.element_ty), mask=mask)
            s_d += d
            s_p += d[None, :, :] * x
        at = o * P + p
        tl.store(part_ptr + at, tl.sum(tl.sum(s_d, axis=1), axis=0))
        tl.store(part_ptr + (1 + t) * C * P + at, tl.sum(tl.sum(s_p, axis=2), axis=1))


@triton.autotune(configs=_configs(), key=["C", "K", "RELU", "T", "BC"])
@triton.jit
def _bwd_out_cl_kernel(dy_ptr, z_ptr, du_ptr, scale_ptr, shift_ptr, widths_ptr, weights_ptr,
                       part_ptr, outer, C, K, P, RELU: tl.constexpr, T: tl.constexpr,
                       KP: tl.constexpr, TILE: tl.constexpr, BC: tl.constexpr):
    """Channels last. Program (ob, p) takes an equal share of the row blocks for output channels
    [ob * BC, (ob + 1) * BC); part is (1 + T, C, P)."""
    BR: tl.constexpr = TILE // (T * BC)
    o = tl.program_id(0) * BC + tl.arange(0, BC)
    p = tl.program_id(1)
    cm = _cmax(widths_ptr, K, C, KP)
    live = (o < C) & (o < cm)
    src, coef, bias, ok = _slots(tl.arange(0, T)[:, None], o[None, :], live[None, :], widths_ptr,
                                 weights_ptr, scale_ptr, shift_ptr, K, C, cm)  # [T, BC]
    beta = tl.sum(bias, axis=0)
    n_rb = tl.cdiv(outer, BR)
    per = tl.cdiv(n_rb, P)
    b_start = p * per
    b_end = tl.minimum(b_start + per, n_rb)
    rows = tl.arange(0, BR)
    s_d = tl.zeros([BR, BC], dtype=tl.float32)
    s_p = tl.zeros([T, BR, BC], dtype=tl.float32)
    for rb in range(b_start, b_end):
        q = rb * BR + rows
        qmask = q < outer
        q_rows = q.to(tl.int64) * C
        x = tl.load(z_ptr + (q_rows[None, :, None] + src[:, None, :]),
                    mask=ok[:, None, :] & qmask[None, :, None], other=0.0).to(tl.float32)
        offs = q_rows[:, None] + o[None, :]
        mask = qmask[:, None] & live[None, :]
        d = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            u = tl.sum(coef[:, None, :] * x, axis=0) + beta[None, :]
            d = tl.where(u > 0.0, d, 0.0)
            tl.store(du_ptr + offs, d.to(du_ptr.dtype.element_ty), mask=mask)
        s_d += d
        s_p += d[None, :, :] * x
    at = o * P + p
    tl.store(part_ptr + at, tl.sum(s_d, axis=0), mask=live)
    t = tl.arange(0, T)[:, None]
    tl.store(part_ptr + (1 + t) * C * P + at[None, :], tl.sum(s_p, axis=1), mask=live[None, :])


# ---------------------------------------------------------------------------------------------
# backward: the in pass (dz)


@triton.autotune(configs=_configs(), key=["C", "inner", "K", "T", "BI"])
@triton.jit
def _bwd_in_cf_kernel(du_ptr, dz_ptr, scale_ptr, widths_ptr, weights_ptr, rows, C, inner, K,
                      T: tl.constexpr, KP: tl.constexpr, TILE: tl.constexpr, BI: tl.constexpr):
    """Channels first: dz and du are (rows = N * C, inner). Candidates on axis 0 of the tiles."""
    BR: tl.constexpr = TILE // (T * BI)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < rows
    n = r // C
    i = (r - n * C)[None, :]
    cm = _cmax(widths_ptr, K, C, KP)
    j = tl.arange(0, KP)[:, None]
    c = tl.minimum(tl.maximum(tl.load(widths_ptr + j, mask=j < K, other=1), 1), C)
    w = tl.load(weights_ptr + j, mask=j < K, other=0.0).to(tl.float32)
    valid = (j < K) & rmask[None, :] & (i < c)  # [KP, BR]
    coef = w * tl.load(scale_ptr + j * C + i, mask=valid, other=0.0).to(tl.float32)
    alo, ahi, alen = _adjoint(i, valid, c, cm)
    steps = tl.max(tl.max(alen, axis=1), axis=0)
    sample = (n.to(tl.int64) * C)[None, :]
    dz_rows = r.to(tl.int64) * inner
    cols = tl.arange(0, BI)
    step = tl.num_programs(1) * BI
    for i0 in range(tl.program_id(1) * BI, inner, step):
        s = i0 + cols
        smask = (s < inner)[None, None, :]
        acc = tl.zeros([BR, BI], dtype=tl.float32)
        for m in range(0, steps):
            o = alo + m
            okm = valid & (o < ahi)
            lo, inv = _inv_len(o, c, cm)
            f = tl.where(okm, coef * inv, 0.0)
            d = tl.load(du_ptr + (((sample + tl.where(okm, o, 0)) * inner)[:, :, None]
                                  + s[None, None, :]),
                        mask=okm[:, :, None] & smask, other=0.0).to(tl.float32)
            acc += tl.sum(f[:, :, None] * d, axis=0)
        tl.store(dz_ptr + (dz_rows[:, None] + s[None, :]), acc.to(dz_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (s < inner)[None, :])


@triton.autotune(configs=_configs(), key=["C", "K", "T", "BC"])
@triton.jit
def _bwd_in_cl_kernel(du_ptr, dz_ptr, scale_ptr, widths_ptr, weights_ptr, outer, C, K,
                      T: tl.constexpr, KP: tl.constexpr, TILE: tl.constexpr, BC: tl.constexpr):
    """Channels last: dz and du are (outer, C). Program (qb, ib) writes a [BR, BC] tile."""
    BR: tl.constexpr = TILE // (T * BC)
    q = tl.program_id(0) * BR + tl.arange(0, BR)
    i1 = tl.program_id(1) * BC + tl.arange(0, BC)
    qmask = q < outer
    imask = i1 < C
    i = i1[None, :]
    cm = _cmax(widths_ptr, K, C, KP)
    j = tl.arange(0, KP)[:, None]
    c = tl.minimum(tl.maximum(tl.load(widths_ptr + j, mask=j < K, other=1), 1), C)
    w = tl.load(weights_ptr + j, mask=j < K, other=0.0).to(tl.float32)
    valid = (j < K) & imask[None, :] & (i < c)  # [KP, BC]
    coef = w * tl.load(scale_ptr + j * C + i, mask=valid, other=0.0).to(tl.float32)
    alo, ahi, alen = _adjoint(i, valid, c, cm)
    steps = tl.max(tl.max(alen, axis=1), axis=0)
    q_rows = q.to(tl.int64) * C
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for m in range(0, steps):
        o = alo + m
        okm = valid & (o < ahi)
        lo, inv = _inv_len(o, c, cm)
        f = tl.where(okm, coef * inv, 0.0)
        d = tl.load(du_ptr + (q_rows[None, :, None] + tl.where(okm, o, 0)[:, None, :]),
                    mask=okm[:, None, :] & qmask[None, :, None], other=0.0).to(tl.float32)
        acc += tl.sum(f[:, None, :] * d, axis=0)
    tl.store(dz_ptr + (q_rows[:, None] + i1[None, :]), acc.to(dz_ptr.dtype.element_ty),
             mask=qmask[:, None] & imask[None, :])


# ---------------------------------------------------------------------------------------------
# backward: finalisation


@triton.jit
def _bwd_sum_kernel(part_ptr, tot_ptr, widths_ptr, K, C, P, NS, KP: tl.constexpr,
                    S: tl.constexpr, BP: tl.constexpr):
    """One program per output channel o: tot[s, o] = sum_p part[s, o, p] in a fixed order (zero
    for o >= C_max, whose partials were never written)."""
    o = tl.program_id(0)
    cm = _cmax(widths_ptr, K, C, KP)
    s = tl.arange(0, S)[:, None]
    smask = (s < NS) & (o < cm)
    acc = tl.zeros([S, BP], dtype=tl.float32)
    for p0 in range(0, P, BP):
        pp = p0 + tl.arange(0, BP)[None, :]
        acc += tl.load(part_ptr + (s * C + o) * P + pp, mask=smask & (pp < P), other=0.0)
    tl.store(tot_ptr + tl.arange(0, S) * C + o, tl.sum(acc, axis=1), mask=tl.arange(0, S) < NS)


@triton.jit
def _bwd_param_kernel(tot_ptr, scale_ptr, shift_ptr, widths_ptr, weights_ptr, dscale_ptr,
                      dshift_ptr, dweights_ptr, K, C, KP: tl.constexpr, BLOCK: tl.constexpr):
    """One program per candidate j: dscale[j], dshift[j] (zero beyond c_j) and dweights[j]."""
    j = tl.program_id(0)
    cm = _cmax(widths_ptr, K, C, KP)
    c = tl.minimum(tl.maximum(tl.load(widths_ptr + j), 1), C)
    w = tl.load(weights_ptr + j).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, C, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        valid = i < c
        alo, ahi, alen = _adjoint(i, valid, c, cm)
        r1 = tl.zeros([BLOCK], dtype=tl.float32)
        r2 = tl.zeros([BLOCK], dtype=tl.float32)
        for m in range(0, tl.max(alen, axis=0)):
            o = alo + m
            ok = valid & (o < ahi)
            lo, inv = _inv_len(o, c, cm)
            o = tl.where(ok, o, 0)
            slot = 2 * j + tl.where(ok, i - lo, 0)
            r1 += inv * tl.load(tot_ptr + o, mask=ok, other=0.0)
            r2 += inv * tl.load(tot_ptr + (1 + slot) * C + o, mask=ok, other=0.0)
        a = tl.load(scale_ptr + j * C + i, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(shift_ptr + j * C + i, mask=valid, other=0.0).to(tl.float32)
        inside = i < C
        tl.store(dshift_ptr + j * C + i, (w * r1).to(dshift_ptr.dtype.element_ty), mask=inside)
        tl.store(dscale_ptr + j * C + i, (w * r2).to(dscale_ptr.dtype.element_ty), mask=inside)
        dw += a * r2 + b * r1
    tl.store(dweights_ptr + j, tl.sum(dw, axis=0).to(dweights_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# host side


def _layout(z: torch.Tensor) -> tuple[bool, torch.memory_format, int, int]:
    """(channels_last, memory format, outer, inner) of the (outer, C, inner) view, as in
    csrc/common.h: channels-last 4-D tensors and tensors with inner == 1 run the channels-last
    kernels."""
    n, inner = z.shape[0], math.prod(z.shape[2:])
    cl = z.dim() == 4 and not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    if cl or inner == 1:
        return True, fmt, n * inner, 1
    return False, fmt, n, inner


def _inner_block(inner: int, slots: int) -> int:
    """Positions per tile row for channels-first kernels: a power of two, so that every TILE
    config holds at least one row of every slot, and at most 8x the row length."""
    return max(1, min(MIN_TILE // slots, _next_pow2(inner)))


def _channel_block(channels: int, slots: int) -> int:
    return max(1, min(MIN_TILE // slots, _next_pow2(channels), 128))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_per_group(groups: int, work: int, device: torch.device) -> int:
    """Programs per channel (block) for the two-stage reductions: enough to fill the device."""
    if device.type != "cuda":
        target = 4
    else:
        target = 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(target, max(groups, 1)), triton.cdiv(work, MIN_TILE), _AXIS1_MAX))


def _geometry(widths):
    k = widths.shape[0]
    return k, _next_pow2(k), _next_pow2(2 * k)


def width_aggregate(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    widths: torch.Tensor, weights: torch.Tensor, act: str) -> torch.Tensor:
    cl, fmt, outer, inner = _layout(z)
    y = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    C = z.shape[1]
    K, KP, T = _geometry(widths)
    zc = z.contiguous(memory_format=fmt)
    args = (scale.contiguous(), shift.contiguous(), widths.contiguous(), weights.contiguous())
    relu = act == "relu"
    if cl:
        BC = _channel_block(C, T)
        grid = lambda meta: (triton.cdiv(outer, meta["TILE"] // (T * BC)), triton.cdiv(C, BC))
        _fwd_cl_kernel[grid](zc, y, *args, outer, C, K, RELU=relu, T=T, KP=KP, BC=BC)
    else:
        BI = _inner_block(inner, T)
        cols = min(triton.cdiv(inner, BI), _AXIS1_MAX)
        grid = lambda meta: (triton.cdiv(outer * C, meta["TILE"] // (T * BI)), cols)
        _fwd_cf_kernel[grid](zc, y, *args, outer * C, C, inner, K, RELU=relu, T=T, KP=KP, BI=BI)
    return y


def width_aggregate_backward(dy: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                             shift: torch.Tensor, widths: torch.Tensor, weights: torch.Tensor,
                             act: str):
    cl, fmt, outer, inner = _layout(z)
    C = z.shape[1]
    K, KP, T = _geometry(widths)
    dev = z.device
    dz = torch.empty(z.shape, dtype=z.dtype, device=dev, memory_format=fmt)
    dscale = torch.empty((K, C), dtype=scale.dtype, device=dev)
    dshift = torch.empty((K, C), dtype=shift.dtype, device=dev)
    dweights = torch.empty((K,), dtype=weights.dtype, device=dev)
    if z.numel() == 0:
        for t in (dscale, dshift, dweights):
            t.zero_()
        return dz, dscale, dshift, dweights
    zc = z.contiguous(memory_format=fmt)
    dyc = dy.contiguous(memory_format=fmt)
    scale_c, shift_c = scale.contiguous(), shift.contiguous()
    widths_c, weights_c = widths.contiguous(), weights.contiguous()
    relu = act == "relu"
    du = torch.empty_like(dyc) if relu else dyc
    params = (scale_c, shift_c, widths_c, weights_c)
    if cl:
        BC = _channel_block(C, T)
        groups = triton.cdiv(C, BC)
        P = _programs_per_group(groups, outer * BC, dev)
        part = torch.empty((1 + T, C, P), dtype=torch.float32, device=dev)
        _bwd_out_cl_kernel[(groups, P)](dyc, zc, du, *params, part, outer, C, K, P, RELU=relu,
                                        T=T, KP=KP, BC=BC)
        grid = lambda meta: (triton.cdiv(outer, meta["TILE"] // (T * BC)), groups)
        _bwd_in_cl_kernel[grid](du, dz, scale_c, widths_c, weights_c, outer, C, K, T=T, KP=KP,
                                BC=BC)
    else:
        BI = _inner_block(inner, T)
        P = _programs_per_group(C, outer * inner, dev)
        part = torch.empty((1 + T, C, P), dtype=torch.float32, device=dev)
        _bwd_out_cf_kernel[(C, P)](dyc, zc, du, *params, part, outer, C, inner, K, P, RELU=relu,
                                   T=T, KP=KP, BI=BI)
        cols = min(triton.cdiv(inner, BI), _AXIS1_MAX)
        grid = lambda meta: (triton.cdiv(outer * C, meta["TILE"] // (T * BI)), cols)
        _bwd_in_cf_kernel[grid](du, dz, scale_c, widths_c, weights_c, outer * C, C, inner, K,
                                T=T, KP=KP, BI=BI)
    tot = torch.empty((1 + T, C), dtype=torch.float32, device=dev)
    _bwd_sum_kernel[(C,)](part, tot, widths_c, K, C, P, 1 + T, KP=KP, S=_next_pow2(1 + T),
                          BP=min(max(_next_pow2(P), 16), 1024), num_warps=4)
    _bwd_param_kernel[(K,)](tot, scale_c, shift_c, widths_c, weights_c, dscale, dshift, dweights,
                            K, C, KP=KP, BLOCK=min(max(_next_pow2(C), 16), 1024), num_warps=4)
    return dz, dscale, dshift, dweights
