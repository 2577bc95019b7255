"""FFP (issue 16): what a fine-search step's candidate scoring costs, and the whole search's
wall time beside TAS's and DAIS's.

1. ``step`` (default): one fine-search step of nasprune.search.FFP on a CIFAR ResNet-56 (the
   pretrained weights of ../shared/data/pretrained when present, else a seeded random init) with
   a 320-image search set (32 a class) of RANDOM images (uniform uint8 pixels; the timing does
   not depend on the pixels, but which groups the coarse step picks, and so where the candidates
   resume, does), search batches of 128 (the protocol's: 128, 128, 64). The step's candidates
   (the unpruned network's first step, or the step after ``--prune-steps`` accepted ones) are
   scored three ways, checked equal first, then timed interleaved:
   - ``full``: a full masked forward of the gated network per candidate (FFP.evaluate each);
   - ``resumed``: each candidate resumes the current subnetwork's forward at its first changed
     layer, the current subnetwork run once more per batch for it (no cache);
   - ``cached``: the same from the activations the step's importance pass kept (the importance
     pass is the step's anyway and is not in this figure);
   - ``best``: the search's own path, FFP.best_candidate from those activations: ``cached``, and
     a candidate stops being scored once its losses so far exceed a finished candidate's J
     (exact: J is a mean of non-negative losses; it stops none where the candidates' J are close,
     as on the first steps of a pretrained network).
   ``--cifar`` takes the search set from the CIFAR-10 JPEG copy (its last 32 images a class, the
   search's own) instead of random images.
   - ``masked_best``: ``best`` on the full-width masked network (no slimmed scoring network).
   ``resumed``, ``cached`` and ``best`` run on the search's scoring network: past the first
   ``FFP.slim_step`` (10 %) of the MACs removed, the physically slimmed subnetwork of a recent
   step (the current one's later removals masked), before it the full-width network.
   ``step_*`` rows time the step's importance pass plus its scoring: ``step_full`` (importance
   without caching, ``full``), ``step_masked`` (importance caching, ``masked_best``) and
   ``step_ffp`` (the search's: both on its scoring network). ``--prune-steps N`` times the step
   after N accepted ones (the searcher's own steps, slimmed scoring network included).
1b. ``--whole-search``: the search from the unpruned network to ``--target`` (no tuning), every
   greedy step's scoring timed on the search's path (``ffp``: the slimmed scoring network, its
   rebuilds included) and on the full-width masked network (``masked``), interleaved; ``--naive``
   adds a full masked forward per candidate (``full``). Rows: the sums over the steps, and each
   step's seconds. ``--rows-at 1,0.75,0.6`` takes the step rows of 1. on the way, at the first
   step at or under each MACs fraction (1: the first step).
2. ``--search-times``: the whole search (build, search, select, export, as
   benchmarks/quality.py times a method's search) of FFP, TAS and DAIS on CIFAR ResNet-20 and
   ResNet-56 from the pretrained weights, on the CIFAR-10 JPEG copy (../shared/data), at the
   protocol's target 0.5, one search epoch, batch 128, search lr 0.01, each method with its
   quality-protocol arguments (quality.METHOD_ARGS; FFP: one epoch tuning on 256 images a class,
   then the greedy search).

    python benchmarks/bench_ffp.py                          # 1, CPU, 2 threads
    python benchmarks/bench_ffp.py --prune-steps 60         # 1, the step after 60 accepted ones
    python benchmarks/bench_ffp.py --whole-search --cifar   # 1b, CPU (tens of minutes)
    python benchmarks/bench_ffp.py --device cuda            # 1, GPU
    python benchmarks/bench_ffp.py --search-times           # 2, CPU (tens of minutes)

Appends rows to benchmarks/results/ffp.jsonl (stamped with the 1-minute load average).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from nasprune import flops, models  # noqa: E402
from nasprune.handlers import handler_for  # noqa: E402
from nasprune.data import ImageDataset  # noqa: E402
from nasprune.search import FFP  # noqa: E402
from nasprune.search.ffp import SLIM_STEP as FFP_SLIM  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _pretrained(name: str, folder: Path, num_classes: int = 10):
    found = sorted(Path(folder).glob(f"cifar10-{name}-*.th"))
    if found:
        return models.load_pretrained(name, found[0], num_classes=num_classes), found[0].name
    torch.manual_seed(0)
    return getattr(models, f"cifar_{name}")(num_classes=num_classes), "random init"


def random_search_set(per_class: int, classes: int = 10, size: int = 32, seed: int = 0) -> ImageDataset:
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, (per_class * classes, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    return ImageDataset(images, labels, tuple(str(c) for c in range(classes)))


def _scores_equal(a, b) -> bool:
    return all(abs(x[0] - y[0]) <= 1e-6 * max(1.0, abs(y[0])) and
               _common.rel_err(x[1].float().cpu(), y[1].float().cpu()) < 1e-5 for x, y in zip(a, b))


# ------------------------------------------------------------------ 1. one fine-search step
def _searcher(model_name, per_class, batch, device, pretrained, cifar, target=0.5, slim_step=FFP_SLIM):
    model, weights = _pretrained(model_name, pretrained)
    s = FFP(model, target, input_size=32, device=device, search_per_class=per_class, tune_per_class=0,
            slim_step=slim_step)
    s.loaders(random_search_set(per_class) if cifar is None else cifar, None, batch)
    with torch.no_grad():
        s._start()                             # the unpruned start: the ensemble's first member, the trail's first entry
    return s, weights


def _common_row(s, model_name, weights, cifar, batch) -> dict:
    return {"model": model_name, "weights": weights, "images": "random uint8" if cifar is None else "cifar10 search set",
            "search_images": s._loaders["search"].num_samples, "batch": batch, "threads": torch.get_num_threads()}


@contextmanager
def _masked(s):
    """The searcher scoring on the full-width masked network (no slimmed scoring network)."""
    keep, s.slim_step = s.slim_step, None
    try:
        yield s
    finally:
        s.slim_step = keep


def step_rows(model_name, per_class, batch, device, pretrained, prune_steps, rounds, cifar=None) -> list[dict]:
    s, weights = _searcher(model_name, per_class, batch, device, pretrained, cifar)
    for _ in range(prune_steps):
        s.step()
    return _step_rows_on(s, device, rounds, {"bench": "ffp_step", **_common_row(s, model_name, weights, cifar, batch)})


def resume_cap(s, values) -> float:
    """The speed-up the MACs allow resuming: the full-width network's MACs over the mean MACs a
    candidate of ``values`` runs from its first changed gate site on (convolutions and linear
    layers, counted at full width from one traced forward)."""
    gn = s.gn
    run = gn._resumable()
    modules = dict(run.gm.named_modules())
    macs, hooks = {}, []

    def count(name):
        def hook(module, inputs, out):     # a counted layer, or a fused site's conv: its handler's MACs
            handler = handler_for(module)
            layer = module if handler is not None and handler.counts else getattr(module, "conv", None)
            handler = handler_for(layer) if layer is not None else None
            if handler is not None and handler.counts:
                widths = flops._widths(handler.counted_module(layer))
                macs[name] = int(handler.macs(layer, *widths, tuple(inputs[0].shape), tuple(out.shape)))
        return hook
    for node in run.nodes:
        if node.op == "call_module":
            hooks.append(modules[node.target].register_forward_hook(count(node.target)))
    example = s.example_inputs if isinstance(s.example_inputs, torch.Tensor) else s.example_inputs[0]
    was = gn.training
    try:
        gn.eval()
        with torch.no_grad():
            gn(example[:1].to(s.device))
    finally:
        gn.train(was)
        for h in hooks:
            h.remove()
    at = [macs.get(n.target, 0) if n.op == "call_module" else 0 for n in run.nodes]
    reference, first = gn.gate_vector().detach(), run.first_read.to(s.device)
    tails = []
    for v in values:
        changed = torch.cat([v.to(reference), reference.new_ones(1)]) != reference
        tails.append(sum(at[int(first[changed].min()):]) if bool(changed.any()) else 0)
    return sum(at) / max(np.mean(tails), 1)


def _step_rows_on(s, device, rounds, common) -> list[dict]:
    """The current step of searcher ``s`` scored every way, checked, timed interleaved."""
    net, slots, _ = s._scoring()               # built (when due) before anything is timed, as the search's step does
    cands = s.candidates(s.importance())
    caches, values = s._caches, [v for _, v in cands]
    cache_mb = sum(c.nbytes for c in caches if c is not None) / 2 ** 20
    with _masked(s):
        s.importance()
        masked_caches = s._caches

    def full():
        return [s.evaluate(v) for v in values]

    def resumed():
        return s.evaluate_candidates(values)

    def cached():
        return s.evaluate_candidates(values, caches)

    def best():
        return s.best_candidate(values, caches)

    def masked_best():
        with _masked(s):
            return s.best_candidate(values, masked_caches)

    def step_full():
        keep, s.cache_bytes = s.cache_bytes, 0
        try:
            with _masked(s):
                s.importance()
        finally:
            s.cache_bytes = keep
        return full()

    def step_masked():
        with _masked(s):
            s.importance()
            return s.best_candidate(values, s._caches)

    def step_ffp():
        s.importance()
        return s.best_candidate(values, s._caches)

    reference = full()
    for name, fn in (("resumed", resumed), ("cached", cached)):
        assert _scores_equal(fn(), reference), f"{name}: candidate scores differ from a full masked forward each"
    first = min(range(len(values)), key=lambda k: (reference[k][0], k))
    picks = {}
    for name, fn in (("best", best), ("masked_best", masked_best), ("step_masked", step_masked),
                     ("step_ffp", step_ffp)):
        k, loss, logits = fn()
        picks[name] = k
        # the slimmed network's sums round differently: on a near tie another candidate may win
        assert _scores_equal([(loss, logits)], [reference[k]]), f"{name}: a score differs from the full forward's"
        assert k == first or abs(reference[k][0] - reference[first][0]) <= 1e-6 * reference[first][0], \
            f"{name}: candidate {k} (J {reference[k][0]}) instead of {first} (J {reference[first][0]})"
    times = _common.compare_ms({"full": full, "resumed": resumed, "cached": cached, "best": best,
                                "masked_best": masked_best}, device, rounds=rounds, reps=1, warmup=1)
    step_times = _common.compare_ms({"step_full": step_full, "step_masked": step_masked, "step_ffp": step_ffp},
                                    device, rounds=rounds, reps=1, warmup=1)
    common = {**common, "prune_steps": len(s.trail) - 1, "candidates": len(cands), "groups": [int(s.gn.groups[i]) for i, _ in cands], "cache_mb": cache_mb,
              "macs_ratio": s.current_macs() / s.gn.base_macs, "slim_step": s.slim_step,
              "resume_cap": resume_cap(s, values),
              "scoring_net": "full width" if slots is None else
              f"slimmed at step {s._slim[0]} ({float(s.gn.expected_macs(s.trail[s._slim[0]]['keep'].double())) / s.gn.base_macs:.3f} of the MACs)",
              "same_pick": len(set(picks.values())) == 1 and first in picks.values()}
    rows = [{**common, "impl": impl, "median_ms": ms, "speedup_vs_full": times["full"] / ms}
            for impl, ms in times.items()]
    rows += [{**common, "impl": impl, "median_ms": ms, "speedup_vs_full": step_times["step_full"] / ms}
             for impl, ms in step_times.items()]
    return rows


# ------------------------------------------------------------------ 1b. every step of a search
def whole_search_rows(model_name, per_class, batch, device, pretrained, target, cifar=None, naive=False,
                      slim_step=FFP_SLIM, rows_at=(), rounds=3, record=None) -> list[dict]:
    """The search from the unpruned network to ``target``, every greedy step's scoring (importance
    pass, candidates, the lowest J) timed on the search's path (the slimmed scoring network, its
    rebuilds included) and on the full-width masked network (the same prefix reuse and cache),
    interleaved (the order alternating step by step); with ``naive`` also a full masked forward per
    candidate after an importance pass without the cache. The search's path's pick is accepted;
    a step where another path picks another candidate is recorded (its J beside the search's, and
    whether the two importance passes gave the same candidates). ``rows_at``: MACs
    fractions; at the first step at or under each, the step rows of 1. (each set handed to
    ``record`` as it is taken, and returned too)."""
    s, weights = _searcher(model_name, per_class, batch, device, pretrained, cifar, target, slim_step)
    row = _common_row(s, model_name, weights, cifar, batch)
    pending, step_rows_taken = sorted(rows_at, reverse=True), []
    paths = ["ffp", "masked"] + (["full"] if naive else [])
    seconds = {p: [] for p in paths}
    macs, scoring, loads, differ, builds = [], [], [], [], []
    build = s._slim_at

    def timed_build(values):
        t0 = time.perf_counter()
        try:
            return build(values)
        finally:
            builds.append(time.perf_counter() - t0)
    s._slim_at = timed_build

    def run(path):
        if path == "ffp":
            return s._propose()
        with _masked(s):
            if path == "masked":
                return s._propose()
            keep, s.cache_bytes = s.cache_bytes, 0
            try:
                cands = s.candidates(s.importance())
            finally:
                s.cache_bytes = keep
            scores = [s.evaluate(v) for _, v in cands]
            k = min(range(len(cands)), key=lambda i: (scores[i][0], i))
            return cands, k, *scores[k]

    t_all = time.perf_counter()
    while not s.finished():
        while pending and s.current_macs() <= pending[0] * s.gn.base_macs:
            pending.pop(0)
            taken = _step_rows_on(s, device, rounds, {"bench": "ffp_step", **row})
            print(_common.table(taken, ["impl", "prune_steps", "macs_ratio", "candidates", "median_ms",
                                        "speedup_vs_full"]), flush=True)
            step_rows_taken += taken
            if record is not None:
                record(taken)
        order = paths if len(macs) % 2 == 0 else paths[::-1]
        got = {}
        for path in order:
            _common.sync(torch.device(device))
            t0 = time.perf_counter()
            got[path] = run(path)
            _common.sync(torch.device(device))
            seconds[path].append(time.perf_counter() - t0)
        cands, k, loss, logits = got["ffp"]
        for p in paths[1:]:            # another pick (a near tie, or candidates ordered otherwise): recorded
            other, j = got[p][0], got[p][1]
            if not torch.equal(other[j][1], cands[k][1]):
                differ.append({"step": len(macs) + 1, "path": p, "j": loss, "j_other": got[p][2],
                               "same_candidates": len(other) == len(cands) and
                               all(torch.equal(a[1], b[1]) for a, b in zip(other, cands))})
                print(f"step {len(macs) + 1}: {p} picks another candidate: {differ[-1]}", flush=True)
        entry = s._slim[0] if s._slim is not None and s._slim[1] is not None else 0
        scoring.append(float(s.gn.expected_macs(s.trail[entry]["keep"].double())) / s.gn.base_macs)
        s._accept(cands, k, loss, logits)
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        macs.append(s.current_macs() / s.gn.base_macs)
        print(f"step {len(macs)}: {macs[-1]:.4f} of the MACs, " +
              ", ".join(f"{p} {seconds[p][-1]:.2f} s" for p in paths), flush=True)
    common = {"bench": "ffp_search_scoring", **row, "target": target,
              "slim_step": slim_step, "steps": len(macs), "macs_ratio": macs[-1], "rebuilds": len(builds),
              "build_s": builds, "picks_differ": len(differ), "differ": differ, "wall_s": time.perf_counter() - t_all,
              "macs_per_step": macs, "scoring_macs_per_step": scoring, "load_per_step": loads}
    total = {p: sum(seconds[p]) for p in paths}
    return [{**common, "impl": p, "total_s": total[p], "speedup_vs_masked": total["masked"] / total[p],
             **({"speedup_vs_full": total["full"] / total[p]} if naive else {}), "step_s": seconds[p]}
            for p in paths] + ([] if record is not None else step_rows_taken)


# ------------------------------------------------------------------ 2. the whole search, FFP beside TAS and DAIS
def search_rows(model_names, methods, device, pretrained, data_path, batch, limit_per_class) -> list[dict]:
    from quality import METHOD_ARGS

    from nasprune import flops
    from nasprune.cli import METHODS, Run
    from nasprune.data import load_dataset
    train_set, test_set = load_dataset(str(data_path), limit_per_class=limit_per_class)
    size = train_set.images.shape[1]
    if limit_per_class and batch > len(train_set) // 4:      # a smoke run: TAS and DAIS split the set in two
        batch = max(1, len(train_set) // 4)
        print(f"--limit-per-class {limit_per_class}: batch {batch} (each method's splits hold a batch)", flush=True)
    rows = []
    for model_name in model_names:
        for name in methods:
            model, weights = _pretrained(model_name, pretrained)
            method = METHODS[name]
            parser = argparse.ArgumentParser(prog=f"bench_ffp.py {name}")
            for o in method.options:
                parser.add_argument(*o.flags, **o.kwargs)
            args = parser.parse_args(METHOD_ARGS.get(name, []))
            args.flops_target, args.seed, args.lr, args.search_lr, args.batch_size = 0.5, 0, 0.01, 0.01, batch
            with tempfile.TemporaryDirectory() as folder:
                job = SimpleNamespace(args=args, teacher=model.to(device), size=size, device=torch.device(device),
                                      train_set=train_set, test_set=test_set, metrics={}, searcher=None,
                                      architecture=None, pruned=None, run=Run(folder))
                _common.sync(torch.device(device))
                t0 = time.perf_counter()
                job.searcher = method.build(job)
                t1 = time.perf_counter()
                job.searcher.search(train_set, epochs=1, batch_size=batch)
                _common.sync(torch.device(device))
                t2 = time.perf_counter()
                job.architecture = method.select(job)
                pruned = method.export(job)
                t3 = time.perf_counter()
            macs = flops.count(pruned.cpu(), torch.zeros(1, 3, size, size))
            base = flops.count(model.cpu(), torch.zeros(1, 3, size, size))
            row = {"bench": "ffp_search_time", "model": model_name, "method": name, "weights": weights,
                   "args": METHOD_ARGS.get(name, []), "flops_target": 0.5, "epochs": 1, "batch": batch,
                   "train_images": len(train_set), "build_s": t1 - t0, "search_s": t2 - t1,
                   "select_export_s": t3 - t2, "total_s": t3 - t0, "macs_fraction": macs / base,
                   "threads": torch.get_num_threads()}
            if name == "ffp":
                row["steps"] = job.architecture.get("steps") if isinstance(job.architecture, dict) else None
            rows.append(row)
            print(_common.table(rows[-1:], ["model", "method", "search_s", "total_s", "macs_fraction"]), flush=True)
    return rows


def main():
    p = _common.step_parser(__doc__)
    p.set_defaults(batch=128)
    p.add_argument("--model", default="resnet56", help="the step benchmark's CIFAR ResNet (default resnet56)")
    p.add_argument("--per-class", type=int, default=32, help="search images a class (default 32: 320 images)")
    p.add_argument("--prune-steps", type=int, default=0, help="greedy steps accepted before the timed one")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--pretrained-dir", default=str(DATA / "pretrained"))
    p.add_argument("--search-times", action="store_true", help="time the whole searches instead (2.)")
    p.add_argument("--search-models", default="resnet20,resnet56")
    p.add_argument("--methods", default="ffp,tas,dais")
    p.add_argument("--data", default=str(DATA / "cifar10-jpeg.tar.gz"))
    p.add_argument("--limit-per-class", type=int, default=None, help="--search-times on a subset (smoke runs)")
    p.add_argument("--cifar", action="store_true", help="1. on the CIFAR-10 search set instead of random images")
    p.add_argument("--whole-search", action="store_true", help="1b. every greedy step of a search, timed both ways")
    p.add_argument("--target", type=float, default=0.5, help="1b. the search's MACs target (default 0.5)")
    p.add_argument("--naive", action="store_true", help="1b. also a full masked forward per candidate (slow)")
    p.add_argument("--slim-step", type=float, default=FFP_SLIM, help=f"1b. FFP(slim_step=) (default {FFP_SLIM})")
    p.add_argument("--rows-at", default="", help="1b. MACs fractions (comma-separated) at which to take the "
                                                 "step rows of 1. too (recorded as they come)")
    args = p.parse_args()
    device, batch = _common.step_setup(args)
    if args.search_times:
        rows = search_rows(args.search_models.split(","), args.methods.split(","), str(device),
                           Path(args.pretrained_dir), args.data, batch, args.limit_per_class)
    else:
        cifar = None
        if args.cifar:
            from nasprune.data import load_dataset
            cifar = load_dataset(args.data)[0]
        if args.whole_search:
            record = None if args.no_record else (lambda rows: _common.record("ffp", device, rows))
            rows = whole_search_rows(args.model, args.per_class, batch, device, Path(args.pretrained_dir),
                                     args.target, cifar, args.naive, args.slim_step or None,
                                     [float(f) for f in args.rows_at.split(",") if f], args.rounds, record)
            print(_common.table(rows, ["impl", "model", "steps", "rebuilds", "picks_differ", "total_s",
                                       "speedup_vs_masked", "speedup_vs_full"]), flush=True)
        else:
            rows = step_rows(args.model, args.per_class, batch, device, Path(args.pretrained_dir),
                             args.prune_steps, args.rounds, cifar)
            print(_common.table(rows, ["impl", "model", "prune_steps", "macs_ratio", "candidates", "resume_cap", "median_ms",
                                       "speedup_vs_full"]), flush=True)
    _common.finish("ffp", device, rows, args)


if __name__ == "__main__":
    main()
