"""Graph + slim pipeline benchmark.

1. Trace + group + slim of torchvision ResNet-50 (224x224): target under 2 s on the CI CPU.
2. Real speed from slimming: ResNet-50 and MobileNetV2 slimmed (uniform keep ratio, channel
   counts rounded to multiples of 8) to about half the MACs; CPU latency at batch 8 against
   the original (target >= 1.6x for ResNet-50), and GPU throughput when a GPU is present
   (--gpu-only: that alone).

3. ``--untied``: what an untied network's shortcut gathers cost (nasprune.graph.untie): the
   untied CIFAR ResNet-20 / ResNet-56 slimmed to 0.707 of every group's channels, each block
   keeping the leading channels (identity shortcuts) or channels of its own (every shortcut
   gathers), the same MACs and widths; CPU eval latency at batch 128, 2 threads, interleaved.

Appends one JSON line per figure to benchmarks/results/slim.jsonl with the device, the torch
version, the commit and the machine load (other processes distort CPU timings).

    python benchmarks/bench_slim.py [--repeats 5] [--latency-iters 20] [--models resnet50,mobilenet_v2]
    python benchmarks/bench_slim.py --skip-pipeline --gpu-only          # GPU throughput only
    python benchmarks/bench_slim.py --untied                            # 3. only
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import nasprune.flops as flops  # noqa: E402
import nasprune.graph as graph_mod  # noqa: E402
import nasprune.slim as slim  # noqa: E402


def record(entry: dict) -> None:
    device = torch.device("cuda" if entry["bench"].endswith("_gpu") else "cpu")
    _common.record("slim", device, [entry])
    print(json.dumps(entry))


def bench_pipeline(repeats: int) -> None:
    model = torchvision.models.resnet50()
    x = torch.randn(1, 3, 224, 224)
    trace_s, slim_s = [], []
    for _ in range(repeats + 1):  # the first run warms caches and is dropped
        t = time.perf_counter()
        graph = graph_mod.trace(model, x)
        t1 = time.perf_counter()
        slim.apply(model, graph, slim.uniform_keep(graph, 0.5))
        t2 = time.perf_counter()
        trace_s.append(t1 - t)
        slim_s.append(t2 - t1)
    trace_s, slim_s = trace_s[1:], slim_s[1:]
    totals = [a + b for a, b in zip(trace_s, slim_s)]
    record({"bench": "trace_group_slim", "model": "resnet50", "input": [1, 3, 224, 224],
            "groups": len(graph.groups), "trace_s_median": round(statistics.median(trace_s), 3),
            "slim_s_median": round(statistics.median(slim_s), 3),
            "total_s_median": round(statistics.median(totals), 3), "total_s_min": round(min(totals), 3),
            "target_s": 2.0, "repeats": repeats})


def half_flops_keep(model, x, round_to=8):
    """Uniform width (multiples of 8) whose slimmed MACs are closest to half the original's."""
    graph = graph_mod.trace(model, x)
    cost = flops.CostModel(graph)
    keep, ratio = slim.uniform_keep_at(graph, 0.5, round_to=round_to, cost=cost)
    return graph, keep, ratio, cost.exact(keep) / cost.total()


def _latency(model, x, iters: int) -> tuple[float, float]:
    """Median wall time and median CPU time (all threads) of one batch. On a shared, loaded
    machine wall time mostly measures waiting; CPU time still measures the work."""
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        wall, cpu = [], []
        for _ in range(iters):
            t, c = time.perf_counter(), time.process_time()
            model(x)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def bench_latency(name: str, iters: int, cpu: bool = True) -> None:
    model = torchvision.models.get_model(name).eval()
    graph, keep, ratio, macs_ratio = half_flops_keep(model, torch.zeros(1, 3, 224, 224))
    slimmed = slim.apply(model, graph, keep).eval()
    for layout in ("nchw", "channels_last") if cpu else ():
        x = torch.randn(8, 3, 224, 224)
        if layout == "channels_last":  # oneDNN's preferred layout: no reorders around each conv
            model, slimmed = (m.to(memory_format=torch.channels_last) for m in (model, slimmed))
            x = x.to(memory_format=torch.channels_last)
        _record_latency(name, layout, model, slimmed, x, iters, ratio, macs_ratio)
    _gpu_throughput(name, model, slimmed)


def _record_latency(name, layout, model, slimmed, x, iters, ratio, macs_ratio) -> None:
    # alternate to spread load changes evenly over both models
    original, pruned = [], []
    for _ in range(3):
        original.append(_latency(model, x, max(1, iters // 3)))
        pruned.append(_latency(slimmed, x, max(1, iters // 3)))
    t_orig, t_slim = (statistics.median(t[0] for t in runs) for runs in (original, pruned))
    c_orig, c_slim = (statistics.median(t[1] for t in runs) for runs in (original, pruned))
    entry = {"bench": "slimmed_latency", "model": name, "layout": layout, "batch": 8, "input": 224,
             "keep_ratio": round(ratio, 4), "macs_original": flops.count(model, x[:1]),
             "macs_slimmed": flops.count(slimmed, x[:1]), "macs_ratio": round(macs_ratio, 4),
             "params_original": flops.count_params(model), "params_slimmed": flops.count_params(slimmed),
             "latency_ms_original": round(t_orig * 1e3, 1), "latency_ms_slimmed": round(t_slim * 1e3, 1),
             "speedup": round(t_orig / t_slim, 3), "cpu_ms_original": round(c_orig * 1e3, 1),
             "cpu_ms_slimmed": round(c_slim * 1e3, 1), "speedup_cpu_time": round(c_orig / c_slim, 3)}
    if name == "resnet50":
        entry["target_speedup"] = 1.6
    record(entry)


def _gpu_throughput(name, model, slimmed) -> None:
    if torch.cuda.is_available():
        x = torch.randn(8, 3, 224, 224)
        xs = x.cuda()
        model, slimmed = model.cuda(), slimmed.cuda()
        thr = {}
        for label, m in (("original", model), ("slimmed", slimmed)):
            with torch.inference_mode():
                for _ in range(5):
                    m(xs)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(50):
                    m(xs)
                end.record()
                torch.cuda.synchronize()
                thr[label] = 50 * xs.shape[0] / (start.elapsed_time(end) / 1e3)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        layout = "channels_last" if conv.weight.is_contiguous(memory_format=torch.channels_last) else "nchw"
        record({"bench": "slimmed_throughput_gpu", "model": name, "batch": 8, "weights_layout": layout,
                "images_per_s_original": round(thr["original"], 1), "images_per_s_slimmed": round(thr["slimmed"], 1),
                "speedup": round(thr["slimmed"] / thr["original"], 3)})


def bench_untied(rounds: int = 7) -> None:
    """3.: the untied network with its blocks' own channels against the leading ones."""
    from nasprune.graph.untie import untie
    from nasprune.models import cifar_resnet20, cifar_resnet56
    x = torch.randn(128, 3, 32, 32)
    for name, build in (("cifar_resnet20", cifar_resnet20), ("cifar_resnet56", cifar_resnet56)):
        torch.manual_seed(0)
        model = build(num_classes=10).eval()
        untied = untie(model, x[:1]).eval()
        graph = graph_mod.trace(untied, x[:1])
        gen = torch.Generator().manual_seed(0)
        lead, own = {}, {}
        for group in graph.prunable_groups:
            n = max(1, round(group.size * 0.707))
            lead[group.index] = torch.arange(n)
            own[group.index] = torch.randperm(group.size, generator=gen)[:n].sort().values
        nets = {"leading channels": slim.apply(untied, graph, lead).eval(),
                "own channels": slim.apply(untied, graph, own).eval()}
        macs = {k: flops.count(v, x[:1]) for k, v in nets.items()}
        assert len(set(macs.values())) == 1, macs
        with torch.no_grad():
            times = _common.compare_ms({k: (lambda v=v: v(x)) for k, v in nets.items()}, torch.device("cpu"),
                                       rounds=rounds, reps=5, warmup=2)
        for impl, ms in times.items():
            record({"bench": "untied_gathers", "model": name, "impl": impl, "batch": 128, "median_ms": ms,
                    "macs_fraction": macs[impl] / flops.count(model, x[:1]),
                    "gathers": sum(sel.gathers for sel in nets[impl].selects.values()),
                    "slowdown_vs_leading": ms / times["leading channels"], "threads": torch.get_num_threads()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-iters", type=int, default=21)
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the GPU throughput of each model (no CPU latency); needs a GPU")
    parser.add_argument("--untied", action="store_true", help="3. only: the cost of an untied network's gathers")
    args = parser.parse_args()
    if args.gpu_only and not torch.cuda.is_available():
        parser.error("--gpu-only needs a CUDA GPU")
    torch.manual_seed(0)
    if args.untied:
        bench_untied()
        return
    if not args.skip_pipeline:
        bench_pipeline(args.repeats)
    for name in filter(None, args.models.split(",")):
        bench_latency(name, args.latency_iters, cpu=not args.gpu_only)


if __name__ == "__main__":
    main()
