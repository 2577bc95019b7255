"""gate_epilogue / gate_epilogue_backward: the memory-bound part of a gated conv-BN-activation
layer, y[:, c] = gate[c] * act(scale[c] * z[:, c] + shift[c]), fused into one read and one write
forward and one pass over (dy, z) backward. The backward is an op of its own, so it is traceable
and testable by itself; gate_epilogue's autograd formula calls it."""
from __future__ import annotations

import torch
from torch import Tensor

from nasprune.ops import _backend, _checks, reference


def gate_epilogue(z: Tensor, scale: Tensor, shift: Tensor, gate: Tensor, act: str = "relu",
                  out_index: Tensor | None = None) -> Tensor:
    """y[:, c] = gate[c] * act(scale[c] * z[:, c] + shift[c]) for z of shape (N, C, ...),
    act "identity" or "relu". With `out_index` (K distinct int64 channel indices) z holds only K
    channels: z[:, k] becomes output channel out_index[k] and every other output channel is zero,
    so a conv over the K active filters fills a full-width output in the same pass."""
    _checks.epilogue(z, scale, shift, gate, act, out_index)
    if _backend.reference_fallback("gate_epilogue"):
        return reference.gate_epilogue(z, scale, shift, gate, act, out_index)
    return torch.ops.nasprune.gate_epilogue(z, scale, shift, gate, act, out_index)


def gate_epilogue_backward(dy: Tensor, z: Tensor, scale: Tensor, shift: Tensor, gate: Tensor,
                           act: str = "relu", out_index: Tensor | None = None
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dscale, dshift, dgate) of gate_epilogue from one pass over (dy, z); the per-channel
    gradients come back in the dtypes of scale, shift and gate."""
    _checks.epilogue(z, scale, shift, gate, act, out_index)
    _checks.gradient(dy, z, gate.shape[0])
    if _backend.reference_fallback("gate_epilogue_backward"):
        return reference.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index)
    return torch.ops.nasprune.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index)


if _backend.HAS_C:

    @torch.library.register_fake("nasprune::gate_epilogue")
    def _(z, scale, shift, gate, act, out_index=None):
        shape = (z.shape[0], gate.shape[0]) + tuple(z.shape[2:])
        return z.new_empty(shape).contiguous(memory_format=_checks.memory_format(z))

    @torch.library.register_fake("nasprune::gate_epilogue_backward")
    def _(dy, z, scale, shift, gate, act, out_index=None):
        dz = z.new_empty(z.shape).contiguous(memory_format=_checks.memory_format(z))
        return dz, torch.empty_like(scale), torch.empty_like(shift), torch.empty_like(gate)

    def _setup(ctx, inputs, output):
        z, scale, shift, gate, act, out_index = inputs
        ctx.act = act
        ctx.save_for_backward(z, scale, shift, gate, out_index)

    def _backward(ctx, dy):
        z, scale, shift, gate, out_index = ctx.saved_tensors
        dz, dscale, dshift, dgate = torch.ops.nasprune.gate_epilogue_backward(
            dy, z, scale, shift, gate, ctx.act, out_index)
        return dz, dscale, dshift, dgate, None, None

    torch.library.register_autograd("nasprune::gate_epilogue", _backward, setup_context=_setup)

    def _triton_forward(z, scale, shift, gate, act, out_index=None):
        from nasprune.kernels import gate_epilogue as kernel
        return kernel.gate_epilogue(z, scale, shift, gate, act, out_index)

    def _triton_backward(dy, z, scale, shift, gate, act, out_index=None):
        from nasprune.kernels import gate_epilogue as kernel
        return kernel.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index)

    _backend.register_triton("gate_epilogue", _triton_forward)
    _backend.register_triton("gate_epilogue_backward", _triton_backward)
