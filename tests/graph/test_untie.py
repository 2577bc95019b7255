"""nasprune.graph.untie and ChannelSelect: every residual shortcut through a channel selection,
so each block's output is a channel group of its own; slimmed, the untied network is dense and
exact (its shortcuts gather), saves and loads, and tied_keep gives what the model's own class
would need to hold the same channels."""
from __future__ import annotations

import pytest
import torch
import torchvision

import nasprune
from nasprune import flops, slim
from nasprune.graph import trace
from nasprune.graph.untie import Untied, tied_keep, untie
from nasprune.handlers import handler_for
from nasprune.models import cifar_resnet20
from nasprune.nn import ChannelSelect
from nasprune.search import GatedNetwork
from nasprune.search.gated_searcher import gates_as

MODELS = {
    "cifar_resnet20": (lambda: cifar_resnet20(num_classes=10), 9),         # option-A shortcuts too
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 5),   # 3 downsampling convs need none
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 10),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 9),  # train/eval graphs differ
}


def _rel(reference, out):
    return float((out - reference).abs().max() / max(1.0, float(reference.abs().max())))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_untied_copy_computes_the_model_and_cuts_each_stream_per_block(name):
    build, shortcuts = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 3, 32, 32)
    u = untie(model, x[:1])
    assert isinstance(u, Untied) and len(u.selects) == shortcuts
    assert all(not s.gathers for s in u.selects.values())
    for mode in (False, True):                     # eval, and train (batch statistics, same dropout draw)
        model.train(mode), u.train(mode)
        with torch.no_grad():
            torch.manual_seed(1)
            want = model(x)
            torch.manual_seed(1)
            got = u(x)
        assert torch.equal(got, want)
    g, gu = trace(model, x[:1]), trace(u, x[:1])
    # every shortcut's selection makes fresh channels: one more group per shortcut
    assert len(gu.groups) == len(g.groups) + shortcuts
    assert sum(gr.size for gr in gu.prunable_groups) == sum(gr.size for gr in g.prunable_groups) + \
        sum(s.out_channels for s in u.selects.values())
    assert flops.CostModel(gu).total() == flops.CostModel(g).total()      # a selection costs no MACs


def test_models_without_shortcuts_and_bad_arguments_are_refused():
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="no residual shortcut"):
        untie(torchvision.models.vgg11_bn(num_classes=10), x)
    with pytest.raises(ValueError, match="no residual shortcut"):
        untie(torchvision.models.densenet121(num_classes=10), x)
    u = untie(cifar_resnet20(), x)
    with pytest.raises(ValueError, match="untied already"):
        untie(u, x)
    with pytest.raises(ValueError, match="not a module"):
        untie(cifar_resnet20(), x, leaf_modules=["nope"])
    with pytest.raises(ValueError, match="channels must be a positive int"):
        ChannelSelect(0)
    with pytest.raises(ValueError, match="expected 4 channels"):
        ChannelSelect(4)(torch.zeros(1, 3, 2, 2))


def test_channel_select_slim_renumbers_and_zeroes_lost_sources_as_its_mask_does():
    x = torch.randn(2, 6, 3, 3)
    s = ChannelSelect(6)
    assert s(x) is x and not s.gathers and not s.scales       # the identity: no pass over x
    s.weight.copy_(torch.arange(1.0, 7.0))
    s.refresh()
    assert s.scales and torch.equal(s(x), x * torch.arange(1.0, 7.0).view(1, -1, 1, 1))
    keep_out, keep_in = torch.tensor([0, 2, 3, 5]), torch.tensor([1, 2, 5])
    masked = ChannelSelect(6)
    masked.weight.copy_(s.weight)
    handler_for(s).slim(s, {"out": keep_out, "in": keep_in})
    assert s.in_channels == 3 and s.out_channels == 4 and s.gathers
    # output 0 and 3 read inputs 0 and 3, which are gone (weight 0); 2 and 5 read inputs 2 and 5,
    # now at positions 1 and 2
    assert s.index.tolist() == [0, 1, 0, 2] and s.weight.tolist() == [0.0, 3.0, 0.0, 6.0]
    gone_out = torch.ones(6, dtype=torch.bool)
    gone_out[keep_out] = False
    gone_in = torch.ones(6, dtype=torch.bool)
    gone_in[keep_in] = False
    handler_for(masked).mask(masked, {"out": gone_out, "in": gone_in})
    want = masked(x * (~gone_in).float().view(1, -1, 1, 1))[:, keep_out]
    assert torch.equal(s(x[:, keep_in]), want)
    assert handler_for(s).macs(s, 3, 4, (2, 3, 3, 3), (2, 4, 3, 3)) == 0
    restored = ChannelSelect(3)                                # a loaded state says whether it gathers
    restored.index, restored.weight = torch.arange(4), torch.ones(4)     # shaped as the slimmed one
    restored.load_state_dict(s.state_dict())
    assert restored.gathers and restored.index.tolist() == [0, 1, 0, 2]


@pytest.mark.parametrize("name", ["cifar_resnet20", "mobilenet_v2"])
def test_slimmed_untied_network_equals_the_gated_one_counts_its_macs_and_round_trips(name, tmp_path):
    """Different channels kept by every block: the slimmed untied network (shortcuts gathering)
    equals the gated network at those 0/1 gates, its MACs are the cost model's, and it loads
    from its file on a fresh model."""
    build, _ = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(3, 3, 32, 32)
    u = untie(model, x[:1])
    gn = GatedNetwork(u, x[:1])
    g = torch.Generator().manual_seed(2)
    keep = {}
    for gi in gn.groups:
        size = gn.sizes[gi]
        keep[gi] = torch.randperm(size, generator=g)[:max(1, size // 2)].sort().values
    gn.eval()
    # continuous values on the kept channels: the export folds them (into a selection's weight too)
    values = gn.keep_vector(keep).float() * (0.5 + torch.rand(gn.num_gates, generator=g))
    with torch.no_grad(), gates_as(gn, values):
        reference = gn(x)
        net = gn.export(keep).eval()
        out = net(x)
    assert _rel(reference, out) <= 1e-5
    assert any(s.gathers for s in net.selects.values())
    assert any(bool((s.weight != 1).any()) for s in net.selects.values())
    assert flops.count(net, x[:1]) == flops.CostModel(gn.graph).exact(keep)
    path = tmp_path / "untied.safetensors"
    nasprune.save(net, path)
    loaded = nasprune.load(path, base_model=build()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_tied_keep_holds_every_kept_channel_and_saves_nothing_on_a_tied_keep():
    torch.manual_seed(0)
    model = cifar_resnet20(num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    u = untie(model, x)
    g, gu = trace(model, x), trace(u, x)
    base = flops.CostModel(g)
    # a keep of the model's own graph, carried to the untied one (every block keeps the same
    # channels): the tied keep is that keep, and untying saves nothing
    own = {gr.index: torch.arange(0, gr.size, 2) for gr in g.prunable_groups}
    carried = tied_keep_inverse(g, gu, own)
    assert {k: v.tolist() for k, v in tied_keep(gu, g, carried).items()} == {k: v.tolist() for k, v in own.items()}
    assert flops.CostModel(gu).exact(carried) == base.exact(own)
    # every block its own half: the tied keep holds the union, costs more, and the model's own
    # class slimmed to it has those MACs
    gen = torch.Generator().manual_seed(3)
    free = {gr.index: torch.randperm(gr.size, generator=gen)[:gr.size // 2].sort().values for gr in gu.prunable_groups}
    tk = tied_keep(gu, g, free)
    assert base.exact(tk) > flops.CostModel(gu).exact(free)
    assert flops.count(slim.apply(model, g, tk), x) == base.exact(tk)
    for gr in gu.prunable_groups:                  # each untied group's kept channels are in the union
        for member in gr.members:
            if member.module.startswith("model.") and member.role == "out":
                o = g.records[member.module[len("model."):]][1]["out"]
                og, oc = g.class_group[o], g.class_channel[o]
                kept = set(free[gr.index].tolist())
                for pos, c in enumerate(gu.class_channel[gu.records[member.module][1]["out"]].tolist()):
                    if c in kept and og[pos] in tk:
                        assert oc[pos] in set(tk[int(og[pos])].tolist())


def tied_keep_inverse(g, gu, keep):
    """The untied graph's keep in which every block keeps what ``keep`` of the model's graph keeps."""
    out = {}
    for name, (_, roles) in g.records.items():
        untied = gu.records.get(f"model.{name}")
        for role, classes in roles.items():
            if untied is None or role not in untied[1]:
                continue
            for pos, (og, oc) in enumerate(zip(g.class_group[classes].tolist(), g.class_channel[classes].tolist())):
                ug = int(gu.class_group[untied[1][role][pos]])
                if og in keep and ug >= 0:
                    out.setdefault(ug, set())
                    if oc in set(keep[og].tolist()):
                        out[ug].add(int(gu.class_channel[untied[1][role][pos]]))
    # the selections' output groups: what the block after them keeps
    return {ug: torch.tensor(sorted(v)) for ug, v in out.items() if v and len(v) < gu.groups[ug].size}
