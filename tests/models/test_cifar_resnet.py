"""CIFAR ResNets: structure, the shared pretrained weights, and the option-A channel groups."""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import nasprune.graph as G
import nasprune.slim as S
from nasprune.models import cifar_resnet

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PRETRAINED = DATA / "pretrained"
FILES = {20: "cifar10-resnet20-12fca82f.th", 32: "cifar10-resnet32-d509ac18.th",
         44: "cifar10-resnet44-014dd654.th", 56: "cifar10-resnet56-4bfd9763.th"}
PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018}  # shared/data/README.md
needs_data = pytest.mark.skipif(not PRETRAINED.is_dir(), reason=f"shared data not found at {PRETRAINED}")


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_parameter_counts_match_the_pretrained_models(depth):
    assert sum(p.numel() for p in cifar_resnet.CifarResNet(depth).parameters()) == PARAMS[depth]


def test_option_b_adds_two_projection_shortcuts():
    a, b = cifar_resnet.cifar_resnet20(shortcut="A"), cifar_resnet.cifar_resnet20(shortcut="B")
    extra = sum(p.numel() for p in b.parameters()) - sum(p.numel() for p in a.parameters())
    assert extra == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert cifar_resnet.cifar_resnet110()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet.CifarResNet(21)
    with pytest.raises(ValueError, match="shortcut"):
        cifar_resnet.CifarResNet(20, shortcut="C")


def test_option_a_stream_is_one_nested_group():
    graph = G.trace(cifar_resnet.cifar_resnet20(shortcut="A"), torch.zeros(1, 3, 32, 32))
    stream = graph.group_of("layer3.0.conv2")[0]
    assert stream.size == 64 and stream is graph.group_of("conv1")[0]
    held = {m.module: m.index_map.channels.tolist() for m in stream.members if m.role == "out"}
    assert held["conv1"] == list(range(24, 40))          # stage 1 sits in the middle of stage 3
    assert held["layer2.0.conv2"] == list(range(16, 48))
    assert held["layer3.0.conv2"] == list(range(64))
    pads = next(m for m in stream.members if m.module == "layer2.0.shortcut" and m.role == "out")
    assert pads.index_map.positions.view(-1).tolist() == list(range(32))


def _test_images(n: int):
    """The first ``n`` CIFAR-10 test images (uint8 N,32,32,3) and labels from the JPEG tarball."""
    from PIL import Image
    classes = "airplane automobile bird cat deer dog frog horse ship truck".split()
    images, labels = [], []
    with tarfile.open(DATA / "cifar10-jpeg.tar.gz", "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and "test" in parts and len(images) < n:
                cls = parts[parts.index("test") + 1]
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                labels.append(classes.index(cls))
            if len(images) >= n:
                break
    return np.stack(images), torch.tensor(labels)


@needs_data
@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_pretrained_weights_load(depth):
    model = cifar_resnet.load_pretrained(f"resnet{depth}", PRETRAINED / FILES[depth])
    assert model.shortcut_type == "A" and model.depth == depth


@needs_data
def test_pretrained_resnet20_classifies_and_slims_consistently():
    images, labels = _test_images(400)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model = cifar_resnet.load_pretrained("resnet20", PRETRAINED / FILES[20]).eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == labels).float().mean())
    assert accuracy > 0.7  # 81% on the whole JPEG test split (shared/data/README.md)
    graph = G.trace(model, x[:2])
    keep = S.uniform_keep(graph, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(S.apply(model, graph, keep)(x), S.mask(model, graph, keep)(x),
                                   rtol=1e-5, atol=1e-5)


@needs_data
def test_pretrained_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown CIFAR ResNet"):
        cifar_resnet.load_pretrained("resnet18", PRETRAINED / FILES[20])
    with pytest.raises(FileNotFoundError, match="not found"):
        cifar_resnet.load_pretrained("resnet20", tmp_path / "nope.th")
    with pytest.raises(ValueError, match="missing"):
        cifar_resnet.load_pretrained("resnet20", PRETRAINED / FILES[56])
    broken = tmp_path / FILES[20]
    shutil.copy(PRETRAINED / FILES[20], broken)
    broken.write_bytes(broken.read_bytes()[:-100])
    with pytest.raises(ValueError, match="does not match"):
        cifar_resnet.load_pretrained("resnet20", broken)
    renamed = tmp_path / "r20.th"
    renamed.write_bytes(broken.read_bytes())
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        cifar_resnet.load_pretrained("resnet20", renamed)
