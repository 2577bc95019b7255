"""TAS: Network Pruning via Transformable Architecture Search (Dong & Yang, NeurIPS 2019).

    searcher = nasprune.search.TAS(model, flops_target=0.5)     # keep 50 % of model's MACs
    arch = searcher.search(weight_set, arch_set, epochs=600)    # alternating SGD / Adam
    pruned = searcher.export()                                  # plain nn.Module

See docs/tas.md and methods.md section 2 for the algorithm and its defaults.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nasprune.models.pruned_resnet import tas_resnet
from nasprune.search.base import Searcher, keep_architecture
from nasprune.search.tas_net import ALIGNS, TASSupernet, inherit_weights, resnet_spec, sample_depths, sample_widths
from nasprune.train import seeded

TAU_SCHEDULES = ("cosine", "linear")
BAND_CHECK_EVERY = 10     # steps between looks at whether the arg-max lies in the budget band (TAS.select)
SELECT_RULES = ("in-budget", "final")
INIT_MODES = ("base", "inherit", "random")    # export(init=...); the first is the default


def cost_loss(expected, current, target, tolerance):
    """TAS's piecewise FLOPs loss (official code variant), on the device without a host sync.

    log E if current > target (too large); -log E if current < target - tolerance (too small);
    0 otherwise. expected: differentiable expected cost (MFLOPs); current: arg-max cost;
    tolerance: absolute (t * unpruned cost)."""
    log_e = torch.log(expected)
    zero = torch.zeros_like(log_e)
    return torch.where(current > target, log_e, torch.where(current < target - tolerance, -log_e, zero))


def temperature(epoch: int, epochs: int, tau_max: float, tau_min: float, schedule: str = "cosine") -> float:
    """Gumbel temperature of an epoch: cosine (official code, 5 -> 0.1) or linear (paper, 10 -> 0.1)."""
    if schedule == "cosine":
        return tau_min + (tau_max - tau_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2
    if schedule == "linear":
        return tau_max - (tau_max - tau_min) * epoch / max(epochs - 1, 1)
    raise ValueError(f"tau schedule must be one of {TAU_SCHEDULES}, got {schedule!r}")


class TAS(Searcher):
    """Width and depth search of a ResNet under a FLOPs (MACs) budget.

    Bi-level (the base's default loaders): weight batches and architecture batches from the two
    halves of ``search(data)``'s per-class split, or from ``search(data, val_data)``.

    model: the unpruned ResNet: a nasprune.models.CifarResNet or a torchvision.models.ResNet
        (basic or bottleneck blocks; see nasprune.models.ResNetSpec). Its structure defines the search
        space; its weights warm-start the supernet when init_from_model, which TAS's code does
        not do but short searches need.
    input_size: the side of the (square) input images; it sets the MACs (32 for CIFAR, 224 for
        ImageNet-size inputs).
    flops_target: fraction of model's MACs to keep, in (0, 1].
    flops_tolerance: t of the cost loss, relative to the supernet's maximum MACs.
    cost_weight: lambda_cost. tau: (tau_max, tau_min); tau_schedule: "cosine" or "linear".
    lr, momentum, weight_decay, nesterov: weight SGD (cosine decay to 0 over the search);
    arch_lr, arch_betas, arch_weight_decay: architecture Adam. seed: every random draw.
    align: how the supernet sums candidates of unequal width: "prefix" (default, zero channels
    beyond a candidate's width) or "cwi" (TAS's channel-wise interpolation, Eqs. 4-5); docs/tas.md,
    Search health.
    search_depth: False searches the widths only and keeps every block (docs/tas.md, Quality).
    """

    method = "tas"

    def __init__(self, model: nn.Module, flops_target: float = 0.5, *, input_size: int = 32,
                 flops_tolerance: float = 0.05, cost_weight: float = 2.0, tau=(5.0, 0.1),
                 tau_schedule: str = "cosine", lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, arch_lr: float = 1e-3, arch_betas=(0.5, 0.999),
                 arch_weight_decay: float = 1e-3, init_from_model: bool = True, align: str = "prefix",
                 search_depth: bool = True, device=None, seed: int = 0):
        if not 0 < flops_target <= 1:
            raise ValueError(f"flops_target is the fraction of FLOPs kept, in (0, 1]; got {flops_target}")
        if tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"tau_schedule must be one of {TAU_SCHEDULES}, got {tau_schedule!r}")
        if align not in ALIGNS:
            raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
        from nasprune import flops
        super().__init__(seed=seed, device=device)
        spec = resnet_spec(model)
        with seeded(self.seed):        # the supernet's initial weights and logits; the global RNG is left alone
            self.model = TASSupernet(spec, input_size, align, search_depth)
        self.base_model = model      # for export(init="base"); not copied, not modified
        if init_from_model:
            self.model.load_base(model)
        self.model.to(self.device)
        self.base_flops = int(flops.count(model, torch.zeros(1, spec.in_channels, input_size, input_size)))
        self.base_params = int(flops.count_params(model))
        self.max_flops = self.model.max_cost()
        self.flops_target = float(flops_target)
        self.target = self.flops_target * self.base_flops
        self.tolerance = flops_tolerance * self.max_flops
        self.cost_weight = float(cost_weight)
        self.tau_max, self.tau_min = map(float, tau)
        self.tau_schedule, self.tau = tau_schedule, float(tau[0])
        self.lr = float(lr)
        self.w_opt = torch.optim.SGD(self.model.weight_parameters(), lr=lr, momentum=momentum,
                                     weight_decay=weight_decay, nesterov=True)
        self.a_opt = torch.optim.Adam(self.model.arch_parameters(), lr=arch_lr, betas=tuple(arch_betas),
                                      weight_decay=arch_weight_decay)
        self.optimizers.update(w_opt=self.w_opt, a_opt=self.a_opt)     # averaged across ranks under torchrun
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self.total_steps = self.epoch = 0
        self.in_band: dict | None = None    # the latest arg-max seen in the budget band (select)
        self._sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, acc_w, acc_a, n, cost-loss
        self.config = dict(model=spec.to_dict(), flops_target=flops_target, input_size=input_size,
                           flops_tolerance=flops_tolerance, cost_weight=cost_weight, tau=list(tau),
                           tau_schedule=tau_schedule, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           arch_lr=arch_lr, arch_betas=list(arch_betas), arch_weight_decay=arch_weight_decay,
                           init_from_model=init_from_model, align=align, seed=seed,
                           **({} if search_depth else {"search_depth": False}))   # earlier checkpoints resume

    # -- one iteration
    def _sample(self):
        m = self.model
        index, weights = sample_widths(m.width_logits, m.width_mask, self.tau, self.generator)
        depth = sample_depths(m.depth_logits, m.depth_mask, self.tau, self.generator)
        return index, weights, depth   # the supernet copies index to the host once per forward

    def _set_lr(self):
        if self.total_steps:
            lr = 0.5 * self.lr * (1 + math.cos(math.pi * min(self.global_step, self.total_steps) / self.total_steps))
            for g in self.w_opt.param_groups:
                g["lr"] = lr

    def step(self, weight_batch, arch_batch) -> dict:
        """One search iteration: SGD on the weights with CE on weight_batch, then Adam on the
        architecture logits with CE + cost_weight * cost loss on arch_batch. Returns tensors."""
        m = self.model
        m.train()
        self._set_lr()
        x, y = weight_batch
        logits = m(x, *self._sample())
        loss_w = F.cross_entropy(logits, y)
        self.w_opt.zero_grad(set_to_none=True)
        self.a_opt.zero_grad(set_to_none=True)
        loss_w.backward()
        self.w_opt.step()
        acc_w = (logits.detach().argmax(1) == y).double().mean()

        xa, ya = arch_batch
        logits_a = m(xa, *self._sample())
        expected = m.expected_cost()
        current = m.argmax_cost()
        l_cost = cost_loss(expected / 1e6, current, self.target, self.tolerance)
        loss_a = F.cross_entropy(logits_a, ya) + self.cost_weight * l_cost
        self.w_opt.zero_grad(set_to_none=True)
        self.a_opt.zero_grad(set_to_none=True)
        loss_a.backward()
        self.a_opt.step()
        self.w_opt.zero_grad(set_to_none=True)
        acc_a = (logits_a.detach().argmax(1) == ya).double().mean()
        with torch.no_grad():
            self._sums += torch.stack([loss_w.detach().double(), acc_w, acc_a, acc_w.new_ones(()),
                                       l_cost.detach().double()])
        if (self.global_step + 1) % BAND_CHECK_EVERY == 0:     # the base counts this step after it returns
            self._check_band(self.global_step + 1)
        return {"loss": loss_w.detach(), "arch_loss": loss_a.detach(), "acc": acc_w, "arch_acc": acc_a,
                "cost_loss": l_cost.detach(), "expected_flops": expected.detach(), "flops": current, "tau": self.tau}

    def _in_band(self, flops: float) -> bool:
        return self.target - self.tolerance <= flops <= self.target

    def _check_band(self, step: int):
        """Remember the current arg-max (after ``step`` steps) if its MACs lie in the cost loss's
        zero band (one host copy of the cost; every BAND_CHECK_EVERY steps and at each epoch end)."""
        flops = float(self.model.argmax_cost())
        if self._in_band(flops):
            arch = self.model.architecture()
            self.in_band = {"widths": arch["widths"], "blocks": arch["blocks"], "flops": flops,
                            "expected_flops": float(self.model.expected_cost().detach()),
                            "epoch": self.epoch, "step": step}

    # -- schedule hooks
    def begin_epoch(self, epoch, epochs, steps_per_epoch):
        self.tau = temperature(epoch, epochs, self.tau_max, self.tau_min, self.tau_schedule)
        self.total_steps = epochs * steps_per_epoch
        self.epoch = epoch + 1

    def epoch_metrics(self) -> dict:
        loss, acc_w, acc_a, n, lc = (self._sums / self._sums[3].clamp_min(1)).tolist()
        self._sums.zero_()
        self._check_band(self.global_step)
        arch = self.architecture()
        return {"loss": loss, "train_acc": acc_w, "arch_acc": acc_a, "cost_loss": lc, "tau": self.tau,
                "flops": arch["flops"], "expected_flops": arch["expected_flops"],
                "flops_ratio": arch["flops"] / self.base_flops, "widths": arch["widths"],
                "blocks": arch["blocks"]}

    # -- results
    def architecture(self, projection_bn: bool = False) -> dict:
        """The arg-max architecture, keep-based (method, per-conv original and kept widths, MACs
        and params of export()), with TAS's own keys: the search space (ResNetSpec fields,
        ``widths`` per conv row, ``blocks`` per stage, ``projection_bn``; ``tas_resnet(**arch)``
        builds it), its MACs as ``flops`` (= the exact MACs of export()), ``expected_flops`` and
        the budget. projection_bn: that of the export described (False: a warm start's, the
        default; True: ``export(init="random")``'s)."""
        return self._describe(self.model.architecture(), float(self.model.argmax_cost()),
                              float(self.model.expected_cost().detach()), projection_bn)

    def _describe(self, arch: dict, flops: float, expected_flops, projection_bn: bool = False) -> dict:
        spec = self.model.spec
        arch = {**arch, "projection_bn": bool(projection_bn)}
        kept = spec.kept_widths(arch["widths"], arch["blocks"])
        layers = [{"name": n, "original": o, "kept": k}
                  for n, o, k in zip(spec.row_names(), spec.row_widths(), kept)]
        with torch.device("meta"):       # parameter count without allocating the network
            params = sum(p.numel() for p in tas_resnet(**arch).parameters())
        return keep_architecture(self.method, layers, flops, params, base_macs=self.base_flops,
                                 base_params=self.base_params, **arch, flops=flops,
                                 expected_flops=expected_flops, base_flops=self.base_flops,
                                 target_flops=self.target)

    def select(self, rule: str = "in-budget", projection_bn: bool = False) -> dict:
        """The architecture to export. "final": the arg-max at the end of the search (TAS).
        "in-budget": the final arg-max if its MACs lie in the cost loss's zero band [target -
        tolerance, target], else the latest arg-max seen there (looked at every
        BAND_CHECK_EVERY steps and at each epoch end), else the final one. A short search ends
        wherever the arg-max happens to be as it oscillates around the budget (a stage's depth
        flipping moves it by 10-15 % of the MACs); this keeps the result within the budget. An
        earlier architecture carries its ``epoch`` (the epoch it was seen in) and ``step``.
        projection_bn: as :meth:`architecture`'s."""
        if rule not in SELECT_RULES:
            raise ValueError(f"rule must be one of {SELECT_RULES}, got {rule!r}")
        final = self.architecture(projection_bn)
        if rule == "final" or self._in_band(final["flops"]):
            return final
        seen = self.in_band
        if seen is None:      # a checkpoint of an earlier nasprune: its epoch-end rows
            seen = next(({**h, "step": None} for h in reversed(self.history)
                         if "widths" in h and self._in_band(h["flops"])), None)
        if seen is None or not self._in_band(seen["flops"]):
            return final
        arch = {**self.model.architecture(), "widths": seen["widths"], "blocks": seen["blocks"]}
        return {**self._describe(arch, seen["flops"], seen.get("expected_flops"), projection_bn), "epoch": seen["epoch"],
                "step": seen["step"]}

    def export(self, init: str = "base", architecture: dict | None = None,
               projection_bn: bool | None = None) -> nn.Module:
        """The derived network (plain nn.Module, CPU, train mode) of ``architecture`` (default:
        the current arg-max; or one from :meth:`select`). init: "base" (default: prefix filters
        and BN slices of the unpruned model passed in, as uniform pruning would start),
        "inherit" (prefix filters and the chosen candidates' BNs of the searched supernet), or
        "random" (as the TAS paper, trained from scratch). docs/tas.md, Quality, has the
        measurement behind the default. projection_bn: whether a 1x1 projection that only the
        pruned widths call for has a BN (TASResNet); default: only for ``init="random"``, TAS's
        own network; a warm start without it begins as the supernet's residual add computed."""
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        arch = architecture if architecture is not None else self.model.architecture()
        with seeded(self.seed):          # the random init is the seed's; the caller's RNG is left alone
            if projection_bn is None:
                projection_bn = init == "random"
            net = tas_resnet(**{**arch, "projection_bn": projection_bn})
            if init == "inherit":
                inherit_weights(net, self.model.cpu(), arch["widths"])
                self.model.to(self.device)
            elif init == "base":
                source = TASSupernet(self.model.spec, self.model.input_size)
                source.load_base(self.base_model)
                inherit_weights(net, source, arch["widths"])
        return net

    # -- checkpoint state
    def method_state(self) -> dict:
        return {"model": self.model.state_dict(), "w_opt": self.w_opt.state_dict(),
                "a_opt": self.a_opt.state_dict(), "generator": self.generator.get_state(),
                "sums": self._sums, "tau": self.tau, "epoch": self.epoch, "in_band": self.in_band}

    def load_method_state(self, state):
        self.model.load_state_dict(state["model"])
        self.w_opt.load_state_dict(state["w_opt"])
        self.a_opt.load_state_dict(state["a_opt"])
        self.generator.set_state(state["generator"])
        self._sums.copy_(state["sums"])
        self.tau = float(state["tau"])
        self.epoch, self.in_band = int(state.get("epoch", 0)), state.get("in_band")
