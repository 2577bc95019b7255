"""nasprune.search.GatedNetwork: sites, packed gates, cost, keep rules, export (issue 12).

The contract on every torchvision classification model (all gates at one equal the model; 0/1
gates equal slim.mask / slim.apply and the cost model; continuous gates export exactly) is
checked by the model sweep (tests/slim/test_sweep.py::test_gated_network); this file checks the
API on small models in detail.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import nasprune
from nasprune import flops, slim
from nasprune.flops import CostModel
from nasprune.models import cifar_resnet
from nasprune.search.gated import GatedNetwork

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slim"))
import zoo  # noqa: E402


@pytest.fixture(scope="module")
def resnet20a():
    model, x = zoo.build("cifar_resnet20A")
    return model, x, GatedNetwork(model, x)


def _binary(gn, keep):
    v = gn.keep_vector(keep)
    gn.set_gates({g: v[o:o + gn.sizes[g]] for g, o in gn.offsets.items()})


def test_sites_follow_the_rules():
    """ResNet: every conv-BN(-ReLU) is fused; MobileNetV2: gates after ReLU6 fold into the
    layers they feed, projections (BN, no activation) are fused with identity."""
    model, x = zoo.build("cifar_resnet20A")
    gn = GatedNetwork(model, x)
    sites = gn.site_info["train"]
    assert len(sites) == 19 and all(s.kind == "fused" for s in sites)
    assert {s.act for s in sites if s.module.endswith("bn1")} == {"relu"}  # conv1 -> bn1 -> relu
    assert {s.act for s in sites if s.module.endswith("bn2")} == {"identity"}  # bn2 -> add -> relu
    assert gn.groups == [g.index for g in gn.graph.prunable_groups]
    stream = max(gn.graph.prunable_groups, key=lambda g: g.size)
    assert stream.size == 64  # option A nests the 16- and 32-channel streams in the 64-channel one
    partial = [s for s in sites if s.module == "layer1.0.bn2"][0]
    o = gn.offsets[stream.index]
    held = gn.graph.group_of("layer1.0.bn2", "channel")[0]
    assert held.index == stream.index and partial.index.numel() == 16
    assert set(partial.index.tolist()) < set(range(o, o + 64))  # gathered: 16 of the 64 gates

    mobile = torchvision.models.mobilenet_v2(num_classes=10)
    gm = GatedNetwork(mobile, torch.zeros(1, 3, 32, 32))
    kinds = {(s.kind, s.fold, s.act) for s in gm.site_info["train"]}
    assert kinds == {("gate", "consumers", ""), ("fused", "affine", "identity")}
    after_relu6 = [s for s in gm.site_info["train"] if s.kind == "gate"]
    assert all(s.consumers and None not in s.consumers for s in after_relu6)


class _ThreeBlocks(nn.Module):
    """A RepVGG stem and two blocks with identity branches: shallow, so fp32 rounding stays far
    below what a wrong gradient would show."""

    def __init__(self):
        super().__init__()
        from nasprune.models import RepVGGBlock
        self.stem, self.b1, self.b2 = RepVGGBlock(3, 8), RepVGGBlock(8, 8), RepVGGBlock(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


def _train_step_of(gn, x, values):
    with torch.no_grad():
        gn.gate.copy_(values)
    gn.train()
    out = gn(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in gn.named_parameters() if p.grad is not None}
    gn.eval()
    with torch.no_grad():
        return out.detach(), gn(x), grads


@pytest.mark.parametrize("name", ["repvgg", "densenet121", "three_blocks"])
def test_norms_fed_by_no_conv_are_fused_and_equal_plain_batch_norm(name):
    """RepVGG's identity-branch BN and DenseNet's norms after a concatenation run as one fused
    BN-act-gate call (channel_stats and the gate epilogue, not nn.BatchNorm2d and a gate); in
    training (batch statistics, running statistics updated) and in eval the network equals the
    unfused one; on a shallow network so do the gradients and the running statistics."""
    from nasprune.models import repvgg_a0
    from nasprune.search.gated import _NormSite
    torch.manual_seed(0)
    if name == "repvgg":
        model, x = zoo.randomize(repvgg_a0(cifar=True, num_classes=10)), torch.randn(4, 3, 32, 32)
    elif name == "three_blocks":
        model, x = zoo.randomize(_ThreeBlocks()), torch.randn(16, 3, 8, 8)
    else:
        model, x = zoo.build(name)
    fused, plain = GatedNetwork(model, x), GatedNetwork(model, x, fuse=False)
    norm_sites = [s for s in fused.site_info["train"] if isinstance(fused.sites[s.name], _NormSite)]
    assert norm_sites and all(s.kind == "fused" and s.fold == "affine" for s in norm_sites)
    if name == "densenet121":   # the norm before each dense layer's first conv, then its ReLU
        assert {s.act for s in norm_sites} == {"relu"}
    else:                       # every identity branch: all sites fused, no stand-alone gate
        ids = [n for n, m in model.named_modules() if n.endswith("identity") and isinstance(m, nn.BatchNorm2d)]
        assert sorted(s.module for s in norm_sites) == sorted(ids)
        assert all(s.kind == "fused" for s in fused.site_info["train"])
    values = torch.rand(fused.num_gates, generator=torch.Generator().manual_seed(2)) + 0.5
    (train_a, eval_a, grads_a), (train_b, eval_b, grads_b) = (_train_step_of(gn, x, values) for gn in (fused, plain))
    assert zoo.max_rel_diff(train_a, train_b) <= 1e-4 and zoo.max_rel_diff(eval_a, eval_b) <= 1e-4
    if name != "three_blocks":  # 22 random blocks amplify rounding: 0.3 % on the gradients either way
        return
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert zoo.max_rel_diff(grads_a[n], grads_b[n]) <= 1e-5, n
    for s in norm_sites:        # running statistics updated as nn.BatchNorm2d updates them
        a, b = (dict(gn.model.named_modules())[s.module] for gn in (fused, plain))
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
        assert torch.allclose(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)


def test_all_ones_equals_model_and_gate_gradient(resnet20a):
    model, x, gn = resnet20a
    gn.set_gates({g: torch.ones(gn.sizes[g]) for g in gn.groups})
    model.eval(), gn.eval()
    with torch.no_grad():
        assert zoo.max_rel_diff(model(x), gn(x)) <= 1e-5
    # the gate gradient is d loss / d g = sum over the channel's sites of dy * (gated value)
    probe = torch.zeros(gn.num_gates, requires_grad=True)
    loss = gn._modes["train"](x, nasprune_gates=torch.cat([probe + 1, torch.ones(1)])).square().sum()
    (autograd,) = torch.autograd.grad(loss, probe)
    eps = 1e-2
    for slot in (0, 17, gn.num_gates - 1):
        bumped = torch.ones(gn.num_gates + 1)
        bumped[slot] += eps
        with torch.no_grad():
            up = gn._modes["train"](x, nasprune_gates=bumped).square().sum()
            bumped[slot] -= 2 * eps
            down = gn._modes["train"](x, nasprune_gates=bumped).square().sum()
        assert float(autograd[slot]) == pytest.approx(float(up - down) / (2 * eps), rel=2e-2, abs=1e-3)


def test_expected_cost_is_per_channel_and_matches_the_cost_model():
    model, x = zoo.build("cifar_resnet20B")  # no partial members: CostModel.expected is exact too
    gn = GatedNetwork(model, x, gate="sigmoid")
    g = torch.Generator().manual_seed(0)
    gn.set_gates({gi: torch.randn(gn.sizes[gi], generator=g) for gi in gn.groups})
    kept = {gi: v.sum() for gi, v in gn.gate_values().items()}
    macs = gn.expected_macs()
    assert float(macs) == pytest.approx(float(CostModel(gn.graph).expected(kept)), rel=1e-6)  # fp32 there
    macs.backward()
    assert gn.gate.grad is not None and bool((gn.gate.grad > 0).all())  # more channels, more MACs
    assert float(gn.expected_macs(torch.ones(gn.num_gates))) == gn.base_macs == flops.count(model, x[:1])
    assert float(gn.expected_params(torch.ones(gn.num_gates))) == gn.base_params == flops.count_params(model)


def test_binary_gates_equal_slimming_and_exact_cost(resnet20a):
    model, x, gn = resnet20a
    keep = zoo.random_keep(gn.graph, 7)
    _binary(gn, keep)
    slimmed = slim.apply(model, gn.graph, keep)
    model.eval(), gn.eval()
    with torch.no_grad():
        assert zoo.max_rel_diff(gn(x), slimmed(x)) <= 1e-5
    assert float(gn.expected_macs()) == CostModel(gn.graph).exact(keep) == flops.count(slimmed, x)
    assert float(gn.expected_params()) == flops.count_params(slimmed)


@pytest.mark.parametrize("name", ["cifar_resnet20A", "mobilenet_v2"])
def test_slot_map_carries_gates_to_the_slimmed_network(name):
    # The slimmed network's gates read from the full one's through slot_map: both networks
    # compute the same function (FFP's slimmed scoring and AST's sub-networks rest on it).
    model, x = zoo.build(name)
    gn = GatedNetwork(model, x, gate="continuous")
    keep = zoo.random_keep(gn.graph, 3)
    kept = gn.keep_vector(keep)
    with torch.no_grad():
        gn.gate.copy_(torch.rand(gn.num_gates, generator=torch.Generator().manual_seed(0)).add(0.5) * kept)
    small = GatedNetwork(slim.apply(model, gn.graph, keep), x, gate="continuous")
    slots = gn.slot_map(small, kept)
    assert slots.shape == (small.num_gates,) and bool((kept[slots] == 1).all())
    assert slots.unique().numel() == small.num_gates == int(kept.sum())
    with torch.no_grad():
        small.gate.copy_(gn.gate[slots])
        gn.eval(), small.eval()
        assert zoo.max_rel_diff(small(x), gn(x)) <= 1e-5
    with pytest.raises(ValueError, match=f"{gn.num_gates - 1} entries"):
        gn.slot_map(small, kept[:-1])
    with pytest.raises(ValueError, match="keeps .* channels, the slimmed network has"):
        gn.slot_map(small, torch.ones(gn.num_gates))


def test_export_folds_continuous_gates_and_saves(tmp_path, resnet20a):
    model, x, gn = resnet20a
    g = torch.Generator().manual_seed(1)
    gn.set_gates({gi: 0.2 + 0.8 * torch.rand(gn.sizes[gi], generator=g) for gi in gn.groups})
    first = gn.groups[0]
    values = gn.gate.detach().clone()
    values[gn.offsets[first]:gn.offsets[first] + 5] = 0  # five channels closed: the export cuts them
    with torch.no_grad():
        gn.gate.copy_(values)
    gn.eval()
    exported = gn.export()
    assert type(exported) is type(model) and not exported.training
    assert exported.linear.in_features == gn.sizes[first] - 5  # the head reads the whole stream
    with torch.no_grad():
        assert zoo.max_rel_diff(gn(x), exported(x)) <= 1e-5
    nasprune.save(exported, tmp_path / "m.safetensors")
    loaded = nasprune.load(tmp_path / "m.safetensors", base_model=cifar_resnet.CifarResNet(20, shortcut="A"))
    with torch.no_grad():
        assert zoo.max_rel_diff(loaded.eval()(x), exported(x)) == 0
    gn.set_gates({first: -torch.ones(gn.sizes[first])})
    with pytest.raises(ValueError, match="negative"):
        gn.export()


@pytest.mark.parametrize("round_to", [1, 4])
def test_keep_rules(resnet20a, round_to):
    model, x, gn = resnet20a
    g = torch.Generator().manual_seed(2)
    gn.set_gates({gi: torch.rand(gn.sizes[gi], generator=g) for gi in gn.groups})
    values = gn.gate_values()
    keep = gn.keep("threshold", threshold=0.5, round_to=round_to)
    for gi, idx in keep.items():
        if round_to == 1:
            assert set(idx.tolist()) >= set((values[gi] > 0.5).nonzero().flatten().tolist()) or len(idx) == 1
        else:
            assert len(idx) % round_to == 0 or len(idx) == gn.sizes[gi]
    topk = gn.keep("topk", k=0.5)
    for gi, idx in topk.items():
        v = values[gi].detach()
        assert float(v[idx].min()) >= float(torch.topk(v, gn.sizes[gi] // 2).values.min()) - 1e-7
    for target in (0.3, 0.6):
        budget = gn.keep("budget", macs=target, round_to=round_to)
        exact = CostModel(gn.graph).exact(budget)
        assert exact <= target * gn.base_macs
        assert exact >= (target - 0.1) * gn.base_macs  # the budget is used, not wasted
        slim.apply(model, gn.graph, budget)  # every member keeps a channel: the keep set is valid


@pytest.mark.parametrize("round_to", [8, 16])
def test_round_to_holds_at_every_layer_of_a_stream(resnet20a, round_to):
    """The option-A residual stream is one group whose layers hold 16, 32 and 64 of its channels:
    with round_to every layer of it keeps a multiple (or all it holds), not only the group; the
    slimmed network (whose stage-2 shortcut may now pad no channels at all) traces, gates and
    computes as the masked one."""
    model, x, gn = resnet20a
    g = torch.Generator().manual_seed(3)
    for trial in range(4):
        gn.set_gates({gi: torch.rand(gn.sizes[gi], generator=g) for gi in gn.groups})
        for keep in (gn.keep("topk", k=0.4 + 0.1 * trial, round_to=round_to),
                     gn.keep("budget", macs=0.5, round_to=round_to)):
            for gi, idx in keep.items():
                chosen = set(idx.tolist())
                for m in gn.graph.groups[gi].members:
                    held = m.index_map.channels.tolist()
                    kept = len(chosen.intersection(held))
                    assert kept % round_to == 0 or kept == len(held), (gi, len(held), kept)
            slimmed = slim.apply(model, gn.graph, keep)
            widths = {mm.out_channels for mm in slimmed.modules() if isinstance(mm, nn.Conv2d)}
            assert all(w % round_to == 0 for w in widths), widths
            sub = GatedNetwork(slimmed, x)
            _binary(gn, keep)
            gn.eval(), sub.eval(), model.eval()
            with torch.no_grad():
                want = gn(x)
                assert torch.allclose(sub(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    gn.set_gates({gi: torch.ones(gn.sizes[gi]) for gi in gn.groups})


def test_round_members_on_random_chains():
    """`_round_members` on random nested members (a chain, as a residual stream's layers are):
    every member ends at a multiple of round_to, at least one, or at its full width."""
    import random
    from nasprune.slim.uniform import _round_members
    rng = random.Random(0)
    for _ in range(2000):
        size, r = rng.randint(2, 40), rng.choice([2, 4, 8])
        base = rng.sample(range(size), size)
        members = [sorted(base[:k]) for k in sorted(rng.sample(range(1, size + 1), rng.randint(1, min(4, size))))]
        order = rng.sample(range(size), size)
        chosen = set(order[:rng.randint(1, size)])
        _round_members(chosen, members, order, r)
        for h in members:
            k = len(chosen.intersection(h))
            assert (k % r == 0 and k > 0) or k == len(h), (members, r, sorted(chosen))


def test_layernorm_groups_are_reported_not_gated():
    model = torchvision.models.convnext_tiny(num_classes=10)
    gn = GatedNetwork(model, torch.zeros(1, 3, 32, 32))
    assert gn.ungated and all("LayerNorm" in why for why in gn.ungated.values())
    assert set(gn.ungated).isdisjoint(gn.groups) and gn.groups  # the MLP widths are gated
    with pytest.raises(KeyError, match="normalises across its channels"):
        gn.set_gates({next(iter(gn.ungated)): torch.ones(3)})


def test_bad_input_is_named(resnet20a):
    _, _, gn = resnet20a
    g = gn.groups[0]
    with pytest.raises(ValueError, match=f"group {g} has {gn.sizes[g]} channels"):
        gn.set_gates({g: torch.ones(3)})
    with pytest.raises(ValueError, match="nonzero, threshold, topk or budget"):
        gn.keep("largest")
    with pytest.raises(ValueError, match="exactly one of macs= or params="):
        gn.keep("budget")


def test_state_dict_is_the_models_plus_the_gates(resnet20a):
    model, x, gn = resnet20a
    keys = set(gn.state_dict())
    assert keys == {f"model.{k}" for k in model.state_dict()} | {"gate"}
    twin = GatedNetwork(model, x)
    twin.load_state_dict(gn.state_dict())
    gn.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(gn(x), twin(x))


def test_threshold_gates_train_through_straight_through(resnet20a):
    model, x, _ = resnet20a
    gn = GatedNetwork(model, x, gate="threshold")
    assert set(gn.gate_fn(gn.gate).unique().tolist()) == {1.0}
    out = gn.train()(x)
    (out.square().sum() + gn.expected_macs() / gn.base_macs).backward()
    assert gn.gate.grad is not None and bool(torch.isfinite(gn.gate.grad).all())
    assert float(gn.gate.grad.abs().sum()) > 0


def test_user_model_untouched(resnet20a):
    model, x, gn = resnet20a
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gn.train()(x)
    gn.export(keep={})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _contract_on(device, name, fuse):
    """All gates at one equal the model in eval and train (outputs and input gradients),
    binary gates equal slim.apply, and the gate gradient equals the CPU network's."""
    model, x = zoo.build(name)
    model, x = model.to(device), x.to(device)
    gn = GatedNetwork(model, x, fuse=fuse)
    for mode in (True, False):
        model.train(mode), gn.train(mode)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # one dropout mask for both
            torch.manual_seed(0)
            ya = model(xa)
            torch.manual_seed(0)
            yb = gn(xb)
        ya.square().sum().backward(), yb.square().sum().backward()
        assert zoo.max_rel_diff(ya, yb) <= (1e-4 if mode else 1e-5), f"train={mode}"
        # channels-last and NCHW round differently; in training a batch of 2 spreads a flipped
        # ReLU through BatchNorm's backward (see tests/slim/test_sweep.py GATED_TOL)
        assert zoo.max_rel_diff(xa.grad, xb.grad) <= (0.2 if mode else 1e-3), f"train={mode}"
    model.eval(), gn.eval()
    keep = {g: i for g, i in zoo.random_keep(gn.graph, 3).items() if g in gn.offsets}
    _binary(gn, keep)
    with torch.no_grad():
        assert zoo.max_rel_diff(gn(x), slim.apply(model, gn.graph, keep)(x)) <= 1e-4
    cpu = GatedNetwork(model.cpu(), x.cpu(), fuse=fuse).eval()
    g = torch.Generator().manual_seed(1)
    values = {gi: 0.5 + torch.rand(gn.sizes[gi], generator=g) for gi in gn.groups}
    gn.set_gates({k: v.to(device) for k, v in values.items()}), cpu.set_gates(values)
    for net, inp in ((gn, x), (cpu, x.cpu())):
        net.gate.grad = None
        net(inp).square().sum().backward()
    assert zoo.max_rel_diff(gn.gate.grad.cpu(), cpu.gate.grad) <= 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cifar_resnet20A", "mobilenet_v2"])
@pytest.mark.parametrize("fuse", [True, False])
def test_on_cuda_equals_the_model_and_slimming(name, fuse):
    """The gated network on a GPU (the fused epilogue's CUDA kernels, channels-last), in strict
    fp32 (no TF32; PyTorch lets cuDNN use it by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _contract_on("cuda", name, fuse)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class _InPlaceBlock(nn.Module):
    """A residual block adding into its input in place (``s.add_(...)``, ReLU(inplace=True)): the
    suffix a candidate resumes writes a value computed before its first changed layer."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        s = self.relu(self.bn0(self.conv0(x)))
        s = s.add_(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(s))))))
        return self.fc(self.relu(s).mean((2, 3)))


@pytest.mark.parametrize("name", ["cifar_resnet20A", "inplace"])
def test_forward_candidates_equal_one_forward_each(resnet20a, name):
    """Candidates resumed from the reference's activations (cached or recomputed) equal one
    forward each, batch statistics included, on a residual stream whose gate is shared by
    several producers and on a graph with in-place ops; an unchanged candidate and one that
    changes two groups too."""
    from nasprune.search.gated_searcher import gates_as
    if name == "inplace":
        torch.manual_seed(0)
        model, x = _InPlaceBlock(), torch.randn(6, 3, 8, 8)
        gn = GatedNetwork(model, x[:1])
    else:
        model, x, gn = resnet20a
        gn.set_gates({g: torch.ones(gn.sizes[g]) for g in gn.groups})
    g = torch.Generator().manual_seed(3)
    reference = (torch.rand(gn.num_gates, generator=g) > 0.2).float()
    with torch.no_grad():
        gn.gate.copy_(reference)
    candidates = [reference.clone()]
    for gi in gn.groups:                       # each group's first channel and a random one closed
        v = reference.clone()
        v[gn.offsets[gi] + torch.tensor([0, int(torch.randint(gn.sizes[gi], (1,), generator=g))])] = 0
        candidates.append(v)
    both = candidates[-1].clone()
    both[gn.offsets[gn.groups[0]]:gn.offsets[gn.groups[0]] + gn.sizes[gn.groups[0]]] = 0.5
    candidates.append(both)
    shared = {gi for gi in gn.groups if len({s.name for s in gn.site_info["train"]
                                             if bool((s.index >= gn.offsets[gi]).any() &
                                                     (s.index < gn.offsets[gi] + gn.sizes[gi]).any())}) > 1}
    assert shared                               # a group gated at several sites (the residual stream)
    for mode in ("train", "eval"):
        gn.train(mode == "train")
        stats = {k: v.clone() for k, v in gn.named_buffers() if "running" in k}
        with torch.no_grad():
            expected = []
            for v in candidates:
                with gates_as(gn, v):
                    expected.append(gn(x))
            for k, v in stats.items():
                gn.get_buffer(k).copy_(v)
            out, cache = gn.forward_and_cache(x)
            assert torch.equal(out, gn(x)) and cache.nbytes > 0
            cached = gn.forward_candidates(x, candidates=candidates, cache=cache)
            fresh = gn.forward_candidates(x, candidates=candidates)
        for want, a, b in zip(expected, cached, fresh):
            assert torch.allclose(a, want, rtol=1e-5, atol=1e-6) and torch.allclose(b, want, rtol=1e-5, atol=1e-6)
        with torch.no_grad():                   # the cache was not written by the candidates' runs
            again = gn.forward_candidates(x, candidates=candidates[1:2], cache=cache)[0]
        assert torch.allclose(again, expected[1], rtol=1e-5, atol=1e-6)
    gn.train()
    with pytest.raises(ValueError, match="other gate values"):
        gn.forward_candidates(x, candidates=candidates[:1], reference=candidates[1], cache=cache)
    gn.set_gates({gi: torch.ones(gn.sizes[gi]) for gi in gn.groups})


class _Shifted(nn.Module):
    """conv-BN-ReLU, then a shift before the next conv: a closed channel reaches conv2 as the
    shift, 0.5 or a learnable one that starts at zero (the probe must not take it for a zero)."""

    def __init__(self, learnable: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48)
        self.conv2, self.bn2 = nn.Conv2d(48, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48)
        self.fc = nn.Linear(48, 3)
        self.shift = nn.Parameter(torch.zeros(1, 48, 1, 1)) if learnable else None

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + (0.5 if self.shift is None else self.shift)
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def _skip_counted(gn, x, monkeypatch):
    """(output, gradients, running statistics, calls of the skipping conv) of one training step."""
    from nasprune.nn import gated_conv
    calls = []
    apply = gated_conv._SkipClosed.apply
    monkeypatch.setattr(gated_conv._SkipClosed, "apply", lambda *a: calls.append(a) or apply(*a))
    gn.train()
    torch.manual_seed(1)            # the same dropout masks
    out = gn(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in gn.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in gn.named_buffers() if "running" in n}
    monkeypatch.undo()
    return out.detach(), grads, stats, calls


@pytest.mark.parametrize("name", ["repvgg", "cifar_resnet20A", "mobilenet_v2", "densenet121", "efficientnet_b0",
                                  "shifted", "shifted_by_zero"])
def test_skipping_closed_channels_equals_the_dense_network(name, monkeypatch):
    """Binary (threshold) gates, half of them closed: skipping what the closed channels make zero
    (the closed conv inputs the probe allows, the backward of closed outputs) gives the dense
    network's outputs, gradients and running statistics. The probe allows every conv input
    reached from gates alone, none reached through x + 0.5 or x + a parameter that is still zero."""
    from nasprune.models import repvgg_a0
    from nasprune.search.gated import _FusedSite
    if name == "repvgg":
        model, x = zoo.randomize(repvgg_a0(cifar=True, num_classes=10)), torch.randn(4, 3, 32, 32)
    elif name.startswith("shifted"):
        model, x = zoo.randomize(_Shifted(learnable=name == "shifted_by_zero")), torch.randn(4, 3, 8, 8)
        if model.shift is not None:
            nn.init.zeros_(model.shift)     # as trained from scratch: zero until the first step
    else:
        model, x = zoo.build(name)
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    gn = GatedNetwork(model, x[:1], gate="threshold")
    assert gn.skip_closed is None                        # the default: on, on the CPU
    with torch.no_grad():
        gn.gate.copy_(torch.rand(gn.num_gates, generator=torch.Generator().manual_seed(2)))
    sites = [s for s in gn.sites.values() if isinstance(s, _FusedSite)]
    probed = {n: s.in_slots is not None for n, s in gn.sites.items() if isinstance(s, _FusedSite)}
    dense_gn = copy.deepcopy(gn)
    dense_gn.skip_closed = False
    out, grads, stats, calls = _skip_counted(gn, x, monkeypatch)
    out_d, grads_d, stats_d, calls_d = _skip_counted(dense_gn, x, monkeypatch)
    assert calls and not calls_d
    if name.startswith("shifted"):
        assert list(probed.values()) == [False, False]   # conv1 reads the image, conv2 x + shift
        assert all(a[2] is None and a[3] is not None for a in calls)   # closed outputs skipped
    else:   # every fused conv with a gated input (not the image's) may skip its closed inputs
        gated_input = {n: bool((s._conv_in_slots < gn.num_gates).any()) for n, s in gn.sites.items()
                       if isinstance(s, _FusedSite)}
        assert probed == gated_input and sum(probed.values()) >= len(sites) - 2
        assert any(a[2] is not None for a in calls)
    if name == "repvgg":    # a block's 3x3 and 1x1 branches share one gathered input
        gathered = [a[4] for a in calls if a[4] is not None]
        assert len({id(t) for t in gathered}) <= len(gathered) // 2 + 1
    assert zoo.max_rel_diff(out, out_d) <= 1e-5
    assert grads.keys() == grads_d.keys()
    top = max(float(g.abs().max()) for g in grads_d.values())
    for n in grads_d:       # rounding alone (the skipped products are zero), through 17-54 layers
        scale = max(float(grads_d[n].abs().max()), 1e-3 * top)
        assert float((grads[n] - grads_d[n]).abs().max()) <= 1e-3 * scale, n
    for n in stats_d:
        torch.testing.assert_close(stats[n], stats_d[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cifar_resnet20A", "mobilenet_v2"])
def test_skipping_closed_channels_on_cuda(name, monkeypatch):
    """skip_closed=True on a GPU (off by default there): the dense network's outputs and
    gradients, in strict fp32 (no TF32)."""
    model, _ = zoo.build(name)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    gn = GatedNetwork(model, x[:1], gate="threshold", skip_closed=True)
    with torch.no_grad():
        gn.gate.copy_(torch.rand(gn.num_gates, generator=torch.Generator().manual_seed(2)))
    dense_gn = copy.deepcopy(gn)
    dense_gn.skip_closed = False
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out, grads, _, calls = _skip_counted(gn.cuda(), x.cuda(), monkeypatch)
        out_d, grads_d, _, calls_d = _skip_counted(dense_gn.cuda(), x.cuda(), monkeypatch)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert calls and not calls_d and any(a[2] is not None for a in calls)
    assert zoo.max_rel_diff(out.cpu(), out_d.cpu()) <= 1e-5
    top = max(float(g.abs().max()) for g in grads_d.values())
    for n in grads_d:
        scale = max(float(grads_d[n].abs().max()), 1e-3 * top)
        assert float((grads[n] - grads_d[n]).abs().max()) <= 1e-3 * scale, n
