"""untie(model, example_inputs): every residual stream cut into one channel group per block.

A residual add ties the channels of its two inputs, so in a ResNet a whole stage (the stem or
the downsampling shortcut, and every block's last layer) is one channel group: one width, and
one set of kept channels, for all its blocks. :func:`untie` returns a copy of the model whose
shortcuts pass the stream through a :class:`nasprune.nn.ChannelSelect` (the identity until it
is slimmed): each add then merges channels that only its own block produces, so every block's
output is a channel group of its own, and a shortcut between two blocks that keep different
channels gathers the ones both keep (a channel only the later block keeps reads zero from the
shortcut). The copy computes what the model computes; slimmed, it is a dense network whose
shortcuts gather.

A shortcut is an input of an add reached from a value something else also reads (the block's
input, which its first layer reads too) through ops that keep channels where they are (batch
norms, activations, the option-A shortcut's subsampling and zero padding), without a layer
that makes channels (a convolution, a linear layer) in between: such a layer (ResNet's
downsampling convolution) already gives the add fresh channels. Only 4-D (N, C, H, W) and 2-D
(N, C) adds are untied: in a (N, L, C) tensor the channel dimension is not dim 1.

The result is an :class:`Untied` module: the model's own layers under ``model``, the shortcuts'
selections under ``selects``, run by the traced graph of the model with the selections in it
(one per train/eval mode when the two differ). ``nasprune.slim.apply`` slims it like any model,
``nasprune.save`` records the untie as a step that ``nasprune.load`` replays on a fresh model.
"""
from __future__ import annotations

import copy
import operator

import numpy as np
import torch
from torch import fx, nn

from nasprune.graph.tracer import preserved_state, record_shapes, symbolic_trace

_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}


def _is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _ADDS and len(node.args) >= 2 \
        and all(isinstance(a, fx.Node) for a in node.args[:2]) and not node.kwargs


def _shortcut(add: fx.Node, operand: fx.Node, modules: dict, handler_for):
    """The edge (source, user) where ``operand`` of ``add`` leaves a value another node also
    reads, walking back through single-input ops that make no channels; None when a layer that
    makes channels, or an op with several inputs, comes first."""
    user, value = add, operand
    while True:
        if len(value.users) > 1 or value.op == "placeholder":
            return value, user
        if value.op == "call_module":
            handler = handler_for(modules[value.target])
            if handler is None or handler.counts:
                return None
        elif value.op not in ("call_function", "call_method"):
            return None
        inputs = value.all_input_nodes
        if len(inputs) != 1:
            return None
        user, value = value, inputs[0]


def _shortcuts(gm: fx.GraphModule, infos: dict, handler_for) -> list:
    """(source, user, channels) of every shortcut edge of the graph, in graph order."""
    modules = dict(gm.named_modules())
    found, seen = [], set()
    for node in gm.graph.nodes:
        if not _is_add(node):
            continue
        for operand in node.args[:2]:
            shape = getattr(infos.get(operand), "shape", None)
            if shape is None or len(shape) not in (2, 4):
                continue
            edge = _shortcut(node, operand, modules, handler_for)
            if edge is not None and (edge[0].name, edge[1].name) not in seen:
                seen.add((edge[0].name, edge[1].name))
                found.append((edge[0], edge[1], int(infos[edge[0]].shape[1])))
    return found


class Untied(nn.Module):
    """A model with a ChannelSelect on every residual shortcut (:func:`untie`): ``model`` holds
    the original layers, ``selects`` the selections, and the forward runs the traced graph of
    the mode (train or eval) it is in."""

    def __init__(self, model: nn.Module, graphs: dict, selects: nn.ModuleDict, constants: dict,
                 constructor=None):
        super().__init__()
        self.model = model
        self.selects = selects
        for name, value in constants.items():
            self.register_buffer(name, value)
        self._graphs = graphs            # mode -> fx.Graph whose targets resolve on this module
        if constructor is not None:      # what nasprune.save records to rebuild the base alone
            self.nasprune_constructor = lambda: constructor
        self._code = {}
        # fx traces a forward by its signature: one of the graph's own arguments, not *inputs
        names = [n.name for n in next(iter(graphs.values())).nodes if n.op == "placeholder"]
        scope = {}
        exec(f"def forward(self, {', '.join(names)}):\n    return self._run(({', '.join(names)},))\n", scope)  # noqa: S102
        self.__class__ = type("Untied", (Untied,), {"forward": scope["forward"], "__module__": __name__})

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = {} if key == "_code" else copy.deepcopy(value, memo)
        return new

    def _forward_fn(self, mode: str):
        fn = self._code.get(mode)
        if fn is None:
            code = self._graphs[mode].python_code("self")
            scope = dict(code.globals)
            exec(compile(code.src, f"<nasprune untied {mode}>", "exec"), scope)  # noqa: S102
            fn = self._code[mode] = scope["forward"]
        return fn

    def _run(self, inputs: tuple):
        mode = "train" if self.training or "eval" not in self._graphs else "eval"
        return self._forward_fn(mode)(self, *inputs)

    def select_users(self) -> dict[str, list[str]]:
        """Name of each selection (under ``selects``) -> the modules of the model it feeds
        (named as in ``model``; empty where it feeds a function, e.g. the add itself)."""
        users = {name: [] for name in self.selects}
        for graph in self._graphs.values():
            for node in graph.nodes:
                if node.op == "call_module" and node.target.startswith("selects."):
                    name = node.target[len("selects."):]
                    for user in node.users:
                        if user.op == "call_module" and user.target.startswith("model.") and \
                                user.target[len("model."):] not in users[name]:
                            users[name].append(user.target[len("model."):])
        return users

    def extra_repr(self) -> str:
        return f"{len(self.selects)} untied shortcuts"


def untie(model: nn.Module, example_inputs, *, leaf_modules=()) -> Untied:
    """A copy of ``model`` with every residual shortcut through a ChannelSelect (module doc).

    example_inputs: a tensor or tuple of tensors for ``model(*example_inputs)`` (batch 1 or 2).
    leaf_modules: modules fx should not trace into. Raises ValueError when the model has no
    shortcut to untie. ``model`` is not modified; the copy is in ``model``'s train/eval mode.
    """
    from nasprune.handlers import handler_for
    from nasprune.nn.select import ChannelSelect

    if not isinstance(model, nn.Module):
        raise TypeError(f"untie expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, Untied):
        raise ValueError("untie: the model is untied already")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    name_of = {id(m): n for n, m in model.named_modules()}
    leaf_names = []
    for leaf in leaf_modules:
        name = leaf if isinstance(leaf, str) else name_of.get(id(leaf))
        if name is None or name not in dict(model.named_modules()):
            raise ValueError(f"untie: leaf module {leaf!r} is not a module of {type(model).__name__}")
        leaf_names.append(name)
    body = copy.deepcopy(model)
    by_name = dict(body.named_modules())
    leaves = [by_name[n] for n in leaf_names]
    graphs, traced = {}, {}
    with preserved_state(body):
        for mode in ("train", "eval"):
            body.train(mode == "train")
            gm, auto = symbolic_trace(body, leaves, handler_for)
            leaves = leaves + [by_name[n] for n in auto if by_name[n] not in leaves]
            traced[mode] = gm
        body.eval()
        infos = {mode: record_shapes(gm, inputs, handler_for)[0] for mode, gm in traced.items()}
    if traced["train"].graph.python_code("self").src == traced["eval"].graph.python_code("self").src:
        del traced["eval"]

    selects, constants = nn.ModuleDict(), {}
    for mode, gm in traced.items():
        graph = copy.deepcopy(gm.graph)
        names = {n.name: n for n in graph.nodes}
        for source, user, channels in _shortcuts(gm, infos[mode], handler_for):
            key = f"{source.name}__{user.name}"
            if key not in selects:
                selects[key] = ChannelSelect(channels)
            src, dst = names[source.name], names[user.name]
            with graph.inserting_before(dst):
                select = graph.call_module(f"selects.{key}", (src,))
            dst.replace_input_with(src, select)
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr") and not node.target.startswith("selects."):
                if node.op == "get_attr" and "." not in node.target and not hasattr(body, node.target):
                    name = f"const_{node.target}"           # a literal tensor fx kept on the traced module
                    constants.setdefault(name, getattr(gm, node.target))
                    node.target = name
                else:
                    node.target = f"model.{node.target}"
        graph.lint()
        graphs[mode] = graph
    if not len(selects):
        raise ValueError(f"untie: {type(model).__name__} has no residual shortcut to untie (no add of a value "
                         f"that something else also reads)")
    constructor = None
    if callable(getattr(model, "nasprune_constructor", None)):
        try:
            constructor = model.nasprune_constructor()
        except Exception:  # noqa: BLE001 - a model that cannot say how it was built records none
            constructor = None
    out = Untied(body, graphs, selects, constants, constructor).train(model.training)
    out.nasprune_slim = {"base_class": f"{type(model).__module__}.{type(model).__qualname__}",
                         "steps": [{"untie": True,
                                    "inputs": [[list(x.shape), str(x.dtype).replace("torch.", "")] for x in inputs],
                                    "leaf_modules": leaf_names}]}
    return out


def tied_keep(untied_graph, graph, keep) -> dict:
    """The keep set of the model's own channel ``graph`` that holds every channel the keep set
    ``keep`` of its untied copy's ``untied_graph`` holds: each group of the model keeps the union
    of what the untied groups it was cut into keep (a stream channel stays if any block keeps
    it). ``slim.apply(model, graph, tied_keep(...))`` is the model's own class at the fewest
    channels that hold the untied keep's; the difference in MACs is what untying saves."""
    from nasprune.handlers.keep import normalise, removed_classes
    removed = removed_classes(untied_graph, normalise(untied_graph, keep))
    kept = [np.zeros(g.size, dtype=bool) for g in graph.groups]
    for name, (_, roles) in graph.records.items():
        record = untied_graph.records.get(f"model.{name}")
        if record is None:
            continue
        for role, classes in roles.items():
            untied_classes = record[1].get(role)
            if untied_classes is None or len(untied_classes) != len(classes):
                continue
            here = ~removed[untied_classes]
            groups, channels = graph.class_group[classes], graph.class_channel[classes]
            for gi in np.unique(groups[(groups >= 0) & here]).tolist():
                sel = (groups == gi) & here
                kept[gi][channels[sel]] = True
    return {gi: torch.from_numpy(np.nonzero(k)[0]) for gi, k in enumerate(kept)
            if graph.groups[gi].prunable and not k.all()}
