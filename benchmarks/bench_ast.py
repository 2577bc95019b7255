"""AST's training step on the physically slimmed sub-network against the same step on the masked
full-width target, timed interleaved in one process; and the wall time of a short AST loop.

The two steps compute the same function: the sub-network is ``slim.apply`` of the target at a
keep set of about half the MACs, with its filter weights alpha (nasprune.search.AST's
``_Subnet``); the masked target is the full-width gated network whose gate is alpha times the
keep's 0/1 mask (``gate="sampled"``), every removed channel convolved and then zeroed. Each step is
one SGD step on the weights with cross-entropy (alpha frozen), as AST trains its sub-networks, with
the same SGD settings for both. The ratio is why AST trains its sub-networks slimmed (issue 17:
>= 1.6x at ResNet-56, batch 128, CPU).

The keep set (--keeps) is "sampled", what AST itself trains: the warm-started searcher's own
sampling (uniform first policy, its thresholds, Gumbel noise, ``round_to`` from --round-to), the
draw (of 400, seeded) within the target closest to it; or "uniform", slim.uniform_keep_at the
target (the residual streams keep more than the blocks' inner widths).

The loop row times ``AST.search`` on random CIFAR-size data: its steps, sub-networks, and the
seconds each sub-network costs beyond its training steps (slimming, tracing the gated
sub-network, validation, map-back, the policy update).

    python benchmarks/bench_ast.py                          # CPU: ResNet-56, batch 128, 2 threads
    python benchmarks/bench_ast.py --device cuda --batch 256
    python benchmarks/bench_ast.py --rounds 1 --reps 1 --no-record --no-loop     # a smoke run
    python benchmarks/bench_ast.py --no-loop --keeps sampled,uniform --round-to 8

Appends rows to benchmarks/results/ast.jsonl (stamped with the 1-minute load average).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from nasprune import flops, slim  # noqa: E402
from nasprune.data import ImageDataset  # noqa: E402
from nasprune.models import cifar_resnet20, cifar_resnet56  # noqa: E402
from nasprune.search import AST  # noqa: E402
from nasprune.search.ast_search import _Subnet  # noqa: E402

MODELS = {"resnet56": cifar_resnet56, "resnet20": cifar_resnet20}


def sampled_keep(s: AST, draws: int = 400) -> dict:
    """The searcher's own sample (its first policy's thresholds, its noise and rounding) whose
    cost is within the target and closest to it, of ``draws`` seeded draws."""
    best = None
    for _ in range(draws):
        actions = s.sample_actions(s.policy_features())
        keep = s.sample_keep(torch.tensor([s.thresholds[a] for a in actions.tolist()], dtype=torch.float64))
        cost = s.cost(keep)
        if cost <= s.target and (best is None or cost > best[0]):
            best = (cost, keep)
    if best is None:
        raise SystemExit(f"no sampled sub-network within {s.target} of the MACs in {draws} draws")
    return best[1]


def step_case(name, batch, size, device, target, rounds, reps, keep_kind="sampled", round_to=1):
    torch.manual_seed(0)
    model = MODELS[name](num_classes=10)
    x0 = torch.zeros(1, 3, size, size)
    s = AST(model, target, example_inputs=x0, start="warm", round_to=round_to, device=device)
    gn = s.gn
    keep = sampled_keep(s) if keep_kind == "sampled" else slim.uniform_keep_at(gn.graph, target, round_to=round_to)[0]
    features = s.policy_features()
    sub = _Subnet(s, keep, features, torch.zeros(len(gn.groups), dtype=torch.long))
    gn.gate_fn.sample(gn.keep_vector(keep).float())          # the masked full-width target
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(batch, 3, size, size, generator=g).to(device),
            torch.randint(0, 10, (batch,), generator=g).to(device))
    with torch.no_grad(), _common.strict_fp32():
        gn.eval(), sub.gn.eval()
        err = _common.rel_err(sub.gn(data[0][:8]), gn(data[0][:8]))
    assert err < 1e-4, f"{name}: the slimmed sub-network differs from the masked target by {err:.2e}"
    w_opt = torch.optim.SGD(s.weights, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=True)
    variants = {"slimmed sub-network": lambda: s._train_step(sub.gn, sub.w_opt, sub.a_opt, data, False),
                "masked full-width target": lambda: s._train_step(gn, w_opt, s.a_opt, data, False)}
    times = _common.compare_ms(variants, device, rounds=rounds, reps=reps, warmup=1)
    slimmed = slim.apply(model, gn.graph, keep)
    macs = flops.count(slimmed, x0) / flops.count(model, x0)
    widths = sorted({m.out_channels for m in slimmed.modules() if isinstance(m, torch.nn.Conv2d)})
    masked = times["masked full-width target"]
    return [{"bench": "ast_step", "impl": impl, "model": name, "size": size, "batch": batch, "median_ms": ms,
             "keep": keep_kind, "round_to": round_to, "macs_fraction": macs, "widths": widths,
             "speedup_vs_masked": masked / ms, "threads": torch.get_num_threads()} for impl, ms in times.items()]


def loop_case(name, batch, size, device, target, images, epochs, subnets):
    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8),
                        (np.arange(images) % 10).astype(np.int64), tuple(str(i) for i in range(10)))
    torch.manual_seed(0)
    s = AST(MODELS[name](num_classes=10), target, input_size=size, start="warm", subnets=subnets, device=device)
    t = time.perf_counter()
    s.search(data, epochs=epochs, batch_size=batch)
    _common.sync(torch.device(device))
    seconds = time.perf_counter() - t
    # the steps alone, again, on the last sub-network's shape: what the loop costs beyond them
    keep = {int(k): torch.tensor(v) for k, v in s.episodes[-1]["keep"].items()}
    sub = _Subnet(s, keep, s.policy_features(), torch.zeros(len(s.gn.groups), dtype=torch.long))
    x = (torch.randn(batch, 3, size, size).to(device), torch.randint(0, 10, (batch,)).to(device))
    step_ms = _common.median_ms(lambda: s._train_step(sub.gn, sub.w_opt, sub.a_opt, x, False), torch.device(device),
                                warmup=1, reps=3, min_time_s=0)
    return [{"bench": "ast_loop", "impl": "nasprune", "model": name, "size": size, "batch": batch,
             "images": images, "epochs": epochs, "steps": s.total_steps, "subnets": len(s.episodes),
             "loop_s": seconds, "step_ms": step_ms,
             "overhead_per_subnet_s": (seconds - s.total_steps * step_ms / 1e3) / len(s.episodes),
             "threads": torch.get_num_threads()}]


def main():
    p = _common.step_parser(__doc__)
    p.add_argument("--models", default="resnet56")
    p.add_argument("--target", type=float, default=0.5, help="MACs kept by the sub-network (default 0.5)")
    p.add_argument("--keeps", default="sampled", help="sampled (AST's own draw), uniform, or both: sampled,uniform")
    p.add_argument("--round-to", type=int, default=1, help="AST's round_to: sampled widths rounded down to a multiple")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-loop", action="store_true", help="skip the loop's wall time")
    p.add_argument("--loop-images", type=int, default=2048)
    p.add_argument("--loop-subnets", type=int, default=4)
    args = p.parse_args()
    device, _ = _common.step_setup(args)
    batch = args.batch or 128
    rows = []
    for name in args.models.split(","):
        for keep_kind in args.keeps.split(","):
            part = step_case(name, batch, args.size, device, args.target, args.rounds, args.reps, keep_kind,
                             args.round_to)
            rows += part
            print(_common.table(part, ["impl", "model", "batch", "keep", "round_to", "macs_fraction", "median_ms",
                                       "speedup_vs_masked"]), flush=True)
            print(f"  widths: {part[0]['widths']}", flush=True)
        if not args.no_loop:
            part = loop_case(name, batch, args.size, device, args.target, args.loop_images, 1, args.loop_subnets)
            rows += part
            print(_common.table(part, ["model", "steps", "subnets", "loop_s", "step_ms", "overhead_per_subnet_s"]),
                  flush=True)
        _common.print_load()
    _common.finish("ast", device, rows, args)


if __name__ == "__main__":
    main()
