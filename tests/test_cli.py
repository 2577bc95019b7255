"""`python -m nasprune` end to end on the embedded digits (tiny: 16x16, one epoch per phase)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "nasprune", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=1200)


@pytest.mark.parametrize("model", ["resnet20", "resnet18"])   # a CIFAR ResNet, a torchvision ResNet
def test_search_end_to_end_writes_the_run_folder(tmp_path, model):
    out = tmp_path / "run"
    r = _run("search", "--method", "tas", "--model", model, "--data", "digits", "--image-size", "16",
             "--flops-target", "0.5", "--epochs", "1", "--baseline-epochs", "1", "--finetune-epochs", "1",
             "--batch-size", "128", "--out", str(out), "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("config.json", "log.txt", "architecture.json", "model.safetensors", "teacher.safetensors",
                 "checkpoint.safetensors", "metrics.json", "widths.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    arch = json.loads((out / "architecture.json").read_text())
    assert metrics["pruned"]["flops"] == arch["flops"] < metrics["baseline"]["flops"]
    assert metrics["pruned"]["params"] < metrics["baseline"]["params"]
    assert len(metrics["search"]) == 1 and "baseline" in r.stdout and "pruned" in r.stdout
    # the saved pruned model reloads and evaluates to the recorded accuracy
    e = _run("eval", "--run", str(out), "--device", "cpu")
    assert e.returncode == 0, e.stderr[-2000:]
    res = json.loads(e.stdout)
    assert res["flops"] == arch["flops"] and abs(res["acc"] - metrics["pruned"]["acc"]) < 1e-9
    rep = _run("report", "--run", str(out))
    assert rep.returncode == 0 and "FLOPs kept" in rep.stdout


@pytest.mark.parametrize("args,message", [
    (["search", "--flops-target", "1.5"], "fraction of FLOPs kept"),
    (["search", "--flops-target", "half"], "expected a number"),
    (["search", "--model", "resnet7"], "invalid choice"),
    (["search", "--epochs", "0"], "must be >= 1"),
    (["search", "--data", "/nonexistent/cifar.tar.gz", "--out", "{tmp}/x"], "no such file"),
    (["search", "--baseline-epochs", "0", "--out", "{tmp}/y", "--image-size", "8"], "needs --teacher"),
    (["report", "--run", "{tmp}/missing"], "does not exist"),
    (["search", "--model", "resnet50", "--pretrained", "x.th", "--out", "{tmp}/z", "--image-size", "8"],
     "--pretrained loads the CIFAR ResNets"),
    ([], "required"),
])
def test_bad_arguments_exit_nonzero_with_message(tmp_path, args, message):
    r = _run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_search_init_choices_are_the_searchers_and_default_to_its_first():
    """The parser spells the export init modes itself (it imports no torch); they must not drift."""
    from nasprune.cli import build_parser
    from nasprune.search.tas import INIT_MODES
    args = build_parser().parse_args(["search", "--data", "digits"])
    assert args.init == INIT_MODES[0]
    for mode in INIT_MODES:
        assert build_parser().parse_args(["search", "--data", "digits", "--init", mode]).init == mode
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "--data", "digits", "--init", "scratch"])
