"""filter_scores: one importance score per filter (row along dim 0) of every tensor in a list, all
tensors in one pass: a segmented reduction, fp32 accumulation, one launch on a GPU. "l1" is
sum |w|, "l2" sqrt(sum w^2), "taylor" |sum w * grad| (first-order Taylor, Molchanov et al.).
Differentiable in the weights (and gradients), so "l2" also serves as a group-lasso penalty."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from nasprune.ops import _backend, _checks, reference


def filter_scores(weights: Sequence[Tensor], kind: str = "l1",
                  grads: Sequence[Tensor] | None = None) -> Tensor:
    """Scores of every row of every tensor in `weights` (conv weights (C_out, C_in/groups, kh, kw),
    linear weights (out, in), any tensor with filters along dim 0), concatenated in order as one
    fp32 vector of length sum(w.shape[0]); split it with `.split([w.shape[0] for w in weights])`.
    All tensors share a dtype (fp32, fp16 or bf16) and a device. `grads` (kind "taylor" only):
    one tensor per weight, same shape and dtype, e.g. [w.grad for w in weights]."""
    weights = list(weights) if isinstance(weights, (list, tuple)) else weights
    _checks.filter_scores(weights, grads, kind)
    grads = list(grads) if grads is not None else []
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    if _backend.reference_fallback("filter_scores"):
        return reference.filter_scores(weights, grads, kind).float()
    return torch.ops.nasprune.filter_scores(weights, grads, kind)


if _backend.HAS_C:

    @torch.library.register_fake("nasprune::filter_scores")
    def _(weights, grads, kind):
        total = sum(w.shape[0] for w in weights)
        return weights[0].new_empty((total,), dtype=torch.float32)

    def _setup(ctx, inputs, output):
        weights, grads, kind = inputs
        ctx.kind = kind
        ctx.n = len(weights)
        ctx.save_for_backward(*weights, *grads, output)

    def _backward(ctx, dout):
        saved = ctx.saved_tensors
        n, kind = ctx.n, ctx.kind
        weights, grads, out = saved[:n], saved[n:-1], saved[-1]
        split = [w.shape[0] for w in weights]
        douts, outs = dout.split(split), out.split(split)
        dw, dg = [], []
        for i, w in enumerate(weights):
            shape = (-1,) + (1,) * (w.dim() - 1)
            d = douts[i].view(shape)
            wf = w.float()
            if kind == "l1":
                dw.append((wf.sign() * d).to(w.dtype))
            elif kind == "l2":  # w / |w|, zero for a zero row
                s = outs[i]
                inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
                dw.append((wf * (inv.view(shape) * d)).to(w.dtype))
            else:
                gf = grads[i].float()
                signed = (wf * gf).reshape(w.shape[0], math.prod(w.shape[1:])).sum(1)
                k = (signed.sign() * douts[i]).view(shape)  # d|s|/ds, zero at s = 0
                dw.append((gf * k).to(w.dtype))
                dg.append((wf * k).to(w.dtype))
        return dw, dg, None  # dg is empty, like grads, unless kind is taylor

    torch.library.register_autograd("nasprune::filter_scores", _backward, setup_context=_setup)

    def _triton(weights, grads, kind):
        from nasprune.kernels import filter_scores as kernel
        return kernel.filter_scores(weights, grads, kind)

    _backend.register_triton("filter_scores", _triton)
