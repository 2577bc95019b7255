"""Channel-group scores: per-layer scores gathered onto the channel groups of the graph analysis.

A group is a set of channels that must be removed together (a conv's filters and every layer
reading them; with residual adds, all the layers on the stream). A group channel's score reduces
the scores of every scored layer that produces it (mean, sum or max). Groups come either from
`nasprune.graph.trace` (a ChannelGraph: each group's "out" members are the producing layers, their
index maps say which filter carries which group channel) or as plain lists, one per group, of
(layer name, index map) pairs, the index map a LongTensor of the group's size whose entry c is the
layer's output channel carrying group channel c (-1 where the layer does not hold it).
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

REDUCTIONS = {"mean": "mean", "sum": "sum", "max": "amax"}
NORMALIZERS = ("mean", "max", "sum", "minmax")


@dataclass
class GroupScores(Mapping):
    """group index -> (size,) fp32 channel scores, NaN for channels no scored layer produces.
    Also carries what selection must respect: which groups may be pruned, and per group the
    channel sets of members holding only some of its channels (each must keep one)."""
    scores: dict[int, Tensor]
    prunable: dict[int, bool] = field(default_factory=dict)
    partial: dict[int, list[Tensor]] = field(default_factory=dict)

    def __getitem__(self, index: int) -> Tensor:
        return self.scores[index]

    def __iter__(self):
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class _Spec:
    index: int
    size: int
    prunable: bool
    entries: list  # (layer name, channels (k,), positions (k, r), -1 padded)
    partial: list  # channel sets of members that hold only some of the group's channels


def _specs(groups) -> list[_Spec]:
    if hasattr(groups, "groups"):  # a ChannelGraph
        groups = groups.groups
    specs = []
    for gi, g in enumerate(groups):
        if hasattr(g, "members"):  # a ChannelGroup
            entries = [(m.module, m.index_map.channels, m.index_map.positions)
                       for m in g.members if m.role == "out"]
            partial = [m.index_map.channels for m in g.members
                       if m.index_map.channels.numel() < g.size]
            specs.append(_Spec(g.index, g.size, bool(g.prunable), entries, partial))
            continue
        pairs = list(g)
        if not pairs:
            raise ValueError(f"group {gi} is empty: give (layer name, index map) pairs")
        sizes = {len(idx) for _, idx in pairs}
        if len(sizes) != 1:
            raise ValueError(f"group {gi}: index maps of different lengths {sorted(sizes)}; each "
                             "has one entry per group channel")
        size = sizes.pop()
        entries, partial = [], []
        for name, idx in pairs:
            idx = torch.as_tensor(idx, dtype=torch.long)
            held = (idx >= 0).nonzero().flatten()
            entries.append((name, held, idx[held].unsqueeze(1)))
            if held.numel() < size:
                partial.append(held)
        specs.append(_Spec(gi, size, True, entries, partial))
    return specs


def normalize_scores(scores: Mapping[str, Tensor], how: str) -> dict[str, Tensor]:
    """Each layer's scores scaled on their own: "mean" s / mean(s), "max" s / max(s), "sum"
    s / sum(s), "minmax" (s - min) / (max - min). A layer whose divisor is zero is left as is."""
    if how not in NORMALIZERS:
        raise ValueError(f"normalize must be None or one of {NORMALIZERS}, got {how!r}")
    out = {}
    for name, s in scores.items():
        s = s.float()
        if s.numel() == 0:
            out[name] = s
            continue
        if how == "minmax":
            lo = s.min()
            den = s.max() - lo
            s = s - lo
        else:
            den = {"mean": s.mean, "max": s.max, "sum": s.sum}[how]()
        out[name] = torch.where(den != 0, s / torch.where(den != 0, den, 1.0), s)
    return out


@dataclass
class _Plan:
    """Where every producer score lands: flat score index -> flat group-channel index."""
    specs: list
    starts: list
    total: int
    src: Tensor
    dst: Tensor


_PLANS: dict[int, tuple] = {}  # id(graph) -> (weak reference, layout, plan)


def _plan(groups, layout: tuple) -> _Plan:
    """The index plan for `groups` and a score layout ((name, numel), ...); cached per graph
    object (a ChannelGraph is immutable once traced), rebuilt for plain group lists."""
    cached = _PLANS.get(id(groups))
    if cached is not None and cached[0]() is groups and cached[1] == layout:
        return cached[2]
    specs = _specs(groups)
    offset, at = {}, 0
    for n, numel in layout:
        offset[n] = (at, numel)
        at += numel
    src, dst, starts, total = [], [], [], 0
    for spec in specs:
        starts.append(total)
        for name, channels, positions in spec.entries:
            key = name if name in offset else f"{name}.conv" if f"{name}.conv" in offset else None
            if key is None:
                continue
            base, length = offset[key]
            positions = positions.reshape(channels.numel(), -1)
            valid = positions >= 0
            pos = positions[valid]
            if pos.numel() and int(pos.max()) >= length:
                raise ValueError(f"group {spec.index}: {name} position {int(pos.max())} is out of "
                                 f"range for its {length} scores")
            src.append(base + pos)
            dst.append(total + channels.unsqueeze(1).expand_as(positions)[valid])
        total += spec.size
    empty = torch.zeros(0, dtype=torch.long)
    plan = _Plan(specs, starts, total, torch.cat(src) if src else empty,
                 torch.cat(dst) if dst else empty)
    try:
        ref = weakref.ref(groups, lambda _, key=id(groups): _PLANS.pop(key, None))
    except TypeError:  # plain lists cannot be weakly referenced: no cache
        return plan
    _PLANS[id(groups)] = (ref, layout, plan)
    return plan


def group_scores(scores: Mapping[str, Tensor], groups, *, reduce: str = "mean",
                 normalize: str | None = None) -> GroupScores:
    """Channel scores of every group, from per-layer `scores` (nasprune.scores.filter_scores).
    `groups`: a ChannelGraph or plain group lists (see the module docstring). `reduce` combines the
    layers producing a channel: "mean", "sum" or "max". `normalize` first scales each layer's
    scores on their own (see normalize_scores), so that layers of different sizes compare.
    A member named "x" whose scores are keyed "x.conv" (a GatedConvBNAct2d) is matched to them.
    The index plan is built once per ChannelGraph and score layout, then one scatter_reduce
    gathers every group."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {tuple(REDUCTIONS)}, got {reduce!r}")
    if normalize is not None:
        scores = normalize_scores(scores, normalize)
    names = list(scores)
    plan = _plan(groups, tuple((n, scores[n].numel()) for n in names))
    if names:
        flat = torch.cat([scores[n].detach().float().flatten() for n in names])
    else:
        flat = torch.zeros(0)
    out = torch.full((plan.total,), float("nan"), device=flat.device)
    if plan.src.numel():
        src, dst = plan.src.to(flat.device), plan.dst.to(flat.device)
        out.scatter_reduce_(0, dst, flat[src], REDUCTIONS[reduce], include_self=False)
    specs = plan.specs
    return GroupScores(
        scores={s.index: out[b:b + s.size] for s, b in zip(specs, plan.starts)},
        prunable={s.index: s.prunable for s in specs},
        partial={s.index: s.partial for s in specs if s.partial},
    )
