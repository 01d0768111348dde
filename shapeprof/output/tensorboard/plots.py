"""The roofline plot of a Report (matplotlib): the device's roofs and ridge points, one point per group of twin nodes.

    >>> import torch, shapeprof
    >>> report = shapeprof.analyze(torch.nn.Linear(1024, 4096), torch.randn(512, 1024), dtype=torch.bfloat16)
    >>> [r.label for r in roofs(report.spec, torch.bfloat16)]
    ['bf16 tensor cores 312 TFLOP/s', 'fp32 vector units 19.5 TFLOP/s']
    >>> fig = roofline_figure(report)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ...hardware import DeviceSpec
from ...report import NodeStats, Report
from ...text import fmt_bytes, fmt_flops, fmt_seconds

BOUND_COLOR = {"memory": "#d62728", "compute": "#2ca02c", "none": "#7f7f7f"}   # as the terminal: red / green
MEMORY_COLOR = "#1f4e9c"
NUMBERED = 10         # the groups with most time get a number on the plot and a line in the list beside it


@dataclass(frozen=True)
class Roof:
    """One compute roof: a peak (FLOP/s) and where it meets the memory roof (the ridge, FLOP/byte)."""

    key: str
    label: str
    peak: float
    ridge: float
    possible: bool = False    # a roof the report's ops do not use as analysed (TF32 for fp32 matmuls)


_WHERE = {"fp32": "vector units", "fp64": "vector units"}   # every other peak key is a tensor-core rate


def roofs(spec: DeviceSpec, dtype: torch.dtype) -> list[Roof]:
    """The compute roofs an op in `dtype` meets on `spec`, highest first: tensor cores (matmuls) and vector units
    (the rest); for fp32 also TF32 tensor cores, which fp32 matmuls reach only with allow_tf32."""
    keys = {spec.peak_key(dtype, matmul=True): False, spec.peak_key(dtype, matmul=False): False}
    if dtype == torch.float32 and "tf32" in spec.peak_flops:
        keys.setdefault("tf32", True)
    out = []
    for key, possible in keys.items():   # fp32 matmuls without TF32 run on the vector units: one roof, not two
        peak = spec.peak_flops[key]
        where = _WHERE.get(key, "tensor cores") + (" with allow_tf32" if possible else "")
        out.append(Roof(key, f"{key} {where} {fmt_flops(peak).replace('FLOP', 'FLOP/s')}", peak,
                        peak / spec.memory_bandwidth, possible))
    return sorted(out, key=lambda r: -r.peak)


@dataclass(frozen=True)
class Point:
    """A group of twin nodes: its intensity, the FLOP/s it runs at, its time, share of the total and bound."""

    label: str
    intensity: float
    flops_per_second: float
    seconds: float
    share: float
    bound: str


def points(report: Report, *, measured: bool = False) -> tuple[list[Point], int]:
    """One point per twin group, biggest time first; and how many groups have no place on log axes.

    Twins have the same intensity and speed, so a group is one point whose size is their summed time. It sits at
    the FLOP/s reached in the predicted (with `measured`: the measured) time, so a node at the roofline lies on a
    roof. Groups with no FLOPs (pure data movement), no bytes or no time cannot be drawn on log axes.
    """
    total = _total(report, measured)
    out, left_out = [], 0
    for group in report.repeat_groups():
        n = group[0]
        # sums over the group: for twins the same as the first node times their count, and exact for any group
        seconds = sum(_seconds(g, measured) for g in group)
        flops, nbytes = sum(g.flops for g in group), sum(g.bytes for g in group)
        if not flops or not nbytes or not seconds:
            left_out += 1
            continue
        label = f"{report.pattern_of(n) or n.name} · {n.op}" + (f" x{len(group)}" if len(group) > 1 else "")
        out.append(Point(label, flops / nbytes, flops / seconds, seconds, seconds / total if total else 0.0,
                         group_bound(group)))
    return sorted(out, key=lambda p: -p.seconds), left_out


def group_bound(group: list[NodeStats]) -> str:
    """The bound holding most of the group's predicted time (as Report rollups decide it)."""
    memory = sum(g.predicted_seconds for g in group if g.bound == "memory")
    return "memory" if memory > sum(g.predicted_seconds for g in group) - memory else "compute"


def _seconds(n: NodeStats, measured: bool) -> float:
    return (n.measured_seconds or 0.0) if measured else n.predicted_seconds


def _total(report: Report, measured: bool) -> float:
    return (report.total.measured_seconds or 0.0) if measured else report.total.predicted_seconds


def roofline_figure(report: Report, *, measured: bool = False) -> Figure:
    """A log-log roofline of `report` on its spec: FLOP/byte across, FLOP/s up, nodes as points.

    Args:
        report: an analysed (or measured) Report.
        measured: place nodes at their measured speed (their `measured_seconds`), else at their predicted speed.

    Returns:
        A matplotlib Figure (not registered with pyplot: nothing to close).
    """
    spec = report.spec
    dtype = getattr(torch, report.dtype) if report.dtype else torch.float32
    pts, left_out = points(report, measured=measured)
    top = roofs(spec, dtype)
    fig = Figure(figsize=(12, 6.5), dpi=100)
    ax = fig.add_axes((0.07, 0.11, 0.55, 0.80))
    ax.set_xscale("log")
    ax.set_yscale("log")
    x_lo, x_hi = _x_range(pts, top)
    _draw_roofs(ax, spec, top, x_lo, x_hi)
    _draw_points(ax, pts)
    ax.set_xlim(x_lo, x_hi)
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    what = "measured" if measured else "predicted"
    ax.set_ylabel(f"FLOP/s ({what})")
    ax.grid(True, which="major", alpha=0.3)
    # upper left: above the memory roof no point can be
    ax.legend(handles=_legend_handles(ax, pts), loc="upper left", fontsize=8, framealpha=0.9)
    dtype_text = f" as {report.dtype}" if report.dtype else ""
    fig.suptitle(f"{report.model} on {spec.display_name}{dtype_text}: {what} "
                 f"{fmt_seconds(_total(report, measured))}", x=0.07, ha="left", fontsize=12)
    _draw_list(fig, pts)
    note = "area = time (twins summed)"
    if left_out:
        note += f"; {left_out} group{'s' if left_out > 1 else ''} with no FLOPs or no bytes (data movement) not drawn"
    fig.text(0.07, 0.015, note, fontsize=8, color="#555555")
    return fig


def _x_range(pts: list[Point], top: list[Roof]) -> tuple[float, float]:
    xs = [p.intensity for p in pts] + [r.ridge for r in top]
    return min(xs) / 4, max(xs) * 4


def _draw_roofs(ax, spec: DeviceSpec, top: list[Roof], x_lo: float, x_hi: float) -> None:
    used = [r for r in top if not r.possible]
    for roof in top:
        style = ":" if roof.possible else ("-" if roof is used[0] else "--")
        ax.plot([roof.ridge, x_hi], [roof.peak, roof.peak], color="#888888" if roof.possible else "black",
                linestyle=style, linewidth=1.3, label=roof.label)
        ax.axvline(roof.ridge, color="#bbbbbb", linestyle=":", linewidth=1)
        # ridge labels along the bottom, away from the points that crowd the roofs
        ax.text(roof.ridge, 0.02, f" ridge {roof.ridge:.3g} FLOP/B ({roof.key})", transform=ax.get_xaxis_transform(),
                rotation=90, fontsize=7, color="#555555", va="bottom")
    bandwidth = spec.memory_bandwidth
    ax.plot([x_lo, top[0].ridge], [bandwidth * x_lo, top[0].peak], color=MEMORY_COLOR, linewidth=1.6,
            label=f"memory {fmt_bytes(bandwidth)}/s")


def _draw_points(ax, pts: list[Point]) -> None:
    if not pts:
        return
    longest = pts[0].seconds
    ax.scatter([p.intensity for p in pts], [p.flops_per_second for p in pts],
               s=[25 + 700 * p.seconds / longest for p in pts], c=[BOUND_COLOR[p.bound] for p in pts],
               alpha=0.55, edgecolors="black", linewidths=0.5, zorder=3)
    for i, p in enumerate(pts[:NUMBERED], 1):
        ax.annotate(str(i), (p.intensity, p.flops_per_second), ha="center", va="center", fontsize=7,
                    fontweight="bold", zorder=4)


def _legend_handles(ax, pts: list[Point]) -> list:
    handles, _ = ax.get_legend_handles_labels()   # the roofs
    for bound in ("memory", "compute"):
        if any(p.bound == bound for p in pts):
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=8, color=BOUND_COLOR[bound],
                                  alpha=0.6, markeredgecolor="black", label=f"{bound}-bound nodes"))
    return handles


def _draw_list(fig: Figure, pts: list[Point]) -> None:
    """The numbered groups, beside the plot (labels on the plot itself would pile up where nodes cluster)."""
    lines = ["largest by time:"]
    for i, p in enumerate(pts[:NUMBERED], 1):
        label = p.label if len(p.label) <= 44 else "…" + p.label[-43:]
        lines.append(f"{i:>2} {label}\n   {fmt_seconds(p.seconds)} ({p.share:.0%}), {p.bound}-bound, "
                     f"{p.intensity:.3g} FLOP/B")
    fig.text(0.645, 0.91, "\n".join(lines), fontsize=8, family="monospace", va="top", linespacing=1.35)
