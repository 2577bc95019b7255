"""benchmarks/quality.py (issue 13's protocol) on the embedded digits, one epoch a phase: the
controls land at the target MACs and get every weight-training epoch a method has; a method's row
compares with them by the standard error of the difference; the controls of a protocol version
are computed once and reused."""
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

import nasprune

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality  # noqa: E402

SMALL = ["--data", "digits", "--device", "cpu", "--set", "baseline_epochs", "1", "--set", "search_epochs", "1",
         "--set", "finetune_epochs", "1", "--set", "batch_size", "64"]


def _rows(folder, bench="quality"):
    rows = [json.loads(line) for line in (folder / "quality.jsonl").read_text().splitlines()]
    return [r for r in rows if r["bench"] == bench]


def test_a_methods_row_against_the_controls(tmp_path):
    common = SMALL + ["--results", str(tmp_path), "--cache", str(tmp_path / "cache")]
    quality.main(["--method", "dais", "--seeds", "0", "1"] + common)
    rows = {r["arm"]: r for r in _rows(tmp_path)}
    assert set(rows) == {"baseline", "uniform", "l1", "dais"}
    version = rows["dais"]["protocol_version"]
    assert all(r["protocol_version"] == version for r in rows.values())
    for arm in ("uniform", "l1"):  # same MACs within 1 %, every epoch the method trained its weights
        r = rows[arm]
        assert abs(r["macs_fraction"] - 0.5) < 0.01, f"{arm}: {r['macs_fraction']:.4f} of the MACs"
        assert r["epochs"] == 2 and r["seeds"] == [0, 1] and len(r["acc"]) == 2
        assert r["acc_mean"] == pytest.approx(statistics.fmean(r["acc"]))
        assert r["acc_std"] == pytest.approx(statistics.stdev(r["acc"]))
        assert all(0.5 < a <= 1 for a in r["acc"]), f"{arm} did not learn: {r['acc']}"
    dais = rows["dais"]
    assert 0.45 <= dais["macs_fraction"] <= 0.5 and dais["epochs"] == 2
    assert dais["minus_baseline"] == pytest.approx(dais["acc_mean"] - rows["baseline"]["acc_mean"])
    for arm in ("uniform", "l1"):
        c, r = dais["compare"][arm], rows[arm]
        se = math.sqrt(dais["acc_std"] ** 2 / 2 + r["acc_std"] ** 2 / 2)
        assert c["diff"] == pytest.approx(dais["acc_mean"] - r["acc_mean"]) and c["se"] == pytest.approx(se)
        assert c["beats"] == (c["diff"] > 2 * se)

    runs = _rows(tmp_path, "quality_run")    # every run recorded as it finished
    assert sorted((r["arm"], r["seed"]) for r in runs) == [(a, s) for a in ("dais", "l1", "uniform") for s in (0, 1)]
    assert {r["run"]["acc"] for r in runs if r["arm"] == "dais"} == set(dais["acc"])

    # a second row of the same protocol reuses the recorded controls and runs (an interrupted
    # protocol resumes from what it recorded) and the cached baseline
    quality.main(["--method", "dais", "--seeds", "0"] + common)
    again = _rows(tmp_path)
    assert [r["arm"] for r in again] == ["uniform", "l1", "baseline", "dais", "dais"]
    assert len(_rows(tmp_path, "quality_run")) == len(runs)
    assert again[-1]["protocol_version"] == version and again[-1]["acc"] == [rows["dais"]["runs"]["0"]["acc"]]
    assert again[-1]["compare"]["uniform"]["diff"] == pytest.approx(again[-1]["acc_mean"] - rows["uniform"]["acc_mean"])
    lines = quality.table(tmp_path).splitlines()
    assert len(lines) == 2 + 4 and sum(" dais " in line for line in lines) == 1   # the latest row per arm

    # a method with its own fine-tuning (FFP's CKT from the memory bank its export writes into
    # the run's folder) goes through the method's hook at the protocol's budget
    quality.main(["--method", "ffp", "--seeds", "0"] + common)
    ffp = _rows(tmp_path)[-1]
    assert ffp["arm"] == "ffp" and ffp["macs_fraction"] <= 0.5 and 0.5 < ffp["acc_mean"] <= 1
    banks = list((tmp_path / "cache" / version).glob("ffp-*-seed0/memory_bank.safetensors"))
    assert len(banks) == 1

    # every run names its baseline and what it exported; a different baseline (a fresh folder, a
    # bare GPU machine: training is not bit-reproducible) reuses none of the runs of the first
    runs = _rows(tmp_path, "quality_run")
    first = runs[0]["baseline"]
    assert all(r["baseline"] == first for r in runs) and all(len(r["run"]["kept"]) > 0 for r in runs
                                                              if r["arm"] != "uniform" and r["arm"] != "l1")
    cached = tmp_path / "cache" / version / "baseline.safetensors"
    base = nasprune.load(cached)
    with torch.no_grad():
        next(base.parameters()).add_(1e-3)
    arch = nasprune.io.read_architecture(cached)
    nasprune.save(base, cached, constructor=arch["constructor"], kwargs=arch["kwargs"])
    quality.main(["--method", "dais", "--seeds", "0"] + common)
    rerun = _rows(tmp_path, "quality_run")[len(runs):]
    assert sorted(r["arm"] for r in rerun) == ["dais", "l1", "uniform"]
    assert len({r["baseline"] for r in rerun}) == 1 and rerun[0]["baseline"] != first
    rows = _rows(tmp_path)
    assert [r["arm"] for r in rows[-4:]] == ["uniform", "l1", "baseline", "dais"]
    assert {r["baseline"] for r in rows[-4:]} == {rerun[0]["baseline"]}


def test_compare_is_the_standard_error_of_the_difference():
    a, b = {"mean": 0.80, "std": 0.003, "n": 3}, {"mean": 0.79, "std": 0.004, "n": 3}
    c = quality.compare(a, b)
    assert c["diff"] == pytest.approx(0.01) and c["se"] == pytest.approx(math.sqrt((0.003 ** 2 + 0.004 ** 2) / 3))
    assert c["beats"]  # 0.01 > 2 * 0.00289
    assert not quality.compare({**a, "mean": 0.795}, b)["beats"]
    one = quality.compare({"mean": 0.85, "std": 0.0, "n": 1}, b)   # one seed: no standard deviation
    assert one["diff"] == pytest.approx(0.06) and one["se"] is None and one["beats"] is None


def test_protocol_versions_and_bad_settings():
    cpu = quality.BUDGETS["cpu"]
    assert quality.version(cpu) == quality.version({**cpu, "seeds": [0, 1, 2, 3]})   # more seeds extend a row
    assert quality.version(cpu) != quality.version({**cpu, "finetune_lr": 0.05})
    with pytest.raises(SystemExit):
        quality.main(["--controls", "--set", "no_such_setting", "1"])


def test_plot_shows_the_latest_row_of_every_arm_and_which_beat_both(tmp_path):
    def row(arm, accs, version="v1", device="x86_64 CPU, 2 threads", compare=None):
        mean = statistics.fmean(accs)
        return {"bench": "quality", "protocol_version": version, "device": device, "arm": arm, "acc": accs,
                "acc_mean": mean, "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "acc_n": len(accs),
                "macs_fraction": 0.5, "epochs": 2, "minutes": [1.0], "protocol": {"model": "resnet20"},
                "compare": compare or {}}
    beats = {"uniform": {"beats": True}, "l1": {"beats": True}}
    loses = {"uniform": {"beats": False}, "l1": {"beats": False}}
    rows = [row("baseline", [0.87]), row("uniform", [0.82, 0.83, 0.83]), row("l1", [0.84, 0.84, 0.83]),
            row("dais", [0.80, 0.81, 0.80], compare=loses),
            row("dais", [0.85, 0.84, 0.85], compare=beats),       # the latest row of an arm is the one shown
            row("pas --gate-lr 0.05", [0.81], compare={"uniform": {"beats": None}, "l1": {"beats": None}}),
            row("uniform", [0.70, 0.71], version="v2"),             # controls only: no panel
            row("uniform", [0.82, 0.83], device="NVIDIA H200"), row("tas", [0.79, 0.80], device="NVIDIA H200",
                                                                      compare=loses)]
    (tmp_path / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "q.png"
    shown = quality.plot(tmp_path, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["panel"] for p in shown] == [("v1", "x86_64 CPU"), ("v1", "NVIDIA H200")]
    cpu = shown[0]["arms"]   # methods by mean accuracy, then the controls
    assert [a for a, *_ in cpu] == ["pas --gate-lr 0.05", "dais", "uniform", "l1"]
    assert cpu[1] == ("dais", pytest.approx(0.8467, abs=1e-4), 3, True)
    assert cpu[0][2:] == (1, False)
    assert [a for a, *_ in shown[1]["arms"]] == ["tas", "uniform"]
