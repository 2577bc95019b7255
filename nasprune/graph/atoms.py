"""Channel atoms: one integer id per channel-like element, merged with union-find.

Every channel a layer produces gets a fresh atom. Ops that force two channels to be removed
together (a residual add, a tied stripe of a grouped conv) unite their atoms; the classes that
remain are the units of pruning. A class can be *blocked* (an op that cannot shrink, a model
output): blocking never merges classes, it only marks them, so unrelated blocked channels do not
collapse into one giant group.
"""
from __future__ import annotations

import numpy as np


class AtomTable:
    def __init__(self) -> None:
        self._parent = np.zeros(1024, dtype=np.int64)
        self._blocked = np.zeros(1024, dtype=bool)
        self._n = 0
        self._reason: dict[int, str] = {}  # root id -> why the class is blocked

    def __len__(self) -> int:
        return self._n

    def new(self, n: int, blocked: str | None = None) -> np.ndarray:
        """Allocate ``n`` fresh atoms; ``blocked`` gives them a reason never to be removed."""
        start = self._n
        end = start + n
        if end > self._parent.size:
            size = max(end, 2 * self._parent.size)
            self._parent = np.concatenate([self._parent, np.zeros(size - self._parent.size, np.int64)])
            self._blocked = np.concatenate([self._blocked, np.zeros(size - self._blocked.size, bool)])
        ids = np.arange(start, end, dtype=np.int64)
        self._parent[start:end] = ids
        self._blocked[start:end] = blocked is not None
        if blocked is not None:
            for i in range(start, end):
                self._reason[i] = blocked
        self._n = end
        return ids

    def find(self, ids) -> np.ndarray:
        """Class representative of each id (vectorised pointer jumping, with compression)."""
        ids = np.asarray(ids, dtype=np.int64)
        parent = self._parent
        roots = parent[ids]
        while True:
            nxt = parent[roots]
            if np.array_equal(nxt, roots):
                break
            roots = nxt
        parent[ids] = roots
        return roots

    def _find_one(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def union(self, a, b) -> None:
        """Unite a[k] with b[k] for every k (arrays broadcast against each other)."""
        a, b = np.broadcast_arrays(np.asarray(a, np.int64), np.asarray(b, np.int64))
        ra, rb = self.find(a.ravel()), self.find(b.ravel())
        differ = ra != rb
        if not differ.any():
            return
        pairs = np.unique(np.stack([ra[differ], rb[differ]], axis=1), axis=0)
        for x, y in pairs.tolist():
            x, y = self._find_one(x), self._find_one(y)
            if x == y:
                continue
            root, child = (x, y) if x < y else (y, x)  # the oldest atom stays root: deterministic
            self._parent[child] = root
            if self._blocked[child] and not self._blocked[root]:
                self._blocked[root] = True
                self._reason[root] = self._reason.get(child, "blocked")

    def block(self, ids, reason: str) -> None:
        roots = np.unique(self.find(np.asarray(ids, np.int64).ravel()))
        fresh = roots[~self._blocked[roots]]
        self._blocked[fresh] = True
        for r in fresh.tolist():
            self._reason[r] = reason

    def blocked(self, ids) -> np.ndarray:
        return self._blocked[self.find(ids)]

    def reason(self, atom: int) -> str | None:
        root = int(self.find(np.array([atom]))[0])
        return self._reason.get(root) if self._blocked[root] else None
