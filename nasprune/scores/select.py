"""Selection: which channels of each group to keep, from group scores.

Every method removes the lowest-scored channels first. Ties are broken deterministically: among
equal scores the channel with the higher index goes first (so equal scores keep the leading
channels, as nasprune.slim.uniform does) and, across groups, the higher group index. Some channels
are never removed: the `min_width` best of each group, the best channel of every member holding
only some of a group's channels (so no layer is emptied), and channels without a score (NaN).

The result maps each prunable group's index to its sorted kept channel indices (int64), the form
nasprune.slim.apply takes; groups that cannot be pruned are left out (slim keeps them whole).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from nasprune.scores.groups import GroupScores

METHODS = ("global", "layer", "threshold", "otsu")


def _round(x: float) -> int:
    """Round half up (Python's round() goes to even)."""
    return int(math.floor(x + 0.5))


def otsu_threshold(values, trim: float = 0.2) -> float:
    """Otsu's threshold of a set of values as FFP's coarse step takes it (EKG's `trimed_otsu`):
    sort, drop ceil(trim * n) values from each end, pick the split t in [1, m - 2] of the m values
    left that maximises t (m - t) (mean(below) - mean(above))^2, and return the midpoint of the two
    values beside it. With fewer than 3 values left, the largest value (everything is below)."""
    everything = np.sort(np.asarray(torch.as_tensor(values, dtype=torch.float64).cpu(), dtype=np.float64))
    v = everything
    if trim > 0:
        cut = math.ceil(v.size * trim)
        v = v[cut:v.size - cut]
    m = v.size
    if m < 3:
        return float(everything[-1]) if everything.size else float("inf")
    t = np.arange(1, m - 1)
    csum = np.cumsum(v)
    below = csum[t - 1] / t
    above = (csum[-1] - csum[t - 1]) / (m - t)
    i = int(np.argmax(t * (m - t) * (below - above) ** 2))  # the first maximum
    return float((v[i] + v[i + 1]) / 2)


def _min_keep(min_width, size: int) -> int:
    if isinstance(min_width, float):
        if not 0 < min_width <= 1:
            raise ValueError(f"a fractional min_width must be in (0, 1], got {min_width}")
        return max(1, math.ceil(min_width * size))
    if min_width < 1:
        raise ValueError(f"min_width must be at least 1, got {min_width}")
    return min(int(min_width), size)


def _priority(scores: Tensor, min_keep: int, partial: list[Tensor]) -> Tensor:
    """Scores as removal priority (fp64, CPU): +inf for channels that must stay."""
    p = scores.detach().double().cpu().clone()
    p[torch.isnan(p)] = math.inf
    order = _keep_order(p)
    p[order[:min_keep]] = math.inf
    for held in partial:
        held = held.cpu()
        if held.numel():
            best = held[_keep_order(p[held])[0]]
            p[best] = math.inf
    return p


def _keep_order(p: Tensor) -> Tensor:
    """Channel indices from most to least worth keeping: by score, descending; among equal
    scores the lower index first."""
    return torch.sort(p, descending=True, stable=True).indices


def _remove_order(p: Tensor) -> Tensor:
    """The reverse of _keep_order: lowest score first; among equal scores the higher index."""
    return _keep_order(p).flip(0)


def select(scores: GroupScores | Mapping[int, Tensor], *, method: str = "global",
           prune_ratio: float | None = None, threshold: float | Mapping[int, float] | None = None,
           min_width: int | float = 1, step: float | Mapping[int, float] = 0.2, trim: float = 0.2,
           widths: Mapping[int, int] | None = None) -> dict[int, Tensor]:
    """Kept channel indices per prunable group.

    method "global": remove exactly round(prune_ratio * N) channels, N the channels of all
      prunable groups, the lowest-scored across groups (normalise scores per layer first for a
      fair comparison). Raises when the never-removed channels leave too few to remove.
    method "layer": each group removes round(prune_ratio * size) of its lowest-scored channels
      (fewer only where min_width or a partial member leaves fewer removable).
    method "threshold": remove every removable channel scored below `threshold` (one value, or
      one per group index).
    method "otsu": FFP's coarse step (EKG's mask_marking). A group currently `widths[g]` wide
      (default: its size) would next lose max(1, round(step * size)) channels, its lowest-scored
      kept ones; each group's score is the sum of those channels' scores; groups at or below the
      trimmed Otsu threshold of these sums (otsu_threshold(sums, trim)) lose them, the others
      keep their current `widths[g]` best channels.

    `scores`: GroupScores (from group_scores) or a plain mapping group index -> scores (all
    groups prunable). `min_width`: channels every group keeps, an int or a fraction of its size.
    Returns {group index: sorted int64 tensor of kept channels} for every prunable group.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("global", "layer"):
        if prune_ratio is None or not 0 <= prune_ratio < 1:
            raise ValueError(f"method {method!r} needs prune_ratio in [0, 1) (the fraction of "
                             f"channels removed), got {prune_ratio}")
    if method == "threshold" and threshold is None:
        raise ValueError("method 'threshold' needs threshold=")
    prunable = getattr(scores, "prunable", {})
    partial = getattr(scores, "partial", {})
    groups = [g for g in scores if prunable.get(g, True)]
    prio = {g: _priority(scores[g], _min_keep(min_width, scores[g].numel()), partial.get(g, []))
            for g in groups}
    keep_count: dict[int, int] = {}

    if method == "global":
        # Removal order over all groups: stable sort of the scores laid out with groups and
        # channels descending, so ties go to the higher group, then the higher channel.
        desc = sorted(groups, reverse=True)
        flat = torch.cat([prio[g].flip(0) for g in desc]) if desc else torch.zeros(0).double()
        owner = torch.cat([torch.full((prio[g].numel(),), i) for i, g in enumerate(desc)]) \
            if desc else torch.zeros(0, dtype=torch.long)
        total = flat.numel()
        n = _round(prune_ratio * total)
        removable = int(torch.isfinite(flat).sum())
        if n > removable:
            raise ValueError(f"cannot remove {n} of {total} channels: min_width and partial "
                             f"members leave {removable} removable")
        lowest = torch.sort(flat, stable=True).indices[:n]
        counts = torch.bincount(owner[lowest], minlength=len(desc)).tolist()
        removed = {g: counts[i] for i, g in enumerate(desc)}
        keep_count = {g: prio[g].numel() - removed[g] for g in groups}
    elif method == "layer":
        for g in groups:
            size = prio[g].numel()
            n = min(_round(prune_ratio * size), int(torch.isfinite(prio[g]).sum()))
            keep_count[g] = size - n
    elif method == "threshold":
        for g in groups:
            t = threshold[g] if isinstance(threshold, Mapping) else threshold
            if t is None:
                keep_count[g] = prio[g].numel()
                continue
            keep_count[g] = prio[g].numel() - int((prio[g] < t).sum())
    else:
        sums, take = {}, {}
        for g in groups:
            size = prio[g].numel()
            width = size if widths is None or g not in widths else int(widths[g])
            s = step[g] if isinstance(step, Mapping) else step
            removable_left = int(torch.isfinite(prio[g]).sum()) - (size - width)
            n = min(max(1, _round(s * size)), removable_left)
            keep_count[g] = width
            if n <= 0:
                continue
            lowest = _remove_order(prio[g])[size - width:size - width + n]
            sums[g] = float(scores[g].double()[lowest].sum())
            take[g] = n
        if sums:
            limit = otsu_threshold(list(sums.values()), trim)
            for g, s in sums.items():
                if s <= limit:
                    keep_count[g] -= take[g]

    return {g: _keep_order(prio[g])[:keep_count[g]].sort().values for g in groups}
