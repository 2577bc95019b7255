"""The masked reference: same shapes as the model, removed channels zeroed.

Removed channels are zeroed in the layers that create them and in the weights of the layers
that read them, so whatever a removed position holds never reaches a kept output; LayerNorm
and GroupNorm are swapped for versions whose statistics skip removed channels. In eval mode the
masked model and ``apply``'s slimmed model compute the same function.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from nasprune.handlers.keep import normalise, removed_classes


def mask(model: nn.Module, graph, keep) -> nn.Module:
    from nasprune.slim.apply import _check_graph
    _check_graph(model, graph)
    keep = normalise(graph, keep)
    removed = removed_classes(graph, keep)
    masked = copy.deepcopy(model)
    for name, (handler, roles) in graph.records.items():
        per_role = {role: torch.from_numpy(removed[classes]) for role, classes in roles.items()
                    if removed[classes].any()}
        if not per_role:
            continue
        replacement = handler.mask(masked.get_submodule(name), per_role)
        if replacement is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(masked.get_submodule(parent_name), attr, replacement)
    for name, classes in graph.params.items():
        gone = torch.from_numpy(removed[classes.reshape(-1).numpy()]).view(classes.shape)
        if bool(gone.any()):
            owner_name, _, attr = name.rpartition(".")
            with torch.no_grad():
                getattr(masked.get_submodule(owner_name), attr).masked_fill_(gone, 0)
    return masked
