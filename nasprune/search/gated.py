"""The gated network every gate-based search shares (DAIS, PaS, FFP, AST; methods.md 1.2).

``GatedNetwork(model, example_inputs, gate=...)`` is a rewritten copy of any traced model with a
per-channel gate on every prunable channel group: a gate value 1 leaves a channel as it is, 0
removes it, a value in between scales it. All gate values live in one packed parameter; the
searcher sees them per group. From the gates it computes the expected MACs and parameters (one
vectorised expression, exact per channel), a keep set for :func:`nasprune.slim.apply`, and an
export: the user's own model class, physically slimmed, equal to the gated network.

Where a group's gate sits (its *sites*), from the channel graph and the traced fx graph:

- after the batch normalisation that follows a producer (a gate before it is cancelled by the
  batch statistics in training), or after the producer itself when no normalisation follows;
- before a positively homogeneous activation (ReLU, LeakyReLU, PReLU, identity), after any other
  (ReLU6, SiLU, Hardswish, GELU, sigmoid...: a gate before a sigmoid does not close a channel);
- the same gate values at every producer of a group (a residual stream), gathered for members
  that hold only part of it (option-A shortcuts, concatenations), and at every call of a module
  called several times (each call is its own fx node).

conv -> BatchNorm2d -> (ReLU | identity) is fused into one :class:`GatedConvBNAct2d` call, and a
BatchNorm2d -> (ReLU | identity) that no conv of its own feeds (RepVGG's identity branch, a
DenseNet norm after a concatenation) into one ``channel_stats`` and gate-epilogue call; every
other site is a stand-alone gate on the fused ``gate_epilogue`` op. A group whose channels meet a
LayerNorm or GroupNorm (statistics across channels) or a layer with no known channel dimension
cannot be gated: ``ungated`` lists it with the reason.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from nasprune.graph import ChannelGraph, trace
from nasprune.graph.tracer import preserved_state, symbolic_trace
from nasprune.handlers import handler_for
from nasprune.handlers.keep import KeepError
from nasprune.handlers.layers import ConvHandler, LinearHandler
from nasprune.handlers.norm import BatchNormHandler
from nasprune.nn import gates as gate_params
from nasprune.nn.gate import apply_gate
from nasprune.nn.gated_conv import GatedConvBNAct2d, bn_act_gate, gather_channels, skip_closed_ok
from nasprune.nn.select import ChannelSelect
from nasprune.slim.uniform import group_keep

_GATES = "nasprune_gates"  # the placeholder every rewritten graph takes the gate values through

# activations by how a per-channel gate g >= 0 commutes with them
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)
_HOMOGENEOUS_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, "relu", "relu_"}
_OTHER_ACT_MODULES = (nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Tanh,
                      nn.Hardsigmoid, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus)
_OTHER_ACT_FUNCS = {F.relu6, F.hardtanh, F.silu, F.hardswish, F.gelu, F.sigmoid, torch.sigmoid, F.tanh,
                    torch.tanh, F.hardsigmoid, F.mish, F.elu, F.selu, F.celu, F.softplus,
                    "sigmoid", "tanh", "sigmoid_", "tanh_"}
# ops a gated value passes through unchanged per channel and linearly (where a fold into the
# consumers' input weights stays exact) or only re-arranged
_LINEAR_FUNCS = {torch.cat, torch.concat, torch.flatten, torch.reshape, operator.getitem, operator.mul,
                 torch.mul, F.adaptive_avg_pool2d, F.avg_pool2d, F.adaptive_max_pool2d, F.max_pool2d,
                 F.dropout, torch.squeeze, torch.unsqueeze, "view", "reshape", "flatten", "mul", "contiguous",
                 "squeeze", "unsqueeze", "mean", torch.mean}
_LINEAR_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d,
                   nn.AdaptiveMaxPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool1d)


def _is_homogeneous(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _HOMOGENEOUS_MODULES)
    return node.op in ("call_function", "call_method") and node.target in _HOMOGENEOUS_FUNCS


def _is_other_activation(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _OTHER_ACT_MODULES)
    return node.op in ("call_function", "call_method") and node.target in _OTHER_ACT_FUNCS


_ZERO_AT_ZERO_MODULES = (nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU, nn.Tanh, nn.Mish, nn.ELU,
                         nn.SELU, nn.CELU)
_ZERO_AT_ZERO_FUNCS = {F.relu6, F.hardtanh, F.silu, F.hardswish, F.gelu, F.tanh, torch.tanh, F.mish, F.elu,
                       F.selu, F.celu, "tanh", "tanh_"}


def _zero_at_zero(node: fx.Node, modules: dict) -> bool:
    """The activation maps 0 to 0, so a gate before it still closes a channel."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Hardtanh):
            return m.min_val <= 0 <= m.max_val
        return isinstance(m, _ZERO_AT_ZERO_MODULES)
    return node.op in ("call_function", "call_method") and node.target in _ZERO_AT_ZERO_FUNCS


def _is_linear(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _LINEAR_MODULES)
    return node.op in ("call_function", "call_method") and node.target in _LINEAR_FUNCS


@dataclass
class Site:
    """One place of the network where gate values multiply channels."""
    name: str            # the submodule of GatedNetwork.sites that applies it
    anchor: str          # the fx node after which (or, fused, in place of which) it applies
    module: str          # the layer whose output channels it gates (a producer or a norm)
    role: str            # the role of `module` whose channel positions the site gates
    kind: str            # "fused" (conv-BN-act or BN-act in one call) or "gate"
    act: str             # a fused site's activation: "relu" or "identity" ("" for a gate)
    dim: int             # the channel dimension of the gated tensor
    fold: str            # "affine": into `module`'s weights; "consumers": into the layers fed
    index: torch.Tensor  # per channel position, its slot in the packed gate values
    consumers: list = field(default_factory=list)  # (layer, in positions) for fold="consumers"


class _GateSite(nn.Module):
    """A stand-alone gate: y = x * values[index] along ``dim`` (on the fused gate_epilogue op)."""

    def __init__(self, index: torch.Tensor, dim: int):
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.dim = dim

    def forward(self, x, values):
        return apply_gate(x, values.index_select(0, self.index), self.dim)

    def extra_repr(self) -> str:
        return f"channels={self.index.numel()}, dim={self.dim}"


class _HeldSite:
    """What both fused site kinds share: references to the user's modules, not copies (they keep
    their place in the model and their state dict keys), the activation, and ``index``, the
    packed gate slot of each channel."""

    def _hold(self, layers: tuple, act: str, index: torch.Tensor) -> None:
        object.__setattr__(self, "_layers", layers)
        self.act = act
        self.register_buffer("index", index, persistent=False)

    def extra_repr(self) -> str:
        return f"act={self.act!r}, channels={self.index.numel()}"


# Open channels a skipping conv convolves are padded up to a multiple of this with closed ones:
# oneDNN runs a conv of 23 or 47 channels slower per MAC than one of 32 or 48 (docs/gated.md).
SKIP_MULTIPLE = 16


class _OpenChannels:
    """The binary gate values of the forward being run, on the host (None outside such a
    forward): GatedNetwork.forward sets them, each fused site reads the open channels of its
    conv's output and input from them (one copy to the host per forward, not one per layer).
    It also holds the last input it gathered, so that convs reading one input (RepVGG's 3x3 and
    1x1 branches) share one gathered copy."""

    def __init__(self):
        self.values: np.ndarray | None = None
        self._last = None   # (x, its version, host index, gathered x) of the last gather

    def clear(self) -> None:
        self.values, self._last = None, None

    def index(self, slots: np.ndarray | None) -> np.ndarray | None:
        """Sorted indices of the open channels among ``slots``, padded with closed ones up to a
        multiple of SKIP_MULTIPLE (at least one multiple); None when that leaves none closed."""
        if slots is None:
            return None
        open_ = self.values[slots] != 0
        n, c = int(open_.sum()), len(slots)
        k = max(SKIP_MULTIPLE, -(-n // SKIP_MULTIPLE) * SKIP_MULTIPLE)
        if k >= c:
            return None
        chosen = open_.copy()
        chosen[np.flatnonzero(~open_)[:k - n]] = True
        return np.flatnonzero(chosen)

    @torch.no_grad()
    def gathered(self, x: torch.Tensor, index: np.ndarray, device_index: torch.Tensor) -> torch.Tensor:
        """x[:, index] in x's layout, shared with the previous call when it gathered the same
        channels of the same (unmodified) x."""
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version and np.array_equal(last[2], index):
            return last[3]
        xa = gather_channels(x.detach(), device_index)
        self._last = (x, x._version, index, xa)
        return xa


class _FusedSite(_HeldSite, GatedConvBNAct2d):
    """conv -> BN -> act -> gate of the user's own conv and BN modules, in one fused call.
    With binary gates it skips what the closed channels make zero (skip_closed_conv): the input
    channels whose slots ``in_slots`` holds (set where the network's probe found them zero when
    closed) and the gradient of its closed output channels."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str, index: torch.Tensor,
                 in_slots: torch.Tensor, open_channels: _OpenChannels):
        nn.Module.__init__(self)
        self._hold((conv, bn), act, index)
        object.__setattr__(self, "_open", open_channels)
        self._out_slots = index.cpu().numpy()
        self._conv_in_slots = in_slots.cpu().numpy()  # the packed slot of each conv input channel
        self.in_slots: np.ndarray | None = None        # the same where the probe allows skipping

    conv = property(lambda self: self._layers[0])
    bn = property(lambda self: self._layers[1])

    def forward(self, x, values):
        return self.fused_forward(x, values.index_select(0, self.index), skip=self._skip(x))

    def _skip(self, x):
        if self._open.values is None or not skip_closed_ok(self.conv):
            return None
        in_host, out_host = self._open.index(self.in_slots), self._open.index(self._out_slots)
        if in_host is None and out_host is None:
            return None
        in_open = None if in_host is None else torch.from_numpy(in_host).to(x.device)
        out_open = None if out_host is None else torch.from_numpy(out_host).to(x.device)
        gathered = None if in_open is None else self._open.gathered(x, in_host, in_open)
        return in_open, out_open, gathered

    def _load_from_state_dict(self, *args, **kwargs):  # no gate of its own to default
        nn.Module._load_from_state_dict(self, *args, **kwargs)


class _NormSite(_HeldSite, nn.Module):
    """BatchNorm2d -> act -> gate of a BN that no conv of its own feeds (an identity branch, a
    norm after a concatenation or an add), in one fused call: `channel_stats` and the gate
    epilogue in place of nn.BatchNorm2d and a stand-alone gate. The user's BN keeps its own
    train/eval flag."""

    def __init__(self, bn: nn.BatchNorm2d, act: str, index: torch.Tensor):
        nn.Module.__init__(self)
        self._hold((bn,), act, index)

    bn = property(lambda self: self._layers[0])

    def forward(self, x, values):
        bn = self.bn
        if x.dim() != 4 or x.shape[1] != bn.num_features:
            raise ValueError(f"{self._describe()}: expected input of shape (N, {bn.num_features}, H, W), "
                             f"got {tuple(x.shape)}")
        return bn_act_gate(bn, x, values.index_select(0, self.index), self.act, bn.training,
                           describe=self._describe)

    def _describe(self) -> str:
        return f"BatchNorm2d({self.bn.num_features})"


class GatedNetwork(nn.Module):
    """A copy of ``model`` with a gate on every prunable channel group it can gate.

    model: any model :func:`nasprune.graph.trace` handles; it is not modified.
    example_inputs: a tensor or tuple of tensors (batch 1 or 2) for tracing.
    gate: the gate parameterisation, a ``nasprune.nn.gates`` module or its name
        (continuous, sigmoid, threshold, fixed, sampled).
    fuse: fuse conv -> BatchNorm2d -> (ReLU | identity), and BatchNorm2d -> (ReLU | identity) fed by
        anything else, into one call each.
    memory_format: "auto" runs a model with 2-D convolutions channels-last (weights and 4-D inputs;
        oneDNN and cuDNN convolve it faster, and the fused ops take it natively), "contiguous"
        keeps NCHW. The export is contiguous either way.
    exclude, leaf_modules: as for :func:`nasprune.graph.trace`.
    skip_closed: with a binary gate (threshold, fixed), skip the convolution work closed channels
        make zero (:func:`nasprune.nn.gated_conv.skip_closed_conv`): the closed input channels
        (where a probe at construction finds a closed slot's channels zero at the conv's input)
        and the backward of closed output channels. None (default): on the CPU; True: on every
        device; False: never. The values are the dense convolution's up to summation order.

    ``graph`` is the ChannelGraph of ``model``: its group indices key every keep set and every
    dict of gate values, and a keep set applies to the user's model with
    ``slim.apply(model, gn.graph, keep)``.
    """

    def __init__(self, model: nn.Module, example_inputs, *, gate="continuous", fuse: bool = True,
                 memory_format: str = "auto", exclude=(), leaf_modules=(), skip_closed: bool | None = None):
        super().__init__()
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        self.graph: ChannelGraph = trace(model, inputs, exclude=exclude, leaf_modules=leaf_modules)
        self.model = copy.deepcopy(model)
        if memory_format not in ("auto", "channels_last", "contiguous"):
            raise ValueError(f"memory_format must be auto, channels_last or contiguous, got {memory_format!r}")
        has_conv2d = any(isinstance(m, nn.Conv2d) for m in model.modules())
        self.channels_last = memory_format == "channels_last" or (memory_format == "auto" and has_conv2d)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.gate_fn = gate_params.make(gate)
        self.fuse = bool(fuse)
        graphs = self._trace_modes(inputs)
        self.ungated = self._ungateable(graphs)   # group index -> why it has no gate
        gated = [g for g in self.graph.prunable_groups if g.index not in self.ungated]
        self.groups = [g.index for g in gated]
        sizes = [g.size for g in gated]
        self.offsets = dict(zip(self.groups, np.cumsum([0] + sizes[:-1]).tolist()))
        self.sizes = dict(zip(self.groups, sizes))
        self.num_gates = int(sum(sizes))
        device = next(iter(self.model.parameters()), torch.zeros(())).device
        self.gate = nn.Parameter(torch.full((self.num_gates,), self.gate_fn.init_value, device=device))
        self.sites = nn.ModuleDict()
        self.site_info: dict[str, list[Site]] = {}
        self.skip_closed = skip_closed
        self._open = _OpenChannels()
        modes = {}
        for mode, traced in graphs.items():
            modes[mode] = self._rewrite(traced, mode)
        self._modes = modes  # mode -> GraphModule; held outside the module tree (shared modules)
        self._cost = _GateCost(self)
        self.sites.to(device)  # the gathered slots and the cost's tables live beside the weights
        self._cost.to(device)
        if self.gate_fn.binary and skip_closed is not False:
            self._probe_closed_inputs(inputs)

    # ------------------------------------------------------------------ construction
    def _trace_modes(self, inputs) -> dict:
        """The traced copy (fx GraphModule) in training and, when its control flow differs, in eval."""
        by_name = dict(self.model.named_modules())
        leaves = [by_name[n] for n in list(self.graph.leaf_modules) + list(self.graph.leaves)]
        graphs = {}
        with preserved_state(self.model):
            for mode in ("train", "eval"):
                self.model.train(mode == "train")
                graphs[mode], _ = symbolic_trace(self.model, leaves, handler_for)
        if graphs["train"].graph.python_code("self").src == graphs["eval"].graph.python_code("self").src:
            del graphs["eval"]
        return graphs

    def _classes(self, module: str, role: str):
        record = self.graph.records.get(module)
        return None if record is None else record[1].get(role)

    def _groups_of(self, classes) -> set:
        gids = self.graph.class_group[classes]
        return {int(g) for g in gids[gids >= 0]}

    def _layer_nodes(self, fx_graph: fx.Graph, modules: dict):
        """(node, module, handler, {role: classes}) of every call of a traced layer."""
        for node in fx_graph.nodes:
            if node.op == "call_module" and node.target in self.graph.records:
                m = modules[node.target]
                yield node, m, handler_for(m), self.graph.records[node.target][1]

    def _ungateable(self, graphs) -> dict:
        """Prunable groups no gate can close exactly, and why."""
        why = {}
        prunable = {g.index for g in self.graph.prunable_groups}
        modules = dict(self.model.named_modules())
        for traced in graphs.values():
            fx_graph = traced.graph
            for node, m, handler, roles in self._layer_nodes(fx_graph, modules):
                if "channel" in roles and not isinstance(handler, BatchNormHandler) and \
                        not isinstance(m, _HOMOGENEOUS_MODULES):
                    for gi in self._groups_of(roles["channel"]) & prunable:
                        why.setdefault(gi, f"{type(m).__name__} {node.target} normalises across its "
                                           f"channels; a gate cannot remove one exactly")
                if isinstance(handler, BatchNormHandler) and (m.weight is None or m.bias is None):
                    for gi in self._groups_of(roles["channel"]) & prunable:
                        why.setdefault(gi, f"{type(m).__name__} {node.target} has no affine parameters "
                                           f"to fold a gate into")
                if "out" in roles and handler.counts and self._channel_dim(m) is None:
                    for gi in self._groups_of(roles["out"]) & prunable:
                        why.setdefault(gi, f"{type(m).__name__} {node.target}: unknown channel dimension")
            for node, layer, role in self._anchors(fx_graph, modules, prunable):
                if self._placement(node, modules) is None:
                    act = next(iter(node.users))
                    for gi in self._groups_of(self.graph.records[layer][1][role]) & prunable:
                        why.setdefault(gi, f"the activation {act.name} after {layer} does not map 0 to 0 "
                                           f"and feeds an op a gate after it cannot fold through")
        return why

    @staticmethod
    def _channel_dim(m: nn.Module):
        handler = handler_for(m)
        if isinstance(handler, LinearHandler):
            return -1
        if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase)):
            return 1
        if isinstance(m, ChannelSelect):
            return m.dim
        return None

    def _slots(self, classes) -> torch.Tensor:
        """Packed gate slot of each channel position (num_gates: the constant one)."""
        gids = self.graph.class_group[classes]
        chans = self.graph.class_channel[classes]
        slot = np.full(len(classes), self.num_gates, dtype=np.int64)
        for gi in np.unique(gids[gids >= 0]).tolist():
            if gi in self.offsets:
                sel = gids == gi
                slot[sel] = self.offsets[gi] + chans[sel]
        return torch.from_numpy(slot)

    def _reaches_only_norms(self, node: fx.Node, modules: dict) -> bool:
        """Every path from ``node`` meets a batch normalisation before anything but re-arranging
        ops (a DenseNet layer's output concatenated into the next layers' norms)."""
        for user in node.users:
            if user.op == "call_module" and isinstance(handler_for(modules[user.target]), BatchNormHandler):
                continue
            if user.op in ("call_function", "call_method") and user.target in (torch.cat, torch.concat) \
                    and self._reaches_only_norms(user, modules):
                continue
            return False
        return bool(node.users)

    def _placement(self, node: fx.Node, modules: dict):
        """(node the gate follows, fold) for anchor ``node``, or None when no place is exact.

        After a non-homogeneous activation when every path from it to the layers it feeds is
        linear (the gate then folds into their input weights); else, if the activation maps 0 to
        0 (SiLU, Hardswish, ReLU6...), before it (folding into the layer before: a stem's
        Hardswish feeding a residual add); else none (a sigmoid before an add)."""
        users = list(node.users)
        if len(users) == 1 and _is_other_activation(users[0], modules):
            if None not in self._consumers(users[0], modules):
                return users[0], "consumers"
            return (node, "affine") if _zero_at_zero(users[0], modules) else None
        return node, "affine"

    def _anchors(self, fx_graph: fx.Graph, modules: dict, groups=None):
        """(anchor node, layer name, role) of every layer whose output a gate must follow, for
        the channels of ``groups`` (default: the gated ones)."""
        groups = set(self.offsets) if groups is None else groups
        for node, m, handler, roles in self._layer_nodes(fx_graph, modules):
            if isinstance(handler, BatchNormHandler) and "channel" in roles:
                role = "channel"
            elif handler.counts and "out" in roles:
                if self._reaches_only_norms(node, modules):
                    continue  # the norms that follow carry the gate
                role = "out"
            else:
                continue
            if self._groups_of(roles[role]) & groups:
                yield node, node.target, role

    def _rewrite(self, traced: fx.GraphModule, mode: str) -> fx.GraphModule:
        graph = copy.deepcopy(traced.graph)
        modules = dict(self.model.named_modules())
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_input):
            values = graph.placeholder(_GATES)
        sites = []
        for node, layer, role in list(self._anchors(graph, modules)):
            m = modules[layer]
            index = self._slots(self.graph.records[layer][1][role])
            after, fold = self._placement(node, modules)
            name = f"{mode}_{len(sites)}"
            fused = self._fusable(node, modules) if fold == "affine" else None
            if fused is not None:
                conv_node, act_node, act = fused
                first = conv_node if conv_node is not None else node
                site = _FusedSite(modules[conv_node.target], m, act, index,
                                  self._slots(self.graph.records[conv_node.target][1]["in"]), self._open) \
                    if conv_node is not None else _NormSite(m, act, index)
                last = act_node if act_node is not None else node
                with graph.inserting_after(last):
                    new = graph.call_module(f"sites.{name}", (first.args[0], values))
                last.replace_all_uses_with(new)
                for dead in (act_node, node, conv_node):
                    if dead is not None:
                        graph.erase_node(dead)
                kind, anchor = "fused", first.name
            else:
                site = _GateSite(index, self._channel_dim(m))
                with graph.inserting_after(after):
                    new = graph.call_module(f"sites.{name}", (after, values))
                after.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
                kind, anchor = "gate", after.name
            self.sites[name] = site
            info = Site(name, anchor, layer, role, kind, site.act if kind == "fused" else "",
                        self._channel_dim(m), fold, index)
            if fold == "consumers":
                info.consumers = self._consumers(new, modules)
            sites.append(info)
        graph.lint()
        self.site_info[mode] = sites
        root = _Root(self.model, self.sites)
        for node in graph.nodes:  # constants fx made from literal tensors live on the traced module
            if node.op == "get_attr" and "." not in node.target and not hasattr(root, node.target):
                root.register_buffer(node.target, getattr(traced, node.target))
        return fx.GraphModule(root, graph, type(self.model).__name__)

    @torch.no_grad()
    def _probe_closed_inputs(self, inputs) -> None:
        """Set ``in_slots`` of every fused site whose conv input is exactly zero on every channel
        a closed gate slot holds: one eval forward of each traced mode on random inputs of the
        example's shapes, with random weights and statistics (so that a zero-initialised bias
        cannot pass for a structural zero; the model's own come back after) and a random half of
        the slots closed. A conv reached from a closed channel through anything that does not
        keep zero (a BN with no gate after it, x + 1) fails the probe and convolves all its inputs."""
        gen = torch.Generator().manual_seed(0)
        values = torch.cat([(torch.rand(self.num_gates, generator=gen) < 0.5).float(), torch.ones(1)])
        device = self.gate.device
        probe = [torch.randn(x.shape, generator=gen, dtype=x.dtype).to(device) if isinstance(x, torch.Tensor)
                 and x.is_floating_point() else x for x in self._inputs(inputs)]
        seen: dict[str, torch.Tensor] = {}   # fused site -> its input (each belongs to one mode)
        hooks = [site.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
                 for name, site in self.sites.items() if isinstance(site, _FusedSite)]
        params = [(p, p.detach().clone()) for p in self.model.parameters()]
        try:
            with preserved_state(self):   # modes and buffers
                self.eval()
                _randomise(self.model, gen)
                for gm in self._modes.values():
                    gm(*probe, **{_GATES: values.to(device=device, dtype=self.gate.dtype)})
        finally:
            for h in hooks:
                h.remove()
            for p, saved in params:
                p.copy_(saved)
        for name, x in seen.items():
            site = self.sites[name]
            slots = torch.from_numpy(site._conv_in_slots)
            closed = (values[slots] == 0).nonzero().flatten()
            if len(closed) and x.dim() == 4 and x.shape[1] == len(slots) and \
                    bool((x.index_select(1, closed.to(x.device)) == 0).all()):
                site.in_slots = site._conv_in_slots

    def _fusable(self, bn_node: fx.Node, modules: dict):
        """(conv node or None, act node or None, act) when bn_node is a BatchNorm2d: the conv when
        it alone feeds the BN, None when something else does (the BN's input is then the fused
        call's)."""
        if not self.fuse or not isinstance(modules.get(bn_node.target), nn.BatchNorm2d) or \
                len(bn_node.args) != 1 or bn_node.kwargs or not isinstance(bn_node.args[0], fx.Node):
            return None
        conv_node = bn_node.args[0]
        conv = modules.get(conv_node.target) if conv_node.op == "call_module" else None
        if not (conv is not None and len(conv_node.users) == 1 and type(handler_for(conv)) is ConvHandler
                and isinstance(conv, nn.Conv2d) and len(conv_node.args) == 1 and not conv_node.kwargs):
            conv_node = None
        users = list(bn_node.users)
        if len(users) == 1 and users[0].op == "call_module" and type(modules[users[0].target]) is nn.ReLU:
            return conv_node, users[0], "relu"
        if len(users) == 1 and users[0].op in ("call_function", "call_method") and \
                users[0].target in (F.relu, torch.relu, "relu") and len(users[0].args) == 1:
            return conv_node, users[0], "relu"
        return conv_node, None, "identity"

    def _consumers(self, node: fx.Node, modules: dict) -> list:
        """Layers fed by ``node`` through ops linear in it, for folding gate values into their
        input weights; [(layer, None)] marks a path the fold cannot follow."""
        found, todo, seen = [], list(node.users), set()
        while todo:
            user = todo.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module" and user.target in self.graph.records and \
                    "in" in self.graph.records[user.target][1]:
                found.append(user.target)
            elif user.op == "output":
                found.append(None)
            elif _is_linear(user, modules):
                todo.extend(user.users)
            else:
                found.append(None)
        return found

    # ------------------------------------------------------------------ running
    def gate_vector(self) -> torch.Tensor:
        """Every gate value (num_gates,), then a constant 1 for channels of ungated groups."""
        values = self.gate_fn(self.gate)
        return torch.cat([values, values.new_ones(1)])

    def forward(self, *inputs):
        gm = self._modes.get("train" if self.training else "eval", self._modes["train"])
        if self.channels_last:
            inputs = [x.contiguous(memory_format=torch.channels_last)
                      if isinstance(x, torch.Tensor) and x.dim() == 4 else x for x in inputs]
        values = self.gate_vector()
        if not self._skipping(values):
            return gm(*inputs, **{_GATES: values})
        self._open.values = values.detach().cpu().numpy()
        try:
            return gm(*inputs, **{_GATES: values})
        finally:
            self._open.clear()

    def _skipping(self, values: torch.Tensor) -> bool:
        """Whether this forward skips closed channels: a binary gate, skip_closed on for the
        device, and no compiler or autocast to keep the plain path for."""
        on = self.skip_closed if self.skip_closed is not None else values.device.type == "cpu"
        return bool(on and self.fuse and self.gate_fn.binary and not torch.compiler.is_compiling()
                    and not torch.is_autocast_enabled(values.device.type))

    def _resumable(self) -> "_Resumable":
        gm = self._modes.get("train" if self.training else "eval", self._modes["train"])
        cache = self.__dict__.setdefault("_resumables", {})
        if id(gm) not in cache:
            cache[id(gm)] = _Resumable(gm, self.num_gates)
        return cache[id(gm)]

    def _inputs(self, inputs) -> list:
        if self.channels_last:
            return [x.contiguous(memory_format=torch.channels_last)
                    if isinstance(x, torch.Tensor) and x.dim() == 4 else x for x in inputs]
        return list(inputs)

    def forward_and_cache(self, *inputs, groups=None) -> tuple:
        """``(self(*inputs), cache)``: the forward, and the activations a run at other gate values
        would resume from at the first gate site of each of ``groups`` (default: every gated
        group), for :meth:`forward_candidates` on the same inputs at the same gate values. The
        cached tensors are detached (shared with the forward's, copied where a later op of the
        graph writes in place); ``cache.nbytes`` is what they hold."""
        run = self._resumable()
        groups = self.groups if groups is None else groups
        slots = torch.cat([torch.arange(self.sizes[g]) + self.offsets[g] for g in groups]) if groups else \
            torch.zeros(0, dtype=torch.long)
        positions = sorted(set(run.first_read[slots].tolist()) - {len(run.nodes)})
        values = self.gate_vector()
        out, stored = run.cached_run(self._inputs(inputs), values, positions)
        return out, ForwardCache(id(run.gm), values.detach().clone(), stored)

    def forward_candidates(self, *inputs, candidates, reference: torch.Tensor | None = None,
                           cache: "ForwardCache | None" = None) -> list:
        """The network's output on ``inputs`` at each gate vector of ``candidates`` (each
        (num_gates,), the values :func:`nasprune.search.gated_searcher.gates_as` takes), equal to
        one forward per candidate, with the shared part of the work done once.

        A candidate resumes the forward at the ``reference`` gate values (default: the current
        ones) at its first gate site whose values differ from the reference: every node before
        that site sees the same inputs and gate values, so its output is the reference's.
        ``cache`` (:meth:`forward_and_cache` on the same inputs, at the reference) holds those
        activations; without it, or where it holds none for a candidate's site, the reference
        runs once as far as the candidates need. Candidates that differ in late layers (a
        greedy search's one-group changes) then cost a fraction of a forward.

        Exactly the forwards: the same ops on the same inputs, batch-statistics normalisation
        included (a layer's batch statistics depend only on its input). In training mode the
        running statistics are updated once by the shared part and once per candidate by the
        rest (not once per candidate throughout): callers that score candidates restore them.
        With autograd on, the candidates' graphs share the reference's prefix."""
        run = self._resumable()
        if cache is not None:
            if cache.graph != id(run.gm):
                raise ValueError("forward_candidates: the cache was taken in the other train/eval mode")
            ref = cache.reference
            if reference is not None and not torch.equal(torch.cat([reference.to(self.gate),
                                                                    self.gate.new_ones(1)]), ref):
                raise ValueError("forward_candidates: the cache was taken at other gate values than the reference")
        else:
            ref = self.gate_vector().detach() if reference is None else torch.cat(
                [reference.to(self.gate), self.gate.new_ones(1)])
        values = [torch.cat([v.to(self.gate), self.gate.new_ones(1)]) for v in candidates]
        return run.run(self._inputs(inputs), ref, values, None if cache is None else cache.stored)

    # ------------------------------------------------------------------ gates per group
    def gate_values(self) -> dict[int, torch.Tensor]:
        """{group index: gate values of its channels} (differentiable)."""
        values = self.gate_fn(self.gate)
        return {g: values[o:o + self.sizes[g]] for g, o in self.offsets.items()}

    def set_gates(self, raw: Mapping) -> None:
        """Set the raw gate parameters of the groups given: {group index: tensor of its size}."""
        with torch.no_grad():
            for g, value in raw.items():
                g = int(g)
                if g not in self.offsets:
                    reason = self.ungated.get(g, "not a prunable group of this graph")
                    raise KeyError(f"group {g} has no gate: {reason}")
                value = torch.as_tensor(value, dtype=self.gate.dtype, device=self.gate.device)
                if value.shape != (self.sizes[g],):
                    raise ValueError(f"set_gates: group {g} has {self.sizes[g]} channels, got a tensor of "
                                     f"shape {tuple(value.shape)}")
                o = self.offsets[g]
                self.gate[o:o + self.sizes[g]] = value

    # ------------------------------------------------------------------ cost
    def expected_macs(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """MACs per sample (TAS convention) with each channel counted by its gate value:
        differentiable, exact at 0/1 gates (= CostModel.exact of the keep set)."""
        return self._cost.macs(self.gate_fn(self.gate) if values is None else values)

    def expected_params(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """Parameters with each channel counted by its gate value; exact at 0/1 gates."""
        return self._cost.params(self.gate_fn(self.gate) if values is None else values)

    @property
    def base_macs(self) -> int:
        return self._cost.base_macs

    @property
    def base_params(self) -> int:
        return self._cost.base_params

    # ------------------------------------------------------------------ discretise, export
    def keep(self, rule: str = "nonzero", *, threshold: float = 0.5, k=None, macs=None, params=None,
             round_to: int = 1) -> dict[int, torch.Tensor]:
        """A keep set for ``slim.apply(model, self.graph, keep)`` from the current gate values.

        rule "nonzero": every channel whose gate is not 0; "threshold": gate > threshold;
        "topk": the k largest gates of each group (k an int, a fraction of the group, or a
        {group: int} dict); "budget": the largest gates over all groups, as many as fit in
        ``macs`` (or ``params``), an absolute count or a fraction (<= 1) of the unpruned model's.
        round_to: kept widths rounded to a multiple (down, but never below one multiple), the
        group's and then every member layer's (a residual stream's layers hold different parts
        of its group: :func:`nasprune.slim.uniform.group_keep`).
        Every member layer keeps at least one channel of a group it holds part of.
        """
        values = self.gate_fn(self.gate).detach().float().cpu()
        per_group = {g: values[o:o + self.sizes[g]] for g, o in self.offsets.items()}
        if rule == "nonzero":
            counts = {g: int((v != 0).sum()) for g, v in per_group.items()}
        elif rule == "threshold":
            counts = {g: int((v > threshold).sum()) for g, v in per_group.items()}
        elif rule == "topk":
            if k is None:
                raise ValueError("keep('topk') needs k: an int, a fraction in (0, 1) or {group: int}")
            counts = {g: int(k[g]) if isinstance(k, Mapping) else
                      (int(round(k * self.sizes[g])) if isinstance(k, float) else int(k)) for g in per_group}
        elif rule == "budget":
            return self._budget_keep(per_group, macs, params, round_to)
        else:
            raise ValueError(f"rule must be nonzero, threshold, topk or budget, got {rule!r}")
        return self._keep_from_counts(per_group, counts, round_to)

    def _keep_from_counts(self, per_group, counts, round_to) -> dict[int, torch.Tensor]:
        keep = {}
        for g, v in per_group.items():
            size = self.sizes[g]
            n = min(max(int(counts[g]), 1), size)
            if round_to > 1 and n < size:
                n = min(size, max(round_to, n - n % round_to))
            ranked = torch.argsort(v, descending=True, stable=True).tolist()
            chosen = group_keep(self.graph.groups[g], n, ranked, round_to)
            if len(chosen) < size:
                keep[g] = torch.tensor(sorted(chosen), dtype=torch.long)
        return keep

    def _budget_keep(self, per_group, macs, params, round_to):
        if (macs is None) == (params is None):
            raise ValueError("keep('budget') needs exactly one of macs= or params=")
        limit, cost = (macs, self._cost.macs) if macs is not None else (params, self._cost.params)
        base = self._cost.base_macs if macs is not None else self._cost.base_params
        limit = limit * base if limit <= 1 else limit
        everything = torch.cat([v for v in per_group.values()]) if per_group else torch.zeros(0)
        levels = torch.unique(everything).sort(descending=True).values.tolist()

        def attempt(level):
            counts = {g: int((v >= level).sum()) for g, v in per_group.items()}
            keep = self._keep_from_counts(per_group, counts, round_to)
            return keep, float(cost(self.keep_vector(keep)))

        lo, hi, best = 0, len(levels) - 1, None
        while lo <= hi:  # the lowest level (most channels) whose keep set fits the budget
            mid = (lo + hi) // 2
            keep, c = attempt(levels[mid])
            if c <= limit:
                best, lo = keep, mid + 1
            else:
                hi = mid - 1
        if best is None:
            keep, c = attempt(float("inf"))
            if c > limit:
                raise KeepError(f"even one channel per group costs {c:.4g}, over the budget {limit:.4g}")
            best = keep
        return best

    def keep_vector(self, keep: Mapping) -> torch.Tensor:
        """0/1 gate values (num_gates,) of a keep set: 1 for kept channels and unlisted groups."""
        v = torch.ones(self.num_gates, dtype=torch.float64)
        for g, idx in keep.items():
            g = int(g)
            if g not in self.offsets:
                if len(idx) < self.graph.groups[g].size:
                    raise KeepError(f"group {g} has no gate ({self.ungated.get(g, 'not prunable')})")
                continue
            o = self.offsets[g]
            v[o:o + self.sizes[g]] = 0
            v[o + torch.as_tensor(idx, dtype=torch.long)] = 1
        return v

    def slot_map(self, slimmed: "GatedNetwork", kept: torch.Tensor) -> torch.Tensor:
        """For each gate slot of ``slimmed`` (a gated network of this network's model slimmed to
        the channels of the 0/1 gate vector ``kept``, :meth:`keep_vector`) the slot of this
        network it stands for. A slimmed layer keeps its kept positions in order, so every role
        of every layer the two channel graphs record pairs this network's kept slots with the
        slimmed one's. Raises ValueError, naming the layer, where they do not pair one to one."""
        kept = torch.cat([kept.detach().cpu() > 0.5, torch.ones(1, dtype=torch.bool)])
        if kept.numel() != self.num_gates + 1:
            raise ValueError(f"kept has {kept.numel() - 1} entries, the network {self.num_gates} gates")
        out = torch.full((slimmed.num_gates + 1,), -1, dtype=torch.long)
        for name, (_, roles) in self.graph.records.items():
            slim_roles = slimmed.graph.records.get(name, (None, {}))[1]
            for role, classes in roles.items():
                if role not in slim_roles:
                    raise ValueError(f"{name} ({role}) is not in the slimmed network's graph")
                full = self._slots(classes)
                src, dst = full[kept[full]], slimmed._slots(slim_roles[role])
                if dst.numel() != src.numel():
                    raise ValueError(f"{name} ({role}) keeps {src.numel()} channels, the slimmed network "
                                     f"has {dst.numel()}")
                if bool(((dst < slimmed.num_gates) != (src < self.num_gates)).any()):
                    raise ValueError(f"{name} ({role}) is gated in only one of the two networks")
                seen = out[dst]
                if bool(((seen >= 0) & (seen != src)).any()):
                    raise ValueError(f"{name} ({role}) maps a slimmed gate to two of this network's")
                out[dst] = src
        out = out[:-1]
        if bool((out < 0).any()) or out.numel() != int(kept[:-1].sum()) or out.unique().numel() != out.numel():
            raise ValueError(f"the slimmed network's {slimmed.num_gates} gates do not pair one to one with the "
                             f"{int(kept[:-1].sum())} kept slots")
        return out

    def export(self, keep: Mapping | None = None) -> nn.Module:
        """A plain slimmed copy of the user's model (its own class, on the CPU, in eval mode)
        equal to this gated network in eval: every site's gate values are folded into the
        preceding affine layer (or, after a non-homogeneous activation, into the input weights
        of the layers it feeds), then the channels outside ``keep`` (default: every channel
        whose gate is 0) are cut out by :func:`nasprune.slim.apply`."""
        from nasprune.slim import apply
        if keep is None:
            keep = self.keep("nonzero")
        values = torch.cat([self.gate_fn(self.gate).detach(), self.gate.new_ones(1)]).double().cpu()
        folded = copy.deepcopy(self.model).cpu().to(memory_format=torch.contiguous_format)
        modules = dict(folded.named_modules())
        done = set()  # a layer called several times has one site per call, all with the same gates
        for site in [s for sites in self.site_info.values() for s in sites]:
            if (site.module, site.role) not in done:
                done.add((site.module, site.role))
                self._fold(site, values[site.index], modules)
        return apply(folded.eval(), self.graph, keep)

    def _fold(self, site: Site, g: torch.Tensor, modules: dict) -> None:
        if bool((g == 1).all()):
            return
        m = modules[site.module]
        with torch.no_grad():
            if site.fold == "affine":
                if site.act == "relu" and bool((g < 0).any()):  # g * relu(u) = relu(g * u) needs g >= 0
                    bad = (g < 0).nonzero().flatten().tolist()[:4]
                    raise ValueError(f"export: gate values at {site.module} channels {bad} are negative; a "
                                     f"negative gate after a ReLU cannot be folded into the layer before it")
                for tensor in (m.weight, getattr(m, "bias", None)):
                    if tensor is not None:
                        tensor.mul_(g.to(tensor.dtype).view([-1] + [1] * (tensor.dim() - 1)))
                if callable(getattr(m, "refresh", None)):      # a layer caching facts about its tensors
                    m.refresh()
                return
            consumers = site.consumers
            if None in consumers:
                raise ValueError(f"export: the gate after {site.module}'s activation reaches a layer or the "
                                 f"model output through an op that is not linear in it; it cannot be folded")
            for name in dict.fromkeys(consumers):
                self._fold_input(modules[name], name, site, g)

    def _fold_input(self, layer: nn.Module, name: str, site: Site, g: torch.Tensor) -> None:
        """Scale the input weights of ``layer`` where its input channels carry the site's classes."""
        site_classes = self.graph.records[site.module][1][site.role]
        scale_of = dict(zip(site_classes.tolist(), g.tolist()))
        in_classes = self.graph.records[name][1]["in"]
        scale = torch.tensor([scale_of.get(int(c), 1.0) for c in in_classes], dtype=torch.float64)
        w = layer.weight
        if isinstance(layer, nn.Linear):
            w.mul_(scale.to(w.dtype).view(1, -1))
        elif isinstance(layer, nn.modules.conv._ConvTransposeNd):
            w.mul_(scale.to(w.dtype).view([-1] + [1] * (w.dim() - 1)))
        elif isinstance(layer, nn.modules.conv._ConvNd):
            groups, per_in = layer.groups, layer.in_channels // layer.groups
            per_out = layer.out_channels // groups
            s = scale.view(groups, per_in).repeat_interleave(per_out, dim=0)  # (out, in/groups)
            w.mul_(s.to(w.dtype).view(s.shape + (1,) * (w.dim() - 2)))
        else:
            raise ValueError(f"export: cannot fold gate values into the inputs of {type(layer).__name__} {name}")


def _randomise(model: nn.Module, gen: torch.Generator) -> None:
    """Random floating parameters (fan-in scaled) and buffers (variances in [0.5, 1.5])."""
    for p in model.parameters():
        if p.is_floating_point():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / fan_in ** 0.5)
    for name, b in model.named_buffers():
        if b.is_floating_point():
            b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5 if name.endswith("var")
                    else torch.randn(b.shape, generator=gen, dtype=b.dtype))


_IN_PLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior}


def _in_place(node: fx.Node, modules: dict) -> bool:
    """The node may write one of its inputs in place (x += y, relu_, inplace=True)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_function":
        return node.target in _IN_PLACE_FUNCS or getattr(node.target, "__name__", "").endswith("_")
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    return False


@dataclass
class ForwardCache:
    """Activations of one forward of a gated network (:meth:`GatedNetwork.forward_and_cache`):
    per graph position, the values live there (shared between positions)."""
    graph: int                 # id of the rewritten graph (train or eval mode) it ran
    reference: torch.Tensor    # the gate vector it ran at (num_gates + 1,)
    stored: dict               # position -> {fx node: tensor}

    @property
    def nbytes(self) -> int:
        unique = {id(t): t for values in self.stored.values() for t in values.values()
                  if isinstance(t, torch.Tensor)}
        return sum(t.numel() * t.element_size() for t in unique.values())


class _Resumable:
    """A rewritten graph run node by node, so that a run at other gate values can resume it at
    any node from the activations live there (GatedNetwork.forward_candidates)."""

    def __init__(self, gm: fx.GraphModule, num_gates: int):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        pos = {n: i for i, n in enumerate(self.nodes)}
        self.gates = next(n for n in self.nodes if n.op == "placeholder" and n.target == _GATES)
        self.inputs = [n for n in self.nodes if n.op == "placeholder" and n is not self.gates]
        # the last node reading each node's value (its own position when unread)
        self.last_use = {n: max([pos[u] for u in n.users], default=pos[n]) for n in self.nodes}
        # per packed gate slot, the first node that reads it: a site reads its gathered slots,
        # anything else (none in a rewritten graph) is taken to read them all
        first = torch.full((num_gates + 1,), len(self.nodes), dtype=torch.long)
        for user in self.gates.users:
            index = getattr(gm.get_submodule(user.target), "index", None) if user.op == "call_module" else None
            if isinstance(index, torch.Tensor):
                index = index.cpu()
                first[index] = torch.minimum(first[index], torch.tensor(pos[user]))
            else:
                first.clamp_(max=pos[user])
        self.first_read = first
        # the last node that writes a value in place: activations a run resumes from are copies
        # where one at or after the resume point could write them
        modules = dict(gm.named_modules())
        self.last_inplace = max([pos[n] for n in self.nodes if _in_place(n, modules)], default=-1)

    def _run(self, env: dict, start: int, stop: int):
        """Nodes [start, stop) on ``env`` (updated in place, values freed after their last
        use); the output node's value when it ran."""
        interp = self.__dict__.get("_interp")
        if interp is None:
            interp = self._interp = fx.Interpreter(self.gm, garbage_collect_values=False)
        interp.env = env
        out = None
        try:
            for i in range(start, stop):
                node = self.nodes[i]
                if node.op == "placeholder":
                    continue
                value = interp.run_node(node)
                if node.op == "output":
                    out = value
                elif node.users:
                    env[node] = value
                for arg in node.all_input_nodes:
                    if self.last_use[arg] <= i:
                        env.pop(arg, None)
        finally:
            interp.env = {}
        return out

    def _live(self, env: dict, cut: int, detach: bool = False) -> dict:
        """The values of ``env`` read at or after position ``cut`` (copies where an op there may
        write in place)."""
        copy = self.last_inplace >= cut

        def own(v):
            if not isinstance(v, torch.Tensor):
                return v
            v = v.detach() if detach else v
            return v.clone() if copy else v
        return {n: own(v) for n, v in env.items() if n is not self.gates and self.last_use[n] >= cut}

    def cached_run(self, inputs, values: torch.Tensor, positions: list) -> tuple:
        """(output, {position: live values}) of a run at ``values``."""
        if len(inputs) != len(self.inputs):
            raise TypeError(f"the network takes {len(self.inputs)} inputs, got {len(inputs)}")
        env = dict(zip(self.inputs, inputs))
        env[self.gates] = values
        stored, done, seen = {}, 0, {}
        for cut in positions:
            self._run(env, done, cut)
            done = cut
            live = self._live(env, cut, detach=True)
            # one tensor per node across positions (a value live at several positions is kept once)
            stored[cut] = {n: seen.setdefault(n, v) if self.last_inplace < cut else v for n, v in live.items()}
        return self._run(env, done, len(self.nodes)), stored

    def run(self, inputs, reference: torch.Tensor, candidates: list, stored: dict | None = None) -> list:
        if len(inputs) != len(self.inputs):
            raise TypeError(f"the network takes {len(self.inputs)} inputs, got {len(inputs)}")
        end, stored = len(self.nodes), stored or {}
        first = self.first_read.to(reference.device)
        cuts = []
        for v in candidates:
            changed = v != reference
            cuts.append(int(first[changed].min()) if bool(changed.any()) else end)
        env = None                       # the reference's run, started when a candidate needs it
        outputs, done, ref_out = [None] * len(candidates), 0, None
        for k in sorted(range(len(candidates)), key=lambda k: cuts[k]):
            cut = cuts[k]
            if cut in stored:
                own = dict(stored[cut])
                if self.last_inplace >= cut:
                    own = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in own.items()}
            else:
                if env is None:
                    env = dict(zip(self.inputs, inputs))
                    env[self.gates] = reference
                if cut > done:
                    ref_out = self._run(env, done, cut)
                    done = cut
                if cut == end:
                    outputs[k] = ref_out
                    continue
                own = self._live(env, cut)   # the reference's values read at or after the cut
            own[self.gates] = candidates[k]
            outputs[k] = self._run(own, cut, end)
        return outputs


class _Root(nn.Module):
    """The module tree a rewritten graph resolves its targets in: the user's layers, the model's
    own top-level tensors, and the sites (the same objects, not copies)."""

    def __init__(self, model: nn.Module, sites: nn.ModuleDict):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.sites = sites


def _tensor(module: nn.Module, name: str):
    try:
        return module.get_parameter(name)
    except AttributeError:
        return None


class _GateCost(nn.Module):
    """Expected MACs and parameters of a gated network as one vectorised expression.

    Every counted layer's MACs are bilinear in its kept input and output widths (conv, linear,
    transposed conv; a depthwise conv is linear in its output width), so the coefficients are
    read once from the layer handler's own formula (the one cost model, nasprune.flops); every
    parameter tensor's size is its full size times the kept fraction along each channel
    dimension. A width is the sum of the gate values over a layer's channel positions (a
    constant 1 for channels of ungated groups): one gather and one index_add per evaluation.
    """

    def __init__(self, gn: GatedNetwork):
        super().__init__()
        from nasprune.flops import CostModel, count_params
        graph = gn.graph
        cost = CostModel(graph)
        rows, slots, full = [], [], []

        def width_row(classes) -> int:
            """A width: the sum of gate values over ``classes``; returns its row."""
            index = gn._slots(np.asarray(classes, dtype=np.int64))
            rows.append(torch.full((len(index),), len(full), dtype=torch.long))
            slots.append(index)
            full.append(len(index))
            return len(full) - 1

        macs = []  # (coef, row a, row b): MACs = sum coef * W[a] * W[b], row -1 the constant 1
        for i, (_, _, _, _, cin, cout) in enumerate(cost.layers):
            def probe(a, b, i=i):
                return float(cost._layer_macs(i, torch.tensor(float(a), dtype=torch.float64),
                                              torch.tensor(float(b), dtype=torch.float64)))
            d = probe(0, 0)
            if cin is None or cout is None:  # a layer kept whole
                macs.append((d, -1, -1))
                continue
            b_in, c_out = probe(1, 0) - d, probe(0, 1) - d
            a = probe(1, 1) - d - b_in - c_out
            ri, ro = width_row(cin), width_row(cout)
            macs += [(a, ri, ro), (b_in, ri, -1), (c_out, ro, -1), (d, -1, -1)]
        self.base_macs = int(cost.total())

        params, covered = [], {}
        for name, (handler, roles) in graph.records.items():
            module = graph.modules[name]
            dims: dict = {}
            for role, classes in roles.items():
                if role == "in" and getattr(handler, "depthwise", lambda m: False)(module):
                    continue  # one input channel per output channel: the out width counts
                for tensor, _ in handler.roles.get(role, ()):
                    dims.setdefault(tensor, []).append(classes)
            for tensor, per_dim in dims.items():
                t = _tensor(module, tensor)
                if t is None or id(t) in covered:
                    continue
                covered[id(t)] = t.numel()
                coef = float(t.numel()) / float(np.prod([len(c) for c in per_dim]))
                params.append((coef, *([width_row(c) for c in per_dim] + [-1, -1])[:2]))
        for name, classes in graph.params.items():
            t = _tensor(gn.model, name)
            if t is None or id(t) in covered:
                continue
            covered[id(t)] = t.numel()
            lines = [classes.movedim(d, 0).reshape(classes.shape[d], -1)[:, 0].numpy()
                     for d in range(classes.dim()) if classes.shape[d] > 1]
            if len(lines) > 2:
                raise NotImplementedError(f"parameter {name} holds channels along {len(lines)} dims")
            coef = float(t.numel()) / float(np.prod([len(c) for c in lines]))
            params.append((coef, *([width_row(c) for c in lines] + [-1, -1])[:2]))
        self.base_params = int(count_params(gn.model))
        params.append((float(self.base_params - sum(covered.values())), -1, -1))

        for prefix, terms in (("macs", macs), ("params", params)):
            self.register_buffer(f"{prefix}_coef", torch.tensor([t[0] for t in terms], dtype=torch.float64),
                                 persistent=False)
            self.register_buffer(f"{prefix}_rows", torch.tensor([t[1:] for t in terms], dtype=torch.long).view(-1, 2),
                                 persistent=False)
        self.register_buffer("rows", torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("slots", torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long),
                             persistent=False)
        self.n_rows = len(full)

    def _evaluate(self, coef, pairs, values):
        v = torch.cat([values.to(device=coef.device, dtype=coef.dtype), coef.new_ones(1)])  # any caller's device
        w = coef.new_zeros(self.n_rows).index_add(0, self.rows, v.index_select(0, self.slots))
        w = torch.cat([w, coef.new_ones(1)])  # row -1: the constant 1
        return (coef * w[pairs[:, 0]] * w[pairs[:, 1]]).sum()

    def macs(self, values: torch.Tensor) -> torch.Tensor:
        return self._evaluate(self.macs_coef, self.macs_rows, values)

    def params(self, values: torch.Tensor) -> torch.Tensor:
        return self._evaluate(self.params_coef, self.params_rows, values)
