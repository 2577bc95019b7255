"""The ``nasprune`` command line.

    nasprune search --method tas --model resnet20 --data digits --flops-target 0.5 --out runs/demo
    nasprune search --model resnet50 --data cifar10.tar.gz --flops-target 0.5   (torchvision ResNet)
    nasprune finetune --run runs/demo --epochs 30
    nasprune eval --run runs/demo            (or --model-file F.safetensors)
    nasprune report --run runs/demo

``search`` runs one pipeline every method shares, a function per phase: data, baseline (the KD
teacher), search, export, fine-tune, report. A method is one entry of :data:`METHODS`: its
options and its hooks (which models it takes, how it builds its searcher, picks the
architecture and exports it). ``--model`` takes nasprune's CIFAR ResNets and every torchvision
classification model; a method refuses, with a message naming what it takes, the models it
cannot search.

A run folder holds config.json, log.txt, teacher.safetensors (baseline), checkpoint.safetensors
(search, resumable with --resume), architecture.json (the keep-based architecture dict),
model.safetensors (pruned; ``nasprune.load(path)`` rebuilds it alone), metrics.json, widths.png
and curves.png.

This module is the only place that knows the command line and draws progress bars; the library
reports through callbacks. Its parser imports no torch (``--help`` is fast).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

CIFAR_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
CIFAR_REPVGG = ("repvgg_a0", "repvgg_a1", "repvgg_b0")   # nasprune's RepVGG, CIFAR variant
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                       "wide_resnet101_2")


class CLIError(Exception):
    pass


# ------------------------------------------------------------------ argument types
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


# ------------------------------------------------------------------ models
def torchvision_models() -> list[str]:
    """Every torchvision classification model name."""
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_constructor(name: str) -> str:
    """Dotted constructor of a --model name: nasprune's CIFAR ResNets, torchvision's classifiers."""
    if name in CIFAR_MODELS or name in CIFAR_REPVGG:
        return f"nasprune.models.cifar_{name}"
    if name in torchvision_models():
        return f"torchvision.models.{name}"
    raise CLIError(f"--model {name!r} is neither a CIFAR ResNet ({', '.join(CIFAR_MODELS)}), a CIFAR RepVGG "
                   f"({', '.join(CIFAR_REPVGG)}) nor a torchvision "
                   f"classification model (torchvision.models.list_models(module=torchvision.models), e.g. "
                   f"resnet50, mobilenet_v2, efficientnet_b0, vgg16_bn)")


def _build_model(constructor: str, num_classes: int):
    import importlib
    module, _, fn = constructor.rpartition(".")
    return getattr(importlib.import_module(module), fn)(num_classes=num_classes)


def _model_stats(model, image_size, in_channels=3):
    import torch
    from nasprune import flops
    return {"flops": int(flops.count(model, torch.zeros(1, in_channels, image_size, image_size))),
            "params": int(flops.count_params(model))}


def _save_model(model, path, constructor, num_classes):
    """nasprune.save, recording the base model's constructor unless the model knows its own
    (a TAS-pruned TASResNet does), so that nasprune.load(path) rebuilds it alone."""
    from nasprune.io import save
    if not _is_main():
        return
    if callable(getattr(model, "nasprune_constructor", None)):
        save(model.cpu(), path)
    else:
        save(model.cpu(), path, constructor=constructor, kwargs={"num_classes": num_classes})


def _load_model(path, arch=None):
    """A saved model; files of earlier runs that record no constructor (TAS-pruned files before
    TASResNet recorded its own) are rebuilt from their architecture dict."""
    from nasprune.io import load, read_architecture
    if not os.path.isfile(path):
        raise CLIError(f"model file {path!r} not found")
    if read_architecture(path).get("constructor"):
        return load(path)
    if arch is None or "widths" not in arch:
        raise CLIError(f"{path} records no constructor (a TAS file of an earlier nasprune); "
                       f"pass --arch architecture.json")
    from nasprune.models import tas_resnet
    return load(path, base_model=tas_resnet(**arch))


# ------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Option:
    """A method's command-line option: argparse flags and keyword arguments (with its default)."""
    flags: tuple
    kwargs: dict

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Method:
    """One search method of ``nasprune search``.

    check_model(name): raise CLIError for a --model the method cannot search.
    build(job) -> Searcher; select(job) -> the architecture dict to export (keep-based);
    export(job) -> the pruned nn.Module of job.architecture; finetune(job, progress) -> the
    fine-tuning's history (None: KD from the baseline, ``nasprune.train.train``; progress: the
    keyword arguments ``on_step`` / ``on_epoch`` of the command line's bar).
    """
    name: str
    summary: str
    options: tuple
    check_model: Callable
    build: Callable
    select: Callable
    export: Callable
    finetune: Callable | None = None


def _tas_check_model(name):
    if name not in CIFAR_MODELS + TORCHVISION_RESNETS:
        raise CLIError(f"--method tas searches ResNets: the CIFAR ResNets ({', '.join(CIFAR_MODELS)}) and "
                       f"torchvision's ({', '.join(TORCHVISION_RESNETS)}); not {name}")


def _tas_build(job):
    from nasprune.search import TAS
    a = job.args
    return TAS(job.teacher, a.flops_target, input_size=job.size, tau=(a.tau_max, a.tau_min),
               tau_schedule=a.tau_schedule, lr=a.lr, arch_lr=a.arch_lr, cost_weight=a.cost_weight,
               flops_tolerance=a.flops_tolerance, search_depth=not a.widths_only, device=job.device,
               seed=a.seed)


def _tas_select(job):
    s = job.searcher
    chosen = s.select(job.args.select, projection_bn=job.args.init == "random")   # what _tas_export builds
    if "epoch" in chosen:       # an earlier arg-max (see TAS.select)
        final = s.architecture()["flops"]
        when = f"step {chosen['step']} (epoch {chosen['epoch']})" if chosen.get("step") else f"epoch {chosen['epoch']}"
        job.run.log(f"final arg-max: {final / 1e6:.2f} MFLOPs = {final / s.base_flops:.3f} of the baseline, "
                    f"outside the budget band; exporting the arg-max of {when}, "
                    f"{chosen['flops'] / s.base_flops:.3f} of the baseline")
    return chosen


def _tas_export(job):
    return job.searcher.export(init=job.args.init, architecture=job.architecture)


TAS_METHOD = Method(
    name="tas", summary="TAS (Dong & Yang, NeurIPS 2019): widths and depths of a ResNet",
    options=(
        Option(("--arch-lr",), dict(type=_positive_float, default=0.1,
                                    help="Adam step of the architecture logits (default 0.1, for searches of a few "
                                         "hundred steps: at 1e-2 their logits barely move and the arg-max is noise; "
                                         "TAS's 1e-3 is for its 600 epochs)")),
        Option(("--cost-weight",), dict(type=_positive_float, default=2.0, help="lambda_cost (default 2)")),
        Option(("--flops-tolerance",), dict(type=_fraction, default=0.05,
                                            help="t of the cost loss, a fraction of the supernet's MACs "
                                                 "(default 0.05)")),
        Option(("--select",), dict(choices=("in-budget", "final"), default="in-budget",
                                   help="architecture to export: the final arg-max if within the budget band, "
                                        "else the latest one seen there, checked every 10 steps (default), or "
                                        "the final arg-max as TAS")),
        Option(("--tau-schedule",), dict(choices=("cosine", "linear"), default="cosine")),
        Option(("--tau-max",), dict(type=_positive_float, default=5.0)),
        Option(("--tau-min",), dict(type=_positive_float, default=0.1)),
        Option(("--init",), dict(choices=("base", "inherit", "random"), default="base",
                                 help="pruned net init: the baseline's prefix weights (default), the searched "
                                      "supernet's prefix weights, or random as the TAS paper")),
        Option(("--widths-only",), dict(action="store_true",
                                        help="search the widths only and keep every block (TAS searches the "
                                             "stages' depths too)")),
    ),
    check_model=_tas_check_model, build=_tas_build, select=_tas_select, export=_tas_export)


def _width(text):
    """--min-width: a number of channels (an integer >= 1) or a fraction of the group in (0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a channel count or a fraction, got {text!r}") from None
    if v >= 1 and v == int(v):
        return int(v)
    if 0 < v < 1:
        return v
    raise argparse.ArgumentTypeError(f"must be an integer >= 1 or a fraction in (0, 1); got {text}")


def _dais_build(job):
    from nasprune.search import DAIS
    a = job.args
    return DAIS(job.teacher, a.flops_target, input_size=job.size, flops_tolerance=a.flops_tolerance,
                flops_margin=a.flops_margin, cost_weight=a.cost_weight, l1_weight=a.l1_weight,
                tie_weight=a.tie_weight, ties=a.tie or (), min_width=a.min_width, alpha_init=a.alpha_init,
                temperature=(a.t_start, a.t_end), schedule=a.schedule, lr=a.search_lr, alpha_lr=a.alpha_lr,
                round_to=a.round_to, device=job.device, seed=a.seed, untie=a.untie)


def _dais_select(job):
    arch = job.searcher.architecture()
    if arch["selected_by"] == "budget":     # the I > 0.5 keep missed the band (see DAIS.keep)
        job.run.log(f"I > 0.5 keeps {arch['threshold_macs'] / arch['base_macs']:.3f} of the MACs, outside "
                    f"[{job.args.flops_target - job.args.flops_tolerance:.3f}, {job.args.flops_target:.3f}]; "
                    f"exporting the largest channels by alpha that fit the target instead")
    return arch


def _dais_export(job):
    """The export, and its accuracy before fine-tuning against the gated network's at the final
    temperature (the gap the annealing closes)."""
    from nasprune.train import evaluate
    s = job.searcher
    pruned = s.export()
    gated = evaluate(s.gn, job.test_set, device=job.device)["acc"]
    exported = evaluate(pruned.to(job.device), job.test_set, device=job.device)["acc"]
    job.metrics["export"] = {"gated_acc": gated, "exported_acc": exported, "temperature": s.temperature}
    job.run.log(f"exported before fine-tuning: acc {exported:.4f}; the gated network at T = {s.temperature:.3g}: "
                f"acc {gated:.4f}")
    return pruned


DAIS_METHOD = Method(
    name="dais", summary="DAIS (Guan et al., TNNLS 2023): annealed channel indicators of any CNN",
    options=(
        Option(("--alpha-lr",), dict(type=_positive_float, default=3e-4,
                                     help="Adam step of the indicator logits alpha (default 3e-4; short searches of "
                                          "a few hundred steps need about 0.1-0.2 with --alpha-init 0.5)")),
        Option(("--alpha-init",), dict(type=_positive_float, default=2.0,
                                       help="initial alpha of every channel (default 2: I = 0.88 at T = 1)")),
        Option(("--search-lr",), dict(type=_positive_float, default=0.01,
                                      help="SGD step of the weights during the search, cosine to 0 (default 0.01)")),
        *(o for o in TAS_METHOD.options if o.dest in ("cost_weight", "flops_tolerance")),   # the same flags
        Option(("--flops-margin",), dict(type=float, default=0.01,
                                         help="the FLOPs loss aims this far inside the band (default 0.01)")),
        Option(("--schedule",), dict(choices=("exponential", "linear", "reciprocal", "constant"),
                                     default="exponential", help="temperature per step (default exponential)")),
        Option(("--t-start",), dict(type=_positive_float, default=1.0, help="first temperature (default 1)")),
        Option(("--t-end",), dict(type=_positive_float, default=0.01, help="last temperature (default 0.01)")),
        Option(("--l1-weight",), dict(type=float, default=0.0, help="lambda_1 of mean(I) (default 0)")),
        Option(("--tie-weight",), dict(type=float, default=0.0,
                                       help="lambda_tie of the soft tie sum ||I_a - I_b||^2 over --tie pairs")),
        Option(("--tie",), dict(nargs=2, action="append", metavar=("LAYER_A", "LAYER_B"),
                                help="two layers (module names) of equal width to tie softly; repeatable")),
        Option(("--min-width",), dict(type=_width, default=1,
                                      help="channels every group keeps: a count, or a fraction of the group "
                                           "(default 1)")),
        Option(("--round-to",), dict(type=_count(1), default=1,
                                     help="round every kept width down to a multiple of this (default 1; 8 gives "
                                          "widths that run faster at the same MACs)")),
        Option(("--untie",), dict(action="store_true",
                                  help="search every residual block's output width on its own (each shortcut "
                                       "through a channel selection; the export gathers on its shortcuts)")),
    ),
    check_model=lambda name: None, build=_dais_build, select=_dais_select, export=_dais_export)

def _pas_build(job):
    from nasprune.search import PaS
    a = job.args
    return PaS(job.teacher, a.flops_target, input_size=job.size, flops_tolerance=a.flops_tolerance,
               cost_weight=a.cost_weight, lr=a.search_lr, gate_lr=a.gate_lr, round_to=a.round_to, device=job.device,
               seed=a.seed, placement=a.placement)


def _pas_select(job):
    arch = job.searcher.architecture()
    if arch["selected_by"] == "budget":     # the w > 0.5 mask missed rho +- tolerance (see PaS.keep)
        job.run.log(f"w > 0.5 keeps {arch['mask_macs'] / arch['base_macs']:.3f} of the MACs, outside "
                    f"{job.args.flops_target:.3f} +- {job.args.flops_tolerance:.3f}; exporting the largest "
                    f"channels by gate weight that fit the target instead")
    if "tied_macs" in arch:
        job.run.log(f"untied: the export keeps {arch['macs'] / arch['base_macs']:.3f} of the MACs (its shortcuts "
                    f"gather); the model's own class would need {arch['tied_macs'] / arch['base_macs']:.3f} to hold "
                    f"the same channels")
    return arch


PAS_METHOD = Method(
    name="pas", summary="PaS (Li et al., ICCV 2021): binary channel gates with a MACs regulariser, any CNN",
    options=(
        Option(("--cost-weight",), dict(type=_positive_float, default=50.0,
                                        help="lambda of lambda * (MACs(mask) / MACs_0 - rho)^2 (default 50)")),
        Option(("--flops-tolerance",), dict(type=_fraction, default=0.03,
                                            help="the mask's MACs must lie within target +- this, else the budget "
                                                 "correction chooses the channels (default 0.03)")),
        Option(("--search-lr",), dict(type=_positive_float, default=0.01,
                                      help="SGD step of the weights and gates during the search (default 0.01)")),
        Option(("--gate-lr",), dict(type=_positive_float, default=None,
                                    help="SGD step of the gates (default: --search-lr; short searches of a few "
                                         "hundred steps need about 0.1)")),
        *(o for o in DAIS_METHOD.options if o.dest == "round_to"),     # the same flag
        Option(("--placement",), dict(choices=("tied", "untied"), default="tied",
                                      help="tied: one gate per channel group, a residual stream shares one (the "
                                           "export is the model's own class); untied: the official post-add gate "
                                           "of every block, each shortcut through a channel selection (the export "
                                           "gathers on its shortcuts; RepVGG folds to a plain net with a width per "
                                           "block) (default tied)")),
    ),
    check_model=lambda name: None, build=_pas_build, select=_pas_select,
    export=lambda job: job.searcher.export())


def _ast_build(job):
    from nasprune.search import AST
    a = job.args
    budget = {"flops_target": None, "params_target": a.params_target} if a.params_target else \
        {"flops_target": a.flops_target}
    return AST(job.teacher, **budget, input_size=job.size, start="warm" if a.warm_start else "cold",
               coarse_fraction=a.coarse_fraction, coarse_lr=a.lr, subnets=a.subnets, cost_weight=a.cost_weight,
               policy_lr=a.policy_lr, lr=a.search_lr, alpha_lr=a.alpha_lr, teacher=job.teacher if a.robust else None,
               kd_lambda=getattr(a, "kd_lambda", 0.9), kd_temperature=getattr(a, "kd_temperature", 4.0),
               select_band=a.select_band, fill_budget=a.fill_budget, round_to=a.round_to, device=job.device,
               seed=a.seed)


def _ast_select(job):
    s = job.searcher
    arch = s.architecture()
    if arch["selected_by"] == "budget":     # no sampled sub-network was within the budget (see AST.keep)
        job.run.log(f"no sampled sub-network met the {s.budget} budget {s.target}; exporting the largest channels "
                    f"by alpha that fit it instead")
    else:
        filled = f" (topped up from {arch['subnet_cost']:.3f})" if s.fill_budget else ""
        job.run.log(f"sub-network {arch['subnet']} of {arch['subnets_done']}: {s.budget} {s.cost(s.keep()[0]):.3f} "
                    f"of the model's{filled}, held-out loss {arch['val_loss']:.3f}, acc {arch['val_acc']:.3f}")
    return arch


def _ast_finetune(job, progress):
    """Plain CE fine-tuning of the best sub-network; KD from the baseline with --robust."""
    from nasprune.train import train
    a = job.args
    return train(job.pruned, job.train_set, epochs=a.finetune_epochs, batch_size=a.batch_size, lr=a.lr,
                 teacher=job.teacher if a.robust else None, kd_lambda=a.kd_lambda, kd_temperature=a.kd_temperature,
                 warmup_epochs=a.warmup_epochs, test_data=job.test_set, device=job.device, seed=a.seed, **progress)


AST_METHOD = Method(
    name="ast", summary="AST (Lu et al., TPAMI 2023): sampled sub-networks trained slimmed, ThreshNet thresholds",
    options=(
        Option(("--warm-start",), dict(action="store_true", default=False,
                                       help="start from the baseline's weights (default: a cold start, the weights "
                                            "re-initialised and trained by a coarse phase)")),
        Option(("--robust",), dict(action="store_true", default=False,
                                   help="robust mode: KD from the baseline (or --teacher) trains the sub-networks "
                                        "and the fine-tuning (default: CE)")),
        Option(("--params-target",), dict(type=_fraction, default=None,
                                          help="a parameters budget (fraction kept) instead of --flops-target")),
        Option(("--subnets",), dict(type=_count(1), default=30, help="sub-networks sampled and trained (default 30)")),
        Option(("--coarse-fraction",), dict(type=float, default=None,
                                            help="share of the search's steps training the full target first "
                                                 "(default 0.2 cold, 0 warm; its SGD step is --lr, cosine)")),
        Option(("--policy-lr",), dict(type=_positive_float, default=3e-3, help="ThreshNet's Adam step (default 3e-3)")),
        Option(("--search-lr",), dict(type=_positive_float, default=0.01,
                                      help="SGD step of each sub-network's weights (default 0.01, constant)")),
        Option(("--alpha-lr",), dict(type=_positive_float, default=1e-3,
                                     help="SGD step of the filter weights alpha on the held-out split (default 1e-3)")),
        Option(("--cost-weight",), dict(type=_positive_float, default=2.0,
                                        help="beta of the reward's budget penalty (default 2)")),
        Option(("--select-band",), dict(type=float, default=0.1,
                                        help="the exported sub-network is the best by reward among those costing "
                                             "[target - this, target] (default 0.1)")),
        Option(("--fill-budget",), dict(action="store_true", default=False,
                                        help="top the selected sub-network up to the budget with the target's "
                                             "other channels, by alpha (default: exported as sampled)")),
        *(o for o in DAIS_METHOD.options if o.dest == "round_to"),     # the same flag
    ),
    check_model=lambda name: None, build=_ast_build, select=_ast_select,
    export=lambda job: job.searcher.export(), finetune=_ast_finetune)


def _ffp_build(job):
    from nasprune.search import FFP
    a = job.args
    return FFP(job.teacher, a.flops_target, input_size=job.size, search_per_class=a.search_per_class,
               tune_per_class=a.tune_per_class, tune_lr=a.tune_lr, search_step=a.search_step,
               ensemble=a.ensemble == "on", bank_size=a.bank_size, device=job.device, seed=a.seed, untie=a.untie)


def _ffp_select(job):
    arch = job.searcher.architecture()
    job.run.log(f"FFP: {arch['steps']} greedy steps, search loss {arch['trail_losses'][0]:.4f} -> "
                f"{arch['trail_losses'][-1]:.4f}")
    return arch


def _ffp_export(job):
    """The pruned network (kept kernels rescaled to the unpruned norms) and, for CKT, the memory
    bank over the training set, saved in the run folder (memory_bank.safetensors)."""
    s, a = job.searcher, job.args
    if a.finetune_loss == "ckt":
        t0 = time.time()
        bank = s.memory_bank(job.train_set, batch_size=max(a.batch_size, 256))
        bank.save(job.run.path("memory_bank.safetensors"))
        job.run.log(f"memory bank: {bank.logits.shape[1]} subnetworks' logits over {bank.num_samples} images "
                    f"({time.time() - t0:.0f} s), search losses {[round(v, 4) for v in bank.losses.tolist()]}")
    return s.export()


def _ffp_finetune(job, progress):
    """CKT (two views per image, the bank's adaptive teacher) or the shared KD from the baseline."""
    from nasprune.search.ffp import MemoryBank
    from nasprune.train import train
    a = job.args
    recorded = job.run.read_json("config.json", required=False) or {}   # `nasprune finetune` has no FFP flags
    loss = getattr(a, "finetune_loss", None) or recorded.get("finetune_loss", "ckt")
    common = dict(epochs=a.finetune_epochs, batch_size=a.batch_size, lr=a.lr, warmup_epochs=a.warmup_epochs,
                  test_data=job.test_set, device=job.device, seed=a.seed, **progress)
    if loss == "kd":
        return train(job.pruned, job.train_set, teacher=job.teacher, kd_lambda=a.kd_lambda,
                     kd_temperature=a.kd_temperature, **common)
    path = job.run.path("memory_bank.safetensors")
    if not os.path.isfile(path):
        raise CLIError(f"{path} not found: CKT fine-tuning needs the memory bank the FFP search wrote")
    bank = MemoryBank.load(path)
    temperature = getattr(a, "ckt_temperature", None) or recorded.get("ckt_temperature", 4.0)
    loader = bank.loader(job.train_set, a.batch_size, device=job.device, seed=a.seed)
    return train(job.pruned, loader, loss_fn=bank.ckt_loss(temperature), **common)


FFP_METHOD = Method(
    name="ffp", summary="FFP (Lee & Song, TNNLS 2023): greedy coarse-to-fine filter pruning, memory-bank CKT, any CNN",
    options=(
        Option(("--search-per-class",), dict(type=_count(1), default=32,
                                             help="search set: the last N training images per class (default 32)")),
        Option(("--tune-per-class",), dict(type=_count(0), default=256,
                                           help="pre-search tuning subset per class, --epochs epochs of it "
                                                "(default 256)")),
        Option(("--tune-lr",), dict(type=float, default=1e-3, help="SGD step of the pre-search tuning (default 1e-3)")),
        Option(("--search-step",), dict(type=_fraction, default=0.2,
                                        help="a group's k-th shrink: max(1/C, step / k) of its width (default 0.2)")),
        Option(("--ensemble",), dict(choices=("on", "off"), default="on",
                                     help="J includes CE to the accepted subnetworks' ensemble (default on)")),
        Option(("--bank-size",), dict(type=_count(1), default=5, help="memory-bank subnetworks K (default 5)")),
        Option(("--finetune-loss",), dict(choices=("ckt", "kd"), default="ckt",
                                          help="ckt: two views, the memory bank's teacher (default); kd: the shared "
                                               "KD from the baseline")),
        Option(("--ckt-temperature",), dict(type=_positive_float, default=4.0,
                                            help="T of the CKT loss (default 4; 10 for ImageNet)")),
        *(o for o in DAIS_METHOD.options if o.dest == "untie"),     # the same flag
    ),
    check_model=lambda name: None, build=_ffp_build, select=_ffp_select, export=_ffp_export,
    finetune=_ffp_finetune)

METHODS = {m.name: m for m in (TAS_METHOD, DAIS_METHOD, PAS_METHOD, FFP_METHOD, AST_METHOD)}


# ------------------------------------------------------------------ run folder and progress
def _is_main() -> bool:
    """True unless this is a torchrun rank other than 0 (those write no file and print nothing)."""
    if "torch" not in sys.modules:
        return True
    from nasprune import dist
    return dist.is_main()


class Run:
    """A run folder: paths, log, JSON files (written by rank 0 alone under torchrun)."""

    def __init__(self, folder, create=True):
        self.folder = os.path.abspath(folder)
        self.writer = _is_main()
        if create:
            if self.writer:
                os.makedirs(self.folder, exist_ok=True)
            if "torch" in sys.modules:     # under torchrun the other ranks wait until rank 0 made it
                from nasprune import dist
                dist.barrier()
        elif not os.path.isdir(self.folder):
            raise CLIError(f"run folder {folder!r} does not exist")

    def path(self, name):
        return os.path.join(self.folder, name)

    def log(self, message, echo=True):
        if not self.writer:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        with open(self.path("log.txt"), "a") as fh:
            fh.write(line + "\n")
        if echo:
            print(message, flush=True)

    def write_json(self, name, obj):
        from nasprune.io import atomic_write
        if not self.writer:
            return

        def write(tmp):
            with open(tmp, "w") as fh:
                json.dump(obj, fh, indent=2)
        atomic_write(self.path(name), write)

    def read_json(self, name, required=True):
        p = self.path(name)
        if not os.path.isfile(p):
            if not required:
                return None
            raise CLIError(f"{p} not found; is {self.folder!r} a nasprune run folder?")
        with open(p) as fh:
            return json.load(fh)


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


class DecodeBar:
    """The progress bar of image decoding (the data loaders' ``progress(done, total, desc)``)."""

    def __init__(self):
        self.bar = None

    def __call__(self, done, total, desc):
        if self.bar is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()
            self.bar = None


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


class SearchLog:
    """Logs each search epoch's metrics and keeps metrics.json current (a search Callback)."""

    def __init__(self, job):
        self.job = job

    def on_search_begin(self, searcher):
        pass

    def on_step_end(self, searcher, step, metrics):
        pass

    def on_epoch_end(self, searcher, epoch, metrics):
        self.job.run.log(f"search epoch {epoch}: {_format_metrics(metrics)}", echo=not self.job.args.progress)
        self.job.metrics["search"] = searcher.history
        self.job.run.write_json("metrics.json", self.job.metrics)

    def on_search_end(self, searcher):
        pass


def _train_progress(args, desc):
    """The progress bar's callbacks, and the training options every train() of a run shares."""
    common = {"sync_batchnorm": True} if getattr(args, "sync_bn", False) else {}
    return {**(TrainBar(desc).callbacks() if args.progress and _is_main() else {}), **common}


def _format_metrics(metrics):
    """'key value' pairs of the scalars (MACs-sized numbers in millions) and short lists."""
    parts = []
    for k, v in metrics.items():
        if k == "epoch" or isinstance(v, bool):
            continue
        if isinstance(v, float):
            parts.append(f"{k} {v / 1e6:.2f}M" if abs(v) >= 1e5 else f"{k} {v:.3f}")
        elif isinstance(v, int):
            parts.append(f"{k} {v}")
        elif isinstance(v, list) and len(v) <= 8:
            parts.append(f"{k} {v}")
    return ", ".join(parts)


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
    return load_dataset(spec, limit_per_class=limit_per_class, progress=DecodeBar() if sys.stderr.isatty() else None)


# ------------------------------------------------------------------ the search pipeline
class Job:
    """What the phases of a run share."""

    def __init__(self, args, run, constructor):
        self.args, self.run, self.constructor = args, run, constructor
        self.method = METHODS.get(getattr(args, "method", None))
        self.device = _device(args.device)
        self.metrics: dict = {}
        self.t0 = time.time()
        self.train_set = self.test_set = self.size = self.classes = None
        self.teacher = self.searcher = self.architecture = self.pruned = None


def phase_data(job):
    a = job.args
    job.train_set, job.test_set = _data(a.data, a.image_size, a.limit_per_class)
    job.size, job.classes = job.train_set.images.shape[1], job.train_set.num_classes
    job.run.log(f"data: {getattr(job.train_set, 'name', a.data)} {len(job.train_set)} train / {len(job.test_set)} "
                f"test, {job.size}x{job.size}, {job.classes} classes")
    job.metrics.update({"model": a.model, "method": a.method, "data": a.data or "digits", "image_size": job.size})


def phase_baseline(job):
    """The unpruned model, trained or loaded: the search's starting point and the KD teacher."""
    from nasprune.io import load
    from nasprune.models import load_pretrained
    from nasprune.train import evaluate, seeded, train
    a, history = job.args, []
    if a.teacher:
        teacher = load(a.teacher)
        job.run.log(f"teacher: {a.teacher}")
    elif a.pretrained:
        if a.model not in CIFAR_MODELS:
            raise CLIError(f"--pretrained loads the CIFAR ResNets' checkpoints ({', '.join(CIFAR_MODELS)}); "
                           f"for {a.model} pass --teacher (a nasprune.save file) or train a baseline")
        teacher = load_pretrained(a.model, a.pretrained, num_classes=job.classes)
        if a.baseline_epochs:
            history = train(teacher, job.train_set, epochs=a.baseline_epochs, batch_size=a.batch_size, lr=a.lr * 0.1,
                            test_data=job.test_set, device=job.device, seed=a.seed,
                            **_train_progress(a, "baseline"))
    else:
        if a.baseline_epochs < 1:
            raise CLIError("--baseline-epochs 0 needs --teacher or --pretrained (the unpruned KD teacher)")
        with seeded(a.seed):
            teacher = _build_model(job.constructor, job.classes)
        history = train(teacher, job.train_set, epochs=a.baseline_epochs, batch_size=a.batch_size, lr=a.lr,
                        test_data=job.test_set, device=job.device, seed=a.seed, **_train_progress(a, "baseline"))
    base = {**_model_stats(teacher, job.size), **evaluate(teacher.to(job.device), job.test_set, device=job.device)}
    _save_model(teacher, job.run.path("teacher.safetensors"), job.constructor, job.classes)
    job.teacher = teacher.to(job.device)
    job.metrics["baseline"] = {**base, "history": history}
    job.run.log(f"baseline: acc {base['acc']:.4f}, {base['flops'] / 1e6:.2f} MFLOPs, "
                f"{base['params'] / 1e6:.3f} M params")


def phase_search(job):
    """The method's search on the training set (the method splits it as it needs), resumable."""
    a = job.args
    job.searcher = job.method.build(job)
    callbacks = [SearchLog(job)] + ([SearchBar(f"{a.method.upper()} search")] if a.progress and _is_main() else [])
    job.searcher.search(job.train_set, epochs=a.epochs, batch_size=a.batch_size,
                        checkpoint=job.run.path("checkpoint.safetensors"), resume=a.resume,
                        checkpoint_every=a.checkpoint_every, callbacks=callbacks)
    arch = job.architecture = job.method.select(job)
    job.run.write_json("architecture.json", arch)
    job.metrics["search"] = job.searcher.history
    base = job.metrics["baseline"]["flops"]
    kept = [r["kept"] for r in arch["layer_widths"]]
    job.run.log(f"architecture: {arch['macs'] / 1e6:.2f} MFLOPs = {arch['macs'] / base:.3f} of the baseline "
                f"(target {a.flops_target}), {arch['params'] / 1e6:.3f} M params"
                + (f", blocks {arch['blocks']}" if "blocks" in arch else "") + f", widths {kept}")


def phase_export(job):
    job.pruned = job.method.export(job)
    _save_model(job.pruned, job.run.path("model.safetensors"), job.constructor, job.classes)
    job.run.write_json("metrics.json", job.metrics)


def phase_finetune(job):
    """KD fine-tuning of the pruned network from the baseline (or, with 0 epochs, its accuracy)."""
    from nasprune.train import evaluate, train
    a = job.args
    history = []
    if a.finetune_epochs and job.method is not None and job.method.finetune is not None:
        history = job.method.finetune(job, _train_progress(a, f"{job.method.name.upper()} fine-tune"))
    elif a.finetune_epochs:
        history = train(job.pruned, job.train_set, epochs=a.finetune_epochs, batch_size=a.batch_size, lr=a.lr,
                        teacher=job.teacher, kd_lambda=a.kd_lambda, kd_temperature=a.kd_temperature,
                        warmup_epochs=a.warmup_epochs, test_data=job.test_set, device=job.device, seed=a.seed,
                        **_train_progress(a, "KD fine-tune"))
    if a.finetune_epochs:
        _save_model(job.pruned, job.run.path("model.safetensors"), job.constructor, job.classes)
    stats = {**_model_stats(job.pruned, job.size),
             **evaluate(job.pruned.to(job.device), job.test_set, device=job.device), "history": history}
    job.metrics["pruned"] = stats
    job.run.write_json("metrics.json", job.metrics)
    job.run.log(f"pruned: acc {stats['acc']:.4f}, {stats['flops'] / 1e6:.2f} MFLOPs, "
                f"{stats['params'] / 1e6:.3f} M params")


def phase_deploy(job):
    """A model with a deploy form (``reparameterize()``: nasprune's RepVGG) is also saved in it,
    as ``deployed.safetensors``: the fine-tuned pruned network folded into plain layers. Its
    accuracy, MACs and its largest difference from the pruned network's logits on a test batch
    (relative to their largest magnitude) go into metrics.json under ``deployed``."""
    import torch
    from nasprune.data import DeviceLoader
    from nasprune.train import evaluate
    from nasprune.graph.untie import Untied
    from nasprune.models import RepVGG, reparameterize
    folds = callable(getattr(job.pruned, "reparameterize", None)) or \
        (isinstance(job.pruned, Untied) and isinstance(job.pruned.model, RepVGG))      # PaS --placement untied
    if not folds:
        return
    pruned = job.pruned.to(job.device).eval()
    deployed = (reparameterize(pruned) if isinstance(pruned, Untied) else pruned.reparameterize()).eval()
    x, _ = next(iter(DeviceLoader(job.test_set, 64, shuffle=False, augment=False, device=job.device)))
    with torch.no_grad():
        ref, out = pruned(x), deployed(x)
        err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    stats = {**_model_stats(deployed, job.size), **evaluate(deployed, job.test_set, device=job.device),
             "max_rel_err": err}
    _save_model(deployed, job.run.path("deployed.safetensors"), job.constructor, job.classes)  # moves it to the CPU
    job.metrics["deployed"] = stats
    job.run.write_json("metrics.json", job.metrics)
    job.run.log(f"deployed (reparameterised): acc {stats['acc']:.4f}, {stats['flops'] / 1e6:.2f} MFLOPs, "
                f"{stats['params'] / 1e6:.3f} M params, logits within {err:.1e} of the pruned network's")


def phase_report(job):
    job.metrics["seconds"] = job.metrics.get("seconds", 0.0) + time.time() - job.t0
    job.run.write_json("metrics.json", job.metrics)
    if job.run.writer:
        _plots(job.run, job.metrics, job.architecture)
        _summary(job.run, job.metrics)


SEARCH_PHASES = (phase_data, phase_baseline, phase_search, phase_export, phase_finetune, phase_deploy,
                 phase_report)


def cmd_search(args):
    constructor = model_constructor(args.model)      # fail fast: before any data or training
    METHODS[args.method].check_model(args.model)
    run = Run(args.out)
    run.write_json("config.json", {"command": "search", **{k: v for k, v in vars(args).items() if k != "func"}})
    job = Job(args, run, constructor)
    for phase in SEARCH_PHASES:
        phase(job)
    return 0


def cmd_finetune(args):
    from nasprune.io import load
    from nasprune.train import seeded
    run = Run(args.run, create=False)
    config = run.read_json("config.json")
    for k in ("batch_size", "kd_lambda", "kd_temperature", "warmup_epochs", "seed"):
        if getattr(args, k, None) is None:
            setattr(args, k, config.get(k))
    args.finetune_epochs, args.model, args.method = args.epochs, config.get("model"), config.get("method", "tas")
    job = Job(args, run, model_constructor(args.model))
    job.architecture, job.metrics = run.read_json("architecture.json"), run.read_json("metrics.json")
    job.train_set, job.test_set = _data(config.get("data"), config.get("image_size", 32), config.get("limit_per_class"))
    job.size, job.classes = job.train_set.images.shape[1], job.train_set.num_classes
    job.teacher = load(run.path("teacher.safetensors")).to(job.device)
    job.pruned = _load_model(run.path("model.safetensors"), job.architecture)
    if args.init == "random":
        with seeded(args.seed or 0):
            for m in job.pruned.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    phase_finetune(job)
    phase_report(job)
    return 0


def cmd_eval(args):
    from nasprune.train import evaluate
    device = _device(args.device)
    arch = None
    if args.run:
        run = Run(args.run, create=False)
        arch = run.read_json("architecture.json", required=False)
        config = run.read_json("config.json")
        path, data, size = run.path("model.safetensors"), config.get("data"), config.get("image_size", 32)
    else:
        if not args.model_file:
            raise CLIError("give --run DIR or --model-file FILE")
        path, data, size = args.model_file, args.data, args.image_size
        if args.arch:
            with open(args.arch) as fh:
                arch = json.load(fh)
    model = _load_model(path, arch)
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
    for name, m in (("baseline", b), ("pruned", p), ("deployed", metrics.get("deployed", {}))):
        if m:
            lines.append(f"{name:10} {m['acc']:9.4f} {m['flops'] / 1e6:9.3f} {m['params'] / 1e6:11.4f}")
    if b and p:
        lines.append(f"FLOPs kept {p['flops'] / b['flops']:.3f}, params kept {p['params'] / b['params']:.3f}, "
                     f"accuracy change {100 * (p['acc'] - b['acc']):+.2f} points")
    if "seconds" in metrics:
        lines.append(f"total {metrics['seconds']:.0f} s; run folder {run.folder}")
    run.log("\n" + "\n".join(lines))


def _layer_widths(arch):
    """The architecture's per-layer (name, original, kept) widths; architecture.json files of
    TAS runs before the keep-based dict are converted from their search-space keys."""
    if "layer_widths" in arch:
        return [(r["name"], r["original"], r["kept"]) for r in arch["layer_widths"]]
    from nasprune.models import ResNetSpec
    spec = ResNetSpec.from_dict(arch)
    return list(zip(spec.row_names(), spec.row_widths(), spec.kept_widths(arch["widths"], arch["blocks"])))


def _plots(run, metrics, arch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # kept width per layer against the original (a removed layer at 0)
    layers = _layer_widths(arch)
    names, original, kept = zip(*layers) if layers else ((), (), ())
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(kept)), 3.5))
    xs = range(len(kept))
    ax.bar(xs, original, color="#cccccc", label="original")
    ax.bar(xs, kept, color="#1f77b4", label="kept")
    if len(names) <= 24:
        ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer, in the model's order (0 = removed)")
    ax.set_ylabel("channels")
    title = f"{arch.get('method', 'tas').upper()} widths"
    if "blocks" in arch:
        title += f", blocks per stage {arch['blocks']}"
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run.path("widths.png"), dpi=100)
    plt.close(fig)

    search = metrics.get("search", [])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    base = metrics.get("baseline", {}).get("flops") or arch.get("base_macs") or arch.get("base_flops")
    if search and base:
        ep = [m["epoch"] for m in search]
        for key, style, label in (("macs", "o-", "current"), ("flops", "o-", "arg-max"),
                                  ("expected_macs", "s--", "expected"), ("expected_flops", "s--", "expected")):
            if key in search[0]:
                a1.plot(ep, [m[key] / base for m in search], style, label=label)
        target = arch.get("target_macs", arch.get("target_flops"))
        if target:
            a1.axhline(target / base, color="k", lw=0.8, label="target")
        for key in search[0]:
            if key.endswith("acc"):
                a2.plot(ep, [m[key] for m in search], label=f"search {key}")
    a1.set_xlabel("search epoch"); a1.set_ylabel("FLOPs / baseline"); a1.set_title("FLOPs")
    if a1.lines:
        a1.legend()
    for key, label in (("baseline", "baseline test"), ("pruned", "KD fine-tune test")):
        hist = metrics.get(key, {}).get("history", [])
        if hist and "test_acc" in hist[0]:
            a2.plot([h["epoch"] for h in hist], [h["test_acc"] for h in hist], label=label)
    a2.set_xlabel("epoch"); a2.set_ylabel("accuracy"); a2.set_title("accuracy")
    if a2.lines:
        a2.legend()
    fig.tight_layout()
    fig.savefig(run.path("curves.png"), dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ parser
class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser. For one with --method (search): an option of another method than
    --method's is an error, and the chosen method's unset options take its defaults."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        if getattr(ns, "method", None) not in METHODS:
            return ns, extra
        method = METHODS[ns.method]
        own = {o.dest for o in method.options}
        for other in METHODS.values():
            for opt in other.options:
                if opt.dest not in own and hasattr(ns, opt.dest):
                    self.error(f"{opt.flags[0]} is an option of --method {other.name}, not of --method {method.name}")
        for opt in method.options:
            if not hasattr(ns, opt.dest):
                setattr(ns, opt.dest, opt.kwargs.get("default"))
        return ns, extra


def _add_method_options(parser):
    """Every method's options, each flag once (methods may share one), in one group; they are
    absent from the namespace unless given (_SubcommandParser fills the chosen method's defaults)."""
    group = parser.add_argument_group("method options", "each applies to the methods named after it")
    takers: dict = {}
    for method in METHODS.values():
        for opt in method.options:
            takers.setdefault(opt.dest, (opt, []))[1].append(method.name)
    for opt, names in takers.values():
        kwargs = dict(opt.kwargs)
        default = kwargs.pop("default", None)
        kwargs["help"] = (kwargs.get("help") or f"default {default}") + f" [--method {', '.join(names)}]"
        group.add_argument(*opt.flags, default=argparse.SUPPRESS, **kwargs)


def build_parser():
    p = argparse.ArgumentParser(prog="nasprune", description="Network pruning as architecture search.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{search,finetune,eval,report}",
                           parser_class=_SubcommandParser)

    def common(sp):
        sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
        sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    s = sub.add_parser("search", help="train a baseline, search, export, KD fine-tune")
    s.add_argument("--method", choices=tuple(METHODS), default="tas",
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    s.add_argument("--model", default="resnet20",
                   help=f"a CIFAR ResNet ({', '.join(CIFAR_MODELS)}), a CIFAR RepVGG ({', '.join(CIFAR_REPVGG)}) "
                        f"or any torchvision classification model "
                        f"(resnet50, mobilenet_v2, ...); a method names the ones it searches (tas: ResNets); "
                        f"default resnet20")
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
    s.add_argument("--kd-lambda", type=float, default=0.9)
    s.add_argument("--kd-temperature", type=_positive_float, default=4.0)
    s.add_argument("--pretrained", help="akamaster CIFAR-10 ResNet weights for the baseline")
    s.add_argument("--teacher", help="a nasprune.save file of the unpruned baseline (skips baseline training)")
    s.add_argument("--out", default="runs/tas", help="run folder (default runs/tas)")
    s.add_argument("--resume", action="store_true", help="continue the search from the run's checkpoint")
    s.add_argument("--checkpoint-every", type=_count(0), default=50, help="steps between checkpoints")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: batch statistics over the global batch when training the baseline "
                        "and fine-tuning (SyncBatchNorm)")
    common(s)
    _add_method_options(s)
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
    f.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: SyncBatchNorm while fine-tuning")
    common(f)
    f.set_defaults(func=cmd_finetune)

    e = sub.add_parser("eval", help="accuracy, FLOPs and params of a saved model")
    e.add_argument("--run")
    e.add_argument("--model-file")
    e.add_argument("--arch", help="architecture.json, for TAS-pruned model files of earlier nasprune versions")
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
    joined = False
    if hasattr(args, "device") and args.command in ("search", "finetune") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as td    # one of torchrun's processes: join its process group (nccl / gloo)
        from nasprune import dist
        joined = not td.is_initialized()
        args.device = dist.init(_device(args.device))
    try:
        return args.func(args)
    except CLIError as exc:
        parser.exit(2, f"nasprune {args.command}: error: {exc}\n")
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.exit(1, f"nasprune {args.command}: error: {exc}\n")
    finally:
        if joined:
            td.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
