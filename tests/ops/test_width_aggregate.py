"""width_aggregate and width_aggregate_backward: the reference against TAS's formula, the CPU
kernels against the reference over widths (c_j = C_max, c_j = 1, duplicates, C_max < C), shapes,
dtypes, layouts and empty batches; autograd against the eager composition; fp64 gradcheck;
opcheck; torch.compile; bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from nasprune import ops
from nasprune.ops import reference
from tests.conftest import TOLERANCE, make_layout

# (shape, widths): K = 1..3, full width, width 1, duplicates, C_max < C, odd sizes, 2-D and 3-D.
CASES = [
    ((2, 7, 3, 5), [7, 3]),
    ((3, 8, 4, 4), [5, 1]),
    ((2, 6, 5, 3), [6, 6]),
    ((1, 9, 2, 3), [2, 2, 9]),
    ((2, 64, 3, 3), [44, 64]),
    ((4, 16, 8, 8), [16]),
    ((2, 5, 3, 3), [1]),
    ((1, 1, 1, 1), [1, 1]),
    ((0, 6, 3, 3), [4, 6]),
    ((3, 11), [4, 7]),
    ((2, 10, 9), [3, 10, 6]),
    ((1, 12, 70, 40), [5, 12]),
]


def _case_id(case):
    shape, widths = case
    return "x".join(map(str, shape)) + "-w" + "_".join(map(str, widths))


def _inputs(shape, widths, dtype=torch.float32, layout="contiguous", device="cpu"):
    c = shape[1]
    z = make_layout(torch.randn(shape, device=device).to(dtype), layout)
    w = torch.tensor(widths, dtype=torch.int64, device=device)
    inside = (torch.arange(c, device=device)[None] < w[:, None]).float()
    scale = (torch.rand(len(widths), c, device=device) + 0.5) * inside
    shift = torch.randn(len(widths), c, device=device) * inside
    weights = torch.softmax(torch.randn(len(widths), device=device), 0)
    return z, scale, shift, w, weights


def _reduction_tol(dtype, n):
    # Sums over n products: compare relative to their scale.
    return dict(atol=1e-4 * max(n, 1) ** 0.5 * (1 if dtype == torch.float32 else 30),
                rtol=1e-4 if dtype == torch.float32 else 2e-2)


def _explicit(z, scale, shift, widths, weights, act):
    """TAS's equation 4 written out channel by channel (fp64), independent of adaptive pooling."""
    z = z.double()
    c = z.shape[1]
    ws = widths.tolist()
    cmax = max(ws)
    y = torch.zeros_like(z)
    for j, cj in enumerate(ws):
        frag = z[:, :cj] * scale[j, :cj].double().reshape((1, -1) + (1,) * (z.dim() - 2)) \
            + shift[j, :cj].double().reshape((1, -1) + (1,) * (z.dim() - 2))
        for o in range(cmax):
            lo, hi = (o * cj) // cmax, -((-(o + 1) * cj) // cmax)
            y[:, o] += weights[j].double() * frag[:, lo:hi].mean(1)
    assert c >= cmax
    return torch.relu(y) if act == "relu" else y


# ---------------------------------------------------------------------------------------------
# the reference


@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("case", CASES[:8], ids=_case_id)
def test_reference_is_tas_equation(case, act):
    z, scale, shift, w, weights = _inputs(*case)
    got = reference.width_aggregate(z.double(), scale, shift, w, weights, act)
    torch.testing.assert_close(got, _explicit(z, scale, shift, w, weights, act))


def test_channel_interpolation_is_adaptive_pooling_along_channels():
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    got = reference.channel_interpolate(x, 8)
    expected = F.adaptive_avg_pool3d(x, (8, 3, 4))  # TAS: the batch is the pooling "channel"
    torch.testing.assert_close(got, expected)
    spans = [(o * 5 // 8, math.ceil((o + 1) * 5 / 8)) for o in range(8)]
    assert all(hi - lo in (1, 2) for lo, hi in spans)
    torch.testing.assert_close(got[:, 3], x[:, spans[3][0]:spans[3][1]].mean(1))


@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("widths", [[4, 2], [1, 3, 4], [3]])
def test_reference_gradcheck(widths, act):
    z, scale, shift, w, weights = (t.double() if t.is_floating_point() else t
                                   for t in _inputs((2, 5, 3, 2), widths))
    leaves = [t.requires_grad_() for t in (z, scale, shift, weights)]
    assert torch.autograd.gradcheck(
        lambda z_, a, b, p: reference.width_aggregate(z_, a, b, w, p, act), leaves)


# ---------------------------------------------------------------------------------------------
# the CPU kernels against the reference


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_forward_and_backward_match_reference(case, dtype, layout, act):
    z, scale, shift, w, weights = _inputs(*case, dtype=dtype, layout=layout)
    y = ops.width_aggregate(z, scale, shift, w, weights, act)
    expected = reference.width_aggregate(z.double(), scale, shift, w, weights, act)
    assert y.dtype == dtype and y.shape == z.shape
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    if layout == "channels_last" and z.dim() == 4 and not z.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)

    dy = make_layout(torch.randn(z.shape).to(dtype), "strided")  # dy in another layout than z
    dz, dscale, dshift, dweights = ops.width_aggregate_backward(dy, z, scale, shift, w, weights,
                                                                act)
    e_dz, e_dscale, e_dshift, e_dweights = reference.width_aggregate_backward(
        dy.double(), z.double(), scale.double(), shift.double(), w, weights.double(), act)
    assert dz.dtype == dtype and dz.shape == z.shape
    torch.testing.assert_close(dz.double(), e_dz, **TOLERANCE[dtype])
    n = z.numel() // max(z.shape[1], 1)
    for got, exp in ((dscale, e_dscale), (dshift, e_dshift), (dweights, e_dweights)):
        assert got.dtype == torch.float32 and got.shape == exp.shape
        torch.testing.assert_close(got.double(), exp, **_reduction_tol(dtype, n))


def test_channels_beyond_cmax_and_widths_are_exact_zeros():
    z, scale, shift, w, weights = _inputs((3, 10, 4, 4), [3, 6])
    shift[:, :6] += 5.0  # a large shift would leak into unused channels if they were computed
    y = ops.width_aggregate(z, scale, shift, w, weights, "identity")
    assert y[:, 6:].abs().max() == 0 and y[:, :6].abs().min() > 0
    dz, dscale, dshift, _ = ops.width_aggregate_backward(torch.randn_like(y), z, scale, shift, w,
                                                         weights, "identity")
    assert dz[:, 6:].abs().max() == 0
    assert dscale[0, 3:].abs().max() == 0 and dshift[0, 3:].abs().max() == 0
    assert dscale[1, 6:].abs().max() == 0 and dshift[1, :6].abs().min() > 0


def test_single_full_width_candidate_is_the_bn_epilogue():
    """K = 1 with c = C: CWI is the identity, so y = w * act(scale z + shift) for w > 0."""
    z, scale, shift, w, _ = _inputs((2, 6, 5, 5), [6])
    weights = torch.tensor([0.7])
    y = ops.width_aggregate(z, scale, shift, w, weights, "relu")
    expected = ops.gate_epilogue(z, scale[0], shift[0], torch.full((6,), 0.7), "relu")
    torch.testing.assert_close(y, expected)


def test_per_candidate_gradient_dtypes_follow_inputs():
    z, scale, shift, w, weights = _inputs((2, 6, 3, 3), [4, 6], dtype=torch.bfloat16)
    grads = ops.width_aggregate_backward(torch.randn_like(z), z, scale.bfloat16(),
                                         shift.double(), w, weights.half(), "relu")
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16, torch.float64,
                                        torch.float16]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_autograd_matches_eager_composition(layout, act):
    """Gradients through the op (and through softmax to the architecture logits) equal autograd
    of the eager composition: slices, affine, adaptive_avg_pool3d, weighted sum, padding."""
    z, scale, shift, w, _ = _inputs((3, 9, 5, 4), [5, 9], layout=layout)
    logits = torch.randn(2)
    leaves = [t.clone().requires_grad_() for t in (z, scale, shift, logits)]
    ref_leaves = [t.double().clone().requires_grad_() for t in (z, scale, shift, logits)]
    y = ops.width_aggregate(*leaves[:3], w, torch.softmax(leaves[3] / 0.5, 0), act)
    y_ref = reference.width_aggregate(*ref_leaves[:3], w, torch.softmax(ref_leaves[3] / 0.5, 0),
                                      act)
    dy = torch.randn(y.shape)
    y.backward(dy)
    y_ref.backward(dy.double())
    for got, exp in zip(leaves, ref_leaves):
        assert got.grad is not None and got.grad.abs().max() > 0
        torch.testing.assert_close(got.grad.double(), exp.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    z, scale, shift, w, weights = _inputs((2, 6, 5, 3), [3, 6], layout=layout)
    for t in (z, scale, shift, weights):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.nasprune.width_aggregate.default,
                          (z, scale, shift, w, weights, "relu"))
    dy = make_layout(torch.randn(z.shape), layout)
    torch.library.opcheck(torch.ops.nasprune.width_aggregate_backward.default,
                          (dy, z.detach(), scale.detach(), shift.detach(), w, weights.detach(),
                           "relu"))


def test_compiles_fullgraph():
    z, scale, shift, w, weights = _inputs((2, 6, 3, 3), [2, 5])
    fn = torch.compile(lambda *a: ops.width_aggregate(*a, "relu"), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(z, scale, shift, w, weights),
                               reference.width_aggregate(z, scale, shift, w, weights, "relu"))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("bad, match", [
    (dict(z=torch.randn(4)), r"z must have shape \(N, C, \.\.\.\), got \(4,\)"),
    (dict(z=torch.randn(2, 6, 3, 3, dtype=torch.float64)), r"z must be float32, float16 or bfloat16"),
    (dict(widths=torch.tensor([2.0, 3.0])), r"widths must be a non-empty int64 vector"),
    (dict(widths=torch.tensor([], dtype=torch.int64)), r"widths must be a non-empty int64 vector"),
    (dict(scale=torch.randn(2, 5)), r"scale must have shape \(2, 6\).*got \(2, 5\)"),
    (dict(shift=torch.randn(3, 6)), r"shift must have shape \(2, 6\).*got \(3, 6\)"),
    (dict(weights=torch.randn(3)), r"weights must have shape \(2,\).*got \(3,\)"),
    (dict(weights=torch.ones(2, dtype=torch.int64)), r"weights must be a floating tensor"),
    (dict(act="gelu"), r"act must be one of"),
])
def test_bad_input_names_argument_and_shape(bad, match):
    args = dict(z=torch.randn(2, 6, 3, 3), scale=torch.ones(2, 6), shift=torch.zeros(2, 6),
                widths=torch.tensor([3, 6]), weights=torch.tensor([0.5, 0.5]), act="relu")
    args.update(bad)
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        ops.width_aggregate(**args)


@pytest.mark.parametrize("widths", [[0, 6], [3, 7]])
def test_cpu_kernel_rejects_widths_out_of_range(widths):
    z = torch.randn(2, 6, 3, 3)
    p = torch.ones(2, 6)
    with pytest.raises(RuntimeError, match=r"widths must lie in \[1, 6\]"):
        torch.ops.nasprune.width_aggregate(z, p, p, torch.tensor(widths), torch.ones(2), "relu")
    with pytest.raises(ValueError, match=r"widths must lie in \[1, 6\]"):
        reference.width_aggregate(z, p, p, torch.tensor(widths), torch.ones(2), "relu")


def test_backward_rejects_mismatched_dy():
    z, scale, shift, w, weights = _inputs((2, 6, 3, 3), [3, 6])
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 6, 3, 3\), got \(2, 6, 3, 2\)"):
        ops.width_aggregate_backward(torch.randn(2, 6, 3, 2), z, scale, shift, w, weights)
    with pytest.raises(ValueError, match=r"dy has dtype torch.float16 but z has torch.float32"):
        ops.width_aggregate_backward(torch.randn(2, 6, 3, 3).half(), z, scale, shift, w, weights)


# ---------------------------------------------------------------------------------------------
# CUDA: both backends against the reference, and no host synchronisation


def _cuda_backends():
    if not torch.cuda.is_available():
        return []
    names = ["triton"] if ops._backend.triton_available() else []
    return (["cuda"] if ops.cuda_kernels_built() else []) + names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [((4, 64, 9, 9), [38, 57]), ((3, 16, 5, 7), [16, 1]),
                                  ((2, 24, 6, 6), [7, 13, 24]), ((0, 8, 3, 3), [4, 8]),
                                  ((5, 12), [5, 12])], ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_cuda_backends_match_reference(case, dtype, layout, act):
    for backend in _cuda_backends():
        with ops.use_backend(backend):
            z, scale, shift, w, weights = _inputs(*case, dtype=dtype, layout=layout, device="cuda")
            y = ops.width_aggregate(z, scale, shift, w, weights, act)
            expected = reference.width_aggregate(z.double(), scale, shift, w, weights, act)
            torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
            dy = torch.randn(z.shape, device="cuda").to(dtype)
            got = ops.width_aggregate_backward(dy, z, scale, shift, w, weights, act)
            exp = reference.width_aggregate_backward(dy.double(), z.double(), scale.double(),
                                                     shift.double(), w, weights.double(), act)
            torch.testing.assert_close(got[0].double(), exp[0], **TOLERANCE[dtype])
            n = z.numel() // z.shape[1]
            for g, e in zip(got[1:], exp[1:]):
                torch.testing.assert_close(g.double(), e, **_reduction_tol(dtype, n))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_never_synchronises():
    """Sampling, aggregation and its backward run with the widths on the device only."""
    for backend in _cuda_backends():
        with ops.use_backend(backend):
            logits = torch.randn(8, device="cuda", requires_grad=True)
            candidates = torch.tensor([19, 25, 32, 38, 44, 51, 57, 64], device="cuda")
            z, scale, shift, _, _ = _inputs((8, 64, 8, 8), [64, 64], device="cuda")
            z.requires_grad_()

            def step():
                index, weights = ops.gumbel_topk(logits, 2, 1.0)
                y = ops.width_aggregate(z, scale, shift, candidates[index], weights, "relu")
                y.sum().backward()

            step()  # autotuning and first-call set-up may synchronise
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert logits.grad.abs().sum() > 0
