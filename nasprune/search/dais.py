"""DAIS: Differentiable Annealing Indicator Search (Guan et al., IEEE TNNLS 2023; arXiv 2011.02166).

    searcher = nasprune.search.DAIS(model, flops_target=0.5, input_size=32)   # keep 50 % of the MACs
    arch = searcher.search(train_set, epochs=100, batch_size=128)             # split per class 50/50
    pruned = searcher.export()                                                # plain, slimmed nn.Module

A small file on the shared engine (:class:`nasprune.search.GatedNetwork`, ``gate="sigmoid"``):
the indicators are the gated network's group gates, ``I = sigmoid(alpha / T)`` with ``alpha`` its
packed gate parameter, one indicator vector per channel group (a residual stream shares one).
What is DAIS's own: the temperature schedule, the architecture loss (CE on the architecture
split + lambda_F * TAS-style piecewise-log FLOPs loss + optional L1 and soft tie), the
minimum-width prior, the bi-level step and the discretisation (keep I > 0.5; a budget correction
when that keep misses the band). See docs/dais.md for every choice and its source
(methods.md section 3, methods-2.md section 1.4; the paper's constants are unknown).
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from nasprune.search.gated_searcher import GatedSearcher
from nasprune.search.tas import cost_loss

SCHEDULES = ("exponential", "linear", "reciprocal", "constant")


def anneal_temperature(fraction: float, t_start: float, t_end: float, schedule: str = "exponential") -> float:
    """The temperature at ``fraction`` (0 at the first step, 1 at the last) of the search.

    exponential (default, methods-2 1.4): t_start * (t_end / t_start) ** fraction;
    linear: t_start + (t_end - t_start) * fraction;
    reciprocal (the 3P re-implementation's 1 / (1 + 49 e/E) with its ends as parameters):
    t_start / (1 + (t_start / t_end - 1) * fraction); constant: t_start."""
    f = min(max(float(fraction), 0.0), 1.0)
    if schedule == "exponential":
        return t_start * (t_end / t_start) ** f
    if schedule == "linear":
        return t_start + (t_end - t_start) * f
    if schedule == "reciprocal":
        return t_start / (1 + (t_start / t_end - 1) * f)
    if schedule == "constant":
        return t_start
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class DAIS(GatedSearcher):
    """Channel search of any CNN the gated network handles, under a FLOPs (MACs) budget.

    model: the unpruned model (it is copied; its weights start the search). example_inputs: a
        tensor (batch 1 or 2) for tracing, or ``input_size`` (side of a square image) and
        ``in_channels``; the MACs depend on it.
    flops_target: fraction of the model's MACs to keep, in (0, 1]. flops_tolerance: the width of
        the band below the target the exported network's MACs must land in, a fraction of the
        model's MACs: [target - tolerance, target]. flops_margin: the FLOPs loss's zero band is
        that band less a margin at either end, so that the last channels to flip before the
        temperature freezes them stay inside it.
    cost_weight: lambda_F. l1_weight: lambda_1 of mean(I). tie_weight, ties: the soft tie
        lambda_tie * sum ||I_a - I_b||^2 over ``ties``, pairs of layer names (module names of
        the model) of equal width in different channel groups (a residual stream already shares
        one indicator vector: its layers are tied exactly).
    min_width: the minimum-width prior: channels per group (an int) or fraction of the group (a
        float < 1) whose alpha is held at >= ``alpha_floor`` after every update, so no group
        empties. alpha_init: the initial alpha of every channel (I = sigmoid(alpha_init / T0)).
    temperature: (T0, T_end); schedule: exponential (per step), linear, reciprocal or constant.
    lr, momentum, weight_decay: the weights' SGD (nesterov, cosine decay to 0 over the search);
    alpha_lr, alpha_betas: alpha's Adam (no weight decay); alpha_step_cap: Adam's step size is
    min(alpha_lr, alpha_step_cap * T), so that one step moves a logit alpha / T by about
    alpha_step_cap at most (None: no cap; it does not bind at the defaults, 3e-4 < 0.01).
    seed: data order, dropout. round_to: kept widths rounded down to a multiple (GatedSearcher).
    untie: search every block's output width on its own (``nasprune.graph.untie``; GatedSearcher):
        the export then gathers on its shortcuts, and the architecture reports ``tied_macs``.
    """

    method = "dais"
    gate_kind = "sigmoid"

    def __init__(self, model: nn.Module, flops_target: float = 0.5, *, example_inputs=None, input_size: int = 32,
                 in_channels: int = 3, flops_tolerance: float = 0.05, flops_margin: float = 0.01,
                 cost_weight: float = 2.0, l1_weight: float = 0.0, tie_weight: float = 0.0, ties=(), min_width=1, alpha_floor: float = 0.05,
                 alpha_init: float = 2.0, temperature=(1.0, 1e-2), schedule: str = "exponential",
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, alpha_lr: float = 3e-4,
                 alpha_betas=(0.5, 0.999), alpha_step_cap: float | None = 1.0, device=None, seed: int = 0,
                 round_to: int = 1, untie: bool = False):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        t_start, t_end = map(float, temperature)
        if not (t_start > 0 and t_end > 0):
            raise ValueError(f"temperatures must be positive, got {temperature}")
        if tie_weight and not ties:
            raise ValueError("tie_weight > 0 needs ties: pairs of layer names to tie softly")
        if not (isinstance(min_width, int) and min_width >= 1) and not (isinstance(min_width, float)
                                                                        and 0 < min_width < 1):
            raise ValueError(f"min_width is a number of channels (int >= 1) or a fraction in (0, 1); got {min_width}")
        if not 0 <= 2 * flops_margin < flops_tolerance:
            raise ValueError(f"flops_margin must lie in [0, flops_tolerance / 2); got {flops_margin} "
                             f"with flops_tolerance {flops_tolerance}")
        super().__init__(model, flops_target, example_inputs=example_inputs, input_size=input_size,
                         in_channels=in_channels, flops_tolerance=flops_tolerance, gate_init=alpha_init,
                         device=device, seed=seed, round_to=round_to, untie=untie)
        gn = self.gn
        self.flops_margin = float(flops_margin)
        self.cost_weight, self.l1_weight, self.tie_weight = float(cost_weight), float(l1_weight), float(tie_weight)
        self.t_start, self.t_end, self.schedule = t_start, t_end, schedule
        self.temperature = t_start
        gn.gate_fn.anneal(t_start)
        self.alpha_floor, self.lr, self.alpha_lr = float(alpha_floor), float(lr), float(alpha_lr)
        self.alpha_step_cap = float(alpha_step_cap) if alpha_step_cap else None
        self.ties = [tuple(map(str, pair)) for pair in ties]
        self._tie_slots = [self._layer_slots(a, b) for a, b in self.ties]
        self._min_width_index(min_width)
        self.w_opt = torch.optim.SGD(self.weights, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                     nesterov=momentum > 0)
        self.a_opt = torch.optim.Adam([gn.gate], lr=alpha_lr, betas=tuple(alpha_betas), weight_decay=0.0)
        self.optimizers.update(w_opt=self.w_opt, a_opt=self.a_opt)
        self.total_steps = 0
        self._sums = torch.zeros(6, dtype=torch.float64, device=self.device)  # loss, acc, arch acc, n, flops loss, ce_a
        self.config.update(flops_margin=flops_margin, cost_weight=cost_weight, l1_weight=l1_weight,
                           tie_weight=tie_weight, ties=[list(t) for t in self.ties], min_width=min_width,
                           alpha_floor=alpha_floor, temperature=[t_start, t_end], schedule=schedule, lr=lr,
                           momentum=momentum, weight_decay=weight_decay, alpha_lr=alpha_lr,
                           alpha_betas=list(alpha_betas), alpha_step_cap=alpha_step_cap)

    # -- set-up helpers
    def _layer_slots(self, a: str, b: str) -> tuple:
        """Packed gate slots of two layers' output channels, for the soft tie."""
        graph, gn = self.gn.graph, self.gn
        slots = []
        for name in (a, b):
            if self.tied_model is not None and name not in graph.records:
                name = f"model.{name}"            # untied: the model's layers live under `model`
            roles = graph.records.get(name, (None, {}))[1]
            role = "out" if "out" in roles else "channel" if "channel" in roles else None
            if role is None:
                raise ValueError(f"tie: {name!r} is not a traced layer with output channels")
            slot = gn._slots(roles[role])
            if bool((slot == gn.num_gates).any()):
                raise ValueError(f"tie: {name!r} has channels no gate holds ({gn.ungated or 'not prunable'})")
            slots.append(slot)
        if len(slots[0]) != len(slots[1]):
            raise ValueError(f"tie: {a!r} has {len(slots[0])} channels, {b!r} {len(slots[1])}; a tie needs equal widths")
        if torch.equal(slots[0], slots[1]):
            raise ValueError(f"tie: {a!r} and {b!r} are in one channel group (a residual stream): the gated "
                             f"network already gives them one indicator vector")
        return slots[0].to(self.device), slots[1].to(self.device)

    def _min_width_index(self, min_width) -> None:
        """Per gate slot its group, and per group how many channels the prior keeps open."""
        gn = self.gn
        group_of = torch.zeros(gn.num_gates, dtype=torch.long)
        start = torch.zeros(gn.num_gates, dtype=torch.long)
        need = torch.zeros(gn.num_gates, dtype=torch.long)
        for i, g in enumerate(gn.groups):
            o, size = gn.offsets[g], gn.sizes[g]
            m = min_width if isinstance(min_width, int) else int(math.ceil(min_width * size))
            group_of[o:o + size], start[o:o + size], need[o:o + size] = i, o, min(max(m, 1), size)
        self._group_of, self._group_start, self._group_need = (t.to(self.device) for t in (group_of, start, need))
        self._positions = torch.arange(gn.num_gates, device=self.device)

    # -- the schedule
    def begin_epoch(self, epoch, epochs, steps_per_epoch):
        self.total_steps = epochs * steps_per_epoch

    def _schedule(self) -> None:
        """Temperature and weight learning rate of the step about to run (global_step)."""
        if self.total_steps:
            s = min(self.global_step, self.total_steps - 1)
            self.temperature = anneal_temperature(s / max(self.total_steps - 1, 1), self.t_start, self.t_end,
                                                  self.schedule)
            lr = 0.5 * self.lr * (1 + math.cos(math.pi * s / self.total_steps))
            for g in self.w_opt.param_groups:
                g["lr"] = lr
        self.gn.gate_fn.anneal(self.temperature)
        if self.alpha_step_cap:    # a step moves a logit alpha / T by at most about alpha_step_cap
            for g in self.a_opt.param_groups:
                g["lr"] = min(self.alpha_lr, self.alpha_step_cap * self.temperature)

    # -- the losses
    def indicators(self) -> torch.Tensor:
        """I = sigmoid(alpha / T), one per gated channel (packed as gn.gate)."""
        return self.gn.gate_fn(self.gn.gate)

    def arch_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        """The architecture objective on an architecture batch's logits, and its terms:
        ce + cost_weight * flops + l1_weight * l1 + tie_weight * tie (tensors), with
        ``expected`` = E[MACs] / base (differentiable) and ``discrete`` = MACs of alpha > 0 / base,
        which picks the FLOPs loss's branch (as TAS's arg-max cost does)."""
        gn = self.gn
        base = float(gn.base_macs)
        values = self.indicators()
        expected = gn.expected_macs(values) / base
        with torch.no_grad():
            discrete = gn.expected_macs((gn.gate > 0).to(values.dtype)) / base
        flops = cost_loss(expected, discrete, self.flops_target - self.flops_margin,
                          self.flops_tolerance - 2 * self.flops_margin)
        ce = F.cross_entropy(logits, targets)
        l1 = values.mean()
        tie = values.new_zeros(())
        for a, b in self._tie_slots:
            tie = tie + (values.index_select(0, a) - values.index_select(0, b)).square().sum()
        total = ce + self.cost_weight * flops.to(ce.dtype)
        if self.l1_weight:
            total = total + self.l1_weight * l1
        if self.tie_weight:
            total = total + self.tie_weight * tie
        return {"total": total, "ce": ce, "flops": flops, "l1": l1, "tie": tie, "expected": expected,
                "discrete": discrete}

    @torch.no_grad()
    def _hold_min_width(self) -> None:
        """The minimum-width prior: the largest ``need`` alphas of every group held >= alpha_floor
        (one vectorised pass: sort by alpha, then stably by group)."""
        alpha = self.gn.gate
        order = torch.argsort(alpha, descending=True, stable=True)
        order = order[torch.argsort(self._group_of[order], stable=True)]  # group-major, alpha descending
        rank = self._positions - self._group_start[order]
        top = order[rank < self._group_need[order]]
        alpha[top] = alpha[top].clamp_min(self.alpha_floor)

    # -- one iteration
    def step(self, weight_batch, arch_batch) -> dict:
        """One bi-level iteration (first order): an SGD step on the weights with CE on
        weight_batch, then an Adam step on alpha with the architecture loss on arch_batch, both
        at this step's temperature. Returns tensors (read once per step by the base)."""
        gn = self.gn
        gn.train()
        self._schedule()
        with self._own_rng():
            x, y = weight_batch
            with self._frozen([gn.gate]):             # the weight step computes no gate gradient
                logits = gn(x)
                loss_w = F.cross_entropy(logits, y)
                self.w_opt.zero_grad(set_to_none=True)
                loss_w.backward()
            self.w_opt.step()
            xa, ya = arch_batch
            with self._frozen(self.weights):          # the alpha step computes no weight gradients
                logits_a = gn(xa)
                terms = self.arch_loss(logits_a, ya)
                self.a_opt.zero_grad(set_to_none=True)
                terms["total"].backward()
            self.a_opt.step()
            self._hold_min_width()
        with torch.no_grad():
            acc_w = (logits.detach().argmax(1) == y).double().mean()
            acc_a = (logits_a.detach().argmax(1) == ya).double().mean()
            self._sums += torch.stack([loss_w.detach().double(), acc_w, acc_a, acc_w.new_ones(()),
                                       terms["flops"].detach().double(), terms["ce"].detach().double()])
        base = float(gn.base_macs)
        return {"loss": loss_w.detach(), "arch_loss": terms["total"].detach(), "acc": acc_w, "arch_acc": acc_a,
                "flops_loss": terms["flops"].detach(), "expected_macs": terms["expected"].detach() * base,
                "flops": terms["discrete"] * base, "tau": self.temperature}

    # -- discretisation (GatedSearcher.keep: I > 0.5, i.e. alpha > 0, when its MACs lie in
    # [target - tolerance, target], else the largest set by alpha that fits; the export folds the
    # indicator values at the current temperature into the layers)
    @torch.no_grad()
    def _indicator_stats(self) -> tuple[float, float]:
        """E[MACs] at the current temperature, and the share of indicators in (0.05, 0.95)."""
        values = self.indicators()
        return float(self.gn.expected_macs(values)), float(((values > 0.05) & (values < 0.95)).double().mean())

    def architecture_extra(self, keep, how) -> dict:
        """DAIS's keys: ``threshold_macs`` (MACs of I > 0.5), ``expected_macs`` (at the current
        temperature), ``temperature``, ``undecided`` (share of indicators in (0.05, 0.95))."""
        threshold = self.gn.keep("threshold", threshold=0.5) if how == "budget" else keep
        expected, undecided = self._indicator_stats()
        return {"threshold_macs": self._keep_macs(threshold), "expected_macs": expected,
                "temperature": self.temperature, "undecided": undecided}

    # -- per-epoch record
    def epoch_metrics(self) -> dict:
        loss, acc_w, acc_a, n, fl, ce_a = (self._sums / self._sums[3].clamp_min(1)).tolist()
        self._sums.zero_()
        gn = self.gn
        expected, undecided = self._indicator_stats()
        macs = self._keep_macs(gn.keep("threshold", threshold=0.5))
        return {"loss": loss, "train_acc": acc_w, "arch_acc": acc_a, "arch_ce": ce_a, "flops_loss": fl,
                "tau": self.temperature, "macs": macs, "expected_macs": expected, "macs_ratio": macs / gn.base_macs,
                "undecided": undecided}

    # -- checkpoint state (GatedSearcher's, with the temperature)
    def method_state(self) -> dict:
        return {**super().method_state(), "temperature": self.temperature, "total_steps": self.total_steps}

    def load_method_state(self, state):
        super().load_method_state(state)
        self.temperature, self.total_steps = float(state["temperature"]), int(state["total_steps"])
        self.gn.gate_fn.anneal(self.temperature)
