"""A stand-alone per-channel gate: `apply_gate` (functional) and `ChannelGate` (a module).

Along dim 1 of an (N, C, ...) tensor the gate runs on the fused `gate_epilogue` op (scale one,
shift zero, identity activation), whose backward reduces the per-channel gate gradient in the
same pass that computes the input gradient, so a gate placed anywhere in a network (after a
SiLU, on a residual stream) trains as cheaply as one fused into `GatedConvBNAct2d`.
"""
from __future__ import annotations

from torch import Tensor, nn

from nasprune import ops
from nasprune.nn.gated_conv import _Gated
from nasprune.ops._checks import FLOAT_DTYPES


def _check(x: Tensor, g: Tensor, dim: int, what: str) -> int:
    """``dim`` normalised to 0..x.dim()-1, after checking that ``g`` gates that dimension of x."""
    if not isinstance(x, Tensor) or not isinstance(g, Tensor):
        bad = "x" if not isinstance(x, Tensor) else "g"
        raise TypeError(f"{what}: {bad} must be a Tensor, got {type(x if bad == 'x' else g).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{what}: x must have at least one dimension to gate, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(f"{what}: dim {dim} is out of range for x of shape {tuple(x.shape)}")
    d = dim % x.dim()
    if g.dim() != 1 or g.shape[0] != x.shape[d]:
        raise ValueError(f"{what}: gate must have shape ({x.shape[d]},) to match dim {dim} of x of "
                         f"shape {tuple(x.shape)}, got {tuple(g.shape)}")
    if not g.is_floating_point():
        raise ValueError(f"{what}: gate must be a floating tensor, got {g.dtype}")
    if g.device != x.device:
        raise RuntimeError(f"{what}: gate is on {g.device} but x is on {x.device}")
    return d


def apply_gate(x: Tensor, g: Tensor, dim: int = 1) -> Tensor:
    """y = x * g along dimension ``dim`` of x (``g`` holds x.shape[dim] values), in x's dtype.

    Differentiable in x and g. Along dim 1 of a tensor of two or more dimensions (and a dtype the
    ops take) it runs on `gate_epilogue`; anywhere else it is a broadcast multiply."""
    d = _check(x, g, dim, "apply_gate")
    if d == 1 and x.dim() >= 2 and x.dtype in FLOAT_DTYPES:
        return ops.gate_epilogue(x, g.new_ones(g.shape), g.new_zeros(g.shape), g, "identity")
    shape = [1] * x.dim()
    shape[d] = -1
    return x * g.to(x.dtype).view(shape)


class ChannelGate(_Gated, nn.Module):
    """y = x * gate_values() along ``dim``: a per-channel gate of its own, for places where no
    fused gated layer fits. ``gate`` is a parameterisation from `nasprune.nn.gates` (a module or
    its name; default continuous); the state dict holds only the raw ``gate``. Like the gated
    convolutions it checks for non-finite gates (on the CPU) and can track FFP's
    activation-Taylor score (`track_activation_taylor`)."""

    def __init__(self, channels: int, gate=None, dim: int = 1, *, device=None, dtype=None):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"ChannelGate: channels must be a positive int, got {channels!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"ChannelGate: dim must be an int, got {type(dim).__name__}")
        self.channels, self.dim = channels, dim
        self._init_gate(channels, gate, device, dtype)

    def _describe(self) -> str:
        return f"ChannelGate({self.channels}, dim={self.dim})"

    def extra_repr(self) -> str:
        return f"{self.channels}, dim={self.dim}"

    def forward(self, x: Tensor) -> Tensor:
        g = self._gate_for_forward()
        _check(x, g, self.dim, self._describe())
        return apply_gate(x, g, self.dim)
