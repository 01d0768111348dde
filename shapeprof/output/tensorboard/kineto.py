"""Kineto traces (the JSON torch.profiler writes): our costs on a real trace, and a predicted trace made from a Report.

Two things, both plain dicts in the format `torch.profiler` exports (``traceEvents`` of ``ph``/``cat``/``name``/
``pid``/``tid``/``ts``/``dur``/``args``, plus ``schemaVersion``, ``deviceProperties``, ``displayTimeUnit``), so
TensorBoard's PyTorch Profiler tab, Perfetto and Holistic Trace Analysis all open them:

- `annotate_trace` puts ``shapeprof.*`` args (FLOPs, bytes, intensity, bound, predicted time) on the events of a
  real trace: a graph node's ``user_annotation`` range gets its NodeStats, every ATen ``cpu_op`` with recorded shapes
  gets the cost of the op it ran (`OpCoster` rebuilds it on meta tensors and asks the one cost registry);
- `predicted_trace` lays a Report out as the timeline the roofline predicts on its device: per ATen op a ``cpu_op``,
  a ``cudaLaunchKernel`` and a kernel on GPU stream 7, linked by External id and correlation as Kineto links them,
  one ``ProfilerStep#1``, and the spec in ``deviceProperties``.

    >>> import torch, shapeprof
    >>> report = shapeprof.analyze(torch.nn.Linear(1024, 4096), torch.randn(512, 1024), dtype=torch.bfloat16)
    >>> trace = predicted_trace(report)
    >>> [(e["cat"], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X"][2:]
    [('user_annotation', 'linear'), ('cpu_op', 'aten::addmm'), ('runtime', 'cudaLaunchKernel'), ('kernel', 'linear · addmm')]
    >>> [e["args"]["shapeprof.bound"] for e in trace["traceEvents"] if e.get("cat") == "kernel"]
    ['compute']
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from ...costs import has_formula
from ...hardware import DeviceSpec
from ...records import OpRecord, OpRecorder
from ...report import AtenOp, NodeStats, Report
from ...roofline import node_time, record_time

HOST_PID = 1          # the synthetic trace's host process and thread
HOST_TID = 1
GPU_PID = 0           # Kineto puts device N's kernels in process N ...
GPU_STREAM = 7        # ... and the default CUDA stream is tid 7
PROFILER_STEP = "ProfilerStep#1"

# The "Input type" strings torch.profiler writes for tensors (c10's C++ type names).
_DTYPES = {
    "float": torch.float32, "double": torch.float64, "c10::Half": torch.float16, "c10::BFloat16": torch.bfloat16,
    "long int": torch.int64, "int": torch.int32, "short int": torch.int16, "signed char": torch.int8,
    "unsigned char": torch.uint8, "bool": torch.bool, "c10::complex<float>": torch.complex64,
    "c10::complex<double>": torch.complex128, "c10::complex<c10::Half>": torch.complex32,
    "c10::Float8_e4m3fn": torch.float8_e4m3fn, "c10::Float8_e5m2": torch.float8_e5m2,
}


# ------------------------------------------------------------------------------------------------ event args

def node_args(n: NodeStats, spec: DeviceSpec) -> dict[str, Any]:
    """The ``shapeprof.*`` args of a graph node's event: its costs and roofline on `spec`."""
    args = {
        "shapeprof.flops": n.flops,
        "shapeprof.bytes": n.bytes,
        "shapeprof.intensity": _finite(n.intensity),
        "shapeprof.bound": n.bound,
        "shapeprof.predicted_us": _us(n.predicted_seconds),
        "shapeprof.op": n.op,
        "shapeprof.module": n.module_path,
        "shapeprof.output": n.output,
        "shapeprof.spec": spec.name,
    }
    if n.measured_seconds is not None:
        args["shapeprof.measured_us"] = _us(n.measured_seconds)
        args["shapeprof.efficiency"] = _finite(n.efficiency)
    if n.uncovered:   # their FLOPs are unknown, not zero
        args["shapeprof.uncovered"] = list(n.uncovered)
    return args


def aten_op_args(a: AtenOp, spec: DeviceSpec) -> dict[str, Any]:
    """The ``shapeprof.*`` args of one ATen op of a Report node (as `predicted_trace` lays them out)."""
    args = {
        "shapeprof.flops": a.flops,
        "shapeprof.bytes": a.bytes,
        "shapeprof.intensity": _finite(a.flops / a.bytes) if a.bytes else None,
        "shapeprof.bound": aten_op_bound(a, spec),
        "shapeprof.predicted_us": _us(a.seconds),
    }
    if not a.covered:
        args["shapeprof.uncovered"] = [a.op]
    return args


def aten_op_bound(a: AtenOp, spec: DeviceSpec) -> str:
    """'memory', 'compute' or 'none' for an op of a Report.

    An AtenOp keeps only its roofline time max(F/P, M/B), not which roof gave it; M/B is known from its bytes,
    so the op is memory-bound exactly when its time equals M/B.
    """
    if a.seconds == 0:
        return "none"
    memory_seconds = a.bytes / spec.memory_bandwidth
    return "memory" if math.isclose(a.seconds, memory_seconds, rel_tol=1e-9) else "compute"


def records_args(records: Iterable[OpRecord], spec: DeviceSpec, *, tf32: bool = False) -> dict[str, Any]:
    """The ``shapeprof.*`` args of the ATen op records one profiler event ran, costed by the one registry."""
    flops = nbytes = 0
    ops, uncovered = [], []
    for rec in records:
        cost, t = record_time(rec, spec, tf32=tf32)
        ops.append((cost, t))
        flops += cost.flops
        nbytes += cost.bytes
        if not cost.covered:
            uncovered.append(rec.name)
    t = node_time(ops, spec)
    args = {
        "shapeprof.flops": flops,
        "shapeprof.bytes": nbytes,
        "shapeprof.intensity": _finite(flops / nbytes) if nbytes else None,
        "shapeprof.bound": t.bound,
        "shapeprof.predicted_us": _us(t.seconds),
    }
    if uncovered:
        args["shapeprof.uncovered"] = sorted(set(uncovered))
    return args


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 6)   # picosecond resolution: tiny ops keep a nonzero time


def _finite(x: float | None) -> float | None:
    # JSON has no Infinity/NaN (Perfetto and the browser's JSON.parse reject them): a node that moves no
    # bytes has no intensity to report.
    if x is None or not math.isfinite(x):
        return None
    return round(x, 6)


# ------------------------------------------------------------------------------------------------ real traces

class OpCoster:
    """Costs of the ATen ``cpu_op`` events of a torch.profiler trace recorded with ``record_shapes=True``.

    The event only names its op and lists its inputs ("Input Dims", "Input type", "Input Strides",
    "Concrete Inputs"), so the op is rebuilt: meta tensors of those shapes, dtypes and strides, scalars parsed,
    the overload whose schema takes them, run on meta under an `OpRecorder`. An op with a cost formula of its own
    (addmm, linear, scaled_dot_product_attention ...) is costed whole with the outputs the replay produced; a
    composite op without one (it decomposes when dispatched) is costed as the ATen ops it ran.

    A composite op's event encloses its children's events (``aten::linear`` around ``aten::t`` and
    ``aten::addmm``), and each event gets its own cost: the parent's includes its children's. Summing
    ``shapeprof.flops`` over all events therefore counts nested work more than once; sum the outermost ops, or the
    graph nodes, instead.

    Results are cached by (name, shapes, dtypes, strides, scalars): a model of 126 identical layers replays each
    distinct op once.

        >>> import torch
        >>> event = {"name": "aten::mm", "args": {"Input Dims": [[8, 16], [16, 32]], "Input type": ["float", "float"],
        ...          "Input Strides": [[16, 1], [32, 1]], "Concrete Inputs": ["", ""]}}
        >>> from shapeprof.hardware import get_spec
        >>> OpCoster(get_spec()).args_for(event)["shapeprof.flops"]   # 2 * 8*16*32
        8192
    """

    def __init__(self, spec: DeviceSpec, *, tf32: bool = False):
        self.spec, self.tf32 = spec, tf32
        self._cache: dict[str, dict[str, Any]] = {}

    def args_for(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        """``shapeprof.*`` args for one trace event; None for an event that is not an ATen op with shapes."""
        name, args = event.get("name", ""), event.get("args") or {}
        if not name.startswith("aten::") or "Input Dims" not in args:
            return None
        key = json.dumps([name, args.get("Input Dims"), args.get("Input type"), args.get("Input Strides"),
                          args.get("Concrete Inputs")])
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._cost(name, args)
        return hit

    def _cost(self, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
        try:
            records = replay(name, args)
        except _NotReplayable as e:
            # Never a silent 0: the event says why it has no cost.
            return {"shapeprof.uncosted": str(e)}
        out = records_args(records, self.spec, tf32=self.tf32)
        types = args.get("Input type") or []
        if "TensorList" in types and not any(t in _DTYPES for t in types):
            out["shapeprof.note"] = "the profiler records no dtypes for a list of tensors: float32 assumed"
        return out


class _NotReplayable(Exception):
    pass


def replay(name: str, args: Mapping[str, Any]) -> tuple[OpRecord, ...]:
    """The ATen op records of one profiler event's op, rebuilt on meta tensors from its recorded inputs."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        raise _NotReplayable(f"no ATen op {name}")
    inputs = _event_inputs(args)
    failures = []
    for overload in _overloads_taking(packet, len(inputs)):
        try:
            positional, keywords = _bind_inputs(overload, inputs)
        except (ValueError, SyntaxError, TypeError) as e:
            failures.append(f"{overload.__name__}: {e}")
            continue
        recorder = OpRecorder()
        try:
            with torch.no_grad(), recorder:
                out = overload(*positional, **keywords)
        except Exception as e:   # the wrong overload for these inputs, or an op meta tensors cannot run
            failures.append(f"{overload.__name__}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if has_formula(overload) or not recorder.records:
            return (OpRecord.of(overload, positional, keywords, out),)
        return tuple(recorder.records)
    raise _NotReplayable(f"cannot rebuild {name} from its recorded inputs on meta tensors"
                         + (f" ({failures[0]})" if failures else f" (no overload takes {len(inputs)} inputs)"))


@dataclass(frozen=True)
class _Input:
    dims: Any
    type: str
    strides: Any
    concrete: str


def _event_inputs(args: Mapping[str, Any]) -> list[_Input]:
    dims = args.get("Input Dims") or []
    n = len(dims)
    types = args.get("Input type") or [""] * n
    strides = args.get("Input Strides") or [[]] * n
    concrete = args.get("Concrete Inputs") or [""] * n
    return [_Input(d, t, s, c) for d, t, s, c in zip(dims, types, strides, concrete)]


def _overloads_taking(packet, n: int):
    for name in packet.overloads():
        overload = getattr(packet, name)
        if len(overload._schema.arguments) == n:
            yield overload


def _bind_inputs(overload, inputs: list[_Input]) -> tuple[list, dict]:
    positional, keywords = [], {}
    tensor_dtype = next((_DTYPES[i.type] for i in inputs if i.type in _DTYPES), torch.float32)
    for arg, value in zip(overload._schema.arguments, inputs):
        v = _value(arg, value, tensor_dtype)
        if arg.kwarg_only:
            keywords[arg.name] = v
        else:
            positional.append(v)
    return positional, keywords


def _value(arg, inp: _Input, tensor_dtype: torch.dtype) -> Any:
    kind = str(arg.type)
    if "Device" in kind:
        return "meta"    # the replay runs on meta, whatever device the event ran on
    if inp.type in _DTYPES:
        return _meta_tensor(inp.dims, inp.strides, _DTYPES[inp.type])
    if inp.type == "TensorList":
        # The profiler records a list's shapes but not its dtypes: take the event's first typed tensor's
        # dtype (cat of bf16 tensors beside a bf16 input), else float32. Bytes may be off for mixed lists.
        return [_meta_tensor(d, s, tensor_dtype) for d, s in zip(inp.dims, inp.strides or [[]] * len(inp.dims))]
    if inp.concrete == "":
        # Not recorded (None, or a value the profiler does not print, such as gelu's approximate="tanh"):
        # the schema default stands in for it.
        return arg.default_value if arg.has_default_value() else None
    return _scalar(inp.concrete)


def _meta_tensor(dims, strides, dtype: torch.dtype) -> torch.Tensor:
    if strides and len(strides) == len(dims):
        return torch.empty_strided(dims, strides, dtype=dtype, device="meta")
    return torch.empty(dims, dtype=dtype, device="meta")


def _scalar(text: str) -> Any:
    """'1' -> 1, '0.' -> 0.0, 'True' -> True, '[2, 3]' -> [2, 3]; a dtype is its ScalarType code (what the
    profiler prints and what ATen's schemas take); anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def annotate_trace(trace: Mapping[str, Any], *, nodes: Mapping[str, NodeStats], spec: DeviceSpec,
                   coster: OpCoster | None = None, torch_flops: Mapping[int, int] | None = None) -> dict[str, Any]:
    """A copy of a real trace with ``shapeprof.*`` args on graph-node ranges and ATen ops.

    Args:
        trace: the trace as torch.profiler wrote it (``json.load`` of ``export_chrome_trace``'s file).
        nodes: NodeStats by node name; a ``user_annotation`` event of that name gets `node_args`.
        spec: the device the node figures were computed for (named in the args).
        coster: costs ATen ``cpu_op`` events (default: a new `OpCoster` on `spec`).
        torch_flops: PyTorch's own FLOP count by event External id (``FunctionEvent.id`` -> ``.flops`` from
            ``prof.events()`` with ``with_flops=True``), added as ``shapeprof.torch_flops`` beside ours.
    """
    coster = coster or OpCoster(spec)
    events = []
    for event in trace.get("traceEvents", []):
        extra = _extra_args(event, nodes, spec, coster, torch_flops)
        if extra:
            event = {**event, "args": {**(event.get("args") or {}), **extra}}
        events.append(event)
    return {**trace, "traceEvents": events}


def _extra_args(event, nodes, spec, coster, torch_flops) -> dict[str, Any] | None:
    if event.get("ph") != "X":
        return None
    cat = str(event.get("cat", "")).lower()
    if cat == "user_annotation" and event.get("name") in nodes:
        return node_args(nodes[event["name"]], spec)
    if cat not in ("cpu_op", "operator"):
        return None
    extra = coster.args_for(event)
    if torch_flops:
        flops = torch_flops.get((event.get("args") or {}).get("External id"))
        if flops:
            extra = {**(extra or {}), "shapeprof.torch_flops": flops}
    return extra


# ------------------------------------------------------------------------------------------------ predicted

def predicted_trace(report: Report, *, start_us: float = 1.0) -> dict[str, Any]:
    """The timeline `report` predicts on its device, as a Kineto trace.

    One ``ProfilerStep#1`` holds the forward. Each graph node is a ``user_annotation`` range named after it
    (as `record_function(node.name)` names it in a measured run) carrying `node_args`; inside it each of the
    node's ATen ops is a ``cpu_op`` that launches (``runtime`` ``cudaLaunchKernel``) one kernel on stream 7 of
    device 0, linked by ``External id`` and ``correlation``. Kernels run back to back for their predicted time;
    the host side is drawn in step with them (the roofline has no launch overhead to model). Kernels are named
    ``"<module pattern> · <op>"`` (``layers.*.attention.wq · mm``) so that the Kernel view sums an op over a
    model's identical layers; where one pattern covers ops of different cost, by ``"<node> · <op>"``.
    """
    spec = report.spec
    timeline = _Timeline(start_us, _mixed_patterns(report), report.patterns)
    for n in report.nodes:
        timeline.node(n, spec)
    # The step starts 1 ns before the first kernel: the profiler plugin's step breakdown counts host and runtime
    # time on top of kernel time when kernels fill a step completely (it then takes the empty list of uncovered
    # slots for "nothing counted yet"), which would show a predicted step as 100% kernel and 100% CPU.
    step = _x("user_annotation", PROFILER_STEP, HOST_PID, HOST_TID, timeline.start_ns - 1, timeline.now_ns,
              {"External id": 0})
    # The recording window, as Kineto writes it. The profiler plugin buckets GPU utilization over this window
    # in whole microseconds and fails on a window under 1 us, which a tiny model's prediction is: the window
    # (not the step, so utilization stays that of the step) is padded to 1 us.
    window = _x("Trace", "PyTorch Profiler (0)", "Spans", "PyTorch Profiler", timeline.start_ns - 1,
                max(timeline.now_ns, timeline.start_ns + 1000), {"Op count": 0})
    return {
        "schemaVersion": 1,
        "deviceProperties": [device_properties(spec)],
        "displayTimeUnit": "ms",
        "traceName": f"shapeprof prediction: {report.model} on {spec.display_name}",
        "shapeprof": summary(report, "predicted"),
        "traceEvents": _metadata(spec) + [window, step] + timeline.events,
    }


def device_properties(spec: DeviceSpec) -> dict[str, Any]:
    """Kineto's ``deviceProperties`` entry for `spec` (what the Overview's GPU summary shows)."""
    return {"id": 0, "name": spec.display_name, "totalGlobalMem": int(spec.memory_capacity), "numSms": spec.sm_count}


def summary(report: Report, kind: str) -> dict[str, Any]:
    """A top-level ``shapeprof`` entry: which model, device and totals a trace belongs to."""
    t = report.total
    out = {"kind": kind, "model": report.model, "spec": report.spec.name, "dtype": report.dtype,
           "inputs": list(report.inputs), "flops": t.flops, "bytes": t.bytes,
           "predicted_us": _us(t.predicted_seconds)}
    if t.measured_seconds is not None:
        out["measured_us"] = _us(t.measured_seconds)
    return out


def _mixed_patterns(report: Report) -> set[tuple[str, str]]:
    """(module pattern, op) pairs that stand for ops of different cost: the two `mul`s of one attention module, say.
    Their kernels are named after their nodes, so the Kernel view never sums ops that are not twins."""
    costs: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for n in report.nodes:
        for a in n.aten:
            costs.setdefault((report.pattern_of(n), a.op), set()).add((a.flops, a.bytes))
    return {key for key, seen in costs.items() if len(seen) > 1}


class _Timeline:
    """Lays nodes out back to back in integer nanoseconds (no drift from adding float microseconds)."""

    def __init__(self, start_us: float, mixed: set[tuple[str, str]], patterns: dict[str, str]):
        self.mixed, self.patterns = mixed, patterns
        self.start_ns = self.now_ns = round(start_us * 1000)
        self.events: list[dict[str, Any]] = []
        self.external_id = 0
        self.correlation = 0

    def node(self, n: NodeStats, spec: DeviceSpec) -> None:
        begin = self.now_ns
        self.external_id += 1
        annotation = _x("user_annotation", n.name, HOST_PID, HOST_TID, begin, begin,
                        {"External id": self.external_id, **node_args(n, spec)})
        self.events.append(annotation)
        for a in n.aten:
            self.op(n, a, spec)
        annotation["dur"] = _ts(self.now_ns) - annotation["ts"]

    def op(self, n: NodeStats, a: AtenOp, spec: DeviceSpec) -> None:
        # A zero-time op (an uncovered op that moves no bytes) still launches a kernel: 1 ns keeps it visible.
        begin, end = self.now_ns, self.now_ns + max(1, round(a.seconds * 1e9))
        self.external_id += 1
        self.correlation += 1
        ext, corr = self.external_id, self.correlation
        costs = {**aten_op_args(a, spec), "shapeprof.node": n.name}
        op_name = a.op.replace(".", "::", 1)            # aten.addmm -> aten::addmm, as the profiler names it
        short = a.op.split(".", 1)[-1]
        pattern = self.patterns.get(n.module_path, n.module_path)
        group = pattern if pattern and (pattern, a.op) not in self.mixed else n.name
        self.events += [
            _x("cpu_op", op_name, HOST_PID, HOST_TID, begin, end, {"External id": ext, **costs}),
            # the roofline models no launch overhead: the launch takes no time
            _x("runtime", "cudaLaunchKernel", HOST_PID, HOST_TID, begin, begin,
               {"External id": ext, "correlation": corr}),
            _x("kernel", f"{group} · {short}", GPU_PID, GPU_STREAM, begin, end,
               {"External id": ext, "correlation": corr, "device": 0, "stream": GPU_STREAM, **costs}),
            # flow arrows from the launch to its kernel (Perfetto and the Trace view draw them)
            {"ph": "s", "id": corr, "pid": HOST_PID, "tid": HOST_TID, "ts": _ts(begin), "cat": "ac2g",
             "name": "ac2g"},
            {"ph": "f", "id": corr, "pid": GPU_PID, "tid": GPU_STREAM, "ts": _ts(begin), "cat": "ac2g",
             "name": "ac2g", "bp": "e"},
        ]
        self.now_ns = end


def _x(cat: str, name: str, pid: int | str, tid: int | str, begin_ns: int, end_ns: int, args: dict) -> dict[str, Any]:
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": _ts(begin_ns),
            "dur": _ts(end_ns) - _ts(begin_ns), "args": args}


def _ts(ns: int) -> float:
    return ns / 1000   # Kineto's unit is the microsecond, with nanosecond decimals


def _metadata(spec: DeviceSpec) -> list[dict[str, Any]]:
    def meta(name, pid, tid, args):
        return {"ph": "M", "name": name, "pid": pid, "tid": tid, "ts": 0, "args": args}
    return [
        meta("process_name", HOST_PID, 0, {"name": "host (predicted)"}),
        meta("process_labels", HOST_PID, 0, {"labels": "CPU"}),
        meta("thread_name", HOST_PID, HOST_TID, {"name": "thread 1 (predicted launches)"}),
        meta("process_name", GPU_PID, 0, {"name": f"GPU 0 ({spec.display_name}, predicted)"}),
        meta("process_labels", GPU_PID, 0, {"labels": f"GPU 0 {spec.display_name}"}),
        meta("thread_name", GPU_PID, GPU_STREAM, {"name": f"stream {GPU_STREAM}"}),
        meta("process_sort_index", "Spans", 0, {"sort_index": 536870912}),
    ]


def dumps(trace: Mapping[str, Any]) -> str:
    """The trace as strict JSON (no NaN or Infinity, which trace viewers reject)."""
    return json.dumps(trace, allow_nan=False, separators=(",", ":"))
