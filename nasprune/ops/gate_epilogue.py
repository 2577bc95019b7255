"""gate_epilogue / gate_epilogue_backward: the memory-bound part of a gated conv-BN-activation
layer, y[:, c] = gate[c] * act(scale[c] * z[:, c] + shift[c]), fused into one read and one write
forward and one pass over (dy, z) backward. The backward is an op of its own, so it is traceable
and testable by itself; gate_epilogue's autograd formula calls it."""
from __future__ import annotations

import torch
from torch import Tensor

from nasprune.ops import _backend, _checks, reference


def gate_epilogue(z: Tensor, scale: Tensor, shift: Tensor, gate: Tensor, act: str = "relu",
                  out_index: Tensor | None = None, mean: Tensor | None = None,
                  invstd: Tensor | None = None) -> Tensor:
    """y[:, c] = gate[c] * act(scale[c] * z[:, c] + shift[c]) for z of shape (N, C, ...),
    act "identity" or "relu". With `out_index` (K distinct int64 channel indices) z holds only K
    channels: z[:, k] becomes output channel out_index[k] and every other output channel is zero,
    so a conv over the K active filters fills a full-width output in the same pass. The CPU
    kernels check that its values are distinct and in range; on a GPU that check would
    synchronise with the host on every call, so there the index is trusted (an out-of-range
    value fails in a device-side assertion).

    Batch norm in training: pass the (detached) batch statistics `mean` and `invstd` of z that
    scale = weight * invstd and shift = bias - mean * scale were computed from. The output is the
    same; the backward then also differentiates through the statistics, in the two passes of a
    batch-norm backward, instead of a separate channel_stats backward and a gradient sum."""
    _checks.epilogue(z, scale, shift, gate, act, out_index)
    _checks.batch_stats(mean, invstd, gate.shape[0], z)
    if _backend.reference_fallback("gate_epilogue"):
        return _ReferenceWithStats.apply(z, scale, shift, gate, act, out_index, mean, invstd) \
            if mean is not None else reference.gate_epilogue(z, scale, shift, gate, act, out_index)
    return torch.ops.nasprune.gate_epilogue(z, scale, shift, gate, act, out_index, mean, invstd)


def gate_epilogue_backward(dy: Tensor, z: Tensor, scale: Tensor, shift: Tensor, gate: Tensor,
                           act: str = "relu", out_index: Tensor | None = None,
                           mean: Tensor | None = None, invstd: Tensor | None = None
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dscale, dshift, dgate) of gate_epilogue from one pass over (dy, z) (two with batch
    statistics); the per-channel gradients come back in the dtypes of scale, shift and gate."""
    _checks.epilogue(z, scale, shift, gate, act, out_index)
    _checks.batch_stats(mean, invstd, gate.shape[0], z)
    _checks.gradient(dy, z, gate.shape[0])
    if _backend.reference_fallback("gate_epilogue_backward"):
        return reference.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index, mean, invstd)
    return torch.ops.nasprune.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index,
                                                     mean, invstd)


class _ReferenceWithStats(torch.autograd.Function):
    """The reference fallback with batch statistics: autograd of the plain reference would miss
    the gradient through the (detached) statistics, so use the reference backward formula."""

    @staticmethod
    def forward(ctx, z, scale, shift, gate, act, out_index, mean, invstd):
        ctx.act = act
        ctx.save_for_backward(z, scale, shift, gate, out_index, mean, invstd)
        return reference.gate_epilogue(z, scale, shift, gate, act, out_index)

    @staticmethod
    def backward(ctx, dy):
        z, scale, shift, gate, out_index, mean, invstd = ctx.saved_tensors
        grads = reference.gate_epilogue_backward(dy, z, scale, shift, gate, ctx.act, out_index,
                                                 mean, invstd)
        return (*grads, None, None, None, None)


if _backend.HAS_C:

    @torch.library.register_fake("nasprune::gate_epilogue")
    def _(z, scale, shift, gate, act, out_index=None, mean=None, invstd=None):
        shape = (z.shape[0], gate.shape[0]) + tuple(z.shape[2:])
        return z.new_empty(shape).contiguous(memory_format=_checks.memory_format(z))

    @torch.library.register_fake("nasprune::gate_epilogue_backward")
    def _(dy, z, scale, shift, gate, act, out_index=None, mean=None, invstd=None):
        dz = z.new_empty(z.shape).contiguous(memory_format=_checks.memory_format(z))
        return dz, torch.empty_like(scale), torch.empty_like(shift), torch.empty_like(gate)

    def _setup(ctx, inputs, output):
        z, scale, shift, gate, act, out_index, mean, invstd = inputs
        ctx.act = act
        ctx.save_for_backward(z, scale, shift, gate, out_index, mean, invstd)

    def _backward(ctx, dy):
        z, scale, shift, gate, out_index, mean, invstd = ctx.saved_tensors
        dz, dscale, dshift, dgate = torch.ops.nasprune.gate_epilogue_backward(
            dy, z, scale, shift, gate, ctx.act, out_index, mean, invstd)
        return dz, dscale, dshift, dgate, None, None, None, None

    torch.library.register_autograd("nasprune::gate_epilogue", _backward, setup_context=_setup)

    def _triton_forward(z, scale, shift, gate, act, out_index=None, mean=None, invstd=None):
        from nasprune.kernels import gate_epilogue as kernel
        return kernel.gate_epilogue(z, scale, shift, gate, act, out_index)

    def _triton_backward(dy, z, scale, shift, gate, act, out_index=None, mean=None, invstd=None):
        from nasprune.kernels import gate_epilogue as kernel
        return kernel.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index, mean, invstd)

    _backend.register_triton("gate_epilogue", _triton_forward)
    _backend.register_triton("gate_epilogue_backward", _triton_backward)
