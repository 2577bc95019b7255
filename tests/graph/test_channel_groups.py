"""Channel groups of small models that each exercise one coupling pattern, checked against
hand-derived structure and, for random keep sets, against the masked reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nasprune.graph as G
import nasprune.slim as S
from zoo import max_rel_diff, random_keep, randomize


def conv_bn(cin, cout, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, **kw), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a(x)
        x = x + self.b(x)
        return self.head(x)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), conv_bn(3, 4), nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


class Chunked(nn.Module):  # a GLU: the halves of a chunk multiply each other
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        p, q = self.a(x).chunk(2, dim=1)
        return self.c(p * torch.sigmoid(q))


class FixedSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(6, 5, 1)

    def forward(self, x):
        p, q = torch.split(self.a(x), [6, 2], dim=1)
        return self.c(p) + q.sum(1, keepdim=True)


class Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.c(self.a(x)[:, :4])


class Depthwise(nn.Module):
    def __init__(self, multiplier=1):
        super().__init__()
        self.a = conv_bn(3, 8)
        self.dw = nn.Conv2d(8, 8 * multiplier, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8 * multiplier)
        self.c = nn.Conv2d(8 * multiplier, 5, 1)

    def forward(self, x):
        return self.c(F.relu(self.bn(self.dw(self.a(x)))))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 16)
        self.g = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 24)
        self.c = nn.Conv2d(24, 5, 1)

    def forward(self, x):
        return self.c(F.relu(self.gn(self.g(self.a(x)))))


class Norms(nn.Module):  # LayerNorm over channels-last, PReLU per channel, Linear after flatten
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.ln = nn.LayerNorm(8)
        self.act = nn.PReLU(8)
        self.fc = nn.Linear(8 * 4 * 4, 6)

    def forward(self, x):
        x = self.a(x)
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(torch.flatten(self.act(x), 1))


class Shuffle(nn.Module):  # torchvision's channel_shuffle, written out
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 4), conv_bn(3, 4), nn.Conv2d(8, 5, 1)
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.c(self.shuffle(y))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 8)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.c = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = self.a(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.c(x * s)


class Decoder(nn.Module):  # ConvTranspose2d, pixel shuffle and an upsample
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.ps_in = nn.Conv2d(6, 16, 1)
        self.ps = nn.PixelShuffle(2)
        self.c = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        x = self.up(self.a(x))
        return self.c(self.ps(self.ps_in(F.relu(x))))


class Tokens(nn.Module):  # embedding + MLP + attention kept whole
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def group_with(graph, module, role="out"):
    groups = graph.group_of(module, role)
    assert len(groups) == 1, groups
    return groups[0]


def members(group):
    return {(m.module, m.role) for m in group.members}


def contract(model, x, seeds=3):
    randomize(model)
    model.eval()
    graph = G.trace(model, x)
    worst = 0.0
    for seed in range(seeds):
        keep = random_keep(graph, seed)
        with torch.no_grad():
            worst = max(worst, max_rel_diff(S.mask(model, graph, keep)(x), S.apply(model, graph, keep)(x)))
    return graph, worst


X = torch.randn(2, 3, 8, 8)


def test_residual_adds_share_one_group():
    graph = G.trace(Residual(), X)
    g = group_with(graph, "stem.0")
    assert {("stem.0", "out"), ("a.0", "out"), ("b.0", "out"), ("stem.1", "channel"),
            ("a.0", "in"), ("b.0", "in"), ("head", "in")} <= members(g)
    assert g.size == 8 and g.prunable
    assert not group_with(graph, "head").prunable  # the model output
    assert group_with(graph, "head").reason == "model output"


def test_concat_maps_each_part_with_its_offset():
    graph = G.trace(Concat(), X)
    ga, gb = group_with(graph, "a.0"), group_with(graph, "b.0")
    pos_a = next(m for m in ga.members if m.module == "c").index_map.positions.view(-1).tolist()
    pos_b = next(m for m in gb.members if m.module == "c").index_map.positions.view(-1).tolist()
    assert pos_a == list(range(8)) and pos_b == list(range(8, 12))


def test_chunk_ties_channel_j_of_each_half():
    graph = G.trace(Chunked(), X)
    g = group_with(graph, "a")
    assert g.size == 4
    out = next(m for m in g.members if m.module == "a" and m.role == "out")
    assert out.index_map.positions.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("model, why", [(FixedSplit(), "split with fixed sizes"),
                                        (Sliced(), "indexing channels with fixed positions")])
def test_fixed_size_channel_ops_block_the_group(model, why):
    graph = G.trace(model, X)
    g = group_with(graph, "a")
    assert not g.prunable and why in g.reason


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_passes_channels_through(multiplier):
    graph = G.trace(Depthwise(multiplier), X)
    g = group_with(graph, "a.0")
    assert ("dw", "out") in members(g) and ("bn", "channel") in members(g) and ("c", "in") in members(g)
    dw_out = next(m for m in g.members if m.module == "dw" and m.role == "out")
    assert dw_out.index_map.positions.shape == (8, multiplier)
    keep = {g.index: torch.tensor([1, 5, 6])}
    slim = S.apply(Depthwise(multiplier), G.trace(Depthwise(multiplier), X), keep)
    assert (slim.dw.in_channels, slim.dw.out_channels, slim.dw.groups) == (3, 3 * multiplier, 3)


def test_grouped_conv_keeps_its_group_count():
    model = Grouped()
    graph = G.trace(model, X)
    g_in, g_out = group_with(graph, "a.0"), group_with(graph, "g")
    assert g_in.size == 4 and g_out.size == 6  # channel j of each of the 4 groups goes together
    slim = S.apply(model, graph, {g_in.index: torch.tensor([0, 3]), g_out.index: torch.tensor([1, 2, 5])})
    assert (slim.g.in_channels, slim.g.out_channels, slim.g.groups) == (8, 12, 4)
    assert (slim.gn.num_channels, slim.gn.num_groups) == (12, 4)


def test_layernorm_prelu_and_flatten_into_linear():
    graph = G.trace(Norms(), X)
    g = group_with(graph, "a")
    assert {("ln", "channel"), ("act", "channel"), ("fc", "in")} <= members(g)
    fc = next(m for m in g.members if m.module == "fc")
    assert fc.index_map.positions.shape == (8, 16)  # each channel spread over 4x4 positions
    assert fc.index_map.positions[1].tolist() == list(range(16, 32))


def test_channel_shuffle_ties_channels_across_shuffle_groups():
    graph = G.trace(Shuffle(), X)
    ga, gb = group_with(graph, "a.0"), group_with(graph, "b.0")
    # each shuffle ties channel j of its first half to channel j of its second half; after
    # the two shuffles the 8 channels fall into 2 classes of 4 (a0,b0,a2,b2 / a1,b1,a3,b3)
    assert ga is gb and ga.size == 2
    a_out = next(m for m in ga.members if m.module == "a.0" and m.role == "out")
    assert a_out.index_map.positions.tolist() == [[0, 2], [1, 3]]


def test_squeeze_excitation_couples_the_scale_with_the_features():
    graph = G.trace(SqueezeExcite(), X)
    g = group_with(graph, "a.0")
    assert ("fc2", "out") in members(g) and ("fc1", "in") in members(g)


def test_conv_transpose_and_pixel_shuffle():
    graph = G.trace(Decoder(), X)
    assert ("up", "in") in members(group_with(graph, "a.0"))
    ps = group_with(graph, "ps_in")
    assert ps.size == 4  # 4 blocks of 2x2 input channels make the 4 shuffled channels
    slim = S.apply(Decoder(), G.trace(Decoder(), X), {ps.index: torch.tensor([0, 2])})
    assert slim.ps_in.out_channels == 8 and slim.c.in_channels == 2


def test_attention_is_kept_whole_and_the_mlp_is_prunable():
    ids = torch.randint(0, 20, (2, 5))
    graph = G.trace(Tokens(), ids)
    assert not group_with(graph, "emb").prunable
    assert "MultiheadAttention" in group_with(graph, "emb").reason
    assert group_with(graph, "mlp.0").prunable and group_with(graph, "mlp.0").size == 16


@pytest.mark.parametrize("factory, x", [
    (Residual, X), (Concat, X), (Chunked, X), (lambda: Depthwise(2), X), (Grouped, X), (Norms, X),
    (Shuffle, X), (SqueezeExcite, X), (Decoder, X), (Tokens, torch.randint(0, 20, (2, 5)))])
def test_masked_and_slimmed_agree(factory, x):
    graph, worst = contract(factory(), x)
    assert graph.prunable_groups
    assert worst <= 1e-5


def test_exclude_keeps_a_layer_and_reports_it():
    model = Residual()
    graph = G.trace(model, X, exclude=[model.a[0]])
    g = group_with(graph, "stem.0")
    assert not g.prunable and g.reason == "excluded layer a.0"
    with pytest.raises(ValueError, match="not a submodule"):
        G.trace(model, X, exclude=["nope"])


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.conv(x)
        return -self.conv(x)


class WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.odd, self.b = nn.Conv2d(3, 8, 1), Untraceable(), nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(self.odd(self.a(x)))))


def test_untraceable_submodule_becomes_a_reported_leaf():
    graph = G.trace(WithUntraceable(), X)
    assert list(graph.leaves) == ["odd"] and "TraceError" in graph.leaves["odd"]
    assert not group_with(graph, "a").prunable  # what enters the opaque module must stay
    assert group_with(graph, "b").prunable      # what comes after it is still prunable
    assert "odd" in graph.summary()


def test_untraceable_top_level_model_raises_naming_the_model():
    with pytest.raises(G.TraceError, match="Untraceable"):
        G.trace(Untraceable(), torch.randn(1, 8, 4, 4))


def test_bad_example_inputs_raise_naming_the_model():
    with pytest.raises(ValueError, match="Residual"):
        G.trace(Residual(), torch.randn(1, 5, 8, 8))


def test_tracing_leaves_the_model_as_it_was():
    model = Residual().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    G.trace(model, X)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_summary_lists_groups_and_members():
    text = str(G.trace(Residual(), X))
    assert "Residual: " in text and "stem.0.weight[dim 0] out (Conv2d, 8)" in text
