"""The Triton width_aggregate kernels, run by Triton's interpreter on CPU tensors, against
nasprune.ops.reference.

TRITON_INTERPRET must be set before triton is imported, hence at the very top; run this file in
its own process: `TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_interpret*.py`.
The interpreter takes about 1 ms per program instance, so shapes stay tiny; the kernels get one
small tile there, so these shapes still cover several tiles per row, several programs per channel
and adjoint ranges of many steps.
"""
from tests.kernels._triton_interp import interpreted_kernels

wa = interpreted_kernels("width_aggregate")  # sets TRITON_INTERPRET before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from nasprune.ops import reference  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

# (shape, widths): full width, width 1 (adjoint range over every output), K = 1 and 3,
# duplicates, C_max < C, long rows (several column tiles), 2-D (channels-last kernels).
CASES = [
    ((2, 7, 3, 5), [7, 3]),
    ((3, 8, 4, 4), [5, 1]),
    ((2, 6, 2, 3), [6, 6]),
    ((4, 2, 8, 16), [1, 2]),  # several programs per output channel in the out pass
    ((1, 9, 2, 2), [2, 4, 9]),
    ((2, 5, 3, 3), [1]),
    ((1, 6, 9, 13), [4, 5]),
    ((6, 11), [4, 7]),
]


def _id(case):
    return "x".join(map(str, case[0])) + "-w" + "_".join(map(str, case[1]))


def make(shape, widths, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, k = shape[1], len(widths)
    if layout == "strided":  # every other position of the last dimension
        big = list(shape)
        big[-1] *= 2
        z = torch.randn(big, generator=g).to(dtype)[..., ::2]
    else:
        z = torch.randn(shape, generator=g).to(dtype)
        if layout == "cl":
            z = z.to(memory_format=torch.channels_last)
    w = torch.tensor(widths, dtype=torch.int64)
    inside = (torch.arange(c)[None] < w[:, None]).float()
    scale = (torch.rand(k, c, generator=g) + 0.5) * inside
    shift = torch.randn(k, c, generator=g) * inside
    weights = torch.softmax(torch.randn(k, generator=g), 0)
    dy = torch.randn(shape, generator=g).to(dtype)
    return z, scale, shift, w, weights, dy


def check(z, scale, shift, w, weights, dy, act, ref_widths=None):
    rw = w if ref_widths is None else ref_widths
    y = wa.width_aggregate(z, scale, shift, w, weights, act)
    ref = reference.width_aggregate(z.double(), scale, shift, rw, weights, act)
    tol = TOL[z.dtype]
    assert y.dtype == z.dtype and y.shape == z.shape
    torch.testing.assert_close(y.double(), ref, atol=tol[0], rtol=tol[1])
    dz, dscale, dshift, dweights = wa.width_aggregate_backward(dy, z, scale, shift, w, weights, act)
    e_dz, e_dscale, e_dshift, e_dweights = reference.width_aggregate_backward(
        dy.double(), z.double(), scale.double(), shift.double(), rw, weights.double(), act)
    torch.testing.assert_close(dz.double(), e_dz, atol=tol[0], rtol=tol[1])
    n = z.numel() // max(z.shape[1], 1)
    red = (1e-4 * n ** 0.5 * (1 if z.dtype == torch.float32 else 30),
           1e-4 if z.dtype == torch.float32 else 2e-2)
    for got, exp in ((dscale, e_dscale), (dshift, e_dshift), (dweights, e_dweights)):
        assert got.dtype == torch.float32 and got.shape == exp.shape
        torch.testing.assert_close(got.double(), exp, atol=red[0], rtol=red[1])
    return y, dz


@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference_fp32(case, act):
    check(*make(*case, torch.float32, "nchw"), act)


@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("layout", ["cl", "strided"])
@pytest.mark.parametrize("case", CASES[:5], ids=_id)
def test_layouts(case, layout, act):
    y, dz = check(*make(*case, torch.float32, layout), act)
    if layout == "cl":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert dz.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_low_precision(dtype, layout):
    check(*make((2, 8, 3, 4), [3, 8], dtype, layout), "relu")


def test_empty_batch():
    z, scale, shift, w, weights, dy = make((0, 6, 3, 3), [2, 6], torch.float32, "nchw")
    assert wa.width_aggregate(z, scale, shift, w, weights, "relu").shape == (0, 6, 3, 3)
    dz, dscale, dshift, dweights = wa.width_aggregate_backward(dy, z, scale, shift, w, weights,
                                                               "relu")
    assert dz.shape == z.shape
    assert not dscale.any() and not dshift.any() and not dweights.any()


def test_widths_out_of_range_are_clamped():
    """No host check on the GPU: a width above C acts as C, a width below 1 as 1."""
    z, scale, shift, _, weights, dy = make((2, 6, 3, 3), [6, 1], torch.float32, "nchw")
    check(z, scale, shift, torch.tensor([9, 0]), weights, dy, "relu",
          ref_widths=torch.tensor([6, 1]))


def test_adjoint_ranges_invert_the_spans():
    """A_j(i), the outputs input channel i feeds, are exactly the o with i in S_j(o)."""
    for cm in range(1, 24):
        for c in range(1, cm + 1):
            feeds = {i: [] for i in range(c)}
            for o in range(cm):
                lo, hi = o * c // cm, -(-(o + 1) * c // cm)
                assert 1 <= hi - lo <= 2
                for i in range(lo, hi):
                    feeds[i].append(o)
            for i, outs in feeds.items():
                alo, ahi = i * cm // c, min(-(-(i + 1) * cm // c), cm)
                assert outs == list(range(alo, ahi)), (cm, c, i)
