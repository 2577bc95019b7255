"""FFP on two gloo ranks against one process (issue 18): the ranks split the importance pass, the
candidate scoring and the memory bank by whole search batches, agree on the accepted candidate,
and reach the one-process search bit for bit (the same subnetworks, trail losses, ensemble and
bank logits, the steps past 5 % of the MACs scored on the same slimmed network); only rank 0
writes; a 2-process search killed among its greedy steps resumes to the same result. Both ways of dealing: more batches than ranks (each rank its batches, every
candidate) and fewer (the ranks of a batch share out its candidates)."""
from __future__ import annotations

import os

import pytest
import torch

from nasprune import dist
from nasprune.data import load_dataset
from nasprune.models import CifarResNet
from nasprune.search import FFP
from tests.distributed._ranks import run_ranks
from tests.search._kill import Kill

SIZE = 8


def ffp_job(rank, folder, batch_size, kill_at=None, resume=False):
    """A ResNet-8 FFP search on 8x8 digits (search set 4 a class = 40 images, no tuning) to 0.6
    of the MACs, a checkpoint every 4 steps, then a 3-entry memory bank over 100 images
    (batches of 32: 32, 32, 32, 4) saved beside it."""
    torch.set_num_threads(1)           # as the ranks run: the same kernels, the same bits
    torch.manual_seed(0)
    train, _ = load_dataset(None, size=SIZE)
    s = FFP(CifarResNet(8), 0.6, input_size=SIZE, device="cpu", search_per_class=4, tune_per_class=0,
            bank_size=3, seed=2)
    arch = s.search(train, epochs=1, batch_size=batch_size, checkpoint=os.path.join(folder, "ckpt.safetensors"),
                    checkpoint_every=4, resume=resume, callbacks=[Kill(kill_at)] if kill_at else [])
    bank = s.memory_bank(train.subset(range(100)), batch_size=32)
    bank.save(os.path.join(folder, "bank.safetensors"))
    return {"keep": arch["keep"], "macs": arch["macs"], "base_macs": s.gn.base_macs,
            "losses": [t["loss"] for t in s.trail], "keeps": torch.stack([t["keep"] for t in s.trail]),
            "ensemble": s.ensemble.clone(), "bank": bank.logits.clone(), "bank_keeps": bank.keeps.clone(),
            "world_size": dist.world_size(), "slim_entry": s._slim[0] if s._slim is not None else None}


def _one_process(folder, batch_size):
    threads = torch.get_num_threads()
    try:
        return ffp_job(0, str(folder), batch_size)
    finally:
        torch.set_num_threads(threads)


def _same(run, one):
    assert run["keep"] == one["keep"] and run["macs"] == one["macs"]
    assert run["losses"] == one["losses"]                   # every accepted candidate's J, bit for bit
    assert torch.equal(run["keeps"], one["keeps"])
    assert torch.equal(run["ensemble"], one["ensemble"])
    assert torch.equal(run["bank_keeps"], one["bank_keeps"]) and torch.equal(run["bank"], one["bank"])
    assert run["slim_entry"] == one["slim_entry"] is not None    # the late steps scored on a slimmed network


@pytest.mark.parametrize("batch_size", [16, 64])     # 3 search batches (16, 16, 8) on 2 ranks; 1 batch
def test_ffp_two_ranks_equal_one_process_and_only_rank0_writes(tmp_path, batch_size):
    (tmp_path / "one").mkdir()
    one = _one_process(tmp_path / "one", batch_size)
    assert one["world_size"] == 1 and len(one["losses"]) >= 4             # a real search: several steps
    assert one["macs"] <= 0.6 * one["base_macs"] and one["bank"].shape == (100, 3, 10)
    run = tmp_path / "run"
    run.mkdir()
    (r0, w0), (r1, w1) = run_ranks(ffp_job, (str(run), batch_size), watched=run, results=tmp_path / "out")
    assert r0["world_size"] == 2
    _same(r0, one)
    _same(r1, one)
    assert w1 == []
    assert {os.path.realpath(run / "ckpt.safetensors"), os.path.realpath(run / "bank.safetensors")} <= set(w0)
    assert os.path.exists(run / "bank.safetensors")


def test_ffp_two_ranks_killed_among_greedy_steps_resume_to_the_same_result(tmp_path):
    (tmp_path / "one").mkdir()
    one = _one_process(tmp_path / "one", 16)
    run = tmp_path / "run"
    run.mkdir()
    killed = run_ranks(ffp_job, (str(run), 16, 6), watched=run, results=tmp_path / "out1")
    assert [r for r, _ in killed] == ["killed", "killed"] and killed[1][1] == []
    assert os.path.exists(run / "ckpt.safetensors")            # written at step 4
    (r0, _), (r1, w1) = run_ranks(ffp_job, (str(run), 16, None, True), watched=run, results=tmp_path / "out2")
    assert w1 == []
    _same(r0, one)
    _same(r1, one)


def _cli(rank, folder):
    from nasprune import cli
    torch.set_num_threads(1)
    return cli.main(["search", "--method", "ffp", "--model", "resnet20", "--data", "digits", "--image-size",
                     str(SIZE), "--flops-target", "0.6", "--epochs", "1", "--baseline-epochs", "1",
                     "--finetune-epochs", "1", "--batch-size", "128", "--search-per-class", "4",
                     "--tune-per-class", "16", "--bank-size", "2", "--out", folder, "--no-progress", "--device", "cpu"])


def test_ffp_command_line_on_two_ranks(tmp_path):
    """`nasprune search --method ffp` on two ranks: the search meets the budget, rank 0 alone
    writes the run folder and the memory bank, and both ranks fine-tune from the bank with CKT."""
    import json

    from nasprune.search.ffp import MemoryBank
    run = tmp_path / "run"
    (r0, w0), (r1, w1) = run_ranks(_cli, (str(run),), watched=tmp_path, results=tmp_path / "out")
    assert r0 == r1 == 0 and w1 == []
    assert os.path.realpath(run / "memory_bank.safetensors") in w0
    arch = json.loads((run / "architecture.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert arch["method"] == "ffp" and arch["selected_by"] == "search"
    assert arch["macs"] <= 0.6 * metrics["baseline"]["flops"] and metrics["pruned"]["flops"] == arch["macs"]
    assert MemoryBank.load(run / "memory_bank.safetensors").logits.shape == (1438, 2, 10)
    assert len(metrics["pruned"]["history"]) == 1
