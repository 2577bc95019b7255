"""Two gloo ranks against one process (issue 18): with the same global batch and seed, DAIS, TAS
and AST find the same architecture and the same weights within fp32 tolerance; only rank 0
writes; a 2-process DAIS search killed mid-epoch resumes to the uninterrupted result."""
from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import _jobs
from tests.distributed._ranks import run_ranks

ATOL, RTOL = 1e-5, 1e-4


def _close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def dais_one():
    return _jobs.dais(0)


def test_dais_two_ranks_equal_one_process_and_only_rank0_writes(dais_one, tmp_path):
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    ckpt.parent.mkdir()
    (r0, w0), (r1, w1) = run_ranks(_jobs.dais, (str(ckpt),), watched=tmp_path / "run", results=tmp_path / "out")
    one = dais_one
    assert one["world_size"] == 1 and r0["world_size"] == 2
    # the search moved: a pruned architecture, not the full one, near the budget
    assert sum(len(v) for v in one["keep"].values()) < one["num_gates"] and one["macs"] <= 0.5 * one["base_macs"]
    assert r0["keep"] == one["keep"] and r1["keep"] == one["keep"] and r0["macs"] == one["macs"]
    _close(r0["weights"], one["weights"])
    for k in r0["weights"]:                      # the ranks hold the very same weights
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    for h0, h in zip(r0["history"], one["history"]):   # epoch figures are the global ones
        assert h0["loss"] == pytest.approx(h["loss"], rel=1e-4) and h0["train_acc"] == pytest.approx(h["train_acc"])
    assert w1 == [] and os.path.realpath(ckpt) in w0 and os.path.exists(ckpt)


def test_dais_two_ranks_killed_mid_epoch_resume_to_the_same_result(dais_one, tmp_path):
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    ckpt.parent.mkdir()
    # 3 steps an epoch; checkpoints after steps 2, 3 (epoch end) and 4 (mid-epoch 2); killed at 5
    killed = run_ranks(_jobs.dais, (str(ckpt), 5), watched=tmp_path / "run", results=tmp_path / "out1")
    assert [r for r, _ in killed] == ["killed", "killed"] and killed[1][1] == []
    (r0, w0), (r1, w1) = run_ranks(_jobs.dais, (str(ckpt), None, True), watched=tmp_path / "run",
                                   results=tmp_path / "out2")
    assert w1 == []
    assert r0["keep"] == dais_one["keep"] == r1["keep"]
    _close(r0["weights"], dais_one["weights"])


def test_tas_two_ranks_draw_the_same_candidates_and_equal_one_process(tmp_path):
    one = _jobs.tas(0)
    (r0, _), (r1, _) = run_ranks(_jobs.tas, watched=tmp_path / "none", results=tmp_path / "out")
    assert torch.equal(r0["generator"], one["generator"]) and torch.equal(r1["generator"], one["generator"])
    assert (r0["widths"], r0["blocks"]) == (one["widths"], one["blocks"]) == (r1["widths"], r1["blocks"])
    _close(r0["weights"], one["weights"])


def test_ast_two_ranks_train_score_and_choose_the_same_subnetworks(tmp_path):
    # the sub-networks' own optimisers average across ranks and their held-out scores are summed
    # over every rank's share, so the rewards, the policy and the chosen sub-network are one
    one = _jobs.ast(0)
    (r0, w0), (r1, w1) = run_ranks(_jobs.ast, watched=tmp_path / "none", results=tmp_path / "out")
    assert one["world_size"] == 1 and r0["world_size"] == 2 and len(one["rewards"]) == 3
    assert r0["subnet_keeps"] == one["subnet_keeps"] == r1["subnet_keeps"]
    assert r0["rewards"] == pytest.approx(one["rewards"], rel=1e-5) and r1["rewards"] == r0["rewards"]
    assert r0["keep"] == one["keep"] == r1["keep"]
    _close(r0["weights"], one["weights"])
    _close(r0["policy"], one["policy"])
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
