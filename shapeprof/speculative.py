"""speculative(): whether a draft model pays for a target, priced from both models' own graphs.

Speculative decoding (Leviathan, Kalman and Matias, "Fast Inference from Transformers via Speculative Decoding",
ICML 2023) lets a small draft model propose `g` tokens, one cheap decode step each, and the target verify all of
them in one forward with `g + 1` query positions per sequence against its cache. While a decode step is
memory-bound that forward costs about what one step does (every weight is read once either way), so each iteration
yields several tokens for little more than one target step. How many: with each drafted token accepted with
probability `a`, independently, an iteration yields on average

    E(a, g) = (1 - a^(g + 1)) / (1 - a)        (g + 1 at a = 1)

tokens, and takes `g T_draft + T_verify(g)`. Against plain decoding, one token per target step `T_target`:

    speedup(a, g, b) = E(a, g) x T_target(b) / (g T_draft(b) + T_verify(g, b))

Each T is shapeprof's own analysis of one step on the spec: `Decode(b, context)` for the target and the draft,
`Decode(b, context, tokens=g + 1)` for the verification. As the batch grows the verification's matmuls, with
b (g + 1) rows, turn compute-bound long before a step's b rows do, T_verify(g) outgrows T_target and the speedup
shrinks: that is the batch sweep shown.

What it leaves out: the draft's steps are priced at `context` (their caches hold context ... context + g - 1
positions; a difference of g positions), sampling and the acceptance test itself (a few elementwise ops over the
vocabulary), and tensor parallelism (a target sharded over several GPUs divides its steps, not the draft's, by
about the degree: the speedup is then lower than shown).

    >>> import torch, shapeprof
    >>> from examples.nanogpt import GPT, GPTConfig
    >>> with torch.device("meta"):
    ...     target = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=256, block_size=128))
    ...     draft = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=256, block_size=128))
    >>> sd = shapeprof.speculative(target, draft, spec="h100-sxm", context=64, batches=(1,), draft_tokens=(2, 4))
    >>> sd.speedup(acceptance=0.0, draft_tokens=2, batch=1) < 1 < sd.speedup(acceptance=0.9, draft_tokens=4, batch=1)
    True
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from .hardware import DeviceSpec, get_spec
from .phases import Decode, reusing_captures
from .phases import resolve as resolve_phase
from .precision import resolve as resolve_precision

__all__ = ["CITATION", "Speculative", "expected_tokens", "speculative", "vocabulary"]

CITATION = ("Leviathan, Kalman, Matias, \"Fast Inference from Transformers via Speculative Decoding\", ICML 2023 "
            "(arXiv:2211.17192)")
ACCEPTANCE = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DRAFT_TOKENS = tuple(range(1, 9))
BATCHES = (1, 8, 32, 64)
_TOLERANCE = 1e-6      # break_even: |speedup - 1| at the rate returned is below this
_REFERENCE = (0.8, 4)  # the (acceptance, draft length) the summary follows across batches, where priced


def expected_tokens(acceptance: float, draft_tokens: int) -> float:
    """E(a, g) = (1 - a^(g + 1)) / (1 - a): tokens one iteration yields on average (g + 1 at a = 1).

    The accepted prefix of g drafted tokens, each accepted with probability a, plus the one token the target
    always adds (its correction at the first rejection, or the next token after all g)."""
    a, g = acceptance, draft_tokens
    if a >= 1.0:
        return float(g + 1)
    return (1.0 - a ** (g + 1)) / (1.0 - a)


@dataclass(frozen=True)
class Step:
    """One analysed decode step: what the speedups are computed from (`seconds`) and why it costs that."""

    seconds: float            # the time used: the roofline's, or what real kernels reach where the spec measured it
    roofline_seconds: float   # each op max(F / peak, bytes / bandwidth), summed
    flops: int
    bytes: int
    compute_share: float      # of the roofline time, the share in compute-bound ops
    tokens: int               # query positions per sequence
    kv_read_bytes: int
    weight_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "roofline_seconds": self.roofline_seconds, "flops": self.flops,
                "bytes": self.bytes, "compute_share": self.compute_share, "tokens": self.tokens,
                "kv_read_bytes": self.kv_read_bytes, "weight_bytes": self.weight_bytes}


@dataclass(frozen=True)
class Speculative:
    """What `speculative` found: per batch the three step times, and every speedup computed from them.

    `print(sd)` shows, per batch, speedup by acceptance rate (rows) and draft length (columns), the break-even rate
    per draft length, and how the speedup shrinks as the batch grows. `to_dict()` keeps all of it."""

    target: str
    draft: str
    spec: DeviceSpec
    dtype: str
    context: int
    batches: tuple[int, ...]
    acceptance: tuple[float, ...]
    draft_tokens: tuple[int, ...]
    # batch -> {"target", "draft": Step, "verify": {g: Step}}
    steps: Mapping[int, Mapping[str, Any]] = field(repr=False)
    timing: str = "roofline"          # or "achievable": the spec's measured latency floor and achieved peaks
    vocab: int | None = None
    analyses: int = 0                 # analyze() calls made (each distinct step once)
    seconds: float = 0.0              # wall time speculative() took
    notes: tuple[str, ...] = ()

    # ---- the numbers

    def step_times(self, batch: int, draft_tokens: int) -> dict[str, float]:
        """{"target": T_target, "draft": T_draft, "verify": T_verify(g)} in seconds: every speedup's inputs."""
        s = self._steps(batch)
        return {"target": s["target"].seconds, "draft": s["draft"].seconds,
                "verify": s["verify"][self._g(draft_tokens)].seconds}

    def speedup(self, acceptance: float, draft_tokens: int, batch: int) -> float:
        """E(a, g) x T_target / (g T_draft + T_verify(g)) at `batch`: tokens per second against plain decoding."""
        a = _acceptance(acceptance)
        t = self.step_times(batch, draft_tokens)
        return expected_tokens(a, draft_tokens) * t["target"] / (draft_tokens * t["draft"] + t["verify"])

    def break_even(self, draft_tokens: int, batch: int) -> float | None:
        """The acceptance rate in [0, 1) at which speculating `draft_tokens` ahead neither gains nor loses (speedup
        1, to 1e-6), by bisection: the speedup rises with the rate. None when even a rate of 1 does not break even
        (g + 1 tokens for the iteration's cost are worth less than g + 1 target steps); 0.0 when a rate of 0
        already does."""
        def f(a: float) -> float:
            return self.speedup(a, draft_tokens, batch) - 1.0
        if f(0.0) >= 0.0:
            return 0.0
        if f(1.0) <= 0.0:
            return None
        lo, hi = 0.0, 1.0
        while hi - lo > 1e-15:         # f's slope is at most g (g + 1) / 2: this leaves |f| far under 1e-6
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if f(mid) < 0.0:
                lo = mid
            else:
                hi = mid
        a = lo if abs(f(lo)) <= abs(f(hi)) else hi
        return a if a < 1.0 else math.nextafter(1.0, 0.0)

    def best(self, batch: int) -> list[dict[str, Any]]:
        """Per acceptance rate, the draft length with the largest speedup at `batch` (and that speedup)."""
        out = []
        for a in self.acceptance:
            s, g = max((self.speedup(a, g, batch), g) for g in self.draft_tokens)
            out.append({"acceptance": a, "draft_tokens": g, "speedup": s})
        return out

    def verify_ratio(self, batch: int, draft_tokens: int) -> float:
        """T_verify(g) / T_target: what verifying g + 1 positions costs in target steps (1 while memory-bound)."""
        t = self.step_times(batch, draft_tokens)
        return t["verify"] / t["target"]

    def _steps(self, batch: int) -> Mapping[str, Any]:
        if batch not in self.steps:
            raise ValueError(f"batch {batch!r} was not priced: this result holds batches {list(self.batches)}")
        return self.steps[batch]

    def _g(self, draft_tokens: int) -> int:
        if draft_tokens not in self.draft_tokens:
            raise ValueError(f"draft_tokens={draft_tokens!r} was not priced: this result holds "
                             f"{list(self.draft_tokens)}")
        return draft_tokens

    # ---- outputs

    def to_dict(self) -> dict[str, Any]:
        batches = []
        for b in self.batches:
            s = self.steps[b]
            batches.append({
                "batch": b,
                "step_times": {"target": s["target"].seconds, "draft": s["draft"].seconds,
                               "verify": {str(g): s["verify"][g].seconds for g in self.draft_tokens}},
                "steps": {"target": s["target"].to_dict(), "draft": s["draft"].to_dict(),
                          "verify": {str(g): s["verify"][g].to_dict() for g in self.draft_tokens}},
                "speedup": [[self.speedup(a, g, b) for g in self.draft_tokens] for a in self.acceptance],
                "break_even": {str(g): self.break_even(g, b) for g in self.draft_tokens},
                "best": self.best(b)})
        return {"target": self.target, "draft": self.draft, "spec": self.spec.name, "dtype": self.dtype,
                "context": self.context, "timing": self.timing, "vocab": self.vocab,
                "acceptance": list(self.acceptance), "draft_tokens": list(self.draft_tokens),
                "formula": "speedup = E(a, g) * T_target / (g * T_draft + T_verify(g)), "
                           "E(a, g) = (1 - a**(g + 1)) / (1 - a)",
                "citation": CITATION, "batches": batches, "analyses": self.analyses, "seconds": self.seconds,
                "notes": list(self.notes)}

    def reference(self) -> tuple[float, int]:
        """The (acceptance, draft length) the summary follows across batches: (0.8, 4) where priced."""
        a, g = _REFERENCE
        if a not in self.acceptance:
            a = self.acceptance[len(self.acceptance) // 2]
        if g not in self.draft_tokens:
            g = self.draft_tokens[len(self.draft_tokens) // 2]
        return a, g

    def summary(self) -> str:
        """One line per batch at the reference point: speedup, break-even rate, verification in target steps."""
        a, g = self.reference()
        lines = []
        for b in self.batches:
            be = self.break_even(g, b)
            v = self.steps[b]["verify"][g]
            lines.append(f"batch {b}: {self.speedup(a, g, b):.2f}x at a={a:g}, g={g}, break-even a="
                         + (f"{be:.3f}" if be is not None else "never") +
                         f"; verifying {g + 1} positions: {self.verify_ratio(b, g):.2f} target steps, "
                         f"{v.compute_share:.0%} compute-bound")
        return "\n".join(lines)

    def __rich__(self):
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from .text import fmt_seconds, printable
        timing = ("what real kernels reach (the spec's latency floor, achieved peaks)" if self.timing == "achievable"
                  else "datasheet roofline")
        parts = [Text(f"Speculative decoding on {self.spec.display_name}, {self.dtype}, context {self.context:,}: "
                      f"target {printable(self.target)}, draft {printable(self.draft)}", style="bold"),
                 Text("speedup at acceptance rate a and draft length g = E(a, g) x T_target / (g T_draft + "
                      "T_verify(g)),\nE(a, g) = (1 - a^(g+1)) / (1 - a) tokens per iteration (Leviathan et al. "
                      f"2023); times: {timing}")]
        for b in self.batches:
            s = self.steps[b]
            ratios = [self.verify_ratio(b, g) for g in self.draft_tokens]
            table = Table(title=f"batch {b}: target step {fmt_seconds(s['target'].seconds)}, draft step "
                                f"{fmt_seconds(s['draft'].seconds)}, verify(g) {min(ratios):.2f}-{max(ratios):.2f} "
                                f"target steps", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
            table.add_column("acceptance", justify="left")
            for g in self.draft_tokens:
                table.add_column(f"g={g}", justify="right")
            table.add_column("best", justify="right")
            for row in self.best(b):
                a = row["acceptance"]
                table.add_row(f"{a:.2f}", *(f"{self.speedup(a, g, b):.2f}x" for g in self.draft_tokens),
                              f"g={row['draft_tokens']}")
            table.add_row("break-even", *(_rate(self.break_even(g, b)) for g in self.draft_tokens), "")
            parts.append(table)
        a, g = self.reference()
        lo, hi = self.batches[0], self.batches[-1]
        lines = [self.summary()]
        if hi != lo:
            change = "shrinks" if self.speedup(a, g, hi) < self.speedup(a, g, lo) else "does not shrink"
            share = self.steps[hi]["verify"][g].compute_share
            why = (f"its {hi} x {g + 1} rows turn its matmuls compute-bound ({share:.0%} of its time) before a "
                   f"step's {hi} rows do" if share >= 0.5 else
                   f"what grows with the positions verified (activations, attention over the cache) outgrows the "
                   f"weights read once ({share:.0%} of its time compute-bound)")
            lines.append(f"from batch {lo} to {hi} the speedup at a={a:g}, g={g} {change} "
                         f"({self.speedup(a, g, lo):.2f}x -> {self.speedup(a, g, hi):.2f}x): verifying {g + 1} "
                         f"positions costs {self.verify_ratio(lo, g):.2f} target steps at batch {lo} and "
                         f"{self.verify_ratio(hi, g):.2f} at batch {hi}, as {why}")
        lines.append("break-even: the acceptance rate below which speculating g tokens ahead is slower than plain "
                     "decoding (never: not even at a rate of 1)")
        parts.append(Text("\n".join(lines)))
        if self.notes:
            parts.append(Text("notes:\n" + "\n".join(f"- {printable(n)}" for n in self.notes), style="dim"))
        return Group(*parts)

    def __str__(self) -> str:
        from rich.console import Console
        buf = io.StringIO()
        Console(file=buf, width=110, color_system=None).print(self)
        return buf.getvalue()


def _rate(a: float | None) -> str:
    return "never" if a is None else f"{a:.3f}"


def _acceptance(a: Any) -> float:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance must be a rate in [0, 1], got {a!r}")
    return float(a)


def _positive_ints(name: str, values: Iterable[int]) -> tuple[int, ...]:
    out = tuple(values)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"{name} must be positive ints, got {list(out)!r}")
    return tuple(sorted(set(out)))


def vocabulary(model: nn.Module) -> int | None:
    """The model's vocabulary size: a HuggingFace config's `vocab_size`; else the output head's out_features where
    an embedding table has as many rows, else the first embedding table's rows, else the last Linear's outputs."""
    from .capture import unwrap
    from .phases import _is_hf
    model = unwrap(model)
    if _is_hf(model):
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        size = getattr(cfg, "vocab_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    tables = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1].out_features if linears else None
    if head is not None and head in tables:
        return head
    return tables[0] if tables else head


def speculative(target: nn.Module, draft: nn.Module, spec: str | DeviceSpec | None = None,
                dtype: torch.dtype | str | None = None, context: int = 4096, batches: Iterable[int] = BATCHES,
                acceptance: Iterable[float] = ACCEPTANCE, draft_tokens: Iterable[int] = DRAFT_TOKENS) -> Speculative:
    """Speculative decoding of `target` with `draft` on `spec`: speedup by acceptance rate, draft length and batch.

        >>> import torch, shapeprof
        >>> from examples.llama import LlamaConfig, Transformer
        >>> with torch.device("meta"):
        ...     target = Transformer(LlamaConfig.tiny(dim=256, n_layers=4))
        ...     draft = Transformer(LlamaConfig.tiny())
        >>> sd = shapeprof.speculative(target, draft, spec="h100-sxm", dtype=torch.bfloat16, context=64,
        ...                            batches=(1, 64), draft_tokens=(4,))
        >>> sorted(sd.step_times(batch=1, draft_tokens=4))
        ['draft', 'target', 'verify']
        >>> abs(sd.speedup(sd.break_even(draft_tokens=4, batch=1), 4, batch=1) - 1) < 1e-6
        True

    Args:
        target: the model whose tokens are wanted; draft: the small one that proposes them. Both decoders
            `shapeprof.Decode` takes (HuggingFace causal LMs, models without a cache such as nanoGPT or a
            hand-written Llama, or ones that keep their own and take `start_pos`), on meta or with weights: nothing
            runs. They must share a vocabulary (the target scores the draft's token ids).
        spec: a built-in name, a spec file or a DeviceSpec (default A100-80GB SXM); both run on it.
        dtype: what weights, activations and caches are priced in (None: the models' own).
        context: positions cached before the iteration.
        batches: sequences decoding together; acceptance: the rates shown; draft_tokens: the draft lengths g.

    Returns:
        A `Speculative`: `speedup(acceptance, draft_tokens, batch)`, `break_even(draft_tokens, batch)`,
        `step_times(batch, draft_tokens)`, `best(batch)`, `to_dict()`, and the tables when printed.

    Raises:
        ValueError: different vocabularies, a context the models cannot hold, or bad sweep values (one line).
    """
    from .advice import achievable_seconds
    from .analysis import analyze
    started = time.perf_counter()
    device = get_spec(spec)
    precision = resolve_precision(dtype)
    batches = _positive_ints("batches", batches)
    gs = _positive_ints("draft_tokens", draft_tokens)
    rates = tuple(sorted({_acceptance(a) for a in acceptance}))
    if not rates:
        raise ValueError("acceptance must name at least one rate")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive int, got {context!r}")
    names = (type(target).__name__, type(draft).__name__)
    vt, vd = vocabulary(target), vocabulary(draft)
    if vt is not None and vd is not None and vt != vd:
        raise ValueError(f"draft and target vocabularies differ: target {names[0]} has {vt:,} tokens, draft "
                         f"{names[1]} {vd:,}: the target cannot verify the draft's token ids")
    measured = device.measured
    priced: dict[tuple[int, Decode], Step] = {}

    def price(model: nn.Module, phase: Decode) -> Step:
        key = (id(model), phase)        # the same model's same step is analysed once
        if key not in priced:
            r = analyze(model, phase, spec=device, dtype=dtype)
            t = r.total
            priced[key] = Step(achievable_seconds(r, device, precision) if measured else t.predicted_seconds,
                               t.predicted_seconds, t.flops, t.bytes,
                               t.compute_seconds / t.predicted_seconds if t.predicted_seconds else 0.0,
                               phase.tokens, r.phase.kv_read_bytes, r.phase.weight_bytes)
        return priced[key]

    notes = []
    with reusing_captures():    # each model's graph (and its inserted cache) captured once for all its steps
        for model, name, extra in ((target, "target", max(gs) + 1), (draft, "draft", max(gs))):
            limit = resolve_phase(model, Decode(1, 1), precision.dtype).max_context
            if limit is not None and context + extra > limit:
                raise ValueError(f"context={context}: the {name} {type(model).__name__} holds at most {limit} "
                                 f"positions, and its step adds {extra}")
        steps: dict[int, dict[str, Any]] = {}
        for b in batches:
            steps[b] = {"target": price(target, Decode(b, context)), "draft": price(draft, Decode(b, context)),
                        "verify": {g: price(target, Decode(b, context, tokens=g + 1)) for g in gs}}
    weights = steps[batches[0]]["target"].weight_bytes
    if weights > device.memory_capacity:
        notes.append(f"the target's weights ({weights / 1e9:.0f} GB in {precision.name}) exceed one "
                     f"{device.display_name}: sharded over several, its steps take about 1/degree of these times and "
                     f"the draft's do not, so the speedups are lower than shown")
    if vt is None or vd is None:
        notes.append("a vocabulary size could not be read off one of the models: not compared")
    notes.append("times are " + ("what real kernels reach on the spec (its latency floor, achieved bandwidth and "
                                 "FLOP/s)" if measured else
                                 "the datasheet roofline: a draft step's small kernels take longer on a GPU (a "
                                 "latency floor of microseconds each), which lowers the speedup; `shapeprof "
                                 "calibrate` measures one"))
    return Speculative(names[0], names[1], device, precision.name, context, batches, rates, gs, steps,
                       "achievable" if measured else "roofline", vt if vt == vd else None, len(priced),
                       time.perf_counter() - started, tuple(notes))
