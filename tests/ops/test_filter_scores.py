"""filter_scores: the CPU kernel against each score's fp64 definition over odd shapes, dtypes and
layouts, zero and empty filters, many tensors (the work split), determinism; opcheck; autograd;
torch.compile; bad input."""
import pytest
import torch

from nasprune import ops
from nasprune.ops import reference
from tests.ops._score_cases import (
    DTYPES,
    KINDS,
    LAYOUTS,
    definition,
    make_case,
    make_weights,
    tolerance,
)

# Filters of every kind of length: a 7x7 stem, 1x1 and 3x3 convs, depthwise, linear, a conv3d,
# rows longer than one 2048-element block, rows of 0 elements and tensors of 0 rows.
SHAPES = [(8, 3, 7, 7), (16, 8, 1, 1), (5, 4, 3, 3), (12, 1, 3, 3), (10, 33), (4, 2, 3, 3, 3),
          (3, 4500), (6,), (0, 5), (4, 0), (1, 1)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_fp64_definition(kind, dtype, layout):
    weights, grads = make_case(SHAPES, kind, dtype, layout)
    got = ops.filter_scores(weights, kind, grads)
    expected = definition(weights, grads, kind)
    assert got.dtype == torch.float32 and got.shape == (sum(w.shape[0] for w in weights),)
    assert ((got.double() - expected).abs() <= tolerance(weights, grads, kind)).all()


def test_reference_matches_definition():
    weights = make_weights(SHAPES, torch.float64)
    grads = make_weights(SHAPES, torch.float64, seed=1)
    for kind in KINDS:
        torch.testing.assert_close(reference.filter_scores(weights, grads, kind),
                                   definition(weights, grads, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_and_empty_filters_score_exactly_zero(kind):
    w = torch.randn(6, 4, 3, 3)
    w[1] = 0
    w[4] = 0
    empty = torch.randn(3, 0)
    grads = [torch.randn_like(w), torch.randn_like(empty)] if kind == "taylor" else None
    s = ops.filter_scores([w, empty], kind, grads)
    assert s[[1, 4, 6, 7, 8]].eq(0).all() and s[[0, 2, 3, 5]].gt(0).all()
    if kind != "taylor":
        assert torch.equal(ops.filter_scores([torch.zeros(5, 7)], kind), torch.zeros(5))


def test_channels_last_is_read_in_place_and_agrees():
    w = torch.randn(32, 16, 3, 3)
    cl = w.contiguous(memory_format=torch.channels_last)
    for kind in ("l1", "l2"):
        torch.testing.assert_close(ops.filter_scores([cl], kind), ops.filter_scores([w], kind),
                                   rtol=1e-6, atol=0)
    # a gradient in another layout than its weight: both are read as contiguous copies
    g = torch.randn(32, 16, 3, 3)
    torch.testing.assert_close(ops.filter_scores([cl], "taylor", [g]),
                               ops.filter_scores([w], "taylor", [g]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_many_tensors_split_across_threads(kind):
    # enough elements for the work to be split into many chunks, boundaries inside tensors
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(int(c), int(k), generator=g)
               for c, k in zip(torch.randint(1, 200, (60,), generator=g),
                               torch.randint(1, 3000, (60,), generator=g))]
    grads = [torch.randn(w.shape, generator=g) for w in weights] if kind == "taylor" else None
    got = ops.filter_scores(weights, kind, grads)
    expected = definition(weights, grads, kind)
    assert ((got.double() - expected).abs() <= tolerance(weights, grads, kind)).all()


def test_deterministic_whatever_the_thread_count():
    weights = [torch.randn(300, 64, 3, 3), torch.randn(1000, 512), torch.randn(64, 3, 7, 7)]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.filter_scores(weights, "l1"))
            results.append(ops.filter_scores(weights, "l1"))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(kind, requires_grad):
    weights = [torch.randn(6, 3, 5, 5), torch.randn(5, 8),
               torch.randn(4, 8, 3, 3).contiguous(memory_format=torch.channels_last)]
    grads = [torch.randn_like(w) for w in weights] if kind == "taylor" else []
    for t in weights + grads:
        t.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.nasprune.filter_scores.default, (weights, grads, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_autograd_matches_reference(kind):
    weights = [torch.randn(6, 3, 5, 5), torch.randn(5, 8), torch.zeros(2, 4)]
    grads = [torch.randn_like(w) for w in weights] if kind == "taylor" else []
    leaves = [t.clone().requires_grad_() for t in weights + grads]
    leaves64 = [t.double().requires_grad_() for t in weights + grads]
    n = len(weights)
    out = ops.filter_scores(leaves[:n], kind, leaves[n:] or None)
    out64 = reference.filter_scores(leaves64[:n], leaves64[n:], kind)
    c = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * c).sum(), leaves)
    expected = torch.autograd.grad((out64 * c).sum(), leaves64)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    assert got[2].eq(0).all()  # a zero filter gets a zero (sub)gradient, not NaN


def test_group_lasso_gradient_shrinks_norms():
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    before = ops.filter_scores([w.detach()], "l2")
    ops.filter_scores([w], "l2").sum().backward()
    with torch.no_grad():
        w -= 0.1 * w.grad
    after = ops.filter_scores([w.detach()], "l2")
    torch.testing.assert_close(after, before - 0.1, atol=1e-5, rtol=0)


def test_torch_compile_fullgraph():
    weights = [torch.randn(6, 3, 5, 5), torch.randn(5, 8)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(ws):
        return ops.filter_scores(ws, "l2") * 2

    torch.testing.assert_close(f(weights), 2 * ops.filter_scores(weights, "l2"))


def test_empty_list():
    s = ops.filter_scores([], "l1")
    assert s.shape == (0,) and s.dtype == torch.float32


def test_rejects_bad_input():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.filter_scores([w], "l3")
    with pytest.raises(TypeError, match="weights must be a list of tensors"):
        ops.filter_scores(w, "l1")
    with pytest.raises(ValueError, match="needs one gradient per weight: got none for 1"):
        ops.filter_scores([w], "taylor")
    with pytest.raises(ValueError, match="grads are only used by kind 'taylor'"):
        ops.filter_scores([w], "l1", [w])
    with pytest.raises(ValueError, match=r"grads\[0\] must have the shape of weights\[0\]"):
        ops.filter_scores([w], "taylor", [torch.randn(3, 4)])
    with pytest.raises(ValueError, match=r"weights\[1\] has dtype torch.float16"):
        ops.filter_scores([w, w.half()], "l1")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16, got torch.int64"):
        ops.filter_scores([torch.ones(2, 2, dtype=torch.long)], "l1")
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.filter_scores([torch.tensor(1.0)], "l1")
    # the C++ kernel checks the same for direct callers
    with pytest.raises(RuntimeError, match=r"weights\[1\] has dtype Half"):
        torch.ops.nasprune.filter_scores([w, w.half()], [], "l1")
    with pytest.raises(RuntimeError, match="kind must be"):
        torch.ops.nasprune.filter_scores([w], [], "max")
    with pytest.raises(RuntimeError, match="grads must be empty"):
        torch.ops.nasprune.filter_scores([w], [w], "l2")
