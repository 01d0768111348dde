"""The Report: every node with its FLOPs, bytes and roofline, rollups, coverage and findings; JSON round trip.

    >>> import torch, shapeprof
    >>> report = shapeprof.analyze(torch.nn.Linear(1024, 4096), torch.randn(512, 1024), dtype=torch.bfloat16)
    >>> n = report.nodes[0]
    >>> n.name, n.op, n.flops, n.bound
    ('linear', 'linear', 4294967296, 'compute')
    >>> shapeprof.Report.from_json(report.to_json()) == report
    True
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from .files import write_atomic
from .hardware import DeviceSpec
from .jsondata import ReportFormatError, from_plain, json_kind, load_json, read_json_file
from .moe import MoEInfo
from .phases import PhaseInfo
from .training import Phase, TrainingSummary

SCHEMA = "shapeprof.report"
SCHEMA_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)   # version 1 had no `notes`, 2 no `training`


@dataclass(frozen=True, slots=True)
class AtenOp:
    """One ATen op a node ran: what it cost and how long the roofline says it takes."""

    op: str
    flops: int
    bytes: int
    seconds: float
    covered: bool


class _Work:
    """bytes, intensity and efficiency of anything with FLOPs, bytes read and written, and predicted and measured
    times (a node, the totals)."""

    __slots__ = ()

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """FLOP per byte moved (inf for work that computes without touching memory)."""
        return intensity(self.flops, self.bytes)

    @property
    def efficiency(self) -> float | None:
        """predicted / measured: 1.0 means it ran at the roofline."""
        return efficiency(self.predicted_seconds, self.measured_seconds)


@dataclass(frozen=True, slots=True)
class NodeStats(_Work):
    """One graph node that does work. Stored in ``node.meta["shapeprof"]`` of the analysed graph too."""

    name: str                 # the fx node's name
    op: str                   # what it calls: 'Linear' (a module), 'relu', 'scaled_dot_product_attention', ...
    kind: str                 # fx node op: call_module, call_function, call_method
    module_path: str          # 'transformer.h.3.mlp.c_fc' ('' for the model itself)
    module_type: str
    flops: int
    bytes_read: int
    bytes_written: int
    predicted_seconds: float
    compute_seconds: float    # sum of FLOPs/peak over its ops
    memory_seconds: float     # sum of bytes/bandwidth over its ops
    bound: str                # 'compute' or 'memory' (of the ops taking most of its time)
    ridge: float              # FLOP/byte at which its dominant op turns compute-bound on the spec
    share: float              # of the model's predicted time
    output: str               # 'bf16[1, 2048, 4096]'
    aten: tuple[AtenOp, ...]  # the ATen ops it ran, in order
    uncovered: tuple[str, ...] = ()   # its ops with no cost formula (their FLOPs are unknown, not zero)
    source: str = ""          # 'model.py:42'
    twin_of: str | None = None
    measured_seconds: float | None = None
    repeats: int = 1          # calls it stands for: the steps of a loop folded into one node (costs are totals)


def intensity(flops: int, nbytes: int) -> float:
    """FLOP per byte; inf for work that touches no memory."""
    return flops / nbytes if nbytes else float("inf")


def efficiency(predicted: float, measured: float | None) -> float | None:
    """predicted / measured, None when nothing (or zero) was measured."""
    return predicted / measured if measured else None


def module_patterns(nodes: Iterable[NodeStats]) -> dict[str, str]:
    """Module path -> its pattern: each index of the path becomes '*' where the modules at it really repeat.

    The modules at `P.3` and `P.7` repeat when the nodes under them are the same, in the same order: the same
    relative module paths, ops, output shapes and costs. Only those indices are starred: `layers.*.attention.wq`
    for a Llama's identical layers, while the different convs, norms and pools of a CNN's `nn.Sequential` keep
    `features.0`, `features.1`, ... A parent with more than one set of repeats (ReLUs at 1 and 3, other ReLUs
    at 6 and 8) names each set by its indices, `features.{1,3}` and `features.{6,8}`, so that rollups never sum
    modules that are not repeats of each other. Decided from the nodes alone, so a report read back from JSON
    groups as the analysed one did.

        >>> def node(path, flops):
        ...     return NodeStats(path, "Linear", "call_module", path, "Linear", flops, 8, 8, 0., 0., 0., "compute",
        ...                      1., 0., "f32[2]", ())
        >>> module_patterns([node("h.0.fc", 4), node("h.1.fc", 4), node("h.2.fc", 6), node("head", 2)])
        {'h.0.fc': 'h.*.fc', 'h.1.fc': 'h.*.fc', 'h.2.fc': 'h.2.fc', 'head': 'head'}
    """
    nodes = list(nodes)
    # subtree[(parent, index)]: what the nodes under `parent.index` do, each with its path below that module
    subtree: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for n in nodes:
        parts = n.module_path.split(".") if n.module_path else []
        work = None
        for i, part in enumerate(parts):
            if part.isdecimal():
                work = work or _work(n)
                subtree[(".".join(parts[:i]), part)].append((".".join(parts[i + 1:]), work))
    siblings: dict[str, dict[tuple, list[str]]] = defaultdict(lambda: defaultdict(list))
    for (parent, index), work in subtree.items():
        siblings[parent][tuple(work)].append(index)
    label: dict[tuple[str, str], str] = {}
    for parent, by_work in siblings.items():
        repeats = [indices for indices in by_work.values() if len(indices) > 1]
        for indices in repeats:
            name = "*" if len(repeats) == 1 else _index_set(indices)
            label.update({(parent, i): name for i in indices})
    patterns = {}
    for n in nodes:
        if n.module_path not in patterns:
            parts = n.module_path.split(".") if n.module_path else []
            patterns[n.module_path] = ".".join(
                label.get((".".join(parts[:i]), part), part) if part.isdecimal() else part
                for i, part in enumerate(parts))
    return patterns


def is_repeat(part: str) -> bool:
    """Whether a component of a pattern stands for repeated modules ('*' or a set such as '{1,3}')."""
    return part == "*" or part.startswith("{")


def _work(n: NodeStats) -> tuple:
    """What a node does, to tell repeats apart: its op, output and costs (not its name or absolute path)."""
    return (n.kind, n.op, n.module_type, n.output, n.flops, n.bytes_read, n.bytes_written,
            tuple((a.op, a.flops, a.bytes) for a in n.aten), n.uncovered)


def _index_set(indices: list[str]) -> str:
    """'{1,3}', '{0-5,8}': the indices of one set of repeats, runs of three or more as ranges."""
    values = sorted(int(i) for i in indices)
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return "{" + ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs) + "}"


@dataclass(frozen=True, slots=True)
class Totals(_Work):
    flops: int
    bytes_read: int
    bytes_written: int
    predicted_seconds: float
    compute_seconds: float
    memory_seconds: float
    measured_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Rollup:
    """Totals of a group of nodes (a module, an op, a pattern)."""

    key: str
    nodes: int
    flops: int
    bytes: int
    predicted_seconds: float
    share: float
    bound: str                 # the bound holding most of the group's time
    measured_seconds: float | None = None
    example: str = ""          # the first node of the group

    @property
    def intensity(self) -> float:
        return intensity(self.flops, self.bytes)


@dataclass(frozen=True, slots=True)
class UncoveredOp:
    op: str
    count: int
    bytes: int
    share_of_bytes: float
    first_node: str


@dataclass(frozen=True, slots=True)
class Coverage:
    """Ops with no cost formula: their bytes are counted, their FLOPs are unknown (never silently 0)."""

    ops: tuple[UncoveredOp, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.ops

    @property
    def uncovered_share_of_bytes(self) -> float:
        return sum(o.share_of_bytes for o in self.ops)


@dataclass(frozen=True, slots=True)
class Finding:
    """A memory-bound group of nodes that matters: why it is slow and what would help."""

    pattern: str
    op: str
    nodes: int
    share: float
    intensity: float
    ridge: float
    why: str
    suggestion: str


@dataclass(frozen=True, slots=True)
class CaptureInfo:
    method: str                               # symbolic_trace, export or dispatch
    attempts: tuple[tuple[str, str], ...]     # (method, why it failed) for the ways tried before
    graph_nodes: int
    reused_nodes: int                         # nodes whose ops were taken from an identical twin
    seconds: float
    folded_calls: int = 0                     # loop steps recorded once and counted on the step they repeat


@dataclass(eq=True)
class Report:
    """Where the time goes: one `NodeStats` per node that does work, against one `DeviceSpec`."""

    model: str
    spec: DeviceSpec
    dtype: str | None
    inputs: tuple[str, ...]
    capture: CaptureInfo
    nodes: list[NodeStats]
    total: Totals
    coverage: Coverage
    findings: list[Finding]
    parameter_bytes: int
    notes: tuple[str, ...] = ()   # what the numbers assume or leave out (attention pricing, masks, forward only)
    phase: PhaseInfo | None = None   # analysed as a prefill or a decode step (shapeprof.Prefill / Decode)
    training: TrainingSummary | None = None   # analyze(..., train=...): the whole step; the nodes are its forward
    moe: MoEInfo | None = None   # mixture-of-experts layers, routing and active/total params (shapeprof.moe)
    analysis_seconds: float = field(default=0.0, compare=False)
    graph_capture: Any = field(default=None, compare=False, repr=False)   # the Capture analysed (not saved)

    @property
    def phases(self) -> dict[str, Phase] | None:
        """analyze(..., train=...): forward, backward and optimizer, each with flops, bytes, predicted_seconds."""
        return self.training.phases if self.training is not None else None

    @property
    def memory(self) -> dict[str, int] | None:
        """analyze(..., train=...): weights, gradients, optimizer_state, activations (kept for backward), total."""
        return self.training.memory if self.training is not None else None

    @property
    def graph_module(self):
        """The analysed fx.GraphModule (over the meta shadow; each node's NodeStats in node.meta["shapeprof"]).
        None for a report read from JSON."""
        return self.graph_capture.graph_module if self.graph_capture is not None else None

    # ------------------------------------------------------------------ rollups
    def top(self, n: int = 20) -> list[NodeStats]:
        """The `n` nodes with the largest predicted time."""
        return sorted(self.nodes, key=lambda s: s.predicted_seconds, reverse=True)[:n]

    @cached_property
    def patterns(self) -> dict[str, str]:
        """Module path -> pattern, with '*' only where modules really repeat (see `module_patterns`)."""
        return module_patterns(self.nodes)

    def pattern_of(self, node: NodeStats) -> str:
        """`node`'s module path with the indices of repeated layers as '*': 'layers.*.attention.wq'."""
        return self.patterns.get(node.module_path, node.module_path)

    def by_module(self, depth: int | None = None, *, repeats: bool = False) -> list[Rollup]:
        """Totals per module path, cut to its first `depth` components (None: the full path), biggest first.

        With `repeats`, the indices of repeated layers become '*': `layers.*.attention` sums the attention of every
        layer (and only of layers that are repeats of each other).
        """
        def key(s: NodeStats) -> str:
            path = self.pattern_of(s) if repeats else s.module_path
            if depth is None or not path:
                return path
            return ".".join(path.split(".")[:depth])
        return self._rollup(key)

    def by_op(self) -> list[Rollup]:
        """Totals per op ('Linear', 'scaled_dot_product_attention', 'mul', ...), biggest first."""
        return self._rollup(lambda s: s.op)

    def by_pattern(self) -> list[Rollup]:
        """Totals per (module pattern, op): every `mul` in `layers.*.attention` together."""
        return self._rollup(lambda s: f"{self.pattern_of(s)} · {s.op}" if s.module_path else s.op)

    def repeat_groups(self) -> list[list[NodeStats]]:
        """Nodes grouped with their repeats, biggest total predicted time first.

        Repeats are the nodes at the same place of repeated modules doing the same work: the k-th `mul` of
        `layers.3.attention` and the k-th `mul` of every other layer's attention. The k matters (two muls of one
        module are not repeats of each other). (Not to be confused with capture's twins, whose op records are
        reused: `NodeStats.twin_of`.) A node whose module does not repeat is a group of its own, under its real path.
        """
        seen: dict[tuple[str, str], int] = defaultdict(int)
        groups: dict[tuple, list[NodeStats]] = defaultdict(list)
        for s in self.nodes:
            k = seen[(s.module_path, s.op)]
            seen[(s.module_path, s.op)] = k + 1
            groups[(self.pattern_of(s), s.op, k, s.flops, s.bytes_read, s.bytes_written)].append(s)
        return sorted(groups.values(), key=lambda g: sum(n.predicted_seconds for n in g), reverse=True)

    def module_depth(self) -> int:
        """The module depth worth showing: one level inside the repeated layer ('layers.*.attention'), else 2."""
        repeated = [next(i for i, part in enumerate(parts) if is_repeat(part))
                    for parts in (p.split(".") for p in set(self.patterns.values()))
                    if any(is_repeat(part) for part in parts)]
        return min(repeated) + 2 if repeated else 2

    def _rollup(self, key) -> list[Rollup]:
        groups: dict[str, list[NodeStats]] = defaultdict(list)
        for s in self.nodes:
            groups[key(s)].append(s)
        total = self.total.predicted_seconds or 1.0
        rows = [_rollup_of(k, ns, total) for k, ns in groups.items()]
        return sorted(rows, key=lambda r: r.predicted_seconds, reverse=True)

    # ------------------------------------------------------------------ rendering
    def __rich_console__(self, console, options):
        from .output.terminal import render
        yield render(self)

    def __str__(self) -> str:
        from .output.terminal import to_text
        return to_text(self)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.compare}
        d["spec"] = self.spec.to_dict()
        for name in ("capture", "total", "coverage"):
            d[name] = asdict(d[name])
        d["nodes"] = [asdict(n) for n in self.nodes]
        d["findings"] = [asdict(f) for f in self.findings]
        d["phase"] = asdict(self.phase) if self.phase is not None else None
        d["training"] = asdict(self.training) if self.training is not None else None
        d["moe"] = asdict(self.moe) if self.moe is not None else None
        return {"schema": SCHEMA, "version": SCHEMA_VERSION, **d}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The report as JSON; with `path`, also written there atomically (never a half-written file)."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=True)
        if path is not None:
            write_atomic(Path(path), text)
        return text

    def to_html(self, path: str | os.PathLike) -> Path:
        """The interactive report (roofline, sortable node table, module tree, findings) as one HTML file that
        opens offline; written atomically. Returns the path."""
        from .output.html import write_html
        return write_html(path, self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """Read back what `to_dict` wrote. Every field is checked against its type, so a damaged file is one
        `ReportFormatError` naming the field ('nodes[3].flops: expected an integer, got a string'), never a
        TypeError from deep inside a renderer.

            >>> Report.from_dict({"schema": SCHEMA, "version": SCHEMA_VERSION, "model": None})
            Traceback (most recent call last):
            ...
            shapeprof.jsondata.ReportFormatError: malformed shapeprof report: model: expected a string, got null
        """
        if not isinstance(d, dict):
            raise ReportFormatError(f"not a shapeprof report: the JSON is {json_kind(d)}, not an object")
        if d.get("schema") != SCHEMA:
            raise ReportFormatError(f"not a shapeprof report (schema {d.get('schema')!r})")
        if d.get("version") not in _READABLE_VERSIONS:
            raise ReportFormatError(f"report version {d.get('version')!r} is not supported "
                                    f"(this shapeprof reads versions {', '.join(map(str, _READABLE_VERSIONS))})")
        try:
            report = from_plain(cls, {k: v for k, v in d.items() if k not in ("schema", "version")})
            for i, n in enumerate(report.nodes):
                if n.repeats < 1:   # costs are totals over `repeats` calls: renderers divide by it
                    raise ReportFormatError(f"nodes[{i}].repeats: must be at least 1, got {n.repeats}")
        except ReportFormatError as e:
            raise ReportFormatError(f"malformed shapeprof report: {e}") from e.__cause__
        return report

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "Report":
        """Read a report written by `to_json`: from a path, or from the JSON text itself."""
        text = str(source)
        if text.lstrip().startswith("{"):
            return cls.from_dict(load_json(text, source))
        return cls.from_dict(read_json_file(Path(source)))

    def with_measurements(self, measured: dict[str, float], total_seconds: float | None = None) -> "Report":
        """A copy with `measured_seconds` set on the nodes named in `measured` (and on the total)."""
        from dataclasses import replace
        nodes = [replace(n, measured_seconds=measured.get(n.name, n.measured_seconds)) for n in self.nodes]
        total = total_seconds if total_seconds is not None else sum(measured.values())
        return replace(self, nodes=nodes, total=replace(self.total, measured_seconds=total))


def _rollup_of(key: str, nodes: list[NodeStats], total: float) -> Rollup:
    seconds = sum(n.predicted_seconds for n in nodes)
    memory = sum(n.predicted_seconds for n in nodes if n.bound == "memory")
    measured = [n.measured_seconds for n in nodes if n.measured_seconds is not None]
    return Rollup(key, len(nodes), sum(n.flops for n in nodes), sum(n.bytes for n in nodes), seconds,
                  seconds / total, "memory" if memory > seconds - memory else "compute",
                  sum(measured) if measured else None, nodes[0].name)
