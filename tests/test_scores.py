"""nasprune.scores: each criterion against its fp64 definition, group aggregation (plain group lists,
a duck-typed channel graph and, when present, nasprune.graph), and selection: exact ratios,
deterministic ties, zero filters, minimum widths, partial members, thresholds, FFP's Otsu step."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from nasprune import scores as S
from nasprune.nn import GatedConvBNAct2d


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.act = nn.ReLU()
        self.bn3 = nn.BatchNorm2d(6)  # after a ReLU: not conv3's BatchNorm
        self.up = nn.ConvTranspose2d(6, 4, 2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = self.bn3(self.act(self.conv3(x)))
        return self.fc(self.up(x).mean((2, 3)))


def _net():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.weight.normal_()
        net.conv1.weight[2] = 0  # a zero filter
    return net


def _rows(w):
    return w.detach().double().reshape(w.shape[0], -1)


def test_scored_layers_and_their_batch_norms():
    net = _net()
    assert list(S.scored_layers(net)) == ["conv1", "dw", "conv3", "fc"]  # no transposed conv
    bns = S.following_bn(net)
    assert bns == {"conv1": net.bn1, "dw": net.bn2}


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "fpgm"])
def test_weight_criteria_match_definition(criterion):
    net = _net()
    got = S.filter_scores(net, criterion)
    layers = S.scored_layers(net)
    if criterion == "bn":
        expected = {"conv1": net.bn1.weight.double().abs(), "dw": net.bn2.weight.double().abs()}
    else:
        expected = {}
        for name, m in layers.items():
            rows = _rows(m.weight)
            if criterion == "l1":
                expected[name] = rows.abs().sum(1)
            elif criterion == "l2":
                expected[name] = rows.square().sum(1).sqrt()
            else:  # sum of distances to every other filter
                expected[name] = torch.stack([sum(((rows[i] - rows[j]).square().sum().sqrt()
                                                   for j in range(rows.shape[0]))) for i in range(rows.shape[0])])
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == torch.float32 and not got[name].requires_grad
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-4, atol=1e-6)
    if criterion in ("l1", "l2"):
        assert got["conv1"][2] == 0


def test_taylor_matches_definition_and_needs_gradients():
    net = _net()
    with pytest.raises(ValueError, match="needs weight gradients"):
        S.filter_scores(net, "taylor")
    net(torch.randn(2, 3, 6, 6)).square().sum().backward()
    got = S.filter_scores(net, "taylor")
    for name, m in S.scored_layers(net).items():
        expected = (_rows(m.weight) * _rows(m.weight.grad)).sum(1).abs()
        torch.testing.assert_close(got[name].double(), expected, rtol=1e-5, atol=1e-7)


def test_activation_taylor_from_gated_layers():
    torch.manual_seed(0)
    net = nn.Sequential(GatedConvBNAct2d(3, 6, 3, padding=1), GatedConvBNAct2d(6, 4, 3, padding=1))
    with pytest.raises(ValueError, match="track_activation_taylor"):
        S.filter_scores(net, "activation_taylor")
    assert S.track_activation_taylor(net) == 2
    outs = []
    expected = {"0.conv": torch.zeros(6, dtype=torch.float64), "1.conv": torch.zeros(4, dtype=torch.float64)}
    for _ in range(2):
        x = torch.randn(3, 3, 6, 6)
        h = net[0](x)
        h.retain_grad()
        y = net[1](h)
        y.retain_grad()
        (y.cos() * torch.randn_like(y)).sum().backward()
        expected["0.conv"] += (h.grad.double() * h.double()).sum((0, 2, 3)).abs()
        expected["1.conv"] += (y.grad.double() * y.double()).sum((0, 2, 3)).abs()
        outs.append(y)
    got = S.filter_scores(net, "activation_taylor")
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-5, atol=1e-6)
    S.track_activation_taylor(net, False)
    assert all(not m._taylor_on for m in net)


def test_fused_call_covers_mixed_dtypes():
    net = _net()
    net.fc.half()
    got = S.filter_scores(net, "l1")
    torch.testing.assert_close(got["fc"].double(), _rows(net.fc.weight).abs().sum(1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# group aggregation


def _layer_scores():
    return {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0]),
            "c": torch.tensor([5.0, 6.0])}


def _groups():
    # group 0: a and b produce the same 4 channels, b in reverse order; c holds channels 1 and 3
    # group 1: only c, but its channels 0, 1 in that order
    return [[("a", torch.tensor([0, 1, 2, 3])), ("b", torch.tensor([3, 2, 1, 0])),
             ("c", torch.tensor([-1, 0, -1, 1]))],
            [("c", torch.tensor([1, 0]))]]


@pytest.mark.parametrize("reduce,expected", [
    ("mean", [(1 + 40) / 2, (2 + 30 + 5) / 3, (3 + 20) / 2, (4 + 10 + 6) / 3]),
    ("sum", [41, 37, 23, 20]),
    ("max", [40, 30, 20, 10]),
])
def test_group_reduction(reduce, expected):
    gs = S.group_scores(_layer_scores(), _groups(), reduce=reduce)
    torch.testing.assert_close(gs[0], torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(gs[1], torch.tensor([6.0, 5.0]))
    assert gs.prunable == {0: True, 1: True}
    assert [p.tolist() for p in gs.partial[0]] == [[1, 3]]


def test_normalised_per_layer_before_aggregation():
    gs = S.group_scores(_layer_scores(), _groups(), reduce="sum", normalize="max")
    a = torch.tensor([1, 2, 3, 4]) / 4
    b = torch.tensor([40, 30, 20, 10]) / 40
    c = torch.tensor([0, 5, 0, 6]) / 6
    torch.testing.assert_close(gs[0], (a + b + c).float())
    for how, fn in (("mean", lambda s: s / s.mean()), ("sum", lambda s: s / s.sum()),
                    ("minmax", lambda s: (s - s.min()) / (s.max() - s.min()))):
        out = S.normalize_scores({"x": torch.tensor([1.0, 3.0, 4.0]), "z": torch.zeros(3)}, how)
        torch.testing.assert_close(out["x"], fn(torch.tensor([1.0, 3.0, 4.0])))
        assert torch.equal(out["z"], torch.zeros(3))  # nothing to divide by: left alone


def test_unscored_channels_are_nan_and_kept():
    gs = S.group_scores({"a": torch.tensor([1.0, 2.0])}, [[("a", torch.tensor([0, -1, 1]))]])
    assert torch.isnan(gs[0][1]) and gs[0][0] == 1 and gs[0][2] == 2
    keep = S.select(gs, method="layer", prune_ratio=0.5)
    assert keep[0].tolist() == [1, 2]  # NaN channel 1 stays; of the rest, the better one


def _graph():
    """The shape of a nasprune.graph ChannelGraph: groups with members and index maps."""
    def member(module, role, channels, positions):
        return SimpleNamespace(module=module, role=role, index_map=SimpleNamespace(
            channels=torch.tensor(channels), positions=torch.tensor(positions)))
    g0 = SimpleNamespace(index=0, size=4, prunable=True, members=[
        member("conv", "out", [0, 1, 2, 3], [[0], [1], [2], [3]]),
        member("bn", "channel", [0, 1, 2, 3], [[0], [1], [2], [3]]),
        member("grouped", "out", [0, 1, 2, 3], [[0, 4], [1, 5], [2, 6], [3, -1]]),  # stripes
        member("next", "in", [0, 1, 2, 3], [[0], [1], [2], [3]])])
    g1 = SimpleNamespace(index=1, size=2, prunable=False, members=[
        member("fc", "out", [0, 1], [[0], [1]])])
    return SimpleNamespace(groups=[g0, g1])


def test_duck_typed_channel_graph():
    scores = {"conv": torch.tensor([1.0, 2.0, 3.0, 4.0]), "bn": torch.full((4,), 100.0),
              "grouped": torch.arange(7, dtype=torch.float32), "next": torch.full((4,), 100.0),
              "fc": torch.tensor([1.0, 2.0])}
    gs = S.group_scores(scores, _graph(), reduce="mean")
    # only producers count; a striped member contributes every position it holds
    torch.testing.assert_close(gs[0], torch.tensor([(1 + 0 + 4) / 3, (2 + 1 + 5) / 3,
                                                    (3 + 2 + 6) / 3, (4 + 3) / 2]))
    keep = S.select(gs, method="global", prune_ratio=0.5)
    assert list(keep) == [0]  # group 1 cannot be pruned: left out
    assert keep[0].tolist() == [2, 3]


def test_gated_layer_member_matches_its_conv_scores():
    gs = S.group_scores({"blk.conv": torch.tensor([3.0, 1.0])},
                        [[("blk", torch.tensor([0, 1]))]])
    torch.testing.assert_close(gs[0], torch.tensor([3.0, 1.0]))


def test_with_nasprune_graph_and_slim():
    graph_mod = pytest.importorskip("nasprune.graph")
    slim = pytest.importorskip("nasprune.slim")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    graph = graph_mod.trace(model, x)
    keep = S.keep_indices(model, graph, "l1", method="global", prune_ratio=0.3)
    prunable = [g for g in graph.groups if g.prunable]
    assert set(keep) == {g.index for g in prunable}
    total = sum(g.size for g in prunable)
    assert total - sum(k.numel() for k in keep.values()) == round(0.3 * total)
    slimmed = slim.apply(model, graph, keep)
    assert slimmed(x).shape == (1, 10)


def test_with_nested_residual_groups():
    """Option-A CIFAR ResNet: the residual stream is one group whose early members hold only some
    of its channels; every member keeps at least one, and slimming succeeds."""
    graph_mod = pytest.importorskip("nasprune.graph")
    slim = pytest.importorskip("nasprune.slim")
    models = pytest.importorskip("nasprune.models")
    torch.manual_seed(0)
    model = models.cifar_resnet20().eval()
    x = torch.randn(1, 3, 32, 32)
    graph = graph_mod.trace(model, x)
    for criterion in ("l2", "bn", "fpgm"):
        keep = S.keep_indices(model, graph, criterion, method="layer", prune_ratio=0.9)
        for g in graph.prunable_groups:
            for m in g.members:
                assert set(m.index_map.channels.tolist()) & set(keep[g.index].tolist())
        assert slim.apply(model, graph, keep)(x).shape == (1, 10)


# ---------------------------------------------------------------------------------------------
# selection


def _random_groups(seed=0, sizes=(16, 7, 32, 5, 64)):
    g = torch.Generator().manual_seed(seed)
    return {i: torch.rand(s, generator=g) for i, s in enumerate(sizes)}


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.73, 0.9])
def test_global_ratio_is_exact_and_removes_the_lowest(ratio):
    gs = _random_groups()
    keep = S.select(gs, method="global", prune_ratio=ratio)
    total = sum(s.numel() for s in gs.values())
    removed = {(g, c) for g, s in gs.items() for c in range(s.numel()) if c not in keep[g].tolist()}
    assert len(removed) == math.floor(ratio * total + 0.5)
    # every removed channel scores below every kept removable one (the top channel of a group
    # is kept by min_width=1)
    kept_scores = [float(gs[g][c]) for g in gs for c in keep[g].tolist()
                   if c != int(gs[g].argmax())]
    if removed and kept_scores:
        assert max(float(gs[g][c]) for g, c in removed) <= min(kept_scores)
    for g in gs:
        assert keep[g].numel() >= 1 and torch.equal(keep[g], keep[g].sort().values)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.77])
def test_layer_ratio_is_exact_per_group(ratio):
    gs = _random_groups()
    keep = S.select(gs, method="layer", prune_ratio=ratio)
    for g, s in gs.items():
        n = s.numel()
        assert keep[g].numel() == n - min(math.floor(ratio * n + 0.5), n - 1)
        kept = set(keep[g].tolist())
        assert all(s[c] <= s[k] for c in range(n) if c not in kept for k in kept)


def test_ties_are_deterministic_and_keep_leading_channels():
    gs = {0: torch.ones(8), 1: torch.ones(8)}
    keep = S.select(gs, method="layer", prune_ratio=0.5)
    assert keep[0].tolist() == [0, 1, 2, 3] and keep[1].tolist() == [0, 1, 2, 3]
    # across groups the higher group index loses first
    keep = S.select(gs, method="global", prune_ratio=0.25)
    assert keep[0].tolist() == list(range(8)) and keep[1].tolist() == [0, 1, 2, 3]
    # the same answer every time, whatever the score tensor's dtype or device-side order
    for _ in range(3):
        again = S.select({0: torch.ones(8, dtype=torch.float64), 1: torch.ones(8)},
                         method="global", prune_ratio=0.25)
        assert all(torch.equal(again[g], keep[g]) for g in keep)


def test_zero_filters_go_first():
    s = torch.tensor([0.5, 0.0, 0.7, 0.0, 0.2])
    assert S.select({0: s}, method="layer", prune_ratio=0.4)[0].tolist() == [0, 2, 4]
    assert S.select({0: s}, method="layer", prune_ratio=0.6)[0].tolist() == [0, 2]


def test_min_width_and_infeasible_global_ratio():
    gs = {0: torch.tensor([0.1, 0.2, 0.3, 0.4]), 1: torch.tensor([5.0, 6.0, 7.0, 8.0])}
    keep = S.select(gs, method="global", prune_ratio=0.375, min_width=2)  # 3 of 8
    assert keep[0].tolist() == [2, 3] and keep[1].tolist() == [1, 2, 3]
    keep = S.select(gs, method="layer", prune_ratio=0.75, min_width=0.5)
    assert keep[0].tolist() == [2, 3] and keep[1].tolist() == [2, 3]
    with pytest.raises(ValueError, match="cannot remove 6 of 8 channels"):
        S.select(gs, method="global", prune_ratio=0.75, min_width=2)


def test_partial_members_keep_a_channel():
    gs = S.group_scores({"a": torch.tensor([1.0, 2.0, 9.0, 8.0]), "c": torch.tensor([0.5, 0.1])},
                        [[("a", torch.tensor([0, 1, 2, 3])), ("c", torch.tensor([0, 1, -1, -1]))]],
                        reduce="max")
    keep = S.select(gs, method="layer", prune_ratio=0.75)
    # 3 to remove, but channel 2 (the best) and channel 1 (c's best, so c keeps one) stay
    assert keep[0].tolist() == [1, 2]


def test_threshold_scalar_and_per_group():
    gs = {0: torch.tensor([0.1, 0.5, 0.9]), 1: torch.tensor([0.2, 0.4, 0.6])}
    keep = S.select(gs, method="threshold", threshold=0.45)
    assert keep[0].tolist() == [1, 2] and keep[1].tolist() == [2]
    keep = S.select(gs, method="threshold", threshold={0: 0.95, 1: None})
    assert keep[0].tolist() == [2] and keep[1].tolist() == [0, 1, 2]  # min_width keeps one


def _otsu_by_definition(scores, cut=0.2):
    """The trimmed (20 %) Otsu threshold of methods-2.md section 3 (EKG's coarse filter), one split at
    a time: the oracle of the vectorised ``otsu_threshold``."""
    scores = np.sort(scores)
    trim = int(math.ceil(len(scores) * cut))
    scores = scores[trim:-trim]
    val = []
    for t in range(1, len(scores) - 1):
        w0, w1 = t, len(scores) - t
        m1, m2 = np.mean(scores[:t]), np.mean(scores[t:])
        val.append(w0 * w1 * (m1 - m2) ** 2)
    return (scores[np.argmax(val)] + scores[np.argmax(val) + 1]) / 2


@pytest.mark.parametrize("seed", range(5))
def test_otsu_threshold_matches_its_definition(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(1, 0.2, 20), rng.normal(3, 0.5, 13)])
    assert S.otsu_threshold(values) == pytest.approx(_otsu_by_definition(values), rel=1e-12)
    # two clear clusters: the threshold separates them
    th = S.otsu_threshold(np.r_[np.full(10, 1.0), np.full(10, 5.0)], trim=0)
    assert 1 < th < 5


def test_otsu_threshold_of_too_few_values_is_their_largest():
    # fewer than 3 values left after the trim: everything lies below the threshold (tensor or list)
    assert S.otsu_threshold(torch.tensor([3.0, 1.0, 2.0, 0.5]), trim=0.3) == 3.0
    assert S.otsu_threshold([2.0, 1.0]) == 2.0 and S.otsu_threshold([]) == float("inf")


def test_otsu_step_shrinks_only_groups_below_the_threshold():
    g = torch.Generator().manual_seed(0)
    gs = {i: torch.rand(10, generator=g) * (0.1 if i < 4 else 10) for i in range(10)}
    keep = S.select(gs, method="otsu", step=0.2, trim=0.1)
    sums = [float(gs[i].sort().values[:2].sum()) for i in range(10)]
    th = S.otsu_threshold(sums, trim=0.1)
    for i in range(10):
        assert keep[i].numel() == (8 if sums[i] <= th else 10)
        if keep[i].numel() == 8:
            assert set(keep[i].tolist()) == set(gs[i].argsort(descending=True)[:8].tolist())
    assert all(keep[i].numel() == 8 for i in range(4))  # the low-scored cluster shrinks
    # from current widths: the next step's candidates lie above the channels already gone
    keep2 = S.select(gs, method="otsu", step=0.2, trim=0.1, widths={i: k.numel() for i, k in keep.items()})
    assert all(keep2[i].numel() in (keep[i].numel(), keep[i].numel() - 2) for i in range(10))
    assert all(set(keep2[i].tolist()) <= set(keep[i].tolist()) for i in range(10))


def test_bad_arguments():
    gs = {0: torch.rand(4)}
    with pytest.raises(ValueError, match="method must be one of"):
        S.select(gs, method="random")
    with pytest.raises(ValueError, match=r"needs prune_ratio in \[0, 1\)"):
        S.select(gs, method="global")
    with pytest.raises(ValueError, match="needs threshold="):
        S.select(gs, method="threshold")
    with pytest.raises(ValueError, match="criterion must be one of"):
        S.filter_scores(_net(), "l0")
    with pytest.raises(ValueError, match="reduce must be one of"):
        S.group_scores(_layer_scores(), _groups(), reduce="prod")
    with pytest.raises(ValueError, match="index maps of different lengths"):
        S.group_scores(_layer_scores(), [[("a", torch.tensor([0, 1])), ("b", torch.tensor([0]))]])
