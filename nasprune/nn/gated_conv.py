"""Drop-in gated convolution layers.

`GatedConv2d` is an nn.Conv2d whose output channels are multiplied by a per-channel `gate`;
`GatedConvBNAct2d` is conv -> BatchNorm -> activation -> gate with the whole memory-bound tail in
the fused `gate_epilogue` op (batch statistics from `channel_stats`). The convolution stays in
cuDNN / oneDNN. When the gates are binary and frozen (a `FixedMask`, or a binary gate in eval
mode) only the open output channels are convolved and the epilogue scatters them into the
full-width output, so closed channels cost no conv FLOPs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasprune import ops
from nasprune.ops._checks import memory_format
from nasprune.nn import gates as gate_params


class _Gated:
    """Gate handling shared by the gated layers: the raw `gate` parameter, its parameterisation,
    the open-channel index for the sparse path, and input checks."""

    gate: nn.Parameter
    gate_fn: gate_params.GateParam
    _active: tuple | None

    def _init_gate(self, channels: int, gate, device, dtype) -> None:
        self.gate_fn = gate_params.make(gate)
        self.gate = nn.Parameter(torch.full((channels,), self.gate_fn.init_value,
                                            device=device, dtype=dtype))
        self._active = None
        self._taylor_on = False
        self._taylor: Tensor | None = None  # not a buffer: scores stay out of the state dict
        self._taylor_batches = 0

    # FFP's filter importance, activation-Taylor: s[c] += |sum_{n,h,w} dy * y| per backward.
    # The fused backward already reduces dgate = sum dy * act(u) per channel, and y = g * act(u),
    # so sum dy * y = g * dgate: a hook on the gate's gradient adds |g * dgate|, C values per
    # batch, with no pass over the activations.

    def track_activation_taylor(self, enabled: bool = True) -> None:
        """Start (or stop) accumulating the activation-Taylor score over the backward passes that
        follow, one term per forward call. Frozen gates (FixedMask) are scored too:
        their gate values get a gradient of their own, which updates nothing."""
        self._taylor_on = bool(enabled)

    def reset_activation_taylor(self) -> None:
        """Zero the accumulated activation-Taylor score."""
        self._taylor = None
        self._taylor_batches = 0

    @property
    def activation_taylor(self) -> Tensor | None:
        """sum over batches of |sum_{n,h,w} dy * y| per output channel (fp32), None before any
        tracked backward. `activation_taylor_batches` counts the terms."""
        return self._taylor

    @property
    def activation_taylor_batches(self) -> int:
        return self._taylor_batches

    def _add_taylor(self, g: Tensor, dgate: Tensor) -> None:
        with torch.no_grad():
            term = (g.float() * dgate.float()).abs()
            self._taylor = term if self._taylor is None else self._taylor.add_(term)
            self._taylor_batches += 1

    def _track_gate(self, g: Tensor) -> Tensor:
        """g, hooked so that its gradient feeds the activation-Taylor score. A fresh node per
        forward (a view of a leaf, or a detached copy that requires grad for a frozen gate), so
        hooks never pile up on the gate parameter."""
        if not (getattr(self, "_taylor_on", False) and torch.is_grad_enabled()):
            return g
        g = g.view_as(g) if g.requires_grad else g.detach().requires_grad_()
        values = g.detach()
        g.register_hook(lambda dgate: self._add_taylor(values, dgate))
        return g

    def gate_values(self) -> Tensor:
        """The gate values the epilogue multiplies each output channel by."""
        return self.gate_fn(self.gate)

    def _check_gate(self, g: Tensor) -> None:
        bad = ~torch.isfinite(g)
        if bad.any():
            raise ValueError(f"{self._describe()}: gate has non-finite values at channels "
                             f"{bad.nonzero().flatten().tolist()[:8]}")

    def active_index(self) -> Tensor | None:
        """Sorted indices of the open channels when gates are binary and frozen for this forward
        (and some are closed), else None. Cached until the gate parameter changes."""
        fn = self.gate_fn
        if not (fn.binary and (fn.frozen or not self.training)):
            return None
        if torch.compiler.is_compiling():  # no data-dependent shapes in a graph: use the cache
            return self._active[1] if self._active is not None else None
        key = (self.gate._version, self.gate.data_ptr(), fn.extra_repr(), type(fn))
        if self._active is None or self._active[0] != key:
            g = self.gate_values().detach()
            self._check_gate(g)
            index = g.nonzero().flatten()
            self._active = (key, index if index.numel() < g.numel() else None)
        return self._active[1]

    def _check_input(self, x: Tensor, in_channels: int, weight: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._describe()}: input must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != in_channels:
            raise ValueError(f"{self._describe()}: expected input of shape (N, {in_channels}, H, W),"
                             f" got {tuple(x.shape)}")
        if x.device != weight.device:
            raise RuntimeError(f"{self._describe()}: input is on {x.device} but the layer is on "
                               f"{weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{self._describe()}: input has dtype {x.dtype} but the weights have "
                             f"{weight.dtype}")

    def _gate_for_forward(self) -> Tensor:
        g = self.gate_values()
        if g.device.type == "cpu" and not torch.compiler.is_compiling():
            self._check_gate(g.detach())  # cheap on the CPU; on a GPU it would cost a sync per call
        return self._track_gate(g)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A plain conv (or conv-BN pair) state dict has no gate: keep the current one.
        state_dict.setdefault(prefix + "gate", self.gate.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _convolve(conv: nn.Conv2d, x: Tensor, index: Tensor | None) -> Tensor:
    """conv(x) without bias; with `index`, only those output channels (dense conv on the gathered
    filters; depthwise convs gather the matching input channels too)."""
    if index is None:
        return conv._conv_forward(x, conv.weight, None)
    weight = conv.weight.index_select(0, index)
    if conv.groups == 1:
        return conv._conv_forward(x, weight, None)
    if conv.padding_mode != "zeros" or conv.groups != conv.in_channels or \
            conv.out_channels != conv.in_channels:
        raise NotImplementedError  # callers check `_sparse_ok` first
    return F.conv2d(gather_channels(x, index), weight, None, conv.stride, conv.padding,
                    conv.dilation, index.numel())


def _sparse_ok(conv: nn.Conv2d) -> bool:
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.padding_mode == "zeros"
    return conv.groups == 1 or depthwise


def skip_closed_ok(conv: nn.Conv2d) -> bool:
    """Whether :func:`skip_closed_conv` takes this conv: a dense 2-D conv with zero padding given
    as numbers."""
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def skip_closed_conv(conv: nn.Conv2d, x: Tensor, in_open: Tensor | None,
                     out_open: Tensor | None, gathered: Tensor | None = None) -> Tensor:
    """conv(x) without bias, for an `x` whose input channels outside `in_open` are zero and whose
    output gradient will be zero outside `out_open` (the channels binary gates close; None: all
    open). The forward convolves the open input channels into every output channel (a closed
    output still needs its values: a straight-through gate's gradient reads them); the backward
    takes the input gradient from the open output channels and the weight gradient on open
    outputs x open inputs, zero elsewhere. Every product skipped has a zero factor, so the values
    are the dense conv's up to the order of summation. Indices sorted, distinct, in range;
    `skip_closed_ok(conv)` must hold. `gathered`: x[:, in_open] (`gather_channels`) where the
    caller has it already (convs reading one input share it)."""
    return _SkipClosed.apply(x, conv.weight, in_open, out_open, gathered, conv.stride, conv.padding,
                             conv.dilation)


def gather_channels(x: Tensor, index: Tensor) -> Tensor:
    """x[:, index] of a 4-D tensor in its own memory format, in one pass (index_select along the
    channels of a channels-last tensor would return NCHW)."""
    if memory_format(x) == torch.channels_last:
        n, _, h, w = x.shape
        nhwc = x.permute(0, 2, 3, 1)
        return torch.gather(nhwc, 3, index.view(1, 1, 1, -1).expand(n, h, w, -1)).permute(0, 3, 1, 2)
    return x.index_select(1, index)


class _SkipClosed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, in_open, out_open, gathered, stride, padding, dilation):
        xa = x if in_open is None else gathered if gathered is not None else gather_channels(x, in_open)
        wa = weight if in_open is None else _like(weight.index_select(1, in_open), weight)
        # only the open part of x is kept: the input gradient needs x's shape and layout alone
        ctx.save_for_backward(xa, weight, in_open, out_open)
        ctx.x = (x.shape, x.dtype, x.device, memory_format(x))
        ctx.conv = (stride, padding, dilation)
        return F.conv2d(xa, wa, None, stride, padding, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        xa, weight, in_open, out_open = ctx.saved_tensors
        shape, dtype, device, layout = ctx.x
        x = xa if in_open is None else torch.empty(shape, dtype=dtype, device=device, memory_format=layout)
        stride, padding, dilation = ctx.conv
        conv_args = (None, stride, padding, dilation, False, [0] * len(stride), 1)
        dz = dz.contiguous(memory_format=memory_format(xa))
        dza = dz if out_open is None else gather_channels(dz, out_open)
        wo = weight if out_open is None else _like(weight.index_select(0, out_open), weight)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(dza, x, wo, *conv_args, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            woa = wo if in_open is None else _like(wo.index_select(1, in_open), weight)
            dwa = torch.ops.aten.convolution_backward(dza, xa, woa, *conv_args, (False, True, False))[1]
            dw = dwa if in_open is None and out_open is None else torch.zeros_like(weight)
            if in_open is not None and out_open is not None:
                dw.index_put_((out_open.view(-1, 1), in_open.view(1, -1)), dwa)
            elif out_open is not None:
                dw.index_copy_(0, out_open, dwa)
            elif in_open is not None:
                dw.index_copy_(1, in_open, dwa)
        return dx, dw, None, None, None, None, None, None


def _like(t: Tensor, ref: Tensor) -> Tensor:
    return t.contiguous(memory_format=memory_format(ref))


class GatedConv2d(_Gated, nn.Conv2d):
    """nn.Conv2d with a per-output-channel gate: y[:, c] = g[c] * (conv(x)[:, c] + bias[c]).

    Takes nn.Conv2d's arguments plus `gate`, a gate parameterisation (a `nasprune.nn.gates`
    module or its name; default continuous). The state dict is nn.Conv2d's plus `gate`."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *, gate=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self._init_gate(out_channels, gate, self.weight.device, self.weight.dtype)

    def _describe(self) -> str:
        return f"GatedConv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size})"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, self.in_channels, self.weight)
        g = self._gate_for_forward()
        index = self.active_index() if _sparse_ok(self) else None
        z = _convolve(self, x, index)
        ones = torch.ones_like(g)
        shift = self.bias if self.bias is not None else torch.zeros_like(g)
        return ops.gate_epilogue(z, ones, shift, g, "identity", index)


class GatedConvBNAct2d(_Gated, nn.Module):
    """conv -> BatchNorm2d -> activation -> gate, numerically the composition
    `g * act(bn(conv(x)))` (training: batch statistics, running statistics updated as
    nn.BatchNorm2d does; eval: running statistics), with the BN, activation and gate fused.

    The state dict holds `conv.*` and `bn.*` exactly as an nn.Conv2d `conv` and an nn.BatchNorm2d
    `bn` would, plus `gate`, so the weights of a plain conv-BN pair load into it."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, act="relu", *, eps=1e-5, momentum=0.1, gate=None,
                 padding_mode="zeros", device=None, dtype=None):
        super().__init__()
        if act not in ("relu", "identity"):
            raise ValueError(f"act must be 'relu' or 'identity', got {act!r}")
        kw = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups, bias, padding_mode, **kw)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **kw)
        self.act = act
        self._init_gate(out_channels, gate, self.conv.weight.device, self.conv.weight.dtype)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str = "relu", gate=None):
        """A gated layer holding copies of an existing conv's and BN's weights and statistics."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None, act,
                    eps=bn.eps, momentum=bn.momentum, gate=gate, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        layer.conv.load_state_dict(conv.state_dict())
        layer.bn.load_state_dict(bn.state_dict())
        return layer

    def _describe(self) -> str:
        c = self.conv
        return f"GatedConvBNAct2d({c.in_channels}, {c.out_channels}, kernel_size={c.kernel_size})"

    def extra_repr(self) -> str:
        return f"act={self.act!r}"

    def forward(self, x: Tensor) -> Tensor:
        g = self._gate_for_forward()
        return self.fused_forward(x, g, self.active_index() if _sparse_ok(self.conv) else None)

    def fused_forward(self, x: Tensor, g: Tensor, index: Tensor | None = None,
                      skip: tuple | None = None) -> Tensor:
        """`g * act(bn(conv(x)))` for gate values `g` given by the caller (a gated network
        gathers them from one packed vector); `index`: the open channels to convolve, or None.
        `skip`: (in_open, out_open, gathered) of :func:`skip_closed_conv`, where the caller
        knows which input channels are zero and `g` is 0 at every output channel outside
        out_open (the epilogue's backward then gives those channels a zero gradient)."""
        conv = self.conv
        self._check_input(x, conv.in_channels, conv.weight)
        if skip is not None and index is None:
            z = skip_closed_conv(conv, x, *skip)
        else:
            z = _convolve(conv, x, index)  # the conv bias is folded into the BN shift
        return bn_act_gate(self.bn, z, g, self.act, self.training, index, conv.bias, self._describe)


def bn_act_gate(bn: nn.BatchNorm2d, z: Tensor, g: Tensor, act: str, training: bool,
                index: Tensor | None = None, bias: Tensor | None = None,
                describe=lambda: "BatchNorm2d") -> Tensor:
    """`g * act(bn(z + bias))` on the fused ops: training normalises with the batch statistics of
    z (`channel_stats`; the epilogue differentiates through them) and updates bn's running
    statistics as nn.BatchNorm2d does, eval with the running ones. With `index` z holds only those
    channels of bn's (the open channels a sparse conv computed); `describe()` names the layer in
    errors."""
    batch = _batch_statistics(bn, z, training, index, bias, describe)
    if batch is None:  # eval: normalise with the running statistics of z + bias
        centre = bn.running_mean if bias is None else bn.running_mean - bias
        invstd = torch.rsqrt(bn.running_var + bn.eps)
    else:  # training: the batch's statistics of z; the kernel differentiates through them
        centre, invstd = batch
    scale = invstd if bn.weight is None else bn.weight * invstd
    shift = -centre * scale
    if bn.bias is not None:
        shift = bn.bias + shift
    mean, istd = (None, None) if batch is None else batch
    return ops.gate_epilogue(z, scale, shift, g, act, index, mean, istd)


def _batch_statistics(bn: nn.BatchNorm2d, z: Tensor, training: bool, index: Tensor | None,
                      bias: Tensor | None, describe) -> tuple[Tensor, Tensor] | None:
    """Full-width (mean, invstd) of z to normalise with, or None to use the running statistics
    (eval, or an empty batch, which updates nothing). Updates the running statistics of z + bias
    (of the channels in `index`) as nn.BatchNorm2d does."""
    count = z.numel() // max(z.shape[1], 1)
    if not (training or not bn.track_running_stats) or count == 0:
        return None
    if count == 1:
        raise ValueError(f"{describe()}: batch norm needs more than 1 value per channel "
                         f"in training, got input of shape {tuple(z.shape)}")
    with torch.no_grad():
        mean, var = ops.channel_stats(z)
        if training and bn.track_running_stats:
            if bias is not None and index is not None:
                bias = bias.index_select(0, index)
            _update_running(bn, mean if bias is None else mean + bias, var * (count / (count - 1)),
                            index)
        invstd = torch.rsqrt(var + bn.eps)
        if index is not None:
            c = bn.num_features
            mean = mean.new_zeros(c).index_copy(0, index, mean)
            invstd = invstd.new_ones(c).index_copy(0, index, invstd)
    return mean, invstd


@torch.no_grad()
def _update_running(bn: nn.BatchNorm2d, mean: Tensor, unbiased_var: Tensor, index: Tensor | None) -> None:
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / bn.num_batches_tracked if bn.momentum is None else bn.momentum
    for stat, batch in ((bn.running_mean, mean), (bn.running_var, unbiased_var)):
        batch = batch.to(stat.dtype)
        if index is None:
            stat.lerp_(batch, factor)
        else:
            stat.index_copy_(0, index, stat.index_select(0, index).lerp(batch, factor))
