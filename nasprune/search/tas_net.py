"""TAS search space for ResNets (methods.md 2.2-2.6): the supernet, its sampling and its cost.

The searched family (``nasprune.models.ResNetSpec``) covers the CIFAR ResNets TAS publishes (3x3 stem,
basic blocks, 3 stages) and the torchvision ResNets (7x7 stride-2 stem + max-pool, basic or
bottleneck blocks, 4 stages), as TAS's ``SearchCifarResNet`` and ``SearchImagenetResNet`` do.

The supernet keeps one full-width weight per conv; a sampled candidate width is a prefix slice of
its filters. Every conv has logits over its width candidates, every stage over its depth
candidates. Sampling is on the device (Gumbel top-2 for widths, Gumbel-softmax for depths) and
the sampled indices reach the host in one copy per forward (shapes need them), never per layer.

The width aggregation of every searched conv is the fused op ``nasprune.ops.width_aggregate``
(:func:`aggregate_widths`). Fragments of unequal width are aligned by their leading channels
(``align="prefix"``, the default: zero channels beyond a candidate's width, as TAS's residual add,
the warm start and the exported network have them) or by TAS's channel-wise interpolation
(``align="cwi"``, the paper's Eqs. 4-5; :func:`cwi`); docs/tas.md, Search health, has why.
The pruned network a search derives is ``nasprune.models.TASResNet`` (:func:`inherit_weights`
fills it from the supernet).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nasprune.handlers import handler_for
from nasprune.models.pruned_resnet import ResNetSpec, TASResNet, block_shapes, has_projection
from nasprune.ops.gumbel import gumbel_noise, gumbel_topk

WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ALIGNS = ("prefix", "cwi")   # how fragments of unequal width are summed; the first is the default
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
def sample_widths(logits: torch.Tensor, mask: torch.Tensor, tau: float, generator=None, k: int = 2):
    """TAS ``select2withP`` for all layers at once. logits, mask: (L, K).

    new = (log_softmax(a) + g) / tau; k candidates drawn without replacement from
    softmax(new); their weights softmax(new[selected]) carry the gradient to the logits: the
    op ``nasprune.ops.gumbel_topk`` over the masked logits.
    Returns (index (L, k) int64, weights (L, k))."""
    return gumbel_topk(logits.masked_fill(~mask, _FILL), k, tau, generator=generator)


def sample_depths(logits: torch.Tensor, mask: torch.Tensor, tau: float, generator=None):
    """Gumbel-softmax weights over every depth candidate of each stage. logits, mask: (S, D)."""
    logp = logits.masked_fill(~mask, _FILL).log_softmax(-1)
    new = ((logp + gumbel_noise(logp, generator)) / tau).masked_fill(~mask, _FILL)
    return new.softmax(-1)


def cwi_reference(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Channel-wise interpolation as TAS's code computes it: adaptive_avg_pool3d over (C, H, W)."""
    if x.size(1) == channels:
        return x
    return F.adaptive_avg_pool3d(x, (channels, x.size(2), x.size(3)))


_CWI_TABLES: dict = {}
_CWI_GATHER_MIN = 65   # widening to this many channels or more: gathers; below: a matrix product


def _cwi_table(c_in: int, c_out: int, dtype, device):
    """Widening to c_out >= _CWI_GATHER_MIN: every bin [floor(o*c_in/c_out),
    ceil((o+1)*c_in/c_out)) holds one or two input channels; (first, last) index vectors.
    Otherwise the (c_out, c_in) averaging matrix of the bins."""
    key = (c_in, c_out, dtype, str(device))
    table = _CWI_TABLES.get(key)
    if table is None:
        start = [(o * c_in) // c_out for o in range(c_out)]
        end = [-((-(o + 1) * c_in) // c_out) for o in range(c_out)]
        if c_in < c_out and c_out >= _CWI_GATHER_MIN:
            table = (torch.tensor(start, device=device), torch.tensor(end, device=device) - 1)
        else:
            m = torch.zeros(c_out, c_in, dtype=torch.float64)
            for o, (a, b) in enumerate(zip(start, end)):
                m[o, a:b] = 1.0 / (b - a)
            table = m.to(device=device, dtype=dtype)
        _CWI_TABLES[key] = table
    return table


def cwi(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Channel-wise interpolation, equal to :func:`cwi_reference`. TAS only widens (depth
    aggregation brings every stage end to the widest), where each output channel is the mean
    of one or two neighbouring inputs: two gathers, O(N C' H W). A product with the averaging
    matrix costs O(N C' C H W) but is one GEMM; on the development CPU it is faster up to 64
    channels (ResNet-56 step 10 % faster) and 7-120x slower at 512-2048 (ResNet-50), hence
    the switch at _CWI_GATHER_MIN. Narrowing always uses the matrix."""
    if x.size(1) == channels:
        return x
    n, c, h, w = x.shape
    table = _cwi_table(c, channels, x.dtype, x.device)
    if isinstance(table, tuple):
        first, last = table
        return (x.index_select(1, first) + x.index_select(1, last)) * 0.5
    return torch.matmul(table, x.reshape(n, c, h * w)).view(n, channels, h, w)


def align_channels(x: torch.Tensor, channels: int, align: str = "prefix") -> torch.Tensor:
    """x widened to ``channels``: its channels first and zeros after ("prefix"), or TAS's
    channel-wise interpolation ("cwi", :func:`cwi`)."""
    if x.size(1) == channels:
        return x
    if align == "cwi":
        return cwi(x, channels)
    if align != "prefix":
        raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.size(1)))


def aggregate_widths(o, widths, weights, act=None, *, bn=None, index=None, training=True, momentum=0.1,
                     eps=1e-5, width_values=None, align="cwi"):
    """TAS width aggregation: act(sum_j weights[j] * CWI(BN_j(o[:, :widths[j]]), max(widths)))
    (align "cwi", the paper's Eq. 4), or act(sum_j weights[j] * pad(BN_j(o[:, :widths[j]]),
    max(widths))) with zero channels beyond each width (align "prefix").

    o: conv output with max(widths) channels. widths: host list of the K sampled candidate
    widths; width_values: the same as an int64 device tensor (made from widths when omitted; the
    supernet gathers it on the device so no layer copies to the device). weights: (K,).
    bn: the layer's :class:`CandidateBN` (None: no BN) and index: the K sampled candidates'
    rows of it, an int64 device tensor. act: None or "relu".

    One fused op (``nasprune.ops.width_aggregate``) does the slicing, per-candidate affine,
    CWI, weighted sum and activation; "prefix" passes every candidate as max(widths) wide (CWI
    is then the identity) with its scale and shift zero beyond its width. Every candidate's BN normalises a prefix of the same
    channels, so one ``channel_stats(o)`` gives all batch statistics (differentiable: the
    gradient through them is one more pass), folded with the sampled rows of gamma and beta
    (one gather from the packed table) into (K, C) scale and shift rows. Running statistics
    update as nn.BatchNorm2d's (momentum, unbiased variance) for the sampled candidates only,
    in one gather, lerp and scatter. Few small ops per layer matters on a GPU, where each is a
    kernel launch and a search step runs a few thousand.
    """
    from nasprune import ops

    c = o.size(1)
    if c != max(widths):
        raise ValueError(f"aggregate_widths: o has {c} channels, the widest candidate {max(widths)}")
    if width_values is None:
        width_values = torch.tensor(widths, dtype=torch.long, device=o.device)
    if bn is None:
        scale = o.new_ones(len(widths), c, dtype=torch.float32)
        shift = torch.zeros_like(scale)
    else:
        if index is None:
            raise ValueError("aggregate_widths: bn needs the sampled candidates' index")
        gamma, beta = bn.affine.index_select(0, index)[:, :, :c].unbind(1)     # (K, c) each
        if training:
            count = o.numel() // max(c, 1)
            if count < 2:
                raise ValueError(f"aggregate_widths: batch norm in training needs more than one value "
                                 f"per channel; o has shape {tuple(o.shape)}")
            mean, var = ops.channel_stats(o)
            with torch.no_grad():
                run = bn.stats.index_select(0, index)
                batch = torch.stack([mean, var * (count / (count - 1))]).to(run.dtype)
                run[:, :, :c].lerp_(batch, momentum)
                bn.stats.index_copy_(0, index, run)
            scale = gamma * (var + eps).rsqrt()
            shift = beta - mean * scale
        else:
            run = bn.stats.index_select(0, index)[:, :, :c]
            scale = gamma * (run[:, 1] + eps).rsqrt()
            shift = beta - run[:, 0] * scale
    if align == "prefix":
        keep = torch.arange(c, device=o.device) < width_values[:, None]          # (K, c)
        scale, shift = scale * keep, shift * keep
        width_values = width_values.clamp_min(c)
    elif align != "cwi":
        raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
    return ops.width_aggregate(o, scale, shift, width_values, weights, act or "identity")


def add_unequal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Residual add of unequal widths: the narrower goes into the leading channels (TAS)."""
    if a.size(1) < b.size(1):
        a, b = b, a
    if a.size(1) == b.size(1):
        return a + b
    return a + F.pad(b, (0, 0, 0, 0, 0, a.size(1) - b.size(1)))


def _resnet_parts(model: nn.Module):
    """(ResNetSpec, stem (conv, bn), blocks [([(conv, bn) ...], shortcut)], fc) of a
    nasprune CIFAR ResNet or a torchvision ResNet; shortcut is a projection's (conv, bn), an
    option-A ChannelZeroPad, or None (identity). Raises TypeError / ValueError naming the
    module that TAS cannot search."""
    from nasprune.models import ChannelZeroPad, CifarResNet
    try:
        from torchvision.models.resnet import ResNet as TVResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        TVResNet = ()
    if isinstance(model, CifarResNet):
        fc, stages = model.linear, [model.layer1, model.layer2, model.layer3]
    elif isinstance(model, TVResNet):
        fc, stages = model.fc, [model.layer1, model.layer2, model.layer3, model.layer4]
    else:
        raise TypeError(f"TAS searches ResNets (nasprune.models.CifarResNet or torchvision.models."
                        f"ResNet); got {type(model).__name__}")

    def check_conv(name, conv, kernel, stride=None):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{name}: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.bias is not None:
            raise ValueError(f"{name}: TAS searches plain convs (groups 1, dilation 1, no bias); got "
                             f"groups {conv.groups}, dilation {conv.dilation}, bias {conv.bias is not None}")
        if conv.kernel_size != (kernel, kernel) or conv.padding != (kernel // 2, kernel // 2):
            raise ValueError(f"{name}: expected a {kernel}x{kernel} conv with padding {kernel // 2}, got "
                             f"kernel {conv.kernel_size}, padding {conv.padding}")
        if stride is not None and conv.stride != (stride, stride):
            raise ValueError(f"{name}: expected stride {stride}, got {conv.stride}")
        return conv

    stem = check_conv("conv1", model.conv1, model.conv1.kernel_size[0])
    if stem.stride[0] != stem.stride[1]:
        raise ValueError(f"conv1: unequal strides {stem.stride}")
    pool = getattr(model, "maxpool", None)
    has_pool = isinstance(pool, nn.MaxPool2d)
    if has_pool and (pool.kernel_size, pool.stride, pool.padding) not in ((3, 2, 1), ((3, 3), (2, 2), (1, 1))):
        raise ValueError(f"maxpool: TAS supports the 3x3 stride-2 padding-1 max-pool, got {pool}")
    bottleneck = hasattr(stages[0][0], "conv3")
    names = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    kernels = (1, 3, 1) if bottleneck else (3, 3)
    strided = 1 if bottleneck else 0
    blocks, layers, mids, outs, strides, shortcut = [], [], [], [], [], "avg"
    for s, stage in enumerate(stages):
        layers.append(len(stage))
        for a, blk in enumerate(stage):
            where = f"layer{s + 1}.{a}"
            pairs = []
            for j, (name, k) in enumerate(zip(names, kernels)):
                conv = check_conv(f"{where}.{name}", getattr(blk, name), k, None if j == strided else 1)
                bn = getattr(blk, "bn" + name[-1])
                if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
                    raise ValueError(f"{where}.bn{name[-1]}: expected BatchNorm2d({conv.out_channels})")
                pairs.append((conv, bn))
            stride = pairs[strided][0].stride[0]
            if a == 0:
                mids.append(pairs[0][0].out_channels)
                outs.append(pairs[-1][0].out_channels)
                strides.append(stride)
            elif (pairs[0][0].out_channels, pairs[-1][0].out_channels, stride) != (mids[-1], outs[-1], 1):
                raise ValueError(f"{where}: every block of a stage after the first must keep its widths "
                                 f"({mids[-1]}, {outs[-1]}) and stride 1")
            short = getattr(blk, "downsample", None) if hasattr(blk, "downsample") else getattr(blk, "shortcut", None)
            proj = None
            if isinstance(short, nn.Sequential) and len(short) == 2:
                conv = check_conv(f"{where}.downsample.0", short[0], 1, stride)
                if not isinstance(short[1], nn.BatchNorm2d):
                    raise ValueError(f"{where}.downsample.1: expected BatchNorm2d, got {type(short[1]).__name__}")
                proj = (conv, short[1])
                if stride != 1:
                    shortcut = "conv"
            elif isinstance(short, ChannelZeroPad):
                proj = short
            elif not (short is None or (isinstance(short, nn.Sequential) and len(short) == 0)):
                raise ValueError(f"{where}: unsupported shortcut {type(short).__name__}")
            blocks.append((pairs, proj))
    spec = ResNetSpec(layers=tuple(layers), block="bottleneck" if bottleneck else "basic",
                      stage_widths=tuple(outs), mid_widths=tuple(mids), strides=tuple(strides),
                      stem_width=stem.out_channels, stem_kernel=stem.kernel_size[0], stem_stride=stem.stride[0],
                      stem_pool=has_pool, shortcut=shortcut, num_classes=fc.out_features,
                      in_channels=stem.in_channels)
    return spec, (stem, model.bn1), blocks, fc


def resnet_spec(model: nn.Module) -> ResNetSpec:
    """The :class:`ResNetSpec` of a nasprune CIFAR ResNet or a torchvision ResNet."""
    return _resnet_parts(model)[0]


# ---------------------------------------------------------------- supernet
class CandidateBN(nn.Module):
    """The BatchNorms of one searchable conv's width candidates, packed into two tables so a
    layer gathers its sampled candidates in one op: ``affine[j] = (gamma_j, beta_j)`` and the
    buffer ``stats[j] = (running_mean_j, running_var_j)``, each over the first ``choices[j]``
    channels (row j's columns beyond that are padding, never read). :meth:`candidate` gives
    candidate j as an nn.BatchNorm2d state dict."""

    def __init__(self, choices):
        super().__init__()
        self.choices = list(choices)
        k, c = len(self.choices), max(self.choices)
        self.affine = nn.Parameter(torch.stack([torch.ones(k, c), torch.zeros(k, c)], 1))
        self.register_buffer("stats", torch.stack([torch.zeros(k, c), torch.ones(k, c)], 1))

    def candidate(self, j: int) -> dict:
        c = self.choices[j]
        return {"weight": self.affine[j, 0, :c].detach().clone(), "bias": self.affine[j, 1, :c].detach().clone(),
                "running_mean": self.stats[j, 0, :c].clone(), "running_var": self.stats[j, 1, :c].clone(),
                "num_batches_tracked": torch.tensor(0)}

    @torch.no_grad()
    def load_prefixes(self, bn: nn.BatchNorm2d) -> None:
        """Every candidate from the leading channels of one full-width BatchNorm (warm start)."""
        k, c = len(self.choices), max(self.choices)
        self.affine.copy_(torch.stack([bn.weight[:c], bn.bias[:c]]).expand(k, 2, c))
        self.stats.copy_(torch.stack([bn.running_mean[:c], bn.running_var[:c]]).expand(k, 2, c))


class SearchConv(nn.Module):
    """Conv (+ per-candidate BN) (+ ReLU) whose output width is searched. avg: AvgPool(stride)
    before a stride-1 conv (TAS's CIFAR downsampling shortcut). align: see :func:`aggregate_widths`."""

    def __init__(self, cin, cout, kernel, stride, *, bn=True, relu=True, avg=False, align="prefix"):
        super().__init__()
        self.align = align
        self.conv = nn.Conv2d(cin, cout, kernel, 1 if avg else stride, kernel // 2, bias=False)
        self.choices = width_choices(cout)
        self.bn = CandidateBN(self.choices) if bn else None
        self.relu, self.avg, self.pool_stride = relu, avg, stride

    def forward(self, x, sample):
        """sample: (host list of the sampled candidates, their mixing weights, their widths and
        their indices as device tensors)."""
        index, weights, width_values, device_index = sample
        if self.avg:
            x = F.avg_pool2d(x, self.pool_stride)
        widths = [self.choices[i] for i in index]
        conv = self.conv
        # Only the sampled filters and the real input channels (zero-padded inputs add nothing).
        o = F.conv2d(x, conv.weight[:max(widths), :x.size(1)], None, conv.stride, conv.padding)
        return aggregate_widths(o, widths, weights, "relu" if self.relu else None, bn=self.bn,
                                index=device_index, training=self.training, momentum=0.1, eps=1e-5,
                                width_values=width_values, align=self.align)

    def output_size(self, size: int) -> int:
        conv = self.conv
        if self.avg:
            size //= self.pool_stride
        return (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1


class SearchBlock(nn.Module):
    """A basic or bottleneck block of searchable convs conv_a, conv_b (, conv_c)."""

    def __init__(self, block, cin, mid, cout, stride, shortcut="avg", align="prefix"):
        super().__init__()
        names = ("conv_a", "conv_b", "conv_c")
        for name, (i, o, k, s, relu) in zip(names, block_shapes(block, cin, mid, cout, stride)):
            setattr(self, name, SearchConv(i, o, k, s, relu=relu, align=align))
        self.convs = [getattr(self, n) for n in names if hasattr(self, n)]
        if stride != 1 and shortcut == "avg":
            self.shortcut = SearchConv(cin, cout, 1, stride, bn=False, relu=False, avg=True, align=align)
        elif has_projection(cin, cout, stride):
            self.shortcut = SearchConv(cin, cout, 1, stride, relu=False, align=align)
        else:
            self.shortcut = None
        self.stride = stride

    def forward(self, x, samples):
        """samples: one SearchConv sample per conv."""
        out = x
        for conv, sample in zip(self.convs, samples):
            out = conv(out, sample)
        residual = x if self.shortcut is None else self.shortcut(x, samples[-1])  # shares the last sample
        return F.relu(add_unequal(residual, out))


class TASSupernet(nn.Module):
    """Width- and depth-searchable ResNet of a :class:`ResNetSpec` (an int n: the CIFAR
    ResNet-(6n+2) of TAS). align: how the width and depth aggregations sum tensors of unequal
    width, "prefix" (default) or TAS's "cwi" (:func:`aggregate_widths`). search_depth: False
    keeps every block (a single depth candidate per stage, the stage's own block count): only
    the widths are searched."""

    def __init__(self, spec: ResNetSpec | int, input_size: int = 32, align: str = "prefix",
                 search_depth: bool = True):
        super().__init__()
        if align not in ALIGNS:
            raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
        if isinstance(spec, int):
            spec = ResNetSpec.cifar(spec)
        self.spec, self.input_size, self.align = spec, input_size, align
        self.num_classes, self.in_channels = spec.num_classes, spec.in_channels
        self.stem = SearchConv(spec.in_channels, spec.stem_width, spec.stem_kernel, spec.stem_stride, align=align)
        self.blocks = nn.ModuleList(SearchBlock(spec.block, cin, mid, cout, stride, spec.shortcut, align)
                                    for _, _, cin, mid, cout, stride in spec.blocks())
        self.stage_blocks, start = [], 0       # block indices of each stage
        for n in spec.layers:
            self.stage_blocks.append(list(range(start, start + n)))
            start += n
        self.block_rows = spec.block_rows()
        self.fc = nn.Linear(spec.stage_widths[-1], spec.num_classes)
        self.convs = [self.stem] + [c for b in self.blocks for c in b.convs]   # one row each
        k = max(len(c.choices) for c in self.convs)
        table = torch.zeros(len(self.convs), k, dtype=torch.float64)
        for i, c in enumerate(self.convs):
            table[i, :len(c.choices)] = torch.tensor(c.choices, dtype=torch.float64)
        self.depth_choices = [depth_choices(n) if search_depth else [n] for n in spec.layers]
        d = max(len(c) for c in self.depth_choices)
        dtable = torch.tensor([c + [0] * (d - len(c)) for c in self.depth_choices], dtype=torch.float64)
        self.register_buffer("width_table", table, persistent=False)
        self.register_buffer("width_mask", table > 0, persistent=False)
        self.register_buffer("width_values", table.long(), persistent=False)
        self.register_buffer("depth_table", dtable, persistent=False)
        self.register_buffer("depth_mask", dtable > 0, persistent=False)
        self.width_logits = nn.Parameter(1e-2 * torch.randn(len(self.convs), k))
        self.depth_logits = nn.Parameter(1e-2 * torch.randn(len(spec.layers), d))
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
                                      self.depth_table.size(1)).to(self.width_logits.dtype)
        values = self.width_values.gather(1, index)
        host = index.tolist()
        # unbind: one op per tensor, and one stack in the backward (row-by-row indexing costs a
        # launch per row each way)
        sample = list(zip(host, width_weights.unbind(0), values.unbind(0), index.unbind(0)))
        x = self.stem(x, sample[0])
        if self.spec.stem_pool:
            x = F.max_pool2d(x, 3, 2, 1)
        for s, blocks in enumerate(self.stage_blocks):
            ends = []
            for a, i in enumerate(blocks):
                x = self.blocks[i](x, [sample[r] for r in self.block_rows[i]])
                if a + 1 in self.depth_choices[s]:
                    ends.append(x)
            c_max = max(t.size(1) for t in ends)
            x = sum(align_channels(t, c_max, self.align) * depth_weights[s, k] for k, t in enumerate(ends))
        f = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.linear(f, self.fc.weight[:, :f.size(1)], self.fc.bias)

    # -- cost model
    def _build_cost(self):
        """Index tables for the chained expected MACs of the derived network.

        Value vector V = [E[C_row] for every conv row] + [E[C_stage_out] per stage] + [C_in, 1].
        Each counted layer costs coef * V[in] * V[out] * P(its block runs) * P(it exists).
        coef comes from the conv/linear MAC formula of nasprune's layer handlers (flops.py)."""
        spec = self.spec
        S, L, B = len(spec.layers), len(self.convs), len(self.blocks)
        in_const, one = L + S, L + S + 1
        layers = []  # (coef, in_idx, out_idx, block index or B (always runs), proj index or P (exists))

        def coef(layer: SearchConv, hin):
            hout = layer.output_size(hin)
            conv = layer.conv
            macs = handler_for(conv).macs(conv, 1.0, 1.0, (1, 1, hin, hin), (1, 1, hout, hout))
            return float(macs), hout

        c, size = coef(self.stem, self.input_size)
        if spec.stem_pool:
            size = (size + 2 - 3) // 2 + 1
        layers.append((c, in_const, 0, B, None))
        proj_pairs = []  # (in_row, out_row) of blocks whose derived net projects iff widths differ
        prev = 0
        for s, blocks in enumerate(self.stage_blocks):
            for i in blocks:
                blk, rows = self.blocks[i], self.block_rows[i]
                h, src = size, prev
                for conv, row in zip(blk.convs, rows):
                    c, h = coef(conv, h)
                    layers.append((c, src, row, i, None))
                    src = row
                if blk.shortcut is not None:
                    c, _ = coef(blk.shortcut, size)
                    layers.append((c, prev, rows[-1], i, None))
                else:
                    if prev >= L:
                        raise NotImplementedError(f"block {i}: a block without a shortcut conv right after "
                                                  f"a depth-searched stage")
                    layers.append((float(size * size), prev, rows[-1], i, len(proj_pairs)))
                    proj_pairs.append((prev, rows[-1]))
                size, prev = h, rows[-1]
            prev = L + s
        fc = handler_for(self.fc).macs(self.fc, 1.0, 1.0, (1, 1), (1, 1))
        layers.append((float(fc) * spec.num_classes, L + S - 1, one, B, None))
        P = len(proj_pairs)
        layers = [(c, i, o, d, P if p is None else p) for c, i, o, d, p in layers]
        cols = list(zip(*layers))
        self.register_buffer("_coef", torch.tensor(cols[0], dtype=torch.float64), persistent=False)
        for name, col in zip(("_in", "_out", "_depth", "_proj"), cols[1:]):
            self.register_buffer(name, torch.tensor(col, dtype=torch.long), persistent=False)
        # P(block a of stage s runs) = sum_k softmax(beta_s)_k [choice_k >= a+1]
        stage_of, reach = [], []
        for s, blocks in enumerate(self.stage_blocks):
            for a in range(len(blocks)):
                stage_of.append(s)
                reach.append([float(ch >= a + 1) for ch in self.depth_table[s].tolist()])
        self.register_buffer("_stage_of", torch.tensor(stage_of, dtype=torch.long), persistent=False)
        self.register_buffer("_reach", torch.tensor(reach, dtype=torch.float64), persistent=False)
        # end_rows[s, k]: last conv row of the block that ends stage s at depth choice k (0: padding)
        d = self.depth_table.size(1)
        ends = [[self.block_rows[blocks[ch - 1]][-1] for ch in choices] + [0] * (d - len(choices))
                for blocks, choices in zip(self.stage_blocks, self.depth_choices)]
        self.register_buffer("_end_rows", torch.tensor(ends, dtype=torch.long), persistent=False)
        pin, pout = [list(t) for t in zip(*proj_pairs)] if proj_pairs else ([], [])
        self.register_buffer("_proj_in", torch.tensor(pin, dtype=torch.long), persistent=False)
        self.register_buffer("_proj_out", torch.tensor(pout, dtype=torch.long), persistent=False)
        eq = (self.width_table[pin][:, :, None] == self.width_table[pout][:, None, :]) \
            & self.width_mask[pin][:, :, None]
        self.register_buffer("_proj_eq", eq.to(torch.float64), persistent=False)

    def cost(self, width_probs: torch.Tensor, depth_probs: torch.Tensor) -> torch.Tensor:
        """Expected MACs per sample (float64 scalar tensor) for width distributions (L, K) and
        depth distributions (S, D); one-hot inputs give the exact MACs of that derived network."""
        wp, dp = width_probs.to(torch.float64), depth_probs.to(torch.float64)
        e_rows = (wp * self.width_table).sum(1)
        e_stage = (dp * e_rows[self._end_rows]).sum(1)
        v = torch.cat([e_rows, e_stage, e_rows.new_tensor([float(self.in_channels), 1.0])])
        run = torch.cat([(dp[self._stage_of] * self._reach).sum(1), e_rows.new_ones(1)])  # P(block runs)
        same = torch.einsum("bj,bjk,bk->b", wp[self._proj_in], self._proj_eq, wp[self._proj_out])
        exists = torch.cat([1.0 - same, e_rows.new_ones(1)])                              # P(projection)
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
        dp = F.one_hot(self.depth_mask.sum(1) - 1, self.depth_table.size(1)).to(torch.float64)
        return float(self.cost(wp, dp))

    # -- the discrete architecture
    def architecture(self) -> dict:
        wp, dp = self.probabilities()
        widths = [c.choices[j] for c, j in zip(self.convs, wp.argmax(1).tolist())]
        blocks = [choices[j] for choices, j in zip(self.depth_choices, dp.argmax(1).tolist())]
        return {"family": "tas-resnet", **self.spec.to_dict(), "input_size": self.input_size,
                "widths": widths, "blocks": blocks}

    def load_base(self, model):
        """Warm start from the unpruned ResNet (CIFAR or torchvision) this supernet was built for:
        every conv, every candidate's BN (prefix of the base BN), projection shortcuts, fc. An
        option-A shortcut (subsample, zero channels either side) becomes TAS's AvgPool + 1x1
        conv with the conv embedding the input channels where option A puts them (a random
        conv there would cut the residual path of a pretrained model)."""
        spec, stem, blocks, fc = _resnet_parts(model)
        if spec != self.spec:
            raise ValueError(f"load_base: the model is {spec}, the supernet was built for {self.spec}")

        def conv_bn(dst: SearchConv, conv, bn):
            with torch.no_grad():
                dst.conv.weight.copy_(conv.weight)
            if dst.bn is not None:
                dst.bn.load_prefixes(bn)
        conv_bn(self.stem, *stem)
        for dst, (pairs, proj) in zip(self.blocks, blocks):
            for conv, pair in zip(dst.convs, pairs):
                conv_bn(conv, *pair)
            if isinstance(proj, tuple):
                conv_bn(dst.shortcut, *proj)
            elif proj is not None:       # ChannelZeroPad
                w = dst.shortcut.conv.weight
                i = torch.arange(proj.in_channels)
                with torch.no_grad():
                    w.zero_()
                    w[proj.before + i, i] = 1.0
        with torch.no_grad():
            self.fc.weight.copy_(fc.weight); self.fc.bias.copy_(fc.bias)


def inherit_weights(derived: TASResNet, supernet: TASSupernet, widths=None) -> None:
    """Initialise ``derived`` from the supernet's prefix filters and the BNs of its candidates
    (``widths``, one per conv row; default the arg-max ones). Projection shortcuts the supernet
    has (downsampling ones) inherit the same way. A stride-1 projection that only the pruned
    widths call for starts as the channel embedding the supernet computed there (its residual
    add puts the input into the leading channels): 1x1 weights eye(C_out, C_in), BN as fresh."""
    if widths is None:
        index = supernet.probabilities()[0].argmax(1).tolist()
    else:
        index = [conv.choices.index(w) for conv, w in zip(supernet.convs, widths)]

    def copy(conv: nn.Conv2d, bn, src: SearchConv, row):
        w = conv.weight
        w.copy_(src.conv.weight[:w.size(0), :w.size(1)])
        if bn is not None:
            bn.load_state_dict(src.bn.candidate(index[row]))

    with torch.no_grad():
        copy(derived.stem.conv, derived.stem.bn, supernet.stem, 0)
        for s, stage in enumerate(derived.stages):
            for a, blk in enumerate(stage):
                i = supernet.stage_blocks[s][a]
                src, rows = supernet.blocks[i], supernet.block_rows[i]
                for dst, conv, row in zip(blk.convs, src.convs, rows):
                    copy(dst.conv, dst.bn, conv, row)
                short = list(blk.shortcut) if isinstance(blk.shortcut, nn.Sequential) else []
                conv = next((m for m in short if isinstance(m, nn.Conv2d)), None)
                if src.shortcut is not None:
                    bn = next((m for m in short if isinstance(m, nn.BatchNorm2d)), None)
                    copy(conv, bn, src.shortcut, rows[-1])
                elif conv is not None:
                    conv.weight.copy_(torch.eye(*conv.weight.shape[:2]).view_as(conv.weight))
        derived.fc.weight.copy_(supernet.fc.weight[:, :derived.fc.in_features])
        derived.fc.bias.copy_(supernet.fc.bias)
