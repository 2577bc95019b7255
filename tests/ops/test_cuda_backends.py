"""The CUDA backends of the nasprune ops (CUDA C++ kernels and, when present, the Triton ones)
against the pure-PyTorch oracle in nasprune.ops.reference.

Covers fp32/fp16/bf16, NCHW and channels_last (and inner == 1) layouts, odd shapes that take the
scalar (non-vectorised) paths, misaligned storage, out_index scatter/gather, zero gates, empty
batches, channel counts above the 65535 grid limit, large-mean stability and determinism.
Skipped without a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

import nasprune.ops as nops
from nasprune.ops import _backend
from nasprune.ops import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
OPS = ("channel_stats", "gate_epilogue", "gate_epilogue_backward")


def _backend_or_skip(name: str, op: str):
    if not _backend.HAS_C:
        pytest.skip("nasprune._C is not built")
    if name == "cuda" and not nops.cuda_kernels_built():
        pytest.skip("nasprune._C was built without its CUDA kernels")
    if name == "triton":
        if not _backend.triton_available():
            pytest.skip("triton is not installed")
        if op not in _backend._TRITON_IMPLS:
            pytest.skip(f"no Triton implementation of {op} is registered")
    return nops.use_backend(name)


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    return request.param


def _run(backend: str, op: str, *args):
    with _backend_or_skip(backend, op):
        out = getattr(torch.ops.nasprune, op)(*args)
        torch.cuda.synchronize()
    return out


def _make(shape, dtype, layout="nchw", mean=0.0, std=1.0, misalign=False):
    n = math.prod(shape)
    if misalign:  # a storage offset of one element: the data pointer is not 16-byte aligned
        flat = (torch.randn(n + 1, device="cuda") * std + mean).to(dtype)[1:]
        if layout == "cl":  # dense channels_last view of the offset buffer
            nb, c, h, w = shape
            return flat.view(nb, h, w, c).permute(0, 3, 1, 2)
        return flat.view(shape)
    z = (torch.randn(shape, device="cuda") * std + mean).to(dtype)
    if layout == "cl":
        z = z.contiguous(memory_format=torch.channels_last)
    return z


def _close(got, exp, rtol, atol, what=""):
    assert got.shape == exp.shape, (what, got.shape, exp.shape)
    assert got.dtype == exp.dtype, (what, got.dtype, exp.dtype)
    torch.testing.assert_close(got.double(), exp.double(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _params(c, dtype=torch.float32, zero_frac=0.3):
    # |scale| in [0.5, 1.5): see _avoid_relu_kink
    sign = torch.randint(0, 2, (c,), device="cuda") * 2 - 1
    scale = (sign * (0.5 + torch.rand(c, device="cuda"))).to(dtype)
    shift = torch.randn(c, device="cuda").to(dtype)
    gate = torch.rand(c, device="cuda").to(dtype)
    gate[torch.rand(c, device="cuda") < zero_frac] = 0
    return scale, shift, gate


# ---------------------------------------------------------------------------- channel_stats

STATS_SHAPES = [
    ((8, 64, 56, 56), "nchw"),   # vectorised NCHW, many chunks per channel
    ((8, 64, 56, 56), "cl"),     # vectorised channels_last
    ((3, 5, 7, 9), "nchw"),      # odd inner: scalar path
    ((3, 5, 7, 9), "cl"),        # odd C: scalar channels_last
    ((4, 24, 1, 1), "nchw"),     # inner == 1: channel-fastest view
    ((1000, 48), "nchw"),        # 2-D input
    ((6, 10, 33), "nchw"),       # 3-D input
    ((2, 3, 2, 5, 4), "nchw"),   # 5-D input
    ((2, 72000, 2), "nchw"),     # more channels than grid.y allows
]


@pytest.mark.parametrize("shape,layout", STATS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_stats(backend, shape, layout, dtype):
    z = _make(shape, dtype, layout)
    mean, var = _run(backend, "channel_stats", z)
    em, ev = ref.channel_stats(z.double())
    _close(mean.double(), em, 1e-5, 1e-5, "mean")
    _close(var.double(), ev, 1e-4, 1e-5, "var")
    assert mean.dtype == var.dtype == torch.float32


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_channel_stats_misaligned(backend, layout):
    z = _make((3, 16, 8, 8), torch.bfloat16, layout, misalign=True)
    assert z.data_ptr() % 16 != 0
    mean, var = _run(backend, "channel_stats", z)
    em, ev = ref.channel_stats(z.double())
    _close(mean.double(), em, 1e-5, 1e-5, "mean")
    _close(var.double(), ev, 1e-4, 1e-5, "var")


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype,mean,std", [(torch.float32, 1e3, 0.1), (torch.bfloat16, 300.0, 3.0)])
def test_channel_stats_large_mean(backend, layout, dtype, mean, std):
    # |mean| / std = 1e4 (fp32): E[x^2] - E[x]^2 in fp32 would lose every digit of the variance.
    z = _make((16, 32, 28, 28), dtype, layout, mean=mean, std=std)
    mean, var = _run(backend, "channel_stats", z)
    em, ev = ref.channel_stats(z.double())
    _close(mean.double(), em, 1e-6, 0.0, "mean")
    _close(var.double(), ev, 2e-3, 0.0, "var")


@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (3, 4, 0, 5), (0, 6)])
def test_channel_stats_empty(backend, shape):
    z = torch.randn(shape, device="cuda")
    mean, var = _run(backend, "channel_stats", z)
    assert mean.shape == var.shape == (shape[1],)
    assert mean.isnan().all() and var.isnan().all()


# ---------------------------------------------------------------------------- gate_epilogue

GATE_CASES = [  # (z shape with K channels, out_channels or None, layout)
    ((8, 64, 56, 56), None, "nchw"),
    ((8, 64, 56, 56), None, "cl"),
    ((4, 48, 14, 14), 64, "nchw"),   # out_index, vectorised
    ((4, 48, 14, 14), 64, "cl"),     # out_index, channels_last gather
    ((3, 5, 7, 9), None, "nchw"),    # odd: scalar paths
    ((3, 5, 7, 9), None, "cl"),
    ((3, 5, 7, 9), 11, "nchw"),
    ((3, 5, 7, 9), 11, "cl"),
    ((257, 24), None, "nchw"),       # 2-D input (inner == 1)
    ((257, 7), 13, "nchw"),
    ((5, 6, 40), 9, "nchw"),         # 3-D input
    ((2, 3, 2, 5, 4), 5, "nchw"),    # 5-D input
    ((2, 70000, 2), None, "nchw"),   # more channels than grid.y allows
]


def _avoid_relu_kink(z, scale, shift, idx):
    """Moves z away from u = scale * z + shift = 0 (in place, keeping z's layout): there the
    kernels' fused multiply-add and the reference's two roundings can disagree on relu'(u)."""
    a = scale if idx is None else scale[idx]
    b = shift if idx is None else shift[idx]
    shp = (1, -1) + (1,) * (z.dim() - 2)
    a, b = a.double().view(shp), b.double().view(shp)
    u = a * z.double() + b
    safe = ((1 - b) / a).expand_as(z).to(z.dtype)  # u close to 1
    z.copy_(torch.where(u.abs() < 1e-2, safe, z))


def _gate_inputs(shape, out_c, layout, dtype, misalign=False):
    k = shape[1]
    c = out_c or k
    z = _make(shape, dtype, layout, misalign=misalign)
    scale, shift, gate = _params(c)
    idx = None if out_c is None else torch.randperm(c, device="cuda")[:k]
    _avoid_relu_kink(z, scale, shift, idx)
    dy_shape = (shape[0], c) + tuple(shape[2:])
    dy = _make(dy_shape, dtype, layout, misalign=misalign)
    return z, scale, shift, gate, idx, dy


def _check_backward(got, exp, dtype, n):
    names = ("dz", "dscale", "dshift", "dgate")
    for name, g, e in zip(names, got, exp):
        if name == "dz":
            _close(g, e, TOL[dtype], TOL[dtype], name)
        else:  # sums over n terms
            _close(g, e, 1e-4, 1e-4 * math.sqrt(max(n, 1)), name)


@pytest.mark.parametrize("shape,out_c,layout", GATE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_gate_epilogue(backend, shape, out_c, layout, dtype, act):
    z, scale, shift, gate, idx, dy = _gate_inputs(shape, out_c, layout, dtype)
    y = _run(backend, "gate_epilogue", z, scale, shift, gate, act, idx)
    _close(y, ref.gate_epilogue(z, scale, shift, gate, act, idx), TOL[dtype], TOL[dtype], "y")
    if layout == "cl" and z.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
    got = _run(backend, "gate_epilogue_backward", dy, z, scale, shift, gate, act, idx)
    exp = ref.gate_epilogue_backward(dy, z, scale, shift, gate, act, idx)
    _check_backward(got, exp, dtype, dy.numel() // gate.numel())


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("out_c", [None, 24])
def test_gate_epilogue_misaligned(backend, layout, out_c):
    z, scale, shift, gate, idx, dy = _gate_inputs((2, 16, 6, 8), out_c, layout, torch.bfloat16,
                                                  misalign=True)
    assert z.data_ptr() % 16 != 0 and dy.data_ptr() % 16 != 0
    y = _run(backend, "gate_epilogue", z, scale, shift, gate, "relu", idx)
    _close(y, ref.gate_epilogue(z, scale, shift, gate, "relu", idx), 1.6e-2, 1.6e-2, "y")
    got = _run(backend, "gate_epilogue_backward", dy, z, scale, shift, gate, "relu", idx)
    _check_backward(got, ref.gate_epilogue_backward(dy, z, scale, shift, gate, "relu", idx),
                    torch.bfloat16, dy.numel() // gate.numel())


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gate_epilogue_zero_gates_and_param_dtypes(backend, layout):
    z = _make((4, 16, 9, 9), torch.bfloat16, layout)
    scale, shift, gate = _params(16, torch.bfloat16, zero_frac=0.0)
    gate[::2] = 0
    _avoid_relu_kink(z, scale, shift, None)
    y = _run(backend, "gate_epilogue", z, scale, shift, gate, "relu", None)
    assert (y[:, ::2] == 0).all()
    _close(y, ref.gate_epilogue(z, scale, shift, gate, "relu"), 1.6e-2, 1.6e-2, "y")
    dy = torch.randn_like(z)
    got = _run(backend, "gate_epilogue_backward", dy, z, scale, shift, gate, "relu", None)
    exp = ref.gate_epilogue_backward(dy, z, scale, shift, gate, "relu")
    assert [t.dtype for t in got] == [torch.bfloat16] * 4
    assert (got[0][:, ::2] == 0).all()
    for name, g, e in zip(("dz", "dscale", "dshift", "dgate"), got, exp):
        _close(g, e, 2e-2, 2e-2 * (1 if name == "dz" else 9), name)


def test_gate_epilogue_relu_derivative_at_zero(backend):
    z = torch.zeros(2, 4, 3, 3, device="cuda")
    scale, shift, gate = torch.ones(4, device="cuda"), torch.zeros(4, device="cuda"), torch.ones(4, device="cuda")
    dy = torch.ones_like(z)
    dz, dscale, dshift, dgate = _run(backend, "gate_epilogue_backward", dy, z, scale, shift, gate,
                                     "relu", None)
    assert (dz == 0).all() and (dshift == 0).all() and (dscale == 0).all() and (dgate == 0).all()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gate_epilogue_empty_batch(backend, layout):
    z = _make((0, 8, 5, 5), torch.float32, layout)
    scale, shift, gate = _params(8)
    y = _run(backend, "gate_epilogue", z, scale, shift, gate, "relu", None)
    assert y.shape == (0, 8, 5, 5)
    dy = torch.empty_like(z)
    dz, dscale, dshift, dgate = _run(backend, "gate_epilogue_backward", dy, z, scale, shift, gate,
                                     "relu", None)
    assert dz.shape == z.shape
    for t in (dscale, dshift, dgate):
        assert t.shape == (8,) and (t == 0).all()


def test_gate_epilogue_empty_out_index(backend):
    z = torch.randn(2, 0, 3, 3, device="cuda")
    scale, shift, gate = _params(5, zero_frac=0.0)
    idx = torch.zeros(0, dtype=torch.long, device="cuda")
    y = _run(backend, "gate_epilogue", z, scale, shift, gate, "identity", idx)
    assert y.shape == (2, 5, 3, 3) and (y == 0).all()
    dy = torch.randn(2, 5, 3, 3, device="cuda")
    dz, dscale, dshift, dgate = _run(backend, "gate_epilogue_backward", dy, z, scale, shift, gate,
                                     "identity", idx)
    assert dz.shape == z.shape
    for t in (dscale, dshift, dgate):
        assert (t == 0).all()


def test_gate_epilogue_mixed_layouts(backend):
    # NCHW-strided z with a channels_last dy: both are brought to z's layout
    z = torch.randn(2, 6, 8, 8, device="cuda")[:, :, ::2, :]
    scale, shift, gate = _params(6)
    _avoid_relu_kink(z, scale, shift, None)
    dy = torch.randn(2, 6, 4, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    _close(_run(backend, "gate_epilogue", z, scale, shift, gate, "relu", None),
           ref.gate_epilogue(z, scale, shift, gate, "relu"), 1e-5, 1e-5, "y")
    got = _run(backend, "gate_epilogue_backward", dy, z, scale, shift, gate, "relu", None)
    _check_backward(got, ref.gate_epilogue_backward(dy, z, scale, shift, gate, "relu"),
                    torch.float32, 2 * 4 * 8)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_deterministic(layout):
    backend = "cuda"  # the CUDA C++ kernels promise run-to-run identical reductions
    z, scale, shift, gate, idx, dy = _gate_inputs((8, 32, 28, 28), None, layout, torch.bfloat16)
    a = _run(backend, "gate_epilogue_backward", dy, z, scale, shift, gate, "relu", idx)
    b = _run(backend, "gate_epilogue_backward", dy, z, scale, shift, gate, "relu", idx)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    s1 = _run(backend, "channel_stats", z)
    s2 = _run(backend, "channel_stats", z)
    assert torch.equal(s1[0], s2[0]) and torch.equal(s1[1], s2[1])


def test_cuda_kernels_registered():
    if not _backend.HAS_C or not nops.cuda_kernels_built():
        pytest.skip("nasprune._C was built without its CUDA kernels")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nasprune::{op}", "CUDA")
