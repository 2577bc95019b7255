"""Pure-PyTorch reference of every nasprune op: the oracle for the kernel tests and the fallback
when no compiled backend is present. Plain differentiable torch (fp64 gradcheck-able); the math
runs in fp32 or wider and results come back in the input's dtype, as the kernels do."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
                  out_index: Tensor | None = None, mean: Tensor | None = None,
                  invstd: Tensor | None = None) -> Tensor:
    """y[:, c] = gate[c] * act(scale[c] * z[:, c] + shift[c]); with out_index, z[:, k] feeds output
    channel out_index[k] and the other output channels are zero. mean and invstd matter only to
    the backward (see gate_epilogue_backward)."""
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
                           act: str, out_index: Tensor | None = None, mean: Tensor | None = None,
                           invstd: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dscale, dshift, dgate) of gate_epilogue, written out from the chain rule. With batch
    statistics (scale = weight * invstd, shift = bias - mean * scale, mean and invstd those of z
    over its M values per channel) dz also carries the gradient through them:
    dz += -(scale / M) * dshift - (scale * invstd / M) * (z - mean) * sum(du * xhat)."""
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
    if mean is not None:
        count = z.numel() // max(z.shape[1], 1)
        m, istd, a = (_per_channel(v.to(dt), nd) for v in (mean, invstd, scale))
        dweight_hat = _per_channel(invstd.to(dt) * (dscale - mean.to(dt) * dshift), nd)
        dz = dz - a * _per_channel(dshift, nd) / count - a * istd * (zf - m) * dweight_hat / count
    if out_index is not None:
        dz = dz.index_select(1, out_index)
    return (dz.to(z.dtype), dscale.to(scale.dtype), dshift.to(shift.dtype), dgate.to(gate.dtype))


def _check_widths(widths: Tensor, channels: int) -> list[int]:
    ws = [int(c) for c in widths.tolist()]  # the oracle may synchronise; the kernels do not
    if not ws or any(c < 1 or c > channels for c in ws):
        raise ValueError(f"widths must lie in [1, {channels}] (z's channels), got {ws}")
    return ws


def channel_interpolate(x: Tensor, channels: int) -> Tensor:
    """CWI: adaptive average pooling of (N, C, *) along the channel axis to `channels` channels,
    as TAS computes it (adaptive_avg_pool3d over (C, H, W) -> (channels, H, W))."""
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    length = math.prod(spatial)
    if x.numel() == 0 or length == 0:
        return x.new_zeros((n, channels) + spatial)
    pooled = F.adaptive_avg_pool3d(x.reshape(n, 1, c, length, 1), (channels, length, 1))
    return pooled.reshape((n, channels) + spatial)


def width_aggregate(z: Tensor, scale: Tensor, shift: Tensor, widths: Tensor, weights: Tensor,
                    act: str) -> Tensor:
    """TAS width aggregation: y = act(sum_j weights[j] * CWI(scale[j, :c_j] * z[:, :c_j]
    + shift[j, :c_j], C_max)) zero-padded from C_max = max_j c_j to z's C channels, c_j = widths[j].
    Composed as TAS writes it: prefix slices, per-candidate affine (the folded BN),
    adaptive_avg_pool3d, weighted sum, zero padding."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    dt = _compute_dtype(z.dtype)
    nd = z.dim()
    channels = z.shape[1]
    ws = _check_widths(widths, channels)
    cmax = max(ws)
    zf = z.to(dt)
    total = None
    for j, c in enumerate(ws):
        fragment = (zf[:, :c] * _per_channel(scale[j, :c].to(dt), nd)
                    + _per_channel(shift[j, :c].to(dt), nd))
        term = weights[j].to(dt) * channel_interpolate(fragment, cmax)
        total = term if total is None else total + term
    pad = [0, 0] * (nd - 2) + [0, channels - cmax]
    y = F.pad(total, pad)
    if act == "relu":
        y = torch.relu(y)
    return y.to(z.dtype)


def width_aggregate_backward(dy: Tensor, z: Tensor, scale: Tensor, shift: Tensor, widths: Tensor,
                             weights: Tensor, act: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dscale, dshift, dweights) of width_aggregate: autograd through the composition."""
    dt = _compute_dtype(z.dtype)
    leaves = [t.detach().to(dt).requires_grad_() for t in (z, scale, shift, weights)]
    with torch.enable_grad():
        y = width_aggregate(leaves[0], leaves[1], leaves[2], widths, leaves[3], act)
        grads = torch.autograd.grad(y, leaves, dy.to(dt), allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    return (grads[0].to(z.dtype), grads[1].to(scale.dtype), grads[2].to(shift.dtype),
            grads[3].to(weights.dtype))


from nasprune.ops._checks import SCORE_KINDS  # noqa: E402  (one list of kinds)


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
