"""What the interactive views show (the SHAPEPROF TensorBoard tab and the one-file HTML report), as plain data.

One function per kind of saved report turns it into a *view*: a JSON-able dict that the page script
(`static/view.js`) lays out without computing anything itself. Both pages show the same view, so they cannot
disagree. The charts are plotly figures built here with plotly's Python API (its JSON is what Plotly.newPlot
takes); the page only draws them and wires clicks to the table.

A view of a Report holds every node, its twin group (`Report.repeat_groups`: the k-th op of every repeat of a
layer) and two versions of each chart: folded (one point per group, the module tree by pattern, `layers.*`) and
unfolded (every node and module). Folded is shown first, so a Llama-405B report of ~5,000 nodes opens with a
few dozen points and rows.

Every string taken from a report (model name, module paths, op names, findings) stays data: the page puts it in
text nodes, and the copies inside chart labels and tooltips are HTML-escaped here because plotly reads a small
set of tags in them.

    >>> import torch, shapeprof
    >>> report = shapeprof.analyze(torch.nn.Linear(64, 64), torch.randn(8, 64))
    >>> view = report_view(report)
    >>> view["kind"], [n["name"] for n in view["report"]["nodes"]], view["report"]["nodes"][0]["flops"]
    ('report', ['linear'], 65536)
"""
from __future__ import annotations

import html
import json
import math
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots
import torch

from ..report import Report
from ..text import fmt_bytes, fmt_flops, fmt_intensity, fmt_seconds
from .tensorboard.plots import BOUND_COLOR, MEMORY_COLOR, group_bound, roofs

__all__ = ["VIEW_SCHEMA", "VIEW_VERSION", "optimize_view", "report_view", "view_of"]

VIEW_SCHEMA = "shapeprof.view"
VIEW_VERSION = 1

#: The node table's columns: key, heading, whether it sorts as a number.
COLUMNS = (("name", "node", False), ("count", "nodes", True), ("module", "module", False), ("op", "op", False),
           ("flops", "FLOPs", True), ("bytes", "bytes", True), ("intensity", "FLOP/B", True),
           ("predicted", "predicted", True), ("measured", "measured", True), ("share", "share", True),
           ("bound", "bound", False), ("output", "output", False))


def view_of(saved: Any, title: str = "") -> dict[str, Any]:
    """The view of a saved report: a `Report` (predicted or measured) or an `OptimizeReport`."""
    if isinstance(saved, Report):
        return report_view(saved, title)
    from ..optimize import OptimizeReport
    if isinstance(saved, OptimizeReport):
        return optimize_view(saved, title)
    raise TypeError(f"no view for a {type(saved).__name__}: give a Report or an OptimizeReport")


# ---------------------------------------------------------------------------------------------- a Report

def report_view(report: Report, title: str = "") -> dict[str, Any]:
    """The view of an analyze or profile report: nodes, twin groups, roofline, module tree, findings."""
    measured = report.total.measured_seconds is not None
    total = report.total.predicted_seconds or 1.0
    nodes, group_rows = [], []
    groups = report.repeat_groups()
    group_of: dict[str, int] = {}
    for gid, group in enumerate(groups):
        for n in group:
            group_of[n.name] = gid
    for i, n in enumerate(report.nodes):
        nodes.append(_row(i, n.name, 1, n.module_path, n.op, n.flops, n.bytes, n.predicted_seconds,
                          n.measured_seconds, n.predicted_seconds / total, n.bound, n.output,
                          module_type=n.module_type, source=n.source, group=group_of[n.name]))
    index = {n.name: i for i, n in enumerate(report.nodes)}
    for gid, group in enumerate(groups):
        first = group[0]
        times = [g.measured_seconds for g in group if g.measured_seconds is not None]
        seconds = sum(g.predicted_seconds for g in group)
        label = f"{report.pattern_of(first) or first.name} · {first.op}"
        group_rows.append(_row(gid, label, len(group), report.pattern_of(first), first.op,
                               sum(g.flops for g in group), sum(g.bytes for g in group), seconds,
                               sum(times) if times else None, seconds / total, group_bound(group), first.output,
                               module_type=first.module_type, source=first.source,
                               members=[index[g.name] for g in group]))
    return {
        "schema": VIEW_SCHEMA, "version": VIEW_VERSION, "kind": "report",
        "title": title or f"{report.model} on {report.spec.display_name}",
        "report": {
            "model": report.model, "spec": report.spec.display_name, "dtype": report.dtype,
            "inputs": list(report.inputs), "measured": measured,
            "summary": _summary(report),
            "columns": [{"key": k, "label": label, "numeric": num} for k, label, num in COLUMNS
                        if measured or k != "measured"],
            "nodes": nodes, "groups": group_rows,
            "figures": {"roofline_groups": _roofline(report, group_rows, measured),
                        "roofline_nodes": _roofline(report, nodes, measured),
                        "tree_groups": _tree(report, repeats=True),
                        "tree_nodes": _tree(report, repeats=False)},
            "findings": [{"pattern": f.pattern, "op": f.op, "nodes": f.nodes, "share": f.share,
                          "text": f"{f.pattern} · {f.op}: {f.nodes} node{'s' if f.nodes != 1 else ''}, "
                                  f"{f.share:.0%} of the time, {fmt_intensity(f.intensity)} FLOP/B "
                                  f"(ridge {f.ridge:.3g})",
                          "why": f.why, "suggestion": f.suggestion} for f in report.findings],
            "coverage": [f"{o.op}: {o.count} call{'s' if o.count != 1 else ''}, {fmt_bytes(o.bytes)} "
                         f"({o.share_of_bytes:.1%} of the bytes), FLOPs unknown (first: {o.first_node})"
                         for o in report.coverage.ops],
            "notes": list(report.notes),
        },
    }


def _row(id_: int, name: str, count: int, module: str, op: str, flops: int, nbytes: int, predicted: float,
         measured: float | None, share: float, bound: str, output: str, **extra: Any) -> dict[str, Any]:
    """One table row (a node or a group): raw values to sort on, and `text`: how each cell reads."""
    intensity = flops / nbytes if nbytes else None     # JSON has no inf: None reads as 'no bytes'
    row = {"id": id_, "name": name, "count": count, "module": module, "op": op, "flops": flops, "bytes": nbytes,
           "intensity": intensity, "predicted": predicted, "measured": measured, "share": share, "bound": bound,
           "output": output, **extra}
    row["text"] = {"name": name, "count": str(count), "module": module or "(model)", "op": op,
                   "flops": fmt_flops(flops), "bytes": fmt_bytes(nbytes),
                   "intensity": fmt_intensity(intensity) if intensity is not None else "no bytes",
                   "predicted": fmt_seconds(predicted),
                   "measured": fmt_seconds(measured) if measured is not None else "",
                   "share": f"{share:.1%}", "bound": bound, "output": output}
    return row


def _summary(report: Report) -> list[list[str]]:
    t = report.total
    rows = [["model", report.model], ["device", report.spec.display_name],
            ["dtype", report.dtype or "as run"], ["inputs", ", ".join(report.inputs)],
            ["nodes", f"{len(report.nodes):,}"], ["FLOPs", fmt_flops(t.flops)], ["bytes moved", fmt_bytes(t.bytes)],
            ["intensity", f"{fmt_intensity(t.intensity)} FLOP/B"], ["predicted", fmt_seconds(t.predicted_seconds)]]
    if t.measured_seconds is not None:
        rows.append(["measured", fmt_seconds(t.measured_seconds)])
    if report.phase is not None:
        p = report.phase
        rows.append(["phase", f"{p.kind}, batch {p.batch}" + (f", context {p.context}" if p.kind == "decode"
                                                                else f", {p.tokens} tokens")])
    rows.append(["parameters", fmt_bytes(report.parameter_bytes)])
    if report.training is not None:   # analyze(train=...): the step, phase by phase; the nodes are its forward
        tr = report.training
        rows.append(["training step", f"{fmt_seconds(tr.seconds)} predicted, MFU {tr.mfu:.1%}, HFU {tr.hfu:.1%} ("
                     + ", ".join(f"{k} {fmt_seconds(p.predicted_seconds)}" for k, p in tr.phases.items()) + ")"])
        rows.append(["training memory", ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}"
                                                  for k, v in tr.memory.items())])
    return rows


def _escaped(text: str) -> str:
    """`text` as plotly shows it literally: it reads <b>, <br>, <a> ... in labels and tooltips."""
    return html.escape(text, quote=False)


def _roofline(report: Report, rows: list[dict[str, Any]], measured: bool) -> dict[str, Any]:
    """Log-log FLOP/s against FLOP/byte: the memory roof, the compute roofs and ridges, one point per row (area =
    time), red memory-bound and green compute-bound; the measured speeds as open circles where a profile ran."""
    spec = report.spec
    top = roofs(spec, getattr(torch, report.dtype) if report.dtype else torch.float32)
    drawn = [r for r in rows if r["flops"] and r["bytes"] and r["predicted"]]
    xs = [r["intensity"] for r in drawn] + [roof.ridge for roof in top]
    x_lo, x_hi = min(xs) / 4, max(xs) * 4
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[x_lo, top[0].ridge], y=[spec.memory_bandwidth * x_lo, top[0].peak], mode="lines",
                             name=f"memory {fmt_bytes(spec.memory_bandwidth)}/s", hoverinfo="skip",
                             line={"color": MEMORY_COLOR, "width": 2}))
    for roof in top:
        fig.add_trace(go.Scatter(x=[roof.ridge, x_hi], y=[roof.peak, roof.peak], mode="lines", hoverinfo="skip",
                                 name=_escaped(roof.label),
                                 line={"color": "#888888" if roof.possible else "black",
                                       "dash": "dot" if roof.possible else "solid", "width": 1.5}))
        fig.add_vline(x=roof.ridge, line={"color": "#bbbbbb", "dash": "dot", "width": 1})
        fig.add_annotation(x=math.log10(roof.ridge), y=0, yref="paper", yanchor="bottom", textangle=-90,
                           showarrow=False, font={"size": 9, "color": "#555555"},
                           text=f"ridge {roof.ridge:.3g} FLOP/B ({roof.key})")
    longest = max((r["predicted"] for r in drawn), default=1.0)
    template = ("<b>%{customdata[1]}</b><br>module %{customdata[2]}<br>op %{customdata[3]}<br>"
                "FLOPs %{customdata[4]}<br>bytes %{customdata[5]}<br>intensity %{customdata[6]} FLOP/B<br>"
                "predicted %{customdata[7]}" + ("<br>measured %{customdata[8]}" if measured else "")
                + "<extra></extra>")
    for bound in ("memory", "compute"):
        mine = [r for r in drawn if r["bound"] == bound]
        if not mine:
            continue
        fig.add_trace(go.Scatter(
            x=[r["intensity"] for r in mine], y=[r["flops"] / r["predicted"] for r in mine], mode="markers",
            name=f"{bound}-bound (predicted)", customdata=[_hover(r) for r in mine], hovertemplate=template,
            marker={"color": BOUND_COLOR[bound], "opacity": 0.6, "line": {"color": "black", "width": 0.5},
                    "size": [r["predicted"] for r in mine], "sizemode": "area", "sizemin": 4,
                    "sizeref": 2 * longest / 40 ** 2}))
    timed = [r for r in drawn if measured and r["measured"]]
    if timed:
        fig.add_trace(go.Scatter(
            x=[r["intensity"] for r in timed], y=[r["flops"] / r["measured"] for r in timed], mode="markers",
            name="measured", customdata=[_hover(r) for r in timed], hovertemplate=template,
            marker={"symbol": "circle-open", "color": "#333333", "size": 9, "line": {"width": 1.5}}))
    fig.update_layout(
        xaxis={"type": "log", "title": {"text": "arithmetic intensity (FLOP / byte moved)"}, "range":
               [math.log10(x_lo), math.log10(x_hi)]},
        yaxis={"type": "log", "title": {"text": "FLOP/s"}}, height=520, margin={"l": 70, "r": 20, "t": 30, "b": 60},
        legend={"x": 0.01, "y": 0.99, "bgcolor": "rgba(255,255,255,0.85)", "itemsizing": "constant"},
        hovermode="closest",
        plot_bgcolor="white", paper_bgcolor="white")
    fig.update_xaxes(showgrid=True, gridcolor="#eeeeee")
    fig.update_yaxes(showgrid=True, gridcolor="#eeeeee")
    return {"figure": _plain(fig), "left_out": len(rows) - len(drawn)}


def _hover(row: dict[str, Any]) -> list:
    """customdata of a point: [row id, then the tooltip's fields, each escaped text]."""
    t = row["text"]
    name = row["name"] + (f" ×{row['count']}" if row["count"] > 1 else "")
    return [row["id"], *map(_escaped, (name, t["module"], t["op"], t["flops"], t["bytes"], t["intensity"],
                                      t["predicted"], t["measured"]))]


def _tree(report: Report, *, repeats: bool) -> dict[str, Any]:
    """The module tree as a plotly treemap: each module's area its share of the predicted time (its nodes and
    its children's). With `repeats`, repeated layers are one module (`layers.*`) holding all of their time."""
    seconds: dict[str, float] = {"": 0.0}
    for n in report.nodes:
        path = report.pattern_of(n) if repeats else n.module_path
        parts = path.split(".") if path else []
        for depth in range(len(parts) + 1):
            key = ".".join(parts[:depth])
            seconds[key] = seconds.get(key, 0.0) + n.predicted_seconds
    total = seconds[""] or 1.0
    ids = list(seconds)
    fig = go.Figure(go.Treemap(
        ids=[_escaped(i) or "(model)" for i in ids],   # keys, not shown: escaped all the same, parents alike
        parents=["" if not i else (_escaped(i.rpartition(".")[0]) or "(model)") for i in ids],
        labels=[_escaped(i.rpartition(".")[2] if i else report.model) for i in ids],
        values=[seconds[i] for i in ids], branchvalues="total",
        customdata=[[_escaped(i or "(model)"), fmt_seconds(seconds[i]), f"{seconds[i] / total:.1%}"] for i in ids],
        hovertemplate="<b>%{customdata[0]}</b><br>predicted %{customdata[1]} (%{customdata[2]})<extra></extra>",
        maxdepth=4, textinfo="label+percent root"))
    fig.update_layout(height=480, margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return {"figure": _plain(fig)}


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else ""


def _plain(fig: go.Figure) -> dict[str, Any]:
    """The figure as JSON-able data (plotly's own encoder, then plain dicts and lists)."""
    return json.loads(fig.to_json())


# ---------------------------------------------------------------------------------------------- optimize

def optimize_view(report: Any, title: str = "") -> dict[str, Any]:
    """The view of an OptimizeReport: before and after side by side, and what each rewrite changed."""
    before = report.predicted_seconds
    after = before - report.seconds_saved
    m = report.measurement
    sides = [["predicted time", fmt_seconds(before), fmt_seconds(after), _change(before, after)],
             ["main-memory traffic removed", "", fmt_bytes(report.bytes_saved), ""]]
    if m is not None:
        sides.append([f"measured on {m.device} (median per call)", fmt_seconds(m.original_seconds),
                      fmt_seconds(m.optimized_seconds), _change(m.original_seconds, m.optimized_seconds)])
    # predicted (on the spec) and measured (on this machine) differ by orders of magnitude: an axis each
    bars = [("predicted on " + report.spec.display_name, before, after)]
    if m is not None:
        bars.append((f"measured on {m.device}", m.original_seconds, m.optimized_seconds))
    fig = make_subplots(rows=1, cols=len(bars), subplot_titles=[_escaped(b[0]) for b in bars])
    for col, (_, was, now) in enumerate(bars, 1):
        for name, value, color in (("before", was, "#7f7f7f"), ("after", now, "#2ca02c")):
            fig.add_trace(go.Bar(name=name, x=[name], y=[value], marker_color=color, showlegend=False,
                                 text=[fmt_seconds(value)], textposition="outside",
                                 hovertemplate=f"{name}: {fmt_seconds(value)}<extra></extra>"), row=1, col=col)
        fig.update_yaxes(title_text="seconds", rangemode="tozero", row=1, col=col)
    fig.update_layout(height=340, margin={"l": 70, "r": 20, "t": 40, "b": 40})
    rewrites = []
    for o in report.outcomes:
        r = o.result
        rewrites.append({
            "name": o.name, "status": o.status, "error": o.error,
            "verification": o.verification.summary() if o.verification is not None else "",
            "applied": [{"where": a.where, "what": a.what, "bytes_saved": fmt_bytes(a.bytes_saved),
                         "seconds_saved": fmt_seconds(a.seconds_saved)} for a in (r.applied if r else [])],
            "skipped": [{"where": s.where, "reason": s.reason} for s in (r.skipped if r else [])],
            "notes": list(r.notes) if r else []})
    summary = [["model", report.model], ["device", report.spec.display_name], ["dtype", report.dtype or "as run"],
               ["verified", "yes" if report.verified else "no"],
               ["graphs", ", ".join(f"{g.path or '(model)'} ({g.method}, {g.nodes} nodes)" for g in report.graphs)]]
    if m is not None:
        summary.append(["measured speedup", f"{m.speedup:.2f}x"])
    return {"schema": VIEW_SCHEMA, "version": VIEW_VERSION, "kind": "optimize",
            "title": title or f"{report.model}: optimize on {report.spec.display_name}",
            "optimize": {"model": report.model, "summary": summary, "sides": sides, "refused": report.refused,
                         "rewrites": rewrites, "figure": {"figure": _plain(fig)},
                         "not_captured": [f"{p or '(model)'}: {why}" for p, why in report.not_captured]}}
