"""benchmarks/quality_tas.py (issue 4's quality protocol) on the embedded digits, one epoch a
phase: every arm runs (the architecture control too), the control matches TAS's MACs and gets
TAS's weight-training epochs."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality_tas  # noqa: E402

from nasprune import flops  # noqa: E402
from nasprune.models import CifarResNet  # noqa: E402


def test_uniform_control_is_the_closest_to_the_target_macs():
    model = CifarResNet(20).eval()
    base = flops.count(model, torch.zeros(1, 3, 32, 32))
    net, ratio, macs = quality_tas.uniform_at(model, 0.5 * base, 32)
    assert macs == flops.count(net, torch.zeros(1, 3, 32, 32))
    assert abs(macs / base - 0.5) < 0.02 and 0.6 < ratio < 0.8     # MACs ~ r^2 inside blocks


def test_protocol_runs_every_arm_and_records_the_budget():
    row = quality_tas.main(["--data", "digits", "--baseline-epochs", "1", "--search-epochs", "1",
                            "--finetune-epochs", "1", "--batch-size", "128", "--device", "cpu", "--arch-control",
                            "--no-record"])
    assert row["uniform"]["epochs"] == 2 and row["protocol"]["search_epochs"] == 1
    assert row["tas"]["macs"] < row["baseline"]["macs"]
    assert abs(row["uniform"]["macs"] - row["tas"]["macs"]) / row["tas"]["macs"] < 0.1
    assert row["tas_arch_as_control"]["epochs"] == row["uniform"]["epochs"]
    assert row["tas_arch_as_control"]["macs"] == row["tas"]["macs"]
    for arm in ("baseline", "tas", "uniform", "tas_arch_as_control"):
        assert 0.0 <= row[arm]["acc"] <= 1.0
    assert row["tas_minus_uniform"] == pytest.approx(row["tas"]["acc"] - row["uniform"]["acc"])
    assert isinstance(row["meets_target"], bool)
