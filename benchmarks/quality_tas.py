"""The CIFAR-10 quality protocol of TAS (issue 4): TAS against its own baseline and against
uniform-width pruning at equal MACs and equal training budget, in one process.

    python benchmarks/quality_tas.py --model resnet20 --data ../shared/data/cifar10-jpeg.tar.gz \
        --pretrained ../shared/data/pretrained/cifar10-resnet20-12fca82f.th --device cuda

1. Baseline (the KD teacher): the pretrained CIFAR ResNet fine-tuned for --baseline-epochs at
   lr/10 (or trained from scratch for --baseline-epochs at lr without --pretrained).
2. TAS: --search-epochs of search warm-started from the baseline, the in-budget arg-max
   exported (--init: the baseline's weights, the supernet's, or random), then
   --finetune-epochs of KD (lambda 0.9, T 4).
3. Control: the baseline slimmed to its leading channels with one keep ratio for every channel
   group (nasprune.slim.uniform), the ratio chosen by bisection so that its MACs are the closest
   to TAS's from above or below; then KD for --search-epochs + --finetune-epochs (every epoch
   of weight training TAS had, so the control is not short-changed).
4. With --arch-control: TAS's architecture trained exactly as the control (the baseline's weights
   in it, KD for the same epochs). Against the control it compares the two architectures alone;
   against TAS it shows what the search's own weight training gained or lost.
Acceptance (issue 4): TAS within 1.0 point of its baseline and at least 1 point above the control.

Appends one row with the protocol, every accuracy, MACs, epochs and seconds to
benchmarks/results/quality_tas.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from nasprune import flops, models, slim  # noqa: E402
from nasprune.cli import SearchBar, TrainBar  # noqa: E402
from nasprune.data import load_dataset, tas_split  # noqa: E402
from nasprune.search import TAS  # noqa: E402
from nasprune.search.tas import INIT_MODES  # noqa: E402
from nasprune.train import evaluate, train  # noqa: E402


def uniform_at(model, target_macs, size, iters=14):
    """(slimmed model, keep ratio): one leading-channel keep ratio for every group, bisected so
    the MACs are the closest to target_macs."""
    x = torch.zeros(1, 3, size, size)
    best = None
    lo, hi = 0.05, 1.0
    for _ in range(iters):
        r = (lo + hi) / 2
        net = slim.uniform(copy.deepcopy(model).cpu().eval(), x, r)
        macs = flops.count(net, x)
        if best is None or abs(macs - target_macs) < abs(best[2] - target_macs):
            best = (net, r, macs)
        lo, hi = (r, hi) if macs < target_macs else (lo, r)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=[f"resnet{d}" for d in models.cifar_resnet.DEPTHS])
    p.add_argument("--data", required=True, help="CIFAR-10 (pickles, image tree or tar.gz), or 'digits'")
    p.add_argument("--pretrained", help="akamaster CIFAR-10 weights of --model")
    p.add_argument("--limit-per-class", type=int, default=None)
    p.add_argument("--baseline-epochs", type=int, default=10)
    p.add_argument("--search-epochs", type=int, default=60)
    p.add_argument("--finetune-epochs", type=int, default=60)
    p.add_argument("--flops-target", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--arch-lr", type=float, default=1e-2,
                   help="Adam step of the architecture (default 1e-2: searches much shorter than TAS's 600 epochs)")
    p.add_argument("--init", choices=INIT_MODES, default="base",
                   help="TAS's exported net: the baseline's weights (default), the searched supernet's, or random")
    p.add_argument("--arch-control", action="store_true",
                   help="also train TAS's architecture from the baseline's weights as the control is trained")
    p.add_argument("--device", default=str(_common.default_device()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.time()
    seconds = {}

    if args.data == "digits":
        train_set, test_set = load_dataset(None, size=16)
    else:
        train_set, test_set = load_dataset(args.data, limit_per_class=args.limit_per_class)
    size = train_set.images.shape[1]
    common = dict(batch_size=args.batch_size, device=device, seed=args.seed)

    def bar(desc):
        return TrainBar(desc).callbacks() if args.progress else {}

    # 1. baseline
    t = time.time()
    if args.pretrained:
        teacher = models.load_pretrained(args.model, args.pretrained, num_classes=train_set.num_classes)
        pre = evaluate(teacher.to(device), test_set, device=device)["acc"]
        train(teacher, train_set, epochs=args.baseline_epochs, lr=args.lr * 0.1, **bar("baseline"), **common)
    else:
        torch.manual_seed(args.seed)
        teacher = getattr(models, f"cifar_{args.model}")(num_classes=train_set.num_classes)
        pre = None
        train(teacher, train_set, epochs=args.baseline_epochs, lr=args.lr, **bar("baseline"), **common)
    teacher.to(device).eval()
    x = torch.zeros(1, 3, size, size)
    base = {"acc": evaluate(teacher, test_set, device=device)["acc"], "pretrained_acc": pre,
            "macs": flops.count(teacher.cpu(), x)}
    teacher.to(device)
    seconds["baseline"] = time.time() - t
    print(f"baseline {base['acc']:.4f} ({base['macs'] / 1e6:.2f} MMACs)", flush=True)

    def kd(net, epochs, desc):
        """Test accuracy of net after `epochs` of KD from the baseline: every arm trains this way."""
        train(net, train_set, epochs=epochs, lr=args.lr, teacher=teacher, **bar(desc), **common)
        return evaluate(net, test_set, device=device)["acc"]

    # 2. TAS
    t = time.time()
    searcher = TAS(teacher, args.flops_target, input_size=size, arch_lr=args.arch_lr, lr=args.lr,
                   device=device, seed=args.seed)
    weights, arch_set = tas_split(train_set)
    searcher.search(weights, arch_set, args.search_epochs, batch_size=args.batch_size,
                    callbacks=[SearchBar("TAS search")] if args.progress else [])
    arch = searcher.select("in-budget")
    seconds["search"] = time.time() - t
    t = time.time()
    pruned = searcher.export(init=args.init, architecture=arch)
    tas = {"acc": kd(pruned, args.finetune_epochs, "TAS KD"), "macs": flops.count(pruned.cpu(), x),
           "blocks": arch["blocks"], "widths": arch["widths"], "export_epoch": arch.get("epoch", "final")}
    seconds["tas_finetune"] = time.time() - t
    print(f"TAS {tas['acc']:.4f} ({tas['macs'] / 1e6:.2f} MMACs, {tas['macs'] / base['macs']:.3f})", flush=True)

    # 3. uniform control, equal MACs and equal weight-training epochs
    t = time.time()
    control, ratio, macs = uniform_at(teacher, tas["macs"], size)
    control_epochs = args.search_epochs + args.finetune_epochs
    uni = {"acc": kd(control, control_epochs, "uniform KD"), "macs": macs, "keep_ratio": ratio,
           "epochs": control_epochs}
    seconds["uniform"] = time.time() - t
    print(f"uniform {uni['acc']:.4f} ({macs / 1e6:.2f} MMACs, keep ratio {ratio:.3f})", flush=True)

    # 4. TAS's architecture, trained as the control
    arch_control = None
    if args.arch_control:
        t = time.time()
        net = searcher.export(init="base", architecture=arch)
        arch_control = {"acc": kd(net, control_epochs, "TAS arch KD"), "macs": tas["macs"], "init": "base",
                        "epochs": control_epochs}
        seconds["arch_control"] = time.time() - t
        print(f"TAS architecture trained as the control {arch_control['acc']:.4f}", flush=True)

    row = {"bench": "tas_quality", "model": args.model, "data": Path(args.data).name,
           "limit_per_class": args.limit_per_class, "train_images": len(train_set), "test_images": len(test_set),
           "protocol": {k: getattr(args, k) for k in ("baseline_epochs", "search_epochs", "finetune_epochs",
                                                       "flops_target", "batch_size", "lr", "arch_lr", "init", "seed")},
           "pretrained": Path(args.pretrained).name if args.pretrained else None,
           "baseline": base, "tas": tas, "uniform": uni, "tas_arch_as_control": arch_control,
           "tas_minus_baseline": tas["acc"] - base["acc"], "tas_minus_uniform": tas["acc"] - uni["acc"],
           "meets_target": bool(tas["acc"] >= base["acc"] - 0.01 and tas["acc"] >= uni["acc"] + 0.01),
           "seconds": {**seconds, "total": time.time() - t0}}
    print(f"TAS - baseline {100 * row['tas_minus_baseline']:+.2f} points, TAS - uniform "
          f"{100 * row['tas_minus_uniform']:+.2f} points; target met: {row['meets_target']}")
    if not args.no_record:
        print("recorded to", _common.record("quality_tas", device, [row]))
    return row


if __name__ == "__main__":
    main()
