"""Validating keep sets and turning them into removed channel classes."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


class KeepError(ValueError):
    """A keep set that does not describe a valid slimmed model."""


def _describe(group) -> str:
    names = ", ".join(f"{m.module} ({m.role})" for m in group.members[:3])
    more = f", +{len(group.members) - 3} more" if len(group.members) > 3 else ""
    return f"group {group.index} [{names}{more}]"


def normalise(graph, keep: Mapping) -> dict[int, torch.Tensor]:
    """Check ``keep`` (group index -> sorted kept channel indices) against ``graph``."""
    if not isinstance(keep, Mapping):
        raise KeepError(f"keep must map group indices to kept channel indices, got {type(keep).__name__}")
    out = {}
    for key, value in keep.items():
        if isinstance(key, torch.Tensor):
            key = int(key)
        if not isinstance(key, (int, np.integer)) or isinstance(key, bool):
            raise KeepError(f"keep key {key!r} is not a group index")
        if not 0 <= key < len(graph.groups):
            raise KeepError(f"keep key {key} is out of range: the graph has {len(graph.groups)} groups")
        group = graph.groups[key]
        idx = torch.as_tensor(value)
        if idx.dtype == torch.bool:
            raise KeepError(f"keep[{key}] is a boolean mask; give the kept indices "
                            f"(mask.nonzero().flatten()) for {_describe(group)}")
        if idx.is_floating_point() or idx.dim() != 1:
            raise KeepError(f"keep[{key}] must be a 1-D integer tensor, got dtype {idx.dtype} and "
                            f"shape {tuple(idx.shape)} for {_describe(group)}")
        idx = idx.long()
        if idx.numel() == 0:
            raise KeepError(f"keep[{key}] is empty: {_describe(group)} must keep at least one "
                            f"of its {group.size} channels")
        bad = idx[(idx < 0) | (idx >= group.size)]
        if bad.numel():
            raise KeepError(f"keep[{key}] has index {int(bad[0])} outside 0..{group.size - 1} "
                            f"for {_describe(group)}")
        diffs = idx[1:] - idx[:-1]
        if bool((diffs == 0).any()):
            dup = int(idx[1:][diffs == 0][0])
            raise KeepError(f"keep[{key}] has index {dup} more than once for {_describe(group)}")
        if bool((diffs < 0).any()):
            raise KeepError(f"keep[{key}] must be sorted ascending for {_describe(group)} "
                            f"(use torch.sort(...).values)")
        if not group.prunable and idx.numel() != group.size:
            raise KeepError(f"keep[{key}] removes channels of {_describe(group)}, which cannot be "
                            f"pruned: {group.reason}")
        out[int(key)] = idx
    return out


def removed_classes(graph, keep: dict[int, torch.Tensor]) -> np.ndarray:
    """Boolean over atom ids: True for every channel class the keep set removes."""
    removed = np.zeros(len(graph.class_group), dtype=bool)
    for gi, idx in keep.items():
        classes = graph.groups[gi]._classes
        gone = np.ones(len(classes), dtype=bool)
        gone[idx.numpy()] = False
        removed[classes[gone]] = True
    return removed
