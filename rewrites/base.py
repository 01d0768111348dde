"""The rewrite protocol: a rewrite is a pass over a GraphModule that says what it changed and what it skipped.

A rewrite finds its pattern in ``gm.graph``, checks the preconditions of each match, replaces the matches it can
and returns a `RewriteResult`: one `Match` per replacement (where, what, the bytes it removes and the time the
roofline says it saves on the chosen device) and one `Skip` per candidate it left alone, with the reason. Calling
a rewrite runs its `run` and then lints and recompiles the graph, so a pass never hands back a graph that does
not hold together.

    >>> import torch, torch.fx as fx
    >>> class Noop(Rewrite):
    ...     name, description = "noop", "changes nothing"
    ...     def run(self, gm, ctx):
    ...         return RewriteResult(self.name)
    >>> gm = fx.symbolic_trace(torch.nn.Linear(4, 4))
    >>> Noop()(gm, RewriteContext()).applied
    []

Passes do not verify themselves: `shapeprof.optimize` runs the rewritten model against the original on the
example inputs and undoes a rewrite whose outputs differ. What a pass knows about each node comes from the
capture (`shapeprof.capture`): its ATen op records and output shape, in ``node.meta[CAPTURE_KEY]``.

State a rewrite needs (a cache, a constant) is registered on the GraphModule under a new name; optimize moves it
onto the returned model as a non-persistent buffer or plain attribute, so the model's state_dict keys do not
change.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from shapeprof.capture import CapturedNode, source_location
from shapeprof.costs import cost_of
from shapeprof.hardware import DeviceSpec, get_spec
from shapeprof.registry import Registry
from shapeprof.records import OpRecord, TensorMeta
from shapeprof.roofline import record_time

CAPTURE_KEY = "shapeprof.captured"   # node.meta[CAPTURE_KEY]: the CapturedNode the capture made for this node


@dataclass(frozen=True)
class Match:
    """One place a rewrite changed.

    Args:
        where: the module path (and node, and source line) of what was replaced: 'blocks.0.0 -> blocks.0.1'.
        what: what it became: 'Linear + ReLU -> mkldnn._linear_pointwise(relu)'.
        bytes_saved: main-memory traffic the change removes, from the cost registry (for a fused activation:
            the intermediate no longer written and read back, 2 x its bytes).
        seconds_saved: the roofline time saved on the chosen DeviceSpec (before minus after).
    """

    where: str
    what: str
    bytes_saved: int = 0
    seconds_saved: float = 0.0


@dataclass(frozen=True)
class Skip:
    """A candidate a rewrite left alone, and why: 'output of fc is also used by add_1'."""

    where: str
    reason: str


@dataclass
class RewriteResult:
    """What one rewrite did to one graph."""

    name: str
    applied: list[Match] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # what the report says besides the matches (a cache's size)
    decoding: Any = None   # a rewrite that changes how the model is called step by step (kv_cache): its plan

    @property
    def changed(self) -> bool:
        return bool(self.applied)

    @property
    def bytes_saved(self) -> int:
        return sum(m.bytes_saved for m in self.applied)

    @property
    def seconds_saved(self) -> float:
        return sum(m.seconds_saved for m in self.applied)

    def merged(self, other: "RewriteResult") -> "RewriteResult":
        """The results of the same rewrite on two graphs (two submodules) as one."""
        return RewriteResult(self.name, self.applied + other.applied, self.skipped + other.skipped,
                             self.notes + other.notes, self.decoding if self.decoding is not None else other.decoding)


@dataclass(frozen=True)
class RewriteContext:
    """What a rewrite may know besides the graph.

    Args:
        spec: the device whose roofline prices each match (the default spec when None).
        dtype: price matches as if floating tensors were in this dtype (None: as captured).
        path: where the graph's module sits in the user's model ('' for the model itself); prefixes `where`.
        device: the device the module's parameters are on: a lowering follows it.
        training: the module was in training mode when captured.
        inputs_require_grad: some example input requires grad (the user wants a backward pass).
        pack_weights: when CPU kernels may keep a weight in oneDNN's packed layout, a copy that must not go stale:
            "frozen" (a weight that does not require grad, checked per call), "always" (the user promises the
            weights do not change behind PyTorch's back), "never".
        sequence: for a rewrite whose capture is 'sequence', the `shapeprof.sequence.SequenceGraph` the graph came
            from (which input the token ids are, their size symbols, the example).
        decoder: for a rewrite whose capture is 'cached', the `shapeprof.kvcache.IncrementalDecoder` that runs the
            cached forward a 'sequence' rewrite installed.
    """

    spec: DeviceSpec | None = None
    dtype: torch.dtype | None = None
    path: str = ""
    device: torch.device | None = None
    training: bool = False
    inputs_require_grad: bool = False
    pack_weights: str = "frozen"
    sequence: Any = None
    decoder: Any = None

    @property
    def roofline_spec(self) -> DeviceSpec:
        """The device matches are priced on: `spec`, or the default spec when it is None."""
        return self.spec if self.spec is not None else get_spec()

    # ------------------------------------------------------------------ what the capture knows
    @staticmethod
    def captured(node: fx.Node) -> CapturedNode | None:
        """The capture's record of `node`; None for a node a rewrite created."""
        return node.meta.get(CAPTURE_KEY)

    @staticmethod
    def output(node: fx.Node) -> TensorMeta | None:
        """Shape, dtype and strides of `node`'s output as captured; None when unknown."""
        cn = node.meta.get(CAPTURE_KEY) if isinstance(node, fx.Node) else None
        return cn.output if cn is not None else None

    def where(self, node: fx.Node) -> str:
        """Where `node` is in the user's model: its module path for a module call ('blocks.0.0'), else the path
        of the module whose forward made it and the node's name ('layers.3.mlp:linear_1', or 'linear_1' at the
        top level)."""
        if node.op == "call_module":
            return ".".join(p for p in (self.path, node.target) if p)
        cn = self.captured(node)
        module = ".".join(p for p in (self.path, cn.module_path if cn is not None else "") if p)
        return f"{module}:{node.name}" if module else node.name

    @staticmethod
    def source(node: fx.Node) -> str:
        """'model.py:42', the line of the user's code that made `node` ('' if unknown): the last frame of its stack
        trace outside torch and shapeprof (whose tracer sits between a Sequential and the modules it calls)."""
        return os.path.basename(source_location(node))

    # ------------------------------------------------------------------ the roofline
    def seconds(self, records: Iterable[OpRecord]) -> float:
        """Roofline time of these ATen ops on the spec, each its own kernel (as `shapeprof.analyze` sums them)."""
        spec = self.roofline_spec
        total = 0.0
        for rec in records:
            total += record_time(self.as_dtype(rec), spec)[1].seconds
        return total

    def bytes(self, records: Iterable[OpRecord]) -> int:
        """Main-memory bytes these ATen ops move, from the cost registry."""
        return sum(cost_of(self.as_dtype(rec)).bytes for rec in records)

    def as_dtype(self, record: OpRecord) -> OpRecord:
        """The record with its floating tensors in `dtype` (unchanged when dtype is None)."""
        if self.dtype is None:
            return record
        return OpRecord(record.op, _cast(record.args, self.dtype), _cast(record.kwargs, self.dtype),
                        _cast(record.outputs, self.dtype))


def _cast(value, dtype: torch.dtype):
    if isinstance(value, TensorMeta):
        return replace(value, dtype=dtype) if value.dtype.is_floating_point else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


class Rewrite(abc.ABC):
    """A graph rewrite. Subclasses set `name` and `description` and implement `run`.

    Calling the rewrite runs `run` and then lints and recompiles the graph. `run` must leave every node it does
    not replace as it was, and must not move, copy or change parameters: the rewritten graph runs on the user's
    parameters, shared.

    Attributes:
        name: registry key, snake_case ('fuse_linear_activation').
        description: one line for `shapeprof.rewrites.available()`.
        capture: the graph the pass runs on. 'symbolic_trace': each traced module's forward, module-level nodes
            (``call_module`` Linear, ``call_function`` F.relu), one graph per call as the example made it;
            'sequence': the whole forward as an ATen graph with the token ids' sizes symbolic
            (`shapeprof.sequence`), for a pass that changes how the model is called step by step (a KV cache).
            A 'sequence' pass sets ``result.decoding`` to the plan its runtime follows, and optimize verifies it
            with a prefill and decode steps against the original, not with one call. 'cached': the cached forward
            a 'sequence' pass installed (``ctx.decoder``), for a pass that changes how that forward is run (paged
            memory); optimize checks it against the model.
    """

    name: str = ""
    description: str = ""
    capture: str = "symbolic_trace"

    def unsuitable(self, model: nn.Module) -> str | None:
        """Why the pass cannot apply to `model` at all, said before anything is captured (None: try it)."""
        return None

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> RewriteResult:
        """Find the pattern in ``gm.graph``, replace what passes the preconditions, report the rest."""

    def __call__(self, gm: fx.GraphModule, ctx: RewriteContext | None = None) -> RewriteResult:
        result = self.run(gm, ctx if ctx is not None else RewriteContext())
        if not isinstance(result, RewriteResult):
            raise TypeError(f"rewrite {self.name!r} returned {type(result).__name__}, not a RewriteResult")
        gm.graph.lint()
        gm.recompile()
        return result

    def __repr__(self) -> str:
        return f"<rewrite {self.name}: {self.description}>"


# ---------------------------------------------------------------------------------------------- the registry

_REGISTRY: Registry[Rewrite] = Registry("rewrite")


def register(rewrite):
    """Add a rewrite to the registry; returns what it was given, so it works as a class decorator.

    Raises:
        ValueError: a rewrite of that name is already registered, or the rewrite has no name.
        TypeError: not a Rewrite.
    """
    instance = rewrite() if isinstance(rewrite, type) else rewrite
    if not isinstance(instance, Rewrite):
        raise TypeError(f"register takes a shapeprof.rewrites.Rewrite, got {type(instance).__name__}")
    if not instance.name:
        raise ValueError(f"{type(instance).__name__} has no name")
    _REGISTRY.add(instance.name, instance)
    return rewrite


def unregister(name: str) -> Rewrite:
    """Remove a rewrite from the registry and return it (KeyError if there is none of that name)."""
    return _REGISTRY.remove(name)


def get(name: str) -> Rewrite:
    """The registered rewrite called `name`.

    Raises:
        KeyError: no such rewrite; the message lists the registered ones.
    """
    return _REGISTRY.get(name)


def available() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered rewrite, in the order `optimize` runs them."""
    return [(r.name, r.description) for _, r in _REGISTRY]
