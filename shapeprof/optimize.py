"""optimize(): capture a model, run graph rewrites on it, verify them against the original, hand back a drop-in.

    >>> import torch, shapeprof
    >>> from shapeprof.optimize import optimize
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    >>> model = model.eval().requires_grad_(False)          # inference: frozen weights may be kept packed
    >>> fast = optimize(model, torch.randn(8, 64))
    >>> [m.what for m in fast.shapeprof_report.applied]  # doctest: +NORMALIZE_WHITESPACE
    ['Linear + ReLU -> mkldnn._linear_pointwise(relu)',
     'Linear -> mkldnn._linear_pointwise(none) on a packed weight while it does not require grad']
    >>> isinstance(fast, torch.nn.Sequential), fast[0].weight is model[0].weight
    (True, True)

What comes back is a drop-in, not a bare graph: a copy of the module tree whose parameters and buffers are the
user's own tensors (shared, not copied), so it has the same state_dict keys, mode and device and stays in step
with the original's weights. Each module whose forward was rewritten becomes an instance of a subclass of its own
class, created on the fly, whose `forward` runs the rewritten graph on the module itself (attribute lookups go
through `self`, so a buffer replaced by `.to()` is seen). Its other methods, such as nanoGPT's `generate()`, call
`self(...)` and so run the rewritten forward. The graph is kept on that subclass, never registered as a
submodule: `state_dict()` is the user's.

Pickling the whole module (``torch.save(fast)``) saves the user's class, without the rewrites (the class made
here cannot be imported by name): optimize again after loading. ``state_dict()`` saves and loads as the
original's.

The rewritten forward is guarded: the graph is specialised to what symbolic tracing saw (train/eval mode, the
values of non-tensor arguments such as ``targets=None``). A call that differs - another mode, another constant,
``None`` where a tensor was - runs the class's own forward instead, unoptimized and correct.

Capture: the model's forward is traced with `shapeprof.capture` (symbolic_trace, the same tracer settings the
analysis uses). When that fails (nanoGPT's ``assert t <= block_size`` is Python control flow on a shape), the
largest submodules that trace are captured and rewritten instead (its transformer blocks), and the model's own
forward runs as written around them.

Verification: every rewrite is run against the unchanged model on the example inputs (``torch.no_grad``, the same
RNG seed, user hooks silenced, every parameter and buffer the forward writes put back after each run) and
compared with `torch.testing.assert_close` at the output dtype's default rtol, with atol at least rtol x the
output's largest magnitude (`Tolerance.for_output`; pass ``verify=Tolerance(rtol, atol)`` to choose). A rewrite
whose outputs differ, or that raises, is undone and reported; it is never returned. Verification needs
real weights and real inputs: a meta model or meta inputs are refused unless ``verify=False``, which the report
then says loudly.

The user's model is never run, moved, hooked or changed: every run happens on copies that share its tensors, on
copies of the inputs; what a run writes of the shared tensors (BatchNorm statistics in train mode, a counter
buffer, ``self.w.data.mul_(2)``) is saved before it is written and put back (`shapeprof.snapshot`), and the RNG
state is as it was when optimize returns.
"""
from __future__ import annotations

import copy
import io
import math
import os
import statistics
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .capture import CaptureError, InputShape, NodeError, capture, tensors_inside, unwrap
from .text import one_line
from .dropin import (DropInError, graph_module_over, install, install_decoder, quiet, shared_copy, uninstall,
                     values_equal, watch)
from .hardware import DeviceSpec, SpecError, get_spec
from .snapshot import WriteSnapshot, copy_inputs, rng_kept

__all__ = ["Measurement", "OptimizeError", "OptimizeReport", "OutputCheck", "RewriteOutcome", "Tolerance",
           "Verification", "optimize"]


class OptimizeError(RuntimeError):
    """optimize cannot do what it was asked: nothing to verify against, an unknown rewrite, a model it cannot copy."""


# ---------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Tolerance:
    """assert_close tolerances: |actual - expected| <= atol + rtol * |expected|, elementwise."""

    rtol: float
    atol: float

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> "Tolerance":
        """torch.testing.assert_close's default for `dtype` (exact for integers and bool).

            >>> Tolerance.for_dtype(torch.float32)
            Tolerance(rtol=1.3e-06, atol=1e-05)
        """
        return cls(*_DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0)))

    @classmethod
    def for_output(cls, expected: torch.Tensor) -> "Tolerance":
        """The dtype's default, with atol raised to rtol x the output's largest magnitude.

        A rewrite that reorders a matmul's sums or rounds an intermediate once less (a fused epilogue) changes
        each output by about rtol x the size of the values summed, not of the element itself: an element that
        cancels to near 0 would otherwise fail a relative test it cannot pass. A wrong function (erf GELU
        swapped for tanh GELU in fp32) still fails by orders of magnitude.

            >>> Tolerance.for_output(torch.tensor([0.001, -100.0]))
            Tolerance(rtol=1.3e-06, atol=0.00013)
        """
        base = cls.for_dtype(expected.dtype)
        if not (expected.is_floating_point() or expected.is_complex()) or expected.numel() == 0:
            return base
        scale = float(expected.detach().abs().max())
        if not math.isfinite(scale):
            finite = expected.detach().abs()[torch.isfinite(expected.detach().abs())]
            scale = float(finite.max()) if finite.numel() else 0.0
        return cls(base.rtol, float(f"{max(base.atol, base.rtol * scale):.3g}"))


# torch.testing.assert_close's documented defaults
_DEFAULT_TOLERANCES = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
                       torch.float64: (1e-7, 1e-7), torch.complex32: (1e-3, 1e-5), torch.complex64: (1.3e-6, 1e-5),
                       torch.complex128: (1e-7, 1e-7)}


@dataclass(frozen=True)
class OutputCheck:
    """One output leaf of the rewritten model against the original's."""

    output: str             # 'out', '[0]', "['logits']" ...
    dtype: str
    max_abs_diff: float     # nan for a non-tensor output
    rtol: float
    atol: float
    ok: bool
    message: str = ""       # why it failed


@dataclass(frozen=True)
class Verification:
    """The rewritten model run on the example inputs, against the original's outputs."""

    checks: tuple[OutputCheck, ...] = ()
    error: str = ""         # the rewritten model raised, or its output structure differs

    @property
    def ok(self) -> bool:
        return not self.error and all(c.ok for c in self.checks)

    @property
    def max_abs_diff(self) -> float:
        diffs = [c.max_abs_diff for c in self.checks if not math.isnan(c.max_abs_diff)]
        return max(diffs, default=0.0)

    def summary(self) -> str:
        if self.error:
            return self.error
        bad = [c for c in self.checks if not c.ok]
        if bad:
            return "; ".join(f"{c.output}: {c.message}" for c in bad)
        return f"outputs match (max abs diff {self.max_abs_diff:.3g})"


@dataclass(frozen=True)
class Measurement:
    """Original vs optimized, timed in the same run: per-call medians over interleaved repeats."""

    original_seconds: float
    optimized_seconds: float
    repeats: int
    calls_per_repeat: int
    device: str
    ratios: tuple[float, ...] = ()        # optimized / original per interleaved pair of samples

    @property
    def speedup(self) -> float:
        return self.original_seconds / self.optimized_seconds if self.optimized_seconds else float("inf")

    @property
    def slower(self) -> bool:
        """The optimized model is slower beyond the noise: the median of the paired ratios is above 1 by more
        than 2% and by more than 1.5 median absolute deviations of the ratios (the spread of this run)."""
        if not self.ratios:
            return False
        mid = statistics.median(self.ratios)
        spread = statistics.median(abs(r - mid) for r in self.ratios)
        return mid > 1 + max(0.02, 1.5 * spread)


@dataclass
class RewriteOutcome:
    """What became of one rewrite.

    status: 'applied' (verified and kept), 'unverified' (kept with verify=False), 'no match' (nothing to change),
    'rejected' (its outputs differed from the original's: undone), 'slower' (measure=True timed it slower than
    without it, beyond the noise: undone), 'failed' (it raised: undone), 'not run' (it needs a capture optimize
    does not make).
    """

    name: str
    status: str
    result: Any = None                    # the RewriteResult over all captured graphs (None when not run)
    verification: Verification | None = None
    error: str = ""
    measurement: Measurement | None = None   # measure=True: the model without it against the model with it

    @property
    def kept(self) -> bool:
        return self.status in ("applied", "unverified")


@dataclass(frozen=True)
class CapturedGraph:
    """One graph optimize traced: the module it runs on (its path; '' for the model), how it was captured, and
    whether a rewrite of it was kept."""

    path: str
    module_type: str
    method: str
    nodes: int
    rewritten: bool = False


@dataclass
class OptimizeReport:
    """What optimize did: rewrites applied where, skipped and why, verification, predicted and measured gains.

    Printable (`print(report)`) and rich-renderable (`rich.print(report)`).
    """

    model: str
    spec: DeviceSpec
    dtype: str | None
    device: str
    verify: bool
    tolerance: Tolerance | None                      # None: each output's Tolerance.for_output
    graphs: list[CapturedGraph] = field(default_factory=list)
    not_captured: list[tuple[str, str]] = field(default_factory=list)   # (module path, why) tried but not traced
    outcomes: list[RewriteOutcome] = field(default_factory=list)
    predicted_seconds: float = 0.0                   # roofline time of the captured graphs before rewriting
    measurement: Measurement | None = None
    refused: str = ""                                # why nothing could be rewritten at all
    code: dict[str, str] = field(default_factory=dict)   # module path -> the Python of its rewritten forward
    pack_weights: str = "frozen"                     # which weights CPU kernels may keep packed (see optimize)

    @property
    def applied(self) -> list:
        """Every Match of every rewrite that was kept."""
        return [m for o in self._kept() for m in o.result.applied]

    @property
    def skipped(self) -> list:
        """Every Skip of every rewrite that ran."""
        return [s for o in self.outcomes if o.result is not None for s in o.result.skipped]

    @property
    def bytes_saved(self) -> int:
        return sum(o.result.bytes_saved for o in self._kept())

    @property
    def seconds_saved(self) -> float:
        return sum(o.result.seconds_saved for o in self._kept())

    def _kept(self) -> list:
        return [o for o in self.outcomes if o.kept and o.result is not None]

    @property
    def verified(self) -> bool:
        """Every kept rewrite was verified against the original."""
        return self.verify and all(o.status == "applied" for o in self.outcomes if o.kept)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (json.dumps-able; a non-tensor output's max_abs_diff is NaN)."""
        def outcome(o: RewriteOutcome) -> dict[str, Any]:
            return {"name": o.name, "status": o.status, "error": o.error,
                    "applied": [asdict(m) for m in o.result.applied] if o.result is not None else [],
                    "skipped": [asdict(s) for s in o.result.skipped] if o.result is not None else [],
                    "notes": list(o.result.notes) if o.result is not None else [],
                    "verification": None if o.verification is None else {
                        "ok": o.verification.ok, "error": o.verification.error,
                        "checks": [asdict(c) for c in o.verification.checks]},
                    "measurement": None if o.measurement is None else asdict(o.measurement)}
        m = self.measurement
        return {"model": self.model, "spec": self.spec.name, "dtype": self.dtype, "device": self.device,
                "verify": self.verify, "verified": self.verified,
                "tolerance": asdict(self.tolerance) if self.tolerance else None,
                "graphs": [asdict(g) for g in self.graphs], "not_captured": [list(p) for p in self.not_captured],
                "outcomes": [outcome(o) for o in self.outcomes], "refused": self.refused,
                "predicted_seconds": self.predicted_seconds, "bytes_saved": self.bytes_saved,
                "seconds_saved": self.seconds_saved,
                "measurement": None if m is None else {**asdict(m), "speedup": m.speedup},
                "pack_weights": self.pack_weights}

    def __rich_console__(self, console, options):
        yield render(self)

    def __str__(self) -> str:
        console = _text_console()
        console.print(render(self))
        return console.file.getvalue()

    def to_html(self, path: str | os.PathLike) -> Path:
        """Before and after, and what each rewrite changed, as one HTML file that opens offline (written
        atomically). Returns the path."""
        from .output.html import write_html
        return write_html(path, self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OptimizeReport":
        """Read back `to_dict`'s data (optimize.json holds it): every field type-checked, `spec` a built-in's name
        or a whole spec, each outcome's applied and skipped lists as its result. The rewritten code is not saved.

        Raises:
            ReportFormatError: one line naming the field that is wrong.
        """
        from shapeprof.rewrites.base import Match, RewriteResult, Skip
        from .jsondata import ReportFormatError, from_plain, json_kind

        def checked(value, kind, where):
            if not isinstance(value, kind):
                raise ReportFormatError(f"{where}: expected {'a list' if kind is list else 'an object'}, "
                                        f"got {json_kind(value)}")
            return value

        data = {k: v for k, v in checked(d, dict, "report").items() if k not in ("schema", "version")}
        if isinstance(data.get("spec"), str):
            try:
                data["spec"] = get_spec(data["spec"]).to_dict()
            except SpecError as e:
                raise ReportFormatError(f"spec: {e}") from e
        outcomes = []
        for i, o in enumerate(checked(data.pop("outcomes", []), list, "outcomes")):
            where = f"outcomes[{i}]"
            o = dict(checked(o, dict, where))
            applied = [from_plain(Match, m, f"{where}.applied[{j}]")
                       for j, m in enumerate(checked(o.pop("applied", []), list, f"{where}.applied"))]
            skipped = [from_plain(Skip, k, f"{where}.skipped[{j}]")
                       for j, k in enumerate(checked(o.pop("skipped", []), list, f"{where}.skipped"))]
            notes = checked(o.pop("notes", []), list, f"{where}.notes")
            if not all(isinstance(n, str) for n in notes):
                raise ReportFormatError(f"{where}.notes: expected a list of strings")
            outcome = from_plain(RewriteOutcome, o, where)
            if outcome.status == "rejected" and outcome.verification is None:   # rejected by its verification
                raise ReportFormatError(f"{where}: a rejected rewrite without its verification")
            if applied or skipped or outcome.status not in ("not run", "failed"):   # those two never ran
                outcome.result = RewriteResult(outcome.name, applied, skipped, notes)
            outcomes.append(outcome)
        report = from_plain(cls, data)
        report.outcomes = outcomes
        return report


# ---------------------------------------------------------------------------------------------- optimize

def optimize(model: nn.Module, *args: Any, rewrites: Sequence[str | Any] | None = None,
             verify: bool | Tolerance = True, measure: bool = False, spec: str | DeviceSpec | None = None,
             dtype: torch.dtype | None = None, pack_weights: str = "frozen", **kwargs: Any) -> nn.Module:
    """A drop-in for `model` with graph rewrites applied, each verified on the example inputs.

        >>> import torch
        >>> from examples.mlp import MLP
        >>> model = MLP(d_in=32, d_hidden=64, d_out=8).eval().requires_grad_(False)
        >>> fast = optimize(model, torch.randn(4, 32))
        >>> print(len(fast.shapeprof_report.applied), fast.shapeprof_report.verified)   # 2 fused, 1 packed
        3 True

    Args:
        model: the nn.Module to optimize (eval mode for the fusing rewrites). It is not run, moved or changed.
        *args, **kwargs: example inputs, as the model's forward takes them. Real tensors on the model's device:
            verification runs the model on them. `rewrites`, `verify`, `measure`, `spec` and `dtype` are this
            function's own and not passed on.
        rewrites: names from `shapeprof.rewrites.available()` (or Rewrite instances), run in the order given;
            None runs every registered rewrite.
        verify: True compares each rewrite's outputs with the original's at `Tolerance.for_output` (the dtype's
            rtol; atol scaled to the output); a `Tolerance` sets both; False keeps rewrites unverified (the
            report says so loudly).
        measure: also time each rewrite: the model with it against the model without it, interleaved in one run;
            a rewrite that is slower beyond the run's noise is undone ('slower' in the report). The original
            against the final model goes into the report too.
        spec: the device whose roofline prices each match (a name, a spec file or a DeviceSpec); default: the
            CUDA device the model is on if it is a known one, else A100-SXM4-80GB.
        dtype: price matches as if floating tensors were in this dtype (predictions only; nothing is cast).
        pack_weights: which Linear weights CPU kernels may keep a copy of in oneDNN's packed layout (the larger
            part of the CPU gain): "frozen" (default) those that do not require grad, checked at every call, since
            a trained weight can change with no trace PyTorch keeps (a fused optimizer step, a write through
            ``.data`` or numpy) and a stale copy would give wrong outputs; "always" every one, on the user's
            promise that the weights change only through in-place PyTorch ops or not at all (the report says so);
            "never".

    The drop-in runs a rewritten forward only while the model is as it was optimized (`shapeprof.guards`: the
    same submodules, no new hooks, the same attribute values, parameter dtypes and devices, not under
    torch.compile); otherwise the class's own forward runs, and warns once why: optimize again after the change.
    Casting the drop-in (``.half()``, ``.to()``) gives it its own tensors and leaves the user's model alone.

    Returns:
        The drop-in module; `fast.shapeprof_report` is an `OptimizeReport`.
    Raises:
        OptimizeError: verify is on but the model's weights or the inputs are meta tensors (or `InputShape`s);
            an unknown rewrite name; a model that cannot be copied.
    """
    from shapeprof import rewrites as registry   # rewrites import shapeprof modules: import here, not at the top

    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize takes an nn.Module, got {type(model).__name__}")
    selected = _select(rewrites, registry)
    if pack_weights not in _PACK_POLICIES:
        raise OptimizeError(f"pack_weights={pack_weights!r}: choose one of {', '.join(_PACK_POLICIES)}")
    no_data = _why_no_data(model, args, kwargs)
    if no_data and verify is not False:
        raise OptimizeError(f"cannot verify rewrites of {type(model).__name__}: {no_data}. Verification runs the "
                            f"model on real weights and real inputs; pass verify=False to rewrite without it")
    device = _device_of(model, args, kwargs)
    roofline_spec = _spec_for(spec, device)
    tolerance = verify if isinstance(verify, Tolerance) else None
    report = OptimizeReport(type(model).__name__, roofline_spec, str(dtype).removeprefix("torch.") if dtype else None,
                            str(device), verify is not False, tolerance, pack_weights=pack_weights)
    try:
        fast = shared_copy(model)
    except DropInError as e:
        raise OptimizeError(str(e)) from e
    # every run below shares the user's tensors: what they write is saved before it is written (the runs are
    # watched: verification is not timed) and put back when optimize returns, whatever happens; the timed runs
    # of `measure` are not watched, and write what their watched warm-up calls wrote
    snapshot = WriteSnapshot()
    try:
        with rng_kept(_cuda_devices(model, args, kwargs)):   # _measure's calls draw from the caller's RNG
            return _optimize(model, fast, args, kwargs, selected, registry, verify, tolerance, measure, device,
                             roofline_spec, dtype, report, snapshot)
    finally:
        snapshot.restore()


def _optimize(model, fast, args, kwargs, selected, registry, verify, tolerance, measure, device, roofline_spec,
              dtype, report, snapshot: WriteSnapshot) -> nn.Module:
    inputs_require_grad = any(isinstance(t, torch.Tensor) and t.requires_grad
                              for t in pytree.tree_leaves((args, kwargs)))

    # capture: the whole model if it traces (and its graph reproduces it), else its largest submodules that do
    whole, why = _try_capture(fast, args, kwargs)
    reference, recorded = None, {}
    if whole is None or verify is not False:   # (with verify=False on a meta model, only when it must)
        reference, recorded = _run(fast, args, kwargs, snapshot, record_inputs=True)   # + each submodule's call
    candidates = []
    if whole is not None:
        try:
            candidates = [_Target("", fast, whole, example=(args, kwargs))]
        except OptimizeError as e:   # a graph that cannot run on the model (a constant made on meta)
            whole, why = None, str(e)
    if whole is None:
        report.not_captured.append(("", why))
        if not recorded and verify is False:
            reference, recorded = _run(fast, args, kwargs, snapshot, record_inputs=True)
        candidates = _submodule_targets(fast, recorded, report.not_captured)
    targets: list[_Target] = []
    for _ in range(_MAX_DEPTH):   # a graph that does not reproduce its module is replaced by its submodules' graphs
        for t in candidates:
            t.original = model.get_submodule(t.path) if t.path else model
        kept = candidates if verify is False else \
            _faithful_targets(fast, candidates, args, kwargs, reference, tolerance, report, snapshot)
        targets += kept
        dropped = [t for t in candidates if t not in kept]
        if not dropped:
            break
        # the graph of a module that builds Python objects while traced (an HF model making its cache) may not
        # reproduce it: its submodules' may
        candidates = [c for t in dropped for c in _submodule_targets(t.module, recorded, report.not_captured,
                                                                       prefix=t.path)]
    _describe(targets, report, registry, roofline_spec, dtype, device, inputs_require_grad)
    if not targets and not any(r.capture == "sequence" for r in selected):
        report.refused = ("no captured graph reproduces its module's forward on the example inputs"
                          if any("does not reproduce" in w for _, w in report.not_captured)
                          else f"nothing could be captured: {why}")
        return _finish(fast, report)

    for rewrite in selected:
        if rewrite.capture == "cached":
            report.outcomes.append(_apply_cached(rewrite, fast, registry, verify))
            continue
        if rewrite.capture == "sequence":
            report.outcomes.append(_apply_sequence(rewrite, model, fast, args, kwargs, selected, verify, tolerance,
                                                   registry, snapshot, report, dict(
                                                       spec=roofline_spec, dtype=dtype, device=device,
                                                       training=fast.training,
                                                       inputs_require_grad=inputs_require_grad,
                                                       pack_weights=report.pack_weights)))
            continue
        report.outcomes.append(_apply(rewrite, targets, fast, args, kwargs, reference, verify, tolerance, registry,
                                      snapshot, device if measure else None))
    for t in targets:
        if t.installed is not None:
            report.code[t.path] = t.gm.code
    report.graphs = [replace(g, rewritten=g.rewritten or g.path in report.code) for g in report.graphs]
    if measure:
        report.measurement = _measure(shared_copy(model), fast, args, kwargs, device, snapshot)   # copied before
    return _finish(fast, report)


_PACK_POLICIES = ("frozen", "always", "never")
SEQUENCE_CAPTURE = "export, sequence length symbolic"   # CapturedGraph.method of a kv_cache's whole-forward graph


_MAX_DEPTH = 8


def _describe(targets, report, registry, roofline_spec, dtype, device, inputs_require_grad) -> None:
    for t in targets:
        t.ctx_args = dict(spec=roofline_spec, dtype=dtype, path=t.path, device=device, training=t.module.training,
                          inputs_require_grad=inputs_require_grad, pack_weights=report.pack_weights)
        report.graphs.append(CapturedGraph(t.path, type(t.module).__name__, t.capture.method,
                                           len(t.capture.nodes)))
        report.predicted_seconds += _predicted_seconds(t, registry)


def _finish(fast: nn.Module, report: OptimizeReport) -> nn.Module:
    watch(fast)                      # casting the drop-in must not cast the user's model
    fast.shapeprof_report = report   # a plain attribute: not a parameter, buffer or submodule
    return fast


def _select(rewrites, registry) -> list:
    if rewrites is None:
        return [registry.get(name) for name, _ in registry.available()]
    if isinstance(rewrites, str):
        rewrites = [rewrites]
    chosen = []
    for r in rewrites:
        if isinstance(r, str):
            try:
                chosen.append(registry.get(r))
            except KeyError as e:
                raise OptimizeError(e.args[0]) from None
        elif isinstance(r, registry.Rewrite):
            chosen.append(r)
        else:
            raise TypeError(f"rewrites takes names or Rewrite instances, got {type(r).__name__}")
    return chosen


def _why_no_data(model: nn.Module, args, kwargs) -> str:
    """Why the model cannot be run for verification ('' when it can)."""
    from torch._subclasses.fake_tensor import FakeTensor
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta or isinstance(t, FakeTensor):
            return f"{'parameter' if isinstance(t, nn.Parameter) else 'buffer'} '{name}' has no data (meta device)"
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        where = pytree.keystr(path)
        if isinstance(leaf, InputShape):
            return f"input {where} is an InputShape (a shape, no values)"
        if isinstance(leaf, torch.Tensor) and (leaf.is_meta or isinstance(leaf, FakeTensor)):
            return f"input {where} has no data (meta device)"
    return ""


def _cuda_devices(model: nn.Module, args, kwargs) -> set[torch.device]:
    tensors = [*model.parameters(), *model.buffers(), *pytree.tree_leaves((args, kwargs))]
    return {t.device for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"}


def _device_of(model: nn.Module, args, kwargs) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def _spec_for(spec, device: torch.device) -> DeviceSpec:
    if spec is not None or device.type != "cuda":
        return get_spec(spec)
    try:
        return get_spec(torch.cuda.get_device_name(device))   # the GPU it runs on, when it is a known one
    except (SpecError, RuntimeError, AssertionError):
        return get_spec()


# ---------------------------------------------------------------------------------------------- running

_SEED = 0x5EED


@contextmanager
def _seeded(device: torch.device | None) -> Iterator[None]:
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_SEED)
        yield


def _run(module: nn.Module, args, kwargs, snapshot: WriteSnapshot, record_inputs: bool = False):
    """module(*args, **kwargs) under no_grad, quiet and seeded, on copies of the inputs, watched by `snapshot`
    and put back after it, so every run starts from the user's values; with record_inputs, also each
    submodule's first call (positional and keyword arguments), by id(module). What a drop-in's KV cache holds
    from an earlier run is its own, not the user's: its writes are not undone."""
    recorded: dict[int, tuple[tuple, dict]] = {}
    device = next((t.device for t in module.parameters()), None)
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(quiet(module))   # the recording hooks below go into the emptied registries
        stack.enter_context(_seeded(device))
        if record_inputs:
            for m in module.modules():
                m.register_forward_pre_hook(_recorder(recorded), with_kwargs=True)
        a, k = copy_inputs((args, kwargs))
        decoder = getattr(type(module), "_shapeprof_decoder", None)
        held = decoder.tensors() if decoder is not None else []
        try:
            with snapshot.watch(ours=(a, k, held)):
                out = module(*a, **k)
        finally:
            snapshot.restore()
    return _detached(out), recorded


def _recorder(recorded):
    def hook(m, args, kwargs):
        recorded.setdefault(id(m), (args, kwargs))
    return hook


def _detached(tree):
    """The output with its tensors copied, objects holding tensors (a returned cache) included."""
    memo = {id(t): t.detach().clone() for t in tensors_inside(tree)}
    try:
        return copy.deepcopy(tree, memo)
    except Exception:
        return pytree.tree_map(lambda x: memo.get(id(x), x) if isinstance(x, torch.Tensor) else x, tree)


def _verify(module: nn.Module, args, kwargs, reference, tolerance: Tolerance | None,
            snapshot: WriteSnapshot) -> Verification:
    try:
        out, _ = _run(module, args, kwargs, snapshot)
    except Exception as e:
        return Verification(error=f"the rewritten model raised {one_line(e)}")
    return _compare(reference, out, tolerance)


def _output_leaves(out: Any) -> list[tuple[str, Any]]:
    """(path, leaf) of an output, in order: pytree containers (a HuggingFace ModelOutput too), and inside an object
    pytree does not know (a DynamicCache, an EncoderDecoderCache) its attributes, layer by layer, down to the
    tensors: two cache objects are equal when their tensors are."""
    found: list[tuple[str, Any]] = []

    def visit(x: Any, path: str, depth: int) -> None:
        leaves, _ = pytree.tree_flatten_with_path(x)
        if not (len(leaves) == 1 and leaves[0][1] is x):
            for p, leaf in leaves:
                visit(leaf, path + pytree.keystr(p), depth + 1)
        elif not isinstance(x, torch.Tensor) and depth < 8 and next(tensors_inside(x), None) is not None \
                and hasattr(x, "__dict__"):
            for name, v in vars(x).items():
                visit(v, f"{path}.{name}", depth + 1)
        else:
            found.append((path, x))
    visit(out, "", 0)
    return found


def _compare(expected, actual, tolerance: Tolerance | None) -> Verification:
    exp, act = _output_leaves(expected), _output_leaves(actual)
    if [p for p, _ in exp] != [p for p, _ in act]:
        return Verification(error=f"the output's structure changed: {[p for p, _ in act]} instead of "
                                  f"{[p for p, _ in exp]}")
    checks = []
    for (path, e), (_, a) in zip(exp, act):
        name = path or "out"
        if not isinstance(e, torch.Tensor):
            ok = values_equal(a, e)
            checks.append(OutputCheck(name, type(e).__name__, float("nan"), 0.0, 0.0, ok,
                                      "" if ok else f"{a!r} instead of {e!r}"))
            continue
        tol = tolerance or Tolerance.for_output(e)
        dtype = str(e.dtype).removeprefix("torch.")
        if not isinstance(a, torch.Tensor) or a.shape != e.shape or a.dtype != e.dtype:
            what = f"{type(a).__name__}" if not isinstance(a, torch.Tensor) else f"{a.dtype}{list(a.shape)}"
            checks.append(OutputCheck(name, dtype, float("inf"), tol.rtol, tol.atol, False,
                                      f"{what} instead of {e.dtype}{list(e.shape)}"))
            continue
        diff = _max_abs_diff(a, e)
        try:
            torch.testing.assert_close(a, e, rtol=tol.rtol, atol=tol.atol)
            checks.append(OutputCheck(name, dtype, diff, tol.rtol, tol.atol, True))
        except AssertionError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = "; ".join(ln for ln in lines if ln.startswith(("Mismatched", "Greatest"))) or lines[0]
            checks.append(OutputCheck(name, dtype, diff, tol.rtol, tol.atol, False, detail))
    return Verification(tuple(checks))


def _max_abs_diff(a: torch.Tensor, e: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    if a.is_complex():
        return float((a - e).abs().max())
    return float((a.double() - e.double()).abs().max())


# ---------------------------------------------------------------------------------------------- capture targets

@dataclass(eq=False)
class _Target:
    """One captured graph: the real module it runs on, the capture, and the GraphModule rewrites work on."""

    path: str
    module: nn.Module
    capture: Any
    gm: fx.GraphModule | None = None
    example: tuple = ((), {})        # the (args, kwargs) the module was called with: what its guard checks
    installed: Any = None            # the dropin.Installation now in place (None: the class's own forward runs)
    ctx_args: dict = field(default_factory=dict)
    original: nn.Module | None = None   # the user's module at `path`: the drop-in follows its tensors

    def __post_init__(self):
        self.gm = _graph_module(self.module, self.capture)


def _message(e: BaseException) -> str:
    """A capture error's own first line (it names the method and the module already)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _try_capture(module: nn.Module, args, kwargs, path: str = ""):
    """(Capture, '') or (None, why): the module's forward traced, if the graph can stand in for it."""
    try:
        cap = capture(module, *args, method="symbolic_trace", leaf_untraceable=True, **kwargs)
    except (CaptureError, NodeError) as e:
        return None, _message(e)
    lost = _hooks_lost(module, cap, path)
    return (None, lost) if lost else (cap, "")


def _hooks_lost(module: nn.Module, cap, prefix: str = "") -> str:
    """Why the graph would drop user hooks ('' if it would not): the graph calls leaf modules as modules (their
    hooks fire) but runs the forward of every other submodule inline, where nobody calls their hooks."""
    called = {n.target for n in cap.graph.nodes if n.op == "call_module"}
    hooked = []
    for path, m in module.named_modules():
        if not path or path in called or any(path.startswith(c + ".") for c in called):
            continue
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            hooked.append(f"{prefix}.{path}" if prefix else path)
    if hooked:
        return (f"the traced graph runs {', '.join(hooked)} inline, so the hooks registered on "
                f"{'it' if len(hooked) == 1 else 'them'} would not run")
    return ""


def _submodule_targets(root: nn.Module, recorded: dict, not_captured: list, prefix: str = "") -> list[_Target]:
    """The largest submodules of `root` (at `prefix` in the model) that were called and trace, top down; a module
    that does not is looked into."""
    targets: list[_Target] = []
    seen: set[int] = set()

    def visit(path: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            sub = f"{path}.{name}" if path else name
            if id(child) in seen:
                continue
            seen.add(id(child))
            call = recorded.get(id(child))
            if call is None:           # never called itself (a ModuleList, ModuleDict): its children may be
                visit(sub, child)
                continue
            if _torch_leaf(child):     # one of torch's own modules: one op, nothing to rewrite inside
                continue
            cap, why = _try_capture(child, call[0], call[1], sub)
            if cap is None:
                not_captured.append((sub, why))
                visit(sub, child)
                continue
            try:
                targets.append(_Target(sub, child, cap, example=call))
            except OptimizeError as e:
                not_captured.append((sub, str(e)))
    visit(prefix, root)
    return targets


def _torch_leaf(m: nn.Module) -> bool:
    # what fx's Tracer.is_leaf_module keeps whole: torch's own modules (one op each; nothing to rewrite inside)
    return m.__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(m, nn.Sequential)


def _graph_module(module: nn.Module, cap) -> fx.GraphModule:
    """A GraphModule over `module`'s own attributes (shared), on a copy of the captured graph whose nodes carry
    what the capture recorded in node.meta[CAPTURE_KEY]."""
    from shapeprof.rewrites import CAPTURE_KEY
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(cap.graph, env)
    graph.output(out)
    for cn in cap.nodes:
        if cn.node in env:
            env[cn.node].meta[CAPTURE_KEY] = cn
    try:
        return graph_module_over(module, graph, cap.root, class_name=f"{type(module).__name__}Graph")
    except DropInError as e:
        raise OptimizeError(str(e)) from e


def _install(t: _Target, gm: fx.GraphModule) -> None:
    t.installed = install(t.module, gm, t.example, t.installed, original=t.original)


def _uninstall(t: _Target) -> None:
    uninstall(t.module, t.installed)
    t.installed = None


def _predicted_seconds(t: _Target, registry) -> float:
    ctx = registry.RewriteContext(**t.ctx_args)
    return sum(ctx.seconds(cn.records) for cn in t.capture.nodes if cn.records)


def _faithful_targets(fast, targets, args, kwargs, reference, tolerance, report, snapshot) -> list[_Target]:
    """The targets whose unrewritten graph reproduces the model: all of them when the first check passes;
    else each is tried alone and the ones that do not are reported and dropped."""
    for t in targets:
        _install(t, t.gm)
    check = _verify(fast, args, kwargs, reference, tolerance, snapshot)
    for t in targets:
        _uninstall(t)
    if check.ok:
        return targets
    kept = []
    for t in targets:
        _install(t, t.gm)
        alone = _verify(fast, args, kwargs, reference, tolerance, snapshot)
        _uninstall(t)
        if alone.ok:
            kept.append(t)
        else:
            report.not_captured.append((t.path, f"its traced graph does not reproduce its forward on the example "
                                                 f"inputs ({alone.summary()})"))
    return kept


# ---------------------------------------------------------------------------------------------- rewriting

def _apply(rewrite, targets: list[_Target], fast, args, kwargs, reference, verify, tolerance, registry, snapshot,
           measure_on: torch.device | None = None) -> RewriteOutcome:
    if rewrite.capture != "symbolic_trace":
        return RewriteOutcome(rewrite.name, "not run",
                              error=f"it needs a {rewrite.capture} capture, which optimize does not make yet")
    merged = registry.RewriteResult(rewrite.name)
    work: dict[_Target, fx.GraphModule] = {}
    try:
        for t in targets:
            gm = fx.GraphModule(t.gm, copy.deepcopy(t.gm.graph), class_name=t.gm.__class__.__name__)
            result = rewrite(gm, registry.RewriteContext(**t.ctx_args))
            merged = merged.merged(result)
            if result.changed:
                work[t] = gm
    except Exception as e:
        return RewriteOutcome(rewrite.name, "failed", merged,
                              error=one_line(e))
    if not work:
        return RewriteOutcome(rewrite.name, "no match", merged)
    previous = {t: (t.installed.gm if t.installed is not None else None) for t in work}
    without = shared_copy(fast) if measure_on is not None else None   # the model as it is before this rewrite

    def undo():
        for t in work:
            _install(t, previous[t]) if previous[t] is not None else _uninstall(t)
    try:
        for t, gm in work.items():
            _install(t, gm)
    except Exception as e:
        undo()
        return RewriteOutcome(rewrite.name, "failed", merged, error=one_line(e))
    check = None
    if verify is not False:
        check = _verify(fast, args, kwargs, reference, tolerance, snapshot)
        if not check.ok:
            undo()
            return RewriteOutcome(rewrite.name, "rejected", merged, check)
    timed = _measure(without, fast, args, kwargs, measure_on, snapshot) if without is not None else None
    if timed is not None and timed.slower:
        undo()
        return RewriteOutcome(rewrite.name, "slower", merged, check, measurement=timed)
    for t, gm in work.items():
        t.gm = gm
    return RewriteOutcome(rewrite.name, "applied" if check is not None else "unverified", merged, check,
                          measurement=timed)


# ---------------------------------------------------------------------------------------------- step by step

def _apply_sequence(rewrite, model, fast, args, kwargs, selected, verify, tolerance, registry, snapshot,
                    report: OptimizeReport, ctx_args: dict) -> RewriteOutcome:
    """A rewrite of the whole forward with the sequence length symbolic (a KV cache): captured with
    `shapeprof.sequence`, given the other selected rewrites' passes on its graph too, installed in front of the
    drop-in's forward and verified call by call (`shapeprof.stepwise`)."""
    from .kvcache import IncrementalDecoder
    from .sequence import SequenceCaptureError, attributes_as_input, capture_sequence

    def skipped(why: str) -> RewriteOutcome:
        return RewriteOutcome(rewrite.name, "no match",
                              registry.RewriteResult(rewrite.name, skipped=[registry.Skip("the model", why)]))

    why = rewrite.unsuitable(model) or _hooked(model)
    if why:
        return skipped(why)
    try:
        seq = capture_sequence(model, *args, **kwargs)
        seq.gm = graph_module_over(fast, seq.gm.graph, seq.gm, class_name=f"{type(model).__name__}Sequence")
    except (SequenceCaptureError, DropInError) as e:
        return skipped(str(e))
    _annotate(seq.gm, registry)
    ctx = registry.RewriteContext(**ctx_args, sequence=seq)
    gm = seq.gm
    try:
        result = rewrite(gm, ctx)
    except Exception as e:
        return RewriteOutcome(rewrite.name, "failed", error=one_line(e))
    if not result.changed:
        return RewriteOutcome(rewrite.name, "no match", result)
    plain = fx.Graph()
    plain.output(plain.graph_copy(gm.graph, {}))
    plan = result.decoding
    passes = []
    for other in selected:   # the cached forward runs the same fused kernels as the rest of the drop-in
        if other.capture != "symbolic_trace":
            continue
        try:
            done = other(gm, ctx)
        except Exception as e:
            result.notes.append(f"{other.name} on the cached forward failed, left out: {one_line(e)}")
            continue
        if done.changed:
            passes.append(done)

    def installed() -> tuple[Any, Any]:
        attributes = attributes_as_input(gm)
        decoder = IncrementalDecoder(type(gm).forward, seq.signature, seq.bound, seq.ids_param, seq.ids_index,
                                     seq.leaves, seq.out_spec, plan.seq_dim, plan.max_length, plan.outputs,
                                     attributes, gm, plan.bytes_per_position)
        return decoder, install_decoder(fast, gm, decoder, original=model)

    try:
        decoder, installation = installed()
    except Exception as e:
        return RewriteOutcome(rewrite.name, "failed", result, error=one_line(e))
    check = None
    if verify is not False:
        check = _verify_steps(fast, model, decoder, seq, plan, tolerance, snapshot)
        if not check.ok and passes:   # try the cache alone before giving up on it
            uninstall(fast, installation)
            gm.graph = plain
            first = check
            decoder, installation = installed()
            check = _verify_steps(fast, model, decoder, seq, plan, tolerance, snapshot)
            if check.ok:
                result.notes.append(f"the cached forward runs without {', '.join(p.name for p in passes)}: with "
                                    f"them it differed ({first.summary()})")
                passes = []
        if not check.ok:
            uninstall(fast, installation)
            return RewriteOutcome(rewrite.name, "rejected", result, check)
    for p in passes:
        result.notes.append(f"the cached forward also runs {p.name}: {len(p.applied)} matched")
    report.graphs.append(CapturedGraph("", type(model).__name__, SEQUENCE_CAPTURE,
                                       sum(1 for _ in gm.graph.nodes), rewritten=True))
    report.code[f"{rewrite.name} (the cached forward)"] = gm.code
    return RewriteOutcome(rewrite.name, "applied" if check is not None else "unverified", result, check)


def _apply_cached(rewrite, fast, registry, verify) -> RewriteOutcome:
    """A rewrite of how the cached forward a 'sequence' rewrite installed is run (paged memory), checked against
    the model by `batching.check_ragged`."""
    from .batching import RaggedUnsupported, check_ragged
    decoder = type(fast).__dict__.get("_shapeprof_decoder")
    if decoder is None or decoder.graph_module is None:
        return RewriteOutcome(rewrite.name, "no match", registry.RewriteResult(rewrite.name, skipped=[registry.Skip(
            "the model", "it runs the cache kv_cache inserts, and kv_cache was not applied (see above)")]))
    try:
        result = rewrite(decoder.graph_module, registry.RewriteContext(decoder=decoder))
    except Exception as e:
        return RewriteOutcome(rewrite.name, "failed", error=one_line(e))
    if not result.changed:
        return RewriteOutcome(rewrite.name, "no match", result)
    if verify is False:
        return RewriteOutcome(rewrite.name, "unverified", result)
    attrs = decoder.attributes_of(fast) if decoder.attributes else None
    try:
        with torch.no_grad():
            rows = check_ragged(fast, decoder, result.decoding, attrs,
                                next((p.device for p in fast.parameters()), None))
    except RaggedUnsupported as e:
        return RewriteOutcome(rewrite.name, "rejected", result, Verification(error=one_line(e)))
    dtype = str(next((p.dtype for p in fast.parameters()), torch.float32)).removeprefix("torch.")
    return RewriteOutcome(rewrite.name, "applied", result, Verification(tuple(
        OutputCheck(what, dtype, diff, tol, tol, True) for what, diff, tol in rows)))


def _hooked(model: nn.Module) -> str:
    """Why a whole-forward graph would drop the model's hooks ('' if it has none): it calls no submodule."""
    hooked = [path or type(model).__name__ for path, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks]
    if hooked:
        return (f"hooks are registered on {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''}, and the "
                f"cached forward runs the whole model as one graph, where they would not run")
    return ""


def _annotate(gm: fx.GraphModule, registry) -> None:
    """What the other rewrites read of each node (node.meta[CAPTURE_KEY]), at the example's sizes."""
    from .capture import CapturedNode
    from .sequence import example_records, hinted_meta, module_of
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        first = next((v for v in (value if isinstance(value, (list, tuple)) else [value])
                      if isinstance(v, torch.Tensor)), None)
        node.meta[registry.CAPTURE_KEY] = CapturedNode(node, *module_of(node), example_records(node),
                                                       hinted_meta(first) if first is not None else None)


def _verify_steps(fast, model, decoder, seq, plan, tolerance, snapshot) -> Verification:
    """The cached drop-in against the original on `stepwise.schedule`'s calls: each output compared, and each
    call checked to have used the cache when it should (a cache never used would pass every comparison)."""
    from .sequence import call_args
    from .stepwise import schedule
    original = shared_copy(model)
    steps = schedule(seq.bound[seq.ids_param], plan.seq_dim, plan.max_length)
    decoder.reset()
    checks: list[OutputCheck] = []
    try:
        for step in steps:
            a, k = call_args(seq.signature, {**seq.bound, seq.ids_param: step.ids})
            expected, _ = _run(original, a, k, snapshot)
            before = dict(decoder.calls)
            try:
                actual, _ = _run(fast, a, k, snapshot)
            except Exception as e:
                return Verification(tuple(checks), error=f"{step.label}: the cached model raised {one_line(e)}")
            served = {key: decoder.calls[key] - before[key] for key in before}
            kind = "incremental" if step.reuses else "from scratch"
            if not served[kind]:
                return Verification(tuple(checks), error=f"{step.label}: the call should have run "
                                                         f"{'on the cache' if step.reuses else 'from scratch'}, "
                                                         f"but ran {next(k for k, v in served.items() if v)}")
            v = _compare(expected, actual, tolerance)
            checks.extend(replace(c, output=f"{step.label}: {c.output}") for c in v.checks)
            if not v.ok:
                return Verification(tuple(checks), error=f"{step.label}: {v.error}" if v.error else "")
    finally:
        decoder.reset()
    return Verification(tuple(checks))


# ---------------------------------------------------------------------------------------------- measuring

_REPEATS = 15


def _measure(baseline: nn.Module, fast: nn.Module, args, kwargs, device: torch.device,
             snapshot: WriteSnapshot) -> Measurement:
    """Per-call medians of the original and the optimized model, interleaved (ABBA) so drift hits both alike.

    The warm-up calls are watched by `snapshot`, so what the timed calls write of the user's tensors is saved
    (and put back when optimize returns) without a Python call per op in the timed calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a, k = copy_inputs((args, kwargs))
    with torch.no_grad(), quiet(baseline), quiet(fast):
        baseline, fast = _from_scratch(baseline), _from_scratch(fast)
        with snapshot.watch(ours=(a, k)):
            for _ in range(3):
                baseline(*a, **k)
                fast(*a, **k)
        sync()
        start = time.perf_counter()
        baseline(*a, **k)
        sync()
        one = time.perf_counter() - start
        calls = max(1, min(1000, int(0.02 / max(one, 1e-7))))   # about 20 ms per timed sample
        times: dict[int, list[float]] = {0: [], 1: []}
        for r in range(_REPEATS):   # ABBA: each pair of samples sees the same drift
            order = ((0, baseline), (1, fast)) if r % 2 == 0 else ((1, fast), (0, baseline))
            for which, m in order:
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    m(*a, **k)
                sync()
                times[which].append((time.perf_counter() - start) / calls)
    ratios = tuple(b / a for a, b in zip(times[0], times[1]) if a > 0)
    return Measurement(statistics.median(times[0]), statistics.median(times[1]), _REPEATS, calls, str(device),
                       ratios)


def _from_scratch(module: nn.Module):
    """`module`, or for a drop-in with a KV cache a callable that empties the cache before each call: a repeated
    call with the same tokens would otherwise reuse it, and the timing would not be one call's."""
    decoder = getattr(type(module), "_shapeprof_decoder", None)
    if decoder is None:
        return module

    def call(*a, **k):
        decoder.reset()
        return module(*a, **k)
    return call


# ---------------------------------------------------------------------------------------------- rendering

def render(report: OptimizeReport):
    """The report as a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from .text import fmt_bytes, fmt_seconds

    parts: list[Any] = []
    head = Text()
    head.append("shapeprof optimize ", style="bold")
    head.append(report.model, style="bold cyan")
    head.append(f"  on {report.device}; roofline of {report.spec.display_name}")
    if report.dtype:
        head.append(f" as {report.dtype}")
    parts.append(head)
    if not report.verify:
        parts.append(Text("NOT VERIFIED: verify=False, so the rewrites below were kept without running the model "
                          "against the original. Outputs may differ.", style="bold white on red"))
    if report.refused:
        parts.append(Text(f"nothing rewritten: {report.refused}", style="bold yellow"))
    captured = Text()
    for path, why in report.not_captured:
        captured.append(f"not traced: {path or report.model}: {why}\n", style="yellow")
    rewritten = [g for g in report.graphs if g.rewritten and g.method != SEQUENCE_CAPTURE]
    if rewritten:
        names = ", ".join(g.path or f"{g.module_type} (the whole model)" for g in rewritten)
        captured.append(f"rewrote the traced forward of: {names}")
        if rewritten[0].path:
            captured.append(f"; {report.model}'s own forward runs as written around them")
    unchanged = [g for g in report.graphs if not g.rewritten]
    if unchanged and not report.refused:
        if rewritten:
            captured.append("\n")
        captured.append("traced, no rewrite kept: " + ", ".join(g.path or g.module_type for g in unchanged),
                        style="dim")
    if any(g.method == SEQUENCE_CAPTURE and g.rewritten for g in report.graphs):
        captured.append(f"{chr(10) if rewritten or unchanged else ''}cached decoding: {report.model}'s whole forward, "
                        f"exported with the sequence length symbolic, runs with a KV cache for the calls it serves "
                        f"(see kv_cache below); other calls run as above")
    parts.append(captured)

    for o in report.outcomes:
        line = Text()
        line.append(f"{o.name}: ", style="bold")
        style = {"applied": "bold green", "unverified": "bold red", "rejected": "bold red", "failed": "bold red",
                 "slower": "bold yellow"}
        line.append(o.status, style=style.get(o.status, "dim"))
        if o.result is not None:
            line.append(f"  ({len(o.result.applied)} matched, {len(o.result.skipped)} skipped)")
        if o.status == "rejected":
            line.append(f"  undone: its outputs differ from the original's: {o.verification.summary()}")
        elif o.status == "slower":
            t = o.measurement
            line.append("  undone: measured slower" + ("" if t is None else
                        f", {fmt_seconds(t.original_seconds)} without it, {fmt_seconds(t.optimized_seconds)} with "
                        f"it per call (medians of {t.repeats} interleaved repeats on {t.device})"))
        elif o.verification is not None:
            line.append(f"  verified: {o.verification.summary()}")
        if o.kept and o.measurement is not None:
            line.append(f"  measured {o.measurement.speedup:.2f}x")
        if o.error:
            line.append(f"  {o.error}", style="red")
        parts.append(line)
        if o.result is not None and o.result.notes and o.kept:
            parts.append(Text("\n".join(f"  {n}" for n in o.result.notes), style="dim"))

    if report.applied:
        table = Table(title=f"Applied (predicted on {report.spec.display_name})", title_justify="left",
                      header_style="bold")
        for col in ("where", "what"):
            table.add_column(col, overflow="fold")
        table.add_column("bytes saved", justify="right", no_wrap=True)
        table.add_column("time saved", justify="right", no_wrap=True)
        for m in report.applied:   # '-': nothing the roofline of one call can see (a cache pays across calls)
            table.add_row(m.where, m.what, fmt_bytes(m.bytes_saved) if m.bytes_saved else "-",
                          fmt_seconds(m.seconds_saved) if m.seconds_saved else "-")
        parts.append(table)
    if report.skipped:
        table = Table(title="Skipped", title_justify="left", header_style="bold")
        table.add_column("where", overflow="fold")
        table.add_column("why", overflow="fold")
        for s in report.skipped:
            table.add_row(s.where, s.reason)
        parts.append(table)
    checks = [(o.name, c) for o in report.outcomes if o.verification is not None for c in o.verification.checks]
    if checks:
        table = Table(title="Verification (rewritten vs original on the example inputs)", title_justify="left",
                      header_style="bold")
        for col in ("rewrite", "output", "dtype"):
            table.add_column(col, overflow="fold")
        for col in ("max abs diff", "rtol", "atol", ""):
            table.add_column(col, justify="right", no_wrap=True)
        for name, c in checks:
            table.add_row(name, c.output, c.dtype, "-" if math.isnan(c.max_abs_diff) else f"{c.max_abs_diff:.3g}",
                          f"{c.rtol:.3g}", f"{c.atol:.3g}", Text("ok", style="green") if c.ok
                          else Text("FAIL", style="bold red"))
        parts.append(table)
    totals = Text()
    if report.predicted_seconds:
        after = report.predicted_seconds - report.seconds_saved
        totals.append(f"predicted for the traced graphs on {report.spec.display_name}: "
                      f"{fmt_seconds(report.predicted_seconds)} -> "
                      f"{fmt_seconds(after)} ({report.seconds_saved / report.predicted_seconds:.1%} less), "
                      f"{fmt_bytes(report.bytes_saved)} less memory traffic per call\n")
    m = report.measurement
    if m is not None:
        totals.append(f"measured on {m.device}: original {fmt_seconds(m.original_seconds)}, optimized "
                      f"{fmt_seconds(m.optimized_seconds)} per call (medians of {m.repeats} interleaved repeats "
                      f"of {m.calls_per_repeat} calls): ")
        totals.append(f"{m.speedup:.2f}x", style="bold")
    if totals:
        parts.append(totals)
    if report.applied:
        parts.append(Text(_GUARD_NOTE + " " + _PACK_NOTES.get(report.pack_weights, ""), style="dim"))
    return Group(*parts)


_GUARD_NOTE = ("The rewritten forward runs only while the model is as it was optimized (the same submodules, no new "
               "hooks, the same attribute values, parameter dtypes and devices); after a change the original "
               "forward runs, correct and unoptimized, with a warning: call shapeprof.optimize() again.")
_PACK_NOTES = {
    "frozen": "CPU weights are kept packed for oneDNN only while they do not require grad "
              "(model.requires_grad_(False)); a trainable weight is used as it is, so any write to it is seen.",
    "always": "pack_weights='always': CPU weights are kept packed for oneDNN on the promise that they change only "
              "through in-place PyTorch ops (which are seen) or not at all; a write through .data, numpy or a fused "
              "optimizer step is NOT seen: optimize again after one.",
    "never": "pack_weights='never': no weight is kept packed."}


def _text_console():
    from rich.console import Console
    return Console(file=io.StringIO(), width=120, color_system=None)
