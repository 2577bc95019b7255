"""Sweep: every torchvision classification and segmentation model and every CIFAR ResNet,
traced and slimmed to half of each prunable group with random weights.

The models run in two worker processes (a model's memory is freed when its worker moves on,
and a crash costs one model, not the session); the tests assert on the facts they report. One
worker takes the models largest first, the other smallest first, so that the two largest (about
19 and 12 GiB at their peak in one worker) never run side by side on a 24 GiB machine.
Set NASPRUNE_SWEEP_MODELS=a,b,c to sweep a subset.
"""
from __future__ import annotations

import json
import os
import collections
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import zoo  # noqa: E402

MODEL_TIMEOUT_S = 420
# largest first
HEAVY = ["vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "maxvit_t", "regnet_y_32gf",
         "convnext_large", "efficientnet_v2_l", "efficientnet_b7", "vgg19_bn", "vgg19", "vgg16_bn",
         "vgg16", "wide_resnet101_2", "regnet_x_32gf", "swin_v2_b", "swin_b", "vgg13_bn", "vgg13",
         "vgg11_bn", "vgg11", "regnet_y_16gf", "efficientnet_b6", "resnext101_64x4d",
         "resnext101_32x8d", "convnext_base", "regnet_x_16gf", "efficientnet_v2_m", "deeplabv3_resnet101",
         "fcn_resnet101", "inception_v3"]


def _names() -> list[str]:
    chosen = os.environ.get("NASPRUNE_SWEEP_MODELS")
    names = zoo.all_names() if not chosen else [n for n in chosen.split(",") if n]
    heavy = [n for n in HEAVY if n in names]
    return heavy + [n for n in names if n not in heavy]


def _worker():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, str(HERE / "sweep_worker.py"), "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _drive(todo: collections.deque, largest_first: bool, results: dict) -> None:
    proc = _worker()
    while True:
        try:
            name = todo.popleft() if largest_first else todo.pop()  # atomic on a deque
        except IndexError:
            break
        start = time.perf_counter()
        proc.stdin.write(name + "\n")
        proc.stdin.flush()
        line_box = []
        reader = threading.Thread(target=lambda: line_box.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(MODEL_TIMEOUT_S)
        line = line_box[0] if line_box else ""
        if not line:
            proc.kill()
            proc.wait()
            why = "timed out" if reader.is_alive() else f"worker died (exit {proc.returncode})"
            results[name] = {"name": name, "error": f"{why} after {time.perf_counter() - start:.0f} s"}
            proc = _worker()
            continue
        results[name] = json.loads(line)
    proc.stdin.close()
    proc.wait()


@pytest.fixture(scope="session")
def sweep() -> dict:
    todo = collections.deque(_names())
    results: dict = {}
    start = time.perf_counter()
    threads = [threading.Thread(target=_drive, args=(todo, largest_first, results))
               for largest_first in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results["_wall_s"] = time.perf_counter() - start
    report = os.environ.get("NASPRUNE_SWEEP_REPORT")
    if report:  # per-model facts (groups, timings, MACs) for the README table
        Path(report).write_text(json.dumps(results, indent=1))
    return results


@pytest.mark.parametrize("name", _names())
def test_slim_half_of_every_group(sweep, name):
    facts = sweep[name]
    assert "error" not in facts, f"{name}: {facts.get('error')}\n{facts.get('traceback', '')}"
    assert facts["original_untouched"]
    assert facts["pruned_groups"] > 0 and facts["dims_pruned"] > 0, f"{name}: nothing was pruned"
    assert facts["width_mismatches"] == [], f"{name}: {facts['width_mismatches']}"
    assert facts["shapes_equal"] and facts["finite"]
    assert facts["macs_slim_predicted"] == facts["macs_slim_counted"] < facts["macs"]
    if "contract_err" in facts:
        assert facts["contract_err"] <= 1e-5, f"{name}: masked and slimmed differ by {facts['contract_err']:.2e}"
    assert facts["train_loss_finite"] and facts["grads_finite"]
    assert facts["grads_present"] == 1.0, f"{name}: only {facts['grads_present']:.0%} of parameters got a gradient"


# "plain": every site a stand-alone gate: where a gate is 1 it multiplies by exactly 1, so the gated
# network computes what the model computes; held to the fp32 relative error 1e-5.
# "fused" (the default): the conv-BN epilogue rounds a pre-activation differently from
# nn.BatchNorm2d in the last bit (seen up to 1.4e-5 on the outputs of random-weight RegNets), and
# where a pre-activation lies within that rounding of zero the ReLU mask flips; in training a
# batch of 2 spreads one flip through BatchNorm's backward over the whole channel (seen: 8.8 % of
# the largest input gradient on cifar_resnet44B, whose plain gated network is bit-exact)
GATED_TOL = {"plain_ones_train_out": 1e-5, "plain_ones_train_grad": 1e-5, "plain_ones_eval_out": 1e-5,
             "plain_ones_eval_grad": 1e-5, "plain_binary_vs_slim": 1e-5, "plain_binary_vs_mask": 1e-5,
             "plain_export_err": 1e-5,
             "fused_ones_train_out": 1e-3, "fused_ones_train_grad": 0.2, "fused_ones_eval_out": 1e-4,
             "fused_ones_eval_grad": 1e-2, "fused_binary_vs_slim": 1e-4, "fused_binary_vs_mask": 1e-4,
             "fused_export_err": 1e-5}


@pytest.mark.parametrize("name", [n for n in _names() if n not in zoo.SEGMENTATION])
def test_gated_network(sweep, name):
    """Issue 12's contract of nasprune.search.GatedNetwork on every classification model."""
    facts = sweep[name]
    assert "error" not in facts, f"{name}: {facts.get('error')}\n{facts.get('traceback', '')}"
    gated = facts["gated"]
    assert "error" not in gated, f"{name}: {gated.get('error')}\n{gated.get('traceback', '')}"
    assert gated["groups"] > 0 and gated["gates"] > 0, f"{name}: no gated group; ungated: {gated['ungated']}"
    assert gated["binary_macs"] == gated["exact_macs"] == gated["slim_macs"]
    assert gated["binary_params"] == gated["slim_params"]
    for key, tol in GATED_TOL.items():
        if key in gated:
            assert gated[key] <= tol, f"{name}: {key} = {gated[key]:.2e} > {tol:.0e}"
    if "export_class" in gated:
        assert gated["export_class"]


def test_sweep_covers_every_classification_model():
    if os.environ.get("NASPRUNE_SWEEP_MODELS"):
        pytest.skip("subset requested")
    names = set(_names())
    assert set(zoo.classification_names()) <= names
    assert set(zoo.SEGMENTATION) <= names and set(zoo.CIFAR) <= names
    assert len(zoo.classification_names()) >= 80
