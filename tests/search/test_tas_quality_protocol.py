"""benchmarks/quality_tas.py (issue 4's quality protocol) on the embedded digits, a few epochs a
phase: every arm runs (the architecture control too) and learns, the control matches TAS's MACs
and gets TAS's weight-training epochs."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality_tas  # noqa: E402

from nasprune import flops  # noqa: E402
from nasprune.models import CifarResNet, tas_resnet  # noqa: E402
from nasprune.search import resnet_spec  # noqa: E402


def test_uniform_control_is_the_closest_to_the_target_macs():
    model = CifarResNet(20).eval()
    base = flops.count(model, torch.zeros(1, 3, 32, 32))
    net, ratio, macs = quality_tas.uniform_at(model, 0.5 * base, 32)
    assert macs == flops.count(net, torch.zeros(1, 3, 32, 32))
    assert abs(macs / base - 0.5) < 0.02 and 0.6 < ratio < 0.8     # MACs ~ r^2 inside blocks


def test_protocol_runs_every_arm_and_records_the_budget():
    row = quality_tas.main(["--data", "digits", "--baseline-epochs", "3", "--search-epochs", "1",
                            "--finetune-epochs", "1", "--batch-size", "64", "--device", "cpu", "--arch-control",
                            "--no-record"])
    assert row["uniform"]["epochs"] == 2 and row["protocol"]["search_epochs"] == 1
    # the baseline learned (10 classes: chance is 0.1), and every arm trained from it by KD kept
    # well above chance: a broken teacher, KD loss or export init would not
    assert row["baseline"]["acc"] > 0.6
    assert row["uniform"]["acc"] > 0.4 and row["tas_arch_as_control"]["acc"] > 0.4 and row["tas"]["acc"] > 0.2
    # the recorded architecture is the one measured: rebuilt from its widths and blocks it has the
    # recorded MACs, fewer than the baseline's
    arch = {**resnet_spec(CifarResNet(20)).to_dict(), "widths": row["tas"]["widths"], "blocks": row["tas"]["blocks"]}
    assert flops.count(tas_resnet(**arch), torch.zeros(1, 3, 16, 16)) == row["tas"]["macs"] < row["baseline"]["macs"]
    # the controls are at TAS's MACs: the uniform one within half a step of one keep ratio (its
    # MACs move in steps of up to 5 % of ResNet-20's, every group gaining a channel at once: TAS's
    # 5.72 M here lies between uniform steps at 5.65 M and 6.09 M), the architecture control exactly
    assert abs(row["uniform"]["macs"] - row["tas"]["macs"]) / row["tas"]["macs"] < 0.025
    assert row["tas_arch_as_control"]["epochs"] == row["uniform"]["epochs"]
    assert row["tas_arch_as_control"]["macs"] == row["tas"]["macs"]
    assert row["tas_minus_uniform"] == pytest.approx(row["tas"]["acc"] - row["uniform"]["acc"])
    assert row["meets_target"] == (row["tas"]["acc"] >= row["baseline"]["acc"] - 0.01
                                   and row["tas"]["acc"] >= row["uniform"]["acc"] + 0.01)
