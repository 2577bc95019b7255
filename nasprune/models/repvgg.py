"""RepVGG (Ding, Zhang, Ma, Han, Ding, Sun: "RepVGG: Making VGG-style ConvNets Great Again",
CVPR 2021): a plain stack of 3x3 conv + ReLU at inference, trained with extra branches.

A training-time :class:`RepVGGBlock` sums a 3x3 conv + BN, a 1x1 conv + BN and, where the block
keeps its width and resolution, a BN of its input, then applies ReLU. In eval mode these three
branches are one affine map of the input, so :func:`reparameterize` folds each block into one 3x3
conv with bias (the paper's section 3.3; PaS discretises its searched RepVGG the same way,
docs/methods.md section 5.4).

Architecture (paper section 3.4 and Table 2): five stages of [1, 2, 4, 14, 1] blocks (RepVGG-A)
or [1, 4, 6, 16, 1] (RepVGG-B) with widths min(64, 64a), 64a, 128a, 256a and 512b; (a, b) is
(0.75, 2.5) for A0 and (1, 2.5) for A1 and B0. The first block of every stage has stride 2; the
one-block first stage is the stem. The CIFAR variant (``cifar=True``, not in the paper) runs the
stem and the second stage at stride 1, so a 32x32 input reaches the head at 4x4 (ImageNet's
224x224 reaches it at 7x7).

``widths`` (one output width per block) describes a pruned network; a block has its identity
branch only where its in and out widths are equal and its stride is 1. The layers are plain
Conv2d, BatchNorm2d, ReLU and Sequential, so ``nasprune.graph.trace`` groups the outputs of a
stage's identity blocks with their input like a residual stream, ``nasprune.slim.apply`` slices
every branch (the identity BN included) and ``nasprune.flops.count`` counts them. A model
(training or deploy form, slimmed or not) saved with ``nasprune.save`` loads with
``nasprune.load(path)`` alone.
"""
from __future__ import annotations

import copy
import operator
from collections import OrderedDict

import torch
from torch import nn

# name: (blocks per stage, width multipliers (a, b)), paper Table 2
CONFIGS = {
    "A0": ((1, 2, 4, 14, 1), (0.75, 2.5)),
    "A1": ((1, 2, 4, 14, 1), (1.0, 2.5)),
    "B0": ((1, 4, 6, 16, 1), (1.0, 2.5)),
}
STRIDES = {"imagenet": (2, 2, 2, 2, 2), "cifar": (1, 1, 2, 2, 2)}  # first block of each stage


def _config(config) -> tuple[str, tuple, tuple]:
    key = config.upper() if isinstance(config, str) else config
    if key not in CONFIGS:
        raise ValueError(f"unknown RepVGG configuration {config!r}; expected one of {', '.join(CONFIGS)}")
    layers, multipliers = CONFIGS[key]
    return key, layers, multipliers


def default_widths(config: str = "A0") -> list[int]:
    """Output width of every block of RepVGG-``config``, in order (paper Table 2)."""
    _, layers, (a, b) = _config(config)
    stage = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    return [w for n, w in zip(layers, stage) for _ in range(n)]


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        bn=nn.BatchNorm2d(out_channels)))


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a BN in eval mode, in float64."""
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    return scale, bn.bias.double() - bn.running_mean.double() * scale


class RepVGGBlock(nn.Module):
    """One RepVGG layer. Training form: ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)), the last
    branch (``identity``) only where ``in_channels == out_channels`` and ``stride == 1``.
    Deploy form (``deploy=True``, what :func:`reparameterize` builds): ReLU(conv3x3(x) + bias)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, deploy: bool = False):
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        else:
            self.conv3x3 = _conv_bn(in_channels, out_channels, 3, stride)
            self.conv1x1 = _conv_bn(in_channels, out_channels, 1, stride)
            same = stride == 1 and in_channels == out_channels
            self.identity = nn.BatchNorm2d(out_channels) if same else None
        self.relu = nn.ReLU()

    def forward(self, x):
        if self.deploy:
            return self.relu(self.conv(x))
        out = self.conv3x3(x) + self.conv1x1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.relu(out)

    # widths and stride from the 3x3 conv as it is now (nasprune.slim.apply changes the widths)
    @property
    def in_channels(self) -> int:
        return self._conv3x3.in_channels

    @property
    def out_channels(self) -> int:
        return self._conv3x3.out_channels

    @property
    def stride(self) -> int:
        return self._conv3x3.stride[0]

    @property
    def _conv3x3(self) -> nn.Conv2d:
        return self.conv if self.deploy else self.conv3x3.conv

    @torch.no_grad()
    def fused(self, select=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(3x3 kernel, bias), in float64, of the one conv equal to this block's branches in
        eval mode (BN with its running statistics). Shapes are read from the layers, so a block
        slimmed by ``nasprune.slim.apply`` fuses to its slimmed widths. ``select``: the
        ChannelSelect an untied RepVGG (``nasprune.graph.untie``) feeds the identity branch
        through; identity channel j then reads input channel ``select.index[j]`` scaled by
        ``select.weight[j]`` (a selection kernel instead of the identity kernel)."""
        if self.deploy:
            return self.conv.weight.double(), self.conv.bias.double()
        scale, bias = _bn_affine(self.conv3x3.bn)
        kernel = self.conv3x3.conv.weight.double() * scale.view(-1, 1, 1, 1)
        scale, shift = _bn_affine(self.conv1x1.bn)  # the 1x1 kernel is the centre of a 3x3 one
        kernel[:, :, 1, 1] += self.conv1x1.conv.weight.double()[:, :, 0, 0] * scale.view(-1, 1)
        bias = bias + shift
        if self.identity is not None:  # the identity is the 3x3 kernel with 1 at the centre of (c, c)
            c = self.identity.num_features
            scale, shift = _bn_affine(self.identity)
            rows = torch.arange(c, device=kernel.device)
            if select is None:
                if kernel.shape[:2] != (c, c):
                    raise ValueError(f"identity branch of {c} channels in a block of {tuple(kernel.shape[:2])} "
                                     f"(out, in) channels; it needs equal widths")
                cols = rows
            else:
                if (select.out_channels, select.in_channels) != tuple(kernel.shape[:2]) or select.out_channels != c:
                    raise ValueError(f"identity selection {select.in_channels} -> {select.out_channels} in a block "
                                     f"of {tuple(kernel.shape[:2])} (out, in) channels")
                cols = select.index.to(kernel.device)
                scale = scale * select.weight.to(kernel.device).double()
            kernel[rows, cols, 1, 1] += scale
            bias = bias + shift
        return kernel, bias


class RepVGG(nn.Module):
    """RepVGG-``config`` ("A0", "A1", "B0"): the blocks in ``stages`` (one nn.Sequential per
    stage), global average pooling, a linear head.

    cifar: stem and second stage at stride 1 (for 32x32 inputs) instead of all five stages at
    stride 2 (ImageNet, 224x224). num_classes: default 10 with ``cifar``, else 1000. widths:
    output width of every block, in order (default the paper's); a block has an identity branch
    where its in and out widths are equal and its stride is 1. deploy: every block a single 3x3
    conv with bias (what :func:`reparameterize` returns).
    """

    def __init__(self, config: str = "A0", num_classes: int | None = None, cifar: bool = False,
                 widths=None, deploy: bool = False):
        super().__init__()
        config, layers, _ = _config(config)
        num_classes = (10 if cifar else 1000) if num_classes is None else num_classes
        widths = default_widths(config) if widths is None else _check_widths(config, layers, widths)
        self.constructor_kwargs = {"config": config, "num_classes": int(num_classes), "cifar": bool(cifar),
                                   "widths": widths, "deploy": bool(deploy)}
        strides = STRIDES["cifar" if cifar else "imagenet"]
        cin, i, stages = 3, 0, []
        for n, stride in zip(layers, strides):
            blocks = []
            for j in range(n):
                blocks.append(RepVGGBlock(cin, widths[i], stride if j == 0 else 1, deploy))
                cin, i = widths[i], i + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(x)).flatten(1))

    def blocks(self) -> list[RepVGGBlock]:
        return [block for stage in self.stages for block in stage]

    def widths(self) -> list[int]:
        """Current output width of every block (after slimming, the slimmed ones)."""
        return [block.out_channels for block in self.blocks()]

    def nasprune_constructor(self):
        """(constructor, kwargs) that ``nasprune.save`` records, so ``nasprune.load(path)``
        rebuilds the model alone. These are the kwargs the model was built with: a copy slimmed
        by ``nasprune.slim.apply`` keeps them, and the file replays the slimming on top."""
        return "nasprune.models.repvgg.RepVGG", copy.deepcopy(self.constructor_kwargs)

    def reparameterize(self) -> "RepVGG":
        """See :func:`reparameterize`."""
        return reparameterize(self)


def _check_widths(config: str, layers: tuple, widths) -> list[int]:
    try:
        widths = [operator.index(w) for w in widths]
    except TypeError:
        raise ValueError(f"RepVGG-{config} widths must be a list of positive integers, got {widths!r}") from None
    if len(widths) != sum(layers):
        raise ValueError(f"RepVGG-{config} has {sum(layers)} blocks ({'+'.join(map(str, layers))}); "
                         f"got {len(widths)} widths: {widths}")
    bad = [(i, w) for i, w in enumerate(widths) if w < 1]
    if bad:
        raise ValueError(f"RepVGG-{config} width {bad[0][1]} of block {bad[0][0]} is not positive")
    return widths


@torch.no_grad()
def reparameterize(model: RepVGG) -> RepVGG:
    """A new RepVGG in deploy form equal to ``model`` in eval mode: each block folded into one
    3x3 conv with bias (BN folded into each branch, the 1x1 kernel zero-padded to 3x3, the
    identity as a 3x3 identity kernel through its BN; summed in float64). Widths are read from
    the layers, so a model slimmed by ``nasprune.slim.apply`` gives its slimmed deploy form.
    ``model`` is not modified; the result is on its device and dtype and in its train/eval mode.

    An untied RepVGG (``nasprune.graph.untie(repvgg)``, slimmed or not: PaS's untied placement)
    folds too: its identity branches read the block input through a ChannelSelect, which
    becomes a selection kernel, so blocks of a stage that keep different channels give a plain
    RepVGG whose every block has a width of its own."""
    from nasprune.graph.untie import Untied
    selects = {}
    if isinstance(model, Untied) and isinstance(model.model, RepVGG):
        selects = _identity_selects(model)
        model = model.model
    if not isinstance(model, RepVGG):
        raise TypeError(f"reparameterize expects a nasprune.models.RepVGG (or an untied one), got "
                        f"{type(model).__name__}")
    kw = model.constructor_kwargs
    weight = model.fc.weight
    with torch.device("meta"):  # no initialisation: every tensor is overwritten below
        deployed = RepVGG(kw["config"], model.fc.out_features, kw["cifar"], model.widths(), deploy=True)
    deployed = deployed.to_empty(device=weight.device).to(weight.dtype)
    names = {id(m): n for n, m in model.named_modules()}
    for src, dst in zip(model.blocks(), deployed.blocks()):
        kernel, bias = src.fused(selects.get(names[id(src)]))
        dst.conv.weight.copy_(kernel)
        dst.conv.bias.copy_(bias)
    deployed.fc.load_state_dict(model.fc.state_dict())
    return deployed.train(model.training)


def _builder(config: str):
    def build(num_classes: int | None = None, cifar: bool = False, widths=None, deploy: bool = False) -> RepVGG:
        return RepVGG(config, num_classes, cifar, widths, deploy)
    build.__name__ = f"repvgg_{config.lower()}"
    build.__doc__ = (f"RepVGG-{config}: ImageNet (224x224 inputs, 1000 classes) by default; ``cifar=True`` "
                     f"for 32x32 inputs (10 classes unless num_classes says otherwise).")
    return build


repvgg_a0, repvgg_a1, repvgg_b0 = (_builder(c) for c in CONFIGS)


def _cifar_builder(config: str):
    def build(num_classes: int = 10, widths=None, deploy: bool = False) -> RepVGG:
        return RepVGG(config, num_classes, True, widths, deploy)
    build.__name__ = f"cifar_repvgg_{config.lower()}"
    build.__doc__ = f"RepVGG-{config} for 32x32 inputs (the CIFAR variant; ``nasprune search --model repvgg_{config.lower()}``)."
    return build


cifar_repvgg_a0, cifar_repvgg_a1, cifar_repvgg_b0 = (_cifar_builder(c) for c in CONFIGS)


def _identity_selects(untied) -> dict:
    """Block name (in the RepVGG) -> the ChannelSelect an untied RepVGG feeds its identity
    branch through (a selection whose one user is the block's ``identity``)."""
    found = {}
    for name, users in untied.select_users().items():
        if len(users) == 1 and users[0].endswith(".identity"):
            found[users[0][:-len(".identity")]] = untied.selects[name]
    return found
