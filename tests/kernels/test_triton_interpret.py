"""The Triton kernels, run by Triton's interpreter on CPU tensors, against nasprune.ops.reference.

TRITON_INTERPRET must be set before the kernels are decorated, hence at the very top; run this file
in its own process (`TRITON_INTERPRET=1 python -m pytest tests/kernels`). The interpreter takes
about 1 ms per program instance, so shapes stay tiny; kernels/_layout gives it one small tile, so
these shapes still cover multi-tile rows, several tiles per program and several programs per
channel.
"""
import os
import sys

# Triton decides interpreter or compiler when it decorates a function, its own library included,
# so a triton imported earlier in this process without the variable cannot interpret.
_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nasprune.kernels import _layout  # noqa: E402
from nasprune.kernels import channel_stats as cs  # noqa: E402
from nasprune.kernels import gate_epilogue as ge  # noqa: E402
from nasprune.ops import reference  # noqa: E402

if _LATE or not _layout.INTERPRET:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run "
                "`TRITON_INTERPRET=1 python -m pytest tests/kernels`", allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (atol, rtol) for outputs in the input dtype, and for fp32 per-channel reductions
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SUM_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1e-4)}


def close(actual, expected, tol):
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=tol[0], rtol=tol[1], equal_nan=True)


def make(shape, dtype, layout, seed=0, offset=0.0):
    """A test tensor in `layout`: "nchw", "cl" (channels_last) or "strided" (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other position of the last dimension
        big = list(shape)
        big[-1] *= 2
        z = (torch.randn(big, generator=g) + offset).to(dtype)[..., ::2]
        assert not z.is_contiguous()
        return z
    z = (torch.randn(shape, generator=g) + offset).to(dtype)
    return z.to(memory_format=torch.channels_last) if layout == "cl" else z


def params(c, seed=1, dtype=torch.float32, zero_gates=False):
    g = torch.Generator().manual_seed(seed)
    scale, shift, gate = (torch.randn(c, generator=g).to(dtype) for _ in range(3))
    if zero_gates:
        gate[::2] = 0
    return scale, shift, gate


# ---------------------------------------------------------------------------------------------
# channel_stats


@pytest.mark.parametrize("layout", ["nchw", "cl", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_stats_matches_reference(dtype, layout):
    z = make((2, 3, 7, 7), dtype, layout)
    mean, var = cs.channel_stats(z)
    ref_mean, ref_var = reference.channel_stats(z)
    close(mean, ref_mean, SUM_TOL[torch.float32])
    close(var, ref_var, SUM_TOL[torch.float32])


@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (3, 5, 12, 12), (4, 6, 33), (9, 5), (5, 4, 1, 1),
                                   (2, 70, 3, 3)])
def test_channel_stats_shapes(shape):
    z = make(shape, torch.float32, "nchw", seed=3)
    mean, var = cs.channel_stats(z)
    ref_mean, ref_var = reference.channel_stats(z)
    close(mean, ref_mean, SUM_TOL[torch.float32])
    close(var, ref_var, SUM_TOL[torch.float32])


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("offset", [1e3, -3e4])
def test_channel_stats_large_mean_is_stable(layout, offset):
    """|mean| >> std: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance here."""
    z = make((4, 3, 12, 12), torch.float32, layout, seed=5, offset=offset)
    mean, var = cs.channel_stats(z)
    var64, mean64 = torch.var_mean(z.double(), dim=(0, 2, 3), correction=0)
    ref_mean, ref_var = reference.channel_stats(z)
    torch.testing.assert_close(var.double(), var64, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=2e-7, atol=0)
    close(var, ref_var, (0, 1e-6))
    close(mean, ref_mean, (0, 2e-7))
    assert (var - 1).abs().max() < 0.3  # the data has unit variance around the offset


def test_channel_stats_constant_channel_has_zero_variance():
    z = torch.full((3, 2, 5, 5), 1234.5678)
    z[:, 1] = torch.randn(3, 5, 5)
    mean, var = cs.channel_stats(z)
    assert var[0].item() == 0.0
    assert mean[0].item() == z[0, 0, 0, 0].item()
    close(var[1:], reference.channel_stats(z)[1][1:], SUM_TOL[torch.float32])


def test_channel_stats_empty():
    mean, var = cs.channel_stats(torch.empty(0, 4, 3, 3))
    assert mean.shape == var.shape == (4,) and mean.dtype == torch.float32
    assert torch.isnan(mean).all() and torch.isnan(var).all()
    mean, var = cs.channel_stats(torch.empty(2, 0, 3, 3))
    assert mean.shape == var.shape == (0,)


# ---------------------------------------------------------------------------------------------
# gate_epilogue forward and backward


def run_both(z, scale, shift, gate, act, out_index=None, seed=7, dy_layout=None):
    y = ge.gate_epilogue(z, scale, shift, gate, act, out_index)
    ref_y = reference.gate_epilogue(z, scale, shift, gate, act, out_index)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(ref_y.shape, generator=g).to(z.dtype)
    if dy_layout == "cl":
        dy = dy.to(memory_format=torch.channels_last)
    elif dy_layout == "strided":
        dy = dy.transpose(-1, -2).contiguous().transpose(-1, -2)
    grads = ge.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index)
    ref_grads = reference.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index)
    return y, ref_y, grads, ref_grads


def check(z, y, ref_y, grads, ref_grads):
    close(y, ref_y, TOL[z.dtype])
    close(grads[0], ref_grads[0], TOL[z.dtype])
    for got, want in zip(grads[1:], ref_grads[1:]):
        close(got, want, SUM_TOL[z.dtype])
    # outputs keep z's memory format (channels_last stays channels_last, the rest contiguous)
    cl = z.dim() == 4 and not z.is_contiguous() and z.is_contiguous(
        memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gate_epilogue_matches_reference(layout, dtype, act, with_index):
    if with_index:
        z = make((2, 3, 7, 7), dtype, layout)
        out_index = torch.tensor([4, 0, 2])
        scale, shift, gate = params(5)
    else:
        z = make((1, 3, 7, 7), dtype, layout)
        out_index = None
        scale, shift, gate = params(3)
    check(z, *run_both(z, scale, shift, gate, act, out_index))


@pytest.mark.parametrize("shape", [(3, 5, 12, 12), (4, 6, 33), (9, 5), (5, 4, 1, 1), (2, 70, 3, 3),
                                   (1, 1, 130)])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_gate_epilogue_shapes(shape, act):
    z = make(shape, torch.float32, "nchw", seed=11)
    check(z, *run_both(z, *params(shape[1], seed=12), act))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gate_epilogue_index_shapes(layout):
    """More tiles per row, several programs per channel, and channel blocks beyond one tile."""
    z = make((3, 4, 12, 12), torch.float32, layout, seed=13)
    out_index = torch.tensor([6, 0, 3, 2])
    check(z, *run_both(z, *params(7, seed=14), "relu", out_index))
    z = make((2, 66, 2, 2), torch.float32, layout, seed=15)
    out_index = torch.randperm(80, generator=torch.Generator().manual_seed(16))[:66]
    check(z, *run_both(z, *params(80, seed=17), "identity", out_index))


@pytest.mark.parametrize("z_layout,dy_layout", [("strided", None), ("nchw", "cl"),
                                                ("cl", "nchw"), ("cl", "strided")])
def test_gate_epilogue_non_contiguous(z_layout, dy_layout):
    z = make((2, 3, 6, 5), torch.float32, z_layout, seed=19)
    check(z, *run_both(z, *params(3, seed=20), "relu", dy_layout=dy_layout))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_zero_gates_do_not_read_z(layout):
    """Zero-gate channels are written as zeros without reading z: NaNs there do not leak."""
    z = make((2, 4, 5, 5), torch.float32, layout, seed=21)
    scale, shift, gate = params(4, seed=22, zero_gates=True)
    z[:, 0] = float("nan")  # gate[0] == 0
    y = ge.gate_epilogue(z, scale, shift, gate, "relu")
    assert (y[:, 0] == 0).all() and (y[:, 2] == 0).all()
    live = [1, 3]
    close(y[:, live], reference.gate_epilogue(z[:, live], scale[live], shift[live], gate[live],
                                              "relu"), TOL[torch.float32])


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_zero_gates_backward(layout, act):
    z = make((2, 4, 5, 5), torch.float32, layout, seed=23)
    scale, shift, gate = params(4, seed=24, zero_gates=True)
    y, ref_y, grads, ref_grads = run_both(z, scale, shift, gate, act)
    check(z, y, ref_y, grads, ref_grads)
    assert (y[:, ::2] == 0).all() and (grads[0][:, ::2] == 0).all()
    assert (grads[3][::2] != 0).all()  # the gate gradient of a closed gate is still computed


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_absent_channels_are_zero(layout):
    z = make((2, 2, 3, 3), torch.float32, layout, seed=25)
    scale, shift, gate = params(5, seed=26)
    shift.fill_(1.0)  # absent channels stay zero whatever their shift
    out_index = torch.tensor([3, 1])
    y, ref_y, grads, ref_grads = run_both(z, scale, shift, gate, "identity", out_index)
    check(z, y, ref_y, grads, ref_grads)
    absent = [0, 2, 4]
    assert (y[:, absent] == 0).all()
    for grad in grads[1:]:
        assert (grad[absent] == 0).all() and (grad[[1, 3]] != 0).all()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_relu_derivative_at_zero_is_zero(layout):
    z = make((2, 3, 4, 4), torch.float32, layout, seed=27)
    z[:, :, :2] = 0.0
    scale = torch.tensor([1.0, -2.0, 0.5])
    shift = torch.zeros(3)  # u == 0 exactly where z == 0
    gate = torch.tensor([1.5, 1.0, -1.0])
    y, ref_y, grads, ref_grads = run_both(z, scale, shift, gate, "relu")
    check(z, y, ref_y, grads, ref_grads)
    assert (grads[0][:, :, :2] == 0).all()


@pytest.mark.parametrize("pdtype", [torch.float64, torch.bfloat16, torch.float16])
def test_parameter_dtypes(pdtype):
    """Per-channel parameters of any float dtype; their gradients come back in that dtype."""
    z = make((2, 3, 5, 5), torch.bfloat16, "nchw", seed=29)
    scale, shift, gate = params(3, seed=30, dtype=pdtype)
    gate = gate.float()  # mixed parameter dtypes too
    y, ref_y, grads, ref_grads = run_both(z, scale, shift, gate, "relu")
    assert grads[1].dtype == grads[2].dtype == pdtype and grads[3].dtype == torch.float32
    tol = {torch.float64: (1e-4, 1e-4), torch.bfloat16: (1.6e-2, 1.6e-2),
           torch.float16: (2e-3, 2e-3)}[pdtype]
    close(y, ref_y, TOL[torch.bfloat16])
    close(grads[0], ref_grads[0], TOL[torch.bfloat16])
    close(grads[1], ref_grads[1], tol)
    close(grads[2], ref_grads[2], tol)
    close(grads[3], ref_grads[3], SUM_TOL[torch.bfloat16])


def test_backward_is_deterministic():
    z = make((3, 4, 9, 9), torch.float32, "nchw", seed=31)
    scale, shift, gate = params(4, seed=32)
    dy = make((3, 4, 9, 9), torch.float32, "nchw", seed=33)
    first = ge.gate_epilogue_backward(dy, z, scale, shift, gate, "relu")
    second = ge.gate_epilogue_backward(dy, z, scale, shift, gate, "relu")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_empty_batch(layout):
    z = make((0, 3, 4, 4), torch.bfloat16, "nchw")
    if layout == "cl":
        z = z.to(memory_format=torch.channels_last)
    scale, shift, gate = params(5, seed=34)
    out_index = torch.tensor([4, 0, 2])
    y = ge.gate_epilogue(z, scale, shift, gate, "relu", out_index)
    assert y.shape == (0, 5, 4, 4) and y.dtype == torch.bfloat16
    dy = torch.empty(0, 5, 4, 4, dtype=torch.bfloat16)
    dz, dscale, dshift, dgate = ge.gate_epilogue_backward(dy, z, scale, shift, gate, "relu",
                                                         out_index)
    assert dz.shape == z.shape and dz.dtype == z.dtype
    for grad in (dscale, dshift, dgate):
        assert grad.shape == (5,) and grad.dtype == torch.float32 and (grad == 0).all()


def test_all_channels_pruned():
    """K = 0: every output channel is absent, so y is all zeros and so are the gradients."""
    z = torch.empty(2, 0, 3, 3)
    scale, shift, gate = params(4, seed=35)
    out_index = torch.empty(0, dtype=torch.long)
    y, ref_y, grads, ref_grads = run_both(z, scale, shift, gate, "relu", out_index)
    check(z, y, ref_y, grads, ref_grads)
    assert (y == 0).all() and y.shape == (2, 4, 3, 3)


# ---------------------------------------------------------------------------------------------
# backward with batch statistics (batch norm in training)


def bn_params(z, out_channels, out_index, seed):
    """scale, shift from z's own batch statistics, as a training batch norm computes them."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(out_channels, generator=g), torch.randn(out_channels, generator=g)
    mean, invstd = torch.zeros(out_channels), torch.ones(out_channels)
    z_mean, z_var = reference.channel_stats(z)
    where = out_index if out_index is not None else torch.arange(z.shape[1])
    mean[where] = z_mean
    invstd[where] = torch.rsqrt(z_var + 1e-5)
    scale = weight * invstd
    return weight, bias, scale, bias - mean * scale, mean, invstd


@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_backward_with_batch_stats_matches_reference(layout, act, with_index):
    z = make((3, 4, 5, 5), torch.float32, layout, seed=41)
    out_index = torch.tensor([5, 0, 3, 2]) if with_index else None
    C_out = 7 if with_index else 4
    _, _, scale, shift, mean, invstd = bn_params(z, C_out, out_index, seed=42)
    gate = params(C_out, seed=43, zero_gates=True)[2]
    dy = make((3, C_out, 5, 5), torch.float32, "nchw", seed=44)
    got = ge.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index, mean, invstd)
    want = reference.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index, mean, invstd)
    for a, b in zip(got, want):
        close(a, b, SUM_TOL[torch.float32])
    plain = ge.gate_epilogue_backward(dy, z, scale, shift, gate, act, out_index)
    assert not torch.allclose(got[0], plain[0], atol=1e-3)  # the statistics' gradient is there
    for a, b in zip(got[1:], plain[1:]):
        assert torch.equal(a, b)  # dscale, dshift, dgate stay the partial sums


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_with_batch_stats_low_precision(dtype):
    z = make((2, 3, 6, 6), dtype, "cl", seed=45)
    _, _, scale, shift, mean, invstd = bn_params(z, 3, None, seed=46)
    dy = make((2, 3, 6, 6), dtype, "cl", seed=47)
    gate = params(3, seed=48)[2]
    got = ge.gate_epilogue_backward(dy, z, scale, shift, gate, "relu", None, mean, invstd)
    want = reference.gate_epilogue_backward(dy, z, scale, shift, gate, "relu", None, mean, invstd)
    close(got[0], want[0], TOL[dtype])
    for a, b in zip(got[1:], want[1:]):
        close(a, b, SUM_TOL[dtype])


def test_backward_with_batch_stats_is_the_batch_norm_gradient():
    """dz equals autograd through gate * relu(batch_norm(z)) with statistics taken from z."""
    z = make((4, 3, 5, 5), torch.float32, "nchw", seed=49)
    weight, bias, scale, shift, mean, invstd = bn_params(z, 3, None, seed=50)
    gate = params(3, seed=51)[2]
    dy = make((4, 3, 5, 5), torch.float32, "nchw", seed=52)
    zz = z.double().requires_grad_()
    bn = torch.nn.functional.batch_norm(zz, None, None, weight.double(), bias.double(),
                                        training=True, eps=1e-5)
    y = gate.double().view(1, -1, 1, 1) * torch.relu(bn)
    (dz_autograd,) = torch.autograd.grad(y, zz, dy.double())
    dz = ge.gate_epilogue_backward(dy, z, scale, shift, gate, "relu", None, mean, invstd)[0]
    torch.testing.assert_close(dz.double(), dz_autograd, atol=1e-4, rtol=1e-4)
