"""The gated network every gate-based search trains (nasprune.search.GatedNetwork) against the
same gated model written by hand in eager PyTorch: the user's conv, BatchNorm2d and activation
modules, a gate as ``x * gate.view(1, -1, 1, 1)`` after every site, and the expected MACs
summed layer by layer in Python. Both hold the very same weights and gate values.

One training step: forward, cross-entropy + 0.1 * expected MACs / base MACs, backward, SGD on
the weights and the gates. And the expected-MACs evaluation alone (forward and backward).
GatedNetwork runs a conv network channels-last (its default, memory_format="auto"); the eager
model is timed as a user writes it (NCHW) and channels-last too, so that the ratio against the
second shows what the fused ops add beyond the layout.

    python benchmarks/bench_gated.py                        # CPU: ResNet-56, MobileNetV2, 32x32, batch 64
    python benchmarks/bench_gated.py --device cuda          # GPU: batch 256

Appends rows to benchmarks/results/gated.jsonl.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from nasprune import models  # noqa: E402
from nasprune.search.gated import GatedNetwork  # noqa: E402


class EagerSite(nn.Module):
    """A site written by hand: y = x * gate along the channel dimension."""

    def __init__(self, index, dim):
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.dim = dim

    def forward(self, x, values):
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * values.index_select(0, self.index).view(shape)


def eager_network(model, x, memory_format="contiguous") -> GatedNetwork:
    """The same gates with no fused op: plain modules and a multiply per site."""
    gn = GatedNetwork(model, x, fuse=False, memory_format=memory_format)
    for mode_sites in gn.site_info.values():
        for site in mode_sites:
            gn.sites[site.name] = EagerSite(site.index, site.dim % 4 if site.dim < 0 else site.dim)
    for mode, gm in gn._modes.items():  # the graph modules resolve sites by name: point them at the new ones
        for name, module in gn.sites.items():
            gm.sites._modules[name] = module
    return gn


def eager_macs(gn: GatedNetwork, values: torch.Tensor) -> torch.Tensor:
    """Expected MACs summed layer by layer in Python: each layer's widths are sums of gate values."""
    from nasprune.flops import CostModel
    cost = gn._eager_cost if hasattr(gn, "_eager_cost") else CostModel(gn.graph)
    gn._eager_cost = cost
    full = torch.cat([values, values.new_ones(1)])
    total = values.new_zeros(())
    for i, (name, handler, in_shape, out_shape, cin, cout) in enumerate(cost.layers):
        if cin is None or cout is None:
            total = total + float(cost._layer_macs(i, None, None))
            continue
        win = full[gn._slots(cin).to(values.device)].sum()
        wout = full[gn._slots(cout).to(values.device)].sum()
        total = total + handler.macs(cost._modules[name], win, wout, in_shape, out_shape)
    return total


def build(name):
    if hasattr(models, f"cifar_{name}"):
        return getattr(models, f"cifar_{name}")()
    import torchvision
    return getattr(torchvision.models, name)(num_classes=10)


def case(name, batch, size, device):
    torch.manual_seed(0)
    model = build(name)
    x0 = torch.zeros(1, 3, size, size)
    ours = GatedNetwork(model, x0, gate="sigmoid").to(device)
    eager = eager_network(model, x0).to(device)              # NCHW, as a user writes it
    eager_cl = eager_network(model, x0, "channels_last").to(device)  # the layout nasprune runs in
    for twin in (eager, eager_cl):
        twin.gate_fn = ours.gate_fn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    base = float(ours.base_macs)

    def stepper(net, macs_fn):
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def step():
            loss = F.cross_entropy(net(x), y) + 0.1 * macs_fn(net) / base
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def cost_only(net, macs_fn):
        def run():
            net.gate.grad = None
            macs_fn(net).backward()
        return run

    ours_macs = lambda n: n.expected_macs()  # noqa: E731
    eager_cost = lambda n: eager_macs(n, n.gate_fn(n.gate))  # noqa: E731
    with torch.no_grad(), _common.strict_fp32():  # same function, before timing drifts the weights
        ours.eval(), eager.eval()
        err = _common.rel_err(ours(x[:8]), eager(x[:8]))
        ours.train(), eager.train()
    assert err < 1e-4, f"{name}: the eager twin differs by {err:.2e} of its largest logit"
    assert abs(float(ours.expected_macs()) - float(eager_cost(eager))) < 1e-6 * base
    rows = []
    for what, variants in (("train_step", {"eager": stepper(eager, eager_cost),
                                            "eager channels-last": stepper(eager_cl, eager_cost),
                                            "nasprune": stepper(ours, ours_macs)}),
                           ("expected_macs", {"eager": cost_only(eager, eager_cost), "nasprune": cost_only(ours, ours_macs)})):
        times = _common.compare_ms(variants, device, rounds=4 if what == "train_step" else 9,
                                   reps=2 if what == "train_step" else 20, warmup=1)
        for impl, ms in times.items():
            rows.append({"bench": f"gated_{what}", "impl": impl, "model": name, "size": size, "batch": batch,
                         "median_ms": ms, "speedup_vs_eager": times["eager"] / ms,
                         "speedup_vs_eager_cl": times["eager channels-last"] / ms if what == "train_step" else None,
                         "layout": "channels_last" if impl != "eager" and (impl != "nasprune" or ours.channels_last)
                         else "contiguous",
                         "sites": sum(len(s) for s in ours.site_info.values()),
                         "fused": sum(s.kind == "fused" for v in ours.site_info.values() for s in v)})
    return rows


def main():
    p = _common.step_parser(__doc__)
    p.add_argument("--models", default="resnet56,mobilenet_v2")
    args = p.parse_args()
    device, batch = _common.step_setup(args)
    rows = []
    for name in args.models.split(","):
        rows += case(name, batch, args.size, device)
    print(_common.table(rows, ["bench", "impl", "model", "batch", "median_ms", "speedup_vs_eager",
                               "speedup_vs_eager_cl", "sites", "fused"]))
    if not args.no_record:
        print("recorded to", _common.record("gated", device, rows))


if __name__ == "__main__":
    main()
