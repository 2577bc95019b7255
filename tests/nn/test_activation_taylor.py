"""Activation-Taylor scores accumulated by the gated layers in their fused backward: equal to
|sum_{n,h,w} dy * y| summed over batches, for every gate parameterisation and the sparse path;
no effect on training; no extra pass over activations; hooks do not pile up."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nasprune.nn import GatedConv2d, GatedConvBNAct2d


def _layer(kind, gate):
    torch.manual_seed(0)
    if kind == "bn":
        layer = GatedConvBNAct2d(3, 6, 3, padding=1, gate=gate)
    else:
        layer = GatedConv2d(3, 6, 3, padding=1, gate=gate)
    with torch.no_grad():
        layer.gate.uniform_(0.5, 1.5)
        layer.gate[::3] = 0  # closed channels: FixedMask / Threshold layers skip them in the conv
    return layer


def _run(layer, batches, track):
    """Forward + backward over `batches`; returns the expected score (from y and its gradient)
    and the parameter gradients."""
    layer.track_activation_taylor(track)
    expected = torch.zeros(6, dtype=torch.float64)
    for x, w in batches:
        y = layer(x)
        y.retain_grad()
        (y.sin() * w).sum().backward()
        expected += (y.grad.double() * y.double()).sum((0, 2, 3)).abs()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return expected, grads


@pytest.mark.parametrize("kind", ["bn", "plain"])
@pytest.mark.parametrize("gate", ["continuous", "sigmoid", "threshold", "fixed"])
def test_score_is_abs_sum_dy_y_over_batches(kind, gate):
    batches = [(torch.randn(4, 3, 8, 8), torch.randn(4, 6, 8, 8)) for _ in range(3)]
    layer = _layer(kind, gate)
    expected, grads = _run(layer, batches, track=True)
    assert layer.activation_taylor_batches == 3
    torch.testing.assert_close(layer.activation_taylor.double(), expected, atol=1e-5, rtol=1e-5)
    closed = layer.gate_values().detach() == 0
    assert closed.sum() == (2 if gate != "sigmoid" else 0)
    assert layer.activation_taylor[closed].eq(0).all()  # y = 0
    assert layer.activation_taylor[~closed].gt(0).all()
    # tracking changes no gradient the model trains with
    _, untracked = _run(_layer(kind, gate), batches, track=False)
    assert grads.keys() == untracked.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], untracked[n], atol=0, rtol=0)


def test_reset_disable_and_no_grad():
    layer = _layer("bn", None)
    layer.track_activation_taylor()
    layer(torch.randn(2, 3, 5, 5)).sum().backward()
    assert layer.activation_taylor_batches == 1
    with torch.no_grad():
        layer(torch.randn(2, 3, 5, 5))
    layer.eval()
    layer(torch.randn(2, 3, 5, 5)).sum().backward()  # eval mode still has a backward: counted
    assert layer.activation_taylor_batches == 2
    layer.reset_activation_taylor()
    assert layer.activation_taylor is None and layer.activation_taylor_batches == 0
    layer.track_activation_taylor(False)
    layer(torch.randn(2, 3, 5, 5)).sum().backward()
    assert layer.activation_taylor is None


def test_hooks_do_not_pile_up_on_the_gate():
    layer = _layer("bn", None)  # continuous: the gate values are the parameter itself
    layer.track_activation_taylor()
    for _ in range(5):
        layer(torch.randn(2, 3, 5, 5)).sum().backward()
    assert not layer.gate._backward_hooks
    assert layer.activation_taylor_batches == 5


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = []  # per op: name and the largest tensor it touches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                 if isinstance(t, torch.Tensor)]
        self.largest.append((str(func), max(sizes, default=0)))
        return out


def test_no_extra_pass_over_activations():
    """With tracking on, the backward runs the same activation-sized ops as without; the only
    additions touch per-channel vectors."""
    x = torch.randn(4, 3, 8, 8)
    runs = {}
    for track in (False, True):
        layer = _layer("bn", None)
        layer.track_activation_taylor(track)
        y = layer(x)
        rec = _Recorder()
        with rec:
            y.sum().backward()
        runs[track] = rec.largest
    big = y.numel() // 6 // 2  # anything larger than half a channel's worth is activation-sized
    heavy = {t: sorted(name for name, n in ops if n > big) for t, ops in runs.items()}
    assert heavy[True] == heavy[False]
    assert "nasprune.gate_epilogue_backward.default" in heavy[True]
    extra = len(runs[True]) - len(runs[False])
    assert 0 < extra <= 6 and layer.activation_taylor is not None


def test_under_torch_compile():
    eager, compiled = _layer("bn", None), _layer("bn", None)
    eager.track_activation_taylor()
    compiled.track_activation_taylor()
    step = torch.compile(compiled, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(2, 3, 6, 6)
        eager(x).sin().sum().backward()
        step(x).sin().sum().backward()
    assert compiled.activation_taylor_batches == 2
    torch.testing.assert_close(compiled.activation_taylor, eager.activation_taylor)
