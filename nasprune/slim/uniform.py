"""The uniform baseline: keep the leading channels of every prunable group."""
from __future__ import annotations

import torch
from torch import nn


def _counts(graph, keep_ratio: float, round_to: int) -> dict[int, int]:
    counts = {}
    for g in graph.prunable_groups:
        n = int(keep_ratio * g.size)
        if round_to > 1 and n >= round_to:
            n -= n % round_to
        counts[g.index] = max(1, n)
    return counts


def group_keep(group, n: int, ranked: list[int], round_to: int = 1) -> set[int]:
    """The channels one group keeps: the first ``n`` in ``ranked`` (its channels best first),
    plus the first in that order of any member layer they would empty, and with ``round_to`` > 1
    every member layer's width a multiple (:func:`_round_members`). The keep rule of the uniform
    controls and of every gate-based search (``GatedNetwork.keep``)."""
    chosen = set(ranked[:n])
    members = [m.index_map.channels.tolist() for m in group.members]
    _one_each(chosen, members, ranked)
    if round_to > 1:
        _round_members(chosen, members, ranked, round_to)
        _one_each(chosen, members, ranked)   # a member that lost its last channel to another's rounding
    return chosen


def _one_each(chosen: set, members: list[list[int]], ranked: list[int]) -> None:
    for held in members:
        if not chosen.intersection(held):
            inside = set(held)
            chosen.add(next(c for c in ranked if c in inside))


def _round_members(chosen: set, members: list[list[int]], order: list[int], round_to: int) -> None:
    """Makes every member layer's kept width (its held channels in ``chosen``) a multiple of
    ``round_to``, at least one multiple, or all it holds. Without this a group whose members hold
    different parts of it (a residual stream through stages of 16, 32 and 64 channels) leaves
    layers at widths the rounding was meant to avoid (11 of the first stage's 16 at round_to 16).
    Members go narrowest first; channels a narrower member holds are settled and not touched
    again. A member rounds down by dropping its worst unsettled chosen channels (last in
    ``order``) where that leaves at least one multiple, else up by taking its best unsettled
    free ones (first in ``order``); a member whose unsettled channels cannot do either (not
    nested in the narrower ones' parts) keeps its width."""
    rank = {c: i for i, c in enumerate(order)}
    settled: set = set()
    for held in sorted({tuple(sorted(h)) for h in members}, key=lambda h: (len(h), h)):
        kept = [c for c in held if c in chosen]
        extra = len(kept) % round_to
        if (extra or not kept) and len(kept) < len(held):      # none kept: up to one multiple
            loose = sorted((c for c in kept if c not in settled), key=rank.__getitem__)
            free = sorted((c for c in held if c not in chosen and c not in settled), key=rank.__getitem__)
            if len(kept) - extra >= round_to and len(loose) >= extra:
                chosen.difference_update(loose[len(loose) - extra:])
            elif len(free) >= min(round_to - extra, len(held) - len(kept)):
                chosen.update(free[:round_to - extra])
        settled.update(held)


def _leading(graph, counts: dict[int, int], order=None, round_to: int = 1) -> dict[int, torch.Tensor]:
    """:func:`group_keep` of every prunable group: its first ``counts[g]`` channels in
    ``order[g]`` (default: the leading channels); groups kept whole are left out."""
    keep = {}
    for g in graph.prunable_groups:
        ranked = order[g.index].tolist() if order is not None and g.index in order else list(range(g.size))
        chosen = group_keep(g, counts[g.index], ranked, round_to)
        if len(chosen) < g.size:
            keep[g.index] = torch.tensor(sorted(chosen), dtype=torch.long)
    return keep


def _check(keep_ratio, round_to):
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")


def uniform_keep(graph, keep_ratio: float, round_to: int = 1, order=None) -> dict[int, torch.Tensor]:
    """Keep set with the leading ``int(keep_ratio * size)`` channels (at least one) of every
    prunable group, rounded down to a multiple of ``round_to`` when that leaves some.

    order: optional {group index: its channels best first} (a permutation, e.g. by descending
    L1 norm: the classic per-layer magnitude rule at one ratio); the first channels in that
    order are kept instead of the leading ones. A group whose members hold only some of its
    channels (the nested residual stream of an option-A ResNet) also keeps the first channel
    (in order) of any member the prefix would empty, and with ``round_to`` each such member
    layer's width is rounded too (:func:`group_keep`).
    """
    _check(keep_ratio, round_to)
    return _leading(graph, _counts(graph, keep_ratio, round_to), order, round_to)


def uniform(model: nn.Module, example_inputs, keep_ratio: float, *, round_to: int = 1, **trace_kwargs) -> nn.Module:
    """Trace ``model`` and slim every prunable group to its leading channels."""
    from nasprune.graph import trace
    from nasprune.slim.apply import apply
    graph = trace(model, example_inputs, **trace_kwargs)
    return apply(model, graph, uniform_keep(graph, keep_ratio, round_to))


def uniform_keep_at(graph, flops_target: float, *, round_to: int = 1, cost=None,
                    order=None) -> tuple[dict[int, torch.Tensor], float]:
    """(keep set, keep ratio): uniform width at a MACs target, counted by the cost model on
    ``graph`` (no re-tracing). ``cost``: a ``nasprune.flops.CostModel`` of ``graph`` when the
    caller has one. ``order``: as in :func:`uniform_keep` (the MACs are those of the channels
    actually kept: in a nested group they depend on which).

    The ratio r is bisected to the step of :func:`uniform_keep`'s MACs that crosses
    ``flops_target`` times the original's. Where groups of related sizes (16, 32, 64) all gain a
    channel at the same ratio that step is coarse (5 % of a CIFAR ResNet-20's MACs), so the
    groups the step widens do so one at a time, in group order: each group keeps
    ``int(r * size)`` channels or ``round_to`` more, and of the keep sets along the way the one
    whose MACs come closest to the target is returned (the cheaper of two equally close). The
    ratio returned is the one below the step.
    """
    from nasprune.flops import CostModel
    if not 0 < flops_target <= 1:
        raise ValueError(f"flops_target must be in (0, 1] (the fraction of MACs kept), got {flops_target}")
    _check(1.0, round_to)
    cost = cost if cost is not None else CostModel(graph)
    target = flops_target * cost.total()

    def macs(counts):
        return cost.exact(_leading(graph, counts, order, round_to))

    lo, hi = 1e-6, 1.0  # macs(lo) <= target < macs(hi), unless the target lies outside them
    if macs(_counts(graph, hi, round_to)) <= target:
        return _leading(graph, _counts(graph, hi, round_to), order, round_to), hi
    if macs(_counts(graph, lo, round_to)) > target:
        return _leading(graph, _counts(graph, lo, round_to), order, round_to), lo
    for _ in range(40):  # the ratio to 1e-12: far below one channel of any group
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(_counts(graph, mid, round_to)) <= target else (lo, mid)
    below, above = _counts(graph, lo, round_to), _counts(graph, hi, round_to)
    best, counts = (target - macs(below), macs(below), below), dict(below)
    for g in sorted(g for g in below if above[g] != below[g]):
        counts[g] = above[g]
        m = macs(counts)
        best = min(best, (abs(m - target), m, dict(counts)), key=lambda b: b[:2])
    return _leading(graph, best[2], order, round_to), lo


def uniform_at(model: nn.Module, example_inputs, flops_target: float, *, round_to: int = 1,
               **trace_kwargs) -> nn.Module:
    """``model`` slimmed to its leading channels with one keep ratio for every prunable group
    (each group's count rounded down or up, :func:`uniform_keep_at`), the MACs the closest to
    ``flops_target`` (a fraction) of the original's: the control every pruning method is
    compared with at equal cost. The model is
    traced once; the ratio is found with the cost model. The chosen ratio and the MACs
    fraction reached are recorded on the result as ``nasprune_uniform = {"keep_ratio",
    "flops_fraction"}``."""
    from nasprune.flops import CostModel
    from nasprune.graph import trace
    from nasprune.slim.apply import apply
    graph = trace(model, example_inputs, **trace_kwargs)
    cost = CostModel(graph)
    keep, ratio = uniform_keep_at(graph, flops_target, round_to=round_to, cost=cost)
    slimmed = apply(model, graph, keep)
    slimmed.nasprune_uniform = {"keep_ratio": ratio, "flops_fraction": cost.exact(keep) / cost.total()}
    return slimmed
