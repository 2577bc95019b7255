"""TAS search space for CIFAR ResNets (methods.md 2.2-2.6) and the derived (pruned) network.

The supernet keeps one full-width weight per conv; a sampled candidate width is a prefix slice of
its filters. Every conv has logits over its width candidates, every stage over its depth
candidates. Sampling is on the device (Gumbel top-2 for widths, Gumbel-softmax for depths) and
the sampled indices reach the host in one copy per forward (shapes need them), never per layer.

The width aggregation of every searched conv is the fused op ``nasprune.ops.width_aggregate``
(:func:`aggregate_widths`); :func:`cwi` stays for depth aggregation and as the tests' reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nasprune.slim.handlers import handler_for

WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_FILL = -1e9  # logit of a padding slot (layers with fewer distinct candidates)


def width_choices(channels: int, ratios=WIDTH_RATIOS) -> list[int]:
    """TAS's candidate widths: int(C*r), de-duplicated, sorted, positive."""
    return sorted({int(channels * r) for r in ratios} - {0})


def depth_choices(blocks: int) -> list[int]:
    """TAS's candidate block counts for a stage of ``blocks`` blocks."""
    if blocks <= 3:
        return list(range(1, blocks + 1))
    return sorted(set(range(1, blocks + 1, 2)) | {blocks})


# ---------------------------------------------------------------- sampling and aggregation
def gumbel(shape_like: torch.Tensor, generator=None) -> torch.Tensor:
    u = torch.empty_like(shape_like).exponential_(generator=generator)
    return -u.clamp_min(torch.finfo(u.dtype).tiny).log()


def gumbel_topk(logits: torch.Tensor, k: int, generator=None) -> torch.Tensor:
    """Indices of k draws without replacement from softmax(logits) along the last dim: the
    arg-top-k of logits + fresh Gumbel noise (one device op, no host sync)."""
    return (logits + gumbel(logits, generator)).topk(k, dim=-1).indices


def sample_widths(logits: torch.Tensor, mask: torch.Tensor, tau: float, generator=None, k: int = 2):
    """TAS ``select2withP`` for all layers at once. logits, mask: (L, K).

    new = (log_softmax(a) + g) / tau; k candidates drawn without replacement from
    softmax(new); their weights softmax(new[selected]) carry the gradient to the logits.
    Returns (index (L, k) int64, weights (L, k))."""
    logp = logits.masked_fill(~mask, _FILL).log_softmax(-1)
    new = ((logp + gumbel(logits, generator)) / tau).masked_fill(~mask, _FILL)
    with torch.no_grad():
        index = gumbel_topk(new, k, generator)
    return index, new.gather(1, index).softmax(-1)


def sample_depths(logits: torch.Tensor, mask: torch.Tensor, tau: float, generator=None):
    """Gumbel-softmax weights over every depth candidate of each stage. logits, mask: (S, D)."""
    logp = logits.masked_fill(~mask, _FILL).log_softmax(-1)
    new = ((logp + gumbel(logits, generator)) / tau).masked_fill(~mask, _FILL)
    return new.softmax(-1)


def cwi_reference(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Channel-wise interpolation as TAS's code computes it: adaptive_avg_pool3d over (C, H, W)."""
    if x.size(1) == channels:
        return x
    return F.adaptive_avg_pool3d(x, (channels, x.size(2), x.size(3)))


_CWI_MATRICES: dict = {}


def cwi_matrix(c_in: int, c_out: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """(c_out, c_in) averaging matrix: row o averages input channels
    [floor(o*c_in/c_out), ceil((o+1)*c_in/c_out)), the adaptive pooling bins."""
    key = (c_in, c_out, dtype, str(device))
    m = _CWI_MATRICES.get(key)
    if m is None:
        m = torch.zeros(c_out, c_in, dtype=torch.float64)
        for o in range(c_out):
            start, end = (o * c_in) // c_out, -((-(o + 1) * c_in) // c_out)
            m[o, start:end] = 1.0 / (end - start)
        m = _CWI_MATRICES[key] = m.to(device=device, dtype=dtype)
    return m


def cwi(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Channel-wise interpolation (equal to :func:`cwi_reference`) as one matrix product over the
    channel axis: forward and backward are GEMMs, about 3x cheaper than adaptive_avg_pool3d's
    on CPU, where it was a third of a search step."""
    if x.size(1) == channels:
        return x
    n, c, h, w = x.shape
    return torch.matmul(cwi_matrix(c, channels, x.dtype, x.device), x.reshape(n, c, h * w)).view(n, channels, h, w)


def _pad_rows(vectors, channels: int, value: float = 0.0) -> torch.Tensor:
    """Stack per-candidate vectors of lengths c_j into a (K, channels) tensor, padded with value."""
    return torch.stack([F.pad(v, (0, channels - v.numel()), value=value) for v in vectors])


def aggregate_widths(o, bn_params, widths, weights, act=None, *, training=True, momentum=0.1,
                     eps=1e-5, width_values=None):
    """TAS width aggregation: act(sum_j weights[j] * CWI(BN_j(o[:, :widths[j]]), max(widths))).

    o: conv output with max(widths) channels. bn_params: per candidate (weight, bias,
    running_mean, running_var), or None for no BN. widths: host list of the K candidate widths;
    width_values: the same as an int64 device tensor (made from widths when omitted; the
    supernet gathers it on the device so no layer copies to the device). weights: (K,).
    act: None or "relu".

    One fused op (``nasprune.ops.width_aggregate``) does the slicing, per-candidate affine,
    CWI, weighted sum and activation. Every candidate's BN normalises a prefix of the same
    channels, so one ``channel_stats(o)`` gives all batch statistics (differentiable: the
    gradient through them is one more pass), folded with each candidate's gamma and beta into
    (K, C) scale and shift rows. Running statistics update as nn.BatchNorm2d's (momentum,
    unbiased variance) for the sampled candidates only.
    """
    from nasprune import ops

    c = o.size(1)
    if c != max(widths):
        raise ValueError(f"aggregate_widths: o has {c} channels, the widest candidate {max(widths)}")
    if width_values is None:
        width_values = torch.tensor(widths, dtype=torch.long, device=o.device)
    if bn_params is None:
        scale = _pad_rows([o.new_ones(w, dtype=torch.float32) for w in widths], c)
        shift = torch.zeros_like(scale)
    else:
        gamma = _pad_rows([p[0] for p in bn_params], c)
        beta = _pad_rows([p[1] for p in bn_params], c)
        if training:
            count = o.numel() // max(c, 1)
            if count < 2:
                raise ValueError(f"aggregate_widths: batch norm in training needs more than one value "
                                 f"per channel; o has shape {tuple(o.shape)}")
            mean, var = ops.channel_stats(o)
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                for (_, _, rm, rv), w in zip(bn_params, widths):
                    rm.lerp_(mean[:w].to(rm.dtype), momentum)
                    rv.lerp_(unbiased[:w].to(rv.dtype), momentum)
            scale = gamma * (var + eps).rsqrt()
            shift = beta - mean * scale
        else:
            scale = gamma * (_pad_rows([p[3] for p in bn_params], c, 1.0) + eps).rsqrt()
            shift = beta - _pad_rows([p[2] for p in bn_params], c) * scale
    return ops.width_aggregate(o, scale, shift, width_values, weights, act or "identity")


def add_unequal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Residual add of unequal widths: the narrower goes into the leading channels (TAS)."""
    if a.size(1) < b.size(1):
        a, b = b, a
    if a.size(1) == b.size(1):
        return a + b
    return a + F.pad(b, (0, 0, 0, 0, 0, a.size(1) - b.size(1)))


# ---------------------------------------------------------------- supernet
class SearchConv(nn.Module):
    """Conv (+ per-candidate BN) (+ ReLU) whose output width is searched."""

    def __init__(self, cin, cout, kernel, stride, *, bn=True, relu=True, avg=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, 1 if avg else stride, kernel // 2, bias=False)
        self.choices = width_choices(cout)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in self.choices) if bn else None
        self.relu, self.avg = relu, avg

    def forward(self, x, index, weights, width_values=None):
        """index: host list of the sampled candidates; width_values: their widths on the device."""
        if self.avg:
            x = F.avg_pool2d(x, 2)
        widths = [self.choices[i] for i in index]
        conv = self.conv
        # Only the sampled filters and the real input channels (zero-padded inputs add nothing).
        o = F.conv2d(x, conv.weight[:max(widths), :x.size(1)], None, conv.stride, conv.padding)
        bn_params = None
        if self.bns is not None:
            bns = [self.bns[i] for i in index]
            bn_params = [(b.weight, b.bias, b.running_mean, b.running_var) for b in bns]
        return aggregate_widths(o, bn_params, widths, weights, "relu" if self.relu else None,
                                training=self.training, momentum=0.1, eps=1e-5,
                                width_values=width_values)


class SearchBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv_a = SearchConv(cin, cout, 3, stride)
        self.conv_b = SearchConv(cout, cout, 3, 1, relu=False)
        if stride == 2:
            self.shortcut = SearchConv(cin, cout, 1, 2, bn=False, relu=False, avg=True)
        elif cin != cout:
            self.shortcut = SearchConv(cin, cout, 1, 1, relu=False)
        else:
            self.shortcut = None
        self.stride = stride

    def forward(self, x, a, b):
        """a, b: (index, weights, width_values) samples of conv_a and conv_b."""
        out = self.conv_b(self.conv_a(x, *a), *b)
        residual = x if self.shortcut is None else self.shortcut(x, *b)  # shares conv_b's sample
        return F.relu(add_unequal(residual, out))


class TASSupernet(nn.Module):
    """Width- and depth-searchable CIFAR ResNet (basic blocks, 3 stages of 16/32/64)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, input_size: int = 32,
                 stage_widths=(16, 32, 64), in_channels: int = 3):
        super().__init__()
        n = blocks_per_stage
        self.blocks_per_stage, self.num_classes, self.input_size = n, num_classes, input_size
        self.stage_widths, self.in_channels = tuple(stage_widths), in_channels
        self.stem = SearchConv(in_channels, stage_widths[0], 3, 1)
        self.blocks = nn.ModuleList()
        cin = stage_widths[0]
        for s, planes in enumerate(stage_widths):
            for a in range(n):
                self.blocks.append(SearchBlock(cin, planes, 2 if (s > 0 and a == 0) else 1))
                cin = planes
        self.fc = nn.Linear(stage_widths[-1], num_classes)
        self.convs = [self.stem] + [c for b in self.blocks for c in (b.conv_a, b.conv_b)]  # one row each
        k = max(len(c.choices) for c in self.convs)
        table = torch.zeros(len(self.convs), k, dtype=torch.float64)
        for i, c in enumerate(self.convs):
            table[i, :len(c.choices)] = torch.tensor(c.choices, dtype=torch.float64)
        self.depth_choices = depth_choices(n)
        dtable = torch.tensor([self.depth_choices] * len(stage_widths), dtype=torch.float64)
        self.register_buffer("width_table", table, persistent=False)
        self.register_buffer("width_mask", table > 0, persistent=False)
        self.register_buffer("width_values", table.long(), persistent=False)
        self.register_buffer("depth_table", dtable, persistent=False)
        self.register_buffer("depth_mask", dtable > 0, persistent=False)
        self.width_logits = nn.Parameter(1e-2 * torch.randn(len(self.convs), k))
        self.depth_logits = nn.Parameter(1e-2 * torch.randn(len(stage_widths), len(self.depth_choices)))
        self._build_cost()

    # -- parameters
    def arch_parameters(self):
        return [self.width_logits, self.depth_logits]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.endswith("_logits")]

    # -- forward
    def forward(self, x, index=None, width_weights=None, depth_weights=None):
        """Search forward with a given sample: index (L, k) int64 candidate indices on the
        device, width_weights (L, k), depth_weights (S, D). Without a sample: the arg-max
        architecture through the supernet (one candidate per conv, deterministic depth).
        The indices reach the host in one copy (the conv shapes need them)."""
        if index is None:
            index = self.width_logits.masked_fill(~self.width_mask, _FILL).argmax(1, keepdim=True)
            width_weights = self.width_logits.new_ones(index.shape)
            depth_weights = F.one_hot(self.depth_logits.masked_fill(~self.depth_mask, _FILL).argmax(1),
                                      len(self.depth_choices)).to(self.width_logits.dtype)
        values = self.width_values.gather(1, index)
        host = index.tolist()
        sample = [(host[r], width_weights[r], values[r]) for r in range(len(host))]
        x = self.stem(x, *sample[0])
        n = self.blocks_per_stage
        for s in range(len(self.stage_widths)):
            ends = []
            for a in range(n):
                i = s * n + a
                x = self.blocks[i](x, sample[1 + 2 * i], sample[2 + 2 * i])
                if a + 1 in self.depth_choices:
                    ends.append(x)
            c_max = max(t.size(1) for t in ends)
            x = sum(cwi(t, c_max) * depth_weights[s, k] for k, t in enumerate(ends))
        f = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.linear(f, self.fc.weight[:, :f.size(1)], self.fc.bias)

    # -- cost model
    def _build_cost(self):
        """Index tables for the chained expected MACs of the derived network.

        Value vector V = [E[C_row] for every conv row] + [E[C_stage_out] per stage] + [C_in, 1].
        Each counted layer costs coef * V[in] * V[out] * P(its block runs) * P(it exists).
        coef comes from the conv/linear MAC formula of nasprune's layer handlers (flops.py)."""
        n, S, L = self.blocks_per_stage, len(self.stage_widths), len(self.convs)
        in_const, one = L + S, L + S + 1
        layers = []  # (coef, in_idx, out_idx, depth_idx or -1, proj_idx or -1)
        size = self.input_size

        def coef(conv, hin, stride):
            hout = (hin + 2 * conv.padding[0] - conv.kernel_size[0]) // stride + 1
            macs = handler_for(conv).macs(conv, 1.0, 1.0, (1, 1, hin, hin), (1, 1, hout, hout))
            return float(macs), hout

        c, size = coef(self.stem.conv, size, 1)
        layers.append((c, in_const, 0, -1, -1))
        self._proj_pairs = []  # (in_row, out_row) of stride-1 blocks: derived net projects if widths differ
        prev = 0
        for s in range(S):
            for a in range(n):
                i = s * n + a
                blk, ra, rb, d = self.blocks[i], 1 + 2 * i, 2 + 2 * i, s * n + a
                ca, hout = coef(blk.conv_a.conv, size, blk.stride)
                cb, _ = coef(blk.conv_b.conv, hout, 1)
                layers += [(ca, prev, ra, d, -1), (cb, ra, rb, d, -1)]
                if blk.stride != 1:
                    cs, _ = coef(blk.shortcut.conv, size // 2, 1)
                    layers.append((cs, prev, rb, d, -1))
                else:
                    if prev >= L:
                        raise NotImplementedError("a stride-1 block right after a depth-searched stage")
                    cs, _ = coef(nn.Conv2d(1, 1, 1, bias=False), size, 1)
                    layers.append((cs, prev, rb, d, len(self._proj_pairs)))
                    self._proj_pairs.append((prev, rb))
                size, prev = hout, rb
            prev = L + s
        fc = handler_for(self.fc).macs(self.fc, 1.0, 1.0, (1, 1), (1, 1))
        layers.append((float(fc) * self.num_classes, L + S - 1, one, -1, -1))
        cols = list(zip(*layers))
        self.register_buffer("_coef", torch.tensor(cols[0], dtype=torch.float64), persistent=False)
        for name, col in zip(("_in", "_out", "_depth", "_proj"), cols[1:]):
            self.register_buffer(name, torch.tensor(col, dtype=torch.long), persistent=False)
        # P(depth >= a+1) = reach @ softmax(beta), reach[a, k] = [choice_k >= a+1]
        reach = torch.tensor([[float(ch >= a + 1) for ch in self.depth_choices] for a in range(n)],
                             dtype=torch.float64)
        self.register_buffer("_reach", reach, persistent=False)
        # end_rows[s, k]: conv_b row of the block that ends stage s at depth choice k
        ends = [[2 + 2 * (s * n + ch - 1) for ch in self.depth_choices] for s in range(S)]
        self.register_buffer("_end_rows", torch.tensor(ends, dtype=torch.long), persistent=False)
        pin, pout = zip(*self._proj_pairs) if self._proj_pairs else ((), ())
        self.register_buffer("_proj_in", torch.tensor(pin, dtype=torch.long), persistent=False)
        self.register_buffer("_proj_out", torch.tensor(pout, dtype=torch.long), persistent=False)
        eq = (self.width_table[list(pin)][:, :, None] == self.width_table[list(pout)][:, None, :]) \
            & self.width_mask[list(pin)][:, :, None]
        self.register_buffer("_proj_eq", eq.to(torch.float64), persistent=False)

    def cost(self, width_probs: torch.Tensor, depth_probs: torch.Tensor) -> torch.Tensor:
        """Expected MACs per sample (float64 scalar tensor) for width distributions (L, K) and
        depth distributions (S, D); one-hot inputs give the exact MACs of that derived network."""
        wp, dp = width_probs.to(torch.float64), depth_probs.to(torch.float64)
        e_rows = (wp * self.width_table).sum(1)
        e_stage = (dp * e_rows[self._end_rows]).sum(1)
        v = torch.cat([e_rows, e_stage, e_rows.new_tensor([float(self.in_channels), 1.0])])
        run = torch.cat([(dp @ self._reach.T).reshape(-1), e_rows.new_ones(1)])   # P(block runs)
        same = torch.einsum("bj,bjk,bk->b", wp[self._proj_in], self._proj_eq, wp[self._proj_out])
        exists = torch.cat([1.0 - same, e_rows.new_ones(1)])                       # P(projection)
        return (self._coef * v[self._in] * v[self._out] * run[self._depth] * exists[self._proj]).sum()

    def probabilities(self):
        return (self.width_logits.masked_fill(~self.width_mask, _FILL).softmax(1),
                self.depth_logits.masked_fill(~self.depth_mask, _FILL).softmax(1))

    def argmax_onehot(self):
        wp, dp = self.probabilities()
        return (F.one_hot(wp.argmax(1), wp.size(1)).to(wp.dtype), F.one_hot(dp.argmax(1), dp.size(1)).to(dp.dtype))

    def expected_cost(self):
        return self.cost(*self.probabilities())

    def argmax_cost(self):
        with torch.no_grad():
            return self.cost(*self.argmax_onehot())

    def max_cost(self) -> float:
        wp = (self.width_table == self.width_table.max(1, keepdim=True).values).to(torch.float64)
        dp = torch.zeros_like(self.depth_table)
        dp[:, -1] = 1.0
        return float(self.cost(wp, dp))

    # -- the discrete architecture
    def architecture(self) -> dict:
        wp, dp = self.probabilities()
        widths = [c.choices[j] for c, j in zip(self.convs, wp.argmax(1).tolist())]
        blocks = [self.depth_choices[j] for j in dp.argmax(1).tolist()]
        return {"family": "tas-cifar-resnet", "blocks_per_stage": self.blocks_per_stage,
                "num_classes": self.num_classes, "input_size": self.input_size,
                "in_channels": self.in_channels, "stage_widths": list(self.stage_widths),
                "widths": widths, "blocks": blocks}

    def load_base(self, model):
        """Warm start from an unpruned CIFAR ResNet (nasprune.models.CifarResNet)."""
        def conv_bn(dst: SearchConv, conv, bn):
            with torch.no_grad():
                dst.conv.weight.copy_(conv.weight)
                for c, b in zip(dst.choices, dst.bns):
                    b.weight.copy_(bn.weight[:c]); b.bias.copy_(bn.bias[:c])
                    b.running_mean.copy_(bn.running_mean[:c]); b.running_var.copy_(bn.running_var[:c])
        conv_bn(self.stem, model.conv1, model.bn1)
        n = self.blocks_per_stage
        for s in range(len(self.stage_widths)):
            for a, src in enumerate(getattr(model, f"layer{s + 1}")):
                dst = self.blocks[s * n + a]
                conv_bn(dst.conv_a, src.conv1, src.bn1)
                conv_bn(dst.conv_b, src.conv2, src.bn2)
        with torch.no_grad():
            self.fc.weight.copy_(model.linear.weight); self.fc.bias.copy_(model.linear.bias)


# ---------------------------------------------------------------- derived network
class ConvBN(nn.Module):
    def __init__(self, cin, cout, kernel, stride, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class DerivedBlock(nn.Module):
    """TAS's inferred basic block: a 1x1 projection shortcut when in-width != out-width
    (AvgPool(2) + 1x1 conv without BN at stride 2, 1x1 conv + BN otherwise)."""

    def __init__(self, cin, mid, cout, stride):
        super().__init__()
        self.conv_a = ConvBN(cin, mid, 3, stride)
        self.conv_b = ConvBN(mid, cout, 3, 1, relu=False)
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1, bias=False))
        elif cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        return F.relu(self.conv_b(self.conv_a(x)) + self.shortcut(x))


class TASResNet(nn.Module):
    """The plain pruned CIFAR ResNet a TAS architecture dict describes."""

    def __init__(self, widths, blocks, blocks_per_stage, num_classes=10, stage_widths=(16, 32, 64),
                 in_channels=3, **_):
        super().__init__()
        n = blocks_per_stage
        if len(widths) != 1 + 2 * n * len(stage_widths) or len(blocks) != len(stage_widths):
            raise ValueError(f"architecture has {len(widths)} widths and {len(blocks)} stages; a "
                             f"{len(stage_widths)}-stage net of {n} blocks needs {1 + 2 * n * len(stage_widths)}")
        self.stem = ConvBN(in_channels, widths[0], 3, 1)
        cin = widths[0]
        stages = []
        for s, kept in enumerate(blocks):
            if not 1 <= kept <= n:
                raise ValueError(f"stage {s} keeps {kept} blocks, must be 1..{n}")
            layer = []
            for a in range(kept):
                i = s * n + a
                mid, cout = widths[1 + 2 * i], widths[2 + 2 * i]
                layer.append(DerivedBlock(cin, mid, cout, 2 if (s > 0 and a == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*layer))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tas_resnet(**arch) -> TASResNet:
    """Build the derived network from an architecture dict (``TAS.architecture()``)."""
    return TASResNet(**arch)


def inherit_weights(derived: TASResNet, supernet: TASSupernet, widths=None) -> None:
    """Initialise ``derived`` from the supernet's prefix filters and the BNs of its candidates
    (``widths``, one per conv row; default the arg-max ones). Stride-1 projection shortcuts
    (absent from the supernet) keep their fresh init."""
    if widths is None:
        index = supernet.probabilities()[0].argmax(1).tolist()
    else:
        index = [conv.choices.index(w) for conv, w in zip(supernet.convs, widths)]

    def copy(dst: ConvBN, src: SearchConv, row):
        w = dst.conv.weight
        dst.conv.weight.copy_(src.conv.weight[:w.size(0), :w.size(1)])
        dst.bn.load_state_dict(src.bns[index[row]].state_dict())

    n = supernet.blocks_per_stage
    with torch.no_grad():
        copy(derived.stem, supernet.stem, 0)
        for s, stage in enumerate(derived.stages):
            for a, blk in enumerate(stage):
                i = s * n + a
                src = supernet.blocks[i]
                copy(blk.conv_a, src.conv_a, 1 + 2 * i)
                copy(blk.conv_b, src.conv_b, 2 + 2 * i)
                if src.stride == 2:
                    w = blk.shortcut[1].weight
                    w.copy_(src.shortcut.conv.weight[:w.size(0), :w.size(1)])
        derived.fc.weight.copy_(supernet.fc.weight[:, :derived.fc.in_features])
        derived.fc.bias.copy_(supernet.fc.bias)
