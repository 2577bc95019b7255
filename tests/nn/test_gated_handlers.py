"""Models built of nasprune's own layers (GatedConvBNAct2d, GatedConv2d, ChannelGate) trace,
count, slim, mask and save like models of plain layers; apply_gate and ChannelGate against the
plain broadcast multiply."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import nasprune
import nasprune.flops as F
import nasprune.graph as G
import nasprune.slim as S
from nasprune.handlers import handler_for
from nasprune.nn import ChannelGate, GatedConv2d, GatedConvBNAct2d, apply_gate, gates
from nasprune.nn.handlers import ChannelGateHandler, GatedConvBNActHandler, GatedConvHandler

sys.path.insert(0, str(Path(__file__).parents[1] / "slim"))
from zoo import max_rel_diff, random_keep  # noqa: E402


class Net(nn.Module):
    """Gated conv-BN layers on a residual stream (one grouped, one depthwise), a GatedConv2d,
    then plain conv -> BN -> ReLU -> ChannelGate -> pool -> Linear. Every prunable channel passes
    a gate before it reaches a consumer, so zeroing gates removes channels."""

    def __init__(self, gate=None):
        super().__init__()
        self.stem = GatedConvBNAct2d(3, 8, 3, padding=1, gate=gate)
        self.a = GatedConvBNAct2d(8, 12, 3, padding=1, bias=True, gate=gate)
        self.g2 = GatedConvBNAct2d(12, 12, 1, groups=2, gate=gate)
        self.b = GatedConvBNAct2d(12, 8, 3, padding=1, act="identity", gate=gate)
        self.dw = GatedConvBNAct2d(8, 8, 3, padding=1, groups=8, gate=gate)
        self.conv = GatedConv2d(8, 16, 3, stride=2, padding=1, gate=gate)
        self.relu = nn.ReLU()
        self.pw = nn.Conv2d(16, 10, 1)
        self.bn = nn.BatchNorm2d(10)
        self.gate = ChannelGate(10, gate=gate)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.b(self.g2(self.a(x)))
        x = self.relu(self.conv(self.dw(x)))
        x = self.gate(self.relu(self.bn(self.pw(x))))
        return self.fc(self.pool(x).flatten(1))


class Seq(nn.Module):
    """A ChannelGate on the last dim of a (N, L, C) sequence between two Linear layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(6, 10), ChannelGate(10, dim=-1), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(self.gate(torch.relu(self.fc1(x))))


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            if isinstance(getattr(m, "gate", None), nn.Parameter):
                m.gate.copy_(torch.rand(m.gate.shape, generator=g) + 0.5)
    return model.eval()


def gates_closed(model: nn.Module, graph, keep) -> nn.Module:
    """A copy of ``model`` with the gates of every channel ``keep`` removes set to zero."""
    closed = copy.deepcopy(model)
    with torch.no_grad():
        for gi, kept in keep.items():
            for member in graph.groups[gi].members:
                layer = closed.get_submodule(member.module)
                if member.role == "in" or not isinstance(getattr(layer, "gate", None), nn.Parameter):
                    continue
                gone = ~torch.isin(member.index_map.channels, kept)
                pos = member.index_map.positions[gone].flatten()
                layer.gate[pos[pos >= 0]] = 0
    return closed


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = randomise(Net())
    x = torch.randn(2, 3, 8, 8)
    return model, x, G.trace(model, x)


def _members(group):
    return sorted((m.module, m.role, m.tensor, m.dim, tuple(m.index_map.positions.shape)) for m in group.members)


def test_handlers_are_picked_for_the_gated_layers_and_their_subclasses():
    class MyGated(GatedConv2d):  # keeps GatedConv2d's forward: same handler
        pass

    assert type(handler_for(GatedConv2d(2, 4, 3))) is GatedConvHandler
    assert type(handler_for(MyGated(2, 4, 3))) is GatedConvHandler
    assert type(handler_for(nn.Conv2d(2, 4, 3))).__name__ == "ConvHandler"
    assert type(handler_for(GatedConvBNAct2d(2, 4, 3))) is GatedConvBNActHandler
    assert type(handler_for(ChannelGate(4))) is ChannelGateHandler


def test_trace_groups_the_gated_layers(net):
    _, _, graph = net
    # residual stream: stem and b produce it, dw (depthwise) passes it on, a and conv read it
    stream = [("a", "in", "conv.weight", 1, (8, 1)), ("b", "out", "conv.weight", 0, (8, 1)),
              ("conv", "in", "weight", 1, (8, 1)), ("dw", "in", "conv.weight", 1, (8, 1)),
              ("dw", "out", "conv.weight", 0, (8, 1)), ("stem", "out", "conv.weight", 0, (8, 1))]
    # g2 has 2 groups: channel j of each half of a's output (and of g2's) goes together
    a_out = [("a", "out", "conv.weight", 0, (6, 2)), ("g2", "in", "conv.weight", 1, (6, 2))]
    g2_out = [("b", "in", "conv.weight", 1, (6, 2)), ("g2", "out", "conv.weight", 0, (6, 2))]
    conv_out = [("conv", "out", "weight", 0, (16, 1)), ("pw", "in", "weight", 1, (16, 1))]
    pw_out = [("bn", "channel", "weight", 0, (10, 1)), ("fc", "in", "weight", 1, (10, 1)),
              ("gate", "channel", "gate", 0, (10, 1)), ("pw", "out", "weight", 0, (10, 1))]
    got = [(g.size, g.prunable, _members(g)) for g in graph.groups]
    assert got == [(8, True, stream), (6, True, a_out), (6, True, g2_out), (16, True, conv_out),
                   (10, True, pw_out), (5, False, [("fc", "out", "weight", 0, (5, 1))])]


def test_sequence_gate_along_the_last_dim():
    torch.manual_seed(1)
    model = randomise(Seq())
    x = torch.randn(2, 4, 6)
    graph = G.trace(model, x)
    assert [(g.size, _members(g)) for g in graph.prunable_groups] == [
        (10, [("fc1", "out", "weight", 0, (10, 1)), ("fc2", "in", "weight", 1, (10, 1)),
              ("gate", "channel", "gate", 0, (10, 1))])]
    keep = {0: torch.tensor([1, 4, 5, 9])}
    slim = S.apply(model, graph, keep)
    assert slim.gate.channels == 4 and torch.equal(slim.gate.gate, model.gate.gate[keep[0]])
    with torch.no_grad():
        want = gates_closed(model, graph, keep)(x)
        assert max_rel_diff(slim(x), want) <= 1e-5
        assert max_rel_diff(S.mask(model, graph, keep)(x), want) <= 1e-5
    assert F.count(slim, x) == 4 * (6 * 4 + 4 * 3)  # 4 positions; TAS counts no Linear bias


def hand_macs(w: dict) -> int:
    """MACs per sample of Net at 8x8 input with widths w (TAS: conv k*k*cin/groups*cout*HW,
    + HW for a bias; Linear cin*cout)."""
    hw, hw2 = 8 * 8, 4 * 4
    return (9 * 3 * w["stem"] * hw
            + 9 * w["stem"] * w["a"] * hw + hw              # a has a bias
            + 1 * (w["a"] // 2) * w["g2"] * hw              # 2 groups
            + 9 * w["g2"] * w["stem"] * hw                  # b
            + 9 * 1 * w["stem"] * hw                        # depthwise
            + 9 * w["stem"] * w["conv"] * hw2 + hw2         # GatedConv2d, bias
            + 1 * w["conv"] * w["pw"] * hw2 + hw2           # pw, bias
            + w["pw"] * 5)                                  # fc


def test_count_equals_the_hand_count(net):
    model, x, graph = net
    full = hand_macs({"stem": 8, "a": 12, "g2": 12, "conv": 16, "pw": 10})
    assert F.count(model, x) == full == 154770
    assert F.CostModel(graph).total() == full
    rows = {r.name: r for r in F.table(model, x)}
    assert set(rows) == {"stem", "a", "g2", "b", "dw", "conv", "pw", "fc"}
    dw = rows["dw"]  # a fused layer's row shows its conv
    assert (dw.layer_type, dw.in_channels, dw.out_channels, dw.kernel, dw.groups, dw.output_size,
            dw.macs, dw.params) == ("GatedConvBNAct2d", 8, 8, (3, 3), 8, (8, 8), 9 * 8 * 64, 8 * 9)
    assert rows["conv"].params == 16 * 8 * 9 + 16 + 16  # weight, bias, gate


@pytest.mark.parametrize("seed", range(3))
def test_cost_model_slim_and_count_agree(net, seed):
    model, x, graph = net
    keep = random_keep(graph, seed)
    slim = S.apply(model, graph, keep)
    kept = {g.index: (len(keep[g.index]) if g.index in keep else g.size) for g in graph.groups}
    widths = {"stem": kept[0], "a": 2 * kept[1], "g2": 2 * kept[2], "conv": kept[3], "pw": kept[4]}
    assert F.CostModel(graph).exact(keep) == F.count(slim, x) == hand_macs(widths)


@pytest.mark.parametrize("gate", ["continuous", "fixed", "sigmoid"])
@pytest.mark.parametrize("seed", range(2))
def test_slimmed_equals_masked_and_closed_gates(gate, seed):
    torch.manual_seed(seed)
    model = randomise(Net(gate), seed)
    x = torch.randn(2, 3, 8, 8)
    graph = G.trace(model, x)
    keep = random_keep(graph, seed)
    masked = S.mask(model, graph, keep)
    removed = torch.ones(8, dtype=torch.bool)
    removed[keep[0]] = False
    for name in ("stem", "b", "dw"):  # mask zeroes the gates of the removed channels, only those
        raw = getattr(masked, name).gate.detach()
        assert (raw[removed] == 0).all() and torch.equal(raw[~removed], getattr(model, name).gate[~removed].detach())
    with torch.no_grad():
        slimmed = S.apply(model, graph, keep)(x)
        assert max_rel_diff(slimmed, masked(x)) <= 1e-5
        full = model(x)
        assert max_rel_diff(slimmed, full) > 1e-3  # the keep set does change the output
        if float(gates.make(gate)(torch.zeros(1))) == 0:  # a zero raw gate closes the channel
            assert max_rel_diff(slimmed, gates_closed(model, graph, keep)(x)) <= 1e-5


def test_slimmed_layers_are_consistent_and_train(net):
    model, x, graph = net
    model = copy.deepcopy(model)
    model.stem.track_activation_taylor()
    model.train()
    model(x).square().sum().backward()
    model.eval()
    taylor = model.stem.activation_taylor.clone()
    keep = random_keep(graph, 5)
    slim = S.apply(model, graph, keep)
    stem, conv, gate = slim.stem, slim.conv, slim.gate
    n = len(keep[0])
    assert stem.conv.out_channels == stem.bn.num_features == stem.gate.numel() == n
    assert stem.bn.running_var.shape == (n,) and conv.gate.shape == (conv.out_channels,)
    assert slim.dw.conv.groups == slim.dw.conv.in_channels == n
    assert gate.channels == gate.gate.numel() == len(keep[4])
    torch.testing.assert_close(stem.activation_taylor, taylor[keep[0]])
    torch.testing.assert_close(stem.gate, model.stem.gate[keep[0]].detach())
    slim.train()
    slim(x).sum().backward()
    # (a conv bias before a training-mode BN has no effect: GatedConvBNAct2d gives it no grad)
    assert all(p.grad is not None and p.grad.shape == p.shape
               for name, p in slim.named_parameters() if name != "a.conv.bias")


def test_save_and_load_round_trip(net, tmp_path):
    model, x, graph = net
    keep = random_keep(graph, 1)
    slim = S.apply(model, graph, keep)
    path = tmp_path / "slim.safetensors"
    nasprune.save(slim, path)
    loaded = nasprune.load(path, base_model=Net())
    assert type(loaded) is Net
    keys = {k for k in loaded.state_dict() if k.startswith("stem.")}
    assert keys == {"stem.gate", "stem.conv.weight", "stem.bn.weight", "stem.bn.bias",
                    "stem.bn.running_mean", "stem.bn.running_var", "stem.bn.num_batches_tracked"}
    assert loaded.stem.gate.shape == (len(keep[0]),)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), slim.eval()(x))


# ------------------------------------------------------------------ apply_gate, ChannelGate
@pytest.mark.parametrize("shape,dim", [((4, 6, 5, 3), 1), ((4, 6, 5, 3), -3), ((4, 6, 5, 3), -1),
                                       ((3, 7), 1), ((3, 7), 0), ((5, 2, 9), -1)])
def test_apply_gate_equals_broadcast_multiply(shape, dim, monkeypatch):
    calls = []
    fused = nasprune.ops.gate_epilogue
    monkeypatch.setattr(nasprune.ops, "gate_epilogue", lambda *a: calls.append(1) or fused(*a))
    x = torch.randn(shape, dtype=torch.float32)
    g = torch.rand(shape[dim]) + 0.5
    view = [1] * len(shape)
    view[dim] = -1
    x1, g1 = x.clone().requires_grad_(), g.clone().requires_grad_()
    x2, g2 = x.clone().requires_grad_(), g.clone().requires_grad_()
    y1, y2 = apply_gate(x1, g1, dim), x2 * g2.view(view)
    dy = torch.randn(shape)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g1.grad, g2.grad, atol=1e-5, rtol=1e-5)
    assert len(calls) == (1 if dim % len(shape) == 1 else 0)  # dim 1 runs on the fused op
    with torch.no_grad():
        y3 = apply_gate(x1, g1, dim)
    assert not y3.requires_grad and torch.equal(y3, y1.detach())


def test_channel_gate_matches_its_parameterisation():
    x = torch.randn(2, 5, 3)
    layer = ChannelGate(5, gate="sigmoid")
    with torch.no_grad():
        layer.gate.copy_(torch.linspace(-2, 2, 5))
    torch.testing.assert_close(layer(x), x * torch.sigmoid(torch.linspace(-2, 2, 5)).view(1, 5, 1))
    assert list(layer.state_dict()) == ["gate"]
    assert ChannelGate(3, gate="threshold").gate.tolist() == pytest.approx([0.6] * 3)
    assert ChannelGate(3, dim=-1).extra_repr() == "3, dim=-1"


def test_bad_gate_arguments_raise_clear_errors():
    layer = ChannelGate(6)
    with pytest.raises(ValueError, match=r"ChannelGate\(6, dim=1\): gate must have shape \(5,\) to "
                                         r"match dim 1 of x of shape \(2, 5, 3\), got \(6,\)"):
        layer(torch.randn(2, 5, 3))
    with pytest.raises(IndexError, match=r"ChannelGate\(6, dim=3\): dim 3 is out of range for x of shape \(2, 6, 3\)"):
        ChannelGate(6, dim=3)(torch.randn(2, 6, 3))
    with pytest.raises(RuntimeError, match="gate is on cpu but x is on meta"):
        layer(torch.randn(2, 6, 3, device="meta"))
    with torch.no_grad():
        layer.gate[2] = float("nan")
    with pytest.raises(ValueError, match=r"ChannelGate\(6, dim=1\): gate has non-finite values at channels \[2\]"):
        layer(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="channels must be a positive int, got 0"):
        ChannelGate(0)
    with pytest.raises(ValueError, match=r"apply_gate: gate must have shape \(4,\) to match dim -1 of x of "
                                         r"shape \(3, 4\), got \(2, 2\)"):
        apply_gate(torch.randn(3, 4), torch.ones(2, 2), -1)
    with pytest.raises(TypeError, match="apply_gate: g must be a Tensor, got list"):
        apply_gate(torch.randn(3, 4), [1.0] * 4)


def test_tensor_helpers_follow_dotted_names():
    from nasprune.handlers.base import LayerHandler, get_tensor, slice_tensor
    layer = randomise(GatedConvBNAct2d(3, 6, 1, bias=True))
    handler = handler_for(layer)
    assert handler.primary(layer, "out") == ("conv.weight", 0) and handler.primary(layer, "in") == ("conv.weight", 1)
    assert get_tensor(layer, "bn.running_var") is layer.bn.running_var and get_tensor(layer, "bn.nope") is None
    gone = torch.tensor([False, True, False, False, True, False])
    LayerHandler.mask(handler, layer, {"out": gone})  # the generic mask, through the roles' dotted names
    for name, dim in handler.roles["out"]:
        t = get_tensor(layer, name).detach()
        assert (t[gone] == 0).all() and (t[~gone] != 0).all(), name
    slice_tensor(layer, "bn.running_mean", 0, torch.tensor([0, 2]))
    assert type(layer.bn.running_mean) is torch.Tensor and layer.bn.running_mean.shape == (2,)
    assert "bn.running_mean" in layer.state_dict()
