"""TAS on the torchvision ResNets (7x7 stem + max-pool, basic and bottleneck blocks, 4 stages):
search space read from the model, cost model vs counted MACs, warm start and inheritance
equal to the unpruned model, a search step and export."""
import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50, resnext50_32x4d, wide_resnet50_2
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from nasprune import flops
from nasprune.flops import CostModel
from nasprune.graph import trace
from nasprune.models import CifarResNet, ResNetSpec, cifar_resnet20, tas_resnet
from nasprune.search import TAS
from nasprune.search.tas_net import TASSupernet, inherit_weights, resnet_spec


def _small(block=Bottleneck, layers=(2, 1, 3, 1), classes=7):
    torch.manual_seed(0)
    model = ResNet(block, list(layers), num_classes=classes, width_per_group=16 if block is Bottleneck else 64)
    for m in model.modules():        # non-trivial BN statistics, so a wrong copy shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_spec_of_torchvision_and_cifar_models():
    spec = resnet_spec(resnet50())
    assert spec.block == "bottleneck" and spec.layers == (3, 4, 6, 3)
    assert spec.stage_widths == (256, 512, 1024, 2048) and spec.mid_widths == (64, 128, 256, 512)
    assert spec.strides == (1, 2, 2, 2) and spec.shortcut == "conv"
    assert (spec.stem_width, spec.stem_kernel, spec.stem_stride, spec.stem_pool) == (64, 7, 2, True)
    assert resnet_spec(wide_resnet50_2()).mid_widths == (128, 256, 512, 1024)
    assert resnet_spec(resnet18()).block == "basic"
    assert resnet_spec(CifarResNet(20)) == ResNetSpec.cifar(3)
    assert resnet_spec(CifarResNet(20, shortcut="B")).shortcut == "conv"
    with pytest.raises(ValueError, match=r"layer1\.0\.conv2.*groups 32"):
        resnet_spec(resnext50_32x4d())
    with pytest.raises(TypeError, match="TAS searches ResNets"):
        resnet_spec(nn.Sequential(nn.Conv2d(3, 8, 3)))


@pytest.mark.parametrize("build,published", [(resnet18, 1.814e9), (resnet50, 4.089e9)])
def test_supernet_max_cost_equals_counted_and_published_macs(build, published):
    model = build()
    net = TASSupernet(resnet_spec(model), 224)
    counted = flops.count(model, torch.zeros(1, 3, 224, 224))
    assert net.max_cost() == counted
    assert net.max_cost() == pytest.approx(published, rel=1e-3)   # methods.md 1 (torchvision figures)


@pytest.mark.parametrize("block,layers,size", [(Bottleneck, (2, 1, 3, 1), 64), (BasicBlock, (2, 2, 1, 2), 48),
                                               (Bottleneck, (1, 2, 1, 1), 40)])
def test_expected_cost_at_one_hot_equals_macs_of_derived_net(block, layers, size):
    net = TASSupernet(resnet_spec(_small(block, layers)), size)
    g = torch.Generator().manual_seed(len(layers) + size)
    for trial in range(4):
        with torch.no_grad():
            net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=g))
            net.depth_logits.copy_(torch.randn(net.depth_logits.shape, generator=g))
            if trial == 0:     # the same ratio everywhere: no width-induced projections
                net.width_logits.zero_()
                net.width_logits[:, 4] = 1
        arch = net.architecture()
        derived = tas_resnet(**arch)
        assert float(net.cost(*net.argmax_onehot())) == flops.count(derived, torch.zeros(1, 3, size, size))
    e = net.expected_cost()
    assert 0 < float(e.detach()) < net.max_cost() and e.requires_grad


def _set_arch(net, width_index, depth_index):
    with torch.no_grad():
        net.width_logits.fill_(-5.0)
        net.width_logits[:, width_index] = 5.0
        for s, choices in enumerate(net.depth_choices):
            net.depth_logits[s].fill_(-5.0)
            net.depth_logits[s, depth_index if depth_index >= 0 else len(choices) - 1] = 5.0


@pytest.mark.parametrize("block", [Bottleneck, BasicBlock])
def test_warm_started_supernet_at_full_width_equals_the_model(block):
    model = _small(block)
    net = TASSupernet(resnet_spec(model), 32)
    net.load_base(model)
    net.eval()
    _set_arch(net, -1, -1)                       # every conv at full width, every block
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-5)
        derived = tas_resnet(**net.architecture())
        inherit_weights(derived, net)
        torch.testing.assert_close(derived.eval()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [Bottleneck, BasicBlock])
def test_inherited_pruned_net_equals_supernet_argmax_forward(block):
    """Same ratio in every conv (so the derived net has only the base's projections) and depth
    1 per stage: the slimmed net computes what the supernet's arg-max path computes."""
    model = _small(block)
    net = TASSupernet(resnet_spec(model), 32)
    net.load_base(model)
    net.eval()
    _set_arch(net, 4, 0)
    derived = tas_resnet(**net.architecture())
    assert [len(stage) for stage in derived.stages] == [1, 1, 1, 1]
    inherit_weights(derived, net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(derived.eval()(x), net(x), rtol=1e-4, atol=1e-5)


def test_tas_search_step_and_export_on_torchvision_resnet():
    model = _small(Bottleneck, (1, 2, 1, 1), classes=5).train()
    s = TAS(model, 0.5, input_size=32, device="cpu", seed=1, arch_lr=0.05)
    g = torch.Generator().manual_seed(0)
    batch = lambda: (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g))
    start = s.model.width_logits.detach().clone()
    for _ in range(3):
        out = s.step(batch(), batch())
    assert torch.isfinite(out["loss"]) and not torch.equal(start, s.model.width_logits.detach())
    arch = s.architecture()
    assert arch["family"] == "tas-resnet" and arch["block"] == "bottleneck" and arch["stem_pool"]
    assert s.base_flops == flops.count(model, torch.zeros(1, 3, 32, 32)) == s.max_flops
    net = s.export()
    assert flops.count(net, torch.zeros(1, 3, 32, 32)) == arch["flops"]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_architecture_dicts_of_cifar_only_releases_still_build():
    old = {"family": "tas-cifar-resnet", "blocks_per_stage": 2, "num_classes": 10, "input_size": 32,
           "in_channels": 3, "stage_widths": [16, 32, 64], "widths": [8] + [12] * 12, "blocks": [2, 1, 2]}
    net = tas_resnet(**old)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="needs 13 widths"):
        tas_resnet(**{**old, "widths": [8] * 12})
    with pytest.raises(ValueError, match="outside 1..16"):
        tas_resnet(**{**old, "widths": [17] + [12] * 12})


def test_option_a_shortcut_warm_starts_as_channel_embedding():
    """Option A (subsample, zero-pad channels) -> TAS's AvgPool + 1x1 conv: the conv places the
    input channels where option A does, so the warm-started residual path carries the input."""
    model = CifarResNet(20).eval()
    net = TASSupernet(resnet_spec(model), 32)
    net.load_base(model)
    blk = net.blocks[3]                                    # first block of stage 2: 16 -> 32, stride 2
    w = blk.shortcut.conv.weight[:, :, 0, 0]
    assert w.shape == (32, 16) and w.sum() == 16 and torch.equal(w[8:24], torch.eye(16))
    x = torch.randn(2, 16, 8, 8)
    pad = model.layer2[0].shortcut
    avg = torch.nn.functional.avg_pool2d(x, 2)
    ours = torch.nn.functional.conv2d(avg, blk.shortcut.conv.weight)
    torch.testing.assert_close(ours, torch.nn.functional.pad(avg, (0, 0, 0, 0, pad.before, pad.after)))


def test_export_base_init_takes_the_unpruned_models_prefix_weights():
    model = _small(BasicBlock, (2, 2, 1, 2))
    s = TAS(model, 0.5, input_size=32, device="cpu", seed=0)
    with torch.no_grad():                  # the searched supernet drifts away from the model
        for p in s.model.weight_parameters():
            p.add_(1.0)
    _set_arch(s.model, 4, -1)
    with torch.no_grad():                  # one stride-1 block with unequal widths: a new projection
        s.model.width_logits[2].fill_(-5.0); s.model.width_logits[2, 2] = 5.0
    arch = s.architecture()
    base, inherited = s.export(init="base", architecture=arch), s.export(init="inherit", architecture=arch)
    c, cin = base.stem.conv.weight.shape[:2]
    torch.testing.assert_close(base.stem.conv.weight, model.conv1.weight[:c])
    torch.testing.assert_close(base.stem.bn.running_var, model.bn1.running_var[:c])
    torch.testing.assert_close(inherited.stem.conv.weight, s.model.stem.conv.weight[:c])
    default = s.export(architecture=arch)
    torch.testing.assert_close(default.stem.conv.weight, base.stem.conv.weight)
    blk, src = base.stages[1][0], model.layer2[0]
    w = blk.shortcut[0].weight
    torch.testing.assert_close(w, src.downsample[0].weight[:w.size(0), :w.size(1)])
    proj = base.stages[0][0].shortcut          # only the pruned widths call for it
    assert isinstance(proj, nn.Sequential)
    w = proj[0].weight[:, :, 0, 0]
    torch.testing.assert_close(w, torch.eye(*w.shape))
    # warm-started exports: no BN on it, so in training mode too the shortcut carries the input
    # into the leading channels, as the supernet's residual add did (a fresh BN would standardise it)
    assert len(proj) == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in inherited.stages[0][0].shortcut)
    x = torch.randn(4, w.size(1), 8, 8)
    base.train()
    torch.testing.assert_close(proj(x), torch.nn.functional.pad(x, (0, 0, 0, 0, 0, w.size(0) - w.size(1)))
                               if w.size(0) >= w.size(1) else x[:, :w.size(0)])
    # TAS's own inferred network (init random, or asked for) has the BN; either rebuilds from its kwargs
    for net in (s.export(init="random", architecture=arch), s.export(architecture=arch, projection_bn=True)):
        assert isinstance(net.stages[0][0].shortcut[1], nn.BatchNorm2d)
    assert base.constructor_kwargs["projection_bn"] is False and "projection_bn" not in net.constructor_kwargs
    rebuilt = tas_resnet(**base.constructor_kwargs)
    assert rebuilt.state_dict().keys() == base.state_dict().keys()
    # the architecture dict describes the export it is asked for: its params, and what it rebuilds
    for bn, init in ((False, "base"), (True, "random")):
        described = s.select("final", projection_bn=bn)
        net = s.export(init=init, architecture=described)
        assert described["params"] == flops.count_params(net)
        assert tas_resnet(**described).state_dict().keys() == net.state_dict().keys()
    with pytest.raises(ValueError, match="init must be one of"):
        s.export(init="scratch")


def _cost_model_total(net, size):
    return CostModel(trace(net, torch.zeros(1, 3, size, size))).total()


@pytest.mark.parametrize("make,size", [(lambda: CifarResNet(14), 16), (lambda: _small(BasicBlock, (2, 2, 1, 2)), 32),
                                       (lambda: _small(Bottleneck, (2, 1, 3, 1)), 48)],
                         ids=["cifar-option-a", "basic", "bottleneck"])
def test_tas_cost_equals_the_one_cost_model_of_the_derived_net(make, size):
    """At one-hot width and depth probabilities the supernet's cost is nasprune.flops.CostModel's
    total of the derived network (and flops.count's), for random architectures: dropped blocks,
    width-induced projections."""
    net = TASSupernet(resnet_spec(make()), size)
    g = torch.Generator().manual_seed(size)
    for _ in range(3):
        with torch.no_grad():
            net.width_logits.copy_(torch.randn(net.width_logits.shape, generator=g))
            net.depth_logits.copy_(torch.randn(net.depth_logits.shape, generator=g))
        derived = tas_resnet(**net.architecture()).eval()
        cost = float(net.cost(*net.argmax_onehot()))
        assert cost == _cost_model_total(derived, size) == flops.count(derived, torch.zeros(1, 3, size, size))


@pytest.mark.parametrize("make,size", [(lambda: cifar_resnet20(shortcut="B"), 32),
                                       (lambda: _small(BasicBlock, (2, 2, 1, 2)), 32),
                                       (lambda: _small(Bottleneck, (2, 1, 3, 1)), 48)],
                         ids=["cifar-option-b", "basic", "bottleneck"])
def test_tas_cost_at_full_depth_equals_the_cost_model_of_the_unpruned_model_at_a_keep_set(make, size):
    """At full depth, with one width per channel group of the unpruned model (the residual
    streams' convs agree), TAS's cost is CostModel(trace(model)).exact(keep) of the matching
    prefix keep set: the same MACs from the same graph-based cost model, without building a net."""
    model = make().eval()
    net = TASSupernet(resnet_spec(model), size)
    graph = trace(model, torch.zeros(1, 3, size, size))
    g = torch.Generator().manual_seed(1)
    rows_of = {}
    for r, name in enumerate(net.spec.row_names()):
        group, = graph.group_of(name)
        rows_of.setdefault(group.index, []).append(r)
    for _ in range(3):
        keep = {}
        with torch.no_grad():
            net.width_logits.fill_(-5.0)
            net.depth_logits.fill_(-5.0)
            for s, choices in enumerate(net.depth_choices):
                net.depth_logits[s, len(choices) - 1] = 5.0
            for group, rows in rows_of.items():
                j = int(torch.randint(0, len(net.convs[rows[0]].choices), (1,), generator=g))
                net.width_logits[rows, j] = 5.0
                keep[group] = torch.arange(net.convs[rows[0]].choices[j])
        assert float(net.cost(*net.argmax_onehot())) == CostModel(graph).exact(keep)
        derived = tas_resnet(**net.architecture())
        assert not any(isinstance(b.shortcut, nn.Sequential) and b.shortcut[0].stride == (1, 1)
                       for stage in derived.stages for b in stage[1:])   # no width-induced projection
