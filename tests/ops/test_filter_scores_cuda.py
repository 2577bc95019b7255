"""filter_scores on the GPU: the CUDA C++ and Triton backends against each score's fp64 definition,
over dtypes, channels_last and misaligned weights (scalar head paths), rows longer than a warp's
unrolled sweep, more tensors than one CUDA launch takes (96), zero rows; determinism; opcheck.
Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

import nasprune.ops as nops
from nasprune.ops import _backend
from tests.ops._score_cases import DTYPES, KINDS, definition, tolerance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    name = request.param
    if not _backend.HAS_C:
        pytest.skip("nasprune._C is not built")
    if name == "cuda" and not nops.cuda_kernels_built():
        pytest.skip("nasprune._C was built without its CUDA kernels")
    if name == "triton" and not _backend.triton_available():
        pytest.skip("triton is not installed")
    with nops.use_backend(name):
        yield name


def _tensors(dtype, seed=0, count=130):
    """A ResNet-like mix plus odd cases: a 7x7 stem (147-element rows), 1x1 and 3x3 convs,
    channels_last, a view offset by one element, rows of 5000 and of 0 elements, empty tensors."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(64, 3, 7, 7), (256, 64, 1, 1), (128, 128, 3, 3), (1000, 2048), (3, 5000), (4, 0),
              (0, 9), (17, 5)]
    out = []
    for i in range(count):
        shape = shapes[i % len(shapes)]
        w = torch.randn(shape, device="cuda", generator=g).to(dtype)
        if i % 5 == 1 and w.dim() == 4:
            w = w.contiguous(memory_format=torch.channels_last)
        if i % 7 == 3 and w.numel():
            flat = torch.randn(w.numel() + 1, device="cuda", generator=g).to(dtype)[1:]
            w = flat.view(w.shape)
        out.append(w)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_fp64_definition(backend, kind, dtype):
    weights = _tensors(dtype)
    grads = _tensors(dtype, seed=1) if kind == "taylor" else None
    got = nops.filter_scores(weights, kind, grads)
    torch.cuda.synchronize()
    assert got.device.type == "cuda" and got.dtype == torch.float32
    err = (got.double() - definition(weights, grads, kind)).abs()
    assert (err <= tolerance(weights, grads, kind)).all(), float(err.max())


def test_backends_agree_and_are_deterministic(backend):
    weights = _tensors(torch.float32, count=60)
    a = nops.filter_scores(weights, "l1")
    b = nops.filter_scores(weights, "l1")
    assert torch.equal(a, b)
    cpu = nops.filter_scores([w.cpu() for w in weights], "l1")
    torch.testing.assert_close(a.cpu(), cpu, rtol=2e-6, atol=1e-6)


def test_zero_filters(backend):
    w = torch.randn(8, 64, 3, 3, device="cuda")
    w[3] = 0
    for kind in ("l1", "l2"):
        assert nops.filter_scores([w], kind)[3] == 0


def test_opcheck(backend):
    weights = [torch.randn(6, 3, 5, 5, device="cuda"), torch.randn(5, 8, device="cuda")]
    grads = [torch.randn_like(w) for w in weights]
    for kind in KINDS:
        torch.library.opcheck(torch.ops.nasprune.filter_scores.default,
                              (weights, grads if kind == "taylor" else [], kind))
