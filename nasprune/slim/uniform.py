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


def _leading(graph, counts: dict[int, int], order=None) -> dict[int, torch.Tensor]:
    """The first ``counts[g]`` channels of every prunable group in ``order[g]`` (default: the
    leading channels), plus the first in that order of any member they would empty; groups kept
    whole are left out."""
    keep = {}
    for g in graph.prunable_groups:
        ranked = order[g.index].tolist() if order is not None and g.index in order else list(range(g.size))
        chosen = set(ranked[:counts[g.index]])
        for m in g.members:
            held = set(m.index_map.channels.tolist())
            if not chosen & held:
                chosen.add(next(c for c in ranked if c in held))
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
    (in order) of any member the prefix would empty.
    """
    _check(keep_ratio, round_to)
    return _leading(graph, _counts(graph, keep_ratio, round_to), order)


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
        return cost.exact(_leading(graph, counts, order))

    lo, hi = 1e-6, 1.0  # macs(lo) <= target < macs(hi), unless the target lies outside them
    if macs(_counts(graph, hi, round_to)) <= target:
        return _leading(graph, _counts(graph, hi, round_to), order), hi
    if macs(_counts(graph, lo, round_to)) > target:
        return _leading(graph, _counts(graph, lo, round_to), order), lo
    for _ in range(40):  # the ratio to 1e-12: far below one channel of any group
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(_counts(graph, mid, round_to)) <= target else (lo, mid)
    below, above = _counts(graph, lo, round_to), _counts(graph, hi, round_to)
    best, counts = (target - macs(below), macs(below), below), dict(below)
    for g in sorted(g for g in below if above[g] != below[g]):
        counts[g] = above[g]
        m = macs(counts)
        best = min(best, (abs(m - target), m, dict(counts)), key=lambda b: b[:2])
    return _leading(graph, best[2], order), lo


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
