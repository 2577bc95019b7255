"""PaS: Pruning-as-Search (Li, Zhao et al., IJCAI 2022; arXiv 2206.01198; code liyy201912/PaS).

    searcher = nasprune.search.PaS(model, flops_target=0.5, input_size=32)   # keep 50 % of the MACs
    arch = searcher.search(train_set, epochs=20, batch_size=128)             # one stream, no split
    pruned = searcher.export()                                               # plain, slimmed nn.Module

A small file on the shared engine (:class:`nasprune.search.GatedNetwork`, ``gate="threshold"``):
PaS's depth-wise binary convolutions (DBC) are the gated network's group gates, ``m = 1[w > 0.5]``
forward with a straight-through gradient, ``w`` its packed gate parameter initialised to 1. What
is PaS's own: the MAC regulariser ``lambda * (MACs(m) / MACs_0 - rho)^2`` on the binary mask
(its gradient reaches ``w`` through the straight-through gate), the joint step (weights and gates
on the same batch, one SGD optimiser) and the discretisation (keep ``w > 0.5``; a budget
correction when that keep misses the band). See docs/pas.md for every choice and its source
(methods.md section 5, methods-2.md section 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nasprune.search.gated_searcher import GatedSearcher, gates_as

THRESHOLD = 0.5          # m = 1[w > 0.5] (methods.md 5.1)
PLACEMENTS = ("tied", "untied")


class PaS(GatedSearcher):
    """Channel search of any CNN the gated network handles, under a MACs budget, by PaS's binary
    gates trained jointly with the weights.

    model: the unpruned model (it is copied; its weights start the search). example_inputs: a
        tensor (batch 1 or 2) for tracing, or ``input_size`` (side of a square image) and
        ``in_channels``; the MACs depend on it.
    flops_target: rho, the fraction of the model's MACs to keep, in (0, 1] (PaS's ``--prune p``
        is 1 - rho). flops_tolerance: the exported network's MACs must lie within
        rho +- tolerance of the model's, else the budget correction chooses the keep.
    cost_weight: lambda of the scale-free regulariser lambda * (MACs(m) / MACs_0 - rho)^2.
    lr, momentum, weight_decay: the one SGD optimiser (constant learning rate);
    gate_lr, gate_weight_decay: its parameter group of gates (gate_lr None: ``lr``, the official
        single learning rate). gate_init: every w at the start (1.0: every channel open).
    gate_range: (low, high) w is clamped to after every step (None: no clamp); min_width: hold the
        largest w of every channel group at >= ``gate_floor`` (> 0.5) so no group closes.
    placement: "tied", one DBC vector per channel group of the model (a residual stream shares
        one); "untied", the official post-add DBC of every block: the search runs on
        ``nasprune.graph.untie(model)`` (each shortcut through a channel selection, so each
        block's output is a group of its own), the export is that untied network slimmed (its
        shortcuts gather), and the architecture reports ``tied_macs``, what the model's own class
        would need to hold the same channels (docs/pas.md).
    seed: data order, dropout. round_to: kept widths rounded down to a multiple (GatedSearcher).
    """

    method = "pas"
    gate_kind = "threshold"
    threshold = THRESHOLD

    def __init__(self, model: nn.Module, flops_target: float = 0.5, *, example_inputs=None, input_size: int = 32,
                 in_channels: int = 3, flops_tolerance: float = 0.03, cost_weight: float = 50.0, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, gate_lr: float | None = None,
                 gate_weight_decay: float = 0.0, gate_init: float = 1.0, gate_range=(0.0, 1.0),
                 min_width: bool = True, gate_floor: float = 0.6, placement: str = "tied", device=None,
                 seed: int = 0, round_to: int = 1):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        if gate_range is not None:
            low, high = map(float, gate_range)
            if not low <= THRESHOLD < high:
                raise ValueError(f"gate_range must hold the threshold {THRESHOLD} inside [low, high), got {gate_range}")
            gate_range = (low, high)
        if min_width and not (gate_floor > THRESHOLD and (gate_range is None or gate_floor <= gate_range[1])):
            raise ValueError(f"gate_floor must lie above the threshold {THRESHOLD} (and in gate_range), "
                             f"got {gate_floor}")
        super().__init__(model, flops_target, example_inputs=example_inputs, input_size=input_size,
                         in_channels=in_channels, flops_tolerance=flops_tolerance, gate_init=gate_init,
                         device=device, seed=seed, round_to=round_to, untie=placement == "untied")
        gn = self.gn
        self.cost_weight = float(cost_weight)
        self.gate_range, self.min_width, self.gate_floor = gate_range, bool(min_width), float(gate_floor)
        self.optimizer = torch.optim.SGD(
            [{"params": self.weights, "weight_decay": weight_decay},
             {"params": [gn.gate], "lr": lr if gate_lr is None else gate_lr, "weight_decay": gate_weight_decay}],
            lr=lr, momentum=momentum)
        self.optimizers["optimizer"] = self.optimizer
        self._parts = self._member_parts().to(self.device)
        self._project()                                  # gate_init inside the range, every layer open
        self._sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, ce, reg, acc, n
        self.config.update(cost_weight=cost_weight, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           gate_lr=gate_lr, gate_weight_decay=gate_weight_decay,
                           gate_range=list(gate_range) if gate_range is not None else None,
                           min_width=self.min_width, gate_floor=gate_floor, placement=placement)

    # -- the loop: weights and gates on the same batches
    def loaders(self, data, val_data, batch_size: int) -> dict:
        """One stream: ``data`` shuffled and augmented. PaS has no architecture split."""
        if val_data is not None:
            raise ValueError("PaS trains the weights and the gates on the same batches: search(data) takes no "
                             "val_data (join the two sets if both should be searched on)")
        return {"train": self.loader(data, batch_size)}

    # -- the loss
    def mask(self) -> torch.Tensor:
        """m = 1[w > 0.5] forward, straight-through backward (one value per gated channel)."""
        return self.gn.gate_fn(self.gn.gate)

    def regulariser(self) -> dict:
        """lambda * (MACs(m) / MACs_0 - rho)^2 (``reg``) and MACs(m) / MACs_0 (``ratio``): the MACs
        of the binary mask, their gradient to w the cost's through the straight-through gate."""
        ratio = self.gn.expected_macs(self.mask()) / float(self.gn.base_macs)
        return {"reg": self.cost_weight * (ratio - self.flops_target).square(), "ratio": ratio}

    def _member_parts(self) -> torch.Tensor:
        """Gate slots of every distinct set of a group's channels one layer holds (the whole
        group, or the part an option-A shortcut or a concatenation gives a layer), one row each,
        padded with num_gates: the sets the minimum width keeps open, as the keep rule does."""
        gn, rows = self.gn, []
        for g in gn.groups:
            seen = set()
            for member in gn.graph.groups[g].members:
                channels = tuple(member.index_map.channels.tolist())
                if channels and channels not in seen:
                    seen.add(channels)
                    rows.append([gn.offsets[g] + c for c in channels])
        parts = torch.full((len(rows), max(map(len, rows))), gn.num_gates, dtype=torch.long)
        for i, row in enumerate(rows):
            parts[i, :len(row)] = torch.tensor(row)
        return parts

    @torch.no_grad()
    def _project(self) -> None:
        """w clamped to gate_range, then (min_width) the largest w of every layer's part of
        every group held at >= gate_floor; on the device, no host sync."""
        w = self.gn.gate
        if self.gate_range is not None:
            w.clamp_(*self.gate_range)
        if self.min_width:
            padded = torch.cat([w, w.new_full((1,), float("-inf"))])[self._parts]
            top = self._parts.gather(1, padded.argmax(1, keepdim=True)).squeeze(1)
            w[top] = w[top].clamp_min(self.gate_floor)

    def step(self, batch) -> dict:
        """One joint iteration: CE + the regulariser on ``batch``, one SGD step on the weights and
        the gates together, then the gates projected (range, minimum width)."""
        gn = self.gn
        gn.train()
        x, y = batch
        with self._own_rng():
            logits = gn(x)
            ce = F.cross_entropy(logits, y)
            terms = self.regulariser()
            loss = ce + terms["reg"].to(ce.dtype)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self._project()
        with torch.no_grad():
            acc = (logits.detach().argmax(1) == y).double().mean()
            self._sums += torch.stack([loss.detach().double(), ce.detach().double(), terms["reg"].detach().double(),
                                       acc, acc.new_ones(())])
        return {"loss": loss.detach(), "ce": ce.detach(), "reg": terms["reg"].detach(), "acc": acc,
                "flops": terms["ratio"].detach() * float(gn.base_macs)}

    # -- discretisation (GatedSearcher.keep: w > 0.5 when its MACs are in_band, else the largest
    # set by w that fits the budget)
    def in_band(self, fraction: float) -> bool:
        """PaS's band: within rho +- tolerance of the model's MACs."""
        return abs(fraction - self.flops_target) <= self.flops_tolerance

    def export(self, keep=None) -> nn.Module:
        """The pruned network: the channels of ``keep`` (default :meth:`keep`'s) at gate 1, the
        others cut out (the gated network's export at the keep's 0/1 gates; with the threshold
        keep these are the mask itself). A plain nn.Module of the model's own class, CPU, eval."""
        keep = self.keep()[0] if keep is None else keep
        with gates_as(self.gn, self.gn.keep_vector(keep).float()):
            return self.gn.export(keep)

    def architecture_extra(self, keep, how) -> dict:
        """PaS's keys: ``mask_macs`` (MACs of w > 0.5), ``open`` (share of gates with w > 0.5).
        Untied, the shared searcher adds ``tied_macs``."""
        mask = self.mask().detach()
        return {"mask_macs": float(self.gn.expected_macs(mask)), "open": float(mask.double().mean())}

    # -- per-epoch record
    def epoch_metrics(self) -> dict:
        loss, ce, reg, acc, _ = (self._sums / self._sums[4].clamp_min(1)).tolist()
        self._sums.zero_()
        mask = self.mask().detach()
        macs = float(self.gn.expected_macs(mask))
        return {"loss": loss, "ce": ce, "reg": reg, "train_acc": acc, "macs": macs,
                "macs_ratio": macs / self.gn.base_macs, "open": float(mask.double().mean())}
