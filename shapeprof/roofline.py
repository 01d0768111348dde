"""Roofline: hold each op and each node against a device's two roofs.

An op doing `F` FLOPs and moving `M` bytes cannot finish faster than ``max(F / P, M / B)``, where `P` is the
device's peak for the op's number format (tensor cores for matmul-class ops, vector units for the rest) and
`B` its memory bandwidth. Its intensity is ``F / M``; below the ridge ``P / B`` it is memory-bound.

A node that dispatched several ATen ops (an ``nn.MultiheadAttention`` leaf, a ``Linear`` that became
``t`` + ``addmm``) runs them as separate kernels, so its predicted time is the *sum* of its ops' roofline times;
for a one-op node that is exactly ``max(F / P, M / B)``.

    >>> import torch
    >>> from shapeprof.hardware import get_spec
    >>> from shapeprof.costs import OpCost
    >>> t = op_time(OpCost(2 * 512 * 1024 * 4096, 0, 0, True, True), torch.bfloat16, get_spec())
    >>> t.bound, round(t.seconds * 1e6, 2)      # 4.3 GFLOP at 312 TFLOP/s
    ('compute', 13.77)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .costs import OpCost, cost_of
from .hardware import DeviceSpec


@dataclass(frozen=True, slots=True)
class OpTime:
    """One op's roofline: the time each roof allows, and which one binds."""

    compute_seconds: float
    memory_seconds: float
    peak_flops: float        # the roof used for this op's FLOPs

    @property
    def seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def bound(self) -> str:
        """'compute' or 'memory'; an op with no FLOPs and no bytes is 'none'."""
        if self.compute_seconds == 0 and self.memory_seconds == 0:
            return "none"
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"


def op_time(cost: OpCost, dtype: torch.dtype, spec: DeviceSpec, *, tf32: bool = False) -> OpTime:
    """Roofline time of one op whose FLOPs run in `dtype` on `spec`."""
    peak = spec.peak_for(dtype, matmul=cost.matmul, tf32=tf32)
    return OpTime(cost.flops / peak, (cost.bytes_read + cost.bytes_written) / spec.memory_bandwidth, peak)


def achievable_time(cost: OpCost, dtype: torch.dtype, spec: DeviceSpec, *, tf32: bool = False) -> float:
    """One op's time as real kernels run it: max(the spec's latency floor, FLOPs / achieved peak, bytes / achieved
    bandwidth), each measured figure falling back to the datasheet's where the spec has none. An op that moves
    nothing (a view) launches no kernel and pays no floor."""
    if not (cost.flops or cost.bytes_read or cost.bytes_written):
        return 0.0
    peak = spec.achieved_peak(spec.peak_key(dtype, matmul=cost.matmul, tf32=tf32))
    bandwidth = spec.achieved_bandwidth or spec.memory_bandwidth
    return max(spec.kernel_latency, cost.flops / peak, (cost.bytes_read + cost.bytes_written) / bandwidth)


def record_time(record, spec: DeviceSpec, *, tf32: bool = False) -> tuple[OpCost, OpTime]:
    """The cost of one recorded ATen op and its roofline on `spec`, computing in its inputs' number format: what
    every caller that prices a record (a node, a rewrite's match, a profiler event) asks."""
    cost = cost_of(record)
    return cost, op_time(cost, compute_dtype(record.input_metas(), record.outputs), spec, tf32=tf32)


@dataclass(frozen=True, slots=True)
class NodeTime:
    """A node's roofline: the sum over its ops, and the bound of the ops that take most of its time."""

    seconds: float
    compute_seconds: float
    memory_seconds: float
    bound: str               # 'compute', 'memory' or 'none'
    ridge: float             # FLOP/byte where this node's dominant op would turn compute-bound


def node_time(ops: list[tuple[OpCost, OpTime]], spec: DeviceSpec) -> NodeTime:
    """Combine the op times of one node (each op is its own kernel: times add up)."""
    seconds = compute = memory = 0.0
    by_bound = {"compute": 0.0, "memory": 0.0}
    dominant: OpTime | None = None
    for _, t in ops:
        seconds += t.seconds
        compute += t.compute_seconds
        memory += t.memory_seconds
        if t.bound != "none":
            by_bound[t.bound] += t.seconds
            if dominant is None or t.seconds > dominant.seconds:
                dominant = t
    if dominant is None:
        return NodeTime(0.0, 0.0, 0.0, "none", 0.0)
    bound = "compute" if by_bound["compute"] >= by_bound["memory"] else "memory"
    return NodeTime(seconds, compute, memory, bound, dominant.peak_flops / spec.memory_bandwidth)


def compute_dtype(record_inputs: list, record_outputs: tuple) -> torch.dtype:
    """The number format an op computes in: its first floating input's (a matmul's operands), else its output's."""
    for meta in record_inputs:
        if meta.dtype.is_floating_point:
            return meta.dtype
    for meta in record_outputs:
        return meta.dtype
    return torch.float32
