"""AST (issue 17): ThreshNet learns a synthetic reward (its advantage is not identically zero),
the keep-mass sampling rule, the map-back is exact (the target equals the sub-network at the kept
positions and nothing else moved), the slimmed sub-network equals the masked full-width target,
the budget holds on digits for MACs and parameters budgets, search -> export -> eval -> save ->
load on six models at CIFAR size, and a killed search resumes to the same result."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

import nasprune
from nasprune import flops, slim
from nasprune.data import ImageDataset, load_dataset
from nasprune.models import cifar_resnet20
from nasprune.search import AST
from nasprune.search.ast_search import THRESHOLDS, mass_count
from tests.search._export_check import check_record_and_round_trip
from tests.search._kill import Kill

SIZE = 16


@pytest.fixture(scope="module")
def digits():
    return load_dataset(None, size=SIZE)


def _stage_targets(s):
    """The synthetic reward's paid threshold per group: one per resolution stage of the group."""
    stage = s._static[:, 2:].argmax(1)
    return torch.tensor([0, 2, 5, 1, 4, 3])[stage]


@pytest.mark.parametrize("seed", [0, 1])
def test_policy_learns_a_threshold_per_group(seed):
    s = AST(cifar_resnet20(), 0.5, input_size=SIZE, device="cpu", seed=seed)
    features = s.policy_features()
    groups = features.shape[0]
    star = _stage_targets(s)
    assert len(set(star.tolist())) == 3                      # ResNet-20: three stages, three answers
    assert torch.allclose(s.policy_probs(features), torch.full((groups, len(THRESHOLDS)), 1 / len(THRESHOLDS)))
    advantages, reached = [], None
    for update in range(1, 1501):
        actions = s.sample_actions(features)
        reward = float((actions == star).double().mean())    # pays the group's own threshold only
        advantages.append(s.reinforce(features, actions, reward)["advantage"])
        if bool((s.policy_probs(features)[torch.arange(groups), star] > 0.9).all()):
            reached = update
            break
    assert reached is not None, s.policy_probs(features)[torch.arange(groups), star]
    assert advantages[0] == 0 and sum(a != 0 for a in advantages) > len(advantages) // 2


def test_sampling_keeps_the_smallest_mass_set():
    s = AST(cifar_resnet20(), 0.5, input_size=SIZE, device="cpu", noise=0.0)
    gn = s.gn
    theta = torch.tensor([THRESHOLDS[i % len(THRESHOLDS)] for i in range(len(gn.groups))], dtype=torch.float64)
    keep = s.sample_keep(theta)
    alpha = gn.gate.detach().double()
    for i, g in enumerate(gn.groups):
        a = alpha[gn.offsets[g]:gn.offsets[g] + gn.sizes[g]]
        p = torch.softmax(a, 0).sort(descending=True)
        n = int(torch.nonzero(p.values.cumsum(0) >= theta[i] - 1e-12)[0]) + 1     # smallest prefix reaching theta
        assert n == mass_count(a, float(theta[i]))
        kept = keep.get(g, torch.arange(gn.sizes[g]))
        assert sorted(kept.tolist()) == sorted(p.indices[:n].tolist()), g
        if n > 1:
            assert float(p.values[:n - 1].sum()) < theta[i] <= float(p.values[:n].sum()) + 1e-12
    assert mass_count(torch.zeros(10), 0.6) == 6 and mass_count(torch.tensor([9.0, 0, 0]), 0.6) == 1


def test_round_to_rounds_the_sampled_widths_down():
    """Warm start, no noise: every group's mass count is ceil(theta * width); round_to=8 takes it
    down to a multiple of 8 (at least 8). Only the member rules (the option-A shortcuts hold part
    of a group: each member layer keeps a channel, and a multiple of round_to) may move it."""
    widths, costs = {}, {}
    for r in (1, 8):
        s = AST(cifar_resnet20(), 0.5, input_size=SIZE, device="cpu", start="warm", noise=0.0, round_to=r)
        theta = torch.full((len(s.gn.groups),), 0.7, dtype=torch.float64)
        keep = s.sample_keep(theta)
        widths[r] = {g: len(keep.get(g, range(s.gn.sizes[g]))) for g in s.gn.groups}
        costs[r] = s.cost(keep)
    gn = s.gn
    for g in gn.groups:
        n = math.ceil(0.7 * gn.sizes[g] - 1e-9)                     # alpha all 1: uniform softmax
        members = len(gn.graph.groups[g].members)
        assert 0 <= widths[1][g] - n <= members, (g, widths[1][g], n)
        rounded = max(8, n - n % 8)
        assert 0 <= widths[8][g] - rounded <= members, (g, widths[8][g], rounded)
    assert sum(w % 8 == 0 for w in widths[8].values()) >= len(gn.groups) - 3
    assert costs[8] < costs[1]


def test_map_back_is_exact_and_the_subnet_equals_the_masked_target():
    torch.manual_seed(0)
    s = AST(cifar_resnet20(), 0.5, input_size=SIZE, device="cpu")
    gn = s.gn
    s._begin_subnet()
    sub = s.sub
    assert 0 < sub.cost < 1 and sub.keep
    x = torch.randn(4, 3, SIZE, SIZE)
    # the slimmed sub-network computes the full-width target with the removed channels masked
    gn.eval(), sub.gn.eval()
    gn.gate_fn.sample(gn.keep_vector(sub.keep).float())
    with torch.no_grad():
        masked, slimmed = gn(x), sub.gn(x)
    gn.gate_fn.sample(None)
    assert float((masked - slimmed).abs().max()) <= 1e-4 * float(masked.abs().max())
    # a sub-network mapped back unchanged leaves the target as it was
    before = {k: v.clone() for k, v in gn.state_dict().items()}
    sub.map_back()
    assert all(torch.equal(before[k], v) for k, v in gn.state_dict().items())
    # new values everywhere in the sub-network: mapped back, they sit exactly at the kept positions
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in list(sub.gn.model.state_dict().values()) + [sub.gn.gate]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 2.0)       # no value any target entry holds
    sub.map_back()
    after = gn.state_dict()
    mine = sub.gn.model.state_dict()
    rebuilt = slim.apply(gn.model, gn.graph, sub.keep).state_dict()
    changed = 0
    for key, value in mine.items():
        if value.is_floating_point():
            assert torch.equal(rebuilt[key], value), key                     # kept positions: the sub-net's
            changed += int((after["model." + key] != before["model." + key]).sum())
            assert changed and value.numel() <= after["model." + key].numel()
    assert changed == sum(v.numel() for v in mine.values() if v.is_floating_point())   # nothing else moved
    kept = gn.keep_vector(sub.keep).bool()
    assert torch.equal(torch.sort(after["gate"][kept]).values, torch.sort(sub.gn.gate.detach()).values)
    assert torch.equal(after["gate"][~kept], before["gate"][~kept])


@pytest.mark.parametrize("budget", ["macs", "params"])
def test_budget_holds_on_digits(digits, budget):
    train, test = digits
    torch.manual_seed(0)
    model = cifar_resnet20(num_classes=10)
    kw = {"flops_target": 0.5} if budget == "macs" else {"params_target": 0.5}
    s = AST(model, **kw, input_size=SIZE, device="cpu", subnets=6)
    arch = s.search(train, epochs=4, batch_size=64)
    net = s.export()
    x = torch.zeros(1, 3, SIZE, SIZE)
    base = flops.count(model, x) if budget == "macs" else flops.count_params(model)
    cost = flops.count(net, x) if budget == "macs" else flops.count_params(net)
    assert arch["macs"] == flops.count(net, x) and arch["params"] == flops.count_params(net)
    assert arch["selected_by"] == "subnet" and len(s.episodes) == 6
    chosen = s.episodes[arch["subnet"]]
    assert cost / base == pytest.approx(chosen["cost"], abs=1e-9)
    assert 0.5 - 0.25 <= cost / base <= 0.5, cost / base
    assert all(e["reward"] == pytest.approx(-e["val_loss"] - 2 * max(0, e["cost"] - 0.5) / 0.5) for e in s.episodes)
    # the selected sub-network is exported with its own trained weights: far above chance
    assert nasprune.train.evaluate(net, test)["acc"] > 0.4
    # fill_budget: the same sub-network topped up by alpha to just under the budget
    s.fill_budget = True
    keep, how = s.keep()
    filled = s.export()
    filled_cost = (flops.count(filled, x) / base) if budget == "macs" else flops.count_params(filled) / base
    assert how == "subnet" and chosen["cost"] < filled_cost <= 0.5
    assert filled_cost == pytest.approx(s.cost(keep), abs=1e-9) and filled_cost > 0.5 - 0.02, filled_cost
    sub_vector, filled_vector = s.gn.keep_vector(chosen_keep := s.best["keep"]), s.gn.keep_vector(keep)
    assert bool((filled_vector >= sub_vector).all()) and chosen_keep is s.best["keep"]   # a superset
    assert s.architecture()["subnet_cost"] == chosen["cost"]


def _random_data(n=40, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return ImageDataset(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                        (np.arange(n) % 10).astype(np.int64), tuple(str(i) for i in range(10)))


E2E = ["resnet18", "mobilenet_v2", "efficientnet_b0", "vgg11_bn", "densenet121", "cifar_resnet20"]


def _build(name):
    torch.manual_seed(0)
    if name == "cifar_resnet20":
        return cifar_resnet20(num_classes=10), ("nasprune.models.cifar_resnet20", {"num_classes": 10})
    return getattr(torchvision.models, name)(num_classes=10), (f"torchvision.models.{name}", {"num_classes": 10})


@pytest.mark.parametrize("name", E2E)
def test_search_export_eval_save_load_at_cifar_size(name, tmp_path):
    model, (constructor, kwargs) = _build(name)
    s = AST(model, 0.7, input_size=32, device="cpu", start="warm", subnets=2, val_batches=1,
            thresholds=(0.7, 0.75, 0.8))
    arch = s.search(_random_data(), epochs=1, batch_size=8)
    assert len(s.episodes) == 2 and all(math.isfinite(e["reward"]) for e in s.episodes)
    keep, how = s.keep()
    net = s.export()
    x = torch.zeros(1, 3, 32, 32)
    assert flops.count(net, x) / flops.count(model, x) <= 0.7 + 1e-9, how
    probe = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gn = s.gn
    if how == "subnet":                           # the export is the best sub-network, mapped back
        gn.load_state_dict(s.best["state"])
    gn.eval()
    gn.gate_fn.sample(gn.keep_vector(keep).float())
    with torch.no_grad():
        reference, out = gn(probe), net(probe)
    gn.gate_fn.sample(None)
    assert float((out - reference).abs().max()) <= 1e-4 * max(1.0, float(reference.abs().max()))
    if how == "subnet":                           # topped up: the masked snapshot at the larger keep
        s.fill_budget = True
        filled_keep, filled = s.keep()[0], s.export()
        assert s.cost(keep) <= s.cost(filled_keep) <= 0.7 + 1e-9
        gn.gate_fn.sample(gn.keep_vector(filled_keep).float())
        with torch.no_grad():
            reference, out = gn(probe), filled(probe)
        gn.gate_fn.sample(None)
        assert float((out - reference).abs().max()) <= 1e-4 * max(1.0, float(reference.abs().max()))
        s.fill_budget = False
    check_record_and_round_trip("ast", model, net, arch, x, probe, tmp_path / "pruned.safetensors",
                                constructor, kwargs)


def test_search_killed_mid_subnet_resumes_to_the_same_result(digits, tmp_path):
    train, _ = digits
    data = train.subset(range(0, len(train), 2))                 # 719 images: 8 weight steps an epoch
    kw = dict(input_size=SIZE, device="cpu", seed=3, subnets=4, val_batches=2)

    def searcher():
        torch.manual_seed(0)
        return AST(cifar_resnet20(num_classes=10), 0.5, **kw)
    full = searcher()
    arch_full = full.search(data, epochs=2, batch_size=64)
    assert full.coarse_steps == 3 and full.total_steps == 16
    ckpt = tmp_path / "ast.safetensors"
    with pytest.raises(KeyboardInterrupt):       # checkpoint at step 8, inside sub-network 1 (steps 6-8)
        searcher().search(data, epochs=2, batch_size=64, checkpoint=ckpt, checkpoint_every=4, callbacks=[Kill(10)])
    torch.manual_seed(123)
    again = searcher()
    arch = again.search(data, epochs=2, batch_size=64, checkpoint=ckpt, resume=True)
    assert arch == arch_full and again.history == full.history and again.episodes == full.episodes
    state, reference = again.gn.state_dict(), full.gn.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    # the policy to the last bits: at 2 threads its small matmuls on the resumed (freshly loaded)
    # tensors may round differently by one ulp (1.5e-8 on weights of 0.2 seen); 1 thread: equal
    for a, b in zip(again.policy.state_dict().values(), full.policy.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert len({tuple(e["thresholds"]) for e in full.episodes}) > 1


def test_robust_mode_trains_the_subnets_by_kd():
    teacher = cifar_resnet20(num_classes=10).eval()
    s = AST(cifar_resnet20(num_classes=10), 0.5, input_size=SIZE, device="cpu", teacher=teacher)
    s._begin_subnet()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (8,), generator=g)
    s.sub.gn.train()
    with torch.no_grad():
        expected = nasprune.train.kd_loss(s.sub.gn(x), teacher(x), y, 0.9, 4.0)
    loss, _ = s._loss(s.sub.gn, x, y)
    assert s.config["robust"] and float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(s.sub.gn(x), y)
    assert float(loss.detach()) != pytest.approx(float(ce), rel=1e-3)


def test_arguments_are_checked(digits):
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="one budget"):
        AST(cifar_resnet20(), 0.5, params_target=0.5, example_inputs=x)
    with pytest.raises(ValueError, match="thresholds"):
        AST(cifar_resnet20(), 0.5, example_inputs=x, thresholds=(0.8, 0.6))
    with pytest.raises(ValueError, match="start"):
        AST(cifar_resnet20(), 0.5, example_inputs=x, start="hot")
    with pytest.raises(TypeError, match="teacher"):
        AST(cifar_resnet20(), 0.5, example_inputs=x, teacher="resnet20")
    s = AST(cifar_resnet20(), 0.5, input_size=SIZE, device="cpu", subnets=50)
    with pytest.raises(ValueError, match="fewer than subnets=50"):
        s.search(digits[0], epochs=1, batch_size=256)


def test_command_line_searches_with_a_cold_start(tmp_path):
    """`nasprune search --method ast`: a cold-start search on digits, the best sub-network within
    the budget exported, fine-tuned (robust: KD) and saved so that nasprune.load rebuilds it."""
    import json
    from nasprune import cli
    assert {"warm_start", "robust", "params_target", "subnets", "policy_lr", "select_band", "fill_budget",
            "round_to"} <= {o.dest for o in cli.METHODS["ast"].options}
    out = tmp_path / "run"
    rc = cli.main(["search", "--method", "ast", "--model", "resnet20", "--data", "digits", "--image-size", "16",
                   "--epochs", "2", "--baseline-epochs", "1", "--finetune-epochs", "1", "--batch-size", "128",
                   "--subnets", "3", "--robust", "--fill-budget", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    arch = json.loads((out / "architecture.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert arch["method"] == "ast" and arch["selected_by"] == "subnet" and metrics["pruned"]["flops"] == arch["macs"]
    assert arch["macs"] <= 0.5 * metrics["baseline"]["flops"]
    # --fill-budget: the chosen sub-network topped up to just under the budget
    assert arch["subnet_cost"] < arch["macs"] / arch["base_macs"] and arch["macs"] > 0.48 * arch["base_macs"]
    assert "topped up from" in (out / "log.txt").read_text()
    loaded = nasprune.load(out / "model.safetensors")
    assert flops.count(loaded, torch.zeros(1, 3, SIZE, SIZE)) == arch["macs"]
