"""Pure-PyTorch reference of every nasprune op: the oracle for the kernel tests and the fallback
when no compiled backend is present. Plain differentiable torch (fp64 gradcheck-able); the math
runs in fp32 or wider and results come back in the input's dtype, as the kernels do."""
from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = ("identity", "relu")


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dimension but 1, in fp32 (fp64 for fp64)."""
    dims = [0] + list(range(2, z.dim()))
    var, mean = torch.var_mean(z.to(_compute_dtype(z.dtype)), dim=dims, correction=0)
    return mean, var


def _scatter_channels(z: Tensor, out_index: Tensor | None, out_channels: int) -> Tensor:
    if out_index is None:
        return z
    full = z.new_zeros((z.shape[0], out_channels) + tuple(z.shape[2:]))
    return full.index_copy(1, out_index, z)


def gate_epilogue(z: Tensor, scale: Tensor, shift: Tensor, gate: Tensor, act: str,
                  out_index: Tensor | None = None) -> Tensor:
    """y[:, c] = gate[c] * act(scale[c] * z[:, c] + shift[c]); with out_index, z[:, k] feeds output
    channel out_index[k] and the other output channels are zero."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    dt = _compute_dtype(z.dtype)
    nd = z.dim()
    zf = _scatter_channels(z.to(dt), out_index, gate.numel())
    u = _per_channel(scale.to(dt), nd) * zf + _per_channel(shift.to(dt), nd)
    if act == "relu":
        u = torch.relu(u)
    y = _per_channel(gate.to(dt), nd) * u
    if out_index is not None:  # channels with no source are zero, whatever their shift
        present = torch.zeros(gate.numel(), dtype=torch.bool, device=z.device)
        present[out_index] = True
        y = y * _per_channel(present.to(dt), nd)
    return y.to(z.dtype)


def gate_epilogue_backward(dy: Tensor, z: Tensor, scale: Tensor, shift: Tensor, gate: Tensor,
                           act: str, out_index: Tensor | None = None
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dscale, dshift, dgate) of gate_epilogue, written out from the chain rule."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    dt = _compute_dtype(z.dtype)
    nd = z.dim()
    dims = [0] + list(range(2, nd))
    zf = _scatter_channels(z.to(dt), out_index, gate.numel())
    u = _per_channel(scale.to(dt), nd) * zf + _per_channel(shift.to(dt), nd)
    on = (u > 0).to(dt) if act == "relu" else torch.ones_like(u)
    if out_index is not None:
        present = torch.zeros(gate.numel(), dtype=torch.bool, device=z.device)
        present[out_index] = True
        on = on * _per_channel(present.to(dt), nd)
    dyf = dy.to(dt)
    du = dyf * _per_channel(gate.to(dt), nd) * on
    dgate = (dyf * u * on).sum(dims)
    dshift = du.sum(dims)
    dscale = (du * zf).sum(dims)
    dz = du * _per_channel(scale.to(dt), nd)
    if out_index is not None:
        dz = dz.index_select(1, out_index)
    return (dz.to(z.dtype), dscale.to(scale.dtype), dshift.to(shift.dtype), dgate.to(gate.dtype))


SCORE_KINDS = ("l1", "l2", "taylor")


def filter_scores(weights: list[Tensor], grads: list[Tensor], kind: str) -> Tensor:
    """One score per row along dim 0 of every tensor, concatenated: "l1" sum |w|, "l2"
    sqrt(sum w^2), "taylor" |sum w * grad| (grads matching weights). fp32 (fp64 for fp64 input)."""
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    out = []
    for i, w in enumerate(weights):
        dt = _compute_dtype(w.dtype)
        rows = w.reshape(w.shape[0], math.prod(w.shape[1:])).to(dt)
        if kind == "l1":
            s = rows.abs().sum(1)
        elif kind == "l2":
            s = torch.linalg.vector_norm(rows, 2, dim=1)  # its gradient at a zero row is zero
        else:
            s = (rows * grads[i].reshape(rows.shape).to(dt)).sum(1).abs()
        out.append(s)
    if not out:
        return torch.empty(0)
    return torch.cat(out)
