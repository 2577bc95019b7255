"""Per-layer-type pruning handlers and their registry (in the spirit of Torch-Pruning).

A handler says, for one layer type, three things: how the layer's channels relate to the
channels flowing in and out (``trace``), how to cut its parameters and fix its attributes
(``slim``) and how to zero them for the masked reference (``mask``), and what it costs
(``macs``). Roles name the layer's channel dimensions: ``"out"`` (channels it creates),
``"in"`` (channels it consumes) and ``"channel"`` (channels it passes through, e.g. BatchNorm).
Supporting a new layer type is one small subclass decorated with :func:`register`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ModuleCall:
    """One call of a leaf module in the traced graph, as a handler sees it."""
    name: str
    module: nn.Module
    fields: list            # per positional argument: its channel field (tensor) or None
    infos: list             # per positional argument: its TensorInfo or recorded value
    out: object             # TensorInfo (or structure of them) of the output
    kwfields: dict = field(default_factory=dict)


class LayerHandler:
    types: tuple = ()
    # roles this layer type can report, mapped to the (parameter, dim) that carries them
    roles: dict = {}
    # True when only the exact types are meant, not subclasses that keep the base forward
    exact: bool = False
    # True when the output always has the input's shape (lets shape recording skip the layer)
    keeps_shape: bool = False
    # True for layers the MAC count includes (convolutions and fully connected layers)
    counts: bool = False

    def trace(self, ctx, call: ModuleCall):
        raise NotImplementedError

    def slim(self, module: nn.Module, keep: dict) -> None:
        """Cut ``module`` in place; ``keep[role]`` is a sorted LongTensor of kept positions."""

    def mask(self, module: nn.Module, removed: dict) -> nn.Module | None:
        """Zero removed channels in place (``removed[role]`` is a bool tensor over positions).

        Return a replacement module when zeroing alone cannot reproduce the slimmed layer.
        """
        for role, gone in removed.items():
            tensor_dims = self.roles.get(role, ())
            for name, dim in tensor_dims:
                _zero_slices(module, name, dim, gone)
        return None

    def macs(self, module: nn.Module, in_width, out_width, in_shape, out_shape):
        """Multiply-accumulates per sample (TAS convention); widths may be tensors."""
        return 0

    def counted_module(self, module: nn.Module) -> nn.Module:
        """The module whose attributes (``in_channels``, ``out_channels``, ``kernel_size``,
        ``groups``) and own parameters a cost table shows for this layer: the layer itself,
        or the one it wraps (a fused conv-BN layer shows its conv)."""
        return module

    def primary(self, module: nn.Module, role: str) -> tuple[str, int]:
        dims = self.roles.get(role) or (("weight", 0),)
        for name, dim in dims:
            if get_tensor(module, name) is not None:
                return name, dim
        return dims[0]


_BY_TYPE: dict[type, LayerHandler] = {}


def register(cls):
    """Class decorator: make ``cls`` the handler of every type in ``cls.types``."""
    handler = cls()
    for t in cls.types:
        _BY_TYPE[t] = handler
    return cls


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of ``module``'s type, or of a registered base class whose forward it keeps."""
    t = type(module)
    handler = _BY_TYPE.get(t)
    if handler is not None:
        return handler
    for base in t.__mro__[1:]:
        handler = _BY_TYPE.get(base)
        if handler is not None and not handler.exact and t.forward is base.forward:
            return handler
    return None


# ------------------------------------------------------------------ tensor helpers
# Tensor names may be dotted paths into submodules ("bn.weight"), for layers built of others.
def _locate(module: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """The module holding tensor ``name`` and the tensor's attribute name there."""
    path, _, attr = name.rpartition(".")
    try:
        return module.get_submodule(path), attr
    except AttributeError:
        return None, attr


def get_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    owner, attr = _locate(module, name)
    return getattr(owner, attr, None) if owner is not None else None


def _replace(module: nn.Module, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    owner, attr = _locate(module, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = new


def slice_tensor(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` by its ``index`` slice along ``dim``."""
    old = get_tensor(module, name)
    if old is None:
        return
    _replace(module, name, old, old.detach().index_select(dim, index.to(old.device)))


def slice_dims(module: nn.Module, name: str, index_by_dim: dict) -> None:
    """Like :func:`slice_tensor` over several dims at once: one gather, no intermediate copy."""
    old = get_tensor(module, name)
    index_by_dim = {d: i for d, i in index_by_dim.items() if i is not None}
    if old is None or not index_by_dim:
        return
    if len(index_by_dim) == 1:
        (dim, index), = index_by_dim.items()
        slice_tensor(module, name, dim, index)
        return
    last = max(index_by_dim)
    index = []
    for d in range(last + 1):
        i = index_by_dim.get(d)
        if i is None:
            index.append(slice(None))
        else:
            shape = [1] * (len(index_by_dim))
            shape[sorted(index_by_dim).index(d)] = -1
            index.append(i.to(old.device).view(shape))
    if any(isinstance(i, slice) for i in index):  # advanced indices must be adjacent: fall back
        for dim, i in index_by_dim.items():
            slice_tensor(module, name, dim, i)
        return
    _replace(module, name, old, old.detach()[tuple(index)])


def _zero_slices(module: nn.Module, name: str, dim: int, removed: torch.Tensor) -> None:
    t = get_tensor(module, name)
    if t is None or not bool(removed.any()):
        return
    idx = removed.nonzero().view(-1).to(t.device)
    with torch.no_grad():
        t.index_fill_(dim, idx, 0)


def prod(values) -> int:
    return int(math.prod(values))
