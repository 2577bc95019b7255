"""The ``nasprune`` command line.

    nasprune search --method tas --model resnet20 --data digits --flops-target 0.5 --out runs/demo
    nasprune search --model resnet50 --data cifar10.tar.gz --flops-target 0.5   (torchvision ResNet)
    nasprune finetune --run runs/demo --epochs 30
    nasprune eval --run runs/demo            (or --model-file F.safetensors [--arch A.json])
    nasprune report --run runs/demo

A run folder holds config.json, log.txt, teacher.safetensors (baseline), checkpoint.safetensors
(search, resumable with --resume), architecture.json, model.safetensors (pruned, nasprune.save),
metrics.json, widths.png and curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

CIFAR_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                      "wide_resnet101_2")
MODELS = CIFAR_MODELS + TORCHVISION_MODELS
METHODS = ("tas",)


class CLIError(Exception):
    pass


# ------------------------------------------------------------------ helpers
def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be the fraction of FLOPs kept, in (0, 1]; got {v}")
    return v


def _count(minimum):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


class Run:
    """A run folder: paths, log, JSON files."""

    def __init__(self, folder, create=True):
        self.folder = os.path.abspath(folder)
        if create:
            os.makedirs(self.folder, exist_ok=True)
        elif not os.path.isdir(self.folder):
            raise CLIError(f"run folder {folder!r} does not exist")

    def path(self, name):
        return os.path.join(self.folder, name)

    def log(self, message, echo=True):
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        with open(self.path("log.txt"), "a") as fh:
            fh.write(line + "\n")
        if echo:
            print(message, flush=True)

    def write_json(self, name, obj):
        from nasprune.io import atomic_write

        def write(tmp):
            with open(tmp, "w") as fh:
                json.dump(obj, fh, indent=2)
        atomic_write(self.path(name), write)

    def read_json(self, name):
        p = self.path(name)
        if not os.path.isfile(p):
            raise CLIError(f"{p} not found; is {self.folder!r} a nasprune run folder?")
        with open(p) as fh:
            return json.load(fh)


def _device(name):
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but no CUDA device is available")
    return name


def _data(spec, image_size, limit_per_class):
    from nasprune.data import load_dataset
    if spec in (None, "digits"):
        return load_dataset(None, size=image_size)
    if not os.path.exists(spec):
        raise CLIError(f"--data {spec!r}: no such file or folder (use 'digits' for the embedded dataset)")
    return load_dataset(spec, limit_per_class=limit_per_class)


def _constructor(name):
    """Dotted constructor of a --model name: nasprune's CIFAR ResNets, torchvision's ResNets."""
    return f"nasprune.models.cifar_{name}" if name in CIFAR_MODELS else f"torchvision.models.{name}"


def _base_model(name, num_classes):
    import importlib
    module, _, fn = _constructor(name).rpartition(".")
    return getattr(importlib.import_module(module), fn)(num_classes=num_classes)


def _model_stats(model, image_size, in_channels=3):
    import torch
    from nasprune import flops
    return {"flops": int(flops.count(model, torch.zeros(1, in_channels, image_size, image_size))),
            "params": int(flops.count_params(model))}


def _save_pruned(model, path):
    from nasprune.io import save
    save(model.cpu(), path)


def _load_pruned(path, arch):
    from nasprune.io import load
    from nasprune.search import tas_resnet
    return load(path, base_model=tas_resnet(**arch))


class TrainBar:
    """The progress bar of a ``nasprune.train.train`` call, drawn through its callbacks."""

    def __init__(self, desc):
        self.desc, self.bar = desc, None

    def on_step(self, step, total):
        if self.bar is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=self.desc, unit="step", dynamic_ncols=True)
        self.bar.update(1)

    def on_epoch(self, row):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row.get('test_acc', row['train_acc']):.3f}")
            if self.bar.n >= self.bar.total:
                self.bar.close()


    def callbacks(self):
        """train()'s keyword arguments that draw this bar."""
        return {"on_step": self.on_step, "on_epoch": self.on_epoch}


class SearchBar:
    """The progress bar of a search (a nasprune.search.Callback): steps, the step's loss and,
    where the method reports them, its MACs and temperature."""

    def __init__(self, desc):
        self.desc, self.bar = desc, None

    def on_search_begin(self, searcher):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=searcher.epochs * searcher.steps_per_epoch, initial=searcher.global_step,
                        desc=self.desc, unit="step", dynamic_ncols=True)

    def on_step_end(self, searcher, step, metrics):
        self.bar.update(1)
        shown = {"loss": f"{metrics['loss']:.3f}"} if "loss" in metrics else {}
        if "flops" in metrics:
            shown["mflops"] = f"{metrics['flops'] / 1e6:.2f}"
        if "tau" in metrics:
            shown["tau"] = f"{metrics['tau']:.2f}"
        self.bar.set_postfix(shown, refresh=False)

    def on_epoch_end(self, searcher, epoch, metrics):
        pass

    def on_search_end(self, searcher):
        self.bar.close()


def _train_progress(args, desc):
    return TrainBar(desc).callbacks() if args.progress else {}


# ------------------------------------------------------------------ commands
def cmd_search(args):
    import torch
    from nasprune.data import tas_split
    from nasprune.io import load, save
    from nasprune.models import load_pretrained
    from nasprune.search import TAS, Callback
    from nasprune.train import evaluate, train

    device = _device(args.device)
    run = Run(args.out)
    run.write_json("config.json", {"command": "search", **{k: v for k, v in vars(args).items() if k != "func"}})
    t0 = time.time()
    train_set, test_set = _data(args.data, args.image_size, args.limit_per_class)
    size = train_set.images.shape[1]
    classes = train_set.num_classes
    run.log(f"data: {train_set.name if hasattr(train_set, 'name') else args.data} "
            f"{len(train_set)} train / {len(test_set)} test, {size}x{size}, {classes} classes")
    metrics = {"model": args.model, "method": args.method, "data": args.data or "digits", "image_size": size}

    # 1. baseline (the KD teacher)
    if args.teacher:
        teacher = load(args.teacher)
        run.log(f"teacher: {args.teacher}")
        baseline_history = []
    elif args.pretrained:
        if args.model not in CIFAR_MODELS:
            raise CLIError(f"--pretrained loads the CIFAR ResNets' checkpoints ({', '.join(CIFAR_MODELS)}); "
                           f"for {args.model} pass --teacher (a nasprune.save file) or train a baseline")
        teacher = load_pretrained(args.model, args.pretrained, num_classes=classes)
        baseline_history = train(teacher, train_set, epochs=args.baseline_epochs, batch_size=args.batch_size,
                                 lr=args.lr * 0.1, test_data=test_set, device=device, seed=args.seed,
                                 **_train_progress(args, "baseline")) if args.baseline_epochs else []
    else:
        if args.baseline_epochs < 1:
            raise CLIError("--baseline-epochs 0 needs --teacher or --pretrained (the unpruned KD teacher)")
        torch.manual_seed(args.seed)
        teacher = _base_model(args.model, classes)
        baseline_history = train(teacher, train_set, epochs=args.baseline_epochs, batch_size=args.batch_size,
                                 lr=args.lr, test_data=test_set, device=device, seed=args.seed,
                                 **_train_progress(args, "baseline"))
    teacher.to(device)
    base = {**_model_stats(teacher, size), **evaluate(teacher, test_set, device=device)}
    save(teacher.cpu(), run.path("teacher.safetensors"), constructor=_constructor(args.model),
         kwargs={"num_classes": classes})
    teacher.to(device)
    metrics["baseline"] = {**base, "history": baseline_history}
    run.log(f"baseline: acc {base['acc']:.4f}, {base['flops'] / 1e6:.2f} MFLOPs, {base['params'] / 1e6:.3f} M params")

    # 2. search
    searcher = TAS(teacher, args.flops_target, input_size=size, tau=(args.tau_max, args.tau_min),
                   tau_schedule=args.tau_schedule, lr=args.lr, arch_lr=args.arch_lr,
                   cost_weight=args.cost_weight, flops_tolerance=args.flops_tolerance,
                   device=device, seed=args.seed)
    weight_set, arch_set = tas_split(train_set)

    class Log(Callback):
        def on_epoch_end(self, s, epoch, m):
            run.log(f"search epoch {epoch}: loss {m['loss']:.3f} acc {m['train_acc']:.3f} tau {m['tau']:.2f} "
                    f"arg-max {m['flops'] / 1e6:.2f} MFLOPs ({m['flops_ratio']:.3f}) blocks {m['blocks']}",
                    echo=not args.progress)
            metrics["search"] = s.history
            run.write_json("metrics.json", metrics)

    arch = searcher.search(weight_set, arch_set, args.epochs, batch_size=args.batch_size,
                           checkpoint=run.path("checkpoint.safetensors"), resume=args.resume,
                           checkpoint_every=args.checkpoint_every,
                           callbacks=[Log()] + ([SearchBar(f"{args.method.upper()} search")] if args.progress else []))
    chosen = searcher.select(args.select)
    if "epoch" in chosen:   # an earlier epoch's arg-max (see TAS.select)
        run.log(f"final arg-max: {arch['flops'] / 1e6:.2f} MFLOPs = {arch['flops'] / searcher.base_flops:.3f} "
                f"of the baseline, outside the budget band; exporting the arg-max of epoch {chosen['epoch']}")
    arch = chosen
    run.write_json("architecture.json", arch)
    metrics["search"] = searcher.history
    run.log(f"architecture: blocks {arch['blocks']}, widths {arch['widths']}, "
            f"{arch['flops'] / 1e6:.2f} MFLOPs = {arch['flops'] / searcher.base_flops:.3f} of the baseline "
            f"(target {args.flops_target})")
    pruned = searcher.export(init=args.init, architecture=arch)
    _save_pruned(pruned, run.path("model.safetensors"))
    run.write_json("metrics.json", metrics)
    if args.finetune_epochs:
        _finetune(run, pruned, teacher, arch, train_set, test_set, args, device, metrics)
    else:
        metrics["pruned"] = {**_model_stats(pruned, size), **evaluate(pruned.to(device), test_set, device=device),
                             "history": []}
        run.write_json("metrics.json", metrics)
    metrics["seconds"] = time.time() - t0
    run.write_json("metrics.json", metrics)
    _plots(run, metrics, arch)
    _summary(run, metrics)
    return 0


def _finetune(run, pruned, teacher, arch, train_set, test_set, args, device, metrics):
    from nasprune.train import evaluate, train
    size = train_set.images.shape[1]
    hist = train(pruned, train_set, epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.lr,
                 teacher=teacher, kd_lambda=args.kd_lambda, kd_temperature=args.kd_temperature,
                 warmup_epochs=args.warmup_epochs, test_data=test_set, device=device, seed=args.seed,
                 **_train_progress(args, "KD fine-tune"))
    stats = {**_model_stats(pruned, size), **evaluate(pruned, test_set, device=device), "history": hist}
    _save_pruned(pruned, run.path("model.safetensors"))
    metrics["pruned"] = stats
    run.write_json("metrics.json", metrics)
    run.log(f"pruned: acc {stats['acc']:.4f}, {stats['flops'] / 1e6:.2f} MFLOPs, {stats['params'] / 1e6:.3f} M params")


def cmd_finetune(args):
    from nasprune.io import load
    run = Run(args.run, create=False)
    config = run.read_json("config.json")
    arch = run.read_json("architecture.json")
    metrics = run.read_json("metrics.json")
    device = _device(args.device)
    train_set, test_set = _data(config.get("data"), config.get("image_size", 32), config.get("limit_per_class"))
    teacher = load(run.path("teacher.safetensors"))
    from nasprune.search import tas_resnet
    pruned = tas_resnet(**arch) if args.init == "random" else _load_pruned(run.path("model.safetensors"), arch)
    for k in ("batch_size", "kd_lambda", "kd_temperature", "warmup_epochs", "seed"):
        if getattr(args, k, None) is None:
            setattr(args, k, config.get(k))
    args.finetune_epochs = args.epochs
    _finetune(run, pruned, teacher.to(device), arch, train_set, test_set, args, device, metrics)
    _plots(run, metrics, arch)
    _summary(run, metrics)
    return 0


def cmd_eval(args):
    from nasprune.io import load, read_architecture
    from nasprune.train import evaluate
    device = _device(args.device)
    if args.run:
        run = Run(args.run, create=False)
        arch = run.read_json("architecture.json")
        config = run.read_json("config.json")
        path, data, size = run.path("model.safetensors"), config.get("data"), config.get("image_size", 32)
    else:
        if not args.model_file:
            raise CLIError("give --run DIR or --model-file FILE")
        path, data, size = args.model_file, args.data, args.image_size
        arch = None
        if args.arch:
            with open(args.arch) as fh:
                arch = json.load(fh)
    if not os.path.isfile(path):
        raise CLIError(f"model file {path!r} not found")
    if arch is None and not read_architecture(path).get("constructor"):
        raise CLIError(f"{path} holds a TAS-pruned network; pass --arch architecture.json")
    model = _load_pruned(path, arch) if arch is not None else load(path)
    _, test_set = _data(data, size, None)
    res = {**_model_stats(model, test_set.images.shape[1]), **evaluate(model.to(device), test_set, device=device)}
    print(json.dumps(res, indent=2))
    return 0


def cmd_report(args):
    run = Run(args.run, create=False)
    metrics = run.read_json("metrics.json")
    arch = run.read_json("architecture.json")
    _plots(run, metrics, arch)
    _summary(run, metrics)
    return 0


# ------------------------------------------------------------------ output
def _summary(run, metrics):
    b, p = metrics.get("baseline", {}), metrics.get("pruned", {})
    lines = [f"{'':10} {'accuracy':>9} {'MFLOPs':>9} {'params (M)':>11}"]
    for name, m in (("baseline", b), ("pruned", p)):
        if m:
            lines.append(f"{name:10} {m['acc']:9.4f} {m['flops'] / 1e6:9.3f} {m['params'] / 1e6:11.4f}")
    if b and p:
        lines.append(f"FLOPs kept {p['flops'] / b['flops']:.3f}, params kept {p['params'] / b['params']:.3f}, "
                     f"accuracy change {100 * (p['acc'] - b['acc']):+.2f} points")
    if "seconds" in metrics:
        lines.append(f"total {metrics['seconds']:.0f} s; run folder {run.folder}")
    text = "\n".join(lines)
    run.log("\n" + text)


def _plots(run, metrics, arch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # kept width per conv vs the original (dropped blocks at 0)
    from nasprune.search.tas_net import ResNetSpec
    spec = ResNetSpec.from_dict(arch)
    original, kept = spec.row_widths(), list(arch["widths"])
    first = 0
    for n, b in zip(spec.layers, arch["blocks"]):
        for rows in spec.block_rows()[first + b:first + n]:
            for r in rows:
                kept[r] = 0
        first += n
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(kept)), 3.5))
    xs = range(len(kept))
    ax.bar(xs, original, color="#cccccc", label="original")
    ax.bar(xs, kept, color="#1f77b4", label="kept")
    ax.set_xlabel(f"conv layer (stem, then the {spec.convs_per_block} convs of each block; 0 = block dropped)")
    ax.set_ylabel("channels")
    ax.set_title(f"TAS widths, blocks per stage {arch['blocks']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run.path("widths.png"), dpi=100)
    plt.close(fig)

    search = metrics.get("search", [])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if search:
        ep = [m["epoch"] for m in search]
        base = metrics.get("baseline", {}).get("flops") or arch.get("base_flops")
        a1.plot(ep, [m["flops"] / base for m in search], "o-", label="arg-max")
        a1.plot(ep, [m["expected_flops"] / base for m in search], "s--", label="expected")
        a1.axhline(arch["target_flops"] / base, color="k", lw=0.8, label="target")
        a2.plot(ep, [m["train_acc"] for m in search], label="search (weight split)")
        a2.plot(ep, [m["arch_acc"] for m in search], label="search (arch split)")
    a1.set_xlabel("search epoch"); a1.set_ylabel("FLOPs / baseline"); a1.legend(); a1.set_title("FLOPs")
    for key, label in (("baseline", "baseline test"), ("pruned", "KD fine-tune test")):
        hist = metrics.get(key, {}).get("history", [])
        if hist and "test_acc" in hist[0]:
            a2.plot([h["epoch"] for h in hist], [h["test_acc"] for h in hist], label=label)
    a2.set_xlabel("epoch"); a2.set_ylabel("accuracy"); a2.legend(); a2.set_title("accuracy")
    fig.tight_layout()
    fig.savefig(run.path("curves.png"), dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ parser
def build_parser():
    p = argparse.ArgumentParser(prog="nasprune", description="Network pruning as architecture search.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{search,finetune,eval,report}")

    def common(sp):
        sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
        sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    s = sub.add_parser("search", help="train a baseline, search, export, KD fine-tune")
    s.add_argument("--method", choices=METHODS, default="tas")
    s.add_argument("--model", choices=MODELS, default="resnet20",
                   help="a CIFAR ResNet (resnet20 ... resnet110) or a torchvision ResNet "
                        "(resnet18 ... resnet152, wide_resnet50_2, wide_resnet101_2); default resnet20")
    s.add_argument("--data", default="digits", help="'digits' (embedded) or a CIFAR-10 path (pickles, tree, tar.gz)")
    s.add_argument("--image-size", type=_count(8), default=32, help="digits only (default 32)")
    s.add_argument("--limit-per-class", type=_count(1), default=None, help="CIFAR: first N images per class")
    s.add_argument("--flops-target", type=_fraction, default=0.5, help="fraction of FLOPs kept (default 0.5)")
    s.add_argument("--epochs", type=_count(1), default=20, help="search epochs (default 20)")
    s.add_argument("--baseline-epochs", type=_count(0), default=10)
    s.add_argument("--finetune-epochs", type=_count(0), default=10)
    s.add_argument("--warmup-epochs", type=_count(0), default=0)
    s.add_argument("--batch-size", type=_count(1), default=64)
    s.add_argument("--lr", type=_positive_float, default=0.1)
    s.add_argument("--arch-lr", type=_positive_float, default=1e-3,
                   help="Adam step of the architecture logits (default 1e-3, TAS's; short searches "
                        "of a few hundred steps need about 1e-2 to reach the budget)")
    s.add_argument("--cost-weight", type=_positive_float, default=2.0, help="lambda_cost (default 2)")
    s.add_argument("--flops-tolerance", type=_fraction, default=0.05,
                   help="t of the cost loss, a fraction of the supernet's MACs (default 0.05)")
    s.add_argument("--select", choices=("in-budget", "final"), default="in-budget",
                   help="architecture to export: the latest epoch-end arg-max within the budget band "
                        "(default), or the final arg-max as TAS")
    s.add_argument("--tau-schedule", choices=("cosine", "linear"), default="cosine")
    s.add_argument("--tau-max", type=_positive_float, default=5.0)
    s.add_argument("--tau-min", type=_positive_float, default=0.1)
    s.add_argument("--kd-lambda", type=float, default=0.9)
    s.add_argument("--kd-temperature", type=_positive_float, default=4.0)
    s.add_argument("--init", choices=("base", "inherit", "random"), default="base",
                   help="pruned net init: the baseline's prefix weights (default), the searched supernet's "
                        "prefix weights, or random as the TAS paper")
    s.add_argument("--pretrained", help="akamaster CIFAR-10 ResNet weights for the baseline")
    s.add_argument("--teacher", help="a nasprune.save file of the unpruned baseline (skips baseline training)")
    s.add_argument("--out", default="runs/tas", help="run folder (default runs/tas)")
    s.add_argument("--resume", action="store_true", help="continue the search from the run's checkpoint")
    s.add_argument("--checkpoint-every", type=_count(0), default=50, help="steps between checkpoints")
    s.add_argument("--seed", type=int, default=0)
    common(s)
    s.set_defaults(func=cmd_search)

    f = sub.add_parser("finetune", help="KD fine-tune a run's pruned network")
    f.add_argument("--run", required=True)
    f.add_argument("--epochs", type=_count(1), default=10)
    f.add_argument("--lr", type=_positive_float, default=0.1)
    f.add_argument("--init", choices=("inherit", "random"), default="inherit",
                   help="start from the run's model.safetensors, or from random init")
    for name in ("batch_size", "warmup_epochs", "seed"):
        f.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    f.add_argument("--kd-lambda", type=float, default=None)
    f.add_argument("--kd-temperature", type=float, default=None)
    common(f)
    f.set_defaults(func=cmd_finetune)

    e = sub.add_parser("eval", help="accuracy, FLOPs and params of a saved model")
    e.add_argument("--run")
    e.add_argument("--model-file")
    e.add_argument("--arch", help="architecture.json of a TAS-pruned model file")
    e.add_argument("--data", default="digits")
    e.add_argument("--image-size", type=_count(8), default=32)
    common(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="print a run's summary and redraw its plots")
    r.add_argument("--run", required=True)
    r.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        parser.exit(2, f"nasprune {args.command}: error: {exc}\n")
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.exit(1, f"nasprune {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
