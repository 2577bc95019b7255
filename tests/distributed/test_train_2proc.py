"""Fine-tuning on two gloo ranks (issue 18): train() under DistributedDataParallel with the same
global batch and seed gives the one-process weights within fp32 tolerance and the same global
history, and evaluate() sums the ranks' shards to the one-process accuracy."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import _jobs
from tests.distributed._ranks import run_ranks


def test_finetune_two_ranks_equal_one_process(tmp_path):
    one = _jobs.finetune(0)
    (r0, _), (r1, _) = run_ranks(_jobs.finetune, watched=tmp_path / "none", results=tmp_path / "out")
    for k, v in one["weights"].items():
        torch.testing.assert_close(r0["weights"][k], v, atol=1e-5, rtol=1e-4)
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
        assert not torch.equal(v, _jobs.initial_plain()[k]), k          # it trained
    for h0, h in zip(r0["history"], one["history"]):
        assert h0["loss"] == pytest.approx(h["loss"], rel=1e-4)
        assert (h0["train_acc"], h0["test_acc"]) == (h["train_acc"], h["test_acc"])
    assert r0["eval"]["acc"] == one["eval"]["acc"] == r1["eval"]["acc"]
    assert r0["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)
