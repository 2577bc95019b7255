"""Physical slimming: rebuild a model with the removed channels cut out of its layers."""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from nasprune.graph.tracer import preserved_state, record_shapes
from nasprune.handlers.keep import KeepError, normalise, removed_classes


class SlimError(RuntimeError):
    """The slimmed model could not be built or does not run."""


def apply(model: nn.Module, graph, keep, *, verify: bool = True) -> nn.Module:
    """A deep copy of ``model`` with, for each ``group index -> kept channel indices`` of
    ``keep``, every other channel of the group physically removed.

    Weights, biases and normalisation statistics are sliced and layer attributes
    (``in_channels``, ``out_channels``, ``groups``, ``num_features``, ``in_features``, ...)
    updated. The result is the user's own model class, runnable without nasprune. ``model``
    itself is not modified. With ``verify`` the copy is run once on zero inputs shaped like the
    traced ones and must give outputs of the original shapes.
    """
    _check_graph(model, graph)
    keep = normalise(graph, keep)
    removed = removed_classes(graph, keep)
    plans = _plans(graph, removed)
    params = [(name, torch.from_numpy(removed[c.reshape(-1).numpy()]).view(c.shape))
              for name, c in graph.params.items()]
    params = [(name, gone) for name, gone in params if bool(gone.any())]
    slim_model = _copy_sharing(model, [name for name, _, _ in plans], [name for name, _ in params])
    for name, handler, per_role in plans:
        handler.slim(slim_model.get_submodule(name), per_role)
    for name, gone in params:
        _slice_parameter(slim_model, name, gone)
    _unshare(model, slim_model)
    _attach_record(model, slim_model, graph, keep)
    if verify:
        check_runs(slim_model, graph)
    return slim_model


def _copy_sharing(model: nn.Module, layers: list[str], tensors: list[str]) -> nn.Module:
    """Deep copy that does not copy the tensors about to be replaced by their slices (copying
    a large model's weights only to drop them is most of the cost of slimming)."""
    memo = {}
    for name in layers:
        module = model.get_submodule(name)
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                memo[id(t)] = t
    for name in tensors:
        owner, _, attr = name.rpartition(".")
        t = getattr(model.get_submodule(owner), attr)
        memo[id(t)] = t
    return copy.deepcopy(model, memo)


def _unshare(model: nn.Module, slim_model: nn.Module) -> None:
    """Give the copy its own storage for any tensor a handler left untouched."""
    original = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.numel()}
    for m in slim_model.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is not None and t.numel() and t.data_ptr() in original:
                    copy_ = t.detach().clone()
                    store[k] = nn.Parameter(copy_, t.requires_grad) if isinstance(t, nn.Parameter) else copy_


def _check_graph(model, graph) -> None:
    if type(model).__name__ != graph.model_class:
        raise ValueError(f"the graph was traced from a {graph.model_class}, not this {type(model).__name__}")
    modules = dict(model.named_modules())
    for name in graph.records:
        if name not in modules:
            raise ValueError(f"the graph refers to layer {name!r}, which this model does not have; "
                             f"trace the model you slim")


def _plans(graph, removed: np.ndarray):
    """(module, handler, {role: kept positions}) for every layer that loses channels."""
    plans = []
    for name, (handler, roles) in graph.records.items():
        per_role = {}
        for role, classes in roles.items():
            gone = removed[classes]
            if gone.any():
                kept = np.nonzero(~gone)[0]
                if kept.size == 0:
                    groups = sorted({int(g) for g in graph.class_group[classes[gone]]})
                    raise KeepError(f"keep removes every {role} channel of {name} "
                                    f"(all {len(classes)} belong to groups {groups}); keep at least one")
                per_role[role] = torch.from_numpy(kept)
        if per_role:
            plans.append((name, handler, per_role))
    return plans


def _slice_parameter(model: nn.Module, name: str, gone: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    tensor = getattr(owner, attr)
    kept_per_dim = []
    for d in range(gone.dim()):
        rows = gone.movedim(d, 0).reshape(gone.shape[d], -1)
        kept_per_dim.append((~rows.all(dim=1)).nonzero().view(-1))
    expect = torch.ones(gone.shape, dtype=torch.bool)
    for d, kept in enumerate(kept_per_dim):
        mask = torch.zeros(gone.shape[d], dtype=torch.bool)
        mask[kept] = True
        expect &= mask.view([-1 if i == d else 1 for i in range(gone.dim())])
    if not torch.equal(expect, ~gone):
        raise SlimError(f"tensor {name} of shape {tuple(gone.shape)} cannot lose the removed "
                        f"channels and stay rectangular")
    new = tensor.detach()
    for d, kept in enumerate(kept_per_dim):
        if len(kept) != gone.shape[d]:
            new = new.index_select(d, kept)
    new = new.clone()
    if isinstance(tensor, nn.Parameter):
        setattr(owner, attr, nn.Parameter(new, requires_grad=tensor.requires_grad))
    else:
        owner._buffers[attr] = new


def _attach_record(model, slim_model, graph, keep) -> None:
    """What :func:`nasprune.save` needs to rebuild this architecture: plain JSON-able data."""
    previous = getattr(model, "nasprune_slim", None)
    step = {
        "inputs": [[list(shape), str(dtype).replace("torch.", "")] for shape, dtype in graph.input_spec],
        "exclude": list(graph.exclude),
        "leaf_modules": list(graph.leaf_modules),
        "mode": graph.mode,
        "fingerprint": graph.fingerprint,
        "keep": {str(g): idx.tolist() for g, idx in sorted(keep.items())},
    }
    base = previous["base_class"] if previous else f"{type(model).__module__}.{type(model).__qualname__}"
    steps = (previous["steps"] if previous else []) + [step]
    slim_model.nasprune_slim = {"base_class": base, "steps": steps}


def check_runs(model: nn.Module, graph) -> None:
    """Replay the traced graph on ``model`` with data-less tensors shaped like the traced
    inputs: every op must accept the slimmed shapes and the outputs keep theirs."""
    from torch import fx
    from nasprune.handlers import handler_for
    inputs = [torch.zeros(shape, dtype=dtype) for shape, dtype in graph.input_spec]
    with preserved_state(model):
        model.eval()
        try:
            replay = fx.GraphModule(model, graph.fx_graph)
            _, got = record_shapes(replay, inputs, handler_for)
        except Exception as exc:
            raise SlimError(f"the slimmed {type(model).__name__} fails to run: {type(exc).__name__}: "
                            f"{exc}. A layer or op the analysis does not know may hold a fixed "
                            f"channel count; exclude it or report it.") from exc
    if _shapes(got) != _shapes(graph.output_info):
        raise SlimError(f"the slimmed {type(model).__name__} returns shapes {_shapes(got)} instead of "
                        f"{_shapes(graph.output_info)}")


def _shapes(info):
    if hasattr(info, "shape") and hasattr(info, "dtype"):
        return tuple(info.shape)
    if isinstance(info, (list, tuple)):
        return tuple(_shapes(i) for i in info)
    if isinstance(info, dict):
        return {k: _shapes(v) for k, v in info.items()}
    return None
