"""PaS (issue 15): what the search buys at inference, and what its training step costs.

1. ``deploy``: the reparameterised RepVGG-A0 slimmed by PaS to about 0.5 of the MACs against the
   unpruned reparameterised one (both plain 3x3-conv networks, eval, no autograd), at 32x32 (the
   CIFAR configuration) and 224x224 (the ImageNet one), batch 8 and 64. The slimmed network is
   PaS's own export (``PaS.export()``: budget keep, reparameterise) with the gates set to fall
   across each group's channels, w = 1 - (c + 0.5) / C: the keep then cuts every group to about
   one fraction, the shape of a uniform-width network at 0.5 of the MACs (the shape, not which
   channels, decides the speed; a searched shape is measured by the quality protocol). Twice:
   with every width as the budget gives it (``round_to=1``: 34, 68, 135, 903 channels) and
   rounded down to multiples of 8 (``PaS(round_to=8)``: 32, 64, 136, 904; 0.486-0.488 of the MACs).
2. ``step``: one PaS training step (CE + lambda * (MACs(m) / MACs_0 - rho)^2, one SGD step on the
   weights and the gates, the gates projected) of nasprune.search.PaS against an eager PaS as the
   official code writes it: plain modules with a depthwise 1x1 convolution per DBC (its kernel
   the binarised gate, straight-through), the MACs of the mask summed layer by layer in Python,
   on a gated ResNet-56 and RepVGG-A0 at 32x32, batch 64. Both hold the same weights and gates,
   restored before every timed step (a step moves the gates, and with them what is closed), in
   three states: ``spread`` (gates uniform in [0, 1]: about 45 % of the channels closed, 0.25-0.27
   of the MACs; the state of the earlier sessions' figures), ``target`` (a random keep at 0.5 of
   the MACs, the budget keep's: a search at its target) and ``open`` (every gate at its initial
   1.0: the first step, where nasprune's skipping of closed channels has nothing to skip).
   ``--skip-closed`` sets GatedNetwork.skip_closed (auto: on on the CPU, off on a GPU).
3. ``--trajectory N`` (off by default): the first N steps of a search from the open state
   (gate_lr 0.1, random batches), two identical searchers stepping alternately, one skipping
   closed channels and one not, the eager step timed every tenth step: what the skipping buys as
   the regulariser closes channels, step by step (per-step times and the mask's MACs).

    python benchmarks/bench_pas.py                      # CPU, 2 threads
    python benchmarks/bench_pas.py --device cuda        # GPU (step batch 256)

Interleaved in one process; appends rows to benchmarks/results/pas.jsonl.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from bench_gated import build, eager_macs, eager_network  # noqa: E402

from nasprune import flops, models  # noqa: E402
from nasprune.search import PaS  # noqa: E402
from nasprune.search.gated_searcher import gates_as  # noqa: E402


# ------------------------------------------------------------------ 1. the deployed network
def slimmed_pair(size: int, round_to: int = 1):
    """(unpruned, PaS-slimmed) reparameterised RepVGG-A0 for ``size`` inputs, the MACs ratio and
    how the keep was chosen."""
    torch.manual_seed(0)
    model = models.cifar_repvgg_a0() if size <= 64 else models.repvgg_a0()
    x0 = torch.zeros(1, 3, size, size)
    s = PaS(model, 0.5, example_inputs=x0, device="cpu", round_to=round_to)
    gn = s.gn
    with torch.no_grad():
        for g in gn.groups:
            o, size = gn.offsets[g], gn.sizes[g]
            gn.gate[o:o + size] = 1 - (torch.arange(size) + 0.5) / size
    pruned = s.export()
    full, slim = model.eval().reparameterize(), pruned.eval().reparameterize()
    ratio = flops.count(slim, x0) / flops.count(full, x0)
    return full, slim, ratio, s.architecture()["selected_by"]


def deploy_rows(device, batches=(8, 64), sizes=(32, 224), round_tos=(1, 8)) -> list[dict]:
    rows = []
    for size in sizes:
        pairs = {r: slimmed_pair(size, r) for r in round_tos}
        full = pairs[round_tos[0]][0].to(device)
        slims = {r: p[1].to(device) for r, p in pairs.items()}
        for batch in batches:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
            with torch.inference_mode():
                variants = {"unpruned": lambda: full(x), **{r: (lambda m=m: m(x)) for r, m in slims.items()}}
                times = _common.compare_ms(variants, device, rounds=7, reps=3 if size > 64 else 10, warmup=2)
            for r, slim in slims.items():
                rows.append({"bench": "pas_deploy", "model": "repvgg_a0", "size": size, "batch": batch,
                             "round_to": r, "unpruned_ms": times["unpruned"], "pas_ms": times[r],
                             "speedup": times["unpruned"] / times[r], "macs_ratio": pairs[r][2],
                             "selected_by": pairs[r][3], "widths": slim.widths(), "threads": torch.get_num_threads(),
                             "only_3x3": all(m.kernel_size == (3, 3) for m in slim.modules()
                                             if isinstance(m, nn.Conv2d))})
    return rows


# ------------------------------------------------------------------ 2. the training step
class EagerDBC(nn.Module):
    """A DBC as the official code writes it: a depthwise 1x1 convolution whose kernel is the
    channel's binarised gate (a multiply for a 2-D activation)."""

    def __init__(self, index, dim):
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.dim = dim

    def forward(self, x, values):
        m = values.index_select(0, self.index)
        if x.dim() == 4 and self.dim == 1:
            return F.conv2d(x, m.view(-1, 1, 1, 1).to(x.dtype), groups=x.shape[1])
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * m.view(shape)


def eager_pas_network(model, x):
    """The gated model with a depthwise 1x1 conv per site, plain modules, NCHW."""
    gn = eager_network(model, x)
    for mode_sites in gn.site_info.values():
        for site in mode_sites:
            gn.sites[site.name] = EagerDBC(site.index, site.dim % 4 if site.dim < 0 else site.dim)
    for gm in gn._modes.values():
        for name, module in gn.sites.items():
            gm.sites._modules[name] = module
    return gn


def eager_twin(model, x, s: PaS, device):
    """The eager network of ``model`` on ``device`` with searcher ``s``'s gate function and values."""
    eager = eager_pas_network(model, x).to(device)
    eager.gate_fn = s.gn.gate_fn
    with torch.no_grad():
        eager.gate.copy_(s.gn.gate)
    return eager


class EagerPaS:
    """PaS's step on the eager network: CE + lambda * (MACs(m) / MACs_0 - rho)^2 with the MACs
    summed per layer, one SGD optimiser for weights and gates, then the gates clamped to [0, 1]
    and the largest gate of every group held at the floor."""

    def __init__(self, net, s: PaS):
        self.net, self.s = net, s
        weights = [p for n, p in net.named_parameters() if n != "gate"]
        group = s.optimizer.param_groups
        self.opt = torch.optim.SGD([{"params": weights, "weight_decay": group[0]["weight_decay"]},
                                    {"params": [net.gate], "lr": group[1]["lr"], "weight_decay": 0.0}],
                                   lr=group[0]["lr"], momentum=group[0]["momentum"])
        self.groups = [(net.offsets[g], net.sizes[g]) for g in net.groups]

    def step(self, batch):
        net, s = self.net, self.s
        net.train()
        x, y = batch
        ce = F.cross_entropy(net(x), y)
        ratio = eager_macs(net, net.gate_fn(net.gate)) / float(net.base_macs)
        loss = ce + s.cost_weight * (ratio - s.flops_target) ** 2
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            net.gate.clamp_(0.0, 1.0)
            for o, size in self.groups:
                v = net.gate[o:o + size]
                top = v.argmax()
                v[top] = v[top].clamp_min(s.gate_floor)


def step_rows(name, batch, size, device, gates="spread", skip_closed=None) -> list[dict]:
    torch.manual_seed(0)
    model = build(name)
    x0 = torch.zeros(1, 3, size, size)
    s = PaS(model, 0.5, example_inputs=x0, gate_lr=0.1, device=device)
    s.gn.skip_closed = skip_closed
    with torch.no_grad():
        if gates != "open":  # gates around the threshold, so the mask and its MACs are not trivial
            s.gn.gate.copy_(torch.rand(s.gn.num_gates, generator=torch.Generator().manual_seed(1)).to(device))
        if gates == "target":   # the budget keep ranks by the gate values: rank by the raw ones
            with gates_as(s.gn, s.gn.gate.detach().clone()):
                keep = s.gn.keep("budget", macs=0.5)
            s.gn.gate.copy_(0.25 + 0.5 * s.gn.keep_vector(keep).to(s.gn.gate))
    held = s.gn.gate.detach().clone()
    eager = eager_twin(model, x0, s, device)
    g = torch.Generator().manual_seed(0)
    batch_xy = (torch.randn(batch, 3, size, size, generator=g).to(device),
                torch.randint(0, 10, (batch,), generator=g).to(device))
    with torch.no_grad(), _common.strict_fp32():       # the same function before timing drifts the weights
        s.gn.eval(), eager.eval()
        err = _common.rel_err(s.gn(batch_xy[0][:8]), eager(batch_xy[0][:8]))
        mask = s.mask()
        macs_err = abs(float(s.gn.expected_macs(mask)) - float(eager_macs(eager, mask)))
    assert err < 1e-4, f"{name}: the eager twin differs by {err:.2e} of its largest logit"
    assert macs_err < 1e-6 * s.gn.base_macs, f"{name}: the eager MACs differ by {macs_err}"
    e = EagerPaS(eager, s)

    def hold():  # both networks back at the state's gates
        with torch.no_grad():
            s.gn.gate.copy_(held), eager.gate.copy_(held)
    times = _common.compare_ms({"eager": lambda: (hold(), e.step(batch_xy)),
                                "nasprune": lambda: (hold(), s.step(batch_xy))},
                               device, rounds=6, reps=2, warmup=1)
    hold()
    closed = float((s.gn.gate_fn(s.gn.gate) == 0).float().mean())
    return [{"bench": "pas_step", "impl": impl, "model": name, "size": size, "batch": batch, "median_ms": ms,
             "speedup_vs_eager": times["eager"] / ms, "gates": s.gn.num_gates, "gate_state": gates,
             "closed": closed, "macs_ratio": float(s.gn.expected_macs(mask)) / s.gn.base_macs,
             "skip_closed": {None: "auto", True: "on", False: "off"}[skip_closed],
             "threads": torch.get_num_threads()}
            for impl, ms in times.items()]


def trajectory_rows(name, batch, size, device, steps) -> list[dict]:
    torch.manual_seed(0)
    model = build(name)
    x0 = torch.zeros(1, 3, size, size)
    searchers = {}
    for skip in (True, False):
        searchers[skip] = PaS(model, 0.5, example_inputs=x0, gate_lr=0.1, device=device, seed=0)
        searchers[skip].gn.skip_closed = skip
    e = EagerPaS(eager_twin(model, x0, searchers[True], device), searchers[True])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, generator=g).to(device),
                torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(8)]
    rows, eager_ms = [], []
    for i in range(steps):
        xy = batches[i % len(batches)]
        row = {"bench": "pas_trajectory", "model": name, "size": size, "batch": batch, "step": i,
               "threads": torch.get_num_threads()}
        for skip in ((True, False) if i % 2 == 0 else (False, True)):
            s = searchers[skip]
            if skip:
                with torch.no_grad():
                    row["macs_ratio"] = float(s.gn.expected_macs(s.mask())) / s.gn.base_macs
            row["skip_ms" if skip else "dense_ms"] = _common.median_ms(lambda: s.step(xy), device, warmup=0, reps=1,
                                                                       min_time_s=0.0)
        if i % 10 == 0:
            eager_ms.append(_common.median_ms(lambda: e.step(xy), device, warmup=0, reps=1, min_time_s=0.0))
        rows.append(row)
    summary = {"bench": "pas_trajectory_summary", "model": name, "size": size, "batch": batch, "steps": steps,
               "skip_ms_mean": sum(r["skip_ms"] for r in rows[1:]) / (steps - 1),
               "dense_ms_mean": sum(r["dense_ms"] for r in rows[1:]) / (steps - 1),
               "eager_ms_median": statistics.median(eager_ms[1:] or eager_ms),
               "macs_ratio_last": rows[-1]["macs_ratio"], "threads": torch.get_num_threads()}
    summary["skip_vs_dense"] = summary["dense_ms_mean"] / summary["skip_ms_mean"]
    summary["skip_vs_eager"] = summary["eager_ms_median"] / summary["skip_ms_mean"]
    summary["dense_vs_eager"] = summary["eager_ms_median"] / summary["dense_ms_mean"]
    return rows + [summary]


def main():
    p = _common.step_parser(__doc__)
    p.add_argument("--models", default="resnet56,repvgg_a0", help="models of the step benchmark")
    p.add_argument("--skip", choices=("deploy", "step"), default=None)
    p.add_argument("--gate-states", default="spread,target,open", help="step gate states: spread, target, open")
    p.add_argument("--trajectory", type=int, default=0, help="steps of the search trajectory (0: none)")
    p.add_argument("--skip-closed", choices=("auto", "on", "off"), default="auto",
                   help="GatedNetwork.skip_closed in the step (auto: on on the CPU, off on a GPU)")
    args = p.parse_args()
    device, batch = _common.step_setup(args)
    rows = []
    if args.skip != "deploy":
        rows += deploy_rows(device)
        print(_common.table(rows, ["size", "batch", "round_to", "unpruned_ms", "pas_ms", "speedup", "macs_ratio",
                                   "only_3x3"]),
              flush=True)
    if args.skip != "step":
        skip_closed = {"auto": None, "on": True, "off": False}[args.skip_closed]
        for name in args.models.split(","):
            for gates in args.gate_states.split(","):
                rows += step_rows(name, batch, args.size, device, gates, skip_closed)
                print(_common.table(rows[-2:], ["impl", "model", "gate_state", "closed", "macs_ratio", "median_ms",
                                                "speedup_vs_eager"]), flush=True)
    if args.trajectory:
        for name in args.models.split(","):
            traj = trajectory_rows(name, batch, args.size, device, args.trajectory)
            rows += traj
            marks = [r for r in traj[:-1] if r["step"] % max(1, args.trajectory // 8) == 0]
            print(_common.table(marks, ["model", "step", "macs_ratio", "skip_ms", "dense_ms"]), flush=True)
            print(_common.table(traj[-1:], ["model", "steps", "skip_ms_mean", "dense_ms_mean", "eager_ms_median",
                                            "skip_vs_dense", "skip_vs_eager", "dense_vs_eager"]), flush=True)
    _common.finish("pas", device, rows, args)


if __name__ == "__main__":
    main()
