"""Triton filter_scores: one score per row (filter) of every weight tensor, all tensors in one launch.

The tensors stay where they are: a small int64 table on the device lists each tensor's address
(and its gradient's), row length and first output row, and a per-row map names the tensor of every
row. One program reduces one row in fp32, BLOCK elements at a time, and writes its score, so the
pass reads every weight (and gradient) once. Both tables depend only on the tensors' addresses and
shapes, so they are cached: scoring the same parameters again costs one launch and no copy.
"""
from __future__ import annotations

import collections
import os

import torch
import triton
import triton.language as tl

__all__ = ["filter_scores", "KINDS"]

KINDS = {"l1": 0, "l2": 1, "taylor": 2}
# Elements per program step: on a GPU 1024 (8 per thread at 4 warps, two 16-byte loads of fp32);
# the interpreter takes a small block so that test rows span several steps.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 16 if INTERPRET else 1024
NUM_WARPS = 1 if INTERPRET else 4

_TABLE_ROWS = 4  # weight address, gradient address (0 if none), row length, first output row


@triton.jit
def _row_sum(w_ptr, g_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """fp32 sum over one row of |w| (KIND 0), w^2 (1) or w * g (2)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if KIND == 0:
            acc += tl.abs(x)
        elif KIND == 1:
            acc += x * x
        else:
            acc += x * tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.sum(acc, axis=0)


@triton.jit
def _filter_scores_kernel(table_ptr, row_tensor_ptr, out_ptr, T, carrier_ptr, KIND: tl.constexpr,
                          BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Program `row` scores output row `row`. table is (4, T) int64; carrier_ptr is any pointer
    of the weights' element type (the table's addresses are cast to its type). VEC: elements per
    16 bytes; rows that start on a 16-byte boundary and hold a multiple of VEC elements (all but
    a network's first conv, typically) take a copy of the loop told so, which loads 16 bytes at a
    time."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(row_tensor_ptr + row)
    n = tl.load(table_ptr + 2 * T + t)
    base = (row - tl.load(table_ptr + 3 * T + t)) * n
    w_addr = tl.load(table_ptr + t) + base * (16 // VEC)
    aligned = (w_addr % 16 == 0) & (n % VEC == 0)
    g_addr = w_addr
    if KIND == 2:
        g_addr = tl.load(table_ptr + T + t) + base * (16 // VEC)
        aligned = aligned & (g_addr % 16 == 0)
    if aligned:
        # tl.multiple_of marks the op that defines its argument, not one use of it: hints on
        # values shared with the path below (w_addr's pointer, the loaded n) reach that path too,
        # which then loads 16 bytes at a time from rows that are not 16-byte aligned (CUDA error:
        # misaligned address, seen on an H200). So the hints go on values made here alone:
        # (x // 16) * 16 == x and (n // VEC) * VEC == n on this path.
        w_ptr = tl.multiple_of(((w_addr // 16) * 16).to(carrier_ptr.dtype, bitcast=False), 16)
        g_ptr = tl.multiple_of(((g_addr // 16) * 16).to(carrier_ptr.dtype, bitcast=False), 16)
        s = _row_sum(w_ptr, g_ptr, tl.multiple_of((n // VEC) * VEC, VEC), KIND, BLOCK)
    else:
        w_ptr = w_addr.to(carrier_ptr.dtype, bitcast=False)
        g_ptr = g_addr.to(carrier_ptr.dtype, bitcast=False)
        s = _row_sum(w_ptr, g_ptr, n, KIND, BLOCK)
    if KIND == 1:
        s = tl.sqrt(s)
    elif KIND == 2:
        s = tl.abs(s)
    tl.store(out_ptr + row, s)


def _rows_dense(t: torch.Tensor) -> bool:
    """Whether every row along dim 0 is one dense block of memory (contiguous or channels_last)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _prepare(weights, grads):
    """The tensors as the kernel reads them (in place when their rows are dense blocks)."""
    if not grads:
        return [w if _rows_dense(w) else w.contiguous() for w in weights], []
    ws, gs = [], []
    for w, g in zip(weights, grads):
        if _rows_dense(w) and g.stride() == w.stride():
            ws.append(w)
            gs.append(g)
        else:
            ws.append(w.contiguous())
            gs.append(g.contiguous())
    return ws, gs


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 16


def _tables(ws, gs, device):
    """(table (4, T) int64, row -> tensor map int32, total rows), cached by addresses and shapes."""
    key = (device, tuple((w.data_ptr(), w.shape[0], w.numel()) for w in ws),
           tuple(g.data_ptr() for g in gs))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    rows = [w.shape[0] for w in ws]
    first, total = [], 0
    for r in rows:
        first.append(total)
        total += r
    table = torch.tensor([[w.data_ptr() for w in ws],
                          [g.data_ptr() for g in gs] if gs else [0] * len(ws),
                          [w.numel() // r if r else 0 for w, r in zip(ws, rows)],
                          first], dtype=torch.int64)
    row_tensor = torch.repeat_interleave(torch.arange(len(ws), dtype=torch.int32),
                                         torch.tensor(rows, dtype=torch.int64))
    entry = (table.to(device, non_blocking=True), row_tensor.to(device, non_blocking=True), total)
    _CACHE[key] = entry
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return entry


def filter_scores(weights, grads, kind: str) -> torch.Tensor:
    """Per-row l1 / l2 / taylor scores of every tensor in `weights`, concatenated, fp32."""
    ws, gs = _prepare(list(weights), list(grads))
    device = ws[0].device
    table, row_tensor, total = _tables(ws, gs, device)
    out = torch.empty(total, dtype=torch.float32, device=device)
    if total:
        # any non-empty tensor of the weights' dtype tells the kernel the element type
        carrier = next((w for w in ws if w.numel()), None)
        if carrier is None:
            carrier = torch.empty(1, dtype=ws[0].dtype, device=device)
        _filter_scores_kernel[(total,)](table, row_tensor, out, len(ws), carrier, KIND=KINDS[kind],
                                        BLOCK=BLOCK, VEC=16 // ws[0].element_size(),
                                        num_warps=NUM_WARPS)
    # Contiguous copies made above may be freed now: the caching allocator reuses their memory
    # only for work queued after this kernel on the same stream.
    return out
