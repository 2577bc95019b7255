"""Filter-importance scores for a whole network, their aggregation over channel groups, and the
choice of channels to keep.

    scores = nasprune.scores.filter_scores(model, "l1")            # {layer: (C_out,) fp32}
    graph = nasprune.graph.trace(model, example)                   # channel groups
    gs = nasprune.scores.group_scores(scores, graph, reduce="mean", normalize="mean")
    keep = nasprune.scores.select(gs, method="global", prune_ratio=0.3)
    slim = nasprune.slim.apply(model, graph, keep)

l1, l2 and taylor run as one fused kernel over every layer (nasprune.ops.filter_scores);
activation_taylor is accumulated by gated layers inside their fused backward
(track_activation_taylor). See docs/scores.md.
"""
from nasprune.scores.criteria import (CRITERIA, filter_scores, following_bn, scored_layers,
                                      track_activation_taylor)
from nasprune.scores.groups import GroupScores, group_scores, normalize_scores
from nasprune.scores.select import METHODS, otsu_threshold, select


def keep_indices(model, groups, criterion: str = "l1", *, method: str = "global",
                 prune_ratio: float | None = None, reduce: str = "mean",
                 normalize: str | None = "mean", **select_kwargs):
    """filter_scores -> group_scores -> select in one call: the kept channels of every prunable
    group of `groups` (a ChannelGraph or plain group lists) as {group index: sorted LongTensor}."""
    gs = group_scores(filter_scores(model, criterion), groups, reduce=reduce, normalize=normalize)
    return select(gs, method=method, prune_ratio=prune_ratio, **select_kwargs)


__all__ = ["CRITERIA", "METHODS", "GroupScores", "filter_scores", "following_bn", "group_scores",
           "keep_indices", "normalize_scores", "otsu_threshold", "scored_layers", "select",
           "track_activation_taylor"]
