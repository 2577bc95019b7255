"""The base of every method that searches through the gated network's gates (DAIS, PaS, FFP, AST).

A method is a small file on it: its gate parameterisation (``gate_kind``), its losses, its step
and its schedule. What they share is here, written once: the gated network built on a copy of the
user's model (``gn``), the weights' parameter list, the budget arguments, the searcher's own
generator state (a resumed search replays dropout), the keep rule (the gates' threshold keep when
its MACs land in the method's band, else the largest set by gate ranking that fits the budget),
the export, the keep-based architecture record, the per-layer widths and the checkpoint state.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from nasprune import flops
from nasprune.graph import trace
from nasprune.graph.untie import tied_keep
from nasprune.graph.untie import untie as untie_model
from nasprune.nn.gates import GateParam
from nasprune.search.base import Searcher, keep_architecture
from nasprune.search.gated import GatedNetwork
from nasprune.train import seeded


class _FixedValues(GateParam):
    """Gate values given outright (the raw parameter ignored): to read a keep rule off other
    values than the method's, or to run the gated network at chosen gates."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values

    def forward(self, raw):
        return self.values.to(device=raw.device, dtype=raw.dtype)


@contextmanager
def gates_as(gn: GatedNetwork, values: torch.Tensor):
    """Run ``gn`` (its forward, keep rules, export) with the gate values ``values`` (num_gates,)
    instead of its parameterisation's, restoring it afterwards."""
    saved = gn.gate_fn
    gn.gate_fn = _FixedValues(values)
    try:
        yield gn
    finally:
        gn.gate_fn = saved


class GatedSearcher(Searcher):
    """Shared set-up and discretisation of the gate-based methods.

    A subclass sets ``method`` and ``gate_kind`` (the GatedNetwork parameterisation), calls
    ``super().__init__`` with the common arguments, adds its optimisers to ``self.optimizers``
    (name -> optimiser, saved in checkpoints under that name), its settings to ``self.config``,
    and implements ``step`` (inside ``self._own_rng()``) and ``epoch_metrics``. It may override
    ``in_band`` (where the threshold keep's MACs must land), ``export`` and ``architecture_extra``.

    model: the unpruned model (copied; its weights start the search). example_inputs: a tensor
        (batch 1 or 2) for tracing, or ``input_size`` (side of a square image) and ``in_channels``;
        the MACs depend on it. flops_target: fraction of the model's MACs to keep, in (0, 1].
    flops_tolerance: the width of the band the threshold keep's MACs must land in (fraction of
        the model's MACs). gate_init: every raw gate value at the start. round_to: the keep rules
        round every kept width down to a multiple of it (never below one multiple), at every
        layer of a group (:meth:`GatedNetwork.keep`): widths in multiples of 8 run faster on CPUs
        and GPUs than odd ones at the same MACs.
    untie: search :func:`nasprune.graph.untie` of the model (every residual shortcut through a
        channel selection, so each block's output is a group with widths and gates of its own;
        PaS's ``placement="untied"``). The export is then that untied network slimmed, and
        ``architecture()`` adds ``tied_macs``: the model's own class holding the same channels.
    """

    gate_kind = "continuous"
    threshold = 0.5          # the gate value above which the threshold keep keeps a channel

    def __init__(self, model: nn.Module, flops_target: float, *, example_inputs, input_size: int, in_channels: int,
                 flops_tolerance: float, gate_init: float, device, seed: int, round_to: int = 1,
                 untie: bool = False):
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to is a channel multiple, an int >= 1; got {round_to!r}")
        if not 0 < flops_target <= 1:
            raise ValueError(f"flops_target is the fraction of MACs kept, in (0, 1]; got {flops_target}")
        if not flops_tolerance > 0:
            raise ValueError(f"flops_tolerance must be positive, got {flops_tolerance}")
        super().__init__(seed=seed, device=device)
        if example_inputs is None:
            example_inputs = torch.zeros(1, in_channels, input_size, input_size)
        example = example_inputs if isinstance(example_inputs, torch.Tensor) else example_inputs[0]
        self.tied_model, self._tied_graph = None, None
        if untie:                        # every block's output a group of its own (nasprune.graph.untie)
            self.tied_model, model = model, untie_model(model, example_inputs)
        gn = GatedNetwork(model, example_inputs, gate=self.gate_kind)
        if gn.num_gates == 0:
            raise ValueError(f"{type(model).__name__}: no channel group can be gated "
                             f"({'; '.join(gn.ungated.values()) or 'no prunable groups'})")
        self.gn = self.model = gn.to(self.device)
        self.base_model = model
        self.example_inputs = example_inputs
        with torch.no_grad():
            gn.gate.fill_(float(gate_init))
        self.flops_target, self.flops_tolerance = float(flops_target), float(flops_tolerance)
        self.round_to = round_to
        self.weights = [p for n, p in gn.named_parameters() if n != "gate"]
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._sums = torch.zeros(0, dtype=torch.float64, device=self.device)  # a method's running epoch sums
        with seeded(self.seed, self.device):
            self._rng = self._rng_state()
        self.config = dict(model=type(model if self.tied_model is None else self.tied_model).__name__, input_shape=list(example.shape[1:]),
                           num_gates=gn.num_gates, base_macs=gn.base_macs, flops_target=flops_target,
                           flops_tolerance=flops_tolerance, gate_init=gate_init, round_to=round_to, seed=seed,
                           **({"untie": True} if untie else {}))

    # -- the step's randomness
    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    @contextmanager
    def _own_rng(self):
        """The step's global randomness (dropout, stochastic depth) from the searcher's own
        generator state, so that a resumed search replays it; the caller's is left alone."""
        cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(self._rng["cpu"])
            if cuda:
                torch.cuda.set_rng_state(self._rng["cuda"], self.device)
            yield
            self._rng = self._rng_state()

    @staticmethod
    @contextmanager
    def _frozen(params):
        """No gradients for ``params`` inside the block (autograd then skips computing them)."""
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # -- discretisation
    def in_band(self, fraction: float) -> bool:
        """Whether a keep set of ``fraction`` of the model's MACs meets the budget as the method
        reads it (default: in [target - tolerance, target])."""
        return self.flops_target - self.flops_tolerance <= fraction <= self.flops_target

    def keep(self) -> tuple[dict, str]:
        """The keep set to export and how it was found: ``"threshold"`` (gate value above
        ``threshold``, widths rounded to ``round_to``) when its MACs are ``in_band``, else
        ``"budget"``: the largest set of channels by the raw gate parameter (ties by position) whose MACs fit under the target
        (the gated network's keep("budget") on that ranking: gate values saturate or binarise
        to equal values, which would make ties)."""
        gn = self.gn
        keep = gn.keep("threshold", threshold=self.threshold, round_to=self.round_to)
        if self.in_band(self._keep_macs(keep) / gn.base_macs):
            return keep, "threshold"
        return self.budget_keep(gn.gate.detach()), "budget"

    def budget_keep(self, scores: torch.Tensor) -> dict:
        """The largest set of channels by ``scores`` (num_gates,; ties by position) whose cost fits
        the budget (:meth:`budget_limit`)."""
        order = torch.argsort(-scores.double().cpu(), stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        with gates_as(self.gn, (len(order) - rank).float()):       # unique, exact in fp32
            return self.gn.keep("budget", round_to=self.round_to, **self.budget_limit())

    def budget_limit(self) -> dict:
        """The budget as the gated network's keep("budget") takes it (default: the MACs target)."""
        return {"macs": self.flops_target}

    def _keep_macs(self, keep) -> float:
        return float(self.gn.expected_macs(self.gn.keep_vector(keep).to(self.device)))

    def export(self, keep=None) -> nn.Module:
        """The pruned network: the gate values folded into the layers (the gated network's
        export), the channels outside ``keep`` (default :meth:`keep`'s) cut out. A plain
        nn.Module of the model's own class, CPU, eval mode."""
        return self.gn.export(self.keep()[0] if keep is None else keep)

    def architecture(self) -> dict:
        """Keep-based (method, per-layer original and kept widths, MACs and params of export()),
        with ``keep`` ({group index: kept channels} of the model's channel graph;
        ``slim.apply(model, trace(model, x), keep)`` rebuilds the export's shape), ``selected_by``
        (threshold or budget), ``base_macs``, ``base_params``, ``target_macs`` and the method's
        own keys (:meth:`architecture_extra`)."""
        gn = self.gn
        keep, how = self.keep()
        vector = gn.keep_vector(keep).to(self.device)
        return keep_architecture(
            self.method, self._layer_widths(keep), float(gn.expected_macs(vector)), float(gn.expected_params(vector)),
            keep={str(g): idx.tolist() for g, idx in keep.items()}, selected_by=how, base_macs=gn.base_macs,
            base_params=gn.base_params, target_macs=self.flops_target * gn.base_macs,
            **self.architecture_extra(keep, how), **self._untied_extra(keep))

    def architecture_extra(self, keep, how) -> dict:
        return {}

    def _untied_extra(self, keep) -> dict:
        """Searched untied: ``tied_macs``, the MACs of the model's own class holding every channel
        ``keep`` holds (each stream channel any block keeps; ``nasprune.graph.untie.tied_keep``):
        what the per-block widths save beyond a dense export of the user's class."""
        if self.tied_model is None:
            return {}
        if self._tied_graph is None:
            self._tied_graph = trace(self.tied_model, self.example_inputs)
        tied = tied_keep(self.gn.graph, self._tied_graph, keep)
        return {"tied_macs": int(flops.CostModel(self._tied_graph).exact(tied))}

    def _layer_widths(self, keep) -> list[dict]:
        """Per conv and linear layer of the model (named as there): its output width and the
        number of its output channels ``keep`` keeps (slim.apply's widths)."""
        graph = self.gn.graph
        kept_sets = {int(g): set(idx.tolist()) for g, idx in keep.items()}
        rows = []
        for name, m in self.base_model.named_modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                width = m.out_channels
            elif isinstance(m, nn.Linear):
                width = m.out_features
            else:
                continue
            classes = graph.records.get(name, (None, {}))[1].get("out")
            kept = width
            if classes is not None:
                groups, chans = graph.class_group[classes], graph.class_channel[classes]
                kept = int(sum(1 for g, c in zip(groups.tolist(), chans.tolist())
                               if g not in kept_sets or c in kept_sets[g]))
            rows.append({"name": name, "original": width, "kept": kept})
        return rows

    # -- checkpoint state
    def method_state(self) -> dict:
        return {"gated": self.gn.state_dict(), "rng": self._rng, "sums": self._sums,
                **{name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_method_state(self, state):
        self.gn.load_state_dict(state["gated"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
        self._rng = {k: v.cpu() for k, v in state["rng"].items()}
        self._sums.copy_(state["sums"])
