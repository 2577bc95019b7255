"""Shared benchmark plumbing: timing (medians, CUDA-synchronised), the device copy bandwidth that
serves as the roofline, environment stamps, and appending results to benchmarks/results/."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, warmup: int = 3, reps: int = 20, min_time_s: float = 0.5) -> float:
    """Median wall time of fn() in milliseconds (CUDA: event-timed, L2 not flushed)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all < min_time_s and len(times) < 10 * reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compare_ms(variants: dict, device: torch.device, rounds: int = 9, reps: int = 5,
               warmup: int = 3) -> dict:
    """Median wall time (ms) of each of several functions that compute the same thing, timed
    interleaved: every round runs each variant `reps` times, the order rotating between rounds,
    so drift on a shared machine (other jobs, clocks, allocator state) hits all of them alike.
    Ratios between the results are what a benchmark reports."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    sync(device)
    samples = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(median_ms(variants[name], device, warmup=0, reps=reps, min_time_s=0.0))
    return {name: statistics.median(v) for name, v in samples.items()}


_NO_WORK = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::as_strided_",
            "aten::set_", "aten::lift_fresh", "aten::to", "aten::contiguous", "aten::result_type",
            "aten::_has_compatible_shallow_copy_type", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}


def _is_view(name: str) -> bool:
    """Whether an ATen op returns an alias of an input without writing it (a view: no kernel)."""
    packet = getattr(torch.ops.aten, name.split("::", 1)[1], None)
    if packet is None:
        return False
    schema = getattr(packet, packet.overloads()[0])._schema
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def launches(fn, device: torch.device) -> int:
    """Device work items one call of fn issues: on a GPU the kernels, copies and fills the
    profiler sees; on the CPU the ATen and nasprune ops that do work (innermost ops that are
    neither views nor allocations), each of which would be at least one launch on a GPU.
    A proxy for the per-step launch overhead of code made of many small ops. fn runs twice
    (the first call warms caches and optimiser state); the second is counted."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)

    def work(e):   # 0-dim operands only: CPU scalar wrapping, a kernel argument on a GPU
        return (e.name.startswith(("aten::", "nasprune::")) and e.name not in _NO_WORK and not _is_view(e.name)
                and any(len(shape) for shape in e.input_shapes))
    return sum(1 for e in events if work(e) and not any(work(c) for c in e.cpu_children))


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds "x eager" and "x compile" (speed relative to the rows of the same case whose impl is
    "eager" or "torch.compile") to every row."""
    eager = {r["case"]: r["ms"] for r in rows if r["impl"] == "eager"}
    compiled = {r["case"]: r["ms"] for r in rows if r["impl"] == "torch.compile"}
    for r in rows:
        if r["case"] in eager:
            r["x eager"] = eager[r["case"]] / r["ms"]
        if r["case"] in compiled:
            r["x compile"] = compiled[r["case"]] / r["ms"]
    return rows


def backends(device: torch.device, requested=None) -> list:
    """The op backends a benchmark times: [None] (the C++ kernels) on the CPU; on a GPU the
    requested ones, else every available one ("cuda" when its kernels were built, "triton")."""
    if device.type != "cuda":
        return [None]
    from nasprune import ops
    return list(requested or [b for b in ("cuda", "triton") if b != "cuda" or ops.cuda_kernels_built()])


def label_backend(rows: list[dict], backend) -> list[dict]:
    """Suffix the impl of nasprune's rows with the backend they ran on (GPU runs time several)."""
    for r in rows:
        if backend and r["impl"].startswith("nasprune"):
            r["impl"] = f"{r['impl']} [{backend}]"
    return rows


def backend_sweep(device: torch.device, requested, cases) -> list[dict]:
    """The rows of ``cases()`` run under every backend of :func:`backends`, with ratios and
    labelled by backend; on a GPU led by the measured copy bandwidth and with each row's share
    of it."""
    from nasprune import ops
    gpu = device.type == "cuda"
    rows = [{"case": "copy bandwidth", "impl": "torch", "GB/s": copy_bandwidth_gbs(device)}] if gpu else []
    for backend in backends(device, requested):
        with ops.use_backend(backend) if backend else contextlib.nullcontext():
            part = cases()
        rows += label_backend(with_ratios(part), backend)
    return add_copy_fraction(rows, rows[0]["GB/s"]) if gpu else rows


def add_copy_fraction(rows: list[dict], bandwidth_gbs: float) -> list[dict]:
    """"% copy bw" for every row with a "GB/s" figure: the share of the measured roofline."""
    for r in rows:
        if r.get("GB/s"):
            r["% copy bw"] = 100 * r["GB/s"] / bandwidth_gbs
    return rows


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), the roofline."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=here).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "nasprune", "csrc",
                                "kernels", "benchmarks/*.py"], capture_output=True, text=True, cwd=here.parent).stdout
        if commit and dirty.strip():
            commit += "+dirty"      # timed code differs from the commit
    except OSError:
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "commit": commit,
        "host": platform.node(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU figures
    }


def record(name: str, device: torch.device, rows: list[dict], folder: Path = RESULTS) -> Path:
    """Appends one JSON line per row, stamped with the environment, to <folder>/<name>.jsonl
    (default benchmarks/results)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    env = environment(device)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
    return path


def print_load() -> None:
    """Print the 1-minute load average (other work on the machine skews CPU figures)."""
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min) {os.getloadavg()[0]:.2f}", flush=True)


def finish(name: str, device: torch.device, rows: list[dict], args) -> None:
    """A benchmark's last lines: the load average, and its rows recorded unless --no-record."""
    print_load()
    if not args.no_record:
        print("recorded to", record(name, device, rows))


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def step_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every training-step benchmark takes: --device, --size (input side, default
    32), --batch (default 64 on a CPU, 256 on a GPU), --threads (default 2 on a CPU), --no-record.
    The benchmark adds its own and calls :func:`step_setup` on the parsed arguments."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=str(default_device()))
    p.add_argument("--size", type=int, default=32, help="input side (default 32)")
    p.add_argument("--batch", type=int, default=None, help="default 64 on CPU, 256 on GPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 2 on a CPU)")
    p.add_argument("--no-record", action="store_true")
    return p


def step_setup(args) -> tuple[torch.device, int]:
    """(device, batch) of a step benchmark's parsed arguments; sets the CPU threads."""
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 2)
    return device, args.batch or (256 if device.type == "cuda" else 64)


@contextlib.contextmanager
def strict_fp32():
    """fp32 without TF32 in cuDNN convolutions and matmuls (PyTorch lets cuDNN use TF32 by
    default): for checks that two implementations compute the same function on a GPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def default_device() -> torch.device:
    return torch.device(os.environ.get("NASPRUNE_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
