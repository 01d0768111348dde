"""The terminal rendering of a Report (rich): header, top nodes, modules, findings, coverage.

Nodes are shown grouped with their repeats (`Report.repeat_groups`): in a model of 126 identical layers, `layers.*.attention.wq` is one
row with "x126", its time the sum over all of them.

The tables are laid out for the width they are printed at (COLUMNS, the terminal's width, or what the caller
gives): a row is always one line and a number is never cropped. What gives way, in this order: the node-name
column, the output-shape column, the table's borders, then spaces inside numbers ('3.87µs') and the bound
spelled short; module paths and op names are shortened last, a path from its left ('…attention.wq').
"""
from __future__ import annotations

import io
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich import box
from rich.cells import cell_len
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..files import write_atomic
from ..report import Report, is_repeat
from ..text import fmt_bytes, fmt_flops, fmt_intensity, fmt_seconds, without_control
from .base import Format, Results, register

__all__ = ["BOUND_STYLE", "TerminalFormat", "render", "terminal_width", "to_text"]

BOUND_STYLE = {"memory": "bold red", "compute": "bold green", "none": "dim"}


def render(report: Report, top: int = 15, module_depth: int | None = None):
    """A rich renderable of the report, laid out for the width of the console it is printed on.

    Every string of the report is shown through `printable`: a model, module or op name, a note, read from a
    report file someone else wrote, cannot retitle, clear or reprogram the terminal it is printed on.
    """
    return _Rendering(without_control(report), top, module_depth)


def terminal_width(default: int = 120) -> int:
    """The width to lay a report out at: COLUMNS if set, else the terminal's, else `default` (piped output)."""
    return shutil.get_terminal_size((default, 40)).columns


class _Rendering:
    def __init__(self, report: Report, top: int, module_depth: int | None):
        self.report, self.top, self.module_depth = report, top, module_depth

    def __rich_console__(self, console, options):
        r, width = self.report, options.max_width
        parts = [_header(r, width), *([_training(r)] if r.training is not None else []),
                 *([_notes(r)] if r.notes else []),
                 *_top_table(r, self.top, width), *_module_table(r, self.module_depth, width)]
        if r.findings:
            parts.append(_findings(r))
        parts.append(_coverage(r))
        yield Group(*parts)


def to_text(report: Report, width: int | None = None, color: bool | None = None, **options) -> str:
    """The rendering as a string; ANSI colours only when stdout is a terminal (unless `color` says).

    `width` defaults to `terminal_width()`: COLUMNS, else the terminal's width, else 120.
    """
    if color is None:
        color = sys.stdout.isatty()
    if width is None:
        width = terminal_width()
    console = Console(file=io.StringIO(), width=width, force_terminal=color, color_system="auto" if color else None)
    console.print(render(report, **options))
    return console.file.getvalue()


def _header(r: Report, width: int) -> Text:
    t = r.total
    c = r.capture
    first = [Text.assemble(("shapeprof ", "bold"), (r.model, "bold cyan")),
             Text(f"on {r.spec.display_name}" + (f" as {r.dtype}" if r.dtype else "")),
             Text(f"inputs {', '.join(r.inputs) or '-'}")]
    captured = Text(f"captured by {c.method}")
    if c.attempts:
        captured.append(f" (after {', '.join(m for m, _ in c.attempts)} failed)", style="yellow")
    second = [captured, Text(f"{c.graph_nodes:,} graph nodes" + (
        f" ({c.reused_nodes:,} costed once for their identical twins)" if c.reused_nodes else "")),
              Text(f"{len(r.nodes):,} doing work"), Text(f"weights {fmt_bytes(r.parameter_bytes)}")]
    compute = sum(n.predicted_seconds for n in r.nodes if n.bound == "compute")
    memory = sum(n.predicted_seconds for n in r.nodes if n.bound == "memory")
    third = [Text(f"{fmt_flops(t.flops)}  {fmt_bytes(t.bytes)} moved  {fmt_intensity(t.intensity)} FLOP/B"),
             Text(f"predicted {fmt_seconds(t.predicted_seconds)}", style="bold"),
             Text(f"(compute-bound ops {fmt_seconds(compute)}, memory-bound ops {fmt_seconds(memory)})")]
    if t.measured_seconds:
        third.append(Text(f"measured {fmt_seconds(t.measured_seconds)}", style="bold"))
    text = Text("\n").join([_fill(first, "  ", width), _fill(second, ", ", width), _fill(third, "  ", width)])
    if r.parameter_bytes > r.spec.memory_capacity:
        need = math.ceil(r.parameter_bytes / r.spec.memory_capacity)   # a capacity under 1 byte is a valid spec
        text.append(f"\nweights ({fmt_bytes(r.parameter_bytes)}) exceed one {r.spec.display_name}'s memory "
                    f"({fmt_bytes(r.spec.memory_capacity)}): at least {need} devices", style="bold yellow")
    return text


def _fill(segments: list[Text], sep: str, width: int) -> Text:
    """Segments joined by `sep` on one line while they fit in `width`, else broken between segments (not inside
    one), so that a narrow terminal gets whole phrases on each line."""
    out, used = Text(), 0
    for i, seg in enumerate(segments):
        joint = sep if i else ""
        if i and used + len(joint) + seg.cell_len > width:
            out.append(sep.rstrip() + "\n  ")
            used = 2
        else:
            out.append(joint)
            used += len(joint)
        out.append_text(seg)
        used += seg.cell_len
    return out


def _training(r: Report) -> Group:
    """The training step, phase by phase (`analyze(..., train=...)`); the node tables below are its forward."""
    t = r.training
    table = Table(title=f"Training step: {fmt_seconds(t.seconds)} predicted, MFU {t.mfu:.1%}, HFU {t.hfu:.1%} "
                        f"({t.optimizer}, loss from {t.loss})", title_justify="left", box=box.SIMPLE_HEAD)
    for header in ("phase", "FLOPs", "bytes", "predicted", "share"):
        table.add_column(header, justify="left" if header == "phase" else "right")
    for name, phase in t.phases.items():
        table.add_row(name, fmt_flops(phase.flops), fmt_bytes(phase.bytes), fmt_seconds(phase.predicted_seconds),
                      f"{phase.predicted_seconds / t.seconds:.0%}" if t.seconds else "")
    memory = Text("memory: " + ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in t.memory.items()) +
                  (f" (the peak in {t.peak_at})" if t.peak_at else ""))
    gpus = Text(f"DDP: {t.ddp}\nFSDP: {t.fsdp}")
    return Group(table, memory, *_checkpointing(t), gpus,
                 *[Text(f"note: {n}", style="dim") for n in t.notes if n not in r.notes],
                 Text("the tables below are the forward pass", style="dim"))


def _checkpointing(t) -> list[Text]:
    """What activation checkpointing does (priced with it) or would trade (per block, summed)."""
    out = []
    if t.checkpointed:
        out.append(Text(f"activation checkpointing on {len(t.checkpointed)} module(s) "
                        f"({', '.join(t.checkpointed[:3])}{', ...' if len(t.checkpointed) > 3 else ''}): "
                        f"their forward runs again in backward, counted in HFU, not in MFU"))
    if t.blocks:
        saves = sum(b.saves_bytes for b in t.blocks)
        flops = sum(b.recompute_flops for b in t.blocks)
        seconds = sum(b.recompute_seconds for b in t.blocks)
        each = t.blocks[0]
        out.append(Text(f"checkpointing each of the {len(t.blocks)} blocks ({each.path}: saves "
                        f"{fmt_bytes(each.saves_bytes)} for {fmt_flops(each.recompute_flops)} again) would keep "
                        f"{fmt_bytes(saves)} less for {fmt_flops(flops)} recomputed, "
                        f"{fmt_seconds(seconds)} more per step (Train(checkpoint=\"blocks\"))"))
    return out


def _notes(r: Report) -> Text:
    return Text("\n").join(Text(f"note: {note}", style="dim") for note in r.notes)


# ---------------------------------------------------------------------------------------------- table layout

@dataclass
class _Column:
    header: str
    cells: list[str]
    justify: str = "right"
    styles: list[str] | None = None            # one rich style per cell
    style: str = ""
    drop: int | None = None                    # rank in which it is left out when space is short (None: never)
    shorten: Callable[[str, int], str] | None = None   # how it is cut to a width (None: never cut)
    cap: int = 0                               # widest it is shown before the tightest layout (0: no cap)
    floor: int = 0                             # narrowest it is cut to
    tight_header: str | None = None
    tight: Callable[[str], str] | None = None  # its cells in the tightest layout


# (box, padding, collapse, cells between columns, cells around the table)
_LAYOUTS = {"boxed": (box.HEAVY_HEAD, (0, 1), False, 3, 4), "compact": (box.SIMPLE_HEAD, (0, 1), True, 2, 0),
            "tight": (box.SIMPLE_HEAD, (0, 0), False, 1, 0)}


def _fit(title: str, short_title: str, columns: list[_Column], width: int) -> list:
    """A title and a table of `columns` no wider than `width`: the first layout that fits (see the module doc).

    Columns of drop rank 1 and 2 (node, output) go before the borders do; higher ranks (totals that the FLOP/B
    column sums up) only when even the tightest layout with the shortest paths is too wide.
    """
    ranks = sorted({c.drop for c in columns if c.drop is not None})
    soft, hard = [r for r in ranks if r <= 2], [r for r in ranks if r > 2]
    tries = ([("boxed", soft[:k]) for k in range(len(soft) + 1)] + [("compact", soft)]
             + [("tight", soft + hard[:k]) for k in range(len(hard) + 1)])
    for n, (layout, dropped) in enumerate(tries):
        shown = [c for c in columns if c.drop not in dropped]
        tight = layout == "tight"
        cells = [[c.tight(v) if tight and c.tight else v for v in c.cells] for c in shown]
        headers = [c.tight_header if tight and c.tight_header else c.header for c in shown]
        natural = [max([cell_len(h), *map(cell_len, vs)]) for h, vs in zip(headers, cells)]
        widths = [min(w, c.cap) if c.shorten and c.cap else w for c, w in zip(shown, natural)]
        # only the tight layouts cut paths and names below their caps
        least = [min(w, max(c.floor, cell_len(h))) if tight and c.shorten else w
                 for c, h, w in zip(shown, headers, widths)]
        _, _, _, gap, edge = _LAYOUTS[layout]
        room = width - edge - gap * (len(shown) - 1)
        if sum(least) > room and n < len(tries) - 1:
            continue
        excess = sum(widths) - room
        while excess > 0:   # one cell at a time off the widest column that may be cut (on a tie, the later one)
            i = max((i for i in range(len(shown)) if widths[i] > least[i]), key=lambda i: (widths[i], i),
                    default=None)
            if i is None:
                break
            widths[i] -= 1
            excess -= 1
        return [Text(title if cell_len(title) <= width else short_title, style="bold"),
                _table(layout, shown, headers, cells, widths)]
    raise AssertionError("unreachable: the last layout always returns")


def _table(layout: str, shown: list[_Column], headers: list[str], cells: list[list[str]], widths: list[int]):
    box_, padding, collapse, _, _ = _LAYOUTS[layout]
    table = Table(box=box_, padding=padding, collapse_padding=collapse, show_edge=layout == "boxed",
                  pad_edge=layout == "boxed", header_style="bold")
    for c, h, w in zip(shown, headers, widths):
        table.add_column(h, justify=c.justify, no_wrap=True, width=w if c.shorten else None, style=c.style)
    for row in range(len(shown[0].cells) if shown else 0):
        table.add_row(*(Text(c.shorten(vs[row], w) if c.shorten else vs[row],
                             style=c.styles[row] if c.styles else "")
                        for c, vs, w in zip(shown, cells, widths)))
    return table


def _shorten_path(path: str, width: int) -> str:
    """'layers.*.attention.wq' in 13 cells: '…attention.wq' (the end of a path says the most)."""
    if cell_len(path) <= width:
        return path
    return "…" + path[len(path) - max(width - 1, 0):] if width > 1 else "…"


def _shorten_end(text: str, width: int) -> str:
    if cell_len(text) <= width:
        return text
    return text[:max(width - 1, 0)] + "…"


def _unspaced(value: str) -> str:
    return value.replace(" ", "")


_SHORT_BOUND = {"memory": "mem", "compute": "comp"}


def _numbers(header: str, cells: list[str], tight_header: str | None = None, drop: int | None = None) -> _Column:
    return _Column(header, cells, tight_header=tight_header, tight=_unspaced, drop=drop)


def _bound_column(bounds: list[str]) -> _Column:
    return _Column("bound", bounds, justify="left", styles=[BOUND_STYLE.get(b, "") for b in bounds],
                   tight=lambda b: _SHORT_BOUND.get(b, b))


def _top_table(r: Report, top: int, width: int) -> list:
    measured = r.total.measured_seconds is not None
    groups = r.repeat_groups()[:top]
    firsts = [g[0] for g in groups]
    seconds = [sum(n.predicted_seconds for n in g) for g in groups]
    columns = [
        _Column("module", [r.pattern_of(n) or "(model)" for n in firsts], justify="left", shorten=_shorten_path,
                cap=32, floor=8),
        _Column("op", [n.op for n in firsts], justify="left", shorten=_shorten_end, cap=20, floor=6),
        _Column("node", [n.name for n in firsts], justify="left", style="dim", drop=1),
        _Column("output", [n.output for n in firsts], justify="left", drop=2),
        _Column("calls", [f"x{c}" if c > 1 else "1" for c in (sum(n.repeats for n in g) for g in groups)]),
        # per call: a loop step folded into one node (repeats) holds the totals of all its calls
        _numbers("FLOPs", [fmt_flops(n.flops // n.repeats, unit=False) for n in firsts], drop=3),
        _numbers("bytes", [fmt_bytes(n.bytes // n.repeats) for n in firsts], drop=4),
        _numbers("FLOP/B", [fmt_intensity(n.intensity) for n in firsts]),
        _bound_column([n.bound for n in firsts]),
        _numbers("time", [fmt_seconds(s) for s in seconds]),
        _numbers("share", [f"{sum(n.share for n in g):.1%}" for g in groups]),
    ]
    if measured:
        ms = [[n.measured_seconds for n in g if n.measured_seconds is not None] for g in groups]
        columns += [_numbers("measured", [fmt_seconds(sum(m)) if m else "-" for m in ms], tight_header="meas."),
                    _numbers("eff.", [f"{s / sum(m):.0%}" if m and sum(m) else "-" for s, m in zip(seconds, ms)])]
    return _fit(f"Top {top} nodes by predicted time (a node and its repeats in repeated layers: one row)",
                f"Top {top} nodes by predicted time (repeats: one row)", columns, width)


def _module_table(r: Report, depth: int | None, width: int) -> list:
    if depth is None:
        depth = r.module_depth()
    rows = r.by_module(depth, repeats=True)[:12]
    repeated = any(is_repeat(part) for row in rows for part in row.key.split("."))
    columns = [
        _Column("module", [row.key or "(model)" for row in rows], justify="left", shorten=_shorten_path, cap=40,
                floor=8),
        _Column("nodes", [str(row.nodes) for row in rows]),
        _numbers("FLOPs", [fmt_flops(row.flops, unit=False) for row in rows], drop=3),
        _numbers("bytes", [fmt_bytes(row.bytes) for row in rows], drop=4),
        _numbers("FLOP/B", [fmt_intensity(row.intensity) for row in rows]),
        _bound_column([row.bound for row in rows]),
        _numbers("time", [fmt_seconds(row.predicted_seconds) for row in rows]),
        _numbers("share", [f"{row.share:.1%}" for row in rows]),
    ]
    title = f"By module (depth {depth}{', repeated layers summed' if repeated else ''})"
    return _fit(title, title, columns, width)


def _findings(r: Report, limit: int = 5) -> Group:
    parts = [Text("Memory-bound hot spots", style="bold")]
    for f in r.findings[:limit]:
        where = f"{f.pattern} · {f.op}" if f.pattern else f.op
        head = Text(f"• {where}", style="bold red")
        head.append(f" ({f.share:.1%} of time, {f.nodes} node{'s' if f.nodes > 1 else ''})", style="")
        detail = Table.grid(padding=(0, 1))   # wrapped lines hang under the text, not under "why:"
        detail.add_column(no_wrap=True)
        detail.add_column(overflow="fold")
        detail.add_row("  why:", Text(f.why))
        detail.add_row("  fix:", Text(f.suggestion))
        parts += [head, detail]
    if len(r.findings) > limit:
        parts.append(Text(f"  ... {len(r.findings) - limit} more in report.findings / report.json", style="dim"))
    return Group(*parts)


def _coverage(r: Report) -> Text:
    if r.coverage.complete:
        return Text("Coverage: every op has a cost formula.", style="dim")
    text = Text(f"Coverage: {len(r.coverage.ops)} op(s) without a FLOP formula "
                f"({r.coverage.uncovered_share_of_bytes:.1%} of bytes; their FLOPs are unknown, not counted):\n",
                style="yellow")
    for o in r.coverage.ops[:10]:
        text.append(f"  {o.op}  x{o.count}  {fmt_bytes(o.bytes)}  first at node '{o.first_node}'\n", style="yellow")
    return text


@register
class TerminalFormat(Format):
    """The rich rendering as text; written as report.txt (no colour), printed by `shapeprof trace` itself."""

    name = "terminal"
    description = "the terminal report as plain text (report.txt of each model)"

    def render(self, results: Results, width: int | None = None) -> str:
        parts = [to_text(results.report, width=width, color=False)]
        if results.measured is not None:
            parts.append(to_text(results.measured, width=width, color=False))
        if results.optimized is not None:
            console = Console(file=io.StringIO(), width=width or terminal_width(), color_system=None)
            console.print(without_control(results.optimized))
            parts.append(console.file.getvalue())
        return "\n".join(parts)

    def write(self, results: Results, run_dir: Path) -> dict[str, Path]:
        path = Path(run_dir) / results.name / "report.txt"
        write_atomic(path, self.render(results, width=120))
        return {"text": path}
