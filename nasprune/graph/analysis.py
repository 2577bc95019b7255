"""Walk a traced graph, derive channel classes, and group them: ``nasprune.graph.trace``."""
from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx, nn

from nasprune.graph import rules
from nasprune.graph.context import TraceContext
from nasprune.handlers.fields import TensorInfo
from nasprune.graph.groups import ChannelGraph, ChannelGroup, IndexMap, Member
from nasprune.graph.tracer import TraceError, preserved_state, record_shapes, symbolic_trace

_MAX_PARAM_ATOMS = 1 << 22  # a parameter used directly gets one atom per element, up to this


def trace(model: nn.Module, example_inputs, *, exclude=(), leaf_modules=(), mode: str = "train") -> ChannelGraph:
    """Analyse ``model`` into channel groups.

    example_inputs: a tensor or tuple of tensors for ``model(*example_inputs)`` (batch 1 or 2
        keeps it fast). exclude: modules (or names) whose output channels must stay.
    leaf_modules: modules fx should not trace into. mode: "train" traces the training-time
        control flow (auxiliary heads included); shapes are always recorded in eval mode, and
        the model's modes, buffers and the global RNG are left as they were.
    """
    from nasprune.handlers import handler_for

    if not isinstance(model, nn.Module):
        raise TypeError(f"trace expects an nn.Module, got {type(model).__name__}")
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    by_name = dict(model.named_modules())
    exclude_names, leaf_modules = _resolve(model, by_name, exclude, leaf_modules)

    with preserved_state(model):
        model.train(mode == "train")
        gm, auto_leaves = symbolic_trace(model, leaf_modules, handler_for)
        model.eval()
        # layers that run at inference: what cost models count (auxiliary heads do not)
        eval_layers = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        if mode == "train":
            try:
                leaves = list(leaf_modules) + [by_name[n] for n in auto_leaves]
                gm_eval, _ = symbolic_trace(model, leaves, handler_for)
                eval_layers = {n.target for n in gm_eval.graph.nodes if n.op == "call_module"}
            except TraceError:
                pass
        try:
            infos, out_info = record_shapes(gm, inputs, handler_for)
        except Exception as exc:
            raise ValueError(f"running {type(model).__name__} on the example inputs failed: "
                             f"{type(exc).__name__}: {exc}") from exc

    walker = _Walker(gm, infos, handler_for, model)
    walker.run()
    ctx = walker.ctx
    for name in exclude_names:
        for role, atoms in ctx.records.get(name, {}).items():
            if role != "in":
                ctx.atoms.block(atoms, f"excluded layer {name}")
    graph = _build(ctx, walker, type(model).__name__)
    graph.leaves = auto_leaves
    graph.fx_graph = gm.graph
    graph.eval_layers = eval_layers
    graph.modules = {name: walker.modules[name] for name in graph.records}
    for name, _, _ in graph.calls:
        graph.modules.setdefault(name, walker.modules[name])
    graph.input_spec = [(tuple(x.shape), x.dtype) for x in inputs]
    graph.output_info = out_info
    graph.exclude = exclude_names
    graph.mode = mode
    graph.leaf_modules = [n for n, m in by_name.items() if any(m is leaf for leaf in leaf_modules)]
    return graph


def _resolve(model, by_name, exclude, leaf_modules):
    """Module names for ``exclude`` and module objects for ``leaf_modules`` (either accepted)."""
    names = {id(m): n for n, m in by_name.items()}
    exclude_names = []
    for e in exclude:
        name = e if isinstance(e, str) else names.get(id(e))
        if name not in by_name:
            raise ValueError(f"exclude: {e!r} is not a submodule of {type(model).__name__}")
        exclude_names.append(name)
    leaves = [by_name.get(m, m) if isinstance(m, str) else m for m in leaf_modules]
    for m in leaves:
        if not isinstance(m, nn.Module) or id(m) not in names:
            raise ValueError(f"leaf_modules: {m!r} is not a submodule of {type(model).__name__}")
    return exclude_names, leaves


class _Walker:
    def __init__(self, gm: fx.GraphModule, infos: dict, handler_for, model: nn.Module):
        self.gm, self.infos, self.handler_for, self.model = gm, infos, handler_for, model
        self.ctx = TraceContext()
        self.fields: dict[fx.Node, object] = {}
        self.params: dict[str, torch.Tensor] = {}
        self.calls: list[tuple[str, object, object]] = []
        self.modules = dict(gm.named_modules())
        self.sources: dict[fx.Node, object] = {}  # int node -> (tensor node, dim) it was read from

    def source_of(self, node):
        return self.sources.get(node)

    def _track_sizes(self, node: fx.Node) -> None:
        """Remember where size values come from (x.size(1), x.shape[-1], ...)."""
        t, args = node.target, node.args
        info = self.infos.get(args[0]) if args and isinstance(args[0], fx.Node) else None
        if isinstance(info, TensorInfo):
            nd = len(info.shape)
            if node.op == "call_method" and t == "size":
                dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
                self.sources[node] = [(args[0], i) for i in range(nd)] if dim is None else (args[0], dim % nd)
            elif node.op == "call_function" and t is getattr and args[1] == "shape":
                self.sources[node] = [(args[0], i) for i in range(nd)]
        elif node.op == "call_function" and t is operator.getitem and args[0] in self.sources:
            src = self.sources[args[0]]
            if isinstance(src, list):
                try:
                    self.sources[node] = src[args[1]]
                except (TypeError, IndexError):
                    pass

    def field_of(self, node, create: bool = True):
        f = self.fields.get(node)
        if f is _LAZY:
            if not create:
                return None
            f = self._param_field(node)
            self.fields[node] = f
        return f

    def info_of(self, node):
        return self.infos[node]

    def _param_field(self, node: fx.Node):
        info = self.infos[node]
        if not isinstance(info, TensorInfo):
            return None
        numel = int(np.prod(info.shape)) if info.shape else 1
        owner, _, attr = node.target.rpartition(".")
        try:
            in_model = isinstance(getattr(self.model.get_submodule(owner), attr), torch.Tensor)
        except AttributeError:
            in_model = False
        if not in_model:  # a constant fx made from a literal tensor: nothing to slice
            return self.ctx.constant(len(info.shape), f"constant tensor {node.target}")
        if numel > _MAX_PARAM_ATOMS:
            return self.ctx.constant(len(info.shape), f"large tensor {node.target} used directly")
        atoms = self.ctx.atoms.new(numel)
        field = torch.from_numpy(atoms).view(info.shape)
        self.params[node.target] = field
        return field

    def run(self):
        ctx = self.ctx
        for node in self.gm.graph.nodes:
            info = self.infos.get(node)
            if node.op == "placeholder":
                self.fields[node] = rules.constant_like(ctx, info, "model input")
            elif node.op == "get_attr":
                self.fields[node] = _LAZY
            elif node.op == "call_module":
                self.fields[node] = self._module(node, info)
            elif node.op in ("call_function", "call_method"):
                self._track_sizes(node)
                op = rules.OpView(ctx, node, self.field_of, self.info_of, self.source_of)
                self.fields[node] = rules.apply(ctx, op)
            elif node.op == "output":
                fx.node.map_arg(node.args, lambda n: self._block_tree(self.field_of(n), "model output"))

    def _block_tree(self, value, reason):
        if isinstance(value, torch.Tensor):
            self.ctx.block_field(value, reason)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._block_tree(v, reason)
        elif isinstance(value, dict):
            for v in value.values():
                self._block_tree(v, reason)

    def _module(self, node: fx.Node, info):
        from nasprune.handlers import ModuleCall
        module = self.modules[node.target]
        handler = self.handler_for(module)
        args = [self.field_of(a) if isinstance(a, fx.Node) else None for a in node.args]
        arg_infos = [self.infos[a] if isinstance(a, fx.Node) else a for a in node.args]
        kwfields = {k: self.field_of(v) for k, v in node.kwargs.items() if isinstance(v, fx.Node)}
        in_shape = arg_infos[0].shape if arg_infos and isinstance(arg_infos[0], TensorInfo) else None
        out_shape = info.shape if isinstance(info, TensorInfo) else None
        self.calls.append((node.target, in_shape, out_shape))
        if handler is None:
            reason = f"no pruning handler for {type(module).__name__} ({node.target})"
            for f in list(args) + list(kwfields.values()):
                self._block_tree(f, reason)
            self.ctx.notes.append((node.target, reason))
            return rules.constant_like(self.ctx, info, reason)
        call = ModuleCall(node.target, module, args, arg_infos, info, kwfields)
        return handler.trace(self.ctx, call)


_LAZY = object()


def _build(ctx: TraceContext, walker: _Walker, model_class: str) -> ChannelGraph:
    atoms = ctx.atoms
    n = len(atoms)
    roots = atoms.find(np.arange(n))
    blocked = atoms.blocked(np.arange(n))

    # channels created by one producer belong to one group
    comp = np.arange(n)

    def comp_find(i):
        while comp[i] != i:
            comp[i] = comp[comp[i]]
            i = comp[i]
        return i

    first_seen = {}
    for order, (_, _, produced) in enumerate(ctx.producers):
        cls = np.unique(roots[produced])
        if not len(cls):    # a producer of no channels (a channel pad of width 0 in a slimmed net)
            continue
        for c in cls.tolist():
            first_seen.setdefault(c, order)
        a = comp_find(int(cls[0]))
        for c in cls[1:].tolist():
            b = comp_find(c)
            if a != b:
                comp[max(a, b)] = min(a, b)
                a = min(a, b)
    group_classes: dict[int, list[int]] = {}
    for c in sorted(first_seen, key=lambda c: (first_seen[c], c)):
        group_classes.setdefault(comp_find(c), []).append(c)
    ordered = sorted(group_classes.values(), key=lambda cs: min(first_seen[c] for c in cs))

    # member dimensions: every recorded layer role, and parameters used directly
    dims = []  # (module, layer_type, role, tensor, dim, classes per position)
    for module, roles in ctx.records.items():
        handler = ctx.record_handlers[module]
        mod = walker.modules[module]
        for role, pos in roles.items():
            tensor, dim = handler.primary(mod, role)
            dims.append((module, type(mod).__name__, role, tensor, dim, roots[pos]))
    param_classes = {}
    for name, field in walker.params.items():
        cls = torch.from_numpy(roots[field.reshape(-1).numpy()]).view(field.shape)
        param_classes[name] = cls
        for d in range(cls.dim()):
            if cls.shape[d] < 2:
                continue
            rows = cls.movedim(d, 0).reshape(cls.shape[d], -1)
            if bool((rows == rows[:, :1]).all()) and len(torch.unique(rows[:, 0])) > 1:
                dims.append((name, "Parameter", "param", name.rsplit(".", 1)[-1], d, rows[:, 0].numpy()))

    provisional = np.full(n, -1, dtype=np.int64)
    for gi, classes in enumerate(ordered):
        provisional[classes] = gi
    # channel order of a group: that of the member holding most of its channels, then the rest
    best: dict[int, tuple[int, int]] = {}
    for di, d in enumerate(dims):
        gids = provisional[np.unique(d[5])]
        counts = np.bincount(gids[gids >= 0], minlength=len(ordered))
        for gi in np.nonzero(counts)[0].tolist():
            if counts[gi] > best.get(gi, (0, -1))[0]:
                best[gi] = (int(counts[gi]), di)

    class_group = np.full(n, -1, dtype=np.int64)
    class_channel = np.full(n, -1, dtype=np.int64)
    groups = []
    for gi, classes in enumerate(ordered):
        candidates = ([best[gi][1]] if gi in best else []) + list(range(len(dims)))
        order, have = [], set()
        for di in candidates:
            pos = dims[di][5]
            sel = pos[provisional[pos] == gi]
            if len(sel) == 0:
                continue
            _, first = np.unique(sel, return_index=True)
            for c in sel[np.sort(first)].tolist():
                if c not in have:
                    have.add(c)
                    order.append(c)
            if len(order) == len(classes):
                break
        order.extend(c for c in classes if c not in have)
        order = np.array(order, dtype=np.int64)
        class_group[order] = gi
        class_channel[order] = np.arange(len(order))
        reasons = [atoms.reason(int(c)) for c in order if blocked[c]]
        groups.append(ChannelGroup(index=gi, size=len(order), members=[], prunable=not reasons,
                                   reason=reasons[0] if reasons else None, _classes=order))

    for module, layer_type, role, tensor, dim, pos_classes in dims:
        gids = class_group[pos_classes]
        for gi in np.unique(gids[gids >= 0]).tolist():
            where = np.nonzero(gids == gi)[0]
            chans = class_channel[pos_classes[where]]
            groups[gi].members.append(Member(module, layer_type, role, tensor, dim,
                                             _index_map(chans, where)))

    records = {m: (ctx.record_handlers[m], {r: roots[p] for r, p in roles.items()})
               for m, roles in ctx.records.items()}
    return ChannelGraph(model_class=model_class, groups=groups, leaves={}, notes=list(ctx.notes),
                        input_spec=[], output_info=None, exclude=[], mode="train", records=records,
                        params=param_classes, calls=walker.calls, class_group=class_group,
                        class_channel=class_channel)


def _index_map(chans: np.ndarray, positions: np.ndarray) -> IndexMap:
    order = np.argsort(chans, kind="stable")
    chans, positions = chans[order], positions[order]
    uniq, counts = np.unique(chans, return_counts=True)
    r = int(counts.max())
    if (counts == r).all():
        pos = positions.reshape(len(uniq), r)
    else:
        pos = np.full((len(uniq), r), -1, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for i, (s, c) in enumerate(zip(starts, counts)):
            pos[i, :c] = positions[s:s + c]
    return IndexMap(torch.from_numpy(uniq.astype(np.int64)), torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64)))
