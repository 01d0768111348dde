"""Capture: turn a model and example inputs into an fx graph whose every node knows the ATen ops it ran.

Four ways; "auto" tries them in this order until one works (the report says which one did):

1. ``symbolic_trace`` - module-level nodes (``call_module`` Linear, ``call_function`` relu), the ones users
   recognise. Each node is then run once on the meta device under an `OpRecorder`.
2. ``dispatch`` - run the forward on meta tensors and record every ATen op as a node of a new graph. Handles shape
   asserts, Python control flow on shapes and HuggingFace models, which symbolic tracing cannot.
3. ``export`` - ``torch.export.export(strict=False)``: ATen-level nodes whose shapes come with the graph, a graph
   that runs on the model's weights (``method="runnable"`` tries it before dispatch: profile needs that).
4. ``dispatch_real`` - only for a forward that branches on tensor values (``if y.mean() > 0``), which no meta run
   can follow: the forward runs once on a copy of the model, on the real inputs.

The user's model is never run and never touched: everything happens on a *shadow* - a copy whose parameters
and buffers are meta tensors (no memory, no data), with no hooks. So a 405B-parameter model is analysed
without allocating a byte of weights. Inputs are copied too (a cache object the forward fills is our copy),
the user's global module hooks are silenced, and whatever a traced forward assigns to its modules is undone.

Twins: a model of 126 identical layers does the same work 126 times. While tracing, a module whose type,
parameter shapes, attributes and call arguments match one already traced is not traced again: its subgraph is
copied with the module path rewritten. While propagating shapes, a copied subgraph whose inputs have the same
shapes and dtypes as its original's takes the original's op records instead of being run. The dispatch way does
the same for submodule calls (also for a call that reads and updates its own layer's part of a cache object it is
passed, as HuggingFace attention does: its copy reads and updates the twin's part, checked to be alike first), and
folds the steps of a loop (a recurrent scan over 2,048 tokens) into the nodes of the step they repeat, which count
their calls. The graph still has every node (and every call); only the work
of finding out what each one does is shared.

    >>> import torch, torch.nn as nn
    >>> cap = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.randn(2, 4))
    >>> cap.method, [str(r.op) for r in cap.nodes[1].records]
    ('symbolic_trace', ['aten.t.default', 'aten.addmm.default'])
"""
from __future__ import annotations

import copy
import functools
import gc
import inspect
import linecache
import os
import re
import time
import traceback
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import psutil
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.immutable_collections import immutable_list
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakTensorKeyDictionary

from . import masks
from .text import one_line
from .records import OpRecord, OpRecorder, TensorMeta

METHODS = ("symbolic_trace", "export", "dispatch", "dispatch_real")
#: The orders "auto" and "runnable" try the methods in. Analysis wants the fastest faithful record, and a dispatch
#: run with twin reuse is 5-20x faster than export on HuggingFace models; profile and rewrites want a graph that
#: runs on the model's weights, which only symbolic_trace and export give.
ORDERS = {"auto": ("symbolic_trace", "dispatch", "export", "dispatch_real"),
          "runnable": ("symbolic_trace", "export", "dispatch", "dispatch_real")}


class CaptureError(RuntimeError):
    """No capture method could turn the model into a graph; the message says why for each."""


class NodeError(RuntimeError):
    """Running one graph node on meta tensors failed; the message names the node, its op and source line."""


@dataclass(frozen=True)
class InputShape:
    """An example input given by shape and dtype only: ``InputShape((1, 2048), torch.long)``.

    Analysis runs on meta tensors anyway, so this is all a model input has to say.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    def to_meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


@dataclass
class CapturedNode:
    """One fx node and what it ran: its module path, its ATen op records and its output's metadata."""

    node: fx.Node
    module_path: str
    module_type: str
    records: tuple[OpRecord, ...]
    output: TensorMeta | None
    twin_of: str | None = None  # name of the node whose records this one reused
    repeats: int = 1            # calls of this node: a loop step folded into it counts here


@dataclass
class Capture:
    """The captured graph, one `CapturedNode` per fx node, and how it was obtained."""

    graph: fx.Graph
    root: nn.Module  # the meta shadow of the user's model: the graph's get_attr/call_module targets live here
    method: str
    nodes: list[CapturedNode]
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (method, why it failed) before `method` worked
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)   # what the report must say about how this was captured
    exported: Any = None   # the torch.export.ExportedProgram when method == "export" (its graph signature maps
                           # the lifted parameter/buffer inputs to their names in the model)
    _gm: fx.GraphModule | None = None

    @property
    def graph_module(self) -> fx.GraphModule:
        """The graph as a GraphModule over the meta shadow (built on first use: code generation is not free)."""
        if self._gm is None:
            self._gm = fx.GraphModule(self.root, self.graph)
        return self._gm

    @property
    def reused(self) -> int:
        """How many nodes took their records from a twin instead of being run."""
        return sum(1 for n in self.nodes if n.twin_of is not None)


def capture(model: nn.Module, *args: Any, method: str = "auto", dtype: torch.dtype | None = None,
            leaf_untraceable: bool = False, stand_ins: dict[str, Callable[[nn.Module], Callable]] | None = None,
            **kwargs: Any) -> Capture:
    """Capture `model` called as ``model(*args, **kwargs)`` into a graph with per-node ATen op records.

    Args:
        model: any nn.Module, on any device (meta included); it is not run, moved or modified.
        args, kwargs: example inputs: tensors (only their shape/dtype/strides matter, except where the forward
            branches on their values), `InputShape`s, or any other values the forward takes (passed through as
            constants; objects holding tensors, such as a HuggingFace cache, are copied first).
        method: "auto" tries symbolic_trace, then dispatch, then export (and, when the forward branches on tensor
            values and real inputs are given, dispatch_real); "runnable" tries export before dispatch, for callers
            that run the graph on the model's weights; or name one of `METHODS`.
        dtype: analyse as if parameters, buffers and floating inputs were in this dtype.
        leaf_untraceable: for `shapeprof.optimize`, which wants the traceable rest: symbolic_trace calls a submodule
            whose forward it cannot trace as one node instead of failing (the notes name them), and gives tensors
            their concrete dtypes, so that a branch on a dtype traces the branch the inputs take (the drop-in's guard
            then checks the inputs' dtypes).
        stand_ins: module path -> a maker of the forward that module runs on the meta shadow, and is kept whole
            as one node (`shapeprof.expert_loop`: a loop over experts meta cannot run). The model is untouched.

    Returns:
        A `Capture`; `capture.method` says which way worked, `capture.attempts` why the earlier ones did not.
    """
    if method not in ORDERS and method not in METHODS:
        raise ValueError(f"unknown capture method {method!r}; choose one of: "
                         f"{', '.join((*ORDERS, *METHODS))}")
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    start = time.perf_counter()
    attempts: list[tuple[str, str]] = []
    branch_site = ""   # the user's line that branches on a tensor value, when the meta run stopped there
    # a forward that draws random numbers on a real device (torch.rand(x.shape) makes a CPU tensor even on meta
    # inputs) must not move the caller's RNG: what they draw next is what they would have drawn
    held = list(_tensors_of(model))   # walked once, for both (a HuggingFace model holds ~100 attributes a module)
    devices = sorted({t.device.index or 0 for t in held if t.device.type == "cuda"})
    with collector_paused(), _user_global_hooks_silenced(), torch.random.fork_rng(devices=devices):
        shadow = meta_shadow(model, dtype, held)
        for path, make in (stand_ins or {}).items():
            block = shadow.get_submodule(path)
            block.forward = make(block)   # an instance attribute: nn.Module.__call__ runs it
        meta_args, meta_kwargs = meta_inputs((args, kwargs), dtype)
        for name in ORDERS.get(method, (method,)):
            if name == "dispatch_real" and method in ORDERS and not branch_site:
                continue   # only worth a real run (a copy of the model) when the forward needs values
            try:
                kept_whole: list[str] = []
                if name == "dispatch_real":
                    graph, nodes, exported = _capture_dispatch_real(model, args, kwargs, dtype)
                elif name == "symbolic_trace":
                    graph, nodes, exported = _capture_symbolic(shadow, meta_args, meta_kwargs, leaf_untraceable,
                                                               kept_whole, frozenset(stand_ins or ()))
                else:
                    graph, nodes, exported = _CAPTURERS[name](shadow, meta_args, meta_kwargs)
            except Exception as e:  # each way fails in its own way; keep why and try the next
                if name == "dispatch":
                    branch_site = _value_branch_site(e)
                if method not in ORDERS:
                    raise CaptureError(f"{name} failed for {type(model).__name__}: {one_line(e)}") from e
                attempts.append((name, one_line(e)))
                continue
            root = exported.graph_module if exported is not None else shadow
            notes = masks.annotate(nodes, _leaf_values(name, graph, model, shadow, exported, args, kwargs))
            if kept_whole:
                notes.append(f"called whole, their forward not traceable: {', '.join(kept_whole)}")
            if name == "dispatch_real":
                notes.insert(0, f"the forward branches on tensor values at {branch_site}: it was run once on a "
                                f"copy with the example inputs' real values; the report is the path they take")
            return Capture(graph, root, name, nodes, attempts, time.perf_counter() - start, exported=exported,
                           notes=notes)
    if branch_site:
        raise CaptureError(f"could not capture {type(model).__name__}: its forward branches on a tensor's value "
                           f"at {branch_site}, which the meta tensors it was analysed on do not have; pass real "
                           f"example inputs (and real weights) and it is run once on a copy")
    reasons = "; ".join(f"{m}: {why}" for m, why in attempts)
    raise CaptureError(f"could not capture {type(model).__name__} - {reasons}")


def _leaf_values(method: str, graph: fx.Graph, model: nn.Module, shadow: nn.Module, exported: Any,
                 args: tuple, kwargs: dict) -> Callable[[fx.Node], Any]:
    """What each placeholder and get_attr of the captured graph holds in the user's world: the real input or
    buffer where the user gave one, a meta tensor (shape only) for parameters and inputs given by shape."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if method == "symbolic_trace":
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        by_node = dict(zip(placeholders, bound.arguments.values()))
    elif method == "export":
        from torch.export.graph_signature import InputKind
        users = iter(flat_user_inputs(exported, args, kwargs))
        by_node = {}
        for node, spec in zip(placeholders, exported.graph_signature.input_specs):
            if spec.kind == InputKind.USER_INPUT:
                by_node[node] = next(users, None)
            elif spec.kind in (InputKind.BUFFER, InputKind.PARAMETER):
                by_node[node] = _user_tensor(model, spec.target)
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                by_node[node] = exported.constants.get(spec.target)
    else:   # dispatch: placeholder input_i is the i-th leaf of the flattened inputs
        leaves = pytree.tree_leaves((args, kwargs))
        by_node = {n: leaves[int(n.target.rsplit("_", 1)[1])] for n in placeholders}

    def value(node: fx.Node) -> Any:
        if node.op == "get_attr":
            found = _user_tensor(model, node.target)
            return found if found is not None else _user_tensor(shadow, node.target)  # tracer constants
        v = by_node.get(node)
        return v.to_meta() if isinstance(v, InputShape) else v
    return value


def _user_tensor(root: nn.Module, target: str) -> torch.Tensor | None:
    """The tensor at `target`; a parameter only by shape (its values never shape a mask, and are not copied)."""
    try:
        t = _fetch_attr(root, target)
    except AttributeError:
        return None
    if not isinstance(t, torch.Tensor):
        return None
    return _meta_like(t, None) if isinstance(t, nn.Parameter) else t


def flat_user_inputs(program: Any, args: tuple, kwargs: dict, strict: bool = False) -> list[Any]:
    """The inputs flattened as an exported program takes them (keyword arguments in the order export saw).

    Raises:
        ValueError: with `strict`, the inputs do not have the structure the program was exported with.
    """
    in_spec = program.call_spec.in_spec
    try:
        kw_spec = in_spec.child(1) if hasattr(in_spec, "child") else in_spec.children_specs[1]
        keys = list(kw_spec.context)
        if set(keys) == set(kwargs):
            kwargs = {k: kwargs[k] for k in keys}
    except (AttributeError, IndexError, TypeError):
        pass
    flat, spec = pytree.tree_flatten((args, kwargs))
    if strict and spec != in_spec:
        raise ValueError("the inputs do not have the structure the model was exported with")
    return flat


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector is off inside (a capture, an analysis), and back as it was afterwards.

    A capture makes a few hundred thousand small objects (fx nodes, records, the shadow's modules) and frees
    almost none of them until it ends; each full collection meanwhile walks every object of the process (a million
    and more with a 405B model, its shadow and transformers imported): measured at 30-40% of a HuggingFace
    Llama-405B analysis on meta. Nothing made inside needs a collection to be freed before it ends. Also a
    decorator (``@collector_paused()``), as any contextmanager is.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _user_global_hooks_silenced() -> Iterator[None]:
    """The user's global module hooks (`register_module_forward_hook` ...) stay out of capture.

    They would fire on our meta shadow's calls and see meta tensors (or record them in the user's state). The
    dicts torch keeps them in are emptied for the capture and refilled, in their order, afterwards.
    """
    saved = [(d, dict(d)) for d in _global_hook_dicts() if d]
    for d, _ in saved:
        d.clear()
    try:
        yield
    finally:
        for d, hooks in saved:
            d.clear()
            d.update(hooks)


def _global_hook_dicts() -> list[dict]:
    from torch.nn.modules import module as module_module
    return [v for k, v in vars(module_module).items() if k.startswith("_global_") and "hooks" in k
            and isinstance(v, dict)]


# ---------------------------------------------------------------------------------------------- the shadow

def meta_shadow(model: nn.Module, dtype: torch.dtype | None = None,
                tensors: list[torch.Tensor] | None = None) -> nn.Module:
    """A copy of `model` whose tensors are meta tensors (cast to `dtype` if floating), with no hooks.

    Parameters, buffers and plain tensor attributes (``self.table = torch.randn(...)``, in lists and dicts too)
    all become meta: the copy allocates no tensor memory. It shares nothing mutable with the model: running it
    cannot change the model, its state_dict or anything its hooks point to. Tied parameters stay tied.
    `tensors`: what `_tensors_of(model)` gives, when the caller has it already.
    """
    memo: dict[int, Any] = {}
    for t in _tensors_of(model) if tensors is None else tensors:
        if id(t) not in memo:
            memo[id(t)] = _meta_like(t, dtype)
    for m in model.modules():
        for name, value in vars(m).items():
            if name.startswith("_") and "hooks" in name and isinstance(value, dict):
                # hooks are the user's: running them could record our meta tensors in user state. The empty ones
                # (a dozen a module) are given what deepcopy would make of them, without its generic
                # reduce-and-rebuild path: that was 2/3 of copying a HuggingFace model
                if value:
                    memo[id(value)] = OrderedDict()
                elif type(value) in (dict, OrderedDict):
                    memo[id(value)] = type(value)()
            elif name == "_non_persistent_buffers_set" and type(value) is set and \
                    all(type(b) is str for b in value):
                memo[id(value)] = set(value)   # a set of str: what deepcopy makes of it
    shadow = copy.deepcopy(model, memo)
    return shadow


def _tensors_of(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor the model holds (a tensor held twice may come twice)."""
    # HuggingFace puts the config on most modules (~100 attributes each): walked once, not once per module
    seen: dict[int, int] = {}
    for m in model.modules():
        yield from (p for p in m._parameters.values() if p is not None)
        yield from (b for b in m._buffers.values() if b is not None)
        for name, value in vars(m).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                yield from tensors_inside(value, seen=seen)


def tensors_inside(value: Any, depth: int = 0, seen: dict[int, int] | None = None) -> Iterator[torch.Tensor]:
    """Tensors held by a value: itself, inside lists, tuples, dicts and plain objects' attributes (bounded).

    With `seen` (id -> depth it was walked at), a container or object already walked at this depth or above is
    not walked again (what it holds was found then): for walks over many values that share one."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 6 or isinstance(value, (nn.Module, type, str, bytes, int, float, bool)) or value is None:
        return
    elif seen is not None and seen.get(id(value), 7) <= depth:
        return
    else:
        if seen is not None:
            seen[id(value)] = depth
        if isinstance(value, (list, tuple, set, frozenset)):
            for v in value:
                yield from tensors_inside(v, depth + 1, seen)
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors_inside(v, depth + 1, seen)
        elif hasattr(value, "__dict__") and not callable(value):
            for v in vars(value).values():
                yield from tensors_inside(v, depth + 1, seen)


def _hook_dicts(m: nn.Module) -> Iterator[dict]:
    for name, value in vars(m).items():
        if name.startswith("_") and "hooks" in name and isinstance(value, dict) and value:
            yield value


def _meta_like(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    to = dtype if dtype is not None and t.is_floating_point() else t.dtype
    meta = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=to, device="meta")
    if isinstance(t, nn.Parameter):
        return nn.Parameter(meta, requires_grad=t.requires_grad and meta.is_floating_point())
    return meta


def meta_inputs(tree: Any, dtype: torch.dtype | None) -> Any:
    """A copy of the inputs in which every tensor is a meta tensor (an `InputShape` becomes one too).

    Objects that hold tensors (a HuggingFace DynamicCache, a dataclass of tensors) are deep-copied with their
    tensors replaced, so that a forward which appends to a cache appends to our copy, never to the user's.
    """
    memo: dict[int, Any] = {}
    for leaf in _input_leaves(tree):
        if id(leaf) in memo:
            continue
        if isinstance(leaf, InputShape):
            memo[id(leaf)] = torch.empty(leaf.shape, device="meta", dtype=dtype if dtype is not None
                                         and leaf.dtype.is_floating_point else leaf.dtype)
        else:
            memo[id(leaf)] = _meta_like(leaf, dtype)
    return copy.deepcopy(tree, memo)


def _input_leaves(value: Any, depth: int = 0) -> Iterator[Any]:
    if isinstance(value, InputShape):
        yield value
    elif isinstance(value, (list, tuple, dict)) and depth <= 6:
        for v in (value.values() if isinstance(value, dict) else value):
            yield from _input_leaves(v, depth + 1)
    else:
        yield from tensors_inside(value, depth)


def unwrap(model: Any) -> Any:
    # torch.compile wraps the module in OptimizedModule; DataParallel/DDP in .module
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------------------------------------- symbolic_trace

@dataclass
class _Region:
    """The nodes one module call produced while tracing, so a twin call can copy them."""

    path: str
    depth: int                      # len(module_stack) before the module's own entry
    nodes: list[fx.Node]
    inputs: list[fx.Node]           # graph nodes the call's arguments carried, in argument order
    output: Any                     # the call's return value with Proxies replaced by their nodes


@dataclass
class _Replay:
    """A copy of a region made for a twin module call: `pairs` maps each original node to its copy."""

    source: _Region
    inputs: list[fx.Node]
    pairs: list[tuple[fx.Node, fx.Node]]


class _Unkeyable(Exception):
    pass


_PRIMITIVES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
               torch.memory_format)


_TRACE_META = "shapeprof.trace_meta"   # node.meta key: the node's meta value while it is traced (dtypes mode)


def _fx_patches_lifted():
    from torch.fx import _symbolic_trace
    lift = getattr(_symbolic_trace, "_maybe_revert_all_patches", None)
    if lift is None:
        raise RuntimeError("this torch cannot lift fx's patches")
    return lift()


class _DtypeProxy(fx.Proxy):
    """A Proxy whose ``.dtype`` is the concrete dtype its meta value has, so that a forward branching on a dtype
    (Whisper: ``if hidden_states.dtype == torch.float16: clamp``) traces the branch the inputs take. The graph is
    then specialised to its inputs' dtypes, which the drop-in's guard checks; shapes stay symbolic."""

    @property
    def dtype(self):
        value = self.node.meta.get(_TRACE_META)
        if isinstance(value, torch.Tensor):
            return value.dtype
        return self.tracer.create_proxy("call_function", getattr, (self, "dtype"), {})


class _TwinTracer(fx.Tracer):
    """fx.Tracer that traces each distinct module call once and copies the subgraph for its twins."""

    def __init__(self, leaves: frozenset[str] = frozenset(), dtypes: bool = False) -> None:
        super().__init__()
        self.dtypes = dtypes                  # give Proxies their concrete dtype (see _DtypeProxy)
        self.examples: dict[str, Any] = {}    # placeholder name -> the meta value the call gives it
        self.proxy_buffer_attributes = True   # `self.bias[:, :, :T, :T]` on a registered buffer
        self.regions: dict[Any, _Region | None] = {}
        self.replays: list[_Replay] = []
        self._module_keys: dict[int, Any] = {}
        self.leaves = leaves                  # module paths called whole, as one node (see capture's leaf_untraceable)
        self.failed_in: str | None = None     # the innermost submodule whose forward raised while traced

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves:
            return True
        # fx keeps every torch.nn module whole. For one op (Linear, LayerNorm) that is right; torch's composite
        # modules (TransformerEncoder, TransformerEncoderLayer, MultiheadAttention) would hide 24 layers or an
        # attention's projections in one node. Look inside any module that has children.
        if next(iter(m.children()), None) is not None:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        try:
            return self._call_inside(m, path, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = path
            raise

    # ------------------------------------------------------------------ concrete dtypes
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _DtypeProxy(node, self) if self.dtypes else super().proxy(node)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.dtypes and isinstance(proxy, fx.Proxy):
            proxy.node.meta[_TRACE_META] = self._meta_value(proxy.node)
        return proxy

    def _meta_value(self, node: fx.Node) -> Any:
        """The node's value on meta tensors, as it is traced (None if unknown)."""
        if node.op == "placeholder":
            return self.examples.get(node.target)
        if node.op == "get_attr":
            try:
                with _fx_patches_lifted():   # fx's patched Module.__getattr__ would make a proxy of it again
                    return _fetch_attr(self.root, node.target)
            except (AttributeError, RuntimeError):
                return None
        missing = []

        def value(n: fx.Node):
            v = n.meta.get(_TRACE_META)
            if v is None:
                missing.append(n)
            return v
        args, kwargs = map_arg(node.args, value), map_arg(node.kwargs, value)
        if missing:
            return None
        try:
            # fx patches nn.Module.__call__ (and some functions) while it traces: a leaf module run on meta here
            # would be traced again. The patches are lifted around the run (fx's own helper; without it, a leaf's
            # value stays unknown).
            with torch.no_grad(), _fx_patches_lifted():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self.root.get_submodule(node.target)(*args, **kwargs)
        except Exception:
            return None
        return None

    def _call_inside(self, m, path, forward, args, kwargs):
        try:
            key = (self._module_key(m), _arg_key(args), _arg_key(kwargs))
        except _Unkeyable:
            return super().call_module(m, forward, args, kwargs)
        region = self.regions.get(key, False)
        if region:
            return self._replay(region, path, args, kwargs)
        depth = len(self.module_stack)
        last = self.graph._root.prev
        out = super().call_module(m, forward, args, kwargs)
        if region is None:  # seen before and found not copyable
            return out
        nodes = []
        node = last.next
        while node is not self.graph._root:
            nodes.append(node)
            node = node.next
        inputs = _proxy_nodes((args, kwargs))
        self.regions[key] = _Region(path, depth, nodes, inputs, _to_nodes(out)) \
            if _self_contained(nodes, inputs) else None
        return out

    def _replay(self, region: _Region, path: str, args, kwargs):
        inputs = _proxy_nodes((args, kwargs))
        env: dict[fx.Node, fx.Node] = dict(zip(region.inputs, inputs))
        old, new = region.path + ".", path + "."
        outer = list(self.module_stack.items())
        pairs = []
        for n in region.nodes:
            target = n.target
            if n.op in ("get_attr", "call_module") and isinstance(target, str) and target.startswith(old):
                target = new + target[len(old):]
            copy_ = self.graph.create_node(n.op, target, map_arg(n.args, env.__getitem__),
                                           map_arg(n.kwargs, env.__getitem__), type_expr=n.type)
            stack = n.meta.get("nn_module_stack")
            if stack is not None:
                inner = list(stack.items())[region.depth:]
                copy_.meta["nn_module_stack"] = OrderedDict(
                    outer + [(_reprefix(k, region.path, path), (_reprefix(p, region.path, path), t))
                             for k, (p, t) in inner])
            if "stack_trace" in n.meta:
                copy_.meta["stack_trace"] = n.meta["stack_trace"]
            if _TRACE_META in n.meta:   # a twin computes what its original did (its dtypes, for _DtypeProxy)
                copy_.meta[_TRACE_META] = n.meta[_TRACE_META]
            env[n] = copy_
            pairs.append((n, copy_))
        self.replays.append(_Replay(region, inputs, pairs))
        return _from_nodes(region.output, lambda n: self.proxy(env.get(n, n)))

    def _module_key(self, m: nn.Module) -> Any:
        key = self._module_keys.get(id(m))
        if key is None:
            key = self._module_keys[id(m)] = _module_key(m, self._module_key)
        return key


_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set",
                     "_is_full_backward_hook", "_state_dict_pre_hooks", "_load_state_dict_post_hooks"}


def _module_key(m: nn.Module, child_key: Callable[[nn.Module], Any], positions: frozenset[int] = frozenset()
                ) -> Any:
    """What decides how `m` traces: its class, mode, parameter/buffer shapes, attributes, children.

    `positions` are the layer numbers in the module's path: an int attribute named like a layer index
    (``layer_idx``, which HuggingFace puts on every attention) that holds one of them is where the layer sits, not
    how it computes, and does not keep layers from being twins. (Attributes derived from it, such as Gemma's
    per-layer ``sliding_window``, are kept, and do.)
    """
    parts: list[Any] = [type(m), m.training, frozenset(getattr(m, "_non_persistent_buffers_set", ()))]
    for name, value in vars(m).items():
        if name in _MODULE_INTERNALS:
            continue
        if "hooks" in name and isinstance(value, dict):
            if value:
                raise _Unkeyable(name)  # a hook may do anything per instance
            continue
        if getattr(value, "_shapeprof_twin_forward", False):
            continue   # the dispatch capture's own wrapper of the shadow's forward
        if type(value) is int and value in positions and _INDEX_NAME.search(name):
            parts.append((name, "position"))
            continue
        parts.append((name, _value_key(value)))
    for group in (m._parameters, m._buffers):
        for name, t in group.items():
            parts.append((name, None if t is None else (tuple(t.shape), t.dtype, t.requires_grad,
                                                        type(t))))
    for name, child in m._modules.items():
        parts.append((name, None if child is None else child_key(child)))
    return tuple(parts)


_INDEX_NAME = re.compile(r"(^|_)(layer_?)?(idx|index|id|num|number)$")


def _value_key(v: Any) -> Any:
    """A module attribute by value when it is plain data (ints, tuples of ints, ...), else by identity."""
    try:
        return _arg_key(v)
    except _Unkeyable:
        return ("id", id(v))


def _arg_key(a: Any) -> Any:
    if isinstance(a, fx.Proxy):
        return "proxy"
    if isinstance(a, _PRIMITIVES):
        return (type(a), a)
    if isinstance(a, (tuple, list)):
        return (type(a), tuple(_arg_key(v) for v in a))
    if isinstance(a, dict):
        return (dict, tuple((k, _arg_key(v)) for k, v in a.items()))
    if isinstance(a, slice):
        return (slice, _arg_key((a.start, a.stop, a.step)))
    raise _Unkeyable(type(a))


def _proxy_nodes(tree: Any) -> list[fx.Node]:
    return [leaf.node for leaf in pytree.tree_leaves(tree) if isinstance(leaf, fx.Proxy)]


def _to_nodes(x: Any) -> Any:
    if isinstance(x, fx.Proxy):
        return x.node
    if isinstance(x, (tuple, list)) and type(x) in (tuple, list):
        return type(x)(_to_nodes(v) for v in x)
    if isinstance(x, dict) and type(x) is dict:
        return {k: _to_nodes(v) for k, v in x.items()}
    if isinstance(x, _PRIMITIVES):
        return x
    raise _Unkeyable(type(x))


def _from_nodes(x: Any, proxy: Callable[[fx.Node], Any]) -> Any:
    if isinstance(x, fx.Node):
        return proxy(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_from_nodes(v, proxy) for v in x)
    if isinstance(x, dict):
        return {k: _from_nodes(v, proxy) for k, v in x.items()}
    return x


def _self_contained(nodes: list[fx.Node], inputs: list[fx.Node]) -> bool:
    """A region can be copied only if it reads nothing from the graph but its call arguments."""
    inside = set(nodes) | set(inputs)
    return all(i in inside for n in nodes for i in n.all_input_nodes)


def _reprefix(s: str, old: str, new: str) -> str:
    if s == old or s.startswith(old + ".") or s.startswith(old + "@"):
        return new + s[len(old):]
    return s


def _capture_symbolic(shadow: nn.Module, args: tuple, kwargs: dict, leaf_untraceable: bool = False,
                      kept_whole: list | None = None, leaves: frozenset[str] = frozenset()):
    """symbolic_trace; with `leaf_untraceable`, a submodule whose forward cannot be traced (an HF attention's control
    flow on shapes) is called whole, as one node, and tracing tries again (bounded: each retry makes one more).
    The paths so kept go into `kept_whole`; `leaves` are called whole from the start."""
    given = leaves
    for _ in range(_MAX_LEAF_RETRIES if leaf_untraceable else 1):
        tracer = _TwinTracer(leaves, dtypes=leaf_untraceable)
        try:
            result = _trace_symbolic(shadow, args, kwargs, tracer)
            if kept_whole is not None:
                kept_whole.extend(sorted(leaves - given))
            return result
        except Exception:
            if not leaf_untraceable or not tracer.failed_in or tracer.failed_in in leaves:
                raise
            leaves = leaves | {tracer.failed_in}
    raise CaptureError(f"more than {_MAX_LEAF_RETRIES} submodules cannot be traced")


_MAX_LEAF_RETRIES = 64


def _trace_symbolic(shadow: nn.Module, args: tuple, kwargs: dict, tracer: "_TwinTracer"):
    forward = inspect.signature(shadow.forward)
    bound = forward.bind(*args, **kwargs)
    bound.apply_defaults()
    concrete, values = {}, []
    for name, param in forward.parameters.items():
        if param.kind == param.VAR_POSITIONAL:
            raise TypeError(f"forward takes *{name}; symbolic tracing needs named parameters")
        if param.kind == param.VAR_KEYWORD:
            extra = bound.arguments[name]
            if any(_has_tensor(v) or next(tensors_inside(v), None) is not None for v in extra.values()):
                raise TypeError(f"the call passes tensors {sorted(extra)} through **{name}; symbolic tracing needs "
                                f"named parameters")
            continue   # traced through a forward without it (_named_forward), with its constants baked in
        value = bound.arguments[name]
        if not _has_tensor(value) and next(tensors_inside(value), None) is None:
            concrete[name] = value   # a constant: trace the branch the user's call takes (an object holding
                                     # tensors, a cache, is an input: baked in, the graph would replay its contents)
        values.append(value)
    tracer.record_stack_traces = True
    varkw = next((bound.arguments[p.name] for p in forward.parameters.values() if p.kind == p.VAR_KEYWORD), {})
    tracer.examples = {name: value for name, value in bound.arguments.items() if name not in concrete}
    with _no_module_mutation(shadow), _named_forward(shadow, forward, varkw):
        graph = tracer.trace(shadow, concrete_args=concrete or None)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(values):
        raise TypeError(f"traced graph has {len(placeholders)} inputs, forward takes {len(values)}")
    nodes = _propagate(graph, shadow, dict(zip(placeholders, values)), tracer.replays)
    return graph, nodes, None


@contextmanager
def _named_forward(shadow: nn.Module, signature: inspect.Signature, extra: dict) -> Iterator[None]:
    """While tracing, the shadow's class's forward without its ``**kwargs`` (HuggingFace layers take them and pass
    them on, which fx cannot trace: its **kwargs is a Proxy), called with the constants the example call put there
    (`extra`: use_cache=True), which the graph is then specialised to. The shadow is ours; its class comes back."""
    if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        yield
        return
    named = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    defaults = {p.name: p.default for p in named if p.default is not p.empty}
    params = ", ".join(f"{p.name}=_defaults[{p.name!r}]" if p.name in defaults else
                       (f"*, {p.name}" if p.kind == p.KEYWORD_ONLY and i == _first_kwonly(named) else p.name)
                       for i, p in enumerate(named))
    call = ", ".join(p.name if p.kind != p.KEYWORD_ONLY else f"{p.name}={p.name}" for p in named)
    cls = type(shadow)
    namespace: dict[str, Any] = {}
    # generated, as fx generates its own code: fx reads a forward's parameters from its code object
    exec(f"def forward(self, {params}):\n    return _forward(self, {call}{', ' if call else ''}**_extra)",
         {"_forward": cls.forward, "_defaults": defaults, "_extra": dict(extra)}, namespace)
    shadow.__class__ = type(cls.__name__, (cls,), {"forward": namespace["forward"], "__module__": cls.__module__})
    try:
        yield
    finally:
        shadow.__class__ = cls


def _first_kwonly(params: list[inspect.Parameter]) -> int:
    return next((i for i, p in enumerate(params) if p.kind == p.KEYWORD_ONLY), -1)


def _has_tensor(x: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(x))


class _no_module_mutation:
    """Tracing calls forward with Proxies; a forward that stores them on a module (``self.step += 1`` on a buffer,
    ``self.k = torch.cat([self.k, k])``) would leave Proxies in the shadow's ``_buffers`` dicts, and running
    the graph on it later would trace again forever. Every module's attribute, parameter, buffer and child
    dicts are restored in place (the same dict objects) once tracing is done."""

    _DICTS = ("_parameters", "_buffers", "_modules")

    def __init__(self, m: nn.Module):
        self.m = m

    def __enter__(self):
        self.saved = [(m, dict(vars(m)), [dict(getattr(m, d)) for d in self._DICTS]) for m in self.m.modules()]

    def __exit__(self, *exc):
        # keep the tensor constants the tracer itself set on the root (`x + torch.tensor(...)` in forward
        # becomes get_attr `_tensor_constant0`): the graph reads them
        constants = {k: v for k, v in vars(self.m).items()
                     if k.startswith("_tensor_constant") and isinstance(v, torch.Tensor)}
        for m, attrs, dicts in self.saved:
            for name, saved in zip(self._DICTS, dicts):
                live = attrs[name]
                live.clear()
                live.update(saved)
            vars(m).clear()
            vars(m).update(attrs)
        vars(self.m).update({k: v for k, v in constants.items() if k not in vars(self.m)})


# ---------------------------------------------------------------------------------------------- propagation

def _propagate(graph: fx.Graph, root: nn.Module, inputs: dict[fx.Node, Any],
               replays: list[_Replay]) -> list[CapturedNode]:
    """Run every node once on meta tensors under an OpRecorder; copies of twins reuse their original's records."""
    by_first = {r.pairs[0][1]: r for r in replays if r.pairs}
    source_inputs: dict[int, Any] = {}   # id(region) -> signature of its inputs when it ran
    sources: dict[fx.Node, list[_Region]] = {}   # nested regions share their first node
    for r in replays:
        if r.source.nodes and all(s is not r.source for s in sources.get(r.source.nodes[0], [])):
            sources.setdefault(r.source.nodes[0], []).append(r.source)
    env: dict[fx.Node, Any] = {}
    records: dict[fx.Node, tuple[OpRecord, ...]] = {}
    outputs: dict[fx.Node, TensorMeta | None] = {}
    twins: dict[fx.Node, str] = {}
    attrs: dict[str, Any] = {}
    recorder = OpRecorder(meta=True)
    skip_until: fx.Node | None = None
    with torch.no_grad(), recorder:
        for node in graph.nodes:
            if skip_until is not None:
                if node is skip_until:
                    skip_until = None
                continue
            for region in sources.get(node, ()):
                source_inputs[id(region)] = _signature([env[i] for i in region.inputs])
            replay = by_first.get(node)
            if replay is not None and source_inputs.get(id(replay.source)) == \
                    _signature([env[i] for i in replay.inputs]):
                _copy_twin(replay, env, records, outputs, twins)
                skip_until = replay.pairs[-1][1]
                if node is skip_until:
                    skip_until = None
                continue
            sink: list[OpRecord] = []
            recorder.into(sink)
            try:
                value = _run_node(node, env, root, attrs, inputs)
            except Exception as e:
                raise NodeError(f"{describe_node(node)}: {one_line(e)}") from e
            env[node] = value
            records[node] = tuple(sink)
            outputs[node] = _first_meta(value)
    return _captured_nodes(graph, root, records, outputs, twins)


def _copy_twin(replay: _Replay, env, records, outputs, twins) -> None:
    inside = {new for _, new in replay.pairs}
    for old, new in replay.pairs:
        records[new] = records[old]
        outputs[new] = outputs[old]
        twins[new] = old.name
        if any(u not in inside for u in new.users):
            env[new] = pytree.tree_map(_fresh_meta, env[old])


def _fresh_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=v.device)
    return v


def _signature(values: list[Any]) -> Any:
    def sig(v):
        if isinstance(v, torch.Tensor):
            return (tuple(v.shape), tuple(v.stride()), v.dtype, v.device.type)
        if isinstance(v, (tuple, list)):
            return (type(v), tuple(sig(x) for x in v))
        if isinstance(v, dict):
            return (dict, tuple((k, sig(x)) for k, x in v.items()))
        if isinstance(v, _PRIMITIVES):
            return (type(v), v)
        return ("id", id(v))
    return tuple(sig(v) for v in values)


def _run_node(node: fx.Node, env: dict, root: nn.Module, attrs: dict, inputs: dict) -> Any:
    op = node.op
    if op == "placeholder":
        return inputs[node]
    if op == "get_attr":
        value = attrs.get(node.target)
        if value is None:
            value = _fetch_attr(root, node.target)
            if isinstance(value, torch.Tensor) and not value.is_meta:   # a tensor constant the tracer made
                value = _meta_like(value, None)
            attrs[node.target] = value
        return value
    if op == "output":
        return None
    args = map_arg(node.args, env.__getitem__)
    kwargs = map_arg(node.kwargs, env.__getitem__)
    if op == "call_function":
        return node.target(*args, **kwargs)
    if op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    if op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    raise NotImplementedError(f"node op {op!r}")


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _first_meta(value: Any) -> TensorMeta | None:
    for leaf in pytree.tree_leaves(value) if not isinstance(value, torch.Tensor) else (value,):
        if isinstance(leaf, torch.Tensor):
            return TensorMeta.of(leaf)
    return None


def source_location(node: fx.Node) -> str:
    """'path/to/model.py:42': the last frame of the node's stack trace outside torch and shapeprof ('' if unknown)."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    user = [(path, line) for path, line in frames if not path.startswith(_LIBRARY_DIRS)]
    return f"{user[-1][0]}:{user[-1][1]}" if user else ""


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def target_name(node: fx.Node) -> str:
    """What a node calls, short: 'layers.0.attention.wq', 'addmm' (an ATen op), 'relu', 'view'."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket).removeprefix("aten.")
    return getattr(target, "__name__", str(target))


def describe_node(node: fx.Node, name: str | None = None) -> str:
    """"node 'wq' (call_module layers.0.attention.wq) at model.py:42": how errors name a node."""
    where = source_location(node)
    return f"node '{name or node.name}' ({node.op} {target_name(node)})" + (f" at {where}" if where else "")


def _captured_nodes(graph, root, records, outputs, twins) -> list[CapturedNode]:
    types: dict[str, str] = {}
    result = []
    for node in graph.nodes:
        path, type_name = _module_of(node, root, types)
        result.append(CapturedNode(node, path, type_name, records.get(node, ()), outputs.get(node),
                                   twins.get(node)))
    return result


def _module_of(node: fx.Node, root: nn.Module, types: dict[str, str]) -> tuple[str, str]:
    if node.op == "call_module":
        path = node.target
    else:
        stack = node.meta.get("nn_module_stack")
        path = next(reversed(stack.values()))[0] if stack else ""
    if path not in types:
        try:
            types[path] = type(root.get_submodule(path)).__name__
        except AttributeError:
            stack = node.meta.get("nn_module_stack")
            t = next(reversed(stack.values()))[1] if stack else type(root)
            types[path] = t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1]
    return path, types[path]


# ---------------------------------------------------------------------------------------------- export

def _capture_export(shadow: nn.Module, args: tuple, kwargs: dict):
    try:
        program = torch.export.export(shadow, args, kwargs, strict=False)
    except Exception as e:
        if "not a known type" not in str(e):
            raise
        # The output holds an object export cannot flatten (a HuggingFace DynamicCache in a ModelOutput, when
        # the model is called with its default use_cache=True). Its work still counts; export the tensors it holds.
        program = _export_tensor_outputs(shadow, args, kwargs)
    graph = program.graph_module.graph
    root = program.graph_module
    types: dict[str, str] = {}
    nodes = []
    for node in graph.nodes:
        recs = tuple(_export_records(node, root))
        path, type_name = _export_module_of(node, types)
        nodes.append(CapturedNode(node, path, type_name, recs, _first_meta(node.meta.get("val"))))
    return graph, nodes, program


def _export_tensor_outputs(shadow: nn.Module, args: tuple, kwargs: dict):
    forward = shadow.forward

    @functools.wraps(forward)   # keeps the signature export binds the inputs with
    def tensor_outputs(*a, **k):
        return tuple(_tensor_leaves(forward(*a, **k)))

    shadow.forward = tensor_outputs   # the shadow is ours: no user object is patched
    try:
        return torch.export.export(shadow, args, kwargs, strict=False)
    finally:
        del shadow.forward


def _tensor_leaves(x: Any, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor inside an output: pytree containers, and the attributes of objects pytree doesn't know."""
    if isinstance(x, torch.Tensor):
        return [x]
    if depth > 8:
        return []
    leaves, _ = pytree.tree_flatten(x)
    if not (len(leaves) == 1 and leaves[0] is x):
        return [t for leaf in leaves for t in _tensor_leaves(leaf, depth + 1)]
    if hasattr(x, "__dict__") and not isinstance(x, (type, nn.Module)):
        return [t for v in vars(x).values() for t in _tensor_leaves(v, depth + 1)]
    return []


def _export_records(node: fx.Node, root: nn.Module) -> Iterator[OpRecord]:
    """An ATen node costs itself; a higher-order op (no_grad or autocast region) costs its subgraph's nodes."""
    if node.op != "call_function":
        return
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        args = map_arg(node.args, lambda n: n.meta.get("val"))
        kwargs = map_arg(node.kwargs, lambda n: n.meta.get("val"))
        yield OpRecord.of(target, args, kwargs, node.meta.get("val"))
    elif isinstance(target, torch._ops.HigherOrderOperator):
        for arg in node.args:
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                sub = _fetch_attr(root, arg.target)
                if isinstance(sub, fx.GraphModule):
                    for inner in sub.graph.nodes:
                        yield from _export_records(inner, sub)


def _export_module_of(node: fx.Node, types: dict[str, str]) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, t = next(reversed(stack.values()))
    name = t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1]
    return path, name


# ---------------------------------------------------------------------------------------------- dispatch

def _capture_dispatch(shadow: nn.Module, args: tuple, kwargs: dict, twins: bool = True):
    """Run the forward on meta tensors; every recorded ATen op becomes a call_function node.

    Two kinds of repeated work are recorded once (the graph and the report keep every call):
    - twin module calls: a submodule call whose module (class, attributes, parameter shapes) and arguments match
      one already run is not run: the first call's nodes are copied, sharing its op records;
    - loop steps: ops that repeat a run of ops just before them, same ops on the same shapes at the same cost
      (a scan over 2,048 time steps), fold into the nodes of the run they repeat, which count their calls.
    A forward that the skipped calls would have changed (a cache object filled layer by layer) can fail without
    them: it is then recorded again without twins.
    """
    hidden = next((type(m).__name__ for m in shadow.modules() if isinstance(m, nn.MultiheadAttention)), None)
    if hidden:
        # its forward runs F.multi_head_attention_forward, inside which no function-level hook sees
        # scaled_dot_product_attention: it would be recorded as the meta device's math decomposition, not the
        # fused kernel a GPU runs. export keeps it whole.
        raise CaptureError(f"{hidden} hides its fused attention from dispatch-level recording (export keeps it)")
    if twins:
        try:
            return _capture_dispatch(shadow, args, kwargs, twins=False) if not _has_submodules(shadow) else \
                _run_dispatch(shadow, args, kwargs, twins=True)
        except Exception:
            pass   # recorded again in full below: that error, if any, is the one to report
    return _run_dispatch(shadow, args, kwargs, twins=False)


def _has_submodules(m: nn.Module) -> bool:
    return next(iter(m.children()), None) is not None


def _run_dispatch(shadow: nn.Module, args: tuple, kwargs: dict, twins: bool, fold: bool = True):
    builder = _DispatchGraphBuilder(shadow, args, kwargs, twins, fold)
    with torch.no_grad(), builder:
        if _flat_with_stacks(shadow) and not kwargs:
            out = _StackInterpreter(shadow, builder).run(*args)
        else:
            out = shadow(*args, **kwargs)
    return builder.finish(out)


def _flat_with_stacks(m: nn.Module) -> bool:
    """An exported graph run as a module (a rewrite's whole-forward graph, shapeprof.phases' cached decode): it
    calls no submodule, so the module each op belongs to comes from its node's `nn_module_stack`."""
    return isinstance(m, fx.GraphModule) and any("nn_module_stack" in n.meta for n in m.graph.nodes) and \
        not any(n.op == "call_module" for n in m.graph.nodes)


class _StackInterpreter(fx.Interpreter):
    """Runs an exported graph node by node with the dispatch builder's module stack set to each node's own, so
    that the ops it records carry the module paths export kept (and loop folding stops at module boundaries)."""

    def __init__(self, gm: fx.GraphModule, builder: "_DispatchGraphBuilder"):
        super().__init__(gm)
        self.builder = builder
        self.current: tuple = ()

    def run_node(self, n: fx.Node) -> Any:
        stack = n.meta.get("nn_module_stack") or {}
        entries = tuple((path, t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1])
                        for path, t in stack.values())
        if entries != self.current:
            self.current = entries
            self.builder.stack[1:] = list(entries)
            if self.builder.folder:
                self.builder.folder.reset()
        return super().run_node(n)


def _capture_dispatch_real(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype | None):
    """Run the forward once on real data, on a copy, recording every ATen op: for a forward that branches on
    tensor values (``if y.mean() > 0:``), which no meta or symbolic run can follow.

    The copy has the user's values (cast to `dtype`) and no hooks; the inputs are copied too, and the global RNG
    is restored afterwards, so nothing the user holds changes. It costs one copy of the weights in memory.
    """
    if _is_meta_anywhere((model, args, kwargs)):
        raise CaptureError("needs real weights and real inputs (the model or an input is on meta or an InputShape)")
    need = sum(t.numel() * t.element_size() for t in {id(t): t for t in _tensors_of(model)}.values())
    available = psutil.virtual_memory().available
    if 2 * need > available:
        raise CaptureError(f"a copy of the weights ({need / 1e9:.3g} GB) does not fit in the free memory "
                           f"({available / 1e9:.3g} GB)")
    memo: dict[int, Any] = {}
    for t in _tensors_of(model):
        if id(t) not in memo:
            memo[id(t)] = _real_copy(t, dtype)
    for m in model.modules():
        for hooks in _hook_dicts(m):
            memo[id(hooks)] = OrderedDict()
    copy_ = copy.deepcopy(model, memo)
    input_memo = {id(t): _real_copy(t, dtype) for t in _input_leaves((args, kwargs))}
    real_args, real_kwargs = copy.deepcopy((args, kwargs), input_memo)
    devices = sorted({t.device.index or 0 for t in _tensors_of(model) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        graph, nodes, _ = _capture_dispatch(copy_, real_args, real_kwargs)
    return graph, nodes, None


def _real_copy(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    to = dtype if dtype is not None and t.is_floating_point() else t.dtype
    c = t.detach().to(dtype=to, copy=True)
    return nn.Parameter(c, requires_grad=t.requires_grad and c.is_floating_point()) \
        if isinstance(t, nn.Parameter) else c


def _is_meta_anywhere(tree: Any) -> bool:
    model, args, kwargs = tree
    return any(isinstance(x, InputShape) or x.is_meta for x in _input_leaves((args, kwargs))) or \
        any(t.is_meta for t in _tensors_of(model))


def _value_branch_site(e: BaseException) -> str:
    """'model.py:7 (`if y.mean() > 0:`)' when a meta run failed because the forward wanted a tensor's value."""
    text = str(e)
    if not any(k in text for k in _NEEDS_VALUES):
        return ""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_LIBRARY_DIRS)]
    if not frames:
        return ""
    f = frames[-1]
    line = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f"{os.path.basename(f.filename)}:{f.lineno}" + (f" (`{line}`)" if line else "")


# what torch says when a meta tensor is asked for its data (.item(), bool(), .tolist(), data-dependent shapes)
_NEEDS_VALUES = ("cannot be called on meta tensors", "_local_scalar_dense", "Cannot copy out of meta tensor",
                 "data-dependent", "meta tensors do not have data", "nonzero")


@dataclass
class _CallRegion:
    """The nodes one submodule call recorded, so that a twin call can copy them instead of running."""

    path: str
    depth: int                            # entries of the module stack down to and including this module
    nodes: list[CapturedNode]
    inputs: list[fx.Node]                 # nodes of the call's tensor arguments, flattened in order
    params: dict[fx.Node, str]            # get_attr nodes of the module's own tensors -> their relative names
    output: Any                           # the call's return value, tensors as _Out(index into outputs)
    outputs: list[tuple[fx.Node, torch.Tensor]]   # each returned tensor's producing node and the tensor
    # tensors the call read that are not its arguments but held by an object argument (a HuggingFace cache's
    # layers[i].keys): outside node -> (where in the arguments it was, its TensorMeta); None for a tensor the call
    # made without an ATen op (``torch.tensor([])`` in DynamicLayer's lazy init), which a twin makes for itself
    reads: dict[fx.Node, tuple[tuple, TensorMeta] | None] = field(default_factory=dict)
    # what the call changed in its layer's part of an object argument (the cache's layers[i].keys, is_initialized):
    # (where, what was there before, what it became: ("tensor", producing node or None, meta, device) or
    # ("value", v))
    writes: list[tuple[tuple, Any, tuple]] = field(default_factory=list)


@dataclass(frozen=True)
class _Out:
    index: int


class _DispatchGraphBuilder:
    def __init__(self, root: nn.Module, args: tuple, kwargs: dict, twins: bool = True, fold: bool = True):
        self.root = root
        self.graph = fx.Graph()
        # tensor -> node that made it; weak, so that a run on real data does not keep every activation alive
        self.producer = WeakTensorKeyDictionary()
        self.constants = 0
        self.constant_refs: dict[fx.Node, weakref.ref] = {}   # _constant_N node -> the tensor it stands for
        self.target_names: dict[Any, str] = {}       # an op -> the name fx gives its nodes (before numbering)
        self.nodes: list[CapturedNode] = []
        self.names = {id(m): (name, type(m).__name__) for name, m in root.named_modules()}
        self.types = {name: t for name, t in self.names.values()}
        self.stack: list[tuple[str, str]] = [("", type(root).__name__)]
        self.tensor_nodes: dict[str, fx.Node] = {}
        for name, t in list(root.named_parameters()) + list(root.named_buffers()):
            node = self.graph.get_attr(name)
            self.tensor_nodes[name] = node
            self._bind(t, node)
        flat, _ = pytree.tree_flatten((args, kwargs))
        for i, t in enumerate(flat):
            if isinstance(t, torch.Tensor) and t not in self.producer:
                self._bind(t, self.graph.placeholder(f"input_{i}"))
        self.recorder = _GraphRecorder(self)
        self.handles = []
        self.twins = twins
        self.regions: dict[Any, _CallRegion | None] = {}
        self.module_keys: dict[int, Any] = {}
        self.folder = _LoopFolder() if fold else None
        self.patched: list[nn.Module] = []

    def _bind(self, t: torch.Tensor, node: fx.Node) -> None:
        self.producer[t] = node

    def __enter__(self):
        pre = nn.modules.module.register_module_forward_pre_hook(self._enter_module)
        post = nn.modules.module.register_module_forward_hook(self._exit_module)
        self.handles = [pre, post]
        if self.twins:   # the shadow is ours: its submodules' forwards may be wrapped (never the user's)
            for name, m in self.root.named_modules():
                if name:
                    m.forward = self._twin_forward(m, name, m.forward)
                    self.patched.append(m)
        self.recorder.__enter__()

    def __exit__(self, *exc):
        self.recorder.__exit__(*exc)
        for h in self.handles:
            h.remove()
        for m in self.patched:
            del m.forward

    def _enter_module(self, module, args):
        # a module the forward calls without it being in the model's tree (kept in a global, say)
        self.stack.append(self.names.get(id(module), (f"<{type(module).__name__} outside the model>",
                                                      type(module).__name__)))
        if self.folder:   # a loop run never spans a module boundary: regions hold whole runs
            self.folder.reset()

    def _exit_module(self, module, args, out):
        if len(self.stack) > 1:
            self.stack.pop()
        if self.folder:
            self.folder.reset()

    def add(self, record: OpRecord, args: tuple, kwargs: dict, out: Any) -> None:
        path, type_name = self.stack[-1]
        rep = self.folder.offer(_loop_signature(record, path)) if self.folder else None
        if rep is not None:                      # a repeat of a loop step: count it on the node it repeats
            cn = self.nodes[rep]
            cn.repeats += 1
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._bind(t, cn.node)
            return

        def node_of(x):
            if isinstance(x, torch.Tensor):
                n = self.producer.get(x)
                if n is None:  # a tensor from outside the model (a global constant)
                    self.constants += 1
                    n = self.graph.create_node("get_attr", f"_constant_{self.constants}")
                    self.constant_refs[n] = weakref.ref(x)
                    self._bind(x, n)
                return n
            return x
        node = self.graph.call_function(record.op, pytree.tree_map(node_of, args),
                                        pytree.tree_map(node_of, kwargs))
        node.meta["nn_module_stack"] = OrderedDict((p, (p, t)) for p, t in self.stack[1:])
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._bind(t, node)
        if self.folder:
            self.folder.created(len(self.nodes))
        self.nodes.append(CapturedNode(node, path, type_name, (record,), _first_meta(out)))

    # ------------------------------------------------------------------------------------------ twins
    def _twin_forward(self, m: nn.Module, path: str, forward: Callable) -> Callable:
        def twin_forward(*args, **kwargs):
            try:
                key = (self._module_key(m, path), _arg_key(_shapes(args)), _arg_key(_shapes(kwargs)))
            except _Unkeyable:
                return forward(*args, **kwargs)
            region = self.regions.get(key, False)
            if region:
                state = self._twin_state(region, path, args, kwargs)
                if state is not None:
                    return self._replay(region, m, path, args, kwargs, *state)
                # this twin's part of an object argument is not what its original's was: run it (keep the region)
            start, constants = len(self.nodes), self.constants
            # what object arguments hold, before the call changes it (a cache's update replaces its tensors)
            held = _held_state(args, kwargs, self.producer) if region is False else None
            out = forward(*args, **kwargs)
            if region is False:
                self.regions[key] = self._region(m, path, start, args, kwargs, out, held, constants)
            return out
        twin_forward._shapeprof_twin_forward = True
        return twin_forward

    def _module_key(self, m: nn.Module, path: str) -> Any:
        key = self.module_keys.get(id(m))
        if key is None:
            key = self.module_keys[id(m)] = _module_key(
                m, lambda c: self._module_key(c, self.names.get(id(c), ("", ""))[0]), positions=_positions(path))
        return key

    def _region(self, m, path, start, args, kwargs, out, held, constants) -> _CallRegion | None:
        nodes = self.nodes[start:]
        inputs = [self.producer.get(t) for t in _flat_tensors((args, kwargs))]
        if any(n is None for n in inputs):
            return None
        own = {self.tensor_nodes[f"{path}.{name}"]: name for name, _ in
               list(m.named_parameters()) + list(m.named_buffers()) if f"{path}.{name}" in self.tensor_nodes}
        inside = {cn.node for cn in nodes} | set(inputs) | set(own)
        outside = [i for cn in nodes for i in cn.node.all_input_nodes if i not in inside]
        if outside and held is None:
            return None   # reads what it was not given, and what its arguments hold could not be followed
        reads = self._held_reads(outside, held, constants) if outside else {}
        if reads is None:
            return None   # reads something that is neither an argument, nor its own, nor held by an argument
        writes = self._held_writes(path, args, kwargs, held, inside) if held else []
        if writes is None:
            return None
        outputs: list[tuple[fx.Node, torch.Tensor]] = []

        def index(t):
            node = self.producer.get(t)
            if node is None or node not in inside:
                raise _Unkeyable(type(t))
            outputs.append((node, t))
            return _Out(len(outputs) - 1)
        try:
            output = _map_plain(out, index)
        except _Unkeyable:
            return None
        return _CallRegion(path, len(self.stack) - 1, nodes, inputs, own, output, outputs, reads, writes)

    def _held_reads(self, outside: list[fx.Node], held: _Held,
                    constants: int) -> dict[fx.Node, tuple[tuple, TensorMeta] | None] | None:
        """Where each node a call read from outside its arguments came from, or None if not from its arguments.

        HuggingFace attention reads its layer's keys and values from the cache object it is passed
        (``cache.layers[self.layer_idx].keys``): tensors no argument carries. A twin call will read the same place
        in its own arguments with its layer number (checked by `_twin_state` before it is copied). A tensor the call
        made without an ATen op and dropped (DynamicLayer's lazy ``torch.tensor([])``, replaced by the keys) is
        made by each twin for itself: a new _constant_ node in each copy, as a run makes one.
        """
        tensors = [(where, t, node) for where, (t, node) in held.items() if isinstance(t, torch.Tensor)]
        by_id = {id(t): (where, t) for where, t, _ in tensors}
        before = {node: (where, t) for where, t, node in tensors if node is not None}
        reads: dict[fx.Node, tuple[tuple, TensorMeta] | None] = {}
        for node in dict.fromkeys(outside):
            ref = self.constant_refs.get(node)
            t = ref() if ref is not None else None
            found = before.get(node) or (by_id.get(id(t)) if t is not None else None)
            if found is not None:
                reads[node] = (found[0], TensorMeta.of(found[1]))
            elif ref is None:
                return None          # an activation of another module, reached some other way
            elif t is None and int(node.target.rsplit("_", 1)[1]) > constants:
                reads[node] = None   # made during the call and gone with it
            elif held.objects:
                return None          # held somewhere in an object argument this walk did not see: not safe
            # else: a tensor from outside the model (a global): every twin reads that one too, and its one node
        return reads

    def _held_writes(self, path: str, args, kwargs, held: _Held, inside: set[fx.Node]
                     ) -> list[tuple[tuple, Any, tuple]] | None:
        """What the call changed in its own layer's part of its object arguments (a path through an index equal to
        its layer number: ``cache.layers[0].keys``), so that a copy for a twin makes the same change in the twin's
        part (the cache then ends up filled for every layer, as a run would leave it). Changes elsewhere in them
        are not made again, as before (a twin is not run). None: a change a copy could not make."""
        positions = _positions(path)
        if not positions:
            return []
        after = _held_state(args, kwargs, self.producer)
        if after is None:
            return None
        writes = []
        for where, (v, _) in after.items():
            if not _positional(where, positions):
                continue
            before = held.get(where, (_MISSING, None))[0]
            if v is before or (not isinstance(v, torch.Tensor) and not isinstance(before, torch.Tensor)
                               and type(v) is type(before) and v == before):
                continue
            if isinstance(v, torch.Tensor):
                node = self.producer.get(v)
                if node is not None and node not in inside:
                    return None   # stores a tensor from elsewhere: which one a twin would store is not known
                writes.append((where, _held_key(before), ("tensor", node, TensorMeta.of(v), v.device)))
            else:
                writes.append((where, _held_key(before), ("value", v)))
        return writes

    def _twin_state(self, region: _CallRegion, path: str, args, kwargs) -> tuple[dict, list] | None:
        """What a copy of `region` for the twin at `path` reads and changes in its object arguments (its own layer
        number put in the places): for each held read the twin's tensor there (None for one the twin makes), and
        where each change goes. None if the twin's part differs from the original's (the twin then runs)."""
        if not region.reads and not region.writes:
            return {}, []
        numbers = _renumbering(region.path, path)
        if numbers is None:
            return None   # cannot tell which of the twin's layers it would read
        root = (args, kwargs)
        reads: dict[fx.Node, Any] = {}
        for node, read in region.reads.items():
            if read is None:
                reads[node] = None
                continue
            where, meta = read
            t = _fetch_held(root, where, numbers)
            if not isinstance(t, torch.Tensor) or TensorMeta.of(t) != meta:
                return None
            reads[node] = t
        writes = []
        for where, before, after in region.writes:
            if _held_key(_fetch_held(root, where, numbers)) != before:
                return None
            writes.append((_renumbered(where, numbers), after))
        return reads, writes

    def _replay(self, region: _CallRegion, m: nn.Module, path: str, args, kwargs, reads: dict, writes: list
                ) -> Any:
        inputs = [self.producer.get(t) for t in _flat_tensors((args, kwargs))]
        env: dict[fx.Node, fx.Node] = dict(zip(region.inputs, inputs))
        for node, name in region.params.items():
            env[node] = self.tensor_nodes[f"{path}.{name}"]
        old, outer = region.path, [p for p, _ in self.stack[1:]]
        # A layer's nodes come from a handful of modules: each one's module stack and path are renamed once here
        stacks: dict[tuple[str, ...], OrderedDict] = {}
        paths: dict[str, str] = {}
        lookup = env.get
        graph = self.graph
        names = self.target_names
        for cn in region.nodes:
            node = cn.node
            if reads:   # a held read gets its node where a run would have made it: just before its first reader
                for i in node.all_input_nodes:
                    if i in reads and i not in env:
                        env[i] = self._held_node(reads[i])
            # Made without arguments, which are then assigned: Graph.create_node looks through every argument for
            # a raw SymInt (torch 2.13 warns of them), a pytree walk that was 40% of copying a node; the original's
            # arguments passed that check when it was made, and a copy's are the same with nodes swapped.
            # The name fx derives from the target (snake case by a regex) is derived once per target here.
            if node.target in names:
                name = names[node.target]
            else:
                name = names[node.target] = _fx_base_name(graph, node.target)
            copy_ = graph.create_node(node.op, node.target, name=name)
            copy_.args = _swap_nodes(node.args, lookup)
            if node.kwargs:
                copy_.kwargs = map_arg(node.kwargs, lambda n: lookup(n, n))
            inner = tuple(node.meta.get("nn_module_stack", {}))[region.depth:]
            template = stacks.get(inner)
            if template is None:
                stack = outer + [_reprefix(p, old, path) for p in inner]
                template = stacks[inner] = OrderedDict((p, (p, self.types.get(p, ""))) for p in stack)
            copy_.meta["nn_module_stack"] = OrderedDict(template)   # each node its own, as `add` makes them
            env[node] = copy_
            module_path = paths.get(cn.module_path)
            if module_path is None:
                module_path = paths[cn.module_path] = _reprefix(cn.module_path, old, path)
            self.nodes.append(CapturedNode(copy_, module_path, cn.module_type, cn.records, cn.output,
                                           twin_of=node.name, repeats=cn.repeats))
        fresh = []
        self.recorder._paused += 1      # making the copies' outputs is not an op of the model
        try:
            for node, t in region.outputs:
                new = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device)
                self._bind(new, env.get(node, node))
                fresh.append(new)
            for where, (kind, value, *made) in writes:   # the twin's layer of the cache, as a run leaves it
                if kind == "tensor":
                    t, device = made
                    new = torch.empty_strided(t.shape, t.stride, dtype=t.dtype, device=device)
                    if value is not None:
                        self._bind(new, env.get(value, value))
                    value = new
                _store_held((args, kwargs), where, value)
        finally:
            self.recorder._paused -= 1
        return _map_plain(region.output, lambda o: fresh[o.index], kind=_Out)

    def _held_node(self, t: torch.Tensor | None) -> fx.Node:
        """The node of a tensor a twin reads from an object argument: its producer, else a new _constant_ node, as
        `add` makes one for a tensor from outside the graph."""
        n = self.producer.get(t) if t is not None else None
        if n is None:
            self.constants += 1
            n = self.graph.create_node("get_attr", f"_constant_{self.constants}")
            if t is not None:
                self.constant_refs[n] = weakref.ref(t)
                self._bind(t, n)
        return n

    def finish(self, out: Any):
        self.graph.output(tuple(self.producer[t] for t in _tensor_leaves(out) if t in self.producer))
        by_node = {c.node: c for c in self.nodes}
        nodes = [by_node.get(n) or CapturedNode(n, "", "", (), None) for n in self.graph.nodes]
        return self.graph, nodes, None


class _LoopFolder:
    """Finds ops that repeat the run of ops just before them (a loop's body), so they fold into that run.

    Each op has a signature (op, input and output shapes, module, cost). Once the last 2p signatures are the same
    p signatures twice, every following op whose signature equals the one p ops back is a repeat: it folds into
    the node that op was folded into. The first two copies of the body stay nodes; the rest count on the second.
    """

    MAX_PERIOD = 512

    def __init__(self):
        self.ids: dict[Any, int] = {}
        self.reset()

    def reset(self) -> None:
        self.sigs: list[int] = []
        self.reps: list[int] = []     # position -> index of the node it was recorded as
        self.last: dict[int, int] = {}
        self.period: int | None = None
        self._pending: int | None = None

    def offer(self, sig: Any) -> int | None:
        """The node index to fold this op into, or None (then `created` gives its new node's index)."""
        sid = self._intern(sig)
        pos = len(self.sigs)
        self.sigs.append(sid)
        if self.period is not None and sid == self.sigs[pos - self.period]:
            rep = self.reps[pos - self.period]
            self.reps.append(rep)
            return rep
        self.period = None
        prev = self.last.get(sid)
        self.last[sid] = pos
        if prev is not None:
            p = pos - prev
            if p <= self.MAX_PERIOD and pos - 2 * p + 1 >= 0 and \
                    self.sigs[pos - 2 * p + 1:pos - p + 1] == self.sigs[pos - p + 1:pos + 1]:
                self.period = p
        self._pending = pos
        return None

    def _intern(self, sig: Any) -> int:
        if sig is None:
            return -1 - len(self.sigs)   # equal to no other: an op that cannot be compared never folds
        return self.ids.setdefault(sig, len(self.ids))

    def created(self, index: int) -> None:
        if self._pending is not None:
            self.reps.append(index)
            self._pending = None


def _loop_signature(record: OpRecord, path: str) -> Any:
    """What makes two ops interchangeable for costing: the op, its shapes, where it runs and what it costs."""
    from .costs import cost_of   # costs depend on records only; imported here to keep capture's imports light
    try:
        return (record.op, tuple(record.input_metas()), record.outputs, path, cost_of(record))
    except Exception:
        return None


def _positions(path: str) -> frozenset[int]:
    """Indices along a module path ('model.layers.7.self_attn' -> {7}): a layer's own number."""
    return frozenset(int(p) for p in path.split(".") if p.isdigit())


def _shapes(tree: Any) -> Any:
    """Arguments with tensors replaced by what decides a call's cost (so twin calls have equal keys)."""
    if isinstance(tree, torch.Tensor):
        return ("tensor", tuple(tree.shape), tuple(tree.stride()), str(tree.dtype), tree.device.type)
    if isinstance(tree, (list, tuple)):   # torch.Size and named tuples too
        return (type(tree).__name__, tuple(_shapes(v) for v in tree))
    if isinstance(tree, dict):
        return {k: _shapes(v) for k, v in tree.items()}
    if isinstance(tree, _PRIMITIVES) or isinstance(tree, slice):
        return tree
    return ("obj", id(tree))    # an object (a cache): the same object for every layer is the same key


_MISSING = object()   # nothing at a place in an object argument (the attribute is not set yet)


class _Held(dict):
    """where -> (value, its producing node): what `_held_state` found."""

    objects = False   # whether an argument is an object (not a tensor, plain value or plain container)


def _held_state(args: tuple, kwargs: dict, producer) -> _Held | None:
    """What the objects among a call's arguments hold (a cache: its layers' keys, values and flags): each tensor
    and plain value, by where it is (("kwarg", "cache"), ("attr", "layers"), ("index", 3), ("attr", "keys")), with
    a tensor's producing node now.

    Tensors that are arguments themselves (plain lists, tuples and dicts of them) are the call's inputs, not here.
    None when what they hold cannot all be followed (more than `_MAX_HELD` values, deeper than 6, in a set, in an
    object without a __dict__): then, as before, a call that reads a tensor it was not given is not copied.
    """
    found = _Held()

    def walk(v: Any, where: tuple, depth: int, held: bool) -> None:
        if len(found) > _MAX_HELD:
            raise _Unkeyable("too much held")
        if isinstance(v, torch.Tensor):
            if held:
                found[where] = (v, producer.get(v))
        elif v is None or isinstance(v, _PRIMITIVES):
            if held:
                found[where] = (v, None)
        elif isinstance(v, (nn.Module, type, functools.partial)) or inspect.isroutine(v):
            return   # the model's own modules (their tensors have nodes), classes, functions: not state
        elif depth > 6:
            raise _Unkeyable("too deep")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, where + (("index", i),), depth + 1, held)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, where + (("item", k),), depth + 1, held)
        elif hasattr(v, "__dict__") and not _has_slots(type(v)):
            found.objects = True
            for k, x in vars(v).items():
                walk(x, where + (("attr", k),), depth + 1, True)
        else:
            raise _Unkeyable(type(v))   # a set, an object keeping its state in slots: cannot be followed

    try:
        for i, a in enumerate(args):
            walk(a, (("arg", i),), 0, False)
        for k, a in kwargs.items():
            walk(a, (("kwarg", k),), 0, False)
    except _Unkeyable:
        return None
    return found


_MAX_HELD = 20_000


@functools.lru_cache(maxsize=None)
def _has_slots(cls: type) -> bool:
    """Whether instances keep state outside their __dict__ (in slots; abc.ABC's empty ``__slots__ = ()`` not)."""
    for c in cls.__mro__[:-1]:
        slots = vars(c).get("__slots__", ())
        if any(n not in ("__dict__", "__weakref__") for n in ((slots,) if isinstance(slots, str) else slots)):
            return True
    return False


def _held_key(v: Any) -> Any:
    """What must match for a twin's held value to stand for its original's: a tensor's metadata, a value."""
    if v is _MISSING:
        return "missing"
    if isinstance(v, torch.Tensor):
        return ("tensor", TensorMeta.of(v))
    return (type(v), v)


def _positional(where: tuple, positions: frozenset[int]) -> bool:
    """Whether a place in an object argument goes through an index equal to the module's layer number."""
    return any(kind in ("index", "item") and type(k) is int and k in positions for kind, k in where)


def _renumbering(old: str, new: str) -> dict[int, int] | None:
    """Layer numbers of module path `old` -> those of `new` ('model.layers.0' -> 'model.layers.5': {0: 5});
    None when they cannot be paired (different counts, or one number going two ways)."""
    a = [int(p) for p in old.split(".") if p.isdigit()]
    b = [int(p) for p in new.split(".") if p.isdigit()]
    if len(a) != len(b):
        return None
    numbers: dict[int, int] = {}
    for x, y in zip(a, b):
        if numbers.setdefault(x, y) != y:
            return None
    return numbers


def _fx_base_name(graph: fx.Graph, target: Any) -> str | None:
    """The name fx gives a node of `target` before numbering it (None: let fx derive it, as without a name)."""
    derive = getattr(graph, "_target_to_str", None)   # what Graph.create_node calls when given no name
    return derive(target) if derive is not None else None


def _swap_nodes(args: tuple, lookup: Callable) -> tuple:
    """`map_arg(args, lambda n: lookup(n, n))` for the arguments of an ATen node (nodes, scalars, flat lists of
    them), without map_arg's generic recursion: copying a layer does this for every node. Anything nested deeper
    goes through map_arg. (fx turns lists into its immutable_list as the node takes them, as it does map_arg's.)"""
    out = []
    for a in args:
        t = type(a)
        if isinstance(a, fx.Node):
            out.append(lookup(a, a))
        elif (t is list or t is tuple or t is immutable_list) and not any(isinstance(x, _NESTED) for x in a):
            items = [lookup(x, x) if isinstance(x, fx.Node) else x for x in a]
            out.append(tuple(items) if t is tuple else items)
        elif isinstance(a, _NESTED):
            out.append(map_arg(a, lambda n: lookup(n, n)))
        else:
            out.append(a)
    return tuple(out)


_NESTED = (list, tuple, dict, slice)


def _renumbered(where: tuple, numbers: dict[int, int]) -> tuple:
    """`where` with an index or key equal to one of the original's layer numbers taken as the twin's."""
    return tuple((kind, numbers.get(k, k)) if kind in ("index", "item") and type(k) is int else (kind, k)
                 for kind, k in where)


def _fetch_held(root: Any, where: tuple, numbers: dict[int, int] | None = None) -> Any:
    """What is at `where` (see `_held_state`) in `root` = (args, kwargs), renumbered for a twin (see `_renumbered`);
    `_MISSING` if there is nothing there."""
    v = root
    for kind, k in (_renumbered(where, numbers) if numbers else where):
        try:
            if kind == "attr":
                v = vars(v)[k]
            elif kind == "arg":
                v = v[0][k]
            elif kind == "kwarg":
                v = v[1][k]
            else:   # "index" into a list or tuple, "item" of a dict
                v = v[k]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return v


def _store_held(root: Any, where: tuple, value: Any) -> None:
    """Put `value` at `where` in (args, kwargs): a twin's change to its layer of a cache. Nothing if the object it
    goes in is not there (the original's call made it: a lazily appended cache layer), as before."""
    parent = _fetch_held(root, where[:-1])
    kind, k = where[-1]
    if parent is _MISSING:
        return
    if kind == "attr" and hasattr(parent, "__dict__"):
        vars(parent)[k] = value
    elif kind == "index" and type(parent) is list and k < len(parent):
        parent[k] = value
    elif kind == "item" and type(parent) is dict:
        parent[k] = value


def _flat_tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _flat_tensors(v)]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _flat_tensors(v)]
    return []


def _map_plain(x: Any, fn: Callable, kind: type = torch.Tensor) -> Any:
    """Map `fn` over the `kind` leaves of plain containers; anything else but primitives is _Unkeyable."""
    if isinstance(x, kind):
        return fn(x)
    if type(x) in (tuple, list):
        return type(x)(_map_plain(v, fn, kind) for v in x)
    if type(x) is dict:
        return {k: _map_plain(v, fn, kind) for k, v in x.items()}
    if isinstance(x, _PRIMITIVES):
        return x
    raise _Unkeyable(type(x))


class _GraphRecorder(OpRecorder):
    """Turns each recorded op into a graph node at once, while its tensors (and their ids) are at hand."""

    def __init__(self, builder: _DispatchGraphBuilder):
        super().__init__(meta=True)
        self.builder = builder

    def record(self, op, args, kwargs, out) -> None:
        self.builder.add(OpRecord.of(op, args, kwargs, out), args, kwargs or {}, out)


_CAPTURERS = {"symbolic_trace": _capture_symbolic, "export": _capture_export, "dispatch": _capture_dispatch}
