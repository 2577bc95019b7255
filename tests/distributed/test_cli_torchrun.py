"""The command line under torchrun (issue 18): `torchrun --nproc_per_node 2 -m nasprune search`
on gloo writes one run folder (rank 0), prints once, and the folder loads and evaluates in a
single process to the accuracy the 2-process run recorded; `nasprune finetune` on two ranks
writes only from rank 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from nasprune import cli
from tests.distributed._ranks import run_ranks

SEARCH = ["search", "--method", "dais", "--model", "resnet20", "--data", "digits", "--image-size", "16",
          "--baseline-epochs", "1", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "64", "--device", "cpu",
          "--no-progress"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # its own process group, so that a timeout takes the ranks down with the launcher
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "nasprune", *SEARCH, "--out", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        pytest.fail(f"torchrun ran past 300 s: {stderr[-3000:]}")
    assert p.returncode == 0, stderr[-3000:]
    return out, stdout


def test_torchrun_search_writes_one_run_folder_that_evaluates_in_one_process(run_folder, capsys):
    out, stdout = run_folder
    assert stdout.count("pruned: acc") == 1                  # rank 0 alone prints
    assert {"architecture.json", "model.safetensors", "teacher.safetensors", "metrics.json", "log.txt",
            "checkpoint.safetensors"} <= set(os.listdir(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(line.startswith("[") and "pruned: acc" in line for line in (out / "log.txt").read_text().splitlines()) == 1
    assert cli.main(["eval", "--run", str(out), "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["acc"] == pytest.approx(metrics["pruned"]["acc"], abs=1e-9)
    assert res["flops"] == metrics["pruned"]["flops"] < 0.5 * metrics["baseline"]["flops"]


def _finetune(rank, folder):
    return cli.main(["finetune", "--run", folder, "--epochs", "1", "--device", "cpu", "--no-progress"])


def test_finetune_on_two_ranks_writes_from_rank0_only(run_folder, tmp_path):
    out, _ = run_folder
    before = (out / "model.safetensors").stat().st_mtime_ns
    (r0, w0), (r1, w1) = run_ranks(_finetune, (str(out),), watched=out, results=tmp_path / "res")
    assert r0 == r1 == 0 and w1 == [] and any(p.endswith("model.safetensors") for p in w0)
    assert (out / "model.safetensors").stat().st_mtime_ns > before
