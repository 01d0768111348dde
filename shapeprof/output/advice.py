"""The terminal view of `shapeprof.advise`: one table per question, in the order a reader asks them."""
from __future__ import annotations

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..text import fmt_bytes, fmt_flops, fmt_seconds, printable


def _table(title: str, *columns: str) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def _tokens(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def render(adv) -> Group:
    head = Text(f"{printable(adv.model)} on {adv.spec.display_name}, {adv.dtype}, decode context {adv.context:,}",
                style="bold")
    measured = adv.spec.measured
    phases = _table("Prefill and decode (eager" + (")" if measured else ", datasheet roofline)"), "", "FLOPs",
                    "bytes", "weights", "KV read", "KV written", "other", "FLOP/B", "time",
                    *(["achievable"] if measured else []), "tokens/s")
    for name, p in (("prefill", adv.prefill), ("decode", adv.decode)):
        label = (f"prefill {p['batch']}x{p['tokens']:,}" if name == "prefill" else
                 f"decode batch {p['batch']}")
        phases.add_row(label, fmt_flops(p["flops"]), fmt_bytes(p["bytes"]), fmt_bytes(p["weight_bytes"]),
                       fmt_bytes(p["kv_read_bytes"]), fmt_bytes(p["kv_written_bytes"]), fmt_bytes(p["other_bytes"]),
                       f"{p['intensity']:.1f}", fmt_seconds(p["seconds"]),
                       *([fmt_seconds(p["achievable_seconds"])] if measured else []),
                       _tokens(p["tokens_per_second"]))
    parts = [head, phases]
    if adv.accountings.get("decode"):
        acc = _table("Two accountings (eager: every kernel as PyTorch runs it; fused: a serving engine's)", "",
                     "eager bytes", "fused bytes", "eager time", "fused time", "kernels eager / fused",
                     *(["eager / fused with latency floor"] if measured else []))
        for name, a in adv.accountings.items():
            if a:
                e, f = a["eager"], a["fused"]
                acc.add_row(name, fmt_bytes(e["bytes_read"] + e["bytes_written"]),
                            fmt_bytes(f["bytes_read"] + f["bytes_written"]), fmt_seconds(e["predicted_seconds"]),
                            fmt_seconds(f["predicted_seconds"]), f"{e['kernels']:,} / {f['kernels']:,}",
                            *([f"{fmt_seconds(e['seconds_with_floor'])} / {fmt_seconds(f['seconds_with_floor'])}"]
                              if measured else []))
        parts.append(acc)
    sweep = _table("Decode batch sweep" + (f" (tensor parallel x{adv.parallel['degree']})"
                                           if adv.parallel and adv.parallel.get("degree") else ""),
                   "batch", "step", *(["achievable"] if measured else []), "tokens/s", "per sequence", "bound",
                   "KV cache", "fits")
    for r in adv.sweep:
        sweep.add_row(str(r["batch"]), fmt_seconds(r["seconds"]),
                      *([fmt_seconds(r["achievable_seconds"])] if measured else []), _tokens(r["tokens_per_second"]),
                      _tokens(r["per_sequence"]), r["bound"], fmt_bytes(r["kv_bytes"]), "yes" if r["fits"] else "no")
    parts.append(sweep)
    cross = _table("Where each matmul turns compute-bound", "matmul", "calls", "FLOP/B at batch 1", "compute-bound from")
    for c in adv.crossings[:12]:
        cross.add_row(printable(c.group), str(c.calls), f"{c.intensity_at_1:.2f}",
                      f"batch {c.batch:,}" if c.batch else "never")
    parts.append(cross)
    step = adv.step_crossing
    o, f = adv.online, adv.offline
    lines = [f"whole decode step compute-bound from batch {step:,}" if step else
             "whole decode step: memory-bound at every batch (attention reads each sequence's own cache)",
             f"online: every user above {o['reading_tokens_per_second']:.1f} tokens/s ({o['reading_source']}): " +
             (f"batch up to {o['batch']:,}, {_tokens(o['tokens_per_second'])} tokens/s in all, "
              f"{_tokens(o['per_sequence'])} per user" if o.get("batch") else o.get("why", "none")),
             f"offline: batch {f['batch']:,} ({f['why']}): {_tokens(f['tokens_per_second'])} tokens/s, "
             f"{_tokens(f['per_sequence'])} per sequence"]
    m = adv.memory
    lines.append(f"memory: weights {fmt_bytes(m['weights'])}, KV {fmt_bytes(m['kv_per_token'])}/token, "
                 f"{fmt_bytes(m['kv_per_sequence_full_context'])} per sequence at its full {m['full_context']:,} "
                 f"positions; in {m['utilization']:.0%} of {fmt_bytes(m['device_memory'])}: "
                 f"{m['sequences_at_full_context']} at full context, {m['sequences_at_context']} at {adv.context:,}")
    p = adv.parallel
    if p:
        if p.get("degree") and "decode_all_reduce_seconds_per_layer_batch_1" in p:
            lines.append(f"does not fit one device: tensor parallel x{p['degree']} ({fmt_bytes(p['weights_per_device'])}"
                         f" of weights each); all-reduce per layer {fmt_seconds(p['decode_all_reduce_seconds_per_layer_batch_1'])}"
                         f" per decode token, {fmt_seconds(p['prefill_all_reduce_seconds_per_layer'])} per prefill "
                         f"layer, over {fmt_bytes(p['interconnect_each_way'])}/s each way")
        else:
            lines.append(f"does not fit one device: {p['why']}")
    parts.append(Text("\n".join(lines)))
    if adv.shapes is not None:
        parts.append(adv.shapes)
    if adv.notes:
        parts.append(Text("notes:\n" + "\n".join(f"- {printable(n)}" for n in adv.notes), style="dim"))
    return Group(*parts)
