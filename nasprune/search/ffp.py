"""FFP: fast filter pruning by a coarse-to-fine search, a memory bank of the interim
subnetworks and contrastive knowledge transfer (Lee & Song, TNNLS 2023; no FFP code exists, so
FFP here is the authors' EKG search and two-view bank distillation, methods-2.md 3.4).

    searcher = nasprune.search.FFP(model, flops_target=0.45, input_size=32)
    arch = searcher.search(train_set, epochs=1, batch_size=128)   # tune 1 epoch, then prune greedily
    bank = searcher.memory_bank(train_set)                         # K interim subnetworks' logits
    pruned = searcher.export()                                     # kept kernels rescaled (EKG)
    nasprune.train.train(pruned, bank.loader(train_set, 128), loss_fn=bank.ckt_loss(), ...)

A small file on the shared engine (:class:`nasprune.search.GatedNetwork`, ``gate="continuous"``):
the packed gate parameter holds the current subnetwork as a 0/1 mask. FFP's own parts:

- filter importance: per batch of the search set |dJ/dg| at the mask (= |sum_{n,h,w} dJ/dy * y|
  of every kept channel, the group's shared gate summing its sites), from the fused gate-gradient
  reduction, with J = CE + CE to the ensemble of the accepted subnetworks' logits;
- coarse: a trimmed (20 %) Otsu threshold over each group's removal-score sum picks the groups to
  try; fine: each tries removing its lowest-scored channels (step max(1/C, 0.2/calls)), every
  candidate is scored by J on the search set (each search batch run once up to the first layer a
  candidate changes, the candidates resuming from there; past the first 5 % of the MACs on a gated
  network of the physically slimmed current subnetwork), the lowest is accepted; until the exact
  MACs reach the target, the last step backed off channel by channel;
- the memory bank and the CKT loss (:class:`MemoryBank`, :func:`ckt_loss`).

See docs/ffp.md for every choice, its source and the departures.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nasprune import dist
from nasprune.nn.gated_conv import GatedConvBNAct2d
from nasprune.scores import otsu_threshold
from nasprune.search.gated import GatedNetwork
from nasprune.search.gated_searcher import GatedSearcher, gates_as

SEARCH_STEP = 0.2        # the first shrink of a group (EKG search_step; methods.md 4.2)
OTSU_TRIM = 0.2          # the trimmed Otsu threshold (EKG trimed_otsu; methods.md 4.2)
BANK_SIZE = 5            # K teachers (EKG num_teacher; methods-2.md 3.1)
SLIM_STEP = 0.05         # rebuild the slimmed scoring network every 5 % of the MACs removed (docs/ffp.md)


# ------------------------------------------------------------------ the CKT loss (methods-2.md 3.4)
def kl_t(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per sample T * sum softmax(p/T) (log softmax(p/T) - log softmax(q/T)): EKG's KL_T(p || q),
    the factor T, not T^2 (methods.md 4.2)."""
    t = float(temperature)
    logp = F.log_softmax(p_logits / t, -1)
    return t * (logp.exp() * (logp - F.log_softmax(q_logits / t, -1))).sum(-1)


def select_teachers(bank_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
                    best: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher of a batch: the mean of the bank entries closer to the best entry than the
    student is. bank_logits (B, K, classes); student_logits (B, classes), the mean over the views
    (no gradient flows through the choice). Closer: the batch-summed KL_T(best || entry) below
    KL_T(best || student); the best entry is always chosen. Returns (teacher logits (B, classes),
    the chosen entries (K,) bool)."""
    if bank_logits.dim() != 3 or bank_logits.shape[0] != student_logits.shape[0] or \
            bank_logits.shape[2] != student_logits.shape[-1]:
        raise ValueError(f"select_teachers: bank logits (B, K, classes) {tuple(bank_logits.shape)} do not match "
                         f"student logits (B, classes) {tuple(student_logits.shape)}")
    with torch.no_grad():
        top = bank_logits[:, best]
        d_student = kl_t(top, student_logits.detach(), temperature).sum()
        d_entries = kl_t(top.unsqueeze(1), bank_logits, temperature).sum(0)        # (K,)
        chosen = d_entries < d_student
        chosen[best] = True
        teacher = bank_logits[:, chosen].mean(1)
    return teacher, chosen


def ckt_loss(view_logits, targets: torch.Tensor, bank_logits: torch.Tensor, temperature: float = 4.0,
             best: int = 0) -> torch.Tensor:
    """FFP's contrastive knowledge transfer (EKG's two-view bank distillation, methods-2.md 3.4):
    the mean over the views of CE(view, y) + mean_b KL_T(teacher || view), the teacher chosen by
    :func:`select_teachers` from the views' mean logits. Averaging over the views averages the
    gradients. view_logits: a sequence of (B, classes) tensors."""
    views = list(view_logits)
    teacher, _ = select_teachers(bank_logits, torch.stack(views).mean(0), temperature, best)
    losses = [F.cross_entropy(z, targets) + kl_t(teacher, z, temperature).mean() for z in views]
    return torch.stack(losses).mean()


@dataclass
class MemoryBank:
    """K interim subnetworks of a search and their logits over a training set.

    logits: (N, K, classes) fp32, entry k's logits of training sample n (un-augmented); losses:
    (K,) the search's J of each entry, ascending (entry 0 is the best); keeps: (K, num_gates) their
    0/1 gate vectors. Save and load as safetensors (nothing pickled)."""
    logits: torch.Tensor
    losses: torch.Tensor
    keeps: torch.Tensor

    def __post_init__(self):
        if self.logits.dim() != 3 or self.logits.shape[1] != self.losses.numel():
            raise ValueError(f"MemoryBank: logits (N, K, classes) {tuple(self.logits.shape)} and losses "
                             f"{tuple(self.losses.shape)} disagree on K")

    @property
    def num_samples(self) -> int:
        return int(self.logits.shape[0])

    def save(self, path) -> None:
        """Write the bank to ``path``. Under torchrun call it on every rank: rank 0 writes, and
        every rank returns once the file is there (a later ``load`` on any rank finds it)."""
        from nasprune.io import save_atomic
        if dist.is_main():
            save_atomic({"logits": self.logits.contiguous(), "losses": self.losses.contiguous(),
                         "keeps": self.keeps.contiguous()}, path, {"nasprune.memory_bank": "1"})
        dist.barrier()

    @classmethod
    def load(cls, path) -> "MemoryBank":
        from safetensors.torch import load_file
        t = load_file(str(path))
        missing = {"logits", "losses", "keeps"} - set(t)
        if missing:
            raise ValueError(f"{path}: not a memory bank (missing {sorted(missing)})")
        return cls(t["logits"], t["losses"], t["keeps"])

    def loader(self, data, batch_size: int, *, device=None, seed: int = 0, **kwargs):
        """A DeviceLoader of ``data`` (the training set the bank was built on) yielding
        ((view 1, view 2), labels, sample indices): two independently augmented views."""
        from nasprune.data import DeviceLoader
        if len(data) != self.num_samples:
            raise ValueError(f"the memory bank holds logits of {self.num_samples} samples, the data has "
                             f"{len(data)}: give the training set the bank was built on")
        return DeviceLoader(data, batch_size, shuffle=True, augment=True, drop_last=len(data) > batch_size,
                            device=device, seed=seed, views=2, with_index=True, **kwargs)

    def ckt_loss(self, temperature: float = 4.0):
        """A ``loss_fn(model, batch) -> (loss, logits, targets)`` for :func:`nasprune.train.train`
        on batches of :meth:`loader`."""
        logits = self.logits

        def loss_fn(model, batch):
            views, y, index = batch
            zs = [model(x) for x in views]
            bank = logits.index_select(0, index.to(logits.device)).to(zs[0].device, zs[0].dtype)
            return ckt_loss(zs, y, bank, temperature), zs[0], y
        return loss_fn


# ------------------------------------------------------------------ the searcher
@dataclass(frozen=True)
class _Deal:
    """Which search batches and which of a step's candidates a rank scores under torchrun.

    Whole batches, never a rank's slice of one: FFP scores with batch statistics, and a slice's
    are not the batch's, so a sliced search set would not score what one process scores. With at
    least as many batches as ranks, rank r takes batches r, r + W, ... and every candidate on
    them; with fewer, the ranks of a batch (r, r + B, ...) share out its candidates. One process:
    every batch, every candidate."""
    batches: int
    ranks: int = 1
    rank: int = 0

    def own(self) -> list[int]:
        if self.batches >= self.ranks:
            return list(range(self.rank, self.batches, self.ranks))
        return [self.rank % self.batches]

    def candidates(self, batch: int, count: int) -> range:
        """The candidates (of ``count``) this rank scores on its batch ``batch``."""
        if self.batches >= self.ranks:
            return range(count)
        peers = len(range(batch, self.ranks, self.batches))
        return range(self.rank // self.batches, count, peers)


class FFP(GatedSearcher):
    """Greedy coarse-to-fine channel search of any CNN the gated network handles, under a MACs
    budget, from a trained model (methods.md 4, methods-2.md 3.4).

    model: the trained, unpruned model (copied). example_inputs: a tensor (batch 1 or 2) for
        tracing, or ``input_size`` (side of a square image) and ``in_channels``.
    flops_target: fraction of the model's MACs to keep, in (0, 1]; the search stops at the first
        subnetwork at or under it (its last step backed off channel by channel).
    search_per_class: the search set, the last N training images of each class (un-augmented, in
        order); tune_per_class: the pre-search tuning subset, the first N of each class (without
        the search set); tune_lr, momentum, weight_decay: its SGD (nesterov), ``epochs`` of
        :meth:`search` epochs of it.
    search_step: a group's shrink on its k-th acceptance is max(1/C, search_step / k) of its
        width. otsu_trim: trim of the coarse Otsu threshold. ensemble: J includes CE to the
        ensemble of the accepted subnetworks (EKG's pseudo-supernet); False: CE alone.
    bank_size: K, the memory bank's entries. seed: data order, dropout.
    cache_bytes: at most this many bytes of the current subnetwork's activations kept from a
        step's importance pass for its candidates to resume from (search batches beyond it run
        the current subnetwork once more instead); speed only, the results do not depend on it.
    slim_step: a greedy step scores (importance and candidates) on a gated network of the
        physically slimmed current subnetwork, rebuilt whenever the MACs have fallen by this
        fraction of the model's MACs since it was last built (None or 0: always on the full-width
        masked network). Speed only: the scores equal the masked network's to fp32 rounding.
    untie: search every residual block's output width on its own (``nasprune.graph.untie``,
        GatedSearcher): the export gathers on its shortcuts, the architecture adds ``tied_macs``.
    """

    method = "ffp"
    gate_kind = "continuous"

    def __init__(self, model: nn.Module, flops_target: float = 0.5, *, example_inputs=None, input_size: int = 32,
                 in_channels: int = 3, search_per_class: int = 32, tune_per_class: int = 256, tune_lr: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 5e-4, search_step: float = SEARCH_STEP,
                 otsu_trim: float = OTSU_TRIM, ensemble: bool = True, bank_size: int = BANK_SIZE, device=None,
                 seed: int = 0, cache_bytes: int = 1 << 30, slim_step: float | None = SLIM_STEP,
                 untie: bool = False):
        for name, v in (("search_per_class", search_per_class), ("bank_size", bank_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(tune_per_class, bool) or not isinstance(tune_per_class, int) or tune_per_class < 0:
            raise ValueError(f"tune_per_class must be an int >= 0, got {tune_per_class!r}")
        if not 0 < search_step <= 1:
            raise ValueError(f"search_step is a fraction of a group's width in (0, 1], got {search_step}")
        if not 0 <= otsu_trim < 0.5:
            raise ValueError(f"otsu_trim must lie in [0, 0.5), got {otsu_trim}")
        if not tune_lr >= 0:
            raise ValueError(f"tune_lr must be >= 0, got {tune_lr}")
        if slim_step is not None and not 0 <= slim_step <= 1:
            raise ValueError(f"slim_step is a fraction of the model's MACs in [0, 1] or None, got {slim_step}")
        super().__init__(model, flops_target, example_inputs=example_inputs, input_size=input_size,
                         in_channels=in_channels, flops_tolerance=1.0, gate_init=1.0, device=device, seed=seed,
                         untie=untie)
        del self.config["flops_tolerance"]             # the search's own stop rule: at or under the target
        gn = self.gn
        self.search_per_class, self.tune_per_class = search_per_class, tune_per_class
        self.search_step, self.otsu_trim = float(search_step), float(otsu_trim)
        self.use_ensemble, self.bank_size = bool(ensemble), bank_size
        self.tune_opt = torch.optim.SGD(self.weights, lr=tune_lr, momentum=momentum, weight_decay=weight_decay,
                                        nesterov=momentum > 0)
        self.optimizers["tune_opt"] = self.tune_opt
        self._removal = self._removal_tables()
        self.calls = torch.ones(len(gn.groups), dtype=torch.long)      # 1 + acceptances per group
        self.ensemble: torch.Tensor | None = None                      # (N_search, classes) running mean
        self.ensemble_count = 0
        self.trail: list[dict] = []          # accepted subnetworks: {"keep": (num_gates,) 0/1, "loss": J}
        self.tune_steps = 0
        self.cache_bytes = int(cache_bytes)
        self._caches: list = []            # per search batch, the importance pass's ForwardCache or None
        self.slim_step = float(slim_step) if slim_step else None
        self._slim_reset()
        self.full_width_scoring = {}       # trail index -> why its slimmed network could not score
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)   # tune loss, acc, n
        self.config.update(search_per_class=search_per_class, tune_per_class=tune_per_class, tune_lr=tune_lr,
                           momentum=momentum, weight_decay=weight_decay, search_step=search_step,
                           otsu_trim=otsu_trim, ensemble=self.use_ensemble, bank_size=bank_size)

    # -- set-up
    def _removal_tables(self) -> list[list[torch.Tensor]]:
        """Per gated group, the channel sets of its members that hold only part of it (each must
        keep one channel, as the keep rule and slim.apply require)."""
        graph = self.gn.graph
        parts = []
        for g in self.gn.groups:
            size = self.gn.sizes[g]
            parts.append([m.index_map.channels.clone() for m in graph.groups[g].members
                          if 0 < m.index_map.channels.numel() < size])
        return parts

    # -- the loop: tuning batches, then greedy steps
    def loaders(self, data, val_data, batch_size: int) -> dict:
        """The tuning subset (shuffled, augmented) and the search set (in order, un-augmented):
        the last ``search_per_class`` images of each class of ``data`` (or ``val_data`` whole)
        and the first ``tune_per_class`` of the rest."""
        from nasprune.data import DeviceLoader, ImageDataset
        if not isinstance(data, ImageDataset) or not (val_data is None or isinstance(val_data, ImageDataset)):
            raise TypeError(f"FFP.search takes ImageDatasets (it picks images per class), got "
                            f"{type(data).__name__}" + (f" and {type(val_data).__name__}" if val_data is not None else ""))
        labels = np.asarray(data.labels)
        search_idx, tune_idx = [], []
        for c in range(data.num_classes):
            idx = np.flatnonzero(labels == c)
            n_search = 0 if val_data is not None else min(self.search_per_class, len(idx))
            search_idx.append(idx[len(idx) - n_search:])
            tune_idx.append(idx[:len(idx) - n_search][:self.tune_per_class])
        # the search set interleaved by class (its i-th image of every class, then the (i+1)-th):
        # batch statistics of a class-sorted dataset's batches would see a few classes each
        rank = np.concatenate([np.arange(len(i)) for i in search_idx]) if search_idx else np.zeros(0, np.int64)
        flat = np.concatenate(search_idx) if search_idx else np.zeros(0, np.int64)
        search_set = val_data if val_data is not None else data.subset(flat[np.lexsort((flat, rank))])
        tune_idx = np.sort(np.concatenate(tune_idx))
        if len(search_set) == 0:
            raise ValueError("the search set is empty")
        # whole batches on every rank (never a rank's slice: a slice's batch statistics are not the batch's)
        search = DeviceLoader(search_set, min(batch_size, len(search_set)), shuffle=False, augment=False,
                              drop_last=False, device=self.device, seed=self.seed + 1, rank=0, world_size=1)
        loaders = {"search": search}
        self._deal = _Deal(len(search), dist.world_size(), dist.rank())
        own = self._deal.own()
        if len(own) == len(search):
            self._own_search = search
        else:              # this rank's batches alone, in order (the last one may be the short one)
            rows = np.concatenate([np.arange(b * search.batch_size, min((b + 1) * search.batch_size, len(search_set)))
                                   for b in own])
            self._own_search = DeviceLoader(search_set.subset(rows), search.batch_size, shuffle=False,
                                            augment=False, drop_last=False, device=self.device, rank=0, world_size=1)
        if self.tune_per_class and self.tune_opt.param_groups[0]["lr"] > 0 and len(tune_idx):
            tune = data.subset(tune_idx)
            loaders["tune"] = self.loader(tune, min(batch_size, len(tune)))
        self._loaders = loaders
        return loaders

    def epoch_length(self, loaders: dict) -> int:
        """Tuning batches plus an estimate of the greedy steps (the search simulated with the
        candidate that removes the fewest MACs winning every step; the real count depends on
        which candidates win); for progress and mid-search checkpoints only."""
        tune = len(loaders["tune"]) if "tune" in loaders else 0
        return tune + self._estimate_steps()

    def _estimate_steps(self) -> int:
        gn = self.gn
        v = torch.ones(gn.num_gates, dtype=torch.float64)
        kept = {g: gn.sizes[g] for g in gn.groups}
        calls = {g: 1 for g in gn.groups}
        steps, target = 0, self.flops_target * gn.base_macs
        while float(gn.expected_macs(v)) > target and steps < gn.num_gates:
            best = None
            for g in gn.groups:
                if kept[g] > 1:
                    n = self._shrunk(kept[g], gn.sizes[g], calls[g])
                    trial = v.clone()
                    trial[gn.offsets[g] + n:gn.offsets[g] + kept[g]] = 0
                    macs = float(gn.expected_macs(trial))
                    if best is None or macs > best[0]:
                        best = (macs, g, n, trial)
            if best is None:
                break
            _, g, kept[g], v = best
            calls[g] += 1
            steps += 1
        return steps

    def _shrunk(self, kept: int, size: int, calls: int) -> int:
        """A group's kept count after one shrink: its kept fraction less max(1/C, step / calls),
        at least one channel less, at least one channel kept."""
        step = max(1.0 / size, self.search_step / calls)
        return max(1, min(kept - 1, math.ceil(kept - size * step - 1e-9)))

    def begin_epoch(self, epoch, epochs, steps_per_epoch):
        self._epoch, self._epochs = epoch, epochs

    def iterate(self, loaders: dict):
        """Epoch e: the tuning batches of epoch e not yet run; the last epoch then one greedy step
        at a time until the subnetwork's MACs are at or under the target."""
        tune = loaders.get("tune")
        if tune is not None and self.tune_steps < (self._epoch + 1) * len(tune):
            for batch in tune:
                yield (batch,)
        if self._epoch == self._epochs - 1:
            while not self.finished():
                yield ()

    def finished(self) -> bool:
        return self.current_macs() <= self.flops_target * self.gn.base_macs

    # -- the current subnetwork
    def mask(self) -> torch.Tensor:
        """The current subnetwork's 0/1 gate values (num_gates,)."""
        return self.gn.gate.detach()

    def current_macs(self) -> float:
        return float(self.gn.expected_macs(self.mask()))

    @contextmanager
    def _batch_statistics(self):
        """The gated network with batch-statistics normalisation and no dropout (EKG scores
        subnetworks with BN in training mode), its running statistics left as they were."""
        gn = self.gn
        saved = {k: v.clone() for k, v in gn.named_buffers() if "running" in k or "num_batches" in k}
        was = gn.training
        gn.eval()
        for m in [*gn.sites.values(), *gn.modules()]:
            if isinstance(m, (GatedConvBNAct2d, nn.modules.batchnorm._NormBase)):
                m.train()
        try:
            yield gn
        finally:
            gn.train(was)
            buffers = dict(gn.named_buffers())
            with torch.no_grad():
                for k, v in saved.items():
                    buffers[k].copy_(v)

    # -- the network a greedy step scores on
    def _slim_reset(self) -> None:
        self._slim = None                  # (trail index, slimmed gated network or None, its slots) or None
        self._slim_scan, self._slim_entry, self._slim_macs = 0, None, float(self.gn.base_macs)

    def _slim_entry_now(self) -> int | None:
        """The trail entry the scoring network is slimmed at, None for the full width: the first
        entry whose MACs lie ``slim_step`` of the model's MACs or more below the unpruned network's,
        then the first that far below the last chosen one. A function of the trail alone, so a
        resumed search (every rank too) scores on the network the uninterrupted one did."""
        drop = self.slim_step * self.gn.base_macs
        while self._slim_scan < len(self.trail):
            macs = float(self.gn.expected_macs(self.trail[self._slim_scan]["keep"].double()))
            if macs <= self._slim_macs - drop:
                self._slim_entry, self._slim_macs = self._slim_scan, macs
            self._slim_scan += 1
        return self._slim_entry

    def _scoring(self, values=()) -> tuple:
        """(network, slots, values on it): the gated network a greedy step scores the current
        subnetwork and ``values`` (full-width 0/1 gate vectors) on. Past the first ``slim_step``
        of the MACs, the physically slimmed subnetwork of the trail entry :meth:`_slim_entry_now`
        names (:meth:`_slim_at`), its gates 0 where channels were removed since, ``slots`` the
        full-width slot of each of its gates; else, or where a vector keeps a channel the entry
        does not, the full-width network (slots None)."""
        values = [v.to(self.device, torch.float32) for v in values]
        entry = self._slim_entry_now() if self.slim_step is not None else None
        if entry is None:
            return self.gn, None, values
        if self._slim is None or self._slim[0] != entry:
            self._slim = None              # the old one freed before the new one is built
            run, why = self._slim_at(self.trail[entry]["keep"])
            slots = None
            if why is None:
                try:
                    slots = self.gn.slot_map(run, self.trail[entry]["keep"])
                except ValueError as e:    # slimming merged or reordered positions
                    why = f"its gates do not map onto the full network's: {e}"
            if slots is None:          # scored at full width: slower, the same scores; said once
                run = None
                self.full_width_scoring[entry] = why
                warnings.warn(f"FFP: the subnetwork of step {entry} is scored at full width ({why})",
                              RuntimeWarning, stacklevel=2)
            else:
                for n, p in run.named_parameters():
                    p.requires_grad_(n == "gate")
                slots = slots.to(self.device)
            self._slim = (entry, run, slots)
        _, run, slots = self._slim
        mask = self.mask()
        if run is None or any(int((v > 0.5).sum()) != int((v[slots] > 0.5).sum()) for v in [mask, *values]):
            return self.gn, None, values
        with torch.no_grad():
            run.gate.copy_(mask[slots])
        return run, slots, [v[slots] for v in values]

    def objective(self, logits: torch.Tensor, targets: torch.Tensor, ensemble: torch.Tensor | None) -> torch.Tensor:
        """J = CE(logits, y) + CE(softmax(ensemble), logits) (batch means; ensemble None: CE)."""
        j = F.cross_entropy(logits, targets)
        if ensemble is not None:
            j = j - (F.softmax(ensemble.float(), -1) * F.log_softmax(logits.float(), -1)).sum(-1).mean()
        return j

    def _search_batches(self):
        """(batch index, x, y, ensemble rows or None) of this rank's search-set batches, in order
        (every batch in one process)."""
        size = self._loaders["search"].batch_size
        for b, (x, y) in zip(self._deal.own(), self._own_search):
            ens = None
            if self.use_ensemble and self.ensemble is not None:
                ens = self.ensemble[b * size:b * size + len(y)]
            yield b, x, y, ens

    def _batch_sizes(self) -> list[int]:
        loader = self._loaders["search"]
        return [min(loader.batch_size, loader.num_samples - b * loader.batch_size) for b in range(len(loader))]

    def _num_outputs(self) -> int:
        """The network's output width (classes), from one eval-mode forward of the example input."""
        if getattr(self, "_outputs", None) is None:
            gn, was = self.gn, self.gn.training
            example = self.example_inputs if isinstance(self.example_inputs, torch.Tensor) else self.example_inputs[0]
            gn.eval()
            try:
                with torch.inference_mode():
                    self._outputs = int(gn(example[:1].to(self.device)).shape[-1])
            finally:
                gn.train(was)
        return self._outputs

    def _gathered_logits(self, parts: dict) -> torch.Tensor:
        """(N_search, classes): the logits of every search batch, from ``parts`` ({batch: its logits},
        each rank its own batches), summed over the ranks (each row comes from one rank, the others
        add zeros: exact)."""
        if not dist.is_distributed():
            return torch.cat([parts[b] for b in sorted(parts)])
        size, n = self._loaders["search"].batch_size, self._loaders["search"].num_samples
        out = torch.zeros(n, self._num_outputs(), device=self.device)
        for b, z in parts.items():
            out[b * size:b * size + len(z)] = z
        return dist.all_reduce_sum_(out)

    def importance(self) -> torch.Tensor:
        """Filter importance of the current subnetwork: the sum over the search set's batches of
        |g * dJ/dg| per gate (= |sum_{n,h,w} dJ/dy * y| over the group's sites; 0 for removed
        channels), from the gated network's fused gate-gradient reduction. fp64 (num_gates,).
        Keeps each batch's activations at every group's first layer (up to ``cache_bytes``) for
        :meth:`evaluate_candidates`. Runs on the step's scoring network (:meth:`_scoring`: past
        the first ``slim_step`` of the MACs, the slimmed subnetwork). Under torchrun each rank
        runs its own batches and the per-batch rows are summed in batch order on every rank, as
        one process sums them."""
        gn, deal = self.gn, self._deal
        net, slots, _ = self._scoring()
        rows = torch.zeros(deal.batches, gn.num_gates, dtype=torch.float64, device=self.device)
        mask = net.gate.detach()
        self._caches, held = [None] * deal.batches, 0
        with self._frozen(self.weights), self._batch_statistics():
            for b, x, y, ens in self._search_batches():
                counted = bool(deal.candidates(b, 1))     # a batch's row comes from one of its ranks
                net.gate.grad = None
                with torch.enable_grad() if counted else torch.no_grad():
                    if held < self.cache_bytes:   # the activations the step's candidates resume from
                        z, cache = net.forward_and_cache(x)
                        held += cache.nbytes
                    else:
                        z, cache = net(x), None
                self._caches[b] = cache if held <= self.cache_bytes else None
                if counted:
                    self.objective(z, y, ens).backward()
                    row = (net.gate.grad * mask).abs().double()
                    if slots is None:
                        rows[b] = row
                    else:
                        rows[b, slots] = row
        net.gate.grad = None
        dist.all_reduce_sum_(rows)
        scores = torch.zeros(gn.num_gates, dtype=torch.float64, device=self.device)
        for row in rows:                   # in batch order, whatever the number of ranks
            scores += row
        return scores

    def _mean_loss(self, per_batch) -> float:
        """The sample-weighted mean of per-batch losses, summed in batch order."""
        total, sizes = 0.0, self._batch_sizes()
        for b, j in enumerate(per_batch):
            total += j * sizes[b]
        return total / max(sum(sizes), 1)

    @torch.no_grad()
    def evaluate(self, values: torch.Tensor) -> tuple[float, torch.Tensor]:
        """J of the subnetwork with gate values ``values`` on the search set (sample-weighted mean
        of the batch means), and its logits (N_search, classes)."""
        per_batch = torch.zeros(self._deal.batches, dtype=torch.float64, device=self.device)
        parts = {}
        with self._batch_statistics(), gates_as(self.gn, values.to(self.device, torch.float32)):
            for b, x, y, ens in self._search_batches():
                if self._deal.candidates(b, 1):
                    z = self.gn(x)
                    per_batch[b] = float(self.objective(z, y, ens))
                    parts[b] = z.float()
        return self._mean_loss(dist.all_reduce_sum_(per_batch).tolist()), self._gathered_logits(parts)

    def _score(self, net, values: list, caches, wanted, per_batch, parts, after=None) -> None:
        """J (into ``per_batch[b, k]``) and logits (into ``parts[k][b]``) of candidates (gate
        vectors of ``net``, the step's scoring network) on this rank's search batches,
        ``wanted(b)`` naming the candidates of batch b (asked when the batch comes;
        ``after(b, ks)`` once they are scored); a batch's candidates resume the current
        subnetwork's forward together (from its cache when there is one)."""
        mask = net.gate.detach()
        for b, x, y, ens in self._search_batches():
            ks = list(wanted(b))
            if not ks:
                continue
            cache = caches[b] if caches is not None and b < len(caches) else None
            outs = net.forward_candidates(x, candidates=[values[k] for k in ks], reference=mask, cache=cache)
            for k, z in zip(ks, outs):
                per_batch[b, k] = float(self.objective(z, y, ens))
                parts[k][b] = z.float()
            if after is not None:
                after(b, ks)

    @staticmethod
    def _own_caches(net: GatedNetwork, caches):
        """``caches`` if every one of them was taken on ``net`` in its current train/eval mode
        (inside :meth:`_batch_statistics`), else None."""
        if caches is None:
            return None
        graph = id(net._resumable().gm)
        return caches if all(c is None or c.graph == graph for c in caches) else None

    @torch.no_grad()
    def evaluate_candidates(self, values: list, caches: list | None = None) -> list[tuple[float, torch.Tensor]]:
        """:meth:`evaluate` of each gate vector of ``values``, equal to it, without running the
        layers a candidate shares with the current subnetwork: a fine step's candidates differ
        from it in one group each, and each resumes the current subnetwork's forward of a
        search batch at the first layer the group reaches (:meth:`GatedNetwork.forward_candidates`),
        from ``caches`` (per search batch, a ForwardCache of the current subnetwork or None, as
        :meth:`importance` leaves them) or else from one forward of the current subnetwork.
        On the step's scoring network (:meth:`_scoring`), equal to the masked full width to fp32
        rounding; ``caches`` of another network are not used.
        Under torchrun each rank scores its share (:class:`_Deal`) and every rank gets all."""
        net, _, values = self._scoring(values)
        per_batch = torch.zeros(self._deal.batches, len(values), dtype=torch.float64, device=self.device)
        parts = [{} for _ in values]
        with self._batch_statistics():
            caches = self._own_caches(net, caches)
            self._score(net, values, caches, lambda b: self._deal.candidates(b, len(values)), per_batch, parts)
        table = dist.all_reduce_sum_(per_batch).T.tolist()
        return [(self._mean_loss(table[k]), self._gathered_logits(parts[k])) for k in range(len(values))]

    @torch.no_grad()
    def best_candidate(self, values: list, caches: list | None = None) -> tuple[int, float, torch.Tensor]:
        """(k, J, logits) of the lowest-J gate vector of ``values`` (the first of equals), as
        :meth:`evaluate_candidates` scores them, without finishing the candidates that cannot win.

        J is a mean of non-negative per-batch losses, so a candidate whose losses on part of the
        search set, weighted as in the mean, already exceed a finished candidate's J (or equal it,
        from a later index) cannot be the lowest. One process, every batch cached: every candidate
        on the first batch, the lowest of them on the rest, then the others batch by batch while
        they can still win (without caches, every candidate on every batch, each batch's current
        subnetwork run once).
        Under torchrun every rank scores its share of every batch (no early stop: that needs the
        others' losses) and the ranks take the same argmin over the same summed table."""
        net, _, values = self._scoring(values)
        deal, count = self._deal, len(values)
        per_batch = torch.zeros(deal.batches, count, dtype=torch.float64, device=self.device)
        parts = [{} for _ in values]
        with self._batch_statistics():
            caches = self._own_caches(net, caches)
            # the early stop runs the leader apart: worth it only where no batch reruns the prefix for it
            cached = caches is not None and len(caches) >= deal.batches and all(c is not None for c in caches)
            if dist.is_distributed() or deal.batches == 1 or not cached:
                self._score(net, values, caches, lambda b: deal.candidates(b, count), per_batch, parts)
                table = dist.all_reduce_sum_(per_batch).T.tolist()
                losses = [self._mean_loss(table[k]) for k in range(count)]
            else:
                sizes = self._batch_sizes()
                n = max(sum(sizes), 1)
                # every candidate on the first batch; the lowest there finishes first
                self._score(net, values, caches, lambda b: range(count) if b == 0 else (), per_batch, parts)
                partial = [float(per_batch[0, k]) * sizes[0] for k in range(count)]
                lead = min(range(count), key=lambda k: (partial[k] / n, k))
                self._score(net, values, caches, lambda b: (lead,) if b > 0 else (), per_batch, parts)
                losses = [None] * count
                losses[lead] = self._mean_loss(per_batch[:, lead].tolist())
                alive = set(range(count)) - {lead}

                def can_win(b):          # before batch b: drop those already above the leader
                    if b == 0:
                        return ()
                    for k in sorted(alive):
                        bound = partial[k] / n       # the weighted mean so far: J cannot end below it
                        if bound > losses[lead] or (bound == losses[lead] and k > lead):
                            alive.discard(k)
                            parts[k].clear()
                    return sorted(alive)

                def add(b, ks):
                    for k in ks:
                        partial[k] += float(per_batch[b, k]) * sizes[b]
                self._score(net, values, caches, can_win, per_batch, parts, add)
                for k in alive:
                    losses[k] = self._mean_loss(per_batch[:, k].tolist())
        best = None
        for k, loss in enumerate(losses):
            if loss is not None and (best is None or loss < losses[best]):
                best = k
        return best, losses[best], self._gathered_logits(parts[best])

    def candidates(self, scores: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """The fine step's candidates: (group, its 0/1 gate vector) for every group the coarse
        Otsu step keeps, each with its lowest-scored kept channels removed (the group's shrink,
        backed off channel by channel where it overshoots the target)."""
        gn, mask = self.gn, self.mask()
        target = self.flops_target * gn.base_macs
        scores = scores.cpu()
        options = []                       # (group position, removal order, count, removal-score sum)
        for i, g in enumerate(gn.groups):
            o, size = gn.offsets[g], gn.sizes[g]
            m, s = mask[o:o + size].cpu() > 0.5, scores[o:o + size]
            kept = m.nonzero().flatten()
            protected = set()
            for part in self._removal[i] + [torch.arange(size)]:
                held = part[m[part]]
                if held.numel():           # the best kept channel of every member stays
                    protected.add(int(held[torch.sort(s[held], descending=True, stable=True).indices[0]]))
            removable = [int(c) for c in kept.flip(0)[torch.sort(s[kept.flip(0)], stable=True).indices]
                         if int(c) not in protected]   # lowest score first; ties: the higher index
            count = min(len(kept) - self._shrunk(len(kept), size, int(self.calls[i])), len(removable))
            if count < 1:
                continue
            order = torch.tensor(removable, dtype=torch.long) + o
            options.append((i, order, count, float(s[order[:count] - o].sum())))
        if not options:
            return []
        # fp32 sums, as the search has always taken them
        threshold = otsu_threshold(torch.tensor([opt[3] for opt in options]), trim=self.otsu_trim)
        out = []
        for i, order, count, total in options:
            if total > threshold:
                continue
            v = mask.cpu().double().clone()
            v[order[:count]] = 0
            if float(gn.expected_macs(v)) < target:       # overshoots: back off to the fewest that reach it
                lo, hi = 1, count
                while lo < hi:
                    mid = (lo + hi) // 2
                    trial = mask.cpu().double().clone()
                    trial[order[:mid]] = 0
                    if float(gn.expected_macs(trial)) <= target:
                        hi = mid
                    else:
                        lo = mid + 1
                v = mask.cpu().double().clone()
                v[order[:lo]] = 0
            out.append((i, v))
        return out

    def step(self, batch=None) -> dict:
        """A tuning step on ``batch`` (CE, SGD, all gates open), or, without a batch, one greedy
        step: importance, coarse Otsu filter, every candidate scored, the lowest J accepted and
        added to the ensemble."""
        with self._own_rng():
            if batch is not None:
                return self._tune(batch)
            return self._greedy()

    def _tune(self, batch) -> dict:
        gn = self.gn
        gn.train()
        x, y = batch
        with self._frozen([gn.gate]):
            logits = gn(x)
            loss = F.cross_entropy(logits, y)
            self.tune_opt.zero_grad(set_to_none=True)
            loss.backward()
        self.tune_opt.step()
        self.tune_steps += 1
        self._slim = None                  # the weights moved: a slimmed scoring network is rebuilt
        acc = (logits.detach().argmax(1) == y).double().mean()
        self._sums += torch.stack([loss.detach().double(), acc, acc.new_ones(())])
        return {"loss": loss.detach(), "acc": acc, "flops": self.current_macs()}

    def _greedy(self) -> dict:
        self._start()
        return self._accept(*self._propose())

    def _start(self) -> None:
        """The unpruned start (once): the ensemble's first member, the trail's first entry."""
        if self.ensemble is None:
            loss, logits = self.evaluate(self.mask())
            self.ensemble, self.ensemble_count = logits, 1
            self.trail.append({"keep": self.mask().float().cpu().clone(), "loss": loss})

    def _propose(self) -> tuple:
        """A greedy step's scoring: (candidates [(group position, gate vector)], the lowest-J one's
        position, its J, its logits)."""
        cands = self.candidates(self.importance())
        if not cands:
            raise RuntimeError(f"FFP: no group can shrink further, at {self.current_macs() / self.gn.base_macs:.4f} "
                               f"of the MACs (target {self.flops_target})")
        k, loss, logits = self.best_candidate([v for _, v in cands], self._caches)
        self._caches = []
        return cands, k, loss, logits

    def _accept(self, cands: list, k: int, loss: float, logits: torch.Tensor) -> dict:
        """Candidate ``k`` of ``cands`` becomes the current subnetwork, joins the ensemble and the trail."""
        gn = self.gn
        i, v = cands[k]
        with torch.no_grad():
            gn.gate.copy_(v.to(gn.gate))
        self.calls[i] += 1
        self.ensemble = (self.ensemble * self.ensemble_count + logits) / (self.ensemble_count + 1)
        self.ensemble_count += 1
        self.trail.append({"keep": v.float(), "loss": loss})
        macs = self.current_macs()
        return {"loss": loss, "flops": macs, "candidates": len(cands), "group": gn.groups[i]}

    # -- discretisation: the mask is the architecture
    def keep(self) -> tuple[dict, str]:
        """The search's current subnetwork as a keep set, and ``"search"`` (at or under the
        target) or ``"unfinished"`` (a search stopped before it reached the target)."""
        return self.gn.keep("threshold", threshold=0.5), "search" if self.finished() else "unfinished"

    def export(self, keep=None, rescale: bool = True) -> nn.Module:
        """The pruned network: the kept channels of ``keep`` (default the search's subnetwork)
        with their inherited weights, each convolution kernel that lost channels rescaled to the
        Frobenius norm of the unpruned kernel (EKG ``get_pruned_network``; ``rescale=False``:
        equal to the gated network at the keep's 0/1 gates). Plain nn.Module, CPU, eval."""
        keep = self.keep()[0] if keep is None else keep
        with gates_as(self.gn, self.gn.keep_vector(keep).float()):
            net = self.gn.export(keep)
        if rescale:
            full = dict(self.gn.model.named_modules())
            with torch.no_grad():
                for name, m in net.named_modules():
                    ref = full.get(name)
                    if isinstance(m, nn.modules.conv._ConvNd) and ref is not None and m.weight.shape != ref.weight.shape:
                        norm = m.weight.norm()
                        if float(norm) > 0:
                            m.weight.mul_(ref.weight.detach().cpu().norm() / norm)
        return net

    def architecture_extra(self, keep, how) -> dict:
        """FFP's keys: ``steps`` (accepted greedy steps), ``trail_losses`` (J of each accepted
        subnetwork, the unpruned start first), and ``full_width_scoring`` (step -> why its
        physically slimmed scoring network could not be used, where one could not)."""
        extra = {"steps": max(len(self.trail) - 1, 0), "trail_losses": [float(t["loss"]) for t in self.trail]}
        if self.full_width_scoring:
            extra["full_width_scoring"] = {int(k): v for k, v in sorted(self.full_width_scoring.items())}
        return extra

    # -- the memory bank
    def bank_entries(self) -> list[int]:
        """Indices into the trail of the K teachers: for k = 1..K the entry (the final one
        excluded) whose loss is closest to L* + k/K (L0 - L*), L* the final subnetwork's loss and
        L0 the unpruned one's (methods-2.md 3.1, EKG poster), each entry chosen once while the
        trail has K entries besides the final one."""
        if len(self.trail) < 2:
            raise RuntimeError("the memory bank needs a finished search (no subnetwork was accepted)")
        losses = [float(t["loss"]) for t in self.trail]
        final, start = losses[-1], losses[0]
        pool = list(range(len(losses) - 1))
        chosen = []
        for i in range(1, self.bank_size + 1):
            level = final + i / self.bank_size * (start - final)
            free = [j for j in pool if j not in chosen] or pool    # distinct while the trail has enough
            chosen.append(min(free, key=lambda j: (abs(losses[j] - level), j)))
        return chosen

    def _slim_at(self, values: torch.Tensor) -> tuple[nn.Module, str | None]:
        """The subnetwork of the 0/1 gate vector ``values`` physically slimmed (the export without
        the rescale: the gated network at those gates, to fp32 rounding), on the searcher's
        device, normalising with batch statistics as :meth:`_batch_statistics` does: a gated
        network of the export with every gate open, so that it runs the same fused conv-BN-act
        kernels at the kept widths (a plain export would run unfused BatchNorms, slower on a CPU
        than the full-width fused masked network), and None; or, where the export cannot be
        gated, the plain export and why. A throwaway: its running statistics move."""
        with gates_as(self.gn, values.to(self.device, torch.float32)):
            keep = self.gn.keep("threshold", threshold=0.5)
        net = self.export(keep, rescale=False)
        example = self.example_inputs if isinstance(self.example_inputs, torch.Tensor) else self.example_inputs[0]
        why = None
        try:
            run = GatedNetwork(net, example.cpu(), gate=self.gate_kind)
            with torch.no_grad():
                run.gate.fill_(1.0)
        except Exception as e:     # noqa: BLE001 - a speed path only: a model it cannot rebuild runs plain
            run, why = net, f"the export cannot be gated: {type(e).__name__}: {e}"
        run = run.to(self.device).eval()
        for m in [*getattr(run, "sites", {}).values(), *run.modules()] if isinstance(run, GatedNetwork) \
                else run.modules():
            if isinstance(m, (GatedConvBNAct2d, nn.modules.batchnorm._NormBase)):
                m.train()
        return run, why

    def memory_bank(self, data, batch_size: int = 256) -> MemoryBank:
        """The memory bank over ``data`` (the training set, an ImageDataset, un-augmented): the
        logits of the K teachers (:meth:`bank_entries`) in data order, batch-statistics
        normalisation as in the search (batches of a seeded random order), sorted by their search
        loss (entry 0 the best). Each teacher runs physically slimmed (its export; equal to the
        gated network at its gates to fp32 rounding), without autograd. Under torchrun the ranks
        take whole batches in turn (r, r + W, ...) and every rank gets every logit."""
        from nasprune.data import DeviceLoader
        chosen = self.bank_entries()
        chosen.sort(key=lambda j: (float(self.trail[j]["loss"]), j))
        if isinstance(data, DeviceLoader):
            raise TypeError("memory_bank takes the training set as an ImageDataset (it batches it in its own order)")
        # batches in one seeded random order (a class-sorted dataset's batches in dataset order
        # would give the batch statistics a few classes each), the logits put back in data order
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed))
        deal = _Deal(math.ceil(len(data) / batch_size), dist.world_size(), dist.rank())
        own = [b for b in deal.own() if deal.candidates(b, 1)]
        rows = torch.cat([order[b * batch_size:(b + 1) * batch_size] for b in own]) if own else order[:0]
        loader = DeviceLoader(data.subset(rows.numpy()), batch_size, shuffle=False, augment=False,
                              device=self.device, rank=0, world_size=1) if own else ()
        per_entry = []
        for j in chosen:
            net = self._slim_at(self.trail[j]["keep"])[0]
            logits = torch.zeros(len(data), self._num_outputs())
            start = 0
            with torch.inference_mode():
                for x, _ in loader:
                    logits[rows[start:start + len(x)]] = net(x).float().cpu()
                    start += len(x)
            per_entry.append(dist.all_reduce_sum_(logits))     # each row from one rank
            del net
        return MemoryBank(torch.stack(per_entry, 1).contiguous(),
                          torch.tensor([float(self.trail[j]["loss"]) for j in chosen], dtype=torch.float64),
                          torch.stack([self.trail[j]["keep"].float().cpu() for j in chosen]))

    # -- per-epoch record, checkpoint state
    def epoch_metrics(self) -> dict:
        loss, acc, n = self._sums.tolist()
        self._sums.zero_()
        macs = self.current_macs()
        row = {"macs": macs, "macs_ratio": macs / self.gn.base_macs, "steps": max(len(self.trail) - 1, 0)}
        if n:
            row.update(tune_loss=loss / n, tune_acc=acc / n)
        if self.trail:
            row["search_loss"] = float(self.trail[-1]["loss"])
        return row

    def method_state(self) -> dict:
        return {**super().method_state(), "calls": self.calls, "tune_steps": self.tune_steps,
                "ensemble": self.ensemble, "ensemble_count": self.ensemble_count,
                "trail": [{"keep": t["keep"], "loss": float(t["loss"])} for t in self.trail],
                "full_width_scoring": [[int(k), v] for k, v in sorted(self.full_width_scoring.items())]}

    def load_method_state(self, state):
        super().load_method_state(state)
        self.calls = state["calls"].clone()
        self.tune_steps, self.ensemble_count = int(state["tune_steps"]), int(state["ensemble_count"])
        ens = state["ensemble"]
        self.ensemble = None if ens is None else ens.to(self.device)
        self.trail = [{"keep": t["keep"].clone(), "loss": float(t["loss"])} for t in state["trail"]]
        self.full_width_scoring = {int(k): v for k, v in state.get("full_width_scoring", [])}
        self._slim_reset()                 # replayed from the trail at the next step
