"""Channel-field helpers that op rules and layer handlers share (see nasprune.graph.context).

A *field* is an int64 tensor of channel atom ids laid out like the activation it describes;
``ctx`` is the trace context (:class:`nasprune.graph.context.TraceContext`) passed in by the
analysis. These helpers sit below both the graph and the handlers, so neither imports the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a tensor seen while recording (not a tuple, so never confused
    with a tuple of outputs)."""
    shape: tuple
    dtype: torch.dtype


def constant_like(ctx, out, reason: str):
    """Blocked constant fields shaped like the output structure ``out``."""
    if isinstance(out, TensorInfo):
        return ctx.constant(len(out.shape), reason)
    if isinstance(out, (list, tuple)):
        return type(out)(constant_like(ctx, o, reason) for o in out) if not hasattr(out, "_fields") \
            else tuple(constant_like(ctx, o, reason) for o in out)
    if isinstance(out, dict):
        return {k: constant_like(ctx, v, reason) for k, v in out.items()}
    return None


def spatial_field(ctx, field, in_info: TensorInfo, out_info, n_spatial: int, where: str):
    """Op that works within each channel over the last ``n_spatial`` dims (pooling, resize)."""
    nd = len(in_info.shape)
    lead = nd - n_spatial
    if any(d >= lead for d in ctx.varying(field)):
        reason = f"channels vary along spatial dims at {where}"
        ctx.block_field(field, reason)
        ctx.notes.append((where, reason))
        return ctx.constant(len(out_info.shape), reason)
    out_nd = len(out_info.shape)
    return field.reshape(tuple(field.shape[:lead]) + (1,) * (out_nd - lead))


def mixing_field(ctx, field, dim: int, nd: int, where: str):
    """Op that mixes values along ``dim`` (softmax): fine unless ``dim`` carries channels."""
    if dim % nd in ctx.varying(field):
        reason = f"op mixes channels at {where}"
        ctx.block_field(field, reason)
        ctx.notes.append((where, reason))
    return field


def tie_literal(ctx, out: torch.Tensor, literal: set, where: str) -> torch.Tensor:
    """After a reshape: a dimension of fixed size cannot shrink, so channels spread along it
    (the groups of a channel shuffle) must be removed from every slice at once."""
    varying = ctx.varying(out)
    fixed = [d for d in varying if d in literal]
    free = [d for d in varying if d not in literal]
    if fixed and not free:
        reason = f"reshape to a fixed channel count at {where}"
        ctx.block_field(out, reason)
        ctx.notes.append((where, reason))
        return out
    if fixed:
        moved = out.movedim(fixed, list(range(len(fixed))))
        rows = moved.reshape(math.prod(out.shape[d] for d in fixed), -1)
        ctx.unify(rows[:1], rows[1:])
        out = ctx.compact(out)
    if len(ctx.varying(out)) > 1:
        reason = f"reshape splits channels over several dims at {where}"
        ctx.block_field(out, reason)
        ctx.notes.append((where, reason))
    return out


def _dim_groups(a, b):
    """Pair up runs of dims of shapes ``a`` and ``b`` with equal element counts."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj, pa, pb = [], [], 1, 1
        if i < len(a):
            gi.append(i); pa *= a[i]; i += 1  # noqa: E702
        if j < len(b):
            gj.append(j); pb *= b[j]; j += 1  # noqa: E702
        while pa != pb:
            if (pa < pb and i < len(a)) or j >= len(b):
                gi.append(i); pa *= a[i]; i += 1  # noqa: E702
            else:
                gj.append(j); pb *= b[j]; j += 1  # noqa: E702
        groups.append((gi, gj))
    return groups


def reshape_field(field: torch.Tensor, in_shape, out_shape) -> torch.Tensor:
    """The field of ``x.reshape(out_shape)``, materialising only the dims whose channels move."""
    if 0 in in_shape or 0 in out_shape or field.dim() != len(in_shape):
        return field.expand(in_shape).reshape(out_shape)
    expand, target = list(field.shape), []
    for gi, gj in _dim_groups(tuple(in_shape), tuple(out_shape)):
        if any(field.shape[d] > 1 for d in gi):
            for d in gi:
                expand[d] = in_shape[d]
            target.extend(out_shape[d] for d in gj)
        else:
            target.extend(1 for _ in gj)
    return field.expand(expand).reshape(target)


def channel_shuffle_field(ctx, field, info, groups, where):
    """Shuffle: position j of every group is tied (like a chunk), then interleaved."""
    atoms = ctx.channels(field, info.shape, 1, where)
    ctx.tie(atoms, groups)
    shuffled = atoms.reshape(groups, -1).T.reshape(-1)
    return ctx.compact(ctx.along(ctx.atoms.find(shuffled), 1, len(info.shape)))
