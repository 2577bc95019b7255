"""The CIFAR-10 quality protocol (issue 13): does a searched architecture beat the hand rules at
equal cost? One script for every method.

    python benchmarks/quality.py --controls                 # baseline + uniform + L1, once per protocol
    python benchmarks/quality.py --method dais              # the method's row (3 seeds), CPU budget
    python benchmarks/quality.py --method tas --budget gpu --device cuda    # ResNet-56, GPU budget
    python benchmarks/quality.py --study --lrs 0.01 0.02 0.05 --epochs-grid 1 2   # the noise study
    python benchmarks/quality.py --table                    # the README table from the records
    python benchmarks/quality.py --plot docs/quality.png    # the same as a figure

The protocol (a budget below, versioned by a hash of its settings):
1. baseline: the pretrained CIFAR ResNet (../shared/data/pretrained) fine-tuned with CE for
   ``baseline_epochs`` at ``baseline_lr`` on the full training set of the CIFAR-10 JPEG copy;
   its weights are cached under ``runs/quality/<version>/`` (seed 0, deterministic), it is the
   KD teacher and the start of every arm.
2. method (``--method``): the CLI's own method entry (nasprune.cli.METHODS) builds the searcher
   on the baseline at ``flops_target`` of the MACs with the protocol's search settings and the
   method's registry arguments below (``METHOD_ARGS``), searches ``search_epochs`` over the full
   training set (split as the method splits it), selects and exports; then KD (lambda 0.9, T 4)
   for ``finetune_epochs`` at ``finetune_lr``.
3. controls, at the same MACs (within 1 % of the target) and
   the same weight-training epochs (``finetune_epochs + search_epochs``: every epoch a method's
   weights train, its search included, so the controls are not short-changed):
   uniform width (``slim.uniform_at``: leading channels, one ratio) and per-group L1 magnitude
   (the classic rule of Li et al., ICLR 2017: one ratio for every group, each keeping its
   channels of largest L1 filter norm (nasprune.scores), the ratio found as the uniform one's;
   in the nested stream of an option-A ResNet the MACs depend on which channels are kept, so
   the two ratios differ). Computed once per protocol version
   and reused by every method's row.
Every arm runs ``seeds`` times; each run is appended to benchmarks/results/quality.jsonl as it
finishes (bench ``quality_run``: an interrupted protocol resumes from the runs recorded), then the
arm's row (bench ``quality``): the per-seed accuracies, mean and standard deviation, MACs, epochs
and minutes. A method's
row compares it with each control: the difference of the means, its standard error
sqrt(s_a^2 / n_a + s_b^2 / n_b), and whether the difference exceeds two of them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import nasprune  # noqa: E402
from nasprune import flops, graph, models, scores, slim  # noqa: E402
from nasprune.cli import METHODS, Run, TrainBar  # noqa: E402
from nasprune.data import load_dataset  # noqa: E402
from nasprune.train import evaluate, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = "quality"

# The budgets. "cpu": one method's row (3 seeds, ResNet-20) within 60 minutes on 2 cores, chosen by
# the noise study (docs/quality.md). "gpu": the ResNet-56 row, controls included, in one GPU call
# of at most 9 minutes (a lent machine gives 15 minutes in all, its start included): sized from
# the H200's ResNet-20 KD epoch (5 s at batch 128, launch-bound) scaled by the layers, not yet
# measured; the learning rates are the CPU budget's scaled with the batch (x2).
BUDGETS = {
    "cpu": {"model": "resnet20", "flops_target": 0.5, "batch_size": 128,
            "baseline_epochs": 1, "baseline_lr": 0.01,
            "search_epochs": 1, "search_lr": 0.01,
            "finetune_epochs": 1, "finetune_lr": 0.02, "seeds": [0, 1, 2]},
    "gpu": {"model": "resnet56", "flops_target": 0.5, "batch_size": 256,
            "baseline_epochs": 1, "baseline_lr": 0.02,
            "search_epochs": 1, "search_lr": 0.02,
            "finetune_epochs": 3, "finetune_lr": 0.04, "seeds": [0, 1, 2]},
}

# A method joins with one entry: its command-line arguments for the protocol's short search
# (the CLI's defaults are those of the papers' hundreds of epochs).
METHOD_ARGS = {
    "dais": ["--alpha-lr", "0.1", "--alpha-init", "0.5"],
    "pas": ["--gate-lr", "0.1"],
    # FFP: its defaults (one epoch of tuning on 256 images a class, then the greedy search; CKT
    # fine-tuning from its memory bank); the row without the bank: --method ffp --finetune-loss kd
    "ffp": [],
    # AST: warm start from the baseline (no coarse phase), 30 sub-networks share the search epoch;
    # --robust: KD from the baseline trains the sub-networks and the fine-tuning, as every arm's
    "ast": ["--warm-start", "--robust"],
}


def version(protocol: dict) -> str:
    """Short hash of the settings that decide the numbers (not the seeds: more seeds extend a row)."""
    key = {k: v for k, v in protocol.items() if k != "seeds"}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def _pretrained(model: str, folder) -> Path:
    found = sorted(Path(folder).glob(f"cifar10-{model}-*.th"))
    if not found:
        raise SystemExit(f"no pretrained weights for {model} under {folder} (see ../shared/data/README.md)")
    return found[0]


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def compare(a: dict, b: dict) -> dict:
    """a - b with the standard error of the difference of two independent means. With fewer than
    two seeds on either side a standard deviation is not measured, so neither is the standard
    error: ``se`` is None and ``beats`` None (no verdict)."""
    diff = a["mean"] - b["mean"]
    if min(a["n"], b["n"]) < 2:
        return {"diff": diff, "se": None, "beats": None}
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return {"diff": diff, "se": se, "beats": bool(diff > 2 * se)}


class Protocol:
    """The data, the baseline and the training shared by every arm of one protocol version."""

    def __init__(self, protocol: dict, device, data_path, progress=False, cache=ROOT / "runs" / "quality",
                 pretrained=DATA / "pretrained"):
        self.p, self.device, self.progress, self.pretrained = protocol, torch.device(device), progress, pretrained
        self.version = version(protocol)
        if str(data_path) == "digits":  # the embedded 8x8 digits at 16x16: the protocol's test
            self.train_set, self.test_set = load_dataset(None, size=16)
        else:
            self.train_set, self.test_set = load_dataset(str(data_path))
        self.size = self.train_set.images.shape[1]
        self.x = torch.zeros(1, 3, self.size, self.size)
        self.cache = Path(cache) / self.version
        self.baseline = self._baseline()
        # which baseline a run started from: the digest nasprune.save wrote into the cached file
        # (weights and architecture). Training is not bit-reproducible across thread counts or
        # GPUs, so a baseline recomputed in a fresh folder (the cache is git-ignored; a lent GPU
        # machine starts bare) can differ from the one earlier runs used, and an arm resumes
        # only the runs of its own baseline.
        self.baseline_id = nasprune.io.read_architecture(self.cache / "baseline.safetensors")["_sha256"][:12]
        self.base_macs = flops.count(self.baseline.cpu(), self.x)
        self.baseline.to(self.device)

    def _bar(self, desc):
        return TrainBar(desc).callbacks() if self.progress else {}

    def _baseline(self):
        path = self.cache / "baseline.safetensors"
        if path.exists():
            return nasprune.load(path)
        model = models.load_pretrained(self.p["model"], _pretrained(self.p["model"], self.pretrained),
                                       num_classes=10)
        t = time.time()
        if self.p["baseline_epochs"]:
            train(model, self.train_set, epochs=self.p["baseline_epochs"], lr=self.p["baseline_lr"],
                  batch_size=self.p["batch_size"], device=self.device, seed=0, **self._bar("baseline"))
        self.cache.mkdir(parents=True, exist_ok=True)
        nasprune.save(model.cpu(), path, constructor=f"nasprune.models.cifar_{self.p['model']}",
                      kwargs={"num_classes": 10})
        print(f"baseline fine-tuned in {time.time() - t:.0f} s, cached at {path}", flush=True)
        return model

    def accuracy(self, model) -> float:
        return evaluate(model.to(self.device), self.test_set, device=self.device)["acc"]

    def kd(self, model, epochs, seed, desc):
        """The protocol's KD training of a pruned network from the baseline: every arm's."""
        train(model, self.train_set, epochs=epochs, lr=self.p["finetune_lr"], batch_size=self.p["batch_size"],
              teacher=self.baseline, device=self.device, seed=seed, **self._bar(desc))
        return self.accuracy(model)

    @property
    def control_epochs(self) -> int:
        return self.p["finetune_epochs"] + self.p["search_epochs"]

    # -- the controls
    def control(self, arm: str, seed: int) -> dict:
        """Uniform width or per-group L1 at the target, trained like every arm: {acc, macs, ...}."""
        base = self.baseline.cpu().eval()
        g = graph.trace(base, self.x)
        cost = flops.CostModel(g)
        order = None
        if arm == "l1":
            gs = scores.group_scores(scores.filter_scores(base, "l1"), g)
            order = {gi: torch.sort(-gs[gi].nan_to_num(float("inf")), stable=True).indices for gi in gs}
        keep, ratio = slim.uniform_keep_at(g, self.p["flops_target"], cost=cost, order=order)
        t = time.time()
        net = slim.apply(base, g, keep)
        macs = flops.count(net, self.x)
        self.baseline.to(self.device)
        acc = self.kd(net, self.control_epochs, seed, f"{arm} seed {seed}")
        print(f"{arm} seed {seed}: {acc:.4f} at {macs / self.base_macs:.4f} of the MACs", flush=True)
        return {"acc": acc, "macs": macs, "macs_fraction": macs / self.base_macs, "keep_ratio": ratio,
                "epochs": self.control_epochs, "minutes": (time.time() - t) / 60}

    # -- a method
    def method(self, name: str, seed: int, extra: list[str]) -> dict:
        method = METHODS[name]
        parser = argparse.ArgumentParser(prog=f"quality.py --method {name}")
        for o in method.options:
            parser.add_argument(*o.flags, **o.kwargs)
        args = parser.parse_args(METHOD_ARGS.get(name, []) + extra)
        args.flops_target, args.seed, args.lr = self.p["flops_target"], seed, self.p["search_lr"]
        args.search_lr, args.batch_size = self.p["search_lr"], self.p["batch_size"]
        key = hashlib.sha1(json.dumps(METHOD_ARGS.get(name, []) + extra).encode()).hexdigest()[:8]
        run = Run(self.cache / f"{name}-{key}-seed{seed}")     # what a method writes (FFP's memory bank)
        job = SimpleNamespace(args=args, teacher=self.baseline, size=self.size, device=self.device,
                              train_set=self.train_set, test_set=self.test_set, metrics={}, searcher=None,
                              architecture=None, pruned=None, run=run)
        t = time.time()
        job.searcher = method.build(job)
        callbacks = []
        if self.progress:
            from nasprune.cli import SearchBar
            callbacks = [SearchBar(f"{name} search seed {seed}")]
        job.searcher.search(self.train_set, epochs=self.p["search_epochs"], batch_size=self.p["batch_size"],
                            callbacks=callbacks)
        job.architecture = method.select(job)
        pruned = job.pruned = method.export(job)
        search_min = (time.time() - t) / 60
        t = time.time()
        macs = flops.count(pruned.cpu(), self.x)
        if method.finetune is None:
            acc = self.kd(pruned, self.p["finetune_epochs"], seed, f"{name} KD seed {seed}")
        else:   # the method's own fine-tuning (FFP's CKT; AST's KD with --robust) at the protocol's budget
            args.finetune_epochs, args.lr = self.p["finetune_epochs"], self.p["finetune_lr"]
            args.warmup_epochs, args.kd_lambda, args.kd_temperature = 0, 0.9, 4.0
            method.finetune(job, self._bar(f"{name} fine-tune seed {seed}"))
            acc = self.accuracy(pruned)
        print(f"{name} seed {seed}: {acc:.4f} at {macs / self.base_macs:.4f} of the MACs", flush=True)
        return {"acc": acc, "macs": macs, "macs_fraction": macs / self.base_macs,
                "epochs": self.control_epochs, "search_minutes": search_min,
                "minutes": search_min + (time.time() - t) / 60, "args": vars(args) | {"tie": None},
                "export": job.metrics.get("export"), **_chosen(job.architecture)}


def _chosen(arch: dict) -> dict:
    """What a run exported, kept with its record: the kept width of every layer (and a TAS
    network's blocks per stage)."""
    out = {"kept": [layer["kept"] for layer in arch["layer_widths"]]}
    if "blocks" in arch:
        out["blocks"] = arch["blocks"]
    return out


def _arm_row(prot: Protocol, arm: str, runs: dict) -> dict:
    seeds = sorted(runs)
    accs = [runs[s]["acc"] for s in seeds]
    return {"bench": "quality", "protocol_version": prot.version, "protocol": prot.p, "arm": arm,
            "baseline": prot.baseline_id, "seeds": seeds, "acc": accs, **{f"acc_{k}": v for k, v in _stats(accs).items()},
            "macs": [runs[s]["macs"] for s in seeds], "base_macs": prot.base_macs,
            "macs_fraction": statistics.fmean(runs[s]["macs_fraction"] for s in seeds),
            "epochs": runs[seeds[0]]["epochs"], "minutes": [runs[s]["minutes"] for s in seeds],
            "runs": runs}


def _records(folder) -> list[dict]:
    path = Path(folder) / f"{RESULTS}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _device_key(name: str | None) -> str:
    """A device as the records compare it: the GPU's name, or the CPU without its thread count
    (the protocol's numbers do not depend on it; its minutes do, and rows record them)."""
    return (name or "").split(",")[0]


def _same_device(row: dict, device) -> bool:
    return _device_key(row.get("device")) == _device_key(_common.device_name(torch.device(device)))


def _of_baseline(records: list[dict], baseline: str) -> list[dict]:
    """The records of one arm from ``baseline``. Records before session 16 name no baseline:
    they are taken as of this one only while none of the arm's records names one."""
    if any("baseline" in r for r in records):
        return [r for r in records if r.get("baseline") == baseline]
    return records


def _latest(arm: str, ver: str, device, folder, baseline: str | None = None) -> dict | None:
    """The latest row of ``arm`` under protocol ``ver`` measured on a device of this kind (and,
    given ``baseline``, from that baseline: :func:`_of_baseline`)."""
    rows = [r for r in _records(folder) if r.get("bench") == "quality" and r.get("arm") == arm
            and r.get("protocol_version") == ver and _same_device(r, device)]
    if baseline is not None:
        rows = _of_baseline(rows, baseline)
    return rows[-1] if rows else None


def _arm_stats(row: dict) -> dict:
    return {"mean": row["acc_mean"], "std": row["acc_std"], "n": row["acc_n"]}


def table(folder=_common.RESULTS) -> str:
    """Markdown table of the latest row of every arm per protocol version and device."""
    lines = ["| protocol | device | arm | accuracy, mean +- std (seeds) | MACs of the baseline | epochs | minutes per seed "
             "| vs uniform | vs L1 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    latest = [(ver, device, arm, r) for (ver, device), arms in _latest_rows(folder).items() for arm, r in arms.items()]
    for ver, device, arm, r in latest:
        cmp = r.get("compare", {})

        def vs(ctrl):
            c = cmp.get(ctrl)
            if c is None:
                return ""
            if c.get("se") is None or r["acc_n"] < 2:   # rows recorded before compare() said so
                return f"{100 * c['diff']:+.2f} (one seed: no verdict)"
            return f"{100 * c['diff']:+.2f} +- {100 * c['se']:.2f}" + (" (beats)" if c["beats"] else "")
        lines.append(f"| {r['protocol']['model']} {ver} | {device} | {arm} | {100 * r['acc_mean']:.2f} +- {100 * r['acc_std']:.2f} "
                     f"({r['acc_n']}) | {r['macs_fraction']:.3f} | {r['epochs']} | "
                     f"{statistics.fmean(r['minutes']):.1f} | {vs('uniform')} | {vs('l1')} |")
    return "\n".join(lines)


def _latest_rows(folder) -> dict:
    """{(protocol version, device): {arm: the arm's latest row}}, in the order first recorded."""
    latest: dict = {}
    for r in _records(folder):
        if r.get("bench") == "quality":
            latest.setdefault((r["protocol_version"], _device_key(r.get("device"))), {})[r["arm"]] = r
    return latest


def plot(folder=_common.RESULTS, path="docs/quality.png") -> list[dict]:
    """The quality table as a figure, one panel per protocol version and device: every arm's
    per-seed accuracies and its mean +- std, the uniform and L1 controls as shaded bands (mean
    +- std) and the baseline as a dashed line; an arm that beats both controls by two standard
    errors in green, a one-seed screen hollow. Returns what each panel shows, top to bottom:
    [{"panel", "arms": [(arm, mean, n, beats both)]}]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(key, arms) for key, arms in _latest_rows(folder).items()
              if any(a not in ("baseline", "uniform", "l1") for a in arms)]
    if not panels:
        raise SystemExit(f"no method rows in {Path(folder) / RESULTS}.jsonl to plot")
    heights = [len(arms) for _, arms in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 0.38 * sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    shown = []
    for ax, ((ver, device), arms) in zip(axes[:, 0], panels):
        methods = sorted((a for a in arms if a not in ("baseline", "uniform", "l1")),
                         key=lambda a: arms[a]["acc_mean"])
        order = methods + [c for c in ("uniform", "l1") if c in arms]
        for ctrl, color in (("uniform", "tab:orange"), ("l1", "tab:purple")):
            if ctrl in arms:
                m, sd = 100 * arms[ctrl]["acc_mean"], 100 * arms[ctrl]["acc_std"]
                ax.axvspan(m - sd, m + sd, color=color, alpha=0.18, lw=0)
                ax.axvline(m, color=color, lw=1)
        if "baseline" in arms:
            ax.axvline(100 * arms["baseline"]["acc_mean"], color="black", ls="--", lw=1)
            ax.text(100 * arms["baseline"]["acc_mean"], len(order) - 0.4, " baseline", fontsize=8, va="center")
        rows = []
        for y, arm in enumerate(order):
            r = arms[arm]
            cmp = r.get("compare", {})
            beats = bool(cmp) and all(cmp.get(c, {}).get("beats") for c in ("uniform", "l1"))
            color = {"uniform": "tab:orange", "l1": "tab:purple"}.get(arm, "tab:green" if beats else "tab:gray")
            accs = [100 * a for a in r["acc"]]
            ax.scatter(accs, [y] * len(accs), s=14, color=color, alpha=0.6, zorder=3)
            ax.errorbar(100 * r["acc_mean"], y, xerr=100 * r["acc_std"], fmt="o", ms=7, capsize=3, zorder=4,
                        color=color, mfc=color if r["acc_n"] > 1 else "white")
            rows.append((arm, r["acc_mean"], r["acc_n"], beats))
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([f"{a} ({arms[a]['macs_fraction']:.3f} MACs, {arms[a]['acc_n']} seed"
                            f"{'s' if arms[a]['acc_n'] > 1 else ''})" for a in order], fontsize=8)
        ax.set_ylim(-0.6, len(order) - 0.2)
        ax.set_title(f"{next(iter(arms.values()))['protocol']['model']}, protocol {ver}, {device}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        shown.append({"panel": (ver, device), "arms": rows})
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    axes[0, 0].legend(handles=[Patch(color="tab:orange", alpha=0.5, label="uniform control (mean +- std)"),
                               Patch(color="tab:purple", alpha=0.5, label="L1 control (mean +- std)"),
                               Line2D([], [], color="black", ls="--", lw=1, label="baseline"),
                               Line2D([], [], color="tab:green", marker="o", ls="", label="beats both (2 s.e.)"),
                               Line2D([], [], color="tab:gray", marker="o", ls="", mfc="white",
                                      label="one seed (a screen)")],
                      loc="lower right", fontsize=7, framealpha=0.9)
    axes[-1, 0].set_xlabel("CIFAR-10 test accuracy (%), each seed and mean +- std")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return shown


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--method", choices=sorted(METHODS), help="a method's row")
    what.add_argument("--controls", action="store_true", help="the baseline and the two controls' rows")
    what.add_argument("--study", action="store_true", help="the noise study: the uniform control over a grid")
    what.add_argument("--table", action="store_true", help="print the README table of the records")
    what.add_argument("--plot", metavar="PNG", help="draw the records as a figure (docs/quality.png)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--data", default=str(DATA / "cifar10-jpeg.tar.gz"),
                   help="the CIFAR-10 JPEG copy (default), or 'digits' (the embedded digits: tests)")
    p.add_argument("--pretrained-dir", default=str(DATA / "pretrained"),
                   help="folder of the pretrained CIFAR ResNets (cifar10-resnetNN-*.th)")
    p.add_argument("--cache", default=str(ROOT / "runs" / "quality"),
                   help="where the baseline of each protocol version is kept")
    p.add_argument("--device", default=str(_common.default_device()))
    p.add_argument("--seeds", type=int, nargs="+", help="override the budget's seeds")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="override a protocol setting (a new protocol version), e.g. --set finetune_lr 0.05")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05], help="--study: KD learning rates")
    p.add_argument("--epochs-grid", type=int, nargs="+", default=[1, 2], help="--study: KD epochs")
    p.add_argument("--results", default=str(_common.RESULTS),
                   help="folder of quality.jsonl: the records read (controls reused) and appended")
    p.add_argument("--fresh", action="store_true",
                   help="--method: run every seed again, ignoring the arm's recorded runs (after a change to "
                        "the method's code; the rows then record the new runs)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args, extra = p.parse_known_args(argv)
    if args.table:
        print(table(args.results))
        return None
    if args.plot:
        for panel in plot(args.results, args.plot):
            print(f"{panel['panel']}: {len(panel['arms'])} arms", flush=True)
        print(f"wrote {args.plot}")
        return None
    if extra and not args.method:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    protocol = dict(BUDGETS[args.budget])
    for key, value in args.set:
        if key not in protocol:
            p.error(f"--set {key}: not a protocol setting ({', '.join(protocol)})")
        protocol[key] = type(protocol[key])(value)
    if args.seeds:
        protocol["seeds"] = args.seeds
    device = torch.device(args.device)
    t0 = time.time()
    prot = Protocol(protocol, device, args.data, progress=args.progress, cache=args.cache,
                    pretrained=args.pretrained_dir)
    base_acc = prot.accuracy(prot.baseline)
    print(f"protocol {prot.version} ({args.budget}): baseline {base_acc:.4f} ({prot.baseline_id}), "
          f"{prot.base_macs / 1e6:.2f} MMACs", flush=True)
    rows = []

    def record(rs):
        rows.extend(rs)
        if not args.no_record:
            _common.record(RESULTS, device, rs, args.results)

    if args.study:
        base = prot.baseline.cpu().eval()
        for lr in args.lrs:
            for epochs in args.epochs_grid:
                accs, t = [], time.time()
                for seed in protocol["seeds"]:
                    net = slim.uniform_at(base, prot.x, protocol["flops_target"])
                    train(net, prot.train_set, epochs=epochs, lr=lr, batch_size=protocol["batch_size"],
                          teacher=prot.baseline.to(device), device=device, seed=seed)
                    accs.append(prot.accuracy(net))
                    base = prot.baseline.cpu().eval()
                row = {"bench": "quality_study", "protocol_version": prot.version, "protocol": protocol, "lr": lr,
                       "epochs": epochs, "seeds": protocol["seeds"], "acc": accs,
                       **{f"acc_{k}": v for k, v in _stats(accs).items()},
                       "minutes_per_seed": (time.time() - t) / 60 / len(accs), "baseline_acc": base_acc}
                print(f"study lr {lr} epochs {epochs}: {100 * row['acc_mean']:.2f} +- {100 * row['acc_std']:.2f} "
                      f"({row['minutes_per_seed']:.1f} min a seed)", flush=True)
                record([row])
        return rows

    def arm(name, seeds, run, fresh=False):
        """The arm's runs, one per seed: each recorded as it finishes (bench quality_run), so an
        interrupted protocol resumes from the runs it has; then the arm's row."""
        recorded = [r for r in _records(args.results) if r.get("bench") == "quality_run" and r.get("arm") == name
                    and r.get("protocol_version") == prot.version and _same_device(r, device)]
        done = {} if fresh else {r["seed"]: r["run"] for r in _of_baseline(recorded, prot.baseline_id)}
        runs = {}
        for seed in seeds:
            if seed in done:
                runs[seed] = done[seed]
                print(f"{name} seed {seed}: {runs[seed]['acc']:.4f} (recorded)", flush=True)
                continue
            runs[seed] = run(seed)
            record([{"bench": "quality_run", "protocol_version": prot.version, "arm": name, "seed": seed,
                     "baseline": prot.baseline_id, "run": runs[seed]}])
        return _arm_row(prot, name, runs)

    seeds = protocol["seeds"]
    controls = {}
    for name in ("uniform", "l1"):
        latest = None if args.controls else _latest(name, prot.version, device, args.results, prot.baseline_id)
        if latest is None or not set(seeds) <= set(latest["seeds"]):
            latest = arm(name, seeds, lambda seed, name=name: prot.control(name, seed), fresh=args.controls)
            record([latest])
        controls[name] = latest
    latest = _latest("baseline", prot.version, device, args.results)
    if args.controls or latest is None or latest.get("baseline") != prot.baseline_id:
        record([{"bench": "quality", "protocol_version": prot.version, "protocol": protocol, "arm": "baseline",
                 "baseline": prot.baseline_id,
                 "seeds": [0], "acc": [base_acc], "acc_mean": base_acc, "acc_std": 0.0, "acc_n": 1,
                 "macs": [prot.base_macs], "base_macs": prot.base_macs, "macs_fraction": 1.0,
                 "epochs": protocol["baseline_epochs"], "minutes": [0.0]}])
    if args.method:
        name = " ".join([args.method] + extra)
        row = arm(name, seeds, lambda seed: prot.method(args.method, seed, extra), fresh=args.fresh)
        row["compare"] = {a: compare(_arm_stats(row), _arm_stats(c)) for a, c in controls.items()}
        row["baseline_acc"], row["baseline"] = base_acc, prot.baseline_id
        row["minus_baseline"] = row["acc_mean"] - base_acc
        record([row])
        for a, c in row["compare"].items():
            if c["se"] is None:
                print(f"{name} - {a}: {100 * c['diff']:+.2f} points (one seed: no verdict)", flush=True)
                continue
            print(f"{name} - {a}: {100 * c['diff']:+.2f} +- {100 * c['se']:.2f} points "
                  f"({'beats' if c['beats'] else 'does not beat'} it by two standard errors)", flush=True)
        print(f"{name} - baseline: {100 * row['minus_baseline']:+.2f} points", flush=True)
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return rows


if __name__ == "__main__":
    main()
