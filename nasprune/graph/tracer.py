"""torch.fx tracing with automatic leaves, and shape recording on example inputs.

Submodules fx cannot trace (data-dependent control flow, unsupported Python) become leaves:
the failing module is found from the tracer's module stack, marked, and tracing restarts.
The caller learns which modules were made leaves and why.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from nasprune.handlers.fields import TensorInfo


class TraceError(RuntimeError):
    """The model (or a part of it that cannot be a leaf) cannot be traced."""


class _Tracer(fx.Tracer):
    def __init__(self, forced_leaves: set[int], handler_for):
        super().__init__()
        self._forced = forced_leaves
        self._handler_for = handler_for
        self.stack: list[str] = []
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._forced or self._handler_for(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = name  # the innermost module whose forward raised
            raise
        finally:
            self.stack.pop()


def symbolic_trace(model: nn.Module, leaf_modules=(), handler_for=lambda m: None):
    """Trace ``model``; returns (GraphModule, {auto-leaf name: error})."""
    modules = dict(model.named_modules())
    forced = {id(m) for m in leaf_modules}
    auto: dict[str, str] = {}
    for _ in range(len(modules) + 1):
        tracer = _Tracer(forced, handler_for)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported or retried
            name = tracer.failed_at
            if not name or id(modules[name]) in forced:
                raise TraceError(
                    f"cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. The failure "
                    f"is in the top-level forward, so it cannot be made a leaf; pass a traceable "
                    f"model or wrap the untraceable part in a submodule.") from exc
            forced.add(id(modules[name]))
            auto[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        return fx.GraphModule(tracer.root, graph, type(model).__name__), auto
    raise TraceError(f"cannot trace {type(model).__name__}")  # pragma: no cover


def summarise(value):
    """What the analysis keeps of a runtime value: shapes for tensors, the value otherwise."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return TensorInfo(tuple(v.shape), v.dtype)
        if isinstance(v, torch.Size):
            return tuple(v)
        return v
    return tree_map(one, value)


class _Recorder(fx.Interpreter):
    def __init__(self, gm, handler_for=None):
        super().__init__(gm)
        self.infos: dict[fx.Node, object] = {}
        self._handler_for = handler_for

    def call_module(self, target, args, kwargs):
        # Only shapes matter here: a layer known to keep its input's shape (normalisation,
        # activation) need not run; on meta tensors BatchNorm alone would dominate the time.
        if self._handler_for is not None and args and isinstance(args[0], torch.Tensor):
            handler = self._handler_for(self.fetch_attr(target))
            if handler is not None and handler.keeps_shape:
                return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n):
        result = super().run_node(n)
        self.infos[n] = summarise(result)
        return result


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Run code on ``model`` without leaving a trace: modes, buffers and the RNG come back."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


@contextlib.contextmanager
def on_meta(model: nn.Module):
    """Temporarily swap every parameter and buffer of ``model`` for a data-less meta tensor."""
    saved, twins = [], {}

    def twin(t):
        if id(t) not in twins:
            meta = torch.empty_like(t, device="meta")
            twins[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
        return twins[id(t)]

    try:
        for m in model.modules():
            saved.append((m, dict(m._parameters), dict(m._buffers)))
            for k, t in m._parameters.items():
                if t is not None:
                    m._parameters[k] = twin(t)
            for k, t in m._buffers.items():
                if t is not None:
                    m._buffers[k] = twin(t)
        yield
    finally:
        for m, params, buffers in saved:
            m._parameters.update(params)
            m._buffers.update(buffers)


def run_shapes_only(model: nn.Module, fn, inputs: tuple):
    """``fn(*inputs)`` where only shapes matter: first on meta tensors (nothing computed),
    then on fake tensors, and computed for real only if an op needs data."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    try:
        with torch.no_grad(), on_meta(model):
            return fn(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs])
    except Exception:  # noqa: BLE001 - an op without meta support, or a tensor kept outside buffers
        pass
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            return fn(*[mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs])
    except Exception:  # noqa: BLE001 - a data-dependent op: compute for real instead
        with torch.no_grad():
            return fn(*inputs)


def record_shapes(gm: fx.GraphModule, example_inputs: tuple, handler_for=None):
    """Shapes (and non-tensor values such as sizes) of every node of ``gm``."""
    def run(*inputs):
        recorder = _Recorder(gm, handler_for)
        out = recorder.run(*inputs)
        return recorder.infos, summarise(out)
    return run_shapes_only(gm, run, example_inputs)
