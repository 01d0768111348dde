"""Findings: the memory-bound nodes that dominate predicted time, why they are slow and what would help.

Nodes are grouped with their twins (same module pattern, see `report.module_patterns`, and same op), so a model
of 126 layers gets one finding for `layers.*.feed_forward · mul`, not 126.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Mapping

from .costs import cost_of
from .hardware import DeviceSpec
from .records import OpRecord
from .report import Finding, NodeStats, fmt_intensity, intensity, module_patterns

_MATMUL_2D = {"aten.mm", "aten.addmm", "aten.linear", "aten.matmul"}


def find(nodes: list[NodeStats], records_of: Mapping[str, tuple[OpRecord, ...]], total_seconds: float,
         spec: DeviceSpec, *, min_share: float = 0.01, limit: int = 8) -> list[Finding]:
    """Up to `limit` memory-bound groups taking at least `min_share` of the predicted time, biggest first."""
    patterns = module_patterns(nodes)
    groups: dict[tuple[str, str], list[NodeStats]] = defaultdict(list)
    for n in nodes:
        if n.bound == "memory":
            groups[(patterns.get(n.module_path, n.module_path), n.op)].append(n)
    found = []
    for (pattern, op), members in groups.items():   # every memory-bound `mul` of layers.*.attention together
        seconds = sum(m.predicted_seconds for m in members)
        share = seconds / total_seconds if total_seconds else 0.0
        if share < min_share:
            continue
        flops, nbytes = sum(m.flops for m in members), sum(m.bytes for m in members)
        ratio = intensity(flops, nbytes)
        first = members[0]
        why = (f"{fmt_intensity(ratio)} FLOP/byte against a ridge of {fmt_intensity(first.ridge)} on "
               f"{spec.display_name}: it waits on memory ({_bytes(first.bytes)} per call, {len(members)} call"
               f"{'s' if len(members) > 1 else ''})")
        found.append(Finding(pattern, op, len(members), share, ratio, first.ridge, why,
                             suggest(first, records_of.get(first.name, ()))))
    found.sort(key=lambda f: f.share, reverse=True)
    return found[:limit]


def suggest(node: NodeStats, records: tuple[OpRecord, ...]) -> str:
    """What would raise this memory-bound node's intensity or cut its bytes."""
    matmuls = [(cost_of(r), r) for r in records]
    matmuls = [(c, r) for c, r in matmuls if c.matmul]
    if matmuls:
        _, rec = max(matmuls, key=lambda cr: cr[0].flops)
        if rec.name == "aten.scaled_dot_product_attention" or "attention" in rec.name:
            return ("attention reads all of K and V for few queries per head: batching more sequences does not "
                    "help (each reads its own cache); fewer K/V heads (grouped-query attention), a quantised or "
                    "paged KV cache, or more queries per step (speculative decoding) do")
        mkn = _mkn(rec)
        if mkn is not None:
            return _rows_to_ridge(*mkn, itemsize=rec.input_metas()[0].itemsize, ridge=node.ridge)
        return "a batched matmul with few rows per matrix: batch more rows per call, or fuse the batch"
    if node.flops == 0:
        return (f"pure data movement ({node.op}): no math, only bytes; avoid the copy (a view instead of "
                f".contiguous(), a preallocated buffer instead of cat)")
    return ("elementwise work has a fixed, low FLOP/byte and reaches the ridge at no batch size: fuse it into "
            "its neighbour so the tensor stays on chip (an activation into the matmul before it: "
            "shapeprof.optimize; a chain of elementwise ops: torch.compile)")


def _mkn(rec: OpRecord) -> tuple[int, int, int] | None:
    """(rows M, inner K, columns N) of a 2-D-weight matmul record, or None."""
    ins = rec.input_metas()
    if rec.name == "aten.addmm":
        ins = ins[1:]
    if rec.name not in _MATMUL_2D or len(ins) < 2:
        return None
    a, w = ins[0], ins[1]
    if len(w.shape) != 2 or not a.shape:
        return None
    k = a.shape[-1]
    n = w.shape[0] if rec.name == "aten.linear" else w.shape[1]
    return math.prod(a.shape[:-1]), k, n


def _rows_to_ridge(m: int, k: int, n: int, *, itemsize: int, ridge: float) -> str:
    # intensity(M) = 2MKN / (b(MK + KN + MN)); it equals the ridge r at M* = r b K N / (2KN - r b (K + N))
    denominator = 2 * k * n - ridge * itemsize * (k + n)
    if denominator <= 0:
        return (f"a {k}x{n} weight is too small to reach the ridge at any batch: fuse it with its neighbours or "
                f"run it in a larger matmul")
    rows = math.ceil(ridge * itemsize * k * n / denominator)
    return (f"it multiplies a {k}x{n} weight by only {m} row{'s' if m != 1 else ''} (tokens): at about {rows} "
            f"rows per call it would reach the ridge; batch more sequences or tokens per step")


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"

