"""Inputs and fp64 expectations shared by the filter_scores tests: tests/ops/test_filter_scores.py
(CPU), tests/ops/test_filter_scores_cuda.py (CUDA C++ and Triton) and
tests/kernels/test_triton_interpret_filter_scores.py (Triton's interpreter).

Imports torch only (not triton, nor nasprune): the interpreter tests import it before triton.
"""
import math

import torch

KINDS = ("l1", "l2", "taylor")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "strided")


def make_weights(shapes, dtype, layout="contiguous", seed=0):
    """One random tensor per shape in `dtype` and `layout` (one of LAYOUTS): channels_last applies
    to 4-D tensors, strided to non-empty ones of 2 or more dimensions (rows not dense)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        w = torch.randn(shape, generator=g).to(dtype)
        if layout == "channels_last" and w.dim() == 4:
            w = w.contiguous(memory_format=torch.channels_last)
        elif layout == "strided" and w.dim() >= 2 and w.numel():  # rows not dense: a copy is read
            w = torch.cat([w, w], dim=-1)[..., : w.shape[-1]]
        out.append(w)
    return out


def _rows(w):
    """`w` in fp64 as one row per filter (output channel)."""
    return w.double().reshape(w.shape[0], math.prod(w.shape[1:]))


def definition(weights, grads, kind):
    """Each score written out in fp64 (on the weights' device): per filter row, the sum of |w|
    (l1), the root of the sum of w^2 (l2) or |sum of w * grad| (taylor)."""
    out = []
    for i, w in enumerate(weights):
        rows = _rows(w)
        if kind == "l1":
            out.append(rows.abs().sum(1))
        elif kind == "l2":
            out.append(rows.square().sum(1).sqrt())
        else:
            out.append((rows * grads[i].double().reshape(rows.shape)).sum(1).abs())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def tolerance(weights, grads, kind):
    """fp32 accumulation error bound: a few ulps of the sum of |terms| of each row."""
    bound = []
    for i, w in enumerate(weights):
        rows = _rows(w)
        if kind == "taylor":
            rows = rows * grads[i].double().reshape(rows.shape)
        mag = rows.abs().sum(1)
        bound.append(mag.sqrt() if kind == "l2" else mag)
    return 1e-6 * torch.cat(bound) + 1e-7


def make_case(shapes, kind, dtype, layout="contiguous"):
    """(weights, grads) of `shapes`: grads, of the same shapes and layout, only for taylor (else
    None)."""
    weights = make_weights(shapes, dtype, layout)
    grads = make_weights(shapes, dtype, layout, seed=1) if kind == "taylor" else None
    return weights, grads
