"""The markdown rendering of a Report: the terminal report's sections as markdown tables and lists.

TensorBoard's Text tab renders it (one card per section); it reads as well on GitHub or in a notebook.

    >>> import torch, shapeprof
    >>> report = shapeprof.analyze(torch.nn.Linear(64, 64), torch.randn(8, 64))
    >>> list(markdown_sections(report))
    ['1-summary', '2-top-nodes', '3-modules', '4-findings', '5-coverage']
    >>> print(markdown_sections(report)["2-top-nodes"].splitlines()[2])
    | module | op | node | output | calls | FLOPs | bytes | FLOP/B | bound | time | share |
"""
from __future__ import annotations

from pathlib import Path

import re

from ..files import write_atomic
from ..report import Report
from ..text import fmt_bytes, fmt_flops, fmt_intensity, fmt_seconds
from .base import Format, Results, register


def to_markdown(report: Report, top: int = 15) -> str:
    """The whole report as one markdown document."""
    return "\n\n".join(markdown_sections(report, top).values()) + "\n"


def markdown_sections(report: Report, top: int = 15) -> dict[str, str]:
    """The report as markdown, by section: 1-summary, 2-top-nodes, 3-modules, 4-findings, 5-coverage.

    TensorBoard's Text tab renders markdown tables; module patterns such as `layers.*.attention` go in code spans
    so that their '*' is not read as emphasis.
    """
    # numbered: the Text tab sorts by tag, and should read in the terminal report's order
    return {"1-summary": _summary(report), "2-top-nodes": _top_nodes(report, top), "3-modules": _modules(report),
            "4-findings": _findings(report), "5-coverage": _coverage(report)}


def _summary(r: Report) -> str:
    t = r.total
    compute = sum(n.predicted_seconds for n in r.nodes if n.bound == "compute")
    memory = sum(n.predicted_seconds for n in r.nodes if n.bound == "memory")
    rows = [("model", f"**{r.model}**"), ("device", f"{r.spec.display_name} (`{r.spec.name}`)"),
            ("dtype", r.dtype or "as given"), ("inputs", ", ".join(f"`{i}`" for i in r.inputs) or "-"),
            ("captured by", f"{r.capture.method}, {r.capture.graph_nodes:,} graph nodes, {len(r.nodes):,} doing work"),
            ("work", f"{fmt_flops(t.flops)}, {fmt_bytes(t.bytes)} moved, {fmt_intensity(t.intensity)} FLOP/B"),
            ("predicted", f"**{fmt_seconds(t.predicted_seconds)}** (compute-bound ops {fmt_seconds(compute)}, "
                          f"memory-bound ops {fmt_seconds(memory)})")]
    if t.measured_seconds:
        rows.append(("measured", f"**{fmt_seconds(t.measured_seconds)}** (efficiency {t.efficiency:.0%})"))
    return "\n".join(f"- {key}: {value}" for key, value in rows)


def _top_nodes(r: Report, top: int) -> str:
    measured = r.total.measured_seconds is not None
    header = ["module", "op", "node", "output", "calls", "FLOPs", "bytes", "FLOP/B", "bound", "time", "share"]
    if measured:
        header += ["measured", "eff."]
    rows = []
    for group in r.repeat_groups()[:top]:
        n = group[0]
        seconds = sum(g.predicted_seconds for g in group)
        pattern = r.pattern_of(n)
        row = [f"`{pattern}`" if pattern else "(model)", n.op, f"`{n.name}`", f"`{n.output}`",
               f"x{len(group)}" if len(group) > 1 else "1", fmt_flops(n.flops, unit=False), fmt_bytes(n.bytes),
               fmt_intensity(n.intensity), _bound(n.bound), fmt_seconds(seconds), f"{sum(g.share for g in group):.1%}"]
        if measured:
            ms = sum(g.measured_seconds or 0.0 for g in group)
            row += [fmt_seconds(ms) if ms else "-", f"{seconds / ms:.0%}" if ms else "-"]
        rows.append(row)
    title = (f"Top {len(rows)} nodes by predicted time "
             f"(a node and its repeats in repeated layers: one row)")
    return f"**{title}**\n\n" + table(header, rows)


def _modules(r: Report) -> str:
    depth = r.module_depth()
    rows = [[f"`{m.key}`" if m.key else "(model)", str(m.nodes), fmt_flops(m.flops, unit=False), fmt_bytes(m.bytes),
             fmt_intensity(m.intensity), _bound(m.bound), fmt_seconds(m.predicted_seconds), f"{m.share:.1%}"]
            for m in r.by_module(depth, repeats=True)[:12]]
    return (f"**By module (depth {depth}, layers summed)**\n\n"
            + table(["module", "nodes", "FLOPs", "bytes", "FLOP/B", "bound", "time", "share"], rows))


def _findings(r: Report) -> str:
    if not r.findings:
        return "No memory-bound node takes a notable share of the time."
    lines = ["**Memory-bound hot spots**", ""]
    for f in r.findings:
        where = f"`{f.pattern}` · {f.op}" if f.pattern else f.op
        lines += [f"- **{where}** ({f.share:.1%} of time, {f.nodes} node{'s' if f.nodes > 1 else ''})",
                  f"  - why: {_escape(f.why)}", f"  - fix: {_escape(f.suggestion)}"]
    return "\n".join(lines)


def _coverage(r: Report) -> str:
    if r.coverage.complete:
        return "Coverage: every op has a cost formula."
    rows = [[f"`{o.op}`", f"x{o.count}", fmt_bytes(o.bytes), f"`{o.first_node}`"] for o in r.coverage.ops]
    return (f"**Coverage: {len(r.coverage.ops)} op(s) without a FLOP formula** "
            f"({r.coverage.uncovered_share_of_bytes:.1%} of bytes; their FLOPs are unknown, not counted)\n\n"
            + table(["op", "calls", "bytes", "first at node"], rows))


def _bound(bound: str) -> str:
    return {"memory": "**memory**", "compute": "compute"}.get(bound, bound)


def table(header: list[str], rows) -> str:
    """A markdown table, every cell made safe (a `|` escaped, a newline a space)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _escape(text: str) -> str:
    return re.sub(r"([*_`])", r"\\\1", text)


@register
class MarkdownFormat(Format):
    """The report as Markdown tables (what TensorBoard's Text tab shows), written as report.md."""

    name = "markdown"
    description = "the report as Markdown tables (report.md of each model)"

    def render(self, results: Results, width: int | None = None) -> str:
        return to_markdown(results.report)

    def write(self, results: Results, run_dir: Path) -> dict[str, Path]:
        path = Path(run_dir) / results.name / "report.md"
        write_atomic(path, self.render(results) + "\n")
        return {"markdown": path}
