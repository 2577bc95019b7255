"""DAIS search step (an SGD step on the weights, then an Adam step on the indicator logits alpha)
of nasprune.search.DAIS against a straightforward eager DAIS, sharing the same weights, alphas,
temperature and data, timed interleaved in one process.

The eager DAIS is what a user writes without nasprune's engine: plain modules with a gate
multiply ``x * sigmoid(alpha / T).view(1, -1, 1, 1)`` after every gated layer (bench_gated's
eager twin), the expected MACs and the alpha > 0 MACs summed layer by layer in Python, every
parameter requiring a gradient in both passes, and the minimum-width prior as a top-1 clamp per
group. It is timed NCHW (as a user writes it) and channels-last (the layout nasprune runs in).

    python benchmarks/bench_dais.py                     # CPU: ResNet-56, MobileNetV2, 32x32, batch 64
    python benchmarks/bench_dais.py --device cuda       # GPU: batch 256

Appends rows to benchmarks/results/dais.jsonl (stamped with the 1-minute load average).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from bench_gated import build, eager_macs, eager_network  # noqa: E402

from nasprune.search import DAIS, cost_loss  # noqa: E402


class EagerDAIS:
    """DAIS's step written directly on an eager gated network (see the module docstring)."""

    def __init__(self, net, s: DAIS):
        self.net, self.s = net, s
        weights = [p for n, p in net.named_parameters() if n != "gate"]
        self.w_opt = torch.optim.SGD(weights, lr=s.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        self.a_opt = torch.optim.Adam([net.gate], lr=s.alpha_lr, betas=(0.5, 0.999))
        self.groups = [(net.offsets[g], net.sizes[g]) for g in net.groups]

    def step(self, weight_batch, arch_batch):
        net, s = self.net, self.s
        net.train()
        x, y = weight_batch
        loss = F.cross_entropy(net(x), y)
        self.w_opt.zero_grad(set_to_none=True)
        self.a_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.w_opt.step()
        xa, ya = arch_batch
        base = float(net.base_macs)
        indicators = torch.sigmoid(net.gate / s.temperature)
        expected = eager_macs(net, indicators) / base
        with torch.no_grad():
            discrete = eager_macs(net, (net.gate > 0).float()) / base
        loss_a = F.cross_entropy(net(xa), ya) + s.cost_weight * cost_loss(
            expected, discrete, s.flops_target - s.flops_margin, s.flops_tolerance - 2 * s.flops_margin)
        self.w_opt.zero_grad(set_to_none=True)
        self.a_opt.zero_grad(set_to_none=True)
        loss_a.backward()
        self.a_opt.step()
        with torch.no_grad():
            for o, size in self.groups:
                v = net.gate[o:o + size]
                top = v.argmax()
                v[top] = v[top].clamp_min(s.alpha_floor)


def case(name, batch, size, device):
    torch.manual_seed(0)
    model = build(name)
    x0 = torch.zeros(1, 3, size, size)
    s = DAIS(model, 0.5, example_inputs=x0, device=device)
    twins = {"eager": eager_network(model, x0), "eager channels-last": eager_network(model, x0, "channels_last")}
    for twin in twins.values():
        twin.to(device)
        twin.gate_fn = s.gn.gate_fn                      # the same temperature
        with torch.no_grad():
            twin.gate.copy_(s.gn.gate)
    g = torch.Generator().manual_seed(0)

    def data():
        return (torch.randn(batch, 3, size, size, generator=g).to(device),
                torch.randint(0, 10, (batch,), generator=g).to(device))
    wb, ab = data(), data()
    eager = {k: EagerDAIS(net, s) for k, net in twins.items()}
    with torch.no_grad(), _common.strict_fp32():       # the same function before timing drifts the weights
        s.gn.eval(), twins["eager"].eval()
        err = _common.rel_err(s.gn(wb[0][:8]), twins["eager"](wb[0][:8]))
    assert err < 1e-4, f"{name}: the eager twin differs by {err:.2e} of its largest logit"
    variants = {k: (lambda e=e: e.step(wb, ab)) for k, e in eager.items()}
    variants["nasprune"] = lambda: s.step(wb, ab)
    times = _common.compare_ms(variants, device, rounds=6, reps=2, warmup=1)
    return [{"bench": "dais_step", "impl": impl, "model": name, "size": size, "batch": batch, "median_ms": ms,
             "speedup_vs_eager": times["eager"] / ms, "speedup_vs_eager_cl": times["eager channels-last"] / ms,
             "gates": s.gn.num_gates, "threads": torch.get_num_threads()}
            for impl, ms in times.items()]


def main():
    p = _common.step_parser(__doc__)
    p.add_argument("--models", default="resnet56,mobilenet_v2")
    args = p.parse_args()
    device, batch = _common.step_setup(args)
    rows = []
    for name in args.models.split(","):
        rows += case(name, batch, args.size, device)
        print(_common.table(rows[-3:], ["impl", "model", "batch", "median_ms", "speedup_vs_eager",
                                        "speedup_vs_eager_cl"]), flush=True)
        _common.print_load()
    _common.finish("dais", device, rows, args)


if __name__ == "__main__":
    main()
