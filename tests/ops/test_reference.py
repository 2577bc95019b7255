"""The reference math itself, in fp64: gradcheck of the forward formulas, and the hand-written
backward equal to autograd of the forward."""
import pytest
import torch

from nasprune.ops import reference


def _args(n=2, c=4, h=3, w=5, k=None):
    z = torch.randn(n, k or c, h, w, dtype=torch.float64)
    return z, torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64), \
        torch.randn(c, dtype=torch.float64)


@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("scatter", [False, True])
def test_gate_epilogue_gradcheck(act, scatter):
    z, scale, shift, gate = _args(k=2 if scatter else None)
    index = torch.tensor([3, 1]) if scatter else None
    for t in (z, scale, shift, gate):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: reference.gate_epilogue(*a, act, index), (z, scale, shift, gate))


@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("scatter", [False, True])
def test_backward_formula_matches_autograd(act, scatter):
    z, scale, shift, gate = _args(k=2 if scatter else None)
    index = torch.tensor([3, 1]) if scatter else None
    for t in (z, scale, shift, gate):
        t.requires_grad_()
    y = reference.gate_epilogue(z, scale, shift, gate, act, index)
    dy = torch.randn_like(y)
    expected = torch.autograd.grad(y, (z, scale, shift, gate), dy)
    got = reference.gate_epilogue_backward(dy, z.detach(), scale.detach(), shift.detach(),
                                           gate.detach(), act, index)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


def test_scatter_leaves_absent_channels_zero():
    z, scale, shift, gate = _args(k=2)
    shift.fill_(1.0)  # relu(shift) would be non-zero for a channel with no source
    y = reference.gate_epilogue(z, scale, shift, gate, "relu", torch.tensor([3, 1]))
    assert y[:, [0, 2]].abs().max() == 0


def test_channel_stats_gradcheck():
    z = torch.randn(3, 4, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reference.channel_stats(t), (z,))
