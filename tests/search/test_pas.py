"""PaS (issue 15): the budget holds on digits (CIFAR ResNet-20), the MAC regulariser equals
lambda * (MACs(m) / MACs_0 - rho)^2 counted by the cost model and its gradient reaches the gates
through the straight-through estimator, search -> export -> eval -> save -> load on seven models
at CIFAR size (the export equals the gated network at the binary gates), the slimmed RepVGG
re-parameterises to a plain 3x3 network, and a killed search resumes to the same gates and
weights."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import nasprune
from nasprune import flops
from nasprune.data import load_dataset
from nasprune.flops import CostModel
from nasprune.models import RepVGG, RepVGGBlock, cifar_resnet20, repvgg_a0
from nasprune.search import PaS
from nasprune.search.gated_searcher import gates_as
from tests.search._export_check import check_record_and_round_trip
from tests.search._kill import Kill

SIZE = 16


@pytest.fixture(scope="module")
def digits():
    return load_dataset(None, size=SIZE)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_budget_holds_on_digits(digits, target):
    train, _ = digits
    torch.manual_seed(0)
    model = cifar_resnet20(num_classes=10)
    s = PaS(model, target, input_size=SIZE, device="cpu")
    arch = s.search(train, epochs=3, batch_size=64)
    net = s.export()
    x = torch.zeros(1, 3, SIZE, SIZE)
    base, counted = flops.count(model, x), flops.count(net, x)
    assert s.gn.base_macs == base and arch["macs"] == counted and arch["params"] == flops.count_params(net)
    assert abs(counted / base - target) <= 0.03, (counted / base, arch["selected_by"])
    # the regulariser, not only the budget correction, moved the mask: it closed at least half
    # the gap from all gates open to the target
    assert abs(arch["mask_macs"] / base - target) <= (1 - target) / 2, arch["mask_macs"] / base
    if arch["selected_by"] == "threshold":
        assert arch["macs"] == pytest.approx(arch["mask_macs"])


def test_untied_post_add_placement_searches_each_block_and_reports_what_it_saves(digits, tmp_path):
    """placement="untied" (the official post-add DBC of every block): the search runs on the
    untied network, whose blocks keep different stream channels; the export (shortcuts
    gathering) holds the budget and equals the gated network; ``tied_macs`` is what the model's
    own class needs for those channels (more MACs: what the placement saves); it saves and
    loads on a fresh model."""
    train, _ = digits
    torch.manual_seed(0)
    model = cifar_resnet20(num_classes=10)
    s = PaS(model, 0.5, input_size=SIZE, device="cpu", placement="untied", gate_lr=0.1)
    tied = PaS(model, 0.5, input_size=SIZE, device="cpu")
    assert len(s.gn.groups) == len(tied.gn.groups) + 9 and s.gn.base_macs == tied.gn.base_macs
    arch = s.search(train, epochs=3, batch_size=64)
    net = s.export()
    x = torch.zeros(1, 3, SIZE, SIZE)
    base, counted = flops.count(model, x), flops.count(net, x)
    assert arch["macs"] == counted and abs(counted / base - 0.5) <= 0.03, (counted / base, arch["selected_by"])
    assert arch["tied_macs"] > arch["macs"]
    # the blocks of a stage keep different stream channels: some shortcut gathers
    assert any(sel.gathers for sel in net.selects.values())
    probe = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    keep, _ = s.keep()
    s.gn.eval()
    with torch.no_grad(), gates_as(s.gn, s.gn.keep_vector(keep).float()):
        assert _rel(s.gn(probe), net(probe)) <= 1e-5
    check_record_and_round_trip("pas", s.base_model, net, arch, x, probe, tmp_path / "untied.safetensors",
                                "nasprune.models.cifar_resnet20", {"num_classes": 10})


def _hand_keep(gn, w):
    """{group: channels with w > 0.5}, built from the packed gates directly."""
    return {g: torch.nonzero(w[o:o + gn.sizes[g]] > 0.5).flatten() for g, o in gn.offsets.items()}


def test_regulariser_and_its_straight_through_gradient():
    torch.manual_seed(0)
    model = cifar_resnet20(num_classes=10)
    x = torch.zeros(1, 3, SIZE, SIZE)
    s = PaS(model, 0.5, example_inputs=x, cost_weight=7.0, device="cpu")
    gn, cost = s.gn, CostModel(s.gn.graph)
    base = cost.total()
    assert gn.base_macs == base == flops.count(model, x)
    gen = torch.Generator().manual_seed(3)
    for closed_share in (0.15, 0.8):             # MACs(m) above rho, then below: the gradient's sign flips
        w = torch.where(torch.rand(gn.num_gates, generator=gen) < closed_share, 0.3, 0.9)
        with torch.no_grad():
            gn.gate.copy_(w)
        s._project()                              # as after a step: every layer keeps a channel open
        w = gn.gate.detach().clone()
        keep = _hand_keep(gn, w)
        ratio = cost.exact(keep) / base
        gn.gate.grad = None
        terms = s.regulariser()
        terms["reg"].backward()
        terms = {k: v.detach() for k, v in terms.items()}
        assert float(terms["ratio"]) == pytest.approx(ratio, rel=1e-12)
        assert float(terms["reg"]) == pytest.approx(7.0 * (ratio - 0.5) ** 2, rel=1e-9)
        grad = gn.gate.grad
        # straight through: d reg / d w_c = 2 lambda (r - rho) dr/dm_c, and MACs are bilinear in
        # the widths, so dr/dm_c is the exact change when channel c alone flips
        assert (ratio > 0.5) == (closed_share < 0.5)
        assert bool((torch.sign(grad) == math.copysign(1, ratio - 0.5)).all())   # nonzero, every gate
        stream = max(gn.groups, key=lambda g: gn.sizes[g])
        inner = min(gn.groups, key=lambda g: gn.sizes[g])
        checked = 0
        for g in (stream, inner):
            o, is_open = gn.offsets[g], w[gn.offsets[g]:gn.offsets[g] + gn.sizes[g]] > 0.5
            opened = is_open.nonzero().flatten().tolist()
            closed = (~is_open).nonzero().flatten().tolist()
            for c in (opened[:1] if len(opened) > 1 else []) + closed[:1]:   # a layer keeps one channel
                on, off = dict(keep), dict(keep)
                on[g] = torch.tensor(sorted(set(opened) | {c}), dtype=torch.long)
                off[g] = torch.tensor(sorted(set(opened) - {c}), dtype=torch.long)
                flip = (cost.exact(on) - cost.exact(off)) / base
                assert float(grad[o + c]) == pytest.approx(2 * 7.0 * (ratio - 0.5) * flip, rel=1e-6)
                checked += 1
        assert checked >= 2
    # one joint step moves the gates against that gradient plus CE's (SGD, no momentum yet)
    s2 = PaS(cifar_resnet20(num_classes=10), 0.2, example_inputs=x, lr=0.0, gate_lr=0.1, gate_range=None,
             min_width=False, device="cpu")
    batch = (torch.randn(8, 3, SIZE, SIZE, generator=gen), torch.randint(0, 10, (8,), generator=gen))
    s2.gn.train()
    loss = nn.functional.cross_entropy(s2.gn(batch[0]), batch[1]) + s2.regulariser()["reg"]
    grad, = torch.autograd.grad(loss, s2.gn.gate)
    before = s2.gn.gate.detach().clone()
    s2.step(batch)
    assert torch.allclose(s2.gn.gate.detach(), before - 0.1 * grad, atol=1e-6)


E2E = ["resnet18", "mobilenet_v2", "efficientnet_b0", "vgg11_bn", "densenet121", "cifar_resnet20", "repvgg_a0"]


def _build(name):
    torch.manual_seed(0)
    if name == "cifar_resnet20":
        return cifar_resnet20(num_classes=10), ("nasprune.models.cifar_resnet20", {"num_classes": 10})
    if name == "repvgg_a0":
        return repvgg_a0(cifar=True), (None, None)
    return getattr(torchvision.models, name)(num_classes=10), (f"torchvision.models.{name}", {"num_classes": 10})


def _rel(reference, out):
    return float((out - reference).abs().max() / max(1.0, float(reference.abs().max())))


@pytest.mark.parametrize("name", E2E)
def test_search_export_eval_save_load_at_cifar_size(name, tmp_path):
    model, (constructor, kwargs) = _build(name)
    # gates near the threshold and a large gate step, so that two steps close some channels
    s = PaS(model, 0.5, input_size=32, device="cpu", gate_init=0.52, gate_lr=1.0, lr=0.01)
    g = torch.Generator().manual_seed(0)
    batch = lambda: (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))  # noqa: E731
    for _ in range(2):
        metrics = s.step(batch())
        s.global_step += 1
    assert math.isfinite(float(metrics["loss"]))
    mask = s.mask().detach()
    assert 0 < float(mask.mean()) < 1                      # the search closed some gates, not all
    probe = torch.randn(2, 3, 32, 32, generator=g)
    s.gn.eval()
    # the mask exported as it is: the export equals the gated network at its binary gates
    threshold = s.gn.keep("threshold", threshold=0.5)
    assert torch.equal(s.gn.keep_vector(threshold).float(), mask)
    with torch.no_grad():
        reference = s.gn(probe)
        assert _rel(reference, s.export(threshold)(probe)) <= 1e-4
    # the default export (threshold, or the budget correction) equals the gated network at its keep
    keep, how = s.keep()
    net = s.export()
    x = torch.zeros(1, 3, 32, 32)
    assert abs(flops.count(net, x) / flops.count(model, x) - 0.5) <= 0.03, how
    with torch.no_grad(), gates_as(s.gn, s.gn.keep_vector(keep).float()):
        reference = s.gn(probe)
        out = net(probe)
    assert _rel(reference, out) <= 1e-4
    arch = s.architecture()
    assert arch["selected_by"] == how
    check_record_and_round_trip("pas", model, net, arch, x, probe, tmp_path / "pruned.safetensors",
                                constructor, kwargs)


def test_repvgg_search_export_reparameterises_to_a_plain_network():
    model = repvgg_a0(cifar=True)
    s = PaS(model, 0.5, input_size=32, device="cpu", gate_init=0.52, gate_lr=1.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        s.step((torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)))
    slimmed = s.export()
    assert isinstance(slimmed, RepVGG) and slimmed.widths() != model.widths()
    deploy = slimmed.reparameterize().eval()
    probe = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        reference, out = slimmed(probe), deploy(probe)
    assert float((out - reference).abs().max() / reference.abs().max()) <= 1e-5
    kinds = {type(m) for m in deploy.modules()}
    assert kinds <= {RepVGG, RepVGGBlock, nn.Sequential, nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Linear}
    convs = [m for m in deploy.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(model.blocks()) and all(c.kernel_size == (3, 3) for c in convs)
    assert [c.out_channels for c in convs] == slimmed.widths()


def test_search_killed_mid_epoch_resumes_to_the_same_gates_and_weights(digits, tmp_path):
    """MobileNetV2 (dropout in its classifier: the searcher's own RNG state is checkpointed)."""
    train, _ = digits
    data = train.subset(range(0, len(train), 4))           # 359 images: 5 steps an epoch at batch 64
    kw = dict(input_size=SIZE, device="cpu", seed=5, gate_lr=0.1)

    def searcher():
        torch.manual_seed(0)
        return PaS(torchvision.models.mobilenet_v2(num_classes=10), 0.5, **kw)
    full = searcher()
    arch_full = full.search(data, epochs=2, batch_size=64)
    ckpt = tmp_path / "pas.safetensors"
    with pytest.raises(KeyboardInterrupt):
        searcher().search(data, epochs=2, batch_size=64, checkpoint=ckpt, checkpoint_every=2, callbacks=[Kill(7)])
    torch.manual_seed(123)                                   # the caller's RNG plays no part
    again = searcher()
    arch = again.search(data, epochs=2, batch_size=64, checkpoint=ckpt, resume=True)
    assert arch == arch_full and again.history == full.history
    state, reference = again.gn.state_dict(), full.gn.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert float((full.gn.gate.detach() != 1.0).double().mean()) > 0    # the gates moved


def test_arguments_are_checked():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="placement must be one of tied, untied"):
        PaS(cifar_resnet20(), 0.5, example_inputs=x, placement="post-add")
    with pytest.raises(ValueError, match="no residual shortcut"):
        PaS(torchvision.models.vgg11_bn(num_classes=10), 0.5, input_size=32, placement="untied")
    with pytest.raises(ValueError, match="fraction of MACs kept"):
        PaS(cifar_resnet20(), 1.5, example_inputs=x)
    with pytest.raises(ValueError, match="gate_floor"):
        PaS(cifar_resnet20(), 0.5, example_inputs=x, gate_floor=0.5)
    s = PaS(cifar_resnet20(), 0.5, example_inputs=x, device="cpu")
    with pytest.raises(ValueError, match="no val_data"):
        s.loaders([], [], 4)


@pytest.mark.parametrize("placement", ["tied", "untied"])
def test_command_line_searches_a_cifar_repvgg(tmp_path, capsys, placement):
    """`nasprune search --method pas --model repvgg_a0`: the CIFAR RepVGG-A0 searched, exported
    within the tolerance of the target, fine-tuned and saved so that nasprune.load rebuilds it.
    Untied (`--placement untied`, one gate per block): the export is the untied network, and
    its deploy form a plain RepVGG whose blocks of a stage have widths of their own."""
    import json
    from nasprune import cli
    from nasprune.graph.untie import Untied
    assert {"cost_weight", "flops_tolerance", "search_lr", "gate_lr", "placement"} <= \
        {o.dest for o in cli.METHODS["pas"].options}
    out = tmp_path / "run"
    rc = cli.main(["search", "--method", "pas", "--model", "repvgg_a0", "--data", "digits", "--image-size", "16",
                   "--epochs", "1", "--baseline-epochs", "1", "--finetune-epochs", "1", "--batch-size", "128",
                   "--gate-lr", "0.1", "--out", str(out), "--no-progress", "--device", "cpu",
                   "--placement", placement])
    assert rc == 0
    arch = json.loads((out / "architecture.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert arch["method"] == "pas" and metrics["pruned"]["flops"] == arch["macs"]
    assert abs(arch["macs"] / metrics["baseline"]["flops"] - 0.5) <= 0.03
    loaded = nasprune.load(out / "model.safetensors")
    assert flops.count(loaded, torch.zeros(1, 3, SIZE, SIZE)) == arch["macs"]
    if placement == "untied":
        assert isinstance(loaded, Untied) and isinstance(loaded.model, RepVGG)
        assert arch["tied_macs"] > arch["macs"]
    else:
        assert isinstance(loaded, RepVGG) and "tied_macs" not in arch
    # the deploy form beside it: plain 3x3 convs with bias, the same function, the same accuracy
    deployed = nasprune.load(out / "deployed.safetensors")
    dep = metrics["deployed"]
    assert isinstance(deployed, RepVGG) and deployed.constructor_kwargs["deploy"]
    assert all(m.kernel_size == (3, 3) and m.bias is not None for m in deployed.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    widths = (loaded.model if placement == "untied" else loaded).widths()
    assert deployed.widths() == widths and dep["max_rel_err"] <= 1e-5
    if placement == "untied":                       # some stage's blocks differ in width
        stages = [[b.out_channels for b in stage] for stage in deployed.stages]
        assert any(len(set(widths_of)) > 1 for widths_of in stages)
    assert abs(dep["acc"] - metrics["pruned"]["acc"]) <= 0.01
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        ref, got = loaded.eval()(x), deployed.eval()(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert "deployed" in capsys.readouterr().out


def test_round_to_keeps_widths_in_multiples():
    # before any search every gate is at 1, so the keep is the budget correction's; with
    # round_to=8 each group keeps a multiple of 8 channels (or all of them), within the budget
    torch.manual_seed(0)
    model = cifar_resnet20(num_classes=10)
    s = PaS(model, 0.5, input_size=32, device="cpu", round_to=8)
    keep, how = s.keep()
    assert how == "budget" and keep
    assert all(len(idx) % 8 == 0 for idx in keep.values()), {g: len(i) for g, i in keep.items()}
    net = s.export()
    x = torch.zeros(1, 3, 32, 32)
    assert flops.count(net, x) <= 0.5 * flops.count(model, x)
    with pytest.raises(ValueError, match="round_to"):
        PaS(model, 0.5, input_size=32, device="cpu", round_to=0)
