"""What layer handlers and op rules see while the channel analysis walks the graph.

A *field* is an int64 tensor of atom ids laid out like the activation it describes, kept
compact: a dimension along which all ids are equal has size 1 (a conv output's field is
``(1, C, 1, 1)``). Shape-moving ops are applied to fields with the very same torch call, so
view/permute/cat/index semantics never have to be re-implemented.
"""
from __future__ import annotations

import numpy as np
import torch

from nasprune.graph.atoms import AtomTable



class TraceContext:
    def __init__(self) -> None:
        self.atoms = AtomTable()
        # module name -> role -> atoms of the module's positions along that role's dimension
        self.records: dict[str, dict[str, np.ndarray]] = {}
        self.record_handlers: dict[str, object] = {}
        # (module name, role, atoms) of every dimension that creates channels
        self.producers: list[tuple[str, str, np.ndarray]] = []
        self._produced: dict[tuple[str, str], np.ndarray] = {}
        self.notes: list[tuple[str, str]] = []  # (where, what) for the summary: opaque ops, blocks

    # ----------------------------------------------------------------- fields
    def roots(self, field: torch.Tensor) -> torch.Tensor:
        flat = field.reshape(-1).numpy()
        return torch.from_numpy(self.atoms.find(flat)).view(field.shape)

    def compact(self, field: torch.Tensor) -> torch.Tensor:
        """Roots, with every dimension along which the class does not change shrunk to 1."""
        f = field
        for d in range(f.dim()):
            if f.shape[d] > 1 and f.stride(d) == 0:
                f = f.narrow(d, 0, 1)
        f = self.roots(f)
        for d in range(f.dim()):
            if f.shape[d] > 1 and bool((f == f.narrow(d, 0, 1)).all()):
                f = f.narrow(d, 0, 1)
        return f.contiguous()

    def constant(self, ndim: int, reason: str) -> torch.Tensor:
        atom = self.atoms.new(1, blocked=reason)
        return torch.from_numpy(atom).view((1,) * ndim)

    @staticmethod
    def along(atoms: np.ndarray, dim: int, ndim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[dim] = len(atoms)
        return torch.from_numpy(np.ascontiguousarray(atoms, dtype=np.int64)).view(shape)

    @staticmethod
    def varying(field: torch.Tensor) -> list[int]:
        return [d for d, s in enumerate(field.shape) if s > 1]

    def block_field(self, field: torch.Tensor, reason: str) -> None:
        self.atoms.block(field.reshape(-1).numpy(), reason)

    def unify(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Channels at equal positions of ``a`` and ``b`` must go together. A blocked constant
        (the output of an op that cannot shrink) blocks the other side instead of merging all
        of its channels into one class."""
        for const, other in ((a, b), (b, a)):
            if const.numel() == 1 and other.numel() > 1:
                atom = const.reshape(-1).numpy()
                if self.atoms.blocked(atom)[0]:
                    self.atoms.block(other.reshape(-1).numpy(), self.atoms.reason(int(atom[0])) or "blocked")
                    return
        a, b = torch.broadcast_tensors(a, b)
        self.atoms.union(a.reshape(-1).numpy(), b.reshape(-1).numpy())

    def channels(self, field: torch.Tensor, shape: tuple, dim: int, where: str) -> np.ndarray:
        """The class of every index along ``dim``: what a layer's channel positions carry.

        A slice holding several classes means channels were mixed by something that is not a
        layer (a reduction over channels, an odd reshape); such classes are blocked.
        """
        dim = dim % len(shape)
        f = self.roots(field.expand(shape) if field.shape[dim] == 1 else field)
        if f.shape[dim] == 1:
            f = f.expand(*[shape[d] if d == dim else f.shape[d] for d in range(f.dim())])
        rows = f.movedim(dim, 0).reshape(shape[dim], -1)
        first = rows[:, :1]
        mixed = (rows != first).any(dim=1)
        if bool(mixed.any()):
            self.atoms.block(rows[mixed].reshape(-1).numpy(), f"channels mixed before {where}")
            self.notes.append((where, "input channels mixed by an unsupported op: blocked"))
        return first.reshape(-1).numpy().copy()

    def tie(self, atoms: np.ndarray, blocks: int) -> None:
        """Unite position j of every one of ``blocks`` equal blocks (stripes of a grouped op)."""
        if blocks <= 1:
            return
        rows = np.asarray(atoms).reshape(blocks, -1)
        self.atoms.union(rows[:1], rows[1:])

    # --------------------------------------------------------------- records
    def producer(self, module: str, role: str, n: int) -> np.ndarray:
        """Fresh channels a module creates; the same ones again when the module is called again."""
        key = (module, role)
        if key not in self._produced:
            atoms = self.atoms.new(n)
            self._produced[key] = atoms
            self.producers.append((module, role, atoms))
        return self._produced[key]

    def record(self, module: str, handler, role: str, atoms: np.ndarray) -> None:
        """Remember which channel atoms sit at each position of a module's dimension."""
        roles = self.records.setdefault(module, {})
        self.record_handlers[module] = handler
        if role in roles:
            if len(roles[role]) != len(atoms):
                raise RuntimeError(f"module {module!r} called with {len(atoms)} {role} channels, "
                                   f"earlier with {len(roles[role])}")
            self.atoms.union(roles[role], atoms)  # a shared module must shrink the same way
        else:
            roles[role] = np.asarray(atoms, dtype=np.int64).copy()
