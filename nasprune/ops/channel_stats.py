"""channel_stats(z) -> (mean, var): per-channel mean and biased variance of an (N, C, ...) tensor
in fp32, one pass over memory, numerically stable. Differentiable: the backward is a per-channel
affine map of z, dz = (dmean + 2 dvar (z - mean)) / M, which is gate_epilogue with identity
activation, so it reuses that kernel instead of adding another."""
from __future__ import annotations

import torch
from torch import Tensor

from nasprune.ops import _backend, _checks, reference


def channel_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, var) of `z` (N, C, ...) over all dimensions but 1, as fp32 vectors of
    length C (var is the biased variance that batch norm normalises with; NaN for N = 0)."""
    _checks.activations("z", z)
    if _backend.reference_fallback("channel_stats"):
        return reference.channel_stats(z)
    return torch.ops.nasprune.channel_stats(z)


if _backend.HAS_C:

    @torch.library.register_fake("nasprune::channel_stats")
    def _(z):
        return z.new_empty((z.shape[1],), dtype=torch.float32), \
            z.new_empty((z.shape[1],), dtype=torch.float32)

    def _setup(ctx, inputs, output):
        (z,) = inputs
        ctx.save_for_backward(z, output[0])

    def _backward(ctx, dmean, dvar):
        z, mean = ctx.saved_tensors
        count = z.numel() // max(z.shape[1], 1)
        if count == 0:
            return torch.zeros_like(z)
        dmean = torch.zeros_like(mean) if dmean is None else dmean.float()
        dvar = torch.zeros_like(mean) if dvar is None else dvar.float()
        scale = dvar * (2.0 / count)
        shift = dmean / count - scale * mean
        return torch.ops.nasprune.gate_epilogue(z, scale, shift, torch.ones_like(mean), "identity")

    torch.library.register_autograd("nasprune::channel_stats", _backward, setup_context=_setup)

    def _triton(z):
        from nasprune.kernels import channel_stats as kernel
        return kernel.channel_stats(z)

    _backend.register_triton("channel_stats", _triton)
