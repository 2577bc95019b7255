"""nasprune.save / load: safetensors + JSON, identical outputs, clear errors that change nothing."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent / "slim"))
import nasprune.graph as G  # noqa: E402
import nasprune.io as nio  # noqa: E402
import nasprune.slim as S  # noqa: E402
from nasprune.models import cifar_resnet  # noqa: E402
from zoo import random_keep, randomize  # noqa: E402

X = torch.randn(2, 3, 32, 32)


@pytest.fixture()
def saved(tmp_path):
    model = randomize(cifar_resnet.cifar_resnet20(shortcut="A")).eval()
    graph = G.trace(model, X)
    slim = S.apply(model, graph, random_keep(graph, 2)).eval()
    path = tmp_path / "r20.safetensors"
    nio.save(slim, path, constructor="nasprune.models.cifar_resnet20", kwargs={"shortcut": "A"})
    return slim, path


def test_roundtrip_gives_identical_outputs(saved):
    slim, path = saved
    base = cifar_resnet.cifar_resnet20(shortcut="A")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = nio.load(path, base).eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), slim(X))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # base untouched
    with torch.no_grad():
        assert torch.equal(nio.load(path).eval()(X), slim(X))  # rebuilt from the recorded constructor


def test_file_is_safetensors_with_json_architecture_and_no_pickle(saved):
    from safetensors import safe_open
    _, path = saved
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    arch = json.loads(header["__metadata__"]["nasprune.architecture"])
    assert arch["base_class"] == "nasprune.models.cifar_resnet.CifarResNet"
    assert arch["steps"][0]["inputs"] == [[[2, 3, 32, 32], "float32"]]
    assert b"\x80\x02" not in raw[:8 + header_len] and not raw.startswith(b"PK")  # no pickle, no zip
    with safe_open(path, framework="pt") as fh:
        assert "linear.weight" in fh.keys()


def test_slimming_twice_is_recorded_and_rebuilt(tmp_path):
    model = randomize(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 64, 64)
    once = S.apply(model, G.trace(model, x), S.uniform_keep(G.trace(model, x), 0.75))
    g2 = G.trace(once, x)
    twice = S.apply(once, g2, S.uniform_keep(g2, 0.5)).eval()
    path = tmp_path / "r18.safetensors"
    nio.save(twice, path)
    loaded = nio.load(path, torchvision.models.resnet18()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), twice(x))
    assert len(nio.read_architecture(path)["steps"]) == 2


def test_truncated_file_fails_clearly(saved, tmp_path):
    _, path = saved
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(nio.FormatError, match="truncated or corrupt"):
        nio.load(cut, cifar_resnet.cifar_resnet20())


def test_tampered_weights_fail_the_checksum(saved, tmp_path):
    _, path = saved
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(nio.FormatError, match="checksum mismatch"):
        nio.load(bad, cifar_resnet.cifar_resnet20())


def test_mismatched_base_models_fail_clearly(saved):
    _, path = saved
    with pytest.raises(nio.FormatError, match="base_model is a torchvision.models.resnet.ResNet"):
        nio.load(path, torchvision.models.resnet18())
    with pytest.raises(nio.FormatError, match="channel groups differ"):
        nio.load(path, cifar_resnet.cifar_resnet32())
    with pytest.raises(nio.FormatError, match="channel groups differ"):
        nio.load(path, cifar_resnet.cifar_resnet20(shortcut="B"))


def test_not_a_nasprune_file(tmp_path):
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(nio.FormatError, match="without nasprune architecture"):
        nio.load(plain, cifar_resnet.cifar_resnet20())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file at all")
    with pytest.raises(nio.FormatError, match="truncated or corrupt"):
        nio.read_architecture(junk)
    with pytest.raises(FileNotFoundError):
        nio.load(tmp_path / "missing.safetensors")


def test_constructor_outside_the_allowed_packages_is_refused(saved, tmp_path):
    slim, _ = saved
    with pytest.raises(ValueError, match="constructor must be under"):
        nio.save(slim, tmp_path / "x.safetensors", constructor="os.system")


def test_failed_save_leaves_the_existing_file(saved):
    slim, path = saved
    before = path.read_bytes()
    with pytest.raises(ValueError):
        nio.save(slim, path, constructor="nasprune.models.cifar_resnet20", kwargs={"bad": object()})
    assert path.read_bytes() == before
    assert not [f for f in os.listdir(path.parent) if f.endswith(".tmp")]


def test_unslimmed_model_roundtrip(tmp_path):
    model = randomize(cifar_resnet.cifar_resnet20(shortcut="B")).eval()
    path = tmp_path / "plain.safetensors"
    nio.save(model, path)
    loaded = nio.load(path, cifar_resnet.cifar_resnet20(shortcut="B")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_atomic_write_names_its_temp_file_as_documented_and_cleans_up(tmp_path):
    """The temporary file is `.nasprune-*.tmp` beside the target (the pattern tests look for);
    a failed write leaves the old file and no temporary one; the folder is created."""
    import glob
    target = tmp_path / "sub" / "f.json"
    seen = []

    def write(tmp):
        seen.append(glob.glob(str(tmp_path / "sub" / ".nasprune-*.tmp")))
        Path(tmp).write_text("new")
    nio.atomic_write(target, write)
    assert seen == [[str(seen[0][0])]] and Path(seen[0][0]).parent == target.parent
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) == oct(0o666 & ~nio._umask())

    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        nio.atomic_write(target, fail)
    assert target.read_text() == "new" and os.listdir(target.parent) == ["f.json"]


def test_data_cache_and_run_folder_write_through_atomic_write(tmp_path, monkeypatch):
    import numpy as np
    from nasprune.cli import Run
    from nasprune.data import cifar
    calls = []
    real = nio.atomic_write
    monkeypatch.setattr(nio, "atomic_write", lambda path, write: (calls.append(Path(path).name), real(path, write)))
    x = np.zeros((2, 32, 32, 3), np.uint8)
    y = np.zeros(2, np.int64)
    cifar._write_cache(tmp_path / "c.npz", {"train": (x, y), "test": (x, y)}, ("a", "b"))
    Run(tmp_path / "run").write_json("config.json", {"a": 1})
    assert calls == ["c.npz", "config.json"]
    assert cifar._read_cache(tmp_path / "c.npz")[1] == ("a", "b")
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"a": 1}
