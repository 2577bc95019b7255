"""channel_stats: the CPU kernel against fp64 statistics over shapes, dtypes, layouts, large means;
opcheck; its autograd against the reference."""

import pytest
import torch

from nasprune import ops
from nasprune.ops import reference
from tests.conftest import make_layout

# (.., 8 | 16 | 24 | 32, ..): the channels-last kernel compiles their periods as constants;
# (5, 11, 20, 19) and (3, 16, 30, 31) span several channels-last blocks and end in a partial period
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 2), (7, 5, 1, 1), (4, 16, 8, 8), (3, 8, 5, 3), (2, 24, 3, 5), (2, 32, 4, 3),
          (1, 2, 70, 40), (3, 11, 7, 9), (3, 48, 3, 3), (5, 11, 20, 19), (3, 16, 30, 31), (9, 6), (2, 3, 9),
          (300, 3, 2, 2)]


def _exact(z):
    return reference.channel_stats(z.double())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_fp64_statistics(shape, dtype, layout):
    z = make_layout(torch.randn(shape).to(dtype), layout)
    mean, var = ops.channel_stats(z)
    e_mean, e_var = _exact(z)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (shape[1],)
    torch.testing.assert_close(mean.double(), e_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(var.double(), e_var, atol=1e-6, rtol=1e-5)


# (16, 8, 32, 32): blocks of two rows; (600, 4, 3, 3): blocks of 227 short rows and a shorter last
# one; channels last, (5, 11, 20, 19): two blocks of periods, the last partial
@pytest.mark.parametrize("shape", [(16, 8, 32, 32), (600, 4, 3, 3), (5, 11, 20, 19)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stable_for_large_means(shape, layout):
    # E[x^2] - E[x]^2 in fp32 loses every digit here; torch.var_mean does not, nor may we.
    z = make_layout(1e4 + torch.randn(shape), layout)
    mean, var = ops.channel_stats(z)
    e_mean, e_var = _exact(z)
    torch.testing.assert_close(mean.double(), e_mean, atol=0, rtol=2e-7)
    torch.testing.assert_close(var.double(), e_var, atol=0, rtol=1e-4)
    t_var, t_mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    assert (var.double() - e_var).abs().max() <= 2 * (t_var.double() - e_var).abs().max() + 1e-6


def test_empty_batch_is_nan_like_var_mean():
    mean, var = ops.channel_stats(torch.randn(0, 3, 4, 4))
    assert mean.shape == (3,) and torch.isnan(mean).all() and torch.isnan(var).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    z = make_layout(torch.randn(3, 5, 4, 6), layout).requires_grad_()
    torch.library.opcheck(torch.ops.nasprune.channel_stats.default, (z,))


def test_autograd_matches_reference():
    z = torch.randn(4, 3, 5, 5) * 3 + 2
    z1, z2 = z.clone().requires_grad_(), z.double().requires_grad_()
    m1, v1 = ops.channel_stats(z1)
    m2, v2 = reference.channel_stats(z2)
    a, b = torch.randn(3), torch.randn(3)
    ((m1 * a).sum() + (v1 * b).sum()).backward()
    ((m2 * a.double()).sum() + (v2 * b.double()).sum()).backward()
    torch.testing.assert_close(z1.grad.double(), z2.grad, atol=1e-6, rtol=1e-5)
    # Only one output used: the other's gradient is None inside the backward.
    z3 = z.clone().requires_grad_()
    ops.channel_stats(z3)[1].sum().backward()
    expected = 2 * (z - z.mean(dim=(0, 2, 3), keepdim=True)) / (z.numel() / 3)
    torch.testing.assert_close(z3.grad, expected, atol=1e-6, rtol=1e-5)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"z must have shape \(N, C, \.\.\.\), got \(5,\)"):
        ops.channel_stats(torch.randn(5))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16, got torch.int64"):
        ops.channel_stats(torch.ones(2, 2, dtype=torch.long))
