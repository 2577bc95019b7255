"""MACs and parameters, in the convention TAS and its successors publish.

One multiply-accumulate counts as one FLOP and only convolutions and fully connected layers
count (BatchNorm, activations, pooling and additions do not): a conv costs
``k_h * k_w * C_in / groups * C_out * H_out * W_out`` plus ``H_out * W_out`` when it has a
bias, a fully connected layer ``C_in * C_out`` per position. Figures are per input sample.

- :func:`count` / :func:`table`: any model (original or slimmed), by running it once on
  data-less tensors with hooks on its layers.
- :class:`CostModel`: from a channel graph; the exact cost of a keep set without building the
  model, and the *expected* cost of a soft-gated model as a differentiable tensor of the
  expected number of kept channels per group (for search losses).

The per-layer formulas live in the layer handlers (``nasprune.handlers``); both paths
use them, so there is one cost model.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nasprune.graph.tracer import preserved_state, run_shapes_only
from nasprune.handlers import handler_for


@dataclass
class LayerCost:
    name: str
    layer_type: str
    in_channels: int
    out_channels: int
    kernel: tuple
    groups: int
    output_size: tuple   # spatial size (or sequence length) of the output
    macs: int
    params: int
    calls: int = 1


class CostTable(list):
    """Rows of :class:`LayerCost`; ``total`` MACs, ``params``, and a printable table."""

    @property
    def total(self) -> int:
        return sum(r.macs for r in self)

    @property
    def params(self) -> int:
        return sum(r.params for r in self)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self] + [5])
        lines = [f"{'layer':<{width}}  {'type':<16} {'in->out':>11} {'kernel':>9} {'groups':>6} "
                 f"{'output':>11} {'MMACs':>10} {'params':>10}"]
        for r in self:
            kernel = "x".join(map(str, r.kernel)) if r.kernel else "-"
            out = "x".join(map(str, r.output_size)) if r.output_size else "-"
            calls = f" (x{r.calls})" if r.calls > 1 else ""
            lines.append(f"{r.name:<{width}}  {r.layer_type:<16} {f'{r.in_channels}->{r.out_channels}':>11} "
                         f"{kernel:>9} {r.groups:>6} {out:>11} {r.macs / 1e6:>10.3f} {r.params:>10,d}{calls}")
        lines.append(f"{'total':<{width}}  {'':<16} {'':>11} {'':>9} {'':>6} {'':>11} "
                     f"{self.total / 1e6:>10.3f} {self.params:>10,d}")
        return "\n".join(lines)


def _widths(m: nn.Module) -> tuple[int, int]:
    for a, b in (("in_channels", "out_channels"), ("in_features", "out_features"), ("embed_dim", "embed_dim")):
        if hasattr(m, a):
            return getattr(m, a), getattr(m, b)
    raise TypeError(f"no channel widths known for {type(m).__name__}")


def _spatial(m: nn.Module, out_shape) -> tuple:
    if hasattr(m, "kernel_size"):
        batched = len(out_shape) == len(m.kernel_size) + 2
        return tuple(out_shape[2:] if batched else out_shape[1:])
    return tuple(out_shape[1:-1])


def table(model: nn.Module, example_inputs) -> CostTable:
    """Per-layer MACs and parameters of ``model`` on inputs shaped like ``example_inputs``."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    rows: dict[str, LayerCost] = {}
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def hook(module, args, output):
        handler = handler_for(module)
        out = output[0] if isinstance(output, (tuple, list)) else output
        shown = handler.counted_module(module)
        cin, cout = _widths(shown)
        macs = int(handler.macs(module, cin, cout, tuple(args[0].shape), tuple(out.shape)))
        name = names[id(module)]
        if name in rows:
            rows[name].macs += macs
            rows[name].calls += 1
            return
        params = sum(p.numel() for p in shown.parameters(recurse=False))
        rows[name] = LayerCost(name, type(module).__name__, cin, cout, tuple(getattr(shown, "kernel_size", ())),
                               getattr(shown, "groups", 1), _spatial(shown, tuple(out.shape)), macs, params)

    def run(*args):
        rows.clear()  # a shapes-only attempt that failed half way must not count twice
        return model(*args)

    for m in model.modules():
        handler = handler_for(m)
        if handler is not None and handler.counts:
            hooks.append(m.register_forward_hook(hook))
    try:
        with preserved_state(model):
            model.eval()
            run_shapes_only(model, run, inputs)
    finally:
        for h in hooks:
            h.remove()
    return CostTable(rows.values())


def count(model: nn.Module, example_inputs) -> int:
    """Total MACs per sample (TAS convention) of ``model`` on ``example_inputs``' shapes."""
    return table(model, example_inputs).total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class CostModel:
    """MACs of a traced model as a function of the channels each group keeps.

    ``exact(keep)`` is the cost of ``slim.apply(model, graph, keep)`` without building it.
    Costs are those of inference: layers that run only in training mode are left out.
    ``expected(kept)`` takes, per group index, a (differentiable) expected number of kept
    channels and returns the expected MACs as a tensor: each layer costs its formula at the
    expected widths of its input and output (TAS's expected cost). A layer holding part of a
    group's channels is assumed to keep the same fraction. ``layer_weights`` scales layers,
    e.g. by the probability that a searched depth executes them.
    """

    def __init__(self, graph):
        self.graph = graph
        self.sizes = torch.tensor([g.size for g in graph.groups], dtype=torch.float64)
        self.layers = []  # (name, handler, in_shape, out_shape, in_classes, out_classes)
        n_groups = len(graph.groups)
        base, counts = [], []
        for name, in_shape, out_shape in graph.calls:
            handler = handler_for(graph.modules[name])
            if handler is None or not handler.counts or in_shape is None:
                continue
            if graph.eval_layers and name not in graph.eval_layers:
                continue  # training-only layers (auxiliary heads) cost nothing at inference
            record = graph.records.get(name)
            roles = record[1] if record else {}
            self.layers.append((name, handler, in_shape, out_shape, roles.get("in"), roles.get("out")))
            for classes in (roles.get("in"), roles.get("out")):
                b, c = 0, np.zeros(n_groups)
                if classes is not None:
                    gids = graph.class_group[classes]
                    b = int((gids < 0).sum())
                    c = np.bincount(gids[gids >= 0], minlength=n_groups).astype(np.float64)
                base.append(b)
                counts.append(c)
        self.names = [layer[0] for layer in self.layers]
        self._base = torch.tensor(base, dtype=torch.float64).view(-1, 2)
        self._counts = torch.tensor(np.array(counts), dtype=torch.float64).view(len(self.layers), 2, n_groups) \
            if self.layers else torch.zeros(0, 2, n_groups, dtype=torch.float64)
        self._modules = {name: graph.modules[name] for name in self.names}

    def _layer_macs(self, i, win, wout):
        name, handler, in_shape, out_shape, cin, cout = self.layers[i]
        module = self._modules[name]
        if cin is None or cout is None:  # a layer kept whole (attention): its own widths
            win, wout = _widths(handler.counted_module(module))
        return handler.macs(module, win, wout, in_shape, out_shape)

    def total(self) -> int:
        return self.exact({})

    def widths(self, keep) -> list[tuple[int, int]]:
        """Kept (input, output) width of every counted layer under ``keep``."""
        from nasprune.handlers.keep import normalise, removed_classes
        removed = removed_classes(self.graph, normalise(self.graph, keep))
        out = []
        for _, _, _, _, cin, cout in self.layers:
            win = int((~removed[cin]).sum()) if cin is not None else None
            wout = int((~removed[cout]).sum()) if cout is not None else None
            out.append((win, wout))
        return out

    def exact(self, keep) -> int:
        return int(sum(int(self._layer_macs(i, win, wout)) for i, (win, wout) in enumerate(self.widths(keep))))

    def expected_widths(self, kept) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected (input, output) widths of every counted layer, as tensors of shape (L,)."""
        frac = self._fractions(kept)
        w = self._base.to(frac.dtype) + torch.einsum("lrg,g->lr", self._counts.to(frac.dtype), frac)
        return w[:, 0], w[:, 1]

    def _fractions(self, kept) -> torch.Tensor:
        n = len(self.sizes)
        if isinstance(kept, torch.Tensor) and kept.dim() == 1:
            if kept.numel() != n:
                raise ValueError(f"kept has {kept.numel()} entries, the graph has {n} groups")
            values = kept
        else:
            if not isinstance(kept, Mapping):
                raise TypeError("kept must map group index -> expected kept channels, or be a tensor per group")
            bad = [k for k in kept if not 0 <= int(k) < n]
            if bad:
                raise ValueError(f"kept has group index {bad[0]} outside 0..{n - 1}")
            like = next((v for v in kept.values() if isinstance(v, torch.Tensor)), None)
            dtype = like.dtype if like is not None and like.is_floating_point() else torch.float64
            values = torch.stack([torch.as_tensor(kept[g], dtype=dtype) if g in kept
                                  else self.sizes[g].to(dtype) for g in range(n)])
        return values / self.sizes.to(values.dtype)

    def expected(self, kept, layer_weights: Mapping | None = None) -> torch.Tensor:
        """Expected MACs (a differentiable scalar tensor) for expected kept channels per group."""
        win, wout = self.expected_widths(kept)
        total = win.new_zeros(())
        for i, name in enumerate(self.names):
            macs = self._layer_macs(i, win[i], wout[i])
            if layer_weights is not None and name in layer_weights:
                macs = macs * layer_weights[name]
            total = total + macs
        return total

    def table(self, keep=None) -> CostTable:
        rows = CostTable()
        for i, (win, wout) in enumerate(self.widths(keep or {})):
            name, handler, in_shape, out_shape, _, _ = self.layers[i]
            m = self._modules[name]
            shown = handler.counted_module(m)
            if win is None or wout is None:
                win, wout = _widths(shown)
            rows.append(LayerCost(name, type(m).__name__, win, wout, tuple(getattr(shown, "kernel_size", ())),
                                  getattr(shown, "groups", 1), _spatial(shown, out_shape),
                                  int(self._layer_macs(i, win, wout)), 0))
        return rows
