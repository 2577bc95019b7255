"""Filter-importance scores for a whole network: nasprune's one-launch segmented reduction against
the best per-layer PyTorch loop of the same criterion (torch.linalg.vector_norm per layer for l1 /
l2, a batched dot product for taylor), torch.compile of that loop, and Torch-Pruning's group
importance where it is installed. Also the cost of accumulating the activation-Taylor score in a
gated layer's backward, against the hook-based way a user would compute it without nasprune.

    python benchmarks/bench_scores.py                        # CPU, fp32: ResNet-50, MobileNetV2, ResNet-56
    python benchmarks/bench_scores.py --device cuda --dtype bfloat16

Models: torchvision ResNet-50 and MobileNetV2 (random weights, nothing downloaded) and the CIFAR
ResNet-56 of nasprune.models. GB/s counts the bytes every score must read once (weights, plus
gradients for taylor). Each case is timed `--repeats` times (medians of `_common.median_ms`) and
the median is reported, with the machine's load average. Appends rows to
benchmarks/results/scores.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import nasprune  # noqa: E402,F401
from nasprune import ops  # noqa: E402
from nasprune import scores as S  # noqa: E402


def models() -> dict[str, tuple[nn.Module, tuple]]:
    out = {}
    try:
        import torchvision
        out["resnet50"] = (torchvision.models.resnet50(), (1, 3, 224, 224))
        out["mobilenet_v2"] = (torchvision.models.mobilenet_v2(), (1, 3, 224, 224))
    except ImportError:
        print("note: torchvision is not installed; ResNet-50 and MobileNetV2 skipped")
    try:
        from nasprune.models import cifar_resnet56
        out["resnet56"] = (cifar_resnet56(), (1, 3, 32, 32))
    except ImportError:
        print("note: nasprune.models is not available; CIFAR ResNet-56 skipped")
    return out


# --- the per-layer loops a user would write (no temporaries where PyTorch allows) ------------


def loops(kind: str):
    if kind == "l1":
        return {"loop vector_norm": lambda ws, gs: [torch.linalg.vector_norm(w.flatten(1), 1, dim=1)
                                                     for w in ws],
                "loop abs-sum": lambda ws, gs: [w.flatten(1).abs().sum(1) for w in ws]}
    if kind == "l2":
        return {"loop vector_norm": lambda ws, gs: [torch.linalg.vector_norm(w.flatten(1), 2, dim=1)
                                                     for w in ws]}
    return {"loop bmm": lambda ws, gs: [torch.bmm(w.reshape(w.shape[0], 1, -1),
                                                  g.reshape(g.shape[0], -1, 1)).flatten().abs()
                                        for w, g in zip(ws, gs)],
            "loop mul-sum": lambda ws, gs: [(w * g).flatten(1).sum(1).abs() for w, g in zip(ws, gs)]}


def torch_pruning_importance(model, example, kind, device):
    """Group importance of every group as Torch-Pruning computes it (its dependency graph is built
    once, outside the timing). Its groups also read the consumers' input-channel slices, so it
    reads about twice the bytes nasprune's producer-only scores read."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    imp = {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1, normalizer=None),
           "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None),
           "taylor": lambda: tp.importance.GroupTaylorImportance(normalizer=None, multivariable=True),
           "bn": lambda: tp.importance.BNScaleImportance(normalizer=None),
           "fpgm": lambda: tp.importance.FPGMImportance(normalizer=None)}.get(kind)
    if imp is None:
        return None
    imp = imp()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(example, device=device))
    groups = list(dg.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))

    def run():
        with torch.no_grad():
            return [imp(g) for g in groups]
    return run


def nasprune_groups(model, example, device):
    try:
        from nasprune.graph import trace
    except ImportError:
        return None
    return trace(model, torch.randn(example, device=device))


def score_cases(name, model, example, kind, device, dtype, repeats, compile_, peers):
    model = model.to(device, dtype)
    layers = S.scored_layers(model)
    ws = [m.weight.detach() for m in layers.values()]
    gs = []
    if kind == "taylor":
        for m in layers.values():
            m.weight.grad = torch.randn_like(m.weight)
        gs = [m.weight.grad for m in layers.values()]
    nbytes = sum(w.numel() * w.element_size() for w in ws) * (2 if kind == "taylor" else 1)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    fns = {"nasprune op": no_grad(lambda: ops.filter_scores(ws, kind, gs or None)),
           "nasprune filter_scores(model)": lambda: S.filter_scores(model, kind)}
    loop_names = []
    for impl, fn in loops(kind).items():
        fns[impl] = no_grad(lambda fn=fn: fn(ws, gs))
        loop_names.append(impl)
    if compile_:
        compiled = torch.compile(next(iter(loops(kind).values())))
        fns["torch.compile(loop)"] = no_grad(lambda: compiled(ws, gs))
    group_fns = {}
    if peers:
        graph = nasprune_groups(model, example, device)
        if graph is not None:
            group_fns["nasprune group scores"] = lambda: S.group_scores(S.filter_scores(model, kind), graph)
        tp_run = torch_pruning_importance(model, example, kind, device)
        if tp_run is not None:
            group_fns["torch-pruning group importance"] = tp_run
    ms = _common.compare_ms({**fns, **group_fns}, device, rounds=repeats, reps=10, warmup=2)
    best = min(ms[n] for n in loop_names)
    rows = []
    for impl, t in ms.items():
        fused_pass = impl in fns
        rows.append({"model": name, "criterion": kind, "impl": impl, "ms": t,
                     "x best loop": best / t if fused_pass else None,
                     "GB/s": nbytes / (t * 1e-3) / 1e9 if fused_pass else None})
    return rows


def activation_taylor_cases(device, dtype, repeats):
    """One training step of a gated conv-BN-ReLU layer with and without activation-Taylor
    tracking, and the plain-PyTorch way: forward hook keeps y, a tensor hook reduces dy * y."""
    from nasprune.nn import GatedConvBNAct2d
    shape = (64, 64, 56, 56) if device.type == "cuda" else (16, 64, 32, 32)
    layer = GatedConvBNAct2d(64, 64, 3, padding=1).to(device, dtype)
    plain = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                          nn.ReLU()).to(device, dtype)
    x = torch.randn(shape, device=device, dtype=dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)
    acc = torch.zeros(64, device=device)

    def hook(_, __, y):
        def reduce(g):  # an extra read of dy and y per layer and batch
            acc.add_((g.float() * y.float()).sum((0, 2, 3)).abs())
        y.register_hook(reduce)
    handle = None

    def step(module):
        def run():
            for p in module.parameters():
                p.grad = None
            module(x).backward(dy)
        return run

    def variant(module, track):
        def run():
            nonlocal handle
            if module is layer:
                layer.track_activation_taylor(track)
            elif track:
                handle = plain.register_forward_hook(hook)
            try:
                step(module)()
            finally:
                if handle is not None:
                    handle.remove()
                    handle = None
        return run

    ms = _common.compare_ms({"nasprune gated step": variant(layer, False),
                             "nasprune gated step + activation_taylor": variant(layer, True),
                             "plain step": variant(plain, False),
                             "plain step + hook dy*y": variant(plain, True)},
                            device, rounds=repeats, reps=10, warmup=2)
    rows = [{"model": f"conv-bn-relu {tuple(shape)}", "criterion": "activation_taylor",
             "impl": impl, "ms": t} for impl, t in ms.items()]
    base = {r["impl"]: r["ms"] for r in rows}
    rows[1]["overhead %"] = 100 * (base["nasprune gated step + activation_taylor"] /
                                   base["nasprune gated step"] - 1)
    rows[3]["overhead %"] = 100 * (base["plain step + hook dy*y"] / base["plain step"] - 1)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=str(_common.default_device()))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--criteria", nargs="*", default=["l1", "l2", "taylor"])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the loop")
    ap.add_argument("--no-peers", action="store_true", help="skip group importance (nasprune, Torch-Pruning)")
    ap.add_argument("--backends", nargs="*", default=None, help="CUDA backends (default: all built)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    rows = []
    if device.type == "cuda":
        rows.append({"model": "-", "criterion": "-", "impl": "copy bandwidth",
                     "GB/s": _common.copy_bandwidth_gbs(device)})
    else:  # a read-only stream: the best a reduction over 102 MB (ResNet-50) can do
        big = torch.randn(25_600_000, device=device)
        ms = _common.compare_ms({"sum": lambda: big.sum()}, device, rounds=args.repeats, reps=10, warmup=2)["sum"]
        rows.append({"model": "-", "criterion": "-", "impl": "torch.sum of 102 MB (read bw)",
                     "ms": ms, "GB/s": big.numel() * 4 / (ms * 1e-3) / 1e9})
        del big
    backends = _common.backends(device, args.backends)
    zoo = models()
    for backend in backends:
        with ops.use_backend(backend) if backend else contextlib.nullcontext():
            for name, (model, example) in zoo.items():
                if args.models and name not in args.models:
                    continue
                for kind in args.criteria:
                    part = score_cases(name, model, example, kind, device, dtype, args.repeats,
                                       not args.no_compile, not args.no_peers and backend in (None, backends[0]))
                    rows += _common.label_backend(part, backend)
                    print(_common.table(part, ["model", "criterion", "impl", "ms", "x best loop", "GB/s"]),
                          flush=True)
            part = activation_taylor_cases(device, dtype, args.repeats)
            rows += part
            print(_common.table(part, ["model", "criterion", "impl", "ms", "overhead %"]), flush=True)
    if device.type == "cuda":
        _common.add_copy_fraction(rows, rows[0]["GB/s"])
    load_after = os.getloadavg()
    print(f"\n{_common.device_name(device)}; {dtype}; torch {torch.__version__}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(_common.table(rows, ["model", "criterion", "impl", "ms", "x best loop", "GB/s", "% copy bw",
                               "overhead %"]))
    if not args.no_record:
        for r in rows:
            r.update(dtype=args.dtype, load_before=load_before[0], load_after=load_after[0])
        print("recorded in", _common.record("scores", device, rows))
    return rows


if __name__ == "__main__":
    main()
