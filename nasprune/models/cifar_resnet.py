"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, 6n+2 layers.

Two shortcut options at the two downsampling blocks:
- "A": parameter-free (subsample, then zero-pad channels), as the pretrained weights in
  ``shared/data/pretrained`` (akamaster/pytorch_resnet_cifar10) use; their state dict loads
  here once the ``module.`` prefix is stripped (``load_pretrained`` does it).
- "B": 1x1 conv + BatchNorm projection, as TAS's CIFAR ResNets.
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nasprune.handlers import LayerHandler, register

DEPTHS = (20, 32, 44, 56, 110)


class ChannelZeroPad(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel, add ``before`` zero channels in front
    of the input's and ``after`` behind. A module (not a lambda) so that pruning can change
    the pad widths: the pad channels are real output channels of the residual stream."""

    def __init__(self, in_channels: int, before: int, after: int, stride: int = 2):
        super().__init__()
        self.in_channels, self.before, self.after, self.stride = in_channels, before, after, stride

    def forward(self, x):
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, before={self.before}, after={self.after}, stride={self.stride}"


@register
class ChannelZeroPadHandler(LayerHandler):
    """The handler of :class:`ChannelZeroPad`: subsample, then zero channels before and after the input's. The pad
    channels are created here, so they can be pruned; the input's channels keep their order."""
    types = (ChannelZeroPad,)
    roles = {"in": (), "out": ()}

    def trace(self, ctx, call):
        m = call.module
        x, info = call.fields[0], call.infos[0]
        in_atoms = ctx.channels(x, info.shape, 1, call.name)
        pads = ctx.producer(call.name, "pad", m.before + m.after)
        out_atoms = np.concatenate([pads[:m.before], in_atoms, pads[m.before:]])
        ctx.record(call.name, self, "in", in_atoms)
        ctx.record(call.name, self, "out", out_atoms)
        return ctx.along(out_atoms, 1, len(call.out.shape))

    def slim(self, m, keep):
        kout, kin = keep.get("out"), keep.get("in")
        if kout is not None:
            before = int((kout < m.before).sum())
            after = int((kout >= m.before + m.in_channels).sum())
            m.before, m.after = before, after
        if kin is not None:
            m.in_channels = len(kin)

    def mask(self, m, removed):
        return None

    def primary(self, m, role):
        return ("shortcut", 0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Sequential()
        elif shortcut == "A":
            extra = planes - in_planes
            self.shortcut = ChannelZeroPad(in_planes, extra // 2, extra - extra // 2, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "A"):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-pad) or 'B' (projection), got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth, self.shortcut_type = depth, shortcut
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(planes_in, planes, stride, shortcut))
                planes_in = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _builder(depth):
    def build(num_classes: int = 10, shortcut: str = "A") -> CifarResNet:
        return CifarResNet(depth, num_classes, shortcut)
    build.__name__ = f"cifar_resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth}; shortcut 'A' (zero-pad) or 'B' (1x1 projection)."
    return build


cifar_resnet20, cifar_resnet32, cifar_resnet44, cifar_resnet56, cifar_resnet110 = (
    _builder(d) for d in DEPTHS)


def load_pretrained(name: str, path: str | os.PathLike, num_classes: int = 10) -> CifarResNet:
    """Option-A CIFAR ResNet ``name`` ("resnet20" ... "resnet110") with weights from ``path``.

    Accepts the akamaster checkpoints (a dict whose ``state_dict`` has ``module.``-prefixed
    keys) or a plain state dict. Loads with ``weights_only=True``. When the file name carries
    a hash prefix (``...-12fca82f.th``) the file's sha256 must start with it.
    """
    match = re.fullmatch(r"(?:cifar_?)?resnet(\d+)", name)
    if not match or int(match.group(1)) not in DEPTHS:
        raise ValueError(f"unknown CIFAR ResNet {name!r}; expected one of "
                         f"{', '.join(f'resnet{d}' for d in DEPTHS)}")
    depth = int(match.group(1))
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights for {name} not found at {path!r}")
    tag = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", os.path.basename(path))
    if tag:
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        if not digest.startswith(tag.group(1)):
            raise ValueError(f"{path}: sha256 {digest[:12]}... does not match the {tag.group(1)!r} "
                             f"in its name; the file is corrupt or was modified")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (or a dict with 'state_dict'), "
                         f"got {type(blob).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model = CifarResNet(depth, num_classes, "A")
    expected = model.state_dict()
    for key, value in expected.items():  # checkpoints from torch < 0.4.1 lack these counters
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not hold a {name} (option A) state dict: "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(f"{path}: {k} has shape {got}, {name} needs {want} "
                         f"({len(wrong)} tensors differ; is num_classes={num_classes} right?)")
    model.load_state_dict(state)
    return model
