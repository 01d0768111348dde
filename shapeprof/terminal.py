"""The terminal rendering of a Report (rich): header, top nodes, modules, findings, coverage.

Nodes are shown grouped with their twins: in a model of 126 identical layers, `layers.*.attention.wq` is one
row with "x126", its time the sum over all of them.
"""
from __future__ import annotations

import io
import shutil
import sys
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .report import Report, fmt_intensity, is_repeat

BOUND_STYLE = {"memory": "bold red", "compute": "bold green", "none": "dim"}


def render(report: Report, top: int = 15, module_depth: int | None = None):
    """A rich renderable of the report, laid out for the width of the console it is printed on."""
    return _Rendering(report, top, module_depth)


class _Rendering:
    def __init__(self, report: Report, top: int, module_depth: int | None):
        self.report, self.top, self.module_depth = report, top, module_depth

    def __rich_console__(self, console, options):
        r = self.report
        # the node-name column is the first to go: times and shares must never be cropped off the right
        parts = [_header(r), *([_notes(r)] if r.notes else []),
                 _top_table(r, self.top, with_node=options.max_width >= 150),
                 _module_table(r, self.module_depth)]
        if r.findings:
            parts.append(_findings(r))
        parts.append(_coverage(r))
        yield Group(*parts)


def to_text(report: Report, width: int | None = None, color: bool | None = None, **options) -> str:
    """The rendering as a string; ANSI colours only when stdout is a terminal (unless `color` says)."""
    if color is None:
        color = sys.stdout.isatty()
    if width is None:
        width = max(100, shutil.get_terminal_size((120, 40)).columns)
    console = Console(file=io.StringIO(), width=width, force_terminal=color, color_system="auto" if color else None)
    console.print(render(report, **options))
    return console.file.getvalue()


def _header(r: Report) -> Text:
    t = r.total
    c = r.capture
    text = Text()
    text.append("shapeprof ", style="bold")
    text.append(f"{r.model}", style="bold cyan")
    text.append(f"  on {r.spec.display_name}")
    if r.dtype:
        text.append(f" as {r.dtype}")
    text.append(f"  inputs {', '.join(r.inputs) or '-'}\n")
    text.append(f"captured by {c.method}")
    if c.attempts:
        text.append(f" (after {', '.join(m for m, _ in c.attempts)} failed)", style="yellow")
    text.append(f", {c.graph_nodes:,} graph nodes")
    if c.reused_nodes:
        text.append(f" ({c.reused_nodes:,} costed once for their identical twins)")
    text.append(f", {len(r.nodes):,} doing work; weights {fmt_bytes(r.parameter_bytes)}\n")
    text.append(f"{fmt_flops(t.flops)}  {fmt_bytes(t.bytes)} moved  {fmt_intensity(t.intensity)} FLOP/B  ")
    text.append(f"predicted {fmt_seconds(t.predicted_seconds)}", style="bold")
    text.append(f" (compute-bound ops {fmt_seconds(sum(n.predicted_seconds for n in r.nodes if n.bound == 'compute'))},"
                f" memory-bound ops {fmt_seconds(sum(n.predicted_seconds for n in r.nodes if n.bound == 'memory'))})")
    if t.measured_seconds:
        text.append(f"  measured {fmt_seconds(t.measured_seconds)}", style="bold")
    if r.parameter_bytes > r.spec.memory_capacity:
        need = -(-r.parameter_bytes // int(r.spec.memory_capacity))
        text.append(f"\nweights ({fmt_bytes(r.parameter_bytes)}) exceed one {r.spec.display_name}'s memory "
                    f"({fmt_bytes(r.spec.memory_capacity)}): at least {need} devices", style="bold yellow")
    return text


def _notes(r: Report) -> Text:
    text = Text()
    for note in r.notes:
        text.append(f"note: {note}\n", style="dim")
    return text


def _top_table(r: Report, top: int, with_node: bool) -> Table:
    measured = r.total.measured_seconds is not None
    table = Table(title=f"Top {top} nodes by predicted time (a node and its twins in repeated layers: one row)",
                  title_justify="left", header_style="bold")
    table.add_column("module", overflow="fold", min_width=16, max_width=26)
    table.add_column("op", overflow="fold", max_width=14)
    if with_node:
        table.add_column("node", overflow="ellipsis", no_wrap=True, max_width=20, style="dim")
    table.add_column("output", overflow="fold", max_width=18)
    for col in ("calls", "FLOPs", "bytes", "FLOP/B"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("bound", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    if measured:
        table.add_column("measured", justify="right", no_wrap=True)
        table.add_column("eff.", justify="right", no_wrap=True)
    for group in r.twin_groups()[:top]:
        n = group[0]
        seconds = sum(g.predicted_seconds for g in group)
        row = [r.pattern_of(n) or "(model)", n.op, *([n.name] if with_node else []), n.output,
               f"x{len(group)}" if len(group) > 1 else "1",
               fmt_flops(n.flops, unit=False), fmt_bytes(n.bytes), fmt_intensity(n.intensity),
               Text(n.bound, style=BOUND_STYLE.get(n.bound, "")), fmt_seconds(seconds),
               f"{sum(g.share for g in group):.1%}"]
        if measured:
            ms = [g.measured_seconds for g in group if g.measured_seconds is not None]
            row += [fmt_seconds(sum(ms)) if ms else "-",
                    f"{seconds / sum(ms):.0%}" if ms and sum(ms) else "-"]
        table.add_row(*row)
    return table


def _module_table(r: Report, depth: int | None) -> Table:
    if depth is None:
        depth = r.module_depth()
    rows = r.by_module(depth, twins=True)[:12]
    repeated = any(is_repeat(part) for row in rows for part in row.key.split("."))
    table = Table(title=f"By module (depth {depth}{', repeated layers summed' if repeated else ''})",
                  title_justify="left", header_style="bold")
    for col in ("module", "nodes", "FLOPs", "bytes", "FLOP/B", "bound", "time", "share"):
        table.add_column(col, justify="left" if col in ("module", "bound") else "right")
    for row in rows:
        table.add_row(row.key or "(model)", str(row.nodes), fmt_flops(row.flops, unit=False), fmt_bytes(row.bytes),
                      fmt_intensity(row.intensity), Text(row.bound, style=BOUND_STYLE[row.bound]),
                      fmt_seconds(row.predicted_seconds), f"{row.share:.1%}")
    return table


def _findings(r: Report, limit: int = 5) -> Text:
    text = Text()
    text.append("Memory-bound hot spots\n", style="bold")
    for f in r.findings[:limit]:
        where = f"{f.pattern} · {f.op}" if f.pattern else f.op
        text.append(f"• {where}", style="bold red")
        text.append(f" ({f.share:.1%} of time, {f.nodes} node{'s' if f.nodes > 1 else ''})\n")
        text.append(f"  why: {f.why}\n  fix: {f.suggestion}\n")
    if len(r.findings) > limit:
        text.append(f"  ... {len(r.findings) - limit} more in report.findings / report.json\n", style="dim")
    return text


def _coverage(r: Report) -> Text:
    if r.coverage.complete:
        return Text("Coverage: every op has a cost formula.", style="dim")
    text = Text(f"Coverage: {len(r.coverage.ops)} op(s) without a FLOP formula "
                f"({r.coverage.uncovered_share_of_bytes:.1%} of bytes; their FLOPs are unknown, not counted):\n",
                style="yellow")
    for o in r.coverage.ops[:10]:
        text.append(f"  {o.op}  x{o.count}  {fmt_bytes(o.bytes)}  first at node '{o.first_node}'\n", style="yellow")
    return text


def fmt_flops(n: float, unit: bool = True) -> str:
    suffix = "FLOP" if unit else ""
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {prefix}{suffix}"
    return f"{n:.0f} {suffix}".strip()


def fmt_bytes(n: float) -> str:
    for prefix, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {prefix}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.3g} µs"
    return f"{s * 1e9:.3g} ns"
