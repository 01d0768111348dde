"""Sequence capture: a model's whole forward as one ATen graph whose batch and sequence lengths are symbols.

The rewrites that change how a model is called step by step (a KV cache computes only the new positions of a
sequence it saw a prefix of) need more than one call's graph: they need to know which sizes are the sequence
length, which values are derived from it (positions, masks, rotary tables), and a graph that runs at any length.
`torch.export` with dynamic shapes gives exactly that, and it follows Python control flow on shapes that
`symbolic_trace` cannot (nanoGPT's ``assert t <= block_size`` becomes a range constraint on the length).

    >>> import torch
    >>> from examples.nanogpt import GPT, GPTConfig
    >>> seq = capture_sequence(GPT(GPTConfig.tiny()).eval(), torch.zeros(1, 8, dtype=torch.long))
    >>> seq.ids_param, seq.max_length[1]
    ('idx', 64)

The example is widened to at least 2 along every dimension of the token ids before export (export specialises a
size of 1 to a constant); the model is exported on a copy that shares its tensors, with its hooks silenced, so
nothing of the user's changes. The graph is flattened (placeholders are the flat input leaves, the output a flat
tuple: `out_spec` rebuilds the model's output structure) and export's own input guards are removed: the runtime
that calls the graph checks what it needs itself.
"""
from __future__ import annotations

import inspect
import operator
import time
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import free_symbols
from torch.utils import _pytree as pytree
from torch.utils._sympy.numbers import int_oo

from .records import TensorMeta
from .text import one_line

__all__ = ["SequenceCaptureError", "SequenceGraph", "attributes_as_input", "call_args", "capture_sequence", "data_dependent", "example_records", "hinted",
           "hinted_meta", "module_of", "sizes_with", "symbols_in"]

aten = torch.ops.aten


class SequenceCaptureError(RuntimeError):
    """The forward cannot be captured with a symbolic sequence length (the one-line reason)."""


@dataclass
class SequenceGraph:
    """The whole forward as a flat ATen graph with the token ids' sizes symbolic.

    Attributes:
        gm: the graph over a copy of the model (its get_attr targets are the model's parameter and buffer paths;
            constants export lifted are attributes of `gm` itself). Placeholders are the flat input leaves.
        ids_param: the forward's parameter that carries the token ids.
        ids_index: the index of the ids among the flat input leaves (and placeholders).
        leaves: the example's flat input leaves, with the ids as exported.
        out_spec: rebuilds the model's output from the graph's flat outputs.
        dim_symbols: ids dimension -> its size symbol (only the dimensions export kept dynamic).
        max_length: ids dimension -> the largest size the forward accepts (from export's range constraints:
            ``assert t <= block_size``), None when unbounded.
        bound: the example call bound to the forward's signature (defaults applied): a call with other values
            for the other arguments is not the call this graph is.
    """

    gm: fx.GraphModule
    ids_param: str
    ids_index: int
    leaves: list[Any]
    out_spec: Any
    dim_symbols: dict[int, sympy.Symbol]
    max_length: dict[int, int | None]
    bound: dict[str, Any]
    signature: inspect.Signature
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def placeholders(self) -> list[fx.Node]:
        """The graph's inputs as the model takes them (a rewrite's own inputs, added after, are not among them)."""
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"][:len(self.leaves)]

    @property
    def ids_node(self) -> fx.Node:
        return self.placeholders[self.ids_index]

    def size_node(self, dim: int) -> fx.Node:
        """The graph's ``aten.sym_size.int(ids, dim)`` node (added after the placeholders if the graph has none)."""
        ids = self.ids_node
        for user in ids.users:
            if user.op == "call_function" and user.target is aten.sym_size.int and user.args[1:] == (dim,):
                return user
        last = [n for n in self.gm.graph.nodes if n.op == "placeholder"][-1]
        with self.gm.graph.inserting_after(last):
            node = self.gm.graph.call_function(aten.sym_size.int, (ids, dim))
        node.meta["val"] = ids.meta["val"].shape[dim]
        return node


def capture_sequence(model: nn.Module, *args: Any, **kwargs: Any) -> SequenceGraph:
    """Export `model`'s forward with the token ids' dimensions dynamic.

    The token ids are the one integer tensor among the forward's arguments; every other argument is taken as the
    constant it is in the example (None, a flag).

    Raises:
        SequenceCaptureError: no integer token-id argument, other tensor arguments, or export failed (its first
            line, naming the user's code where it stopped).
    """
    from .dropin import quiet, shared_copy

    start = time.perf_counter()
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise SequenceCaptureError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from e
    bound.apply_defaults()
    ids_param = _ids_param(model, bound.arguments)
    ids = bound.arguments[ids_param]
    wide = ids
    for dim, size in enumerate(ids.shape):   # export specialises a size of 1 (or 0) to a constant
        if size < 2:
            wide = wide.repeat_interleave(2, dim) if size == 1 else wide
    if wide.numel() == 0:
        raise SequenceCaptureError(f"the token ids '{ids_param}' are empty")
    call = dict(bound.arguments)
    call[ids_param] = wide
    e_args, e_kwargs = call_args(signature, call)
    dynamic = _dynamic_shapes(signature, ids_param, wide, e_args, e_kwargs)
    copy = shared_copy(model)
    try:
        with quiet(copy), torch.no_grad():
            program = torch.export.export(copy, e_args, e_kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as e:
        raise SequenceCaptureError(f"torch.export could not capture {type(model).__name__} with a symbolic "
                                   f"sequence length: {one_line(e)}") from e
    gm = program.module()
    info = gm.graph._codegen.pytree_info
    leaves = list(fx_pytree.tree_flatten_spec((e_args, e_kwargs), info.in_spec))   # as the graph takes them
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ids_index = next((i for i, leaf in enumerate(leaves) if leaf is wide), None)
    if len(placeholders) != len(leaves) or ids_index is None:
        raise SequenceCaptureError(f"the exported graph of {type(model).__name__} takes its inputs in another "
                                   f"structure than the example ({len(placeholders)} inputs for {len(leaves)})")
    _flatten(gm)
    shape = placeholders[ids_index].meta["val"].shape
    dim_symbols = {d: next(iter(free_symbols(s))) for d, s in enumerate(shape) if not isinstance(s, int)}
    max_length = {}
    for d, sym in dim_symbols.items():
        vr = program.range_constraints.get(sym)
        upper = vr.upper if vr is not None else None
        max_length[d] = int(upper) if upper is not None and upper not in (int_oo, sympy.oo) else None
    return SequenceGraph(gm, ids_param, ids_index, leaves, info.out_spec, dim_symbols, max_length,
                         dict(bound.arguments), signature, time.perf_counter() - start)


def _ids_param(model: nn.Module, arguments: dict[str, Any]) -> str:
    ids, others = [], []
    for name, value in arguments.items():
        if isinstance(value, torch.Tensor):
            (ids if not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
             else others).append(name)
        elif any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value)):
            others.append(name)
    if not ids:
        raise SequenceCaptureError(f"{type(model).__name__}.forward takes no integer tensor of token ids")
    if len(ids) > 1 or others:
        extra = [n for n in ids[1:] + others]
        raise SequenceCaptureError(f"{type(model).__name__}.forward takes tensors besides the token ids "
                                   f"'{ids[0]}' ({', '.join(extra)}): a cache could not tell whether they changed "
                                   f"between calls")
    return ids[0]


def call_args(signature: inspect.Signature, arguments: dict[str, Any]) -> tuple[tuple, dict]:
    """(args, kwargs) that call a function of `signature` with these bound arguments."""
    args, kwargs = [], {}
    for name, p in signature.parameters.items():
        value = arguments[name]
        if p.kind == p.VAR_POSITIONAL:
            args.extend(value)
        elif p.kind == p.VAR_KEYWORD:
            kwargs.update(value)
        elif p.kind == p.KEYWORD_ONLY:
            kwargs[name] = value
        else:
            args.append(value)
    return tuple(args), kwargs


def _dynamic_shapes(signature, ids_param: str, ids: torch.Tensor, args: tuple, kwargs: dict) -> tuple:
    # one entry per top-level input, positional then keyword, as export takes a tuple: only the ids are dynamic
    from torch.export import Dim
    spec = {d: Dim.AUTO for d in range(ids.dim())}
    return tuple(spec if v is ids else None for v in (*args, *kwargs.values()))


def _flatten(gm: fx.GraphModule) -> None:
    """Plain placeholders and a flat output tuple; no export input guards, no dtype assertions (the runtime that
    calls the graph checks what it relies on)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm._forward_pre_hooks.clear()        # export's check of the inputs against the example's structure
    gm._forward_pre_hooks_with_kwargs.clear()
    graph._codegen = fx.graph.CodeGen()
    graph.eliminate_dead_code()
    gm.recompile()


# ---------------------------------------------------------------------------------------------- symbolic sizes

def attributes_as_input(gm: fx.GraphModule) -> tuple[str, ...]:
    """Make `gm`'s graph take what it reads of the module (its get_attr nodes: parameters, buffers, constants) as
    one trailing input tuple, and return their paths, in order.

    A decode step computes one position, so its cost is mostly Python: read through the module, every parameter
    is a chain of ``nn.Module.__getattr__`` calls (about 800 per step for a 12-layer GPT), where the caller
    (`shapeprof.kvcache.IncrementalDecoder`) can look each up once, in its dict."""
    graph = gm.graph
    reads = [n for n in graph.nodes if n.op == "get_attr"]
    if not reads:
        return ()
    *_, last = (n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(last):
        table = graph.placeholder("attributes")
    paths = []
    anchor = table
    for node in reads:   # right after the new input (a get_attr may come before the placeholders)
        with graph.inserting_after(anchor):
            item = anchor = graph.call_function(operator.getitem, (table, len(paths)))
        item.meta.update(node.meta)
        node.replace_all_uses_with(item)
        graph.erase_node(node)
        item._rename(node.name)   # the generated code keeps naming it after the attribute
        paths.append(str(node.target))
    graph.lint()
    gm.recompile()
    return tuple(paths)


def symbols_in(value: Any) -> set:
    """The size symbols a node's value depends on (its shape's, for a tensor; its own, for a SymInt)."""
    if isinstance(value, torch.Tensor):
        return set(free_symbols(tuple(value.shape)))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return set(free_symbols(value))
    if isinstance(value, (list, tuple)):
        return set().union(*(symbols_in(v) for v in value)) if value else set()
    return set()


def sizes_with(value: torch.Tensor, sym) -> list[int]:
    """The dimensions of a tensor value whose size involves `sym` (T, 2*T, B*T ...)."""
    return [d for d, s in enumerate(value.shape) if not isinstance(s, int) and sym in free_symbols(s)]


def hinted(s: Any) -> Any:
    """The example's value of a symbolic size (a plain int as it is)."""
    if isinstance(s, torch.SymInt):
        return int(s.node.hint)
    return s


def hinted_meta(value: torch.Tensor) -> TensorMeta:
    """A TensorMeta of the example's concrete shape and strides."""
    return TensorMeta(tuple(hinted(s) for s in value.shape), value.dtype, tuple(hinted(s) for s in value.stride()))


_SHAPE_OPS = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}


def data_dependent(graph: fx.Graph, sources: list[fx.Node]) -> set[fx.Node]:
    """The nodes whose values depend on the data of `sources` (not only on their sizes)."""
    found = set(sources)
    for node in graph.nodes:
        if node in found or node.op != "call_function" or node.target in _SHAPE_OPS:
            continue
        if any(i in found for i in node.all_input_nodes):
            found.add(node)
    return found


def example_records(node: fx.Node) -> tuple:
    """The ATen op an export node runs, as an `OpRecord` at the example's sizes (() for other nodes)."""
    from .records import OpRecord
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return ()
    args = fx.node.map_arg(node.args, _example_value)
    kwargs = fx.node.map_arg(node.kwargs, _example_value)
    value = node.meta.get("val")
    outs = tuple(hinted_meta(v) for v in (value if isinstance(value, (list, tuple)) else [value])
                 if isinstance(v, torch.Tensor))
    return (OpRecord(node.target, tuple(args), dict(kwargs), outs),)


def _example_value(n: fx.Node) -> Any:
    value = n.meta.get("val")
    if isinstance(value, torch.Tensor):
        return hinted_meta(value)
    if isinstance(value, torch.SymInt):
        return hinted(value)
    return value


def module_of(node: fx.Node) -> tuple[str, str]:
    """(module path, module type name) of the module whose forward made an export node."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, t = next(reversed(stack.values()))
    return path, t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1]
