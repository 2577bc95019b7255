"""Per-layer filter scores: one value per output channel of every conv and linear layer."""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor, nn

from nasprune import ops

CRITERIA = ("l1", "l2", "bn", "taylor", "fpgm", "activation_taylor")
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def scored_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The conv (1d, 2d, 3d) and linear layers of `model` by qualified name, in module order.
    Their weights hold the filters along dim 0 (transposed convs are not scored). A
    GatedConvBNAct2d contributes its `.conv`, a GatedConv2d itself."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _LAYER_TYPES)}


def following_bn(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Each layer's BatchNorm: the batch norm registered right after it (the next leaf module in
    registration order) with one feature per output channel, as in torchvision and timm models,
    nn.Sequential(conv, bn, act) blocks and GatedConvBNAct2d. Layers without one are absent."""
    pairs, previous = {}, None
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue  # containers: look at leaves only
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and previous is not None:
            prev_name, prev = previous
            out = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
            if m.num_features == out:
                pairs[prev_name] = m
        previous = (name, m) if isinstance(m, _LAYER_TYPES) else None
    return pairs


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _fused(layers: dict[str, nn.Module], kind: str) -> dict[str, Tensor]:
    """l1 / l2 / taylor of every layer's weight: one filter_scores call per (device, dtype)."""
    buckets = defaultdict(list)
    for name, m in layers.items():
        buckets[(m.weight.device, m.weight.dtype)].append(name)
    missing = [n for n, m in layers.items() if kind == "taylor" and m.weight.grad is None]
    if missing:
        raise ValueError(f"criterion 'taylor' needs weight gradients; run a backward first. "
                         f"{len(missing)} layers have none, e.g. {', '.join(missing[:4])}")
    out = {}
    for names in buckets.values():
        weights = [layers[n].weight for n in names]  # the caller runs under no_grad
        grads = [layers[n].weight.grad for n in names] if kind == "taylor" else None
        scores = ops.filter_scores(weights, kind, grads)
        out.update(zip(names, scores.split([w.shape[0] for w in weights])))
    return {n: out[n] for n in layers}


def _fpgm(w: Tensor) -> Tensor:
    """Sum of Euclidean distances from each filter to all the others (He et al. 2019): the
    geometric-median objective evaluated at each filter; the lowest lie nearest the median."""
    rows = w.detach().reshape(w.shape[0], math.prod(w.shape[1:])).float()
    if rows.shape[0] < 2:
        return rows.new_zeros(rows.shape[0])
    d = torch.cdist(rows, rows, compute_mode="use_mm_for_euclid_dist")
    d.fill_diagonal_(0)
    return d.sum(1)


def _activation_taylor(model: nn.Module) -> dict[str, Tensor]:
    from nasprune.nn.gated_conv import GatedConvBNAct2d, _Gated

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _Gated) and m.activation_taylor is not None:
            key = f"{name}.conv" if isinstance(m, GatedConvBNAct2d) else name
            out[key.lstrip(".")] = m.activation_taylor.detach().clone()
    if not out:
        raise ValueError("criterion 'activation_taylor' reads the scores gated layers accumulate in "
                         "their backward: use GatedConvBNAct2d / GatedConv2d layers, call "
                         "nasprune.scores.track_activation_taylor(model), then run forward and "
                         "backward passes")
    return out


def track_activation_taylor(model: nn.Module, enabled: bool = True, reset: bool = True) -> int:
    """Turn activation-Taylor accumulation on (or off) in every gated layer of `model` (zeroing
    what they hold when `reset`); returns how many layers that is."""
    from nasprune.nn.gated_conv import _Gated

    count = 0
    for m in model.modules():
        if isinstance(m, _Gated):
            m.track_activation_taylor(enabled)
            if reset:
                m.reset_activation_taylor()
            count += 1
    return count


@torch.no_grad()
def filter_scores(model: nn.Module, criterion: str = "l1", *,
                  layers: list[str] | None = None) -> dict[str, Tensor]:
    """One fp32 score per output channel of every conv and linear layer of `model` (or of the
    named `layers`), keyed by layer name; higher means more important.

    l1: sum |w| over the filter.  l2: sqrt(sum w^2).  taylor: |sum w * dL/dw| (needs .grad).
    bn: |gamma| of the layer's BatchNorm (layers without one are left out).
    fpgm: sum over the layer's other filters of the Euclidean distance to them.
    activation_taylor: sum over batches of |sum_{n,h,w} dy * y| per output channel, accumulated by
    gated layers during backward (see track_activation_taylor); keys name their convs.
    l1, l2 and taylor run as one fused kernel call over all layers."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion == "activation_taylor":
        scores = _activation_taylor(model)
        return scores if layers is None else {n: scores[n] for n in layers if n in scores}
    found = scored_layers(model)
    if layers is not None:
        unknown = [n for n in layers if n not in found]
        if unknown:
            raise KeyError(f"not conv or linear layers of {type(model).__name__}: {unknown[:4]}")
        found = {n: found[n] for n in layers}
    if criterion in ("l1", "l2", "taylor"):
        return _fused(found, criterion)
    if criterion == "fpgm":
        return {n: _fpgm(m.weight) for n, m in found.items()}
    bns = following_bn(model)
    out = {}
    for n in found:
        bn = bns.get(n)
        if bn is not None and bn.weight is not None:
            out[n] = bn.weight.detach().abs().float()
    return out
