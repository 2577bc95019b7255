"""nasprune.models.TASResNet, the pruned ResNet of a TAS architecture: saved with nasprune.save it
loads with nasprune.load(path) alone (no architecture.json), before and after slimming."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import nasprune
import nasprune.graph as G
import nasprune.slim as S
from nasprune.io import read_architecture
from nasprune.models import CifarResNet, ResNetSpec, TASResNet, tas_resnet
from nasprune.search import TAS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slim"))
from zoo import random_keep, randomize  # noqa: E402

CIFAR14 = {**ResNetSpec.cifar(2).to_dict(), "widths": [8, 6, 16, 9, 12, 5, 4, 19, 12, 25, 64, 32, 64],
           "blocks": [2, 1, 2]}
BOTTLENECK = {**ResNetSpec(layers=(2, 1), block="bottleneck", stage_widths=(32, 64), mid_widths=(8, 16),
                           stem_width=16, stem_kernel=7, stem_stride=2, stem_pool=True, shortcut="conv",
                           num_classes=5).to_dict(),
              "widths": [12, 6, 8, 20, 8, 3, 32, 16, 9, 40], "blocks": [2, 1]}


@pytest.mark.parametrize("arch", [CIFAR14, BOTTLENECK], ids=["cifar", "bottleneck"])
def test_saved_pruned_resnet_loads_with_nasprune_load_alone(arch, tmp_path):
    net = randomize(tas_resnet(**arch)).eval()
    path = tmp_path / "model.safetensors"
    nasprune.save(net, path)
    recorded = read_architecture(path)
    assert recorded["constructor"] == "nasprune.models.tas_resnet"
    assert recorded["kwargs"]["widths"] == arch["widths"] and recorded["kwargs"]["blocks"] == arch["blocks"]
    loaded = nasprune.load(path).eval()
    assert type(loaded) is TASResNet
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    # the dropped blocks stay dropped, the unequal widths keep their projections
    assert [len(s) for s in loaded.stages] == arch["blocks"]
    assert loaded.state_dict().keys() == net.state_dict().keys()


def test_tas_export_and_a_slimmed_export_load_alone(tmp_path):
    searcher = TAS(CifarResNet(8), 0.5, input_size=16, device="cpu", seed=1)
    pruned = randomize(searcher.export()).eval()
    nasprune.save(pruned, tmp_path / "p.safetensors")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(nasprune.load(tmp_path / "p.safetensors").eval()(x), pruned(x))
    # slimmed further with nasprune.slim: the file rebuilds the TAS net, then re-applies the step
    graph = G.trace(pruned, x)
    slimmed = S.apply(pruned, graph, random_keep(graph, 3)).eval()
    nasprune.save(slimmed, tmp_path / "s.safetensors")
    with torch.no_grad():
        assert torch.equal(nasprune.load(tmp_path / "s.safetensors").eval()(x), slimmed(x))
    assert sum(p.numel() for p in slimmed.parameters()) < sum(p.numel() for p in pruned.parameters())


def test_row_names_and_kept_widths_follow_the_models_conv_names():
    spec = ResNetSpec.cifar(2)
    names = spec.row_names()
    model_convs = {n for n, m in CifarResNet(14).named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(names) == len(spec.row_widths()) and set(names) <= model_convs
    kept = spec.kept_widths(CIFAR14["widths"], CIFAR14["blocks"])
    assert kept[7:9] == [0, 0] and kept[:7] == CIFAR14["widths"][:7] and kept[9:] == CIFAR14["widths"][9:]
