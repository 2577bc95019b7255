"""The uniform baseline: keep the leading channels of every prunable group."""
from __future__ import annotations

import torch
from torch import nn


def uniform_keep(graph, keep_ratio: float, round_to: int = 1) -> dict[int, torch.Tensor]:
    """Keep set with the leading ``int(keep_ratio * size)`` channels (at least one) of every
    prunable group, rounded down to a multiple of ``round_to`` when that leaves some.

    A group whose members hold only some of its channels (the nested residual stream of an
    option-A ResNet) also keeps the first channel of any member the prefix would empty.
    """
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    keep = {}
    for g in graph.prunable_groups:
        n = int(keep_ratio * g.size)
        if round_to > 1 and n >= round_to:
            n -= n % round_to
        chosen = set(range(max(1, n)))
        for m in g.members:
            held = m.index_map.channels.tolist()
            if not chosen.intersection(held):
                chosen.add(held[0])
        if len(chosen) < g.size:
            keep[g.index] = torch.tensor(sorted(chosen), dtype=torch.long)
    return keep


def uniform(model: nn.Module, example_inputs, keep_ratio: float, *, round_to: int = 1, **trace_kwargs) -> nn.Module:
    """Trace ``model`` and slim every prunable group to its leading channels."""
    from nasprune.graph import trace
    from nasprune.slim.apply import apply
    graph = trace(model, example_inputs, **trace_kwargs)
    return apply(model, graph, uniform_keep(graph, keep_ratio, round_to))


def uniform_keep_at(graph, flops_target: float, *, round_to: int = 1, cost=None) -> tuple[dict[int, torch.Tensor], float]:
    """(keep set, keep ratio): the one keep ratio of :func:`uniform_keep` whose slimmed MACs,
    counted by the cost model on ``graph`` (no re-tracing), come closest to ``flops_target``
    times the original's; between two equally close, the cheaper. ``cost``: a
    ``nasprune.flops.CostModel`` of ``graph`` when the caller has one.

    The kept MACs are a step function of the ratio; the ratio is bisected to the step that
    crosses the target and the closer side of that step is chosen, so the result lies within one
    step of the target (how wide a step is depends on the model and ``round_to``).
    """
    from nasprune.flops import CostModel
    if not 0 < flops_target <= 1:
        raise ValueError(f"flops_target must be in (0, 1] (the fraction of MACs kept), got {flops_target}")
    cost = cost if cost is not None else CostModel(graph)
    total = cost.total()
    target = flops_target * total

    def macs(r):
        return cost.exact(uniform_keep(graph, r, round_to))

    lo, hi = 1e-6, 1.0  # macs(lo) <= target < macs(hi), unless the target is outside the range
    if macs(hi) <= target:
        return uniform_keep(graph, hi, round_to), hi
    if macs(lo) > target:
        return uniform_keep(graph, lo, round_to), lo
    for _ in range(40):  # the ratio to 1e-12: far below one channel of any group
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid) <= target else (lo, mid)
    r = lo if target - macs(lo) <= macs(hi) - target else hi
    return uniform_keep(graph, r, round_to), r


def uniform_at(model: nn.Module, example_inputs, flops_target: float, *, round_to: int = 1,
               **trace_kwargs) -> nn.Module:
    """``model`` slimmed to its leading channels with one keep ratio for every prunable group,
    the ratio chosen so the MACs come closest to ``flops_target`` (a fraction) of the
    original's: the control every pruning method is compared with at equal cost. The model is
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
