"""gate_epilogue and gate_epilogue_backward: the CPU kernels against the reference over odd shapes,
dtypes, layouts, empty batches, zero gates and scatter indices; opcheck; autograd; bad input."""
import pytest
import torch

from nasprune import ops
from nasprune.ops import reference
from tests.conftest import TOLERANCE, make_layout

# (.., 8 | 16 | 24 | 32, ..): the channels-last kernels compile their periods (64, 96 values) as
# constants; (5, 11, 20, 19) and (3, 16, 30, 31) span several channels-last blocks and end in a
# partial period
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 5, 1, 1), (0, 4, 3, 3), (4, 16, 8, 8), (3, 8, 5, 3), (2, 24, 3, 5),
          (2, 32, 4, 3), (1, 2, 70, 40), (3, 11, 7, 9), (3, 48, 3, 3), (5, 11, 20, 19), (3, 16, 30, 31),
          (5, 6), (2, 3, 9)]


def _inputs(shape, dtype, layout, scatter, zero_gates=True, device="cpu"):
    c = shape[1]
    k = max(c // 2, 1) if scatter else c
    z = torch.randn((shape[0], k) + tuple(shape[2:]), device=device).to(dtype)
    z = make_layout(z, layout)
    scale, shift = torch.randn(c, device=device), torch.randn(c, device=device)
    gate = torch.rand(c, device=device) + 0.5
    if zero_gates and c > 1:
        gate[::3] = 0
    index = torch.randperm(c, device=device)[:k].sort().values if scatter else None
    return z, scale, shift, gate, index


def _reduction_tol(dtype, n):
    # Sums over n products: compare relative to their scale.
    return dict(atol=1e-4 * max(n, 1) ** 0.5 * (1 if dtype == torch.float32 else 30), rtol=1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("scatter", [False, True])
def test_forward_and_backward_match_reference(shape, dtype, layout, act, scatter):
    z, scale, shift, gate, index = _inputs(shape, dtype, layout, scatter)
    y = ops.gate_epilogue(z, scale, shift, gate, act, index)
    expected = reference.gate_epilogue(z.double(), scale, shift, gate, act, index)
    assert y.dtype == dtype and y.shape == expected.shape
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    if layout == "channels_last" and z.dim() == 4 and not z.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)

    dy = make_layout(torch.randn(y.shape).to(dtype), "strided")  # dy in another layout than z
    dz, dscale, dshift, dgate = ops.gate_epilogue_backward(dy, z, scale, shift, gate, act, index)
    e_dz, e_dscale, e_dshift, e_dgate = reference.gate_epilogue_backward(
        dy.double(), z.double(), scale.double(), shift.double(), gate.double(), act, index)
    torch.testing.assert_close(dz.double(), e_dz, **TOLERANCE[dtype])
    n = z.numel() // max(z.shape[1], 1)
    for got, exp in ((dscale, e_dscale), (dshift, e_dshift), (dgate, e_dgate)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exp, **_reduction_tol(dtype, n))


def test_zero_gate_channels_are_exact_zeros():
    z, scale, shift, gate, _ = _inputs((2, 6, 4, 4), torch.float32, "contiguous", False)
    shift.fill_(3.0)
    y = ops.gate_epilogue(z, scale, shift, gate, "relu")
    closed = gate == 0
    assert closed.any() and y[:, closed].abs().max() == 0
    torch.testing.assert_close(y[:, ~closed], reference.gate_epilogue(z, scale, shift, gate, "relu")[:, ~closed])
    assert (y[:, ~closed] > 0).any()


def test_per_channel_dtypes_follow_inputs():
    z = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    p = [torch.randn(3, dtype=torch.bfloat16) for _ in range(3)]
    y = ops.gate_epilogue(z, *p, "relu")
    grads = ops.gate_epilogue_backward(torch.randn_like(y), z, *p, "relu")
    assert [g.dtype for g in grads] == [torch.bfloat16] * 4


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("scatter", [False, True])
def test_opcheck(layout, scatter):
    z, scale, shift, gate, index = _inputs((2, 6, 5, 3), torch.float32, layout, scatter)
    z.requires_grad_()
    for p in (scale, shift, gate):
        p.requires_grad_()
    torch.library.opcheck(torch.ops.nasprune.gate_epilogue.default,
                          (z, scale, shift, gate, "relu", index))
    dy = torch.randn((2, 6, 5, 3))
    torch.library.opcheck(torch.ops.nasprune.gate_epilogue_backward.default,
                          (dy, z.detach(), scale.detach(), shift.detach(), gate.detach(), "relu", index))


def test_autograd_matches_reference():
    z, scale, shift, gate, index = _inputs((3, 5, 6, 4), torch.float32, "contiguous", True)
    leaves = [t.clone().requires_grad_() for t in (z, scale, shift, gate)]
    ref_leaves = [t.double().clone().requires_grad_() for t in (z, scale, shift, gate)]
    y = ops.gate_epilogue(*leaves, "relu", index)
    y_ref = reference.gate_epilogue(*ref_leaves, "relu", index)
    dy = torch.randn(y.shape)
    y.backward(dy)
    y_ref.backward(dy.double())
    for got, exp in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), exp.grad, atol=1e-4, rtol=1e-4)


def test_compiles_fullgraph():
    z, scale, shift, gate, _ = _inputs((2, 4, 3, 3), torch.float32, "contiguous", False)
    fn = torch.compile(lambda *a: ops.gate_epilogue(*a, "relu"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(z, scale, shift, gate), reference.gate_epilogue(z, scale, shift, gate, "relu"))


@pytest.mark.parametrize("bad, match", [
    (dict(z=torch.randn(4)), r"z must have shape \(N, C, \.\.\.\), got \(4,\)"),
    (dict(z=torch.randn(2, 5, 3, 3)), r"z has 5 channels but gate has 4"),
    (dict(scale=torch.randn(3)), r"scale must have shape \(4,\).*got \(3,\)"),
    (dict(z=torch.randn(2, 4, 3, 3, dtype=torch.float64)), r"z must be float32, float16 or bfloat16"),
    (dict(act="gelu"), r"act must be one of"),
    (dict(out_index=torch.tensor([0, 1])), r"out_index must be an int64 vector of length 4"),
    (dict(scale=torch.randn(4, dtype=torch.float32).to(torch.int32)), r"scale must be a floating tensor"),
])
def test_bad_input_names_argument_and_shape(bad, match):
    args = dict(z=torch.randn(2, 4, 3, 3), scale=torch.randn(4), shift=torch.randn(4),
                gate=torch.randn(4), act="relu", out_index=None)
    args.update(bad)
    with pytest.raises((ValueError, RuntimeError), match=match):
        ops.gate_epilogue(**args)


@pytest.mark.parametrize("index, match", [
    (torch.tensor([0, 9]), r"out_index values must lie in \[0, 4\)"),
    (torch.tensor([1, 1]), r"out_index values must be distinct"),
])
def test_kernel_rejects_bad_out_index(index, match):
    z = torch.randn(2, 2, 3, 3)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.nasprune.gate_epilogue(z, torch.ones(4), torch.zeros(4), torch.ones(4), "relu", index)


def test_backward_rejects_mismatched_dy():
    z = torch.randn(2, 4, 3, 3)
    p = torch.ones(4)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 4, 3, 3\), got \(2, 4, 3, 2\)"):
        ops.gate_epilogue_backward(torch.randn(2, 4, 3, 2), z, p, p, p, "relu")
    with pytest.raises(ValueError, match=r"dy has dtype torch.float16 but z has torch.float32"):
        ops.gate_epilogue_backward(torch.randn(2, 4, 3, 3).half(), z, p, p, p, "relu")


@pytest.mark.parametrize("shape", [(6, 8, 5, 3), (5, 11, 20, 19)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_batch_statistics_backward_equals_autograd_of_batch_norm(shape, layout, scatter, act):
    # With mean/invstd, the backward must equal autograd through batch norm's own statistics.
    z, _, _, gate, index = _inputs(shape, torch.float32, layout, scatter)
    c = gate.shape[0]
    weight, bias = torch.rand(c) + 0.5, torch.randn(c)
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    full = (lambda v, fill: v.new_full((c,), fill).index_copy(0, index, v)) if scatter else (lambda v, fill: v)
    mean_f, invstd_f = full(mean, 0.0), full(torch.rsqrt(var + 1e-5), 1.0)
    leaves = [t.clone().requires_grad_() for t in (z, weight, bias, gate)]
    zl, wl, bl, gl = leaves
    scale = wl * invstd_f
    y = ops.gate_epilogue(zl, scale, bl - mean_f * scale, gl, act, index, mean_f, invstd_f)
    dy = torch.randn(y.shape)
    y.backward(dy)

    ref = [t.double().clone().requires_grad_() for t in (z, weight, bias, gate)]
    zr, wr, br, gr = ref
    zf = reference._scatter_channels(zr, index, c)
    xhat = torch.nn.functional.batch_norm(zr, None, None, training=True, eps=1e-5)
    xhat = reference._scatter_channels(xhat, index, c)
    u = wr.view(1, -1, 1, 1) * xhat + br.view(1, -1, 1, 1)
    if act == "relu":
        u = torch.relu(u)
    y_ref = gr.view(1, -1, 1, 1) * u
    if scatter:
        present = torch.zeros(c, dtype=torch.bool)
        present[index] = True
        y_ref = y_ref * present.view(1, -1, 1, 1)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-4)
    y_ref.backward(dy.double())
    for got, exp in zip(leaves, ref):
        if scatter and got is not zl:  # absent channels get no gradient in either
            exp = exp.grad * present
            torch.testing.assert_close(got.grad.double() * present, exp, atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(got.grad.double(), exp.grad, atol=1e-4, rtol=1e-4)
    del zf


def test_batch_statistics_arguments_are_checked():
    z, scale, shift, gate, _ = _inputs((2, 4, 3, 3), torch.float32, "contiguous", False)
    with pytest.raises(ValueError, match="mean and invstd must be given together"):
        ops.gate_epilogue(z, scale, shift, gate, "relu", None, torch.zeros(4), None)
    with pytest.raises(ValueError, match="mean must not require grad"):
        ops.gate_epilogue(z, scale, shift, gate, "relu", None, torch.zeros(4, requires_grad=True), torch.ones(4))
    with pytest.raises(ValueError, match=r"invstd must have shape \(4,\)"):
        ops.gate_epilogue(z, scale, shift, gate, "relu", None, torch.zeros(4), torch.ones(3))


def test_opcheck_with_batch_statistics():
    z, scale, shift, gate, _ = _inputs((3, 4, 5, 2), torch.float32, "channels_last", False)
    for t in (z, scale, shift, gate):
        t.requires_grad_()
    stats = (torch.randn(4), torch.rand(4) + 0.5)
    torch.library.opcheck(torch.ops.nasprune.gate_epilogue.default, (z, scale, shift, gate, "relu", None, *stats))
    torch.library.opcheck(torch.ops.nasprune.gate_epilogue_backward.default,
                          (torch.randn(3, 4, 5, 2), z.detach(), scale.detach(), shift.detach(), gate.detach(),
                           "relu", None, *stats))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_out_index_gives_all_zero_output(layout):
    z = make_layout(torch.randn(2, 0, 3, 3), layout)
    p = torch.rand(4) + 1
    y = ops.gate_epilogue(z, p, p, p, "relu", torch.zeros(0, dtype=torch.long))
    assert y.shape == (2, 4, 3, 3) and torch.equal(y, torch.zeros_like(y))
    grads = ops.gate_epilogue_backward(torch.randn(2, 4, 3, 3), z, p, p, p, "relu", torch.zeros(0, dtype=torch.long))
    assert grads[0].shape == (2, 0, 3, 3) and all(torch.equal(g, torch.zeros(4)) for g in grads[1:])
