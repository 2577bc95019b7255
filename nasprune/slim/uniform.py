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
