"""The ResNet family TAS searches and the plain pruned ResNet a TAS search derives.

:class:`ResNetSpec` describes an unpruned ResNet: nasprune's CIFAR ResNets (3x3 stem, basic
blocks, 3 stages) and torchvision's ResNets (7x7 stride-2 stem + max-pool, basic or bottleneck
blocks, 4 stages). :class:`TASResNet` (built by :func:`tas_resnet` from an architecture dict) is
TAS's inferred network: per-conv widths, per-stage block counts, and a 1x1 projection wherever a
block's in and out widths differ. It is a plain nn.Module; ``nasprune.save`` records
``nasprune.models.tas_resnet`` and its architecture as the constructor, so ``nasprune.load(path)``
rebuilds it alone. The search itself (supernet, sampling, costs) is ``nasprune.search.tas_net``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch.nn.functional as F
from torch import nn

BLOCKS = ("basic", "bottleneck")
SHORTCUTS = ("avg", "conv")


@dataclass(frozen=True)
class ResNetSpec:
    """The unpruned ResNet a TAS search covers: CIFAR ResNets (3x3 stem, basic blocks, 3 stages)
    and torchvision ResNets (7x7 stride-2 stem and 3x3 max-pool, basic or bottleneck blocks,
    4 stages), or any mix of these parts.

    block: "basic" (conv_a 3x3 with the stride, conv_b 3x3) or "bottleneck" (conv_a 1x1, conv_b
    3x3 with the stride, conv_c 1x1; torchvision v1.5). layers: blocks per stage; strides: the
    first block's stride per stage. stage_widths: each stage's output (residual) width;
    mid_widths: the width inside its blocks (= stage width for basic blocks). shortcut: the
    downsampling shortcut, "avg" (AvgPool(2) + 1x1 conv without BN, TAS's CIFAR models; the
    option-A CIFAR ResNets have no weights there) or "conv" (1x1 conv with the stride + BN,
    torchvision and option B). stem_pool: a 3x3 stride-2 max-pool after the stem.
    """
    layers: tuple
    block: str = "basic"
    stage_widths: tuple = (16, 32, 64)
    mid_widths: tuple | None = None
    strides: tuple | None = None
    stem_width: int = 16
    stem_kernel: int = 3
    stem_stride: int = 1
    stem_pool: bool = False
    shortcut: str = "avg"
    num_classes: int = 10
    in_channels: int = 3

    def __post_init__(self):
        n_stages = len(self.stage_widths)
        layers = (self.layers,) * n_stages if isinstance(self.layers, int) else tuple(self.layers)
        mids = tuple(self.stage_widths) if self.mid_widths is None else tuple(self.mid_widths)
        strides = (1,) + (2,) * (n_stages - 1) if self.strides is None else tuple(self.strides)
        for name, value in (("layers", layers), ("mid_widths", mids), ("strides", strides)):
            if len(value) != n_stages:
                raise ValueError(f"ResNetSpec: {name} has {len(value)} entries for {n_stages} stages")
        if self.block not in BLOCKS:
            raise ValueError(f"ResNetSpec: block must be one of {BLOCKS}, got {self.block!r}")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"ResNetSpec: shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}")
        if min(layers) < 1:
            raise ValueError(f"ResNetSpec: every stage needs a block, got layers {layers}")
        if self.stem_kernel % 2 == 0:
            raise ValueError(f"ResNetSpec: stem_kernel must be odd, got {self.stem_kernel}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "stage_widths", tuple(self.stage_widths))
        object.__setattr__(self, "mid_widths", mids)
        object.__setattr__(self, "strides", strides)

    @classmethod
    def cifar(cls, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> "ResNetSpec":
        """CIFAR ResNet-(6n+2) as TAS searches it (stride-2 shortcuts AvgPool + 1x1 conv)."""
        return cls(layers=blocks_per_stage, num_classes=num_classes, in_channels=in_channels)

    @classmethod
    def from_dict(cls, d: dict) -> "ResNetSpec":
        """The spec inside an architecture dict (also the CIFAR-only dicts of earlier runs,
        which carry ``blocks_per_stage``)."""
        keys = {f.name for f in fields(cls)}
        d = dict(d)
        if "layers" not in d and "blocks_per_stage" in d:
            d["layers"] = d["blocks_per_stage"]
        return cls(**{k: v for k, v in d.items() if k in keys})

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in fields(self) for v in (getattr(self, f.name),)}

    @property
    def convs_per_block(self) -> int:
        return 2 if self.block == "basic" else 3

    def blocks(self):
        """(stage, index in stage, in width, mid width, out width, stride) of every block."""
        cin = self.stem_width
        for s, (n, mid, cout, stride) in enumerate(zip(self.layers, self.mid_widths, self.stage_widths,
                                                       self.strides)):
            for a in range(n):
                yield s, a, cin, mid, cout, stride if a == 0 else 1
                cin = cout

    def row_widths(self) -> list[int]:
        """Unpruned width of every searched conv row: the stem, then each block's convs."""
        rows = [self.stem_width]
        for _, _, _, mid, cout, _ in self.blocks():
            rows += [mid] * (self.convs_per_block - 1) + [cout]
        return rows

    def block_rows(self) -> list[tuple]:
        """Row indices of each block's convs (the shortcut shares the last one's)."""
        k = self.convs_per_block
        return [tuple(range(1 + k * i, 1 + k * (i + 1))) for i in range(sum(self.layers))]

    def row_names(self) -> list[str]:
        """Each conv row's module name in the unpruned model (nasprune's CIFAR ResNets and
        torchvision's ResNets name them alike): ``conv1``, then ``layer{s}.{a}.conv{k}``."""
        names = ["conv1"]
        for s, a, *_ in self.blocks():
            names += [f"layer{s + 1}.{a}.conv{k + 1}" for k in range(self.convs_per_block)]
        return names

    def kept_widths(self, widths, blocks) -> list[int]:
        """Width of every conv row in the pruned network of ``widths`` and ``blocks`` (the
        architecture dict's): 0 for the rows of dropped blocks."""
        kept, first = list(widths), 0
        for n, b in zip(self.layers, blocks):
            for rows in self.block_rows()[first + b:first + n]:
                for r in rows:
                    kept[r] = 0
            first += n
        return kept


def block_shapes(block: str, cin: int, mid: int, cout: int, stride: int):
    """(in, out, kernel, stride, relu) of a block's convs."""
    if block == "basic":
        return [(cin, mid, 3, stride, True), (mid, cout, 3, 1, False)]
    return [(cin, mid, 1, 1, True), (mid, mid, 3, stride, True), (mid, cout, 1, 1, False)]


def has_projection(cin: int, cout: int, stride: int) -> bool:
    """Whether the unpruned block has a shortcut conv (the supernet searches its width with the
    block's last conv, and the derived block keeps it whatever the widths)."""
    return stride != 1 or cin != cout



class ConvBN(nn.Module):
    def __init__(self, cin, cout, kernel, stride, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class DerivedBlock(nn.Module):
    """TAS's inferred block (basic or bottleneck) with pruned widths ``widths`` (one per conv).
    Shortcut: the base block's projection when it has one (AvgPool + 1x1 conv without BN, or
    1x1 conv with the stride + BN); else a 1x1 conv + BN when in-width != out-width (without the
    BN when not ``projection_bn``); else identity."""

    def __init__(self, block, cin, widths, stride, *, base_projection=False, shortcut="avg",
                 projection_bn=True):
        super().__init__()
        cout, i = widths[-1], cin
        shapes = block_shapes(block, cin, widths[0], cout, stride)
        for name, (_, _, k, s, relu), o in zip(("conv_a", "conv_b", "conv_c"), shapes, widths):
            setattr(self, name, ConvBN(i, o, k, s, relu))
            i = o
        self.convs = [self.conv_a, self.conv_b] + ([self.conv_c] if block == "bottleneck" else [])
        if stride != 1 and shortcut == "avg":
            self.shortcut = nn.Sequential(nn.AvgPool2d(stride), nn.Conv2d(cin, cout, 1, bias=False))
        elif base_projection or cin != cout:
            bn = [nn.BatchNorm2d(cout)] if base_projection or projection_bn else []
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), *bn)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = x
        for conv in self.convs:
            out = conv(out)
        return F.relu(out + self.shortcut(x))


class TASResNet(nn.Module):
    """The plain pruned ResNet a TAS architecture dict describes: ``widths`` one per conv row of
    the spec (rows of dropped blocks are ignored), ``blocks`` the blocks kept per stage.
    projection_bn: whether a 1x1 projection that only the pruned widths call for (a stride-1
    block whose input and output widths differ) has a BN (TAS's inferred networks do). Without
    it, the projection initialised as the identity embedding is exactly the supernet's residual
    add of unequal widths: a warm-started export keeps what the shortcut carried, where a fresh
    BN in training mode would standardise it (docs/tas.md, Quality)."""

    def __init__(self, widths, blocks, spec: ResNetSpec, projection_bn: bool = True):
        super().__init__()
        rows, block_rows = spec.row_widths(), spec.block_rows()
        if len(widths) != len(rows) or len(blocks) != len(spec.layers):
            raise ValueError(f"architecture has {len(widths)} widths and {len(blocks)} stages; its "
                             f"{len(spec.layers)}-stage {spec.block} ResNet of {list(spec.layers)} blocks "
                             f"needs {len(rows)} widths")
        bad = [(r, w, c) for r, (w, c) in enumerate(zip(widths, rows)) if not 1 <= w <= c]
        if bad:
            r, w, c = bad[0]
            raise ValueError(f"architecture width {w} of conv row {r} is outside 1..{c}")
        self.spec = spec
        self.constructor_kwargs = {**spec.to_dict(), "widths": [int(w) for w in widths],
                                   "blocks": [int(b) for b in blocks],
                                   **({} if projection_bn else {"projection_bn": False})}
        self.stem = ConvBN(spec.in_channels, widths[0], spec.stem_kernel, spec.stem_stride)
        self.pool = nn.MaxPool2d(3, 2, 1) if spec.stem_pool else nn.Identity()
        cin, stages, i = widths[0], [], 0
        for s, kept in enumerate(blocks):
            n = spec.layers[s]
            if not 1 <= kept <= n:
                raise ValueError(f"stage {s} keeps {kept} blocks, must be 1..{n}")
            layer = []
            for a in range(kept):
                stride = spec.strides[s] if a == 0 else 1
                base_in = spec.stem_width if (s == 0 and a == 0) else spec.stage_widths[s - (a == 0)]
                ws = [widths[r] for r in block_rows[i + a]]
                layer.append(DerivedBlock(spec.block, cin, ws, stride, shortcut=spec.shortcut,
                                          base_projection=has_projection(base_in, spec.stage_widths[s], stride),
                                          projection_bn=projection_bn))
                cin = ws[-1]
            stages.append(nn.Sequential(*layer))
            i += n
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, spec.num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def nasprune_constructor(self):
        """(constructor, kwargs) that ``nasprune.save`` records, so ``nasprune.load(path)``
        rebuilds this network without its architecture dict."""
        return "nasprune.models.tas_resnet", self.constructor_kwargs

    def forward(self, x):
        x = self.stages(self.pool(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tas_resnet(**arch) -> TASResNet:
    """Build the pruned network of an architecture dict (``TAS.architecture()``; keys other than
    the spec's, ``widths``, ``blocks`` and ``projection_bn`` are ignored)."""
    return TASResNet(arch["widths"], arch["blocks"], ResNetSpec.from_dict(arch), arch.get("projection_bn", True))
