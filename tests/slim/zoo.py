"""Models the graph/slim tests sweep, with fast random initialisation and shared checks."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

# input (H, W) per model where 64x64 does not work, and constructor keyword arguments
INPUT_SIZE = {"inception_v3": 299, "maxvit_t": 224}  # the auxiliary head needs 299
KWARGS = {"vit_b_16": {"image_size": 64}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 64},
          "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 56}}
SEGMENTATION = ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
CIFAR = [f"cifar_resnet{d}{s}" for d in (20, 32, 44, 56, 110) for s in "AB"]
CONTRACT_MAX_PARAMS = 30_000_000  # the masked copy doubles memory: heavier models skip it


def classification_names() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def all_names() -> list[str]:
    return classification_names() + SEGMENTATION + CIFAR


@contextlib.contextmanager
def _no_init():
    """Skip the (slow) initialisers while constructing; weights are filled afterwards."""
    names = ["kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "trunc_normal_",
             "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_", "orthogonal_"]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fan-in scaled random weights, non-trivial norm statistics and biases (so that a slicing
    mistake in any of them shows in the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.normal_(0, 1 / math.sqrt(max(1, fan_in)), generator=g)
            else:
                p.normal_(0, 0.1, generator=g)
                if name.endswith("weight"):
                    p.add_(1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Model ``name`` with random weights and an example input (batch 2)."""
    import torchvision
    from nasprune.models import cifar_resnet
    with _no_init():
        if name.startswith("cifar_resnet"):
            model = cifar_resnet.CifarResNet(int(name[12:-1]), shortcut=name[-1])
            size = 32
        elif name in SEGMENTATION:
            model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5)
            size = 64
        else:
            model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {}))
            size = KWARGS.get(name, {}).get("image_size", INPUT_SIZE.get(name, 64))
    randomize(model)
    g = torch.Generator().manual_seed(1)
    return model.eval(), torch.randn(2, 3, size, size, generator=g)


def random_keep(graph, seed: int = 0) -> dict:
    """A random non-empty keep set for every prunable group of two or more channels."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for group in graph.prunable_groups:
        if group.size < 2:
            continue
        n = int(torch.randint(1, group.size, (1,), generator=g))
        keep[group.index] = torch.randperm(group.size, generator=g)[:n].sort().values
    return keep


def expected_widths(graph, keep) -> dict[tuple[str, str], int]:
    """Width of every layer dimension after ``keep``, from the public group members only."""
    widths = {}
    for group in graph.groups:
        kept = keep.get(group.index)
        for m in group.members:
            if m.role == "param":
                continue
            key = (m.module, m.role)
            pos = m.index_map.positions
            total = widths.get(key, (0, 0))
            n_pos = int((pos >= 0).sum())
            if kept is None:
                gone = 0
            else:
                removed = ~torch.isin(m.index_map.channels, kept)
                gone = int((pos[removed] >= 0).sum())
            widths[key] = (total[0] + n_pos, total[1] + gone)
    return widths


def leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in leaves(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in leaves(o)]
    return []


def max_rel_diff(a, b) -> float:
    worst = 0.0
    for x, y in zip(leaves(a), leaves(b)):
        scale = max(1.0, float(x.abs().max()))
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst
