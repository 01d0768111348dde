"""advise(): what batch and shape an LLM wants on a GPU, from its own graph.

The questions the project started from: a Linear is memory-bound at batch 1 and compute-bound at batch 512; a
decode step reads every weight and the whole KV cache for a handful of tokens; offline work wants big batches,
online work wants each user's tokens at least as fast as they read. `advise` answers them for one model, spec and
dtype, from analyses of its prefill and decode steps (`shapeprof.Prefill`, `shapeprof.Decode`):

- prefill and decode: FLOPs, bytes (weights, KV read and written, the rest), intensity, time per step, tokens/s;
- the batch sweep: every op's FLOPs and bytes in a decode step are affine in the batch (weights are read once,
  each sequence adds its activations and its cache), so two analyses (batch 1 and 2) give every op at any batch;
  a third (batch 8) checks it exactly, and a model for which it does not hold is analysed batch by batch instead;
- per matmul and for the whole step, the batch at which it turns compute-bound;
- online and offline: the largest batch that keeps every user above reading speed, the batch that maximises
  throughput within memory;
- memory: weights, KV per token and per sequence at full context, sequences that fit, and where the weights do
  not fit, the tensor-parallel degree and its all-reduce time per layer;
- shapes: GEMM dimensions off the tensor-core alignment, wave quantization (`shapeprof.shapes`);
- two accountings of each step: eager (every kernel as PyTorch runs it) and fused (a serving engine's kernels,
  `shapeprof.accounting`).

    >>> import torch, shapeprof
    >>> from examples.nanogpt import GPT, GPTConfig
    >>> with torch.device("meta"):
    ...     gpt = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=128))
    >>> adv = shapeprof.advise(gpt, spec="h100-sxm", dtype=torch.bfloat16, context=64)
    >>> adv.online["batch"] >= 1, adv.memory["fits_on_one_device"]
    (True, True)
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .distributed import MEMORY_UTILIZATION   # of the device's memory, what weights and KV may take: 0.9
from .hardware import DeviceSpec, get_spec
from .phases import Decode, Prefill, reusing_captures
from .phases import resolve as resolve_phase
from .precision import resolve as resolve_precision
from .report import Report
from .speculative import DRAFT_TOKENS
from .text import fmt_bytes

__all__ = ["Advice", "BatchSweep", "READING_TOKENS_PER_SECOND", "advise", "batch_sweep"]

#: Silent reading of English non-fiction: 238 words per minute (Brysbaert, "How many words do we read per minute?
#: A review and meta-analysis of reading rate", Journal of Memory and Language 109, 2019: 190 studies, 18,573
#: readers), at 0.75 words per token (OpenAI's rule of thumb for English with GPT tokenizers): 5.3 tokens/s.
READING_WORDS_PER_MINUTE = 238
WORDS_PER_TOKEN = 0.75
READING_TOKENS_PER_SECOND = READING_WORDS_PER_MINUTE / 60 / WORDS_PER_TOKEN
SWEEP_BATCHES = tuple(2 ** i for i in range(11))        # 1 ... 1024
_CHECK_BATCH = 8
_MAX_BATCH = 1 << 20


# ---------------------------------------------------------------------------------------------- the batch sweep

@dataclass(frozen=True, slots=True)
class _Op:
    """One priced ATen op of the step, affine in the batch: FLOPs f1 + (b - 1) df, bytes m1 + (b - 1) dm."""

    f1: int
    df: int
    m1: int
    dm: int
    peak: float
    achieved: float     # the peak real kernels reach (the spec's measured figure, else the datasheet's)
    calls: int          # how many times the step runs it (twins and folded loops)
    matmul: bool
    group: str          # 'layers.*.mlp.c_fc aten.mm': where it runs, repeated layers folded

    def flops(self, b: int) -> int:
        return self.f1 + (b - 1) * self.df

    def nbytes(self, b: int) -> int:
        return self.m1 + (b - 1) * self.dm

    def times(self, b: int, bandwidth: float) -> tuple[float, float]:
        return self.flops(b) / self.peak, self.nbytes(b) / bandwidth


@dataclass(frozen=True)
class Crossing:
    """Where one matmul (all its calls alike) turns compute-bound as the batch grows."""

    group: str
    calls: int
    flops_at_1: int
    bytes_at_1: int
    batch: int | None       # the smallest batch at which it is compute-bound; None: never (its bytes grow as fast)

    @property
    def intensity_at_1(self) -> float:
        return self.flops_at_1 / self.bytes_at_1 if self.bytes_at_1 else math.inf


@dataclass
class BatchSweep:
    """Every op of a step as a function of the batch, from analyses at batch 1 and 2 (checked at a third)."""

    ops: list[_Op]
    spec: DeviceSpec
    exact: bool                      # the affine model reproduced the check batch's analysis exactly
    direct: dict[int, Report] = field(default_factory=dict)   # per batch, where the affine model does not hold

    def step(self, b: int) -> tuple[float, str, int, int]:
        """(seconds, bound, FLOPs, bytes) of the step at batch `b`: each op max(F / P, bytes / B), summed."""
        if not self.exact:
            r = self.direct[b]
            bound = "compute" if sum(n.predicted_seconds for n in r.nodes if n.bound == "compute") >= \
                sum(n.predicted_seconds for n in r.nodes if n.bound == "memory") else "memory"
            return r.total.predicted_seconds, bound, r.total.flops, r.total.bytes
        seconds = compute_bound = memory_bound = 0.0
        flops = nbytes = 0
        bw = self.spec.memory_bandwidth
        for op in self.ops:
            c, m = op.times(b, bw)
            t = max(c, m) * op.calls
            seconds += t
            if c >= m:
                compute_bound += t
            else:
                memory_bound += t
            flops += op.flops(b) * op.calls
            nbytes += op.nbytes(b) * op.calls
        return seconds, "compute" if compute_bound >= memory_bound else "memory", flops, nbytes

    def achievable(self, b: int) -> float:
        """The step at batch `b` as real kernels run it: each op max(latency floor, F / achieved peak,
        bytes / achieved bandwidth) (`roofline.achievable_time`); the datasheet roofline where nothing is measured."""
        if not self.exact:
            return self.direct[b].total.predicted_seconds
        spec = self.spec
        bw = spec.achieved_bandwidth or spec.memory_bandwidth
        return sum(max(spec.kernel_latency, op.flops(b) / op.achieved, op.nbytes(b) / bw) * op.calls
                   for op in self.ops)

    def crossings(self) -> list[Crossing]:
        """Per matmul group, the batch at which it turns compute-bound; the most time first."""
        groups: dict[str, list[_Op]] = {}
        for op in self.ops:
            if op.matmul:
                groups.setdefault(op.group, []).append(op)
        out = []
        bw = self.spec.memory_bandwidth
        for name, ops in groups.items():
            op = max(ops, key=lambda o: max(o.times(1, bw)) * o.calls)
            out.append(Crossing(name, sum(o.calls for o in ops), op.flops(1), op.nbytes(1),
                                crossing_batch(op, bw)))
        return sorted(out, key=lambda c: -c.bytes_at_1 * c.calls)

    def step_crossing(self) -> int | None:
        """The smallest batch at which compute-bound ops take most of the step's time (None: not by 2^20)."""
        if not self.exact:
            return None
        if self.step(_MAX_BATCH)[1] != "compute":
            return None
        lo, hi = 1, _MAX_BATCH
        while lo < hi:
            mid = (lo + hi) // 2
            if self.step(mid)[1] == "compute":
                hi = mid
            else:
                lo = mid + 1
        return lo


def crossing_batch(op: _Op, bandwidth: float) -> int | None:
    """The smallest batch b >= 1 with FLOPs(b) / peak >= bytes(b) / bandwidth (the roofline's own test), or None.

    F(b) B - M(b) P = (f1 B - m1 P) + (b - 1)(df B - dm P): it grows with b only if df B > dm P, i.e. if each
    added sequence brings more FLOPs per byte than the ridge."""
    def compute_bound(b: int) -> bool:
        c, m = op.times(b, bandwidth)
        return c >= m
    if compute_bound(1):
        return 1
    slope = op.df * bandwidth - op.dm * op.peak
    if slope <= 0:
        return None
    b = 1 + math.ceil((op.m1 * op.peak - op.f1 * bandwidth) / slope)
    while b > 1 and compute_bound(b - 1):      # the float test decides, as the roofline's does
        b -= 1
    while not compute_bound(b):
        b += 1
    return b


def batch_sweep(model: nn.Module, inputs_at: Callable[[int], tuple], *, spec: str | DeviceSpec | None = None,
                dtype: torch.dtype | str | None = None, batches: Sequence[int] = SWEEP_BATCHES,
                check: int = _CHECK_BATCH, routing: Any = None) -> BatchSweep:
    """Every op of `model` on `inputs_at(batch)` as a function of the batch (`routing`: an MoE model's, as
    `analyze` takes it).

        >>> import torch, shapeprof
        >>> from shapeprof.advice import batch_sweep
        >>> sweep = batch_sweep(torch.nn.Linear(1024, 4096), lambda b: (shapeprof.InputShape((b, 1024)),),
        ...                     spec="a100-80gb-sxm", dtype=torch.bfloat16)
        >>> sweep.step(1)[1], sweep.step(512)[1], sweep.crossings()[0].batch
        ('memory', 'compute', 189)
    """
    from .analysis import _NodeCoster, analyze
    device = get_spec(spec)
    precision = resolve_precision(dtype)
    with reusing_captures():
        one, two = (analyze(model, *inputs_at(b), spec=device, dtype=dtype, routing=routing) for b in (1, 2))
        ops = _paired_ops(one, two, _NodeCoster(device, precision))
        sweep = BatchSweep(ops or [], device, exact=ops is not None)
        if sweep.exact:
            checked = analyze(model, *inputs_at(check), spec=device, dtype=dtype, routing=routing)
            _, _, flops, nbytes = sweep.step(check)
            sweep.exact = (flops, nbytes) == (checked.total.flops, checked.total.bytes)
        if not sweep.exact:
            sweep.direct = {b: analyze(model, *inputs_at(b), spec=device, dtype=dtype, routing=routing)
                            for b in batches}
    return sweep


def _paired_ops(one: Report, two: Report, coster) -> list[_Op] | None:
    """The ops of two analyses of one model at batch 1 and 2, paired in order; None when the graphs differ."""
    a, b = one.graph_capture.nodes, two.graph_capture.nodes
    if len(a) != len(b):
        return None
    names = {n.name: n for n in one.nodes}
    ops: list[_Op] = []
    for x, y in zip(a, b):
        if len(x.records) != len(y.records) or x.repeats != y.repeats:
            return None
        stats = names.get(x.node.name)
        where = one.pattern_of(stats) if stats is not None else x.module_path
        for rx, ry in zip(x.records, y.records):
            if rx.name != ry.name:
                return None
            (cx, tx), (cy, _) = coster._cost(rx), coster._cost(ry)
            if not (cx.flops or cx.bytes or cy.flops or cy.bytes):
                continue
            ops.append(_Op(cx.flops, cy.flops - cx.flops, cx.bytes, cy.bytes - cx.bytes, tx.peak_flops,
                           _achieved(coster.spec, tx.peak_flops), x.repeats, cx.matmul,
                           f"{where} {rx.name}".strip()))
    return ops


def _achieved(spec: DeviceSpec, peak: float) -> float:
    key = next((k for k, v in spec.peak_flops.items() if v == peak), None)
    return spec.achieved_peak(key) if key is not None else peak


def achievable_seconds(report: Report, spec: DeviceSpec, precision) -> float:
    """A report's eager step as real kernels run it (see `BatchSweep.achievable`)."""
    from .analysis import _NodeCoster
    coster = _NodeCoster(spec, precision)
    bw = spec.achieved_bandwidth or spec.memory_bandwidth
    total = 0.0
    for cn in report.graph_capture.nodes:
        for rec in cn.records:
            cost, t = coster._cost(rec)
            if cost.flops or cost.bytes:
                total += max(spec.kernel_latency, cost.flops / _achieved(spec, t.peak_flops),
                             cost.bytes / bw) * cn.repeats
    return total


# ---------------------------------------------------------------------------------------------- advise

@dataclass
class Advice:
    """What `advise` found; `print(adv)` shows it as tables, `to_dict` / `to_json` keep all of it."""

    model: str
    spec: DeviceSpec
    dtype: str
    context: int
    prefill: dict[str, Any]
    decode: dict[str, Any]
    sweep: list[dict[str, Any]]
    crossings: list[Crossing]
    step_crossing: int | None
    online: dict[str, Any]
    offline: dict[str, Any]
    memory: dict[str, Any]
    parallel: dict[str, Any] | None
    shapes: Any = None
    accountings: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    speculative: Any = None      # a shapeprof.Speculative, where advise was given a draft model

    def to_dict(self) -> dict[str, Any]:
        extra = {"speculative": self.speculative.to_dict()} if self.speculative is not None else {}
        return {
            "model": self.model, "spec": self.spec.name, "dtype": self.dtype, "context": self.context,
            "prefill": self.prefill, "decode": self.decode, "sweep": self.sweep,
            "crossings": [{"group": c.group, "calls": c.calls, "flops_at_1": c.flops_at_1,
                           "bytes_at_1": c.bytes_at_1, "batch": c.batch} for c in self.crossings],
            "step_crossing": self.step_crossing, "online": self.online, "offline": self.offline,
            "memory": self.memory, "parallel": self.parallel,
            "shapes": self.shapes.to_dict() if self.shapes is not None else None,
            "accountings": self.accountings, "notes": list(self.notes), **extra,
        }

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=1, allow_nan=True)
        if path is not None:
            from pathlib import Path
            from .files import write_atomic
            write_atomic(Path(path), text)
        return text

    def write_tensorboard(self, logdir, run: str = "advise"):
        """TensorBoard Text (each table in markdown) and Images (the batch sweep) in a new run `logdir`/`run`."""
        from .output.advice import write_tensorboard
        return write_tensorboard(self, logdir, run)

    def __rich__(self):
        from .output.advice import render
        return render(self)

    def __str__(self) -> str:
        from rich.console import Console
        buf = io.StringIO()
        Console(file=buf, width=110, color_system=None).print(self)
        return buf.getvalue()


def advise(model: nn.Module, spec: str | DeviceSpec | None = None, dtype: torch.dtype | str | None = torch.bfloat16,
           *, context: int | None = None, prompt: int | None = None,
           reading_tokens_per_second: float = READING_TOKENS_PER_SECOND,
           batches: Sequence[int] = SWEEP_BATCHES, draft: nn.Module | None = None,
           draft_tokens: Sequence[int] = DRAFT_TOKENS, routing: Any = None) -> Advice:
    """Prefill, decode, batch, memory and shape advice for an LLM on `spec` in `dtype`.

    Args:
        model: a decoder: a HuggingFace causal LM (its own cache class is used) or one whose forward takes token
            ids and no cache (one is inserted); on meta is fine, nothing runs.
        spec: a built-in name, a spec file or a DeviceSpec (default A100-80GB SXM).
        dtype: what weights, activations and the cache are priced in (default bf16).
        context: the cache length of the decode steps analysed (default: the model's maximum, at most 4096).
        prompt: the prefill's tokens (default: `context`).
        reading_tokens_per_second: the per-user speed online work must keep (default: reading speed, 5.3).
        batches: the sweep's batch sizes.
        draft: a draft model for speculative decoding: `shapeprof.speculative(model, draft, ...)` at the same
            spec, dtype and context goes into `advice.speculative` (at batches 1, 8, 32, 64), and a short
            section into the printout.
        draft_tokens: with a draft, the draft lengths priced (default 1 .. 8).
        routing: for an MoE model, how its tokens split over the experts, as `analyze` takes it (default balanced).
    """
    from .analysis import analyze
    device = get_spec(spec)
    precision = resolve_precision(dtype)
    dtype_name = precision.name
    with reusing_captures():
        limit = resolve_phase(model, Decode(1, 1), precision.dtype).max_context   # no analysis: the inputs only
        context = context or (min(limit - 1, 4096) if limit else 4096)   # the step adds a position
        if limit is not None and context + 1 > limit:
            raise ValueError(f"context={context}: a decode step adds a position, and {type(model).__name__} "
                             f"holds at most {limit}")
        prompt = prompt or context
        pre = analyze(model, Prefill(1, prompt), spec=device, dtype=dtype, routing=routing)
        dec = analyze(model, Decode(1, context), spec=device, dtype=dtype, routing=routing)
        sweep = batch_sweep(model, lambda b: (Decode(b, context),), spec=device, dtype=dtype, batches=batches,
                            routing=routing)
    info = dec.phase
    notes = list(dict.fromkeys([*pre.notes, *dec.notes]))
    if not sweep.exact:
        notes.append("the decode step's costs are not affine in the batch for this model: every sweep batch was "
                     "analysed on its own, and no crossing batch is given")

    memory = _memory(device, info, pre.parameter_bytes, context)
    parallel = _parallel(device, info, pre.parameter_bytes, context, precision.dtype or torch.bfloat16, prompt)
    tp = parallel["degree"] if parallel else 1
    comm = parallel["decode_all_reduce_seconds_per_token_step"] if parallel else 0.0

    # decisions (online, offline) use what real kernels reach where the spec measured it, else the datasheet
    measured = device.measured

    def step_seconds(b: int, achievable: bool = measured) -> float:
        seconds = sweep.achievable(b) if achievable else sweep.step(b)[0]
        return seconds / tp + (comm * b if tp > 1 else 0.0)

    max_batch = _max_batch(device, info, pre.parameter_bytes, context, tp)
    rows = []
    for b in batches:
        _, bound, flops, nbytes = sweep.step(b)
        rows.append({"batch": b, "seconds": step_seconds(b, achievable=False),
                     "achievable_seconds": step_seconds(b, achievable=True),
                     "tokens_per_second": b / step_seconds(b), "per_sequence": 1 / step_seconds(b), "bound": bound,
                     "flops": flops, "bytes": nbytes, "kv_bytes": b * (context + 1) * info.kv_bytes_per_token,
                     "fits": b <= max_batch})
    online = _online(step_seconds, max_batch, reading_tokens_per_second, sweep.exact, batches)
    offline = {"batch": max_batch, "tokens_per_second": max_batch / step_seconds(max_batch) if max_batch else 0.0,
               "per_sequence": 1 / step_seconds(max_batch) if max_batch else 0.0,
               "why": "throughput grows with the batch (the weights are read once a step), so offline work wants "
                      "the largest batch whose KV cache fits"} if sweep.exact else _best_row(rows)
    if measured:
        notes.append(f"times are what real kernels reach on {device.name}: a latency floor of "
                     f"{device.kernel_latency * 1e6:.1f} µs a kernel, achieved bandwidth and FLOP/s (the datasheet "
                     f"roofline beside them); online and offline batches use them")
    else:
        notes.append("times are the datasheet roofline, optimistic for the few-microsecond kernels of a decode "
                     "step (an H200's decode-like step ran its matmuls at 0.41 of it, its small kernels at about "
                     "2 µs each: benchmarks/logs/predicted_vs_measured-h200.txt); `shapeprof calibrate` on the GPU "
                     "measures a latency floor and achieved figures")
    advice = Advice(type(model).__name__, device, dtype_name, context,
                    _phase_summary(pre, device, precision), _phase_summary(dec, device, precision),
                    rows, sweep.crossings(), sweep.step_crossing(), online, offline, memory, parallel, notes=notes)
    advice.shapes = _shapes(pre)
    advice.accountings = {"prefill": _accountings(pre, device), "decode": _accountings(dec, device)}
    if draft is not None:
        from .speculative import speculative
        longest = max(draft_tokens) + 1       # the verification of the longest draft adds this many positions
        at = context if limit is None or context + longest <= limit else limit - longest
        if at < 1:
            raise ValueError(f"{type(model).__name__} holds {limit} positions: too few to verify "
                             f"{longest - 1} drafted tokens")
        if at != context:
            advice.notes.append(f"speculative decoding priced at context {at:,}: verifying {longest - 1} drafted "
                                f"tokens adds {longest} positions, and {type(model).__name__} holds {limit}")
        advice.speculative = speculative(model, draft, spec=device, dtype=dtype, context=at,
                                         draft_tokens=draft_tokens)
    return advice


def _phase_summary(r: Report, spec: DeviceSpec, precision) -> dict[str, Any]:
    p = r.phase
    seconds = r.total.predicted_seconds
    achievable = achievable_seconds(r, spec, precision)
    return {"batch": p.batch, "tokens": p.tokens, "context": p.context, "flops": r.total.flops,
            "bytes": r.total.bytes, "weight_bytes": p.weight_bytes, "kv_read_bytes": p.kv_read_bytes,
            "kv_written_bytes": p.kv_written_bytes, "other_bytes": p.other_bytes,
            "intensity": r.total.flops / r.total.bytes if r.total.bytes else math.inf,
            "seconds": seconds, "tokens_per_second": p.tokens_per_step / seconds if seconds else math.inf,
            "achievable_seconds": achievable,
            "cache": p.cache}


def _usable(spec: DeviceSpec, weights: float, tp: int) -> float:
    return spec.memory_capacity * MEMORY_UTILIZATION - weights / tp


def _max_batch(spec: DeviceSpec, info, weights: int, context: int, tp: int) -> int:
    per_seq = (context + 1) * info.kv_bytes_per_token / tp
    room = _usable(spec, weights, tp)
    return max(0, int(room // per_seq)) if per_seq else _MAX_BATCH


def _memory(spec: DeviceSpec, info, weights: int, context: int) -> dict[str, Any]:
    full = info.max_context or context
    per_seq_full = full * info.kv_bytes_per_token
    room = _usable(spec, weights, 1)
    return {"weights": weights, "kv_per_token": info.kv_bytes_per_token, "full_context": full,
            "kv_per_sequence_full_context": per_seq_full, "kv_per_sequence_context": context * info.kv_bytes_per_token,
            "device_memory": spec.memory_capacity, "utilization": MEMORY_UTILIZATION,
            "fits_on_one_device": room > 0,
            "sequences_at_full_context": max(0, int(room // per_seq_full)) if per_seq_full else None,
            "sequences_at_context": max(0, int(room // (context * info.kv_bytes_per_token)))
            if info.kv_bytes_per_token else None}


def _parallel(spec: DeviceSpec, info, weights: int, context: int, dtype: torch.dtype, prompt: int):
    """Tensor parallelism when the weights and one sequence's cache do not fit: Megatron-style, each layer does two
    all-reduces (after attention, after the MLP) of the residual stream, batch x tokens x hidden values; a ring
    all-reduce over t devices sends 2 (t - 1) / t of it each way."""
    one_seq = (context + 1) * info.kv_bytes_per_token
    if weights + one_seq <= spec.memory_capacity * MEMORY_UTILIZATION:
        return None
    degree = next((t for t in (2, 4, 8, 16, 32, 64) if (weights + one_seq) / t <= spec.memory_capacity *
                   MEMORY_UTILIZATION), None)
    each_way = spec.interconnect_bandwidth / 2     # the spec adds both directions (A100 NVLink: 600 = 2 x 300)
    if degree is None or not info.hidden:
        return {"degree": degree, "why": "the weights and one sequence's cache exceed 64 devices" if degree is None
                else "the model's hidden width is unknown", "decode_all_reduce_seconds_per_token_step": 0.0}

    def all_reduce(tokens: int) -> float:
        nbytes = tokens * info.hidden * dtype.itemsize
        return 2 * (degree - 1) / degree * nbytes / each_way if each_way else math.inf
    per_layer = 2 * all_reduce(1)
    return {"degree": degree, "weights_per_device": weights / degree,
            "interconnect_each_way": each_way,
            "all_reduce_bytes_per_token_per_layer": 2 * info.hidden * dtype.itemsize,
            "decode_all_reduce_seconds_per_layer_batch_1": per_layer,
            "decode_all_reduce_seconds_per_token_step": per_layer * info.layers,
            "prefill_all_reduce_seconds_per_layer": 2 * all_reduce(prompt),
            "why": f"the weights ({fmt_bytes(weights)}) and one sequence's cache do not fit in "
                   f"{MEMORY_UTILIZATION:.0%} of {fmt_bytes(spec.memory_capacity)}",
            "model": "bandwidth only: a decode step's all-reduce of a few kB is bound by the collective's own "
                     "latency (microseconds per call on NVLink), which is not modelled here; measure it with "
                     "nccl-tests"}


def _online(step_seconds, max_batch: int, reading: float, exact: bool, batches) -> dict[str, Any]:
    """The largest batch whose every user gets at least `reading` tokens/s (a step no longer than 1 / reading)."""
    candidates = range(1, max_batch + 1) if exact else [b for b in batches if b <= max_batch]
    best = None
    if exact and max_batch:
        lo, hi = 0, max_batch       # step time grows with the batch: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if 1 / step_seconds(mid) >= reading:
                lo = mid
            else:
                hi = mid - 1
        best = lo or None
    elif not exact:
        best = max((b for b in candidates if 1 / step_seconds(b) >= reading), default=None)
    out = {"reading_tokens_per_second": reading,
           "reading_source": f"{READING_WORDS_PER_MINUTE} words/min silent reading (Brysbaert 2019) at "
                             f"{WORDS_PER_TOKEN} words/token", "batch": best}
    if best:
        t = step_seconds(best)
        out.update(tokens_per_second=best / t, per_sequence=1 / t)
    else:
        out["why"] = ("no sequence fits in memory" if not max_batch else
                      "even one sequence decodes slower than reading speed")
    return out


def _best_row(rows) -> dict[str, Any]:
    fit = [r for r in rows if r["fits"]]
    best = max(fit, key=lambda r: r["tokens_per_second"], default=None)
    return {"batch": best["batch"] if best else 0, "tokens_per_second": best["tokens_per_second"] if best else 0.0,
            "per_sequence": best["per_sequence"] if best else 0.0, "why": "the best sweep batch that fits"}


def _shapes(report: Report):
    from .shapes import shape_advice
    return shape_advice(report)


def _accountings(report: Report, spec: DeviceSpec) -> dict[str, Any]:
    """Eager and fused, each with its time under the spec's latency floor (every kernel at least that long)."""
    from .accounting import accountings
    out = {}
    for name, a in accountings(report).items():
        d = a.to_dict()
        d["seconds_with_floor"] = sum(k.calls * max(spec.kernel_latency, k.seconds / k.calls)
                                      for k in a.kernels_detail if k.calls)
        out[name] = d
    return out

