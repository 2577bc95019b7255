"""ChannelSelect: y[:, j] = weight[j] * x[:, index[j]], a channel gather with a per-channel scale.

It starts as the identity (index = arange, weight = 1) and becomes a selection when it is
slimmed: its output channels and its input channels are separate channel spaces, so the layers
that write its output need not keep the channels the layers that write its input keep. This is
what :func:`nasprune.graph.untie` puts on every residual shortcut that passes a stream through
unchanged: each block's output then has a width of its own, and a shortcut whose two sides keep
different channels gathers the kept ones (an input channel its output keeps but its input lost
reads as zero: ``weight`` 0). It costs no multiply-accumulates, one memory pass.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelSelect(nn.Module):
    """y[:, j] = weight[j] * x[:, index[j]] along ``dim`` (default 1, the channels).

    channels: the input (and, unslimmed, the output) channel count. ``index`` (int64) and
    ``weight`` (float) are buffers, not parameters: nothing trains them. ``gathers`` is False
    while ``index`` is the identity and ``scales`` while ``weight`` is all ones; the forward
    skips the gather or the multiply (an identity selection returns its input). Whoever
    changes the buffers in place calls :meth:`refresh` (the handlers and a gated network's
    export do; a loaded state dict refreshes itself).
    """

    def __init__(self, channels: int, dim: int = 1):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"ChannelSelect: channels must be a positive int, got {channels!r}")
        self.dim = int(dim)
        self.in_channels = channels
        self.register_buffer("index", torch.arange(channels))
        self.register_buffer("weight", torch.ones(channels))
        self.gathers = self.scales = False

    @property
    def out_channels(self) -> int:
        return int(self.index.numel())

    def refresh(self) -> None:
        """Recompute ``gathers`` and ``scales`` after ``index`` or ``weight`` changed."""
        n = self.index.numel()
        self.gathers = not (n == self.in_channels and
                            torch.equal(self.index.cpu(), torch.arange(n)))
        self.scales = not bool((self.weight == 1).all())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def forward(self, x: Tensor) -> Tensor:
        d = self.dim % x.dim()
        if x.shape[d] != self.in_channels:
            raise ValueError(f"ChannelSelect: expected {self.in_channels} channels along dim {self.dim}, "
                             f"got x of shape {tuple(x.shape)}")
        y = x.index_select(d, self.index) if self.gathers else x
        if not self.scales:
            return y
        shape = [1] * x.dim()
        shape[d] = -1
        return y * self.weight.to(y.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, dim={self.dim}" + \
            (", gathers" if self.gathers else "") + (", scales" if self.scales else "")
