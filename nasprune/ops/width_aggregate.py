"""width_aggregate / width_aggregate_backward: the TAS width aggregation of one searchable layer
(methods.md 2.3) after its conv, fused into one read and one write forward and one pass over
(dy, z) backward.

K sampled candidate widths c_j <= C (int64 `widths`, on z's device) with mixing weights w_j each
normalise the prefix z[:, :c_j] with their own BatchNorm, folded into the per-channel affine
(scale[j], shift[j]) (rows of (K, C) tensors, zero beyond c_j); channel-wise interpolation (CWI,
adaptive average pooling along channels) brings every fragment to C_max = max_j c_j; their
weighted sum goes through the activation:

    y = act(sum_j w_j CWI(scale[j, :c_j] z[:, :c_j] + shift[j, :c_j], C_max)),  y[:, C_max:] = 0.

C_max is derived on the device, so a layer may run its conv at full width C and never synchronise
(the zero channels are what the next layer's input padding would add); with z sliced to exactly
C_max channels the output is TAS's. The batch statistics of every prefix are the per-channel
statistics of z, so one `channel_stats(z)` serves all candidates. Gradients flow to z, scale,
shift and the weights (and from the weights to the architecture logits through torch's softmax).
"""
from __future__ import annotations

import torch
from torch import Tensor

from nasprune.ops import _backend, _checks, reference


def width_aggregate(z: Tensor, scale: Tensor, shift: Tensor, widths: Tensor, weights: Tensor,
                    act: str = "relu") -> Tensor:
    """y = act(sum_j weights[j] * CWI(scale[j, :c_j] * z[:, :c_j] + shift[j, :c_j], C_max)) on
    channels [0, C_max), C_max = max(widths), and zero on [C_max, C); z is (N, C, ...), scale and
    shift (K, C), widths int64 (K,) with values in [1, C], weights (K,); act "identity" or
    "relu". The result has z's dtype, shape and memory layout.

    CPU kernels raise on widths outside [1, C]; the CUDA and Triton kernels clamp them into that
    range instead (checking would synchronise with the host)."""
    _checks.width_aggregate(z, scale, shift, widths, weights, act)
    if _backend.reference_fallback("width_aggregate"):
        return reference.width_aggregate(z, scale, shift, widths, weights, act)
    return torch.ops.nasprune.width_aggregate(z, scale, shift, widths, weights, act)


def width_aggregate_backward(dy: Tensor, z: Tensor, scale: Tensor, shift: Tensor, widths: Tensor,
                             weights: Tensor, act: str = "relu"
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dscale, dshift, dweights) of width_aggregate from one pass over (dy, z), accumulated in
    fp32; dscale and dshift are (K, C), zero beyond each width, in the dtypes of scale and shift,
    dweights in the dtype of weights."""
    _checks.width_aggregate(z, scale, shift, widths, weights, act)
    _checks.gradient(dy, z, z.shape[1])
    if _backend.reference_fallback("width_aggregate_backward"):
        return reference.width_aggregate_backward(dy, z, scale, shift, widths, weights, act)
    return torch.ops.nasprune.width_aggregate_backward(dy, z, scale, shift, widths, weights, act)


if _backend.HAS_C:

    @torch.library.register_fake("nasprune::width_aggregate")
    def _(z, scale, shift, widths, weights, act):
        return z.new_empty(z.shape).contiguous(memory_format=_checks.memory_format(z))

    @torch.library.register_fake("nasprune::width_aggregate_backward")
    def _(dy, z, scale, shift, widths, weights, act):
        dz = z.new_empty(z.shape).contiguous(memory_format=_checks.memory_format(z))
        return dz, scale.new_empty(scale.shape), shift.new_empty(shift.shape), \
            weights.new_empty(weights.shape)

    def _setup(ctx, inputs, output):
        z, scale, shift, widths, weights, act = inputs
        ctx.act = act
        ctx.save_for_backward(z, scale, shift, widths, weights)

    def _backward(ctx, dy):
        z, scale, shift, widths, weights = ctx.saved_tensors
        dz, dscale, dshift, dweights = torch.ops.nasprune.width_aggregate_backward(
            dy, z, scale, shift, widths, weights, ctx.act)
        return dz, dscale, dshift, None, dweights, None

    torch.library.register_autograd("nasprune::width_aggregate", _backward, setup_context=_setup)

    def _triton_forward(z, scale, shift, widths, weights, act):
        from nasprune.kernels import width_aggregate as kernel
        return kernel.width_aggregate(z, scale, shift, widths, weights, act)

    def _triton_backward(dy, z, scale, shift, widths, weights, act):
        from nasprune.kernels import width_aggregate as kernel
        return kernel.width_aggregate_backward(dy, z, scale, shift, widths, weights, act)

    _backend.register_triton("width_aggregate", _triton_forward)
    _backend.register_triton("width_aggregate_backward", _triton_backward)
