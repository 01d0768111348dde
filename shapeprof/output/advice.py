"""The views of `shapeprof.advise`: the terminal's tables (one per question, in the order a reader asks them), and
TensorBoard's Text (the same tables in markdown) and Images (the batch sweep)."""
from __future__ import annotations

import os
from pathlib import Path

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
                         f"layer, over {fmt_bytes(p['interconnect_each_way'])}/s each way ({p['model']})")
        else:
            lines.append(f"does not fit one device: {p['why']}")
    parts.append(Text("\n".join(lines)))
    if adv.shapes is not None:
        parts.append(adv.shapes)
    if adv.speculative is not None:
        parts.append(_speculative(adv.speculative))
    if adv.notes:
        parts.append(Text("notes:\n" + "\n".join(f"- {printable(n)}" for n in adv.notes), style="dim"))
    return Group(*parts)


def _speculative(sd) -> Group:
    """A short section: per batch the speedup at the reference point and the break-even rate; all of it in
    `print(adv.speculative)`."""
    a, g = sd.reference()
    t = _table(f"Speculative decoding with {printable(sd.draft)} as the draft (context {sd.context:,}; "
               f"print(adv.speculative) for every rate and draft length)", "batch", "target step", "draft step",
               f"verify g={g}", f"speedup a={a:g}, g={g}", f"break-even a at g={g}", f"best g at a={a:g}")
    for b in sd.batches:
        st = sd.step_times(b, g)
        be = sd.break_even(g, b)
        best = next(r for r in sd.best(b) if r["acceptance"] == a)
        t.add_row(str(b), fmt_seconds(st["target"]), fmt_seconds(st["draft"]), fmt_seconds(st["verify"]),
                  f"{sd.speedup(a, g, b):.2f}x", f"{be:.3f}" if be is not None else "never",
                  f"{best['draft_tokens']} ({best['speedup']:.2f}x)")
    return Group(t)


# ---------------------------------------------------------------------------------------------- TensorBoard

def markdown_sections(adv) -> dict[str, str]:
    """Tag -> markdown, one per question: what TensorBoard's Text tab shows."""
    from .markdown import table
    out = {}
    out["phases"] = table(["", "FLOPs", "bytes", "weights", "KV read", "KV written", "other", "time", "tokens/s"], [
        [name, fmt_flops(p["flops"]), fmt_bytes(p["bytes"]), fmt_bytes(p["weight_bytes"]), fmt_bytes(p["kv_read_bytes"]),
         fmt_bytes(p["kv_written_bytes"]), fmt_bytes(p["other_bytes"]), fmt_seconds(p["seconds"]),
         _tokens(p["tokens_per_second"])] for name, p in (("prefill", adv.prefill), ("decode", adv.decode))])
    out["sweep"] = table(["batch", "step", "achievable", "tokens/s", "per sequence", "bound", "KV cache", "fits"], [
        [r["batch"], fmt_seconds(r["seconds"]), fmt_seconds(r["achievable_seconds"]), _tokens(r["tokens_per_second"]),
         _tokens(r["per_sequence"]), r["bound"], fmt_bytes(r["kv_bytes"]), "yes" if r["fits"] else "no"]
        for r in adv.sweep])
    out["crossings"] = table(["matmul", "calls", "FLOP/B at batch 1", "compute-bound from"], [
        [printable(c.group), c.calls, f"{c.intensity_at_1:.2f}", f"batch {c.batch:,}" if c.batch else "never"]
        for c in adv.crossings])
    o, f, m = adv.online, adv.offline, adv.memory
    out["batches"] = "\n\n".join([
        f"**online** (every user above {o['reading_tokens_per_second']:.1f} tokens/s, {o['reading_source']}): " +
        (f"batch {o['batch']:,}, {_tokens(o['tokens_per_second'])} tokens/s" if o.get("batch") else o["why"]),
        f"**offline**: batch {f['batch']:,}, {_tokens(f['tokens_per_second'])} tokens/s",
        f"**memory**: weights {fmt_bytes(m['weights'])}, KV {fmt_bytes(m['kv_per_token'])} per token, "
        f"{m['sequences_at_full_context']} sequences at full context ({m['full_context']:,})"])
    if adv.notes:
        out["notes"] = "\n".join(f"- {printable(n)}" for n in adv.notes)
    return out


def sweep_figure(adv):
    """Tokens/s in all and per sequence against the batch (log-log), with reading speed and the memory limit."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    batches = [r["batch"] for r in adv.sweep]
    ax.plot(batches, [r["tokens_per_second"] for r in adv.sweep], "o-", label="tokens/s, all sequences")
    ax.plot(batches, [r["per_sequence"] for r in adv.sweep], "s-", label="tokens/s per sequence")
    ax.axhline(adv.online["reading_tokens_per_second"], color="#7f7f7f", ls="--", label="reading speed")
    if adv.offline.get("batch"):
        ax.axvline(adv.offline["batch"], color="#d62728", ls=":", label="largest batch that fits")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences decoding together)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{adv.model} decode, context {adv.context:,}, {adv.spec.name}, {adv.dtype}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def write_tensorboard(adv, logdir: str | os.PathLike, run: str = "advise") -> Path:
    """Text (`advise/<section>`) and Images (`advise/sweep`) in a new run folder `logdir`/`run`, written whole."""
    from torch.utils.tensorboard import SummaryWriter

    from ..files import new_folder
    with new_folder(logdir, run) as (staging, target):
        writer = SummaryWriter(log_dir=str(staging))
        try:
            for tag, text in markdown_sections(adv).items():
                writer.add_text(f"advise/{tag}", text, global_step=0)
            writer.add_figure("advise/sweep", sweep_figure(adv), global_step=0)
        finally:
            writer.close()
    return target
