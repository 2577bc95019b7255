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
    assert metrics["pruned"]["flops"] == arch["flops"] == arch["macs"] < metrics["baseline"]["flops"]
    assert metrics["pruned"]["params"] == arch["params"] < metrics["baseline"]["params"]
    assert arch["method"] == "tas" and arch["base_macs"] == metrics["baseline"]["flops"]
    assert sum(1 for row in arch["layer_widths"] if row["kept"] < row["original"]) > 0
    assert len(metrics["search"]) == 1 and "baseline" in r.stdout and "pruned" in r.stdout
    # the model file alone: nasprune.load needs no architecture.json
    e = _run("eval", "--model-file", str(out / "model.safetensors"), "--data", "digits", "--image-size", "16",
             "--device", "cpu")
    assert e.returncode == 0, e.stderr[-2000:]
    assert abs(json.loads(e.stdout)["acc"] - metrics["pruned"]["acc"]) < 1e-9
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
    (["search", "--model", "resnet7", "--out", "{tmp}/m"], "neither a CIFAR ResNet"),
    (["search", "--model", "mobilenet_v2", "--out", "{tmp}/m"], "--method tas searches ResNets"),
    (["search", "--model", "resnext50_32x4d", "--out", "{tmp}/m"], "not resnext50_32x4d"),
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


def test_model_names_are_the_cifar_resnets_and_every_torchvision_classifier():
    import torchvision
    from nasprune.cli import CLIError, model_constructor
    assert model_constructor("resnet56") == "nasprune.models.cifar_resnet56"
    for name in torchvision.models.list_models(module=torchvision.models):
        assert model_constructor(name) == f"torchvision.models.{name}"
    with pytest.raises(CLIError, match="neither a CIFAR ResNet"):
        model_constructor("fasterrcnn_resnet50_fpn")          # a detection model, not a classifier


def test_method_registry_declares_each_methods_options(monkeypatch):
    """Each method declares its own options: they take that method's defaults, and an option of
    another method is refused (a second method registered here, as DAIS or PaS will be)."""
    from nasprune import cli
    assert {o.dest for o in cli.METHODS["tas"].options} == {
        "arch_lr", "cost_weight", "flops_tolerance", "select", "tau_schedule", "tau_max", "tau_min", "init",
        "widths_only"}
    other = cli.Method(name="other", summary="a test method",
                       options=(cli.Option(("--other-rate",), dict(type=float, default=0.5)),
                                cli.Option(("--init",), dict(choices=("gates", "random"), default="gates"))),
                       check_model=lambda name: None, build=None, select=None, export=None)
    monkeypatch.setitem(cli.METHODS, "other", other)
    parser = cli.build_parser()
    tas = parser.parse_args(["search"])
    assert tas.method == "tas" and tas.tau_max == 5.0 and tas.init == "base" and not hasattr(tas, "other_rate")
    mine = parser.parse_args(["search", "--method", "other", "--other-rate", "2"])
    assert mine.other_rate == 2.0 and mine.init == "gates" and not hasattr(mine, "tau_max")
    assert parser.parse_args(["search", "--method", "other", "--init", "random"]).init == "random"
    with pytest.raises(SystemExit):
        parser.parse_args(["search", "--method", "other", "--tau-max", "3"])
    with pytest.raises(SystemExit):
        parser.parse_args(["search", "--other-rate", "2"])              # --method tas takes no --other-rate
    help_text = parser._subparsers._group_actions[0].choices["search"].format_help()
    assert "[--method tas, other]" in help_text and "[--method other]" in help_text


def test_parser_imports_no_torch():
    """The parser (and so --help) is built without torch or torchvision: cli.py loaded on its own."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('cli_alone', {str(ROOT / 'nasprune' / 'cli.py')!r})\n"
            "cli = sys.modules['cli_alone'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(cli)\n"
            "text = cli.build_parser()._subparsers._group_actions[0].choices['search'].format_help()\n"
            "assert '--tau-max' in text and '--model' in text\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'nasprune')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_runs_of_earlier_versions_still_plot_and_load(tmp_path):
    """architecture.json of a TAS run before the keep-based dict converts to per-layer widths; a
    model file that records no constructor loads with its architecture dict, and says so without."""
    import torch
    import nasprune
    from nasprune.cli import CLIError, _layer_widths, _load_model
    from nasprune.models import ResNetSpec, tas_resnet
    old = {**ResNetSpec.cifar(2).to_dict(), "family": "tas-resnet", "widths": [8] + [12] * 4 + [20] * 4 + [40] * 4,
           "blocks": [2, 1, 2]}
    rows = _layer_widths(old)
    assert len(rows) == 13 and rows[0] == ("conv1", 16, 8) and rows[7] == ("layer2.1.conv1", 32, 0)
    net = tas_resnet(**old).eval()
    net.nasprune_constructor = None                 # as files were saved before TASResNet recorded it
    nasprune.save(net, tmp_path / "old.safetensors")
    with pytest.raises(CLIError, match="pass --arch architecture.json"):
        _load_model(str(tmp_path / "old.safetensors"))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(_load_model(str(tmp_path / "old.safetensors"), old).eval()(x), net(x))
