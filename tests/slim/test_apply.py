"""slim.apply / mask / uniform: contract, attributes, an untouched original, clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import nasprune.graph as G
import nasprune.slim as S
from zoo import build, max_rel_diff, random_keep


@pytest.fixture(scope="module")
def resnet20a():
    model, x = build("cifar_resnet20A")
    return model, x, G.trace(model, x)


# light models covering residual, concat, depthwise + SE, shuffle, grouped + SE, LayerNorm
CONTRACT_MODELS = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "regnet_y_400mf",
                   "squeezenet1_1", "efficientnet_b0", "convnext_tiny", "googlenet", "cifar_resnet20A",
                   "cifar_resnet20B"]


@pytest.mark.parametrize("name", CONTRACT_MODELS)
def test_masked_and_slimmed_agree_for_random_keep_sets(name):
    model, x = build(name)
    graph = G.trace(model, x)
    for seed in range(2):
        keep = random_keep(graph, seed)
        with torch.no_grad():
            err = max_rel_diff(S.mask(model, graph, keep)(x), S.apply(model, graph, keep)(x))
        assert err <= 1e-5, f"{name} seed {seed}: {err:.2e}"


def test_slimmed_model_is_the_users_class_with_consistent_attributes(resnet20a):
    model, x, graph = resnet20a
    keep = random_keep(graph, 3)
    slim = S.apply(model, graph, keep)
    assert type(slim) is type(model) and slim is not model
    for name, m in slim.named_modules():
        assert type(m).__module__.startswith(("torch.nn", "nasprune.models")), name
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape == (m.out_channels, m.in_channels // m.groups, *m.kernel_size), name
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,), name
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
    assert slim.nasprune_slim["steps"][0]["keep"] == {str(k): v.tolist() for k, v in sorted(keep.items())}


def test_original_model_is_untouched_and_shares_no_storage(resnet20a):
    model, x, graph = resnet20a
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slim = S.apply(model, graph, random_keep(graph, 0))
    masked = S.mask(model, graph, random_keep(graph, 0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ptrs = {t.data_ptr() for t in model.state_dict().values()}
    for other in (slim, masked):
        assert not ptrs & {t.data_ptr() for t in other.state_dict().values()}
    with torch.no_grad():
        for p in slim.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_keep_set_errors_name_the_group_and_the_value(resnet20a):
    model, x, graph = resnet20a
    g = graph.prunable_groups[0]
    first = g.members[0].module
    cases = [
        ({g.index: torch.tensor([], dtype=torch.long)}, "empty"),
        ({g.index: torch.tensor([0, g.size])}, f"index {g.size} outside"),
        ({g.index: torch.tensor([1, 1, 2])}, "index 1 more than once"),
        ({g.index: torch.tensor([3, 1])}, "sorted"),
        ({g.index: torch.tensor([0.0, 1.0])}, "integer"),
        ({g.index: torch.tensor([True, False])}, "boolean mask"),
        ({len(graph.groups): torch.tensor([0])}, "out of range"),
        ({"a": torch.tensor([0])}, "not a group index"),
    ]
    for keep, message in cases:
        with pytest.raises(S.KeepError, match=message) as info:
            S.apply(model, graph, keep)
        if "group index" not in message and "out of range" not in message:
            assert first in str(info.value)
    fixed = next(gr for gr in graph.groups if not gr.prunable)
    with pytest.raises(S.KeepError, match="cannot be pruned: model output"):
        S.apply(model, graph, {fixed.index: torch.tensor([0])})


def test_keeping_nothing_of_a_layer_is_an_error_naming_it(resnet20a):
    model, x, graph = resnet20a
    stream = graph.group_of("layer1.0.conv2")[0]  # the option-A stream: stage 1 holds 16 of 64
    held = next(m for m in stream.members if m.module == "layer1.0.conv2").index_map.channels
    others = torch.tensor(sorted(set(range(stream.size)) - set(held.tolist())))
    with pytest.raises(S.KeepError, match="every out channel of"):
        S.apply(model, graph, {stream.index: others})


def test_uniform_keeps_the_leading_channels(resnet20a):
    model, x, graph = resnet20a
    keep = S.uniform_keep(graph, 0.5)
    for g in graph.prunable_groups:
        if g.index in keep:
            assert keep[g.index].tolist()[: g.size // 2] == list(range(g.size // 2))
    slim = S.uniform(model, x, 0.5)
    assert slim.layer1[0].conv1.out_channels == 8 and slim.layer3[2].conv2.out_channels == 32
    assert slim.layer3[0].shortcut.before + slim.layer3[0].shortcut.after + 16 == 32
    with pytest.raises(ValueError, match="keep_ratio"):
        S.uniform_keep(graph, 0.0)
    assert all(len(v) % 8 == 0 for v in S.uniform_keep(graph, 0.7, round_to=8).values())


@pytest.mark.parametrize("round_to", [8, 16])
def test_uniform_rounds_every_layer_of_the_stream(resnet20a, round_to):
    """round_to holds at each layer of the option-A stream (16, 32 and 64 of one group), for the
    uniform keep at several ratios and at a MACs target, not only for the group's count."""
    model, x, graph = resnet20a
    keeps = [S.uniform_keep(graph, r, round_to=round_to) for r in (0.4, 0.6, 0.7)]
    keeps.append(S.uniform_keep_at(graph, 0.5, round_to=round_to)[0])
    for keep in keeps:
        widths = {m.out_channels for m in S.apply(model, graph, keep).modules() if isinstance(m, nn.Conv2d)}
        assert all(w % round_to == 0 for w in widths), widths


def test_uniform_keeps_every_layer_of_a_nested_group_alive(resnet20a):
    model, x, graph = resnet20a
    slim = S.apply(model, graph, S.uniform_keep(graph, 0.1))
    assert min(m.out_channels for m in slim.modules() if isinstance(m, nn.Conv2d)) >= 1


@pytest.mark.parametrize("name,round_to", [("cifar_resnet20A", 1), ("mobilenet_v2", 8)])
def test_uniform_at_a_macs_target(name, round_to):
    """The uniform control at a MACs target, counted without re-tracing and equal to flops.count
    of the slimmed model: within 1 % of the target (a CIFAR ResNet-20's 16/32/64-wide groups all
    step at once at one ratio: the step is 5 % of its MACs, so the groups step one at a time),
    no plain ratio closer, every group at int(r * size) or one step more."""
    import nasprune.flops as F
    model, x = build(name)
    total = F.count(model, x)
    graph = G.trace(model, x)
    cost = F.CostModel(graph)
    for target in (0.3, 0.5, 0.7):
        slim = S.uniform_at(model, x, target, round_to=round_to)
        got = F.count(slim, x)
        assert got == round(slim.nasprune_uniform["flops_fraction"] * total)
        keep, ratio = S.uniform_keep_at(graph, target, round_to=round_to, cost=cost)
        assert ratio == slim.nasprune_uniform["keep_ratio"] and cost.exact(keep) == got
        # every ratio near the chosen one at which a group width changes: none lands closer
        steps = {k / g.size for g in graph.prunable_groups for k in range(1, g.size + 1)}
        best = min(abs(cost.exact(S.uniform_keep(graph, r, round_to)) - target * total)
                   for r in steps if abs(r - ratio) < 0.05)
        assert abs(got - target * total) <= best
        assert abs(got / total - target) < 0.01, f"{name} at {target}: {got / total:.4f}"
        plain = S.uniform_keep(graph, ratio, round_to)
        sizes = {g.index: g.size for g in graph.prunable_groups}
        for gi in set(keep) | set(plain):
            n, base = len(keep.get(gi, range(sizes[gi]))), len(plain.get(gi, range(sizes[gi])))
            assert n - base in (0, round_to), f"{name}: group {gi} keeps {n}, the ratio gives {base}"
    with pytest.raises(ValueError, match="flops_target"):
        S.uniform_keep_at(graph, 1.5)


def test_uniform_at_in_a_given_channel_order(resnet20a):
    """order= keeps the first channels of a ranking (the L1 control): the top of the ranking in
    every group, one ranked channel for a member it would empty, the MACs within 1 %."""
    import nasprune.flops as F
    model, x, graph = resnet20a
    cost = F.CostModel(graph)
    g = torch.Generator().manual_seed(0)
    order = {gr.index: torch.randperm(gr.size, generator=g) for gr in graph.prunable_groups}
    keep, ratio = S.uniform_keep_at(graph, 0.5, cost=cost, order=order)
    assert abs(cost.exact(keep) / cost.total() - 0.5) < 0.01
    for gr in graph.prunable_groups:
        kept = set(keep.get(gr.index, torch.arange(gr.size)).tolist())
        ranked = order[gr.index].tolist()
        top = set(ranked[: int(ratio * gr.size)])
        assert top <= kept
        for m in gr.members:  # no member emptied; an extra channel only as a member's best
            held = set(m.index_map.channels.tolist())
            assert kept & held
        extra = kept - set(ranked[: int(ratio * gr.size) + 1])
        assert all(any(c == next(r for r in ranked if r in set(m.index_map.channels.tolist()))
                       for m in gr.members) for c in extra)
    with torch.no_grad():
        assert S.apply(model, graph, keep)(x).shape == model(x).shape


def test_graph_of_another_model_is_refused(resnet20a):
    _, _, graph = resnet20a
    with pytest.raises(ValueError, match="traced from a CifarResNet"):
        S.apply(nn.Sequential(nn.Conv2d(3, 3, 1)), graph, {})
