"""Gate parameterisations: small modules that turn a layer's raw per-channel `gate` parameter into
the gate values the epilogue multiplies by. A search method plugs in its own without touching the
layers or the kernels. They hold no parameters or buffers, so a gated layer's state dict is the
same whatever parameterisation it uses.

- `Continuous`: g = raw (the default; plain learnable scaling, L1-style searches).
- `Sigmoid`: g = sigmoid(raw / T) with an annealed temperature T (DAIS, methods.md section 3.2).
- `Threshold`: g = 1[raw > t] forward, identity gradient backward (PaS's straight-through DBC
  gate, methods.md section 5.1; t = 0.5, raw initialised to 0.6).
- `FixedMask`: g = 1[raw != 0], no gradient: a frozen binary mask.
- `Sampled`: g = mask * raw, a learnable weight per channel times a sampled 0/1 mask the searcher
  sets (AST's y = alpha * BN(conv(x)) on the sampled subnetwork, methods.md section 6).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GateParam(nn.Module):
    """Base class. `binary` says whether the values are exactly 0 or 1; `frozen` whether the raw
    gate receives no gradient. Binary gates let a layer in eval mode convolve only the open
    channels; binary and frozen gates let it do so in training too."""

    binary: bool = False
    frozen: bool = False
    init_value: float = 1.0

    def forward(self, raw: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Continuous(GateParam):
    def forward(self, raw: Tensor) -> Tensor:
        return raw


class Sigmoid(GateParam):
    """g = sigmoid(raw / temperature); lower the temperature (`anneal`) to approach 1[raw > 0]."""

    init_value = 1.0

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.anneal(temperature)

    def anneal(self, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw / self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}"


class Threshold(GateParam):
    """g = 1[raw > threshold] with the straight-through estimator dg/draw = 1."""

    binary = True
    init_value = 0.6

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, raw: Tensor) -> Tensor:
        hard = (raw > self.threshold).to(raw.dtype)
        return raw - (raw - hard).detach()

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"


class FixedMask(GateParam):
    """g = 1[raw != 0], detached: set the layer's gate to the 0/1 mask you want to keep."""

    binary = True
    frozen = True

    def forward(self, raw: Tensor) -> Tensor:
        return (raw != 0).to(raw.dtype).detach()


class Sampled(GateParam):
    """g = mask * raw: a learnable weight per channel (raw, initialised to 1) times a 0/1 mask of
    the sampled channels, set with `sample(mask)` (None: every channel, g = raw). The gradient
    reaches only the sampled channels' weights."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def sample(self, mask: Tensor | None) -> None:
        if mask is not None and (mask.dim() != 1 or not bool(((mask == 0) | (mask == 1)).all())):
            raise ValueError(f"sample: mask must be a 1-D tensor of 0s and 1s, got shape {tuple(mask.shape)}")
        self.mask = mask

    def forward(self, raw: Tensor) -> Tensor:
        if self.mask is None:
            return raw
        if self.mask.shape != raw.shape:
            raise ValueError(f"Sampled gate: mask has shape {tuple(self.mask.shape)}, the gates {tuple(raw.shape)}")
        return raw * self.mask.to(device=raw.device, dtype=raw.dtype)


def make(spec: str | GateParam | None) -> GateParam:
    """A gate parameterisation from a module or a name: continuous, sigmoid, threshold, fixed,
    sampled."""
    if isinstance(spec, GateParam):
        return spec
    names = {"continuous": Continuous, "sigmoid": Sigmoid, "threshold": Threshold,
             "fixed": FixedMask, "sampled": Sampled}
    if spec is None:
        return Continuous()
    if spec not in names:
        raise ValueError(f"gate must be a GateParam or one of {sorted(names)}, got {spec!r}")
    return names[spec]()
