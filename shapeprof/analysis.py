"""analyze(): capture a model, cost every node, hold it against a device's roofline, return a Report."""
from __future__ import annotations

import os
import time
import warnings
from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .capture import (Capture, CapturedNode, InputShape, capture, collector_paused, source_location, target_name,
                      unwrap)
from .costs import ATTENTION_OPS, cost_of
from .findings import find
from .hardware import DeviceSpec, SpecError, get_spec
from .expert_loop import loop_stand_ins
from .moe import of_model as moe_of_model
from .moe import (BALANCED, MoERoutingError, data_dependent_routing, expert_reads_finding, expert_reads_note,
                  routing_top_k, step_weight_bytes, tokens_routed, with_tokens)
from .routing import as_routing
from .phases import is_phase
from .phases import resolve as resolve_phase
from .precision import Precision, quantise
from .precision import resolve as resolve_precision
from .records import OpRecord, TensorMeta
from .report import AtenOp, CaptureInfo, Coverage, NodeStats, Report, Totals, UncoveredOp
from .roofline import compute_dtype, node_time, op_time

META_KEY = "shapeprof"   # node.meta[META_KEY] holds the node's NodeStats after analysis


class UncoveredOpError(RuntimeError):
    """strict=True and some ATen ops have no cost formula."""


@collector_paused()   # no garbage collection while it runs: see capture.collector_paused
def analyze(model: nn.Module, *args: Any, spec: str | DeviceSpec | None = None,
            dtype: torch.dtype | str | None = None, strict: bool = False, method: str = "auto", tf32: bool = False,
            train: bool | Any = False, routing: Any = None, **kwargs: Any) -> Report:
    """Trace `model` on its example inputs and say where the time goes on a GPU, and why.

    Counting convention: 1 multiply-add = 2 FLOPs; causal attention counts the half of the score matrix that is
    computed; views and reshapes move 0 bytes; every other op reads its inputs and writes its outputs once
    (see `shapeprof.costs.FLOP_CONVENTION`). Predicted time per op is max(FLOPs / peak, bytes / bandwidth).

        >>> import torch, shapeprof
        >>> r = shapeprof.analyze(torch.nn.Linear(1024, 4096), torch.randn(1, 1024), dtype=torch.bfloat16)
        >>> r.nodes[0].bound, round(r.nodes[0].intensity, 2)
        ('memory', 1.0)

    Args:
        model: any nn.Module (on any device, meta included); it is not run, moved or changed.
        *args, **kwargs: example inputs, as the model's forward takes them (tensors, `InputShape`s, other values);
            or one `shapeprof.Decode(batch, context)` / `shapeprof.Prefill(batch, tokens)` alone, for an LLM's
            step with a cache of that length (`shapeprof.phases`; the report's `phase` splits its bytes).
            `spec`, `dtype`, `strict`, `method` and `tf32` are this function's own and not passed on.
        spec: device to hold the model against: a built-in name (`shapeprof.list_specs()`), a TOML/JSON spec
            file or a DeviceSpec. Default: A100-80GB SXM.
        dtype: analyse as if parameters and floating inputs were in this dtype (bytes and peaks follow it): a
            torch.dtype or a name `shapeprof specs` uses ("bf16", "fp16", "fp32", "tf32", "fp8", "int8"). 8-bit
            formats price a W8A8 quantised model: matmul-class ops in 8 bits, the rest in bf16
            (`shapeprof.precision`).
        strict: raise `UncoveredOpError` if any op has no cost formula, instead of listing it in `coverage`.
        method: "auto" (symbolic_trace, then export, then dispatch) or one of those.
        tf32: fp32 matmuls run on tensor cores in TF32 (as with torch.backends.cuda.matmul.allow_tf32).
        train: True or a `shapeprof.Train(optimizer=..., loss_fn=..., targets=...)`: also price the whole training
            step (forward, backward of the loss, the optimizer's update) into `report.training`, `report.phases`
            and `report.memory` (`shapeprof.training`); the nodes stay the forward's.
        routing: for a mixture-of-experts model, how its tokens split over the experts: "balanced" (the default,
            assumed), `shapeprof.measure_routing(model, *inputs)` (counted in a real forward), or loads per expert
            (one list for every layer, or {layer path: list}; `shapeprof.Routing.given`). `report.moe` says which.

    Returns:
        A `Report`.
    """
    start = time.perf_counter()
    device = get_spec(spec)
    precision = resolve_precision(dtype, tf32)
    target, resolved = model, None
    if train and len(args) == 1 and not kwargs and is_phase(args[0]):
        raise ValueError("train= prices a training step, and a Prefill/Decode phase is an inference step: give the "
                         "model example inputs (and targets) instead")
    training = _training_step(model, args, kwargs, train, device, dtype) if train else None
    if len(args) == 1 and not kwargs and is_phase(args[0]):   # Decode(batch, context) / Prefill(batch, tokens)
        resolved = resolve_phase(model, args[0], precision.dtype)
        target, args, kwargs = resolved.module, resolved.args, resolved.kwargs
        method = resolved.method if method == "auto" else method
    routing = as_routing(routing)
    inner = unwrap(model)   # torch.compile's wrapper: MoE layer paths are the module's own, as capture sees them
    moe_info, moe_notes = moe_of_model(inner, precision.matmul_dtype or precision.dtype,
                                       routing if routing.source != BALANCED else None)
    if moe_info is None and routing.source != BALANCED:
        raise ValueError(f"routing= is for mixture-of-experts models, and {type(model).__name__} has no MoE block "
                         f"(a module with `experts` and a `gate` or `router` with one row per expert)")

    def capture_and_cost(stand_ins=None):
        with warnings.catch_warnings():
            if resolved is not None:   # torch's own pytree deprecation, from copying an exported graph
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            with data_dependent_routing(moe_info):   # a loop over experts: one line naming the MoE block
                cap = capture(target, *args, method=method, dtype=precision.dtype, stand_ins=stand_ins, **kwargs)
        costed = _NodeCoster(device, precision)
        with routing_top_k(moe_info), data_dependent_routing(moe_info):   # grouped matmuls read each layer's top_k
            return cap, costed, [(cn, costed(cn.records)) for cn in cap.nodes if cn.records]
    try:
        cap, costed, rows = capture_and_cost()
    except MoERoutingError:
        # a loop over experts meta cannot run (or that ran to sizes no one knows): run it with each expert's rows
        # fixed by the routing instead
        makers = loop_stand_ins(inner, moe_info) if unwrap(target) is inner else None
        if makers is None:
            raise
        cap, costed, rows = capture_and_cost(makers)
        moe_notes.append(f"loop over experts in {', '.join(repr(p) for p in makers)}: meta cannot run it (which "
                         f"tokens reach an expert is data); priced with each expert's rows fixed by the "
                         f"{moe_info.routing} routing, tokens x top_k rows in all (shapeprof.expert_loop)")
    rows = [(cn, c) for cn, c in rows if c.flops or c.bytes_read or c.bytes_written or c.uncovered]
    total_seconds = sum(c.time.seconds * cn.repeats for cn, c in rows)
    nodes = [_node_stats(cn, c, total_seconds) for cn, c in rows]
    for cn, stats in zip((cn for cn, _ in rows), nodes):
        cn.node.meta[META_KEY] = stats
    total = Totals(sum(n.flops for n in nodes), sum(n.bytes_read for n in nodes),
                   sum(n.bytes_written for n in nodes), total_seconds,
                   sum(n.compute_seconds for n in nodes), sum(n.memory_seconds for n in nodes))
    coverage = _coverage(nodes, total.bytes)
    if strict and not coverage.complete:
        listed = ", ".join(f"{o.op} ({o.count}x, first at node '{o.first_node}')" for o in coverage.ops)
        raise UncoveredOpError(f"no cost formula for: {listed}")
    records_of = {cn.node.name: cn.records for cn, _ in rows}
    notes = [*cap.notes, *([precision.note] if precision.note else []), *costed.notes(nodes),
             *(resolved.notes if resolved else []), *moe_notes]
    weights_dtype = precision.matmul_dtype or precision.dtype
    info = resolved.info(model, weights_dtype, total.bytes, cap) if resolved else None
    if info is not None and moe_info is not None:   # a step reads the experts its tokens pick, not every one
        info = replace(info, weight_bytes=step_weight_bytes(moe_info, info.weight_bytes, info.tokens_per_step))
        notes.append(expert_reads_note(moe_info, info.tokens_per_step))
    findings = find(nodes, records_of, total_seconds, device, producers={
        cn.node.name: cn.node.all_input_nodes[0].name for cn, _ in rows if cn.node.all_input_nodes})
    if info is not None and moe_info is not None and info.kind == "decode":
        moe_finding = expert_reads_finding(moe_info, nodes, info.tokens_per_step)
        findings = [moe_finding, *findings] if moe_finding is not None else findings
    report = Report(
        model=type(model).__name__, spec=device, dtype=_precision_name(precision),
        inputs=(info.describe(),) if info else _describe_inputs(args, kwargs, precision.dtype),
        capture=_capture_info(cap), nodes=nodes, total=total,
        coverage=coverage, findings=findings,
        parameter_bytes=_parameter_bytes(model, weights_dtype), notes=tuple(notes),
        phase=info, training=training, moe=with_tokens(moe_info, tokens_routed(cap, moe_info)) if moe_info else None,
        analysis_seconds=time.perf_counter() - start, graph_capture=cap)
    return report


def _training_step(model: nn.Module, args: tuple, kwargs: dict, train: Any, device: DeviceSpec, dtype):
    """`train` (True or a Train) priced as a whole step, as Report.training keeps it."""
    from .training import as_train, train_step
    train = as_train(model, train)
    return train_step(model, *args, optimizer=train.optimizer, optimizer_kwargs=train.optimizer_kwargs,
                      loss_fn=train.loss_fn, targets=train.targets, spec=device, dtype=dtype,
                      checkpoint=train.checkpoint, autocast=train.autocast, model_kwargs=kwargs).summary()


class _NodeCosts:
    """What a tuple of op records costs; computed once per distinct tuple (twins share theirs)."""

    __slots__ = ("flops", "bytes_read", "bytes_written", "time", "aten", "uncovered")

    def __init__(self, flops, bytes_read, bytes_written, time, aten, uncovered):
        self.flops, self.bytes_read, self.bytes_written = flops, bytes_read, bytes_written
        self.time, self.aten, self.uncovered = time, aten, uncovered


class _NodeCoster:
    def __init__(self, spec: DeviceSpec, precision: Precision):
        self.spec, self.precision = spec, precision
        self.cache: dict[int, tuple[tuple[OpRecord, ...], _NodeCosts]] = {}
        self.op_cache: dict[tuple, tuple] = {}    # one record's (cost, time) by what it is: a model's repeated
        self.missing_peaks: dict[str, str] = {}   # dtype -> the peak used instead
        self.attention = False

    def __call__(self, records: tuple[OpRecord, ...]) -> _NodeCosts:
        hit = self.cache.get(id(records))
        if hit is not None and hit[0] is records:
            return hit[1]
        ops, aten, uncovered = [], [], []
        flops = bytes_read = bytes_written = 0
        for rec in records:
            cost, t = self._cost(rec)
            ops.append((cost, t))
            flops += cost.flops
            bytes_read += cost.bytes_read
            bytes_written += cost.bytes_written
            if cost.flops or cost.bytes or not cost.covered:
                aten.append(AtenOp(rec.name, cost.flops, cost.bytes, t.seconds, cost.covered))
            if not cost.covered:
                uncovered.append(rec.name)
        result = _NodeCosts(flops, bytes_read, bytes_written, node_time(ops, self.spec), tuple(aten),
                            tuple(dict.fromkeys(uncovered)))
        self.cache[id(records)] = (records, result)
        return result

    def _cost(self, rec: OpRecord):
        # layers repeat: a record of the same op on the same shapes (and arguments) costs what the first did
        try:
            key = (rec.op, _frozen(rec.args), _frozen(rec.kwargs) if rec.kwargs else (), rec.outputs)
            hit = self.op_cache.get(key)
        except TypeError:   # an argument that cannot be a key (an unhashable value): priced on its own
            return self._price(rec)
        if hit is None:
            hit = self.op_cache[key] = self._price(rec)
        return hit

    def _price(self, rec: OpRecord):
        cost = cost_of(rec)
        dtype = compute_dtype(rec.input_metas(), rec.outputs)
        attention = rec.name in ATTENTION_OPS
        self.attention |= attention
        if self.precision.matmul_dtype is not None and cost.matmul and not attention:
            rec = quantise(rec, self.precision.matmul_dtype)
            cost, dtype = cost_of(rec), self.precision.matmul_dtype
        try:
            return cost, op_time(cost, dtype, self.spec, tf32=self.precision.tf32)
        except SpecError:
            # a spec without this format's peak (fp64 on a calibrated CPU spec): never fail the analysis for it;
            # price at the fp32 roof and say so
            self.missing_peaks[str(dtype).removeprefix("torch.")] = "fp32"
            return cost, op_time(cost, torch.float32, self.spec, tf32=self.precision.tf32)

    def notes(self, nodes: list[NodeStats]) -> list[str]:
        notes = []
        if self.attention:
            notes.append(f"attention is priced as the one fused kernel {self.spec.display_name} runs for it "
                         f"(flash / memory-efficient attention): q, k, v, the output and any mask are moved once, "
                         f"the score matrix is never written to memory")
        for dtype, used in self.missing_peaks.items():
            notes.append(f"{self.spec.name} has no {dtype} peak: {dtype} ops are priced at its {used} peak "
                         f"(their predicted time is then optimistic)")
        return notes


_CONTAINERS = (list, tuple, dict)


def _frozen(x):
    """A hashable stand-in for an op's arguments: lists as tuples, dicts as their sorted items (leaves as they
    are: this runs once per op record, so it calls itself only for containers)."""
    if type(x) is dict:
        return tuple(sorted((k, v if type(v) not in _CONTAINERS else _frozen(v)) for k, v in x.items()))
    return tuple(v if type(v) not in _CONTAINERS else _frozen(v) for v in x)


def _node_stats(cn: CapturedNode, c: _NodeCosts, total_seconds: float) -> NodeStats:
    node = cn.node
    t = c.time
    k = cn.repeats     # a folded loop step stands for k calls: its costs are the totals over them
    aten = c.aten if k == 1 else tuple(replace(a, flops=a.flops * k, bytes=a.bytes * k, seconds=a.seconds * k)
                                       for a in c.aten)
    return NodeStats(
        name=node.name, op=_op_name(cn), kind=node.op, module_path=cn.module_path, module_type=cn.module_type,
        flops=c.flops * k, bytes_read=c.bytes_read * k, bytes_written=c.bytes_written * k,
        predicted_seconds=t.seconds * k, compute_seconds=t.compute_seconds * k, memory_seconds=t.memory_seconds * k,
        bound=t.bound, ridge=t.ridge, share=t.seconds * k / total_seconds if total_seconds else 0.0,
        output=describe_meta(cn.output), aten=aten, uncovered=c.uncovered, source=_basename(source_location(node)),
        twin_of=cn.twin_of, repeats=k)


def _op_name(cn: CapturedNode) -> str:
    node = cn.node
    return cn.module_type if node.op == "call_module" else target_name(node)


_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "bool", torch.float8_e4m3fn: "f8e4m3", torch.float8_e5m2: "f8e5m2",
          torch.complex64: "c64"}


def describe_meta(meta: TensorMeta | None) -> str:
    """'bf16[1, 2048, 4096]'."""
    if meta is None:
        return ""
    return f"{_SHORT.get(meta.dtype, str(meta.dtype).removeprefix('torch.'))}[{', '.join(map(str, meta.shape))}]"


def _basename(location: str) -> str:
    return os.path.basename(location)


def _precision_name(precision: Precision) -> str | None:
    if precision.dtype is None:
        return None
    return precision.name if precision.matmul_dtype is not None else str(precision.dtype).removeprefix("torch.")


def _describe_inputs(args: tuple, kwargs: dict, dtype: torch.dtype | None) -> tuple[str, ...]:
    out = []
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, (torch.Tensor, InputShape)):
            d = leaf.dtype
            if dtype is not None and d.is_floating_point:
                d = dtype
            out.append(describe_meta(TensorMeta(tuple(leaf.shape), d, ())))
        else:
            text = repr(leaf)
            out.append(text if len(text) <= 40 else text[:37] + "...")
    return tuple(out)


def _parameter_bytes(model: nn.Module, dtype: torch.dtype | None) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = dtype.itemsize if dtype is not None and p.is_floating_point() else p.element_size()
        total += p.numel() * size
    return total


def _coverage(nodes: list[NodeStats], total_bytes: int) -> Coverage:
    count: dict[str, int] = defaultdict(int)
    nbytes: dict[str, int] = defaultdict(int)
    first: dict[str, str] = {}
    for n in nodes:
        for a in n.aten:
            if not a.covered:
                count[a.op] += n.repeats
                nbytes[a.op] += a.bytes
                first.setdefault(a.op, n.name)
    ops = [UncoveredOp(op, count[op], nbytes[op], nbytes[op] / total_bytes if total_bytes else 0.0, first[op])
           for op in sorted(count, key=lambda o: -nbytes[o])]
    return Coverage(tuple(ops))


def _capture_info(cap: Capture) -> CaptureInfo:
    return CaptureInfo(cap.method, tuple(cap.attempts), len(cap.nodes), cap.reused, cap.seconds,
                       sum(cn.repeats - 1 for cn in cap.nodes))

