"""The result of channel analysis: channel groups, their members, and a printable summary."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch


class IndexMap(NamedTuple):
    """Which group channels a member holds, and where: ``positions[i]`` are the member's
    indices along ``dim`` that carry group channel ``channels[i]`` (several for a channel
    repeated over space after a flatten, or a stripe of a grouped layer)."""
    channels: torch.Tensor   # (k,) sorted group channel indices
    positions: torch.Tensor  # (k, r) member positions, -1 padded when counts differ


@dataclass
class Member:
    module: str      # qualified module name (or parameter name for a tensor used directly)
    layer_type: str  # class name of the module, or "Parameter"
    role: str        # "out" (creates the channels), "in" (consumes), "channel" (passes through), "param"
    tensor: str      # the parameter that carries the dimension, e.g. "weight"
    dim: int         # the dimension of that tensor
    index_map: IndexMap

    def __repr__(self) -> str:
        k, r = self.index_map.positions.shape
        rep = f"x{r}" if r > 1 else ""
        return f"{self.module}.{self.tensor}[dim {self.dim}] {self.role} ({self.layer_type}, {k}{rep})"


@dataclass
class ChannelGroup:
    index: int
    size: int
    members: list[Member]
    prunable: bool
    reason: str | None = None          # why the group cannot be pruned
    _classes: np.ndarray = field(default=None, repr=False)  # class atom of each group channel

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"fixed: {self.reason}"
        return f"ChannelGroup(#{self.index}, size={self.size}, {len(self.members)} members, {state})"

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "out"]


@dataclass
class ChannelGraph:
    """Channel groups of a model, plus what slimming and cost models need to use them."""
    model_class: str
    groups: list[ChannelGroup]
    leaves: dict            # auto leaf module name -> why fx could not trace it
    notes: list             # (where, what): unsupported ops and blocked channels
    input_spec: list        # [(shape, dtype)] of the example inputs
    output_info: object     # TensorInfo structure of the outputs
    exclude: list           # user-excluded module names
    mode: str
    leaf_modules: list = field(default_factory=list)  # user-given leaf module names
    fx_graph: object = field(repr=False, default=None)  # the traced torch.fx graph
    modules: dict = field(repr=False, default_factory=dict)  # traced layer name -> module
    eval_layers: set = field(repr=False, default_factory=set)  # leaf layers run in eval mode
    # internals used by slim / flops
    records: dict = field(repr=False, default_factory=dict)   # module -> (handler, {role: classes})
    params: dict = field(repr=False, default_factory=dict)    # parameter name -> class field
    calls: list = field(repr=False, default_factory=list)     # (module, in_shape, out_shape) per leaf call
    class_group: np.ndarray = field(repr=False, default=None)  # atom -> group index or -1
    class_channel: np.ndarray = field(repr=False, default=None)  # atom -> channel index in its group

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, module: str, role: str = "out") -> list[ChannelGroup]:
        """Groups holding channels of ``module``'s ``role`` dimension."""
        if module not in self.records:
            raise KeyError(f"{module!r} is not a traced layer; layers: {', '.join(list(self.records)[:8])}, ...")
        classes = self.records[module][1].get(role)
        if classes is None:
            raise KeyError(f"{module!r} has no {role!r} dimension; it has {sorted(self.records[module][1])}")
        ids = sorted({int(g) for g in self.class_group[classes] if g >= 0})
        return [self.groups[i] for i in ids]

    @property
    def fingerprint(self) -> str:
        """Hash of the group structure: equal for two traces that give the same groups."""
        h = hashlib.sha256()
        for g in self.groups:
            h.update(f"{g.size}|".encode())
            for m in g.members:
                h.update(f"{m.module},{m.role},{m.tensor},{m.dim},{tuple(m.index_map.positions.shape)};".encode())
        return h.hexdigest()

    def summary(self, max_members: int = 6) -> str:
        lines = [f"{self.model_class}: {len(self.groups)} channel groups, "
                 f"{len(self.prunable_groups)} prunable, "
                 f"{sum(g.size for g in self.prunable_groups)} prunable channels"]
        for g in self.groups:
            state = "prunable" if g.prunable else f"fixed ({g.reason})"
            lines.append(f"  #{g.index:<4d} size {g.size:<5d} {state}")
            for m in g.members[:max_members]:
                lines.append(f"        {m!r}")
            if len(g.members) > max_members:
                lines.append(f"        ... {len(g.members) - max_members} more members")
        if self.leaves:
            lines.append("modules fx could not trace (kept whole, their channels fixed):")
            lines.extend(f"  {name}: {why}" for name, why in self.leaves.items())
        if self.notes:
            lines.append("ops that fix channels:")
            seen = set()
            for where, what in self.notes:
                if (where, what) not in seen:
                    seen.add((where, what))
                    lines.append(f"  {where}: {what}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
