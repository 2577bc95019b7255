"""GatedConv2d and GatedConvBNAct2d against the plain PyTorch compositions they replace:
outputs, every gradient, BN running statistics, state dicts, the sparse (skip closed channels)
path, torch.compile and bad input."""
import copy

import pytest
import torch
from torch import nn

from nasprune.nn import GatedConv2d, GatedConvBNAct2d


class Plain(nn.Module):
    """g * act(bn(conv(x))): what GatedConvBNAct2d must equal."""

    def __init__(self, layer: GatedConvBNAct2d):
        super().__init__()
        self.conv, self.bn = copy.deepcopy(layer.conv), copy.deepcopy(layer.bn)
        self.gate = nn.Parameter(layer.gate_values().detach().clone())
        self.act = layer.act

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.gate.view(1, -1, 1, 1) * (torch.relu(y) if self.act == "relu" else y)


def _randomise(layer):
    with torch.no_grad():
        layer.gate.uniform_(0.5, 1.5)
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.normal_()
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2)
    return layer


def _compare_step(layer, plain, x, atol=1e-5):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), plain(x2)
    torch.testing.assert_close(y1, y2, atol=atol, rtol=1e-4)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=1e-4)
    pairs = [(layer.conv.weight, plain.conv.weight), (layer.bn.weight, plain.bn.weight),
             (layer.bn.bias, plain.bn.bias), (layer.gate, plain.gate)]
    if layer.conv.bias is not None:  # batch norm cancels the conv bias: no gradient reaches it
        assert layer.conv.bias.grad is None
        assert plain.conv.bias.grad.abs().max() < 1e-4
    for a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, atol=10 * atol, rtol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer.bn, name), getattr(plain.bn, name))
    return y1


@pytest.mark.parametrize("groups, cin, cout", [(1, 6, 10), (6, 6, 6), (2, 6, 4)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ["relu", "identity"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_layer_equals_plain_composition(groups, cin, cout, bias, act, momentum):
    layer = _randomise(GatedConvBNAct2d(cin, cout, 3, stride=2, padding=1, groups=groups,
                                        bias=bias, act=act, momentum=momentum))
    plain = Plain(layer)
    for _ in range(2):  # two steps: running statistics and num_batches_tracked accumulate
        _compare_step(layer, plain, torch.randn(3, cin, 9, 7))
    layer.eval(), plain.eval()
    x = torch.randn(2, cin, 9, 7)
    torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=1e-4)


def test_channels_last_input_keeps_layout_and_values():
    layer = _randomise(GatedConvBNAct2d(8, 16, 3, padding=1))
    plain = Plain(layer)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    y = _compare_step(layer, plain, x)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_bfloat16_layer_close_to_fp32():
    layer = _randomise(GatedConvBNAct2d(8, 16, 3, padding=1))
    x = torch.randn(4, 8, 6, 6)
    y32 = layer(x)
    y16 = copy.deepcopy(layer).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.05)


def test_gated_conv2d_equals_gate_times_conv():
    layer = GatedConv2d(5, 7, 3, padding=1, bias=True)
    with torch.no_grad():
        layer.gate.uniform_(-1, 1)
    conv = nn.Conv2d(5, 7, 3, padding=1)
    conv.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "gate"})
    g = layer.gate.detach().clone().requires_grad_()
    x1 = torch.randn(2, 5, 6, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = layer(x1), g.view(1, -1, 1, 1) * conv(x2)
    torch.testing.assert_close(y1, y2)
    dy = torch.randn_like(y1)
    y1.backward(dy), y2.backward(dy)
    for a, b in ((x1.grad, x2.grad), (layer.weight.grad, conv.weight.grad),
                 (layer.bias.grad, conv.bias.grad), (layer.gate.grad, g.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_state_dicts_match_plain_modules_and_load_them():
    layer = GatedConvBNAct2d(4, 6, 3, bias=True)
    conv, bn = nn.Conv2d(4, 6, 3, bias=True), nn.BatchNorm2d(6)
    plain_keys = {f"conv.{k}" for k in conv.state_dict()} | {f"bn.{k}" for k in bn.state_dict()}
    assert set(layer.state_dict()) == plain_keys | {"gate"}
    pair = {f"conv.{k}": v for k, v in conv.state_dict().items()}
    pair.update({f"bn.{k}": v for k, v in bn.state_dict().items()})
    layer.load_state_dict(pair)  # strict: a conv-BN pair's weights load without a gate
    assert torch.equal(layer.conv.weight, conv.weight) and torch.equal(layer.gate, torch.ones(6))
    g2 = GatedConv2d(4, 6, 3)
    assert set(g2.state_dict()) == set(nn.Conv2d(4, 6, 3).state_dict()) | {"gate"}
    g2.load_state_dict(conv.state_dict())
    assert torch.equal(g2.weight, conv.weight)


def test_from_modules_copies_weights_and_statistics():
    conv, bn = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
    bn.running_mean.normal_()
    layer = GatedConvBNAct2d.from_modules(conv, bn).eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), torch.relu(bn.eval()(conv(x))))


def _conv_widths(layer):
    """Records the number of filters each convolution call runs with."""
    seen = []
    conv = layer.conv if isinstance(layer, GatedConvBNAct2d) else layer
    original = conv._conv_forward

    def spy(x, weight, bias):
        seen.append(weight.shape[0])
        return original(x, weight, bias)

    conv._conv_forward = spy
    return seen


@pytest.mark.parametrize("groups", [1, 8])
def test_fixed_mask_convolves_only_open_channels_in_training(groups):
    layer = _randomise(GatedConvBNAct2d(8, 8, 3, padding=1, groups=groups, gate="fixed"))
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.float32)
    with torch.no_grad():
        layer.gate.copy_(mask)
    plain = Plain(layer)
    seen = _conv_widths(layer) if groups == 1 else None
    x = torch.randn(3, 8, 5, 5, requires_grad=True)
    y = layer(x)
    x2 = x.detach().clone().requires_grad_()
    y2 = plain(x2)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-4)
    assert y[:, mask == 0].abs().max() == 0
    dy = torch.randn_like(y)
    y.backward(dy), y2.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.conv.weight.grad, plain.conv.weight.grad, atol=1e-4, rtol=1e-4)
    assert layer.gate.grad is None  # frozen
    open_ = mask.bool()
    torch.testing.assert_close(layer.bn.running_mean[open_], plain.bn.running_mean[open_])
    if seen is not None:
        assert seen == [4]


def test_threshold_gate_skips_closed_channels_in_eval_only():
    layer = _randomise(GatedConvBNAct2d(4, 6, 3, padding=1, gate="threshold"))
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.9, 0.1, 0.6, 0.4, 0.7, 0.2]))
    seen = _conv_widths(layer)
    x = torch.randn(2, 4, 5, 5)
    layer(x)
    layer.eval()
    y = layer(x)
    assert seen == [6, 3]
    assert y[:, [1, 3, 5]].abs().max() == 0
    with torch.no_grad():  # changing the gate refreshes the cached open set
        layer.gate[1] = 0.8
    layer(x)
    assert seen[-1] == 4


def test_empty_batch_leaves_running_statistics():
    layer = _randomise(GatedConvBNAct2d(3, 4, 3, padding=1))
    before = layer.bn.running_mean.clone()
    y = layer(torch.randn(0, 3, 5, 5))
    assert y.shape == (0, 4, 5, 5)
    assert torch.equal(layer.bn.running_mean, before)


def test_single_value_per_channel_in_training_is_rejected():
    layer = GatedConvBNAct2d(3, 4, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("x, exc, match", [
    (torch.randn(3, 5, 5), ValueError, r"expected input of shape \(N, 3, H, W\), got \(3, 5, 5\)"),
    (torch.randn(2, 4, 5, 5), ValueError, r"GatedConvBNAct2d\(3, 4.*got \(2, 4, 5, 5\)"),
    (torch.randn(2, 3, 5, 5, dtype=torch.float64), ValueError, r"input has dtype torch.float64"),
    (torch.randn(2, 3, 5, 5, device="meta"), RuntimeError, r"input is on meta"),
])
def test_bad_input_is_named(x, exc, match):
    with pytest.raises(exc, match=match):
        GatedConvBNAct2d(3, 4, 3)(x)


def test_non_finite_gate_is_rejected():
    layer = GatedConvBNAct2d(3, 4, 3)
    with torch.no_grad():
        layer.gate[2] = float("nan")
    with pytest.raises(ValueError, match=r"gate has non-finite values at channels \[2\]"):
        layer(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiles_fullgraph(backend):
    layer = _randomise(GatedConvBNAct2d(4, 6, 3, padding=1))
    plain = Plain(layer)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    _compare_step(compiled, plain, torch.randn(2, 4, 6, 6), atol=1e-4)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (1, 2, 0, 1), (3, 2, 1, 1), (3, 1, 2, 2)])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("closed", ["in", "out", "both"])
def test_skip_closed_conv_equals_the_dense_conv(kernel, stride, padding, dilation, layout, closed):
    """skip_closed_conv on an input zero outside `in_open` and an output gradient zero outside
    `out_open`: the output, the input gradient and the weight gradient of the dense conv (the
    skipped weight-gradient entries exactly zero, as the dense conv's are)."""
    from nasprune.nn.gated_conv import skip_closed_conv
    g = torch.Generator().manual_seed(kernel * 7 + stride)
    conv = nn.Conv2d(12, 20, kernel, stride, padding, dilation, bias=False)
    x = torch.randn(3, 12, 9, 9, generator=g)
    in_open = torch.tensor([0, 2, 3, 7, 11]) if closed in ("in", "both") else None
    out_open = torch.tensor([1, 4, 5, 6, 12, 19]) if closed in ("out", "both") else None
    if in_open is not None:
        x = torch.zeros_like(x).index_copy(1, in_open, x.index_select(1, in_open))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    conv, x = conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    dense_x, skip_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense, skip = conv(dense_x), skip_closed_conv(conv, skip_x, in_open, out_open)
    assert skip.is_contiguous(memory_format=fmt)
    dz = torch.randn(dense.shape, generator=g)
    if out_open is not None:
        dz = torch.zeros_like(dz).index_copy(1, out_open, dz.index_select(1, out_open))
    dw_dense, dx_dense = torch.autograd.grad(dense, [conv.weight, dense_x], dz)
    dw_skip, dx_skip = torch.autograd.grad(skip, [conv.weight, skip_x], dz)
    torch.testing.assert_close(skip, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_skip, dx_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw_skip, dw_dense, rtol=1e-5, atol=1e-4)
    assert torch.equal(dw_skip == 0, dw_dense == 0)


def test_gather_channels_keeps_the_memory_format():
    from nasprune.nn.gated_conv import gather_channels
    x = torch.randn(2, 10, 5, 6)
    index = torch.tensor([1, 4, 9])
    for fmt in (torch.channels_last, torch.contiguous_format):
        out = gather_channels(x.contiguous(memory_format=fmt), index)
        assert torch.equal(out, x[:, index]) and out.is_contiguous(memory_format=fmt)
