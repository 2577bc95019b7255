"""nasprune.models.RepVGG: the deploy form (one 3x3 conv per block) equals the multi-branch
training form in eval mode, before and after nasprune.slim; both forms load with
nasprune.load(path) alone."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import nasprune
import nasprune.flops as flops
import nasprune.graph as G
import nasprune.slim as S
from nasprune.io import read_architecture
from nasprune.models import RepVGG, RepVGGBlock, reparameterize, repvgg_a0, repvgg_a1, repvgg_b0

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slim"))
from zoo import random_keep  # noqa: E402

BUILDERS = {"A0": repvgg_a0, "A1": repvgg_a1, "B0": repvgg_b0}
# deploy-form parameters of the ImageNet models, in millions (paper Table 3: 8.30, 12.78, 14.33)
PAPER_PARAMS = {"A0": 8.30, "A1": 12.78, "B0": 14.33}
MAX_REL_ERROR = 1e-5  # fp32, relative to the output's largest magnitude


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fan-in scaled weights and BN statistics and affines far from the identity (negative
    scales and two eps values included), so that a folding mistake in any branch shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, 1 / math.sqrt(m.weight[0].numel()), generator=g)
                if m.bias is not None:
                    m.bias.normal_(0, 0.2, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                sign = torch.randint(0, 4, m.weight.shape, generator=g).eq(0).mul(-2).add(1)
                m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.2, 0.9, generator=g) * sign)
                m.bias.normal_(0, 0.3, generator=g)
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.3, 2.0, generator=g)
                m.eps = (1e-5, 1e-3)[int(torch.randint(0, 2, (1,), generator=g))]
    return model


def rel_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference - other).abs().max() / reference.abs().max())


def inputs(cifar: bool) -> torch.Tensor:
    size = 32 if cifar else 64  # ImageNet models at 64x64 to stay fast (2x2 at the head)
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def slimmed():
    """CIFAR RepVGG-A0 with random weights, slimmed to a random subset of every group."""
    model = randomize(repvgg_a0(cifar=True)).eval()
    x = inputs(cifar=True)
    graph = G.trace(model, x)
    return model, graph, S.apply(model, graph, random_keep(graph, seed=2)).eval(), x


@pytest.mark.parametrize("cifar", [True, False], ids=["cifar", "imagenet"])
@pytest.mark.parametrize("config", list(BUILDERS))
def test_deploy_form_equals_multi_branch_form(config, cifar):
    model = randomize(BUILDERS[config](cifar=cifar)).eval()
    deployed = reparameterize(model)
    x = inputs(cifar)
    with torch.no_grad():
        reference, out = model(x), deployed(x)
    assert reference.shape == (2, 10 if cifar else 1000) and reference.abs().max() > 0.1
    assert rel_error(reference, out) <= MAX_REL_ERROR
    assert not deployed.training and model.blocks()[0].conv3x3.conv.weight.dtype == torch.float32


@pytest.mark.parametrize("config", list(BUILDERS))
def test_structure_follows_the_paper(config):
    with torch.device("meta"):
        model, deployed = RepVGG(config), RepVGG(config, deploy=True)
    assert sum(p.numel() for p in deployed.parameters()) / 1e6 == pytest.approx(PAPER_PARAMS[config], abs=0.01)
    assert [len(stage) for stage in model.stages] == ([1, 2, 4, 14, 1] if config[0] == "A" else [1, 4, 6, 16, 1])
    a = 0.75 if config == "A0" else 1.0
    assert [stage[0].out_channels for stage in model.stages] == [min(64, 64 * a), 64 * a, 128 * a,
                                                                            256 * a, 1280]
    # an identity branch wherever a block keeps width and resolution: all but each stage's first
    for cifar, strides in ((False, [2] * 5), (True, [1, 1, 2, 2, 2])):
        with torch.device("meta"):
            model = RepVGG(config, cifar=cifar)
        assert [stage[0].stride for stage in model.stages] == strides
        assert model.fc.out_features == (10 if cifar else 1000)
        expected = [j > 0 or (s == 1 and cifar) for s, stage in enumerate(model.stages) for j in range(len(stage))]
        assert [b.identity is not None for b in model.blocks()] == expected


def test_explicit_widths_place_identity_branches_where_widths_match():
    widths = [16, 16, 12] + [24, 24, 20, 20] + [32] * 13 + [40] + [64]
    model = randomize(RepVGG("A0", cifar=True, widths=widths)).eval()
    assert model.widths() == widths
    assert [b.identity is not None for b in model.blocks()] == [
        False, True, False, False, True, False, True] + [False] + [True] * 12 + [False, False]
    x = inputs(cifar=True)
    with torch.no_grad():
        assert rel_error(model(x), reparameterize(model)(x)) <= MAX_REL_ERROR


def test_slimmed_model_reparameterizes_to_its_slimmed_deploy_form(slimmed):
    model, graph, slim, x = slimmed
    # a stage's block outputs and its identity BNs form one group, like a residual stream
    for s, stage in enumerate(model.stages):
        stream = graph.group_of(f"stages.{s}.0.conv3x3.conv")
        for j, block in enumerate(stage):
            assert graph.group_of(f"stages.{s}.{j}.conv1x1.conv") == stream
            if block.identity is not None:
                assert graph.group_of(f"stages.{s}.{j}.identity", "channel") == stream
    widths = slim.widths()
    assert sum(widths) < sum(model.widths())
    # slim.apply cut the identity BNs like the other BNs of their (stage) group
    for block in slim.blocks():
        if block.identity is not None:
            assert block.identity.num_features == block.in_channels == block.out_channels
    deployed = reparameterize(slim)
    assert deployed.widths() == widths
    with torch.no_grad():
        assert rel_error(slim(x), deployed(x)) <= MAX_REL_ERROR
    assert flops.count(deployed, x) <= flops.count(slim, x)


def test_deploy_form_holds_only_3x3_convs_relus_and_the_head(slimmed):
    deployed = reparameterize(slimmed[2])
    plain = (RepVGG, RepVGGBlock, nn.Sequential, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Linear)
    for name, m in deployed.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.kernel_size == (3, 3) and m.bias is not None, name
        else:
            assert type(m) in plain, f"{name}: {type(m).__name__}"
    assert sum(isinstance(m, nn.Linear) for m in deployed.modules()) == 1
    # a plain VGG: every block's output channels are a group of their own
    graph = G.trace(deployed, slimmed[3])
    assert len(graph.prunable_groups) == len(deployed.blocks())


def test_deployed_slimmed_model_loads_alone(slimmed, tmp_path):
    deployed = reparameterize(slimmed[2])
    path = tmp_path / "deployed.safetensors"
    nasprune.save(deployed, path)
    arch = read_architecture(path)
    assert arch["constructor"] == "nasprune.models.repvgg.RepVGG" and arch["steps"] == []
    assert arch["kwargs"]["deploy"] is True and arch["kwargs"]["widths"] == deployed.widths()
    loaded = nasprune.load(path).eval()
    assert type(loaded) is RepVGG and loaded.widths() == deployed.widths()
    x = slimmed[3]
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))


def test_slimmed_training_form_loads_alone(slimmed, tmp_path):
    slim, x = copy.deepcopy(slimmed[2]), slimmed[3]
    for m in slim.modules():  # eps is no tensor: the file keeps the constructor's
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-5
    path = tmp_path / "slim.safetensors"
    nasprune.save(slim, path)
    assert read_architecture(path)["kwargs"]["widths"] == slimmed[0].widths()  # the base's; the step slims
    loaded = nasprune.load(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), slim(x))


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown RepVGG configuration 'C7'"):
        RepVGG("C7")
    with pytest.raises(ValueError, match=r"22 blocks \(1\+2\+4\+14\+1\); got 3 widths: \[8, 8, 8\]"):
        repvgg_a0(widths=[8, 8, 8])
    with pytest.raises(ValueError, match="width 0 of block 1"):
        repvgg_a0(widths=[8, 0] + [8] * 20)
    with pytest.raises(ValueError, match="positive integers, got"):
        repvgg_a0(widths=[8.5] * 22)
    with pytest.raises(TypeError, match="got Linear"):
        reparameterize(nn.Linear(2, 2))
