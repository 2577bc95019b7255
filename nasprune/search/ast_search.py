"""AST: adaptive search-and-training (Lu, Dong, Li, Wu, Li, Shi; TPAMI 2023; IJCAI 2020 "Beyond
Network Pruning"), with ThreshNet, a policy that learns the pruning threshold of every group.

    searcher = nasprune.search.AST(model, flops_target=0.5, input_size=32)   # cold start
    arch = searcher.search(train_set, epochs=20, batch_size=128)   # coarse phase, then 30 sub-nets
    pruned = searcher.export()                                     # the best sub-net, slimmed

A small file on the shared engine (:class:`nasprune.search.GatedSearcher`, ``gate="sampled"``):
the packed gate parameter is AST's learnable weight alpha per filter, ``y = alpha * BN(conv(x))``,
one vector per channel group (a residual stream shares one). What is AST's own:

- sampling: per group, ``alpha + noise * Gumbel``, softmax, and the smallest set of filters (by
  perturbed alpha) whose mass reaches the group's threshold theta (at least one filter);
- ThreshNet (:class:`ThreshNet`): an MLP on width-free per-group features (the cumulative softmax
  mass of alpha at 16 quantiles, log width, depth, resolution stage) choosing theta per group,
  trained by REINFORCE with a moving-average baseline;
- the search-train-map loop: a coarse phase trains the full target (a cold start re-initialises
  it), then each sub-network is sampled, physically slimmed (``slim.apply``), trained (weights on
  the training split, alpha on the held-out split), scored on held-out batches, mapped back into
  the target at its kept positions, rewarded ``-L_val - beta * max(0, cost / cost_0 - rho) / rho``
  and the policy updated; the best sub-network within the budget is exported.

The module is named ``ast_search`` so that no import of Python's own ``ast`` ever finds it. See
docs/ast.md for every choice and its source (methods.md section 6, methods-2.md section 4).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nasprune import dist
from nasprune.search.gated import GatedNetwork
from nasprune.search.gated_searcher import GatedSearcher, gates_as
from nasprune.train import kd_loss, seeded

THRESHOLDS = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85)   # methods-2 4.2 [3P-CODE] keep-mass actions
QUANTILES = 16                                       # methods-2 4.5 feature resolution
STAGES = 6                                           # resolution levels told apart (input / 2^k)
NUM_FEATURES = QUANTILES + 2 + STAGES


# ------------------------------------------------------------------ sampling
def gumbel(shape, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Standard Gumbel noise -log(E), E ~ Exp(1), from ``generator`` (CPU)."""
    e = torch.empty(shape, dtype=dtype).exponential_(generator=generator)
    return -torch.log(e.clamp_min(1e-30))


def mass_count(alpha: torch.Tensor, theta: float) -> int:
    """The smallest number of entries of ``alpha`` (largest first) whose softmax mass reaches
    ``theta``; at least 1."""
    p = torch.softmax(alpha.double(), 0).sort(descending=True).values
    below = int((p.cumsum(0) < theta - 1e-12).sum())
    return min(max(below + 1, 1), alpha.numel())


class ThreshNet(nn.Module):
    """The threshold policy: per-group features (num_groups, NUM_FEATURES) -> logits over the
    thresholds. Width-free: the same network scores a group of 16 or of 2048 filters. The last
    layer starts at zero, so the first policy is uniform."""

    def __init__(self, num_actions: int = len(THRESHOLDS), hidden: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_actions)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != NUM_FEATURES:
            raise ValueError(f"ThreshNet: features must have shape (groups, {NUM_FEATURES}), got "
                             f"{tuple(features.shape)}")
        return self.head(self.body(features))


# ------------------------------------------------------------------ the searcher
class AST(GatedSearcher):
    """Channel search of any CNN the gated network handles by AST's sample-train-map loop under a
    MACs or a parameters budget.

    model: the unpruned model (copied). example_inputs: a tensor (batch 1 or 2), or ``input_size``
        and ``in_channels``; the costs depend on it.
    flops_target: rho of a MACs budget, the fraction of the model's MACs to keep, in (0, 1];
    params_target: rho of a parameters budget instead (then flops_target must be None). Default:
        a MACs budget of 0.5.
    start: "cold" re-initialises the weights (the layers' reset_parameters, seeded) and alpha
        ~ U(0, 1), then trains the full target for ``coarse_fraction`` of the search's steps;
        "warm" keeps the model's weights, alpha = 1 (the model's own function), and by default no
        coarse phase.
    coarse_fraction: share of the search's weight steps spent on the full target before the first
        sub-network (None: 0.2 cold, 0 warm). coarse_lr: its SGD step (cosine to 0).
    subnets: sub-networks sampled, trained and mapped back; the remaining steps are split evenly
        between them. thresholds: the policy's actions (keep-mass thresholds, increasing, in
        (0, 1]). noise: scale of the Gumbel noise added to alpha when sampling.
    cost_weight: beta of the reward's budget penalty. baseline_decay: of the reward's moving
        average. policy_lr: ThreshNet's Adam step. select_band: the exported sub-network is the
        best by reward among those whose cost lies in [target - select_band, target], else among
        those within the budget, else (none within it) the largest set by alpha that fits.
        fill_budget: the export keeps the selected sub-network's channels and adds, by its
        snapshot's alpha, the target's other channels that still fit the budget (the sampled
        sub-networks land under the target; this brings the export up to it).
    lr, momentum, weight_decay: each sub-network's SGD on its weights (constant lr).
    alpha_lr, alpha_momentum, alpha_weight_decay: SGD on alpha, on held-out batches; alpha_every:
        weight steps between alpha steps (None: a fifth of a sub-network's steps). alpha is held
        >= 0 (a negative weight after a ReLU cannot be exported).
    split: share of each class for the weights when search() gets no val_data (the rest is the
        held-out split). val_batches: held-out batches (in order, not augmented) that score a
        sub-network (None: the whole split).
    teacher: robust mode, a trained model whose logits train every sub-network (and the coarse
        phase) by KD: (1 - kd_lambda) CE + kd_lambda T^2 KL at kd_temperature.
    round_to: every sampled width (and the budget keep's) rounded down to a multiple of it, never
        below one multiple, at every layer (GatedSearcher's rule); the rounding mostly lowers the
        sampled cost.
    seed: weight initialisation (cold), alpha, noise, actions, data order, dropout.
    """

    method = "ast"
    gate_kind = "sampled"

    def __init__(self, model: nn.Module, flops_target: float | None = None, *, params_target: float | None = None,
                 example_inputs=None, input_size: int = 32, in_channels: int = 3, start: str = "cold",
                 coarse_fraction: float | None = None, coarse_lr: float = 0.1, subnets: int = 30,
                 thresholds=THRESHOLDS, noise: float = 0.05, cost_weight: float = 2.0, baseline_decay: float = 0.7,
                 policy_lr: float = 3e-3, select_band: float = 0.1, fill_budget: bool = False, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 alpha_lr: float = 1e-3, alpha_momentum: float = 0.9, alpha_weight_decay: float = 1e-4,
                 alpha_every: int | None = None, split: float = 0.8, val_batches: int | None = 8,
                 teacher: nn.Module | None = None, kd_lambda: float = 0.9, kd_temperature: float = 4.0,
                 round_to: int = 1, device=None, seed: int = 0):
        if params_target is not None and flops_target is not None:
            raise ValueError("give one budget: flops_target (MACs) or params_target (parameters), not both")
        budget = "params" if params_target is not None else "macs"
        target = params_target if params_target is not None else (0.5 if flops_target is None else flops_target)
        if not 0 < target <= 1:
            raise ValueError(f"{budget} target is the fraction kept, in (0, 1]; got {target}")
        if start not in ("cold", "warm"):
            raise ValueError(f"start must be 'cold' (from scratch) or 'warm' (the model's weights), got {start!r}")
        coarse_fraction = (0.2 if start == "cold" else 0.0) if coarse_fraction is None else float(coarse_fraction)
        if not 0 <= coarse_fraction < 1:
            raise ValueError(f"coarse_fraction is a share of the search's steps, in [0, 1); got {coarse_fraction}")
        thresholds = tuple(float(t) for t in thresholds)
        if not thresholds or any(not 0 < t <= 1 for t in thresholds) or list(thresholds) != sorted(set(thresholds)):
            raise ValueError(f"thresholds must be distinct, increasing and in (0, 1]; got {thresholds}")
        if int(subnets) < 1:
            raise ValueError(f"subnets must be >= 1, got {subnets}")
        if noise < 0 or not 0 <= baseline_decay < 1 or cost_weight < 0:
            raise ValueError(f"noise >= 0, baseline_decay in [0, 1) and cost_weight >= 0 are needed; got {noise}, "
                             f"{baseline_decay}, {cost_weight}")
        if not 0 <= select_band < 1:
            raise ValueError(f"select_band is a fraction of the model's cost, in [0, 1); got {select_band}")
        if not 0 < split < 1:
            raise ValueError(f"split is the weights' share of each class, in (0, 1); got {split}")
        if val_batches is not None and int(val_batches) < 1:
            raise ValueError(f"val_batches must be >= 1 or None (the whole held-out split), got {val_batches}")
        if alpha_every is not None and int(alpha_every) < 1:
            raise ValueError(f"alpha_every must be >= 1 or None, got {alpha_every}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module (robust mode) or None, got {type(teacher).__name__}")
        super().__init__(model, target if budget == "macs" else 1.0, example_inputs=example_inputs,
                         input_size=input_size, in_channels=in_channels, flops_tolerance=1.0, gate_init=1.0,
                         device=device, seed=seed, round_to=round_to)
        gn = self.gn
        self.budget, self.target = budget, float(target)
        self.start, self.coarse_fraction, self.coarse_lr = start, coarse_fraction, float(coarse_lr)
        self.subnets, self.thresholds, self.noise = int(subnets), thresholds, float(noise)
        self.cost_weight, self.baseline_decay = float(cost_weight), float(baseline_decay)
        self.select_band, self.fill_budget = float(select_band), bool(fill_budget)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.alpha_lr, self.alpha_momentum = float(alpha_lr), float(alpha_momentum)
        self.alpha_weight_decay = float(alpha_weight_decay)
        self.alpha_every = None if alpha_every is None else int(alpha_every)
        self.split, self.val_batches = float(split), None if val_batches is None else int(val_batches)
        self.teacher = None if teacher is None else teacher.to(self.device).eval()
        self.kd_lambda, self.kd_temperature = float(kd_lambda), float(kd_temperature)
        self.generator = torch.Generator().manual_seed(self.seed)    # alpha init, noise, actions
        with seeded(self.seed, self.device):
            if start == "cold":
                for m in gn.model.modules():
                    if m is not gn.model and hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            self.policy = ThreshNet(len(thresholds)).to(self.device)
        with torch.no_grad():
            if start == "cold":      # alpha ~ U(0, 1) [3P-CODE]
                gn.gate.copy_(torch.rand(gn.num_gates, generator=self.generator, dtype=torch.float64))
        self.p_opt = torch.optim.Adam(self.policy.parameters(), lr=policy_lr)
        self.w_opt = torch.optim.SGD(self.weights, lr=self.coarse_lr, momentum=momentum, weight_decay=weight_decay,
                                     nesterov=momentum > 0)
        self.a_opt = torch.optim.SGD([gn.gate], lr=alpha_lr, momentum=alpha_momentum,
                                     weight_decay=alpha_weight_decay)
        self.optimizers.update(w_opt=self.w_opt, a_opt=self.a_opt, p_opt=self.p_opt)
        self._static = self._static_features()
        self._probe = self._index_probe()
        self.baseline: float | None = None
        self.episodes: list[dict] = []
        self.best: dict | None = None          # {"episode", "keep", "state"} of the best sub-net in budget
        self.sub: _Subnet | None = None
        self.total_steps = self.coarse_steps = 0
        self._sums = torch.zeros(4, dtype=torch.float64, device=self.device)   # loss, acc, n, alpha steps
        self._loaders: dict = {}
        self._val = None
        self.config.update(budget=budget, target=self.target, start=start, coarse_fraction=coarse_fraction,
                           coarse_lr=coarse_lr, subnets=self.subnets, thresholds=list(thresholds), noise=noise,
                           cost_weight=cost_weight, baseline_decay=baseline_decay, policy_lr=policy_lr,
                           select_band=select_band, lr=lr,
                           momentum=momentum, weight_decay=weight_decay, alpha_lr=alpha_lr,
                           alpha_momentum=alpha_momentum, alpha_weight_decay=alpha_weight_decay,
                           alpha_every=alpha_every, split=split, val_batches=val_batches, robust=teacher is not None,
                           kd_lambda=kd_lambda, kd_temperature=kd_temperature)
        for key in ("flops_tolerance", "gate_init"):
            self.config.pop(key)
        self.config["flops_target"] = self.target if budget == "macs" else None

    # -- set-up helpers
    def _static_features(self) -> torch.Tensor:
        """Per group: log2 width / 4, depth (the group's order), the resolution stage one-hot
        (the first of its producers' output side, as the input's side halved k times)."""
        gn = self.gn
        sides, hooks = {}, []
        model = self.base_model    # the user's layers run as modules (the gated network fuses them)

        def record(name):
            def hook(module, inputs, out):
                sides.setdefault(name, out.shape[-1] if out.dim() > 2 else 1)
            return hook
        for name, m in model.named_modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Linear)):
                hooks.append(m.register_forward_hook(record(name)))
        inputs = [self.example_inputs] if isinstance(self.example_inputs, torch.Tensor) else list(self.example_inputs)
        example = inputs[0]
        device = next(iter(model.parameters()), torch.zeros(())).device
        was = model.training
        try:
            with torch.no_grad():
                model.eval()
                model(*[x.to(device) for x in inputs])
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        full = example.shape[-1] if example.dim() > 2 else 1
        rows = []
        n = len(gn.groups)
        for i, g in enumerate(gn.groups):
            side = None
            for member in gn.graph.groups[g].members:
                if member.role in ("out", "channel") and member.module in sides:
                    side = sides[member.module]
                    break
            level = 0 if side is None else int(round(math.log2(max(full, 1) / max(side, 1))))
            stage = torch.zeros(STAGES, dtype=torch.float64)
            stage[min(max(level, 0), STAGES - 1)] = 1
            rows.append(torch.cat([torch.tensor([math.log2(gn.sizes[g]) / 4, i / max(n - 1, 1)],
                                                dtype=torch.float64), stage]))
        return torch.stack(rows)

    def _index_probe(self) -> nn.Module:
        """A CPU copy of the model whose every floating tensor holds its own flat indices:
        ``slim.apply`` of it says, per tensor of a slimmed network, where each entry came from."""
        import copy
        probe = copy.deepcopy(self.base_model).cpu().double()
        with torch.no_grad():
            for t in list(probe.parameters()) + list(probe.buffers()):
                if t.is_floating_point():
                    t.copy_(torch.arange(t.numel(), dtype=torch.float64).view(t.shape))
        return probe

    # -- the policy
    def policy_features(self, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """(groups, NUM_FEATURES): per group the cumulative softmax mass of alpha (largest first)
        at 1/16 ... 16/16 of its filters, then :meth:`_static_features`'s columns."""
        gn = self.gn
        alpha = (gn.gate.detach() if alpha is None else alpha).double().cpu()
        rows = []
        for g in gn.groups:
            o, size = gn.offsets[g], gn.sizes[g]
            cum = torch.softmax(alpha[o:o + size], 0).sort(descending=True).values.cumsum(0)
            at = torch.ceil(torch.arange(1, QUANTILES + 1, dtype=torch.float64) * size / QUANTILES).long() - 1
            rows.append(cum[at.clamp(0, size - 1)])
        return torch.cat([torch.stack(rows), self._static], 1).float()

    def policy_probs(self, features: torch.Tensor) -> torch.Tensor:
        """(groups, thresholds): ThreshNet's probabilities."""
        with torch.no_grad():
            return torch.softmax(self.policy(features.to(self.device)), 1).cpu()

    def sample_actions(self, features: torch.Tensor) -> torch.Tensor:
        """One threshold index per group, drawn from ThreshNet with the searcher's generator."""
        probs = self.policy_probs(features).double()
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def reinforce(self, features: torch.Tensor, actions: torch.Tensor, reward: float) -> dict:
        """One REINFORCE update: loss = -(reward - b) * sum over groups of log pi(action), b the
        moving average of the rewards before this one (the first reward starts it), then b moves
        towards ``reward``. Returns the advantage, the baseline used and the loss."""
        reward = float(reward)
        baseline = reward if self.baseline is None else self.baseline
        advantage = reward - baseline
        logp = torch.log_softmax(self.policy(features.to(self.device)), 1)
        chosen = logp.gather(1, actions.to(self.device).long().view(-1, 1)).sum()
        loss = -advantage * chosen
        self.p_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.p_opt.step()
        self.baseline = self.baseline_decay * baseline + (1 - self.baseline_decay) * reward
        return {"advantage": advantage, "baseline": baseline, "policy_loss": float(loss.detach())}

    # -- sampling a sub-network
    def sample_keep(self, theta: torch.Tensor, alpha: torch.Tensor | None = None) -> dict:
        """The keep set of one sample: per group, alpha + noise * Gumbel, and the smallest set of
        filters (by that perturbed alpha) whose softmax mass reaches the group's ``theta``; every
        layer holding part of a group keeps one of its channels."""
        gn = self.gn
        alpha = (gn.gate.detach() if alpha is None else alpha).double().cpu()
        noisy = alpha + self.noise * gumbel(alpha.shape, self.generator)
        counts = {g: mass_count(noisy[o:o + gn.sizes[g]], float(theta[i]))
                  for i, (g, o) in enumerate(gn.offsets.items())}
        with gates_as(gn, noisy.float()):
            return gn.keep("topk", k=counts, round_to=self.round_to)

    def cost(self, keep) -> float:
        """The budget's cost of ``keep`` (MACs or parameters) as a fraction of the model's."""
        vector = self.gn.keep_vector(keep).to(self.device)
        if self.budget == "macs":
            return float(self.gn.expected_macs(vector)) / self.gn.base_macs
        return float(self.gn.expected_params(vector)) / self.gn.base_params

    def reward(self, val_loss: float, cost: float) -> float:
        """-L_val - beta * max(0, cost - rho) / rho (cost a fraction of the model's)."""
        return -float(val_loss) - self.cost_weight * max(0.0, cost - self.target) / self.target

    # -- the loop
    def loaders(self, data, val_data, batch_size: int) -> dict:
        """Weight batches from ``data`` (or its per-class ``split`` share, seed 111, when no
        val_data), alpha batches from the held-out rest, both shuffled and augmented; the
        sub-networks are scored on the held-out set in order, not augmented."""
        if val_data is None:
            from nasprune.data import tas_split
            data, val_data = tas_split(data, ratio=self.split)
        self._loaders = {"weights": self.loader(data, batch_size), "arch": self.loader(val_data, batch_size, offset=1)}
        self._val = self.loader(val_data, batch_size, shuffle=False, augment=False, drop_last=False, offset=2)
        return self._loaders

    def iterate(self, loaders):
        for batch in loaders["weights"]:
            yield (batch,)

    def begin_epoch(self, epoch, epochs, steps_per_epoch):
        self.total_steps = epochs * steps_per_epoch
        self.coarse_steps = int(round(self.coarse_fraction * self.total_steps))
        left = self.total_steps - self.coarse_steps
        if left < self.subnets:
            raise ValueError(f"AST: {left} steps are left after the coarse phase ({self.coarse_steps} of "
                             f"{self.total_steps}), fewer than subnets={self.subnets}; search more epochs, use "
                             f"smaller batches or fewer subnets")

    def _episode_bounds(self, e: int) -> tuple[int, int]:
        """First and end step of sub-network ``e``."""
        left = self.total_steps - self.coarse_steps
        return (self.coarse_steps + e * left // self.subnets, self.coarse_steps + (e + 1) * left // self.subnets)

    def _alpha_every(self) -> int:
        if self.alpha_every is not None:
            return self.alpha_every
        return max(1, (self.total_steps - self.coarse_steps) // (self.subnets * 5))

    def _loss(self, net, x, y):
        logits = net(x)
        if self.teacher is None:
            return F.cross_entropy(logits, y), logits
        with torch.no_grad():
            t = self.teacher(x)
        return kd_loss(logits, t, y, self.kd_lambda, self.kd_temperature), logits

    def _train_step(self, gn: GatedNetwork, w_opt, a_opt, batch, alpha_step: bool):
        """An SGD step on the weights with ``batch``, then, if ``alpha_step``, one on alpha with
        the next held-out batch (CE), alpha held >= 0."""
        gn.train()
        x, y = batch
        with self._frozen([gn.gate]):
            loss, logits = self._loss(gn, x, y)
            w_opt.zero_grad(set_to_none=True)
            loss.backward()
        w_opt.step()
        if alpha_step:
            xa, ya = self.next_batch(self._loaders["arch"])
            weights = [p for n, p in gn.named_parameters() if n != "gate"]
            with self._frozen(weights):
                a_loss = F.cross_entropy(gn(xa), ya)
                a_opt.zero_grad(set_to_none=True)
                a_loss.backward()
            a_opt.step()
            with torch.no_grad():
                gn.gate.clamp_(min=0)
        with torch.no_grad():
            acc = (logits.detach().argmax(1) == y).double().mean()
            self._sums += torch.stack([loss.detach().double(), acc, acc.new_ones(()), acc.new_tensor(float(alpha_step))])
        return loss.detach(), acc

    def step(self, batch) -> dict:
        """One weight step: of the full target during the coarse phase, else of the current
        sub-network (sampled at its first step; scored, mapped back, rewarded at its last)."""
        with self._own_rng():
            if self.global_step < self.coarse_steps:
                lr = 0.5 * self.coarse_lr * (1 + math.cos(math.pi * self.global_step / self.coarse_steps))
                for group in self.w_opt.param_groups:
                    group["lr"] = lr
                self.gn.gate_fn.sample(None)
                alpha_step = (self.global_step + 1) % self._alpha_every() == 0
                loss, acc = self._train_step(self.gn, self.w_opt, self.a_opt, batch, alpha_step)
                return {"loss": loss, "acc": acc, "flops": float(self.gn.base_macs)}
            if self.sub is None:
                self._begin_subnet()
            sub = self.sub
            sub.steps += 1
            loss, acc = self._train_step(sub.gn, sub.w_opt, sub.a_opt, batch, sub.steps % self._alpha_every() == 0)
            metrics = {"loss": loss, "acc": acc, "flops": sub.macs}
            if self.global_step + 1 >= self._episode_bounds(len(self.episodes))[1]:
                metrics.update(self._end_subnet())
            return metrics

    def _begin_subnet(self) -> None:
        features = self.policy_features()
        actions = self.sample_actions(features)
        theta = torch.tensor([self.thresholds[a] for a in actions.tolist()], dtype=torch.float64)
        keep = self.sample_keep(theta)
        self.sub = _Subnet(self, keep, features, actions)

    @torch.no_grad()
    def validate(self, net: nn.Module) -> dict:
        """Mean CE and accuracy of ``net`` (eval mode) on the first ``val_batches`` held-out batches."""
        was = net.training
        net.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i, (x, y) in enumerate(self._val):
            if self.val_batches is not None and i >= self.val_batches:
                break
            z = net(x)
            sums += torch.stack([F.cross_entropy(z, y, reduction="sum").double(), (z.argmax(1) == y).double().sum(),
                                 sums.new_tensor(float(y.numel()))])
        net.train(was)
        loss, correct, n = dist.all_reduce_sum_(sums).tolist()    # under torchrun: over every rank's share
        return {"loss": loss / max(n, 1), "acc": correct / max(n, 1)}

    def _end_subnet(self) -> dict:
        sub, self.sub = self.sub, None
        scores = self.validate(sub.gn)
        sub.map_back()
        reward = self.reward(scores["loss"], sub.cost)
        update = self.reinforce(sub.features, sub.actions, reward)
        e = len(self.episodes)
        record = {"subnet": e, "step": self.global_step + 1, "cost": sub.cost, "macs": sub.macs,
                  "val_loss": scores["loss"], "val_acc": scores["acc"], "reward": reward,
                  "thresholds": [self.thresholds[a] for a in sub.actions.tolist()], **update,
                  "keep": {str(g): idx.tolist() for g, idx in sub.keep.items()}}
        self.episodes.append(record)
        rank = self._rank(sub.cost, reward)
        if rank is not None and (self.best is None or rank > self.best["rank"]):
            self.best = {"subnet": e, "rank": rank, "keep": sub.keep,
                         "state": {k: v.detach().clone() for k, v in self.gn.state_dict().items()}}
        return {"reward": reward, "val_loss": scores["loss"], "advantage": update["advantage"]}

    def _rank(self, cost: float, reward: float):
        """How a sub-network ranks for export: None over the budget; within it, those in the band
        [target - select_band, target] before the others, then by reward."""
        if cost > self.target + 1e-12:
            return None
        return (float(cost >= self.target - self.select_band), reward)

    # -- discretisation
    def budget_limit(self) -> dict:
        """The budget as the gated network's keep("budget") takes it: MACs or parameters."""
        return {self.budget: self.target}

    def keep(self) -> tuple[dict, str]:
        """The best sub-network within the budget (``"subnet"``; with ``fill_budget``, topped up
        to the budget), or, when none was, the largest set of channels by alpha that fits
        (``"budget"``)."""
        if self.best is None:
            return self.budget_keep(self.gn.gate.detach()), "budget"
        if not self.fill_budget:
            return self.best["keep"], "subnet"
        return self.filled(self.best["keep"], self.best["state"]["gate"]), "subnet"

    def filled(self, keep: dict, alpha: torch.Tensor) -> dict:
        """``keep`` topped up to the budget: the other channels of each group in blocks of
        ``round_to`` (largest alpha first; the last block completes the group), the blocks in
        the order of their largest alpha, each added when the cost still fits. Greedy with
        skips, so one costly block (a wide residual stream's channel) does not stop the other
        groups; a group whose block did not fit takes no more (its next block costs as much)."""
        gn = self.gn
        alpha = alpha.detach().double().cpu()
        vector = gn.keep_vector(keep).to(self.device)
        blocks = []
        for g, o in gn.offsets.items():
            free = [o + i for i in torch.argsort(-alpha[o:o + gn.sizes[g]], stable=True).tolist()
                    if vector[o + i] == 0]
            blocks += [(g, free[i:i + self.round_to]) for i in range(0, len(free), self.round_to)]
        blocks.sort(key=lambda b: -float(alpha[b[1][0]]))
        cost = gn.expected_macs if self.budget == "macs" else gn.expected_params
        limit = self.target * (gn.base_macs if self.budget == "macs" else gn.base_params) * (1 + 1e-12)
        closed = set()
        for g, block in blocks:
            if g in closed:
                continue
            vector[block] = 1
            if float(cost(vector)) > limit:
                vector[block] = 0
                closed.add(g)
        vector = vector.cpu()
        return {g: torch.nonzero(vector[o:o + gn.sizes[g]]).flatten() for g, o in gn.offsets.items()
                if int(vector[o:o + gn.sizes[g]].sum()) < gn.sizes[g]}

    def export(self, keep=None) -> nn.Module:
        """The pruned network: the best sub-network (its weights and alpha, folded), or the
        target at ``keep`` / the budget keep. A plain nn.Module of the model's own class, CPU,
        eval mode."""
        gn = self.gn
        gn.gate_fn.sample(None)
        if keep is not None or self.best is None:
            return gn.export(self.keep()[0] if keep is None else keep)
        current = {k: v.detach().clone() for k, v in gn.state_dict().items()}
        try:
            gn.load_state_dict(self.best["state"])
            return gn.export(self.keep()[0])
        finally:
            gn.load_state_dict(current)

    def architecture_extra(self, keep, how) -> dict:
        """AST's keys: the budget and its target, the selected sub-network and its record, the
        number of sub-networks and the policy's mean probability of its most likely threshold."""
        # fill_budget is not in the config: it changes only the export, so a resumed search may set it
        extra = {"budget": self.budget, "target": self.target, "subnets_done": len(self.episodes),
                 "fill_budget": self.fill_budget,
                 "policy_confidence": float(self.policy_probs(self.policy_features()).max(1).values.mean())}
        if how == "subnet":
            chosen = self.episodes[self.best["subnet"]]
            extra.update(subnet=chosen["subnet"], subnet_cost=chosen["cost"], val_loss=chosen["val_loss"],
                         val_acc=chosen["val_acc"], reward=chosen["reward"], thresholds=chosen["thresholds"])
        return extra

    # -- per-epoch record
    def epoch_metrics(self) -> dict:
        loss, acc, n, _ = (self._sums / self._sums[2].clamp_min(1)).tolist()
        alpha_steps = int(self._sums[3])
        self._sums.zero_()
        done = [e for e in self.episodes if e.get("epoch") is None]
        for e in done:
            e["epoch"] = len(self.history) + 1
        last = self.episodes[-1] if self.episodes else None
        if not self.episodes:        # the coarse phase: the full target on the held-out batches
            scores = self.validate(self.gn) if self._val is not None else {"loss": 0.0, "acc": 0.0}
            done = [{"reward": -scores["loss"], "val_loss": scores["loss"], "val_acc": scores["acc"]}]
        done = done or [last]
        mean = lambda k: sum(e[k] for e in done) / len(done)  # noqa: E731
        return {"loss": loss, "train_acc": acc, "alpha_steps": alpha_steps, "subnets": len(self.episodes),
                "reward": mean("reward"), "val_loss": mean("val_loss"), "val_acc": mean("val_acc"),
                "macs": last["macs"] if last else float(self.gn.base_macs),
                "cost": last["cost"] if last else 1.0, "best_subnet": self.best["subnet"] if self.best else -1,
                "policy_confidence": float(self.policy_probs(self.policy_features()).max(1).values.mean())}

    # -- checkpoint state
    def method_state(self) -> dict:
        sub = None if self.sub is None else self.sub.state()
        best = None if self.best is None else {**self.best, "keep": {str(g): v for g, v in self.best["keep"].items()}}
        return {**super().method_state(), "policy": self.policy.state_dict(), "generator": self.generator.get_state(),
                "baseline": self.baseline, "episodes": self.episodes, "best": best, "sub": sub}

    def load_method_state(self, state):
        super().load_method_state(state)
        self.policy.load_state_dict(state["policy"])
        self.generator.set_state(state["generator"])
        self.baseline = state["baseline"]
        self.episodes = [dict(e) for e in state["episodes"]]
        best = state["best"]
        self.best = None if best is None else {**best, "keep": {int(g): v for g, v in best["keep"].items()}}
        self.sub = None if state["sub"] is None else _Subnet.restore(self, state["sub"])


class _Subnet:
    """One sampled sub-network: the target physically slimmed at ``keep`` and gated (its own
    alpha), its optimisers, and the maps back into the target (per state tensor, the flat
    positions its entries came from; per gate slot, the target's slot)."""

    def __init__(self, searcher: AST, keep: dict, features, actions):
        from nasprune import slim
        s, gn = searcher, searcher.gn
        self.searcher, self.keep, self.features, self.actions = s, keep, features, actions
        self.steps = 0
        self.cost = s.cost(keep)
        self.macs = float(gn.expected_macs(gn.keep_vector(keep).to(s.device)))
        model = slim.apply(gn.model, gn.graph, keep).cpu()
        self.gn = GatedNetwork(model, s.example_inputs, gate="continuous").to(s.device)
        probe = slim.apply(s._probe, gn.graph, keep, verify=False)
        self.index = {k: v.reshape(-1).round().long() for k, v in probe.state_dict().items() if v.is_floating_point()}
        try:     # the target's slot of each of the sub-network's gates
            self.slots = gn.slot_map(self.gn, gn.keep_vector(keep)).to(s.device)
        except ValueError as e:
            raise RuntimeError(f"AST: the sub-network's gates have no one-to-one place in the target: {e}") from e
        with torch.no_grad():
            self.gn.gate.copy_(gn.gate.detach()[self.slots])
        weights = [p for n, p in self.gn.named_parameters() if n != "gate"]
        self.w_opt = torch.optim.SGD(weights, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                                     nesterov=s.momentum > 0)
        self.a_opt = torch.optim.SGD([self.gn.gate], lr=s.alpha_lr, momentum=s.alpha_momentum,
                                     weight_decay=s.alpha_weight_decay)
        for opt in (self.w_opt, self.a_opt):       # under torchrun: every rank trains the same sub-network
            dist.average_gradients_before_step(opt)

    @torch.no_grad()
    def map_back(self) -> None:
        """The sub-network's weights, buffers and alpha written into the target at the positions
        they came from; every other entry of the target is left as it was."""
        gn = self.searcher.gn
        target, mine = gn.model.state_dict(), self.gn.model.state_dict()
        for key, index in self.index.items():
            t = target[key]
            flat = t.detach().contiguous().view(-1).clone()
            flat.index_copy_(0, index.to(flat.device), mine[key].detach().contiguous().view(-1).to(flat.dtype))
            t.copy_(flat.view(t.shape))
        gn.gate[self.slots] = self.gn.gate.detach()

    def state(self) -> dict:
        return {"keep": {str(g): v for g, v in self.keep.items()}, "features": self.features, "actions": self.actions,
                "steps": self.steps, "gated": self.gn.state_dict(), "w_opt": self.w_opt.state_dict(),
                "a_opt": self.a_opt.state_dict()}

    @classmethod
    def restore(cls, searcher: AST, state: dict) -> "_Subnet":
        """The sub-network of a checkpoint: rebuilt from the target (unchanged since it was
        sampled) and its keep, then its own weights, alpha and optimiser state loaded."""
        sub = cls(searcher, {int(g): v for g, v in state["keep"].items()}, state["features"], state["actions"])
        sub.steps = int(state["steps"])
        sub.gn.load_state_dict(state["gated"])
        sub.w_opt.load_state_dict(state["w_opt"])
        sub.a_opt.load_state_dict(state["a_opt"])
        return sub
