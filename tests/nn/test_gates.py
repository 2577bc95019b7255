"""Gate parameterisations: values and gradients by their published definitions."""
import pytest
import torch

from nasprune.nn import GatedConvBNAct2d, gates


def test_sigmoid_gate_is_annealed_sigmoid():
    fn = gates.Sigmoid(temperature=2.0)
    raw = torch.tensor([-1.0, 0.0, 3.0], requires_grad=True)
    g = fn(raw)
    torch.testing.assert_close(g, torch.sigmoid(raw.detach() / 2))
    g.sum().backward()
    s = torch.sigmoid(raw.detach() / 2)
    torch.testing.assert_close(raw.grad, s * (1 - s) / 2)
    fn.anneal(0.01)  # tends to the step function 1[raw > 0]
    torch.testing.assert_close(fn(torch.tensor([-1.0, 1.0])), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="temperature must be positive"):
        fn.anneal(0)


def test_threshold_gate_is_binary_with_straight_through_gradient():
    fn = gates.Threshold()
    raw = torch.tensor([0.2, 0.5, 0.6, 1.3], requires_grad=True)
    g = fn(raw)
    assert torch.equal(g, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    (g * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.equal(raw.grad, torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_threshold_gate_gradient_in_layer_is_sum_dy_times_activation():
    # PaS: dL/dw_c = sum_{n,h,w} dL/dy * x, with x the gated activation (methods.md 5.1).
    layer = GatedConvBNAct2d(3, 4, 3, padding=1, gate="threshold")
    x = torch.randn(2, 3, 5, 5)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    layer.zero_grad()
    act = torch.relu(layer.bn(layer.conv(x))).detach()
    layer.bn.num_batches_tracked.zero_()
    y = layer(x)
    y.backward(dy)
    torch.testing.assert_close(layer.gate.grad, (dy * act).sum((0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_fixed_mask_has_no_gradient():
    raw = torch.tensor([0.0, 2.0, -1.0], requires_grad=True)
    g = gates.FixedMask()(raw)
    assert torch.equal(g, torch.tensor([0.0, 1.0, 1.0])) and not g.requires_grad


def test_make_rejects_unknown_names():
    with pytest.raises(ValueError, match="gate must be a GateParam or one of"):
        gates.make("soft")
    assert isinstance(gates.make("sigmoid"), gates.Sigmoid)


def test_parameterisation_does_not_change_state_dict():
    keys = {name: set(GatedConvBNAct2d(2, 3, 1, gate=name).state_dict())
            for name in ("continuous", "sigmoid", "threshold", "fixed")}
    assert len({frozenset(k) for k in keys.values()}) == 1
    assert GatedConvBNAct2d(2, 3, 1, gate="threshold").gate[0].item() == pytest.approx(0.6)


def test_sampled_gate_is_mask_times_weight():
    fn = gates.make("sampled")
    raw = torch.tensor([0.5, 2.0, -1.0], requires_grad=True)
    assert torch.equal(fn(raw), raw.detach())  # nothing sampled yet: every channel
    fn.sample(torch.tensor([1.0, 0.0, 1.0]))
    g = fn(raw)
    assert torch.equal(g.detach(), torch.tensor([0.5, 0.0, -1.0]))
    (g * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(raw.grad, torch.tensor([1.0, 0.0, 3.0]))  # unsampled channels learn nothing
    with pytest.raises(ValueError, match="0s and 1s"):
        fn.sample(torch.tensor([0.5, 1.0, 1.0]))
