"""MAC counts in the TAS convention: the published totals, slimmed models, and the expected
(differentiable) cost of soft-gated models."""
from __future__ import annotations

import pytest
import torch
import torchvision

import nasprune.flops as flops
import nasprune.graph as G
import nasprune.slim as S
from nasprune.models import cifar_resnet

CIFAR = torch.zeros(1, 3, 32, 32)
IMAGENET = torch.zeros(1, 3, 224, 224)


@pytest.mark.parametrize("depth, shortcut, millions", [
    (20, "B", 40.81), (56, "B", 125.75), (110, "B", 253.15),   # TAS, with 1x1 projection shortcuts
    (20, "A", 40.55), (56, "A", 125.49), (110, "A", 252.89),   # option A (zero-pad shortcuts)
    (32, "B", 69.12), (32, "A", 68.86)])
def test_cifar_resnet_totals(depth, shortcut, millions):
    model = cifar_resnet.CifarResNet(depth, shortcut=shortcut)
    assert round(flops.count(model, CIFAR) / 1e6, 2) == millions


@pytest.mark.parametrize("name, billions", [("resnet18", 1.814), ("resnet50", 4.089)])
def test_imagenet_totals(name, billions):
    model = torchvision.models.get_model(name)
    assert round(flops.count(model, IMAGENET) / 1e9, 3) == billions


def test_mobilenet_v2_total():
    # TAS's table gives 0.300 G: 300.77 M truncated to three digits
    assert flops.count(torchvision.models.mobilenet_v2(), IMAGENET) == 300_774_272


def test_conv_formula_with_bias_groups_and_linear():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1, groups=2),       # 9*2*8*16 + 16
                                torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # 9*8*16
                                torch.nn.Flatten(), torch.nn.Linear(8 * 16, 5))       # 128*5
    assert flops.count(model, torch.zeros(1, 4, 4, 4)) == 9 * 2 * 8 * 16 + 16 + 9 * 8 * 16 + 128 * 5


def test_table_is_per_layer_and_printable():
    table = flops.table(cifar_resnet.cifar_resnet20(shortcut="B"), CIFAR)
    assert len(table) == 22 and table.total == 40_813_184
    assert table[0].name == "conv1" and table[0].macs == 3 * 16 * 9 * 1024
    text = str(table)
    assert "layer2.0.shortcut.0" in text and "40.813" in text


@pytest.fixture(scope="module")
def resnet20a():
    model = cifar_resnet.cifar_resnet20(shortcut="A")
    graph = G.trace(model, CIFAR)
    return model, graph, flops.CostModel(graph)


def test_exact_cost_of_a_keep_set_equals_the_slimmed_models_count(resnet20a):
    model, graph, cost = resnet20a
    assert cost.total() == 40_551_040
    for ratio in (0.3, 0.5, 0.8):
        keep = S.uniform_keep(graph, ratio)
        assert cost.exact(keep) == flops.count(S.apply(model, graph, keep), CIFAR)


def test_expected_cost_is_differentiable_and_exact_at_whole_groups():
    model = cifar_resnet.cifar_resnet56(shortcut="B")
    graph = G.trace(model, CIFAR)
    cost = flops.CostModel(graph)
    keep = S.uniform_keep(graph, 0.5)
    kept = {g: torch.tensor(float(len(idx)), requires_grad=True) for g, idx in keep.items()}
    expected = cost.expected(kept)
    # every layer holds whole groups here, so the expectation at the kept counts is exact
    assert float(expected.detach()) == pytest.approx(cost.exact(keep), rel=1e-12)
    expected.backward()
    g = graph.group_of("layer1.0.conv1")[0].index
    # k channels of layer1.0.conv1: k * 8 (kept stream) * 9 * 32*32 for conv1's output and as
    # many for conv2's input
    assert float(kept[g].grad) == pytest.approx(2 * 8 * 9 * 32 * 32)


def test_expected_cost_accepts_a_vector_and_layer_weights(resnet20a):
    _, graph, cost = resnet20a
    full = torch.tensor([float(g.size) for g in graph.groups], requires_grad=True)
    assert float(cost.expected(full)) == pytest.approx(cost.total())
    half = cost.expected(full, layer_weights={"layer3.2.conv1": 0.5, "layer3.2.conv2": 0.5})
    assert float(half) == pytest.approx(cost.total() - 2_359_296)
    win, wout = cost.expected_widths(full)
    assert win.shape == wout.shape == (len(cost.names),)
    with pytest.raises(ValueError, match="entries"):
        cost.expected(full[:-1])
    with pytest.raises(ValueError, match="outside"):
        cost.expected({999: torch.tensor(1.0)})


def test_expected_cost_scales_a_partially_held_group(resnet20a):
    _, graph, cost = resnet20a
    stream = graph.group_of("layer3.0.conv2")[0]   # option A: stage 1 holds 16 of its 64 channels
    e = cost.expected({stream.index: torch.tensor(32.0)})
    win, wout = cost.expected_widths({stream.index: torch.tensor(32.0)})
    i = cost.names.index("layer1.0.conv1")
    assert float(win[i]) == pytest.approx(8.0)  # 16 channels kept at the group's rate of 1/2
    assert float(e) < cost.total()
