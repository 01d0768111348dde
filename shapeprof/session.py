"""A trace session: the models a script ran, each analysed (and profiled, optimized) and written out.

What `shapeprof trace` does between running the script (`shapeprof.scripts`) and printing (`shapeprof.cli`): for
each recorded model, analyse it on the chosen spec (one the script trained, as its training step: forward, backward
and the update of the optimizer the script stepped it with), profile and optimize it when asked, write every output
format (`shapeprof.output`) into its run directory, and keep the run directory's trace.json (`summary`) up to date,
so that an interrupted trace still lists what was finished.

    >>> import torch, tempfile, shapeprof
    >>> from shapeprof.scripts import ModelRecorder
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    >>> with ModelRecorder() as rec:
    ...     _ = model(torch.randn(4, 16))
    >>> [r] = list(analyse_all(rec.models, TraceConfig(outputs=("json",)), shapeprof.get_spec(), tempfile.mkdtemp()))
    >>> sorted(r.outputs["json"]), r.results.report.model
    (['report'], 'Sequential')
"""
from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils import _pytree as pytree

from . import output
from .analysis import UncoveredOpError, analyze
from .hardware import DEFAULT_SPEC_NAME, DeviceSpec
from .output import Results
from .output.jsonfiles import optimize_document
from .precision import resolve as resolve_precision
from .report import Report
from .rundir import RUN_NAME, TRACE_SCHEMA, TRACE_SCHEMA_VERSION, RunDir
from .scripts import OptimizerSeen, ScriptRun, TracedModel
from .text import one_line
from .training import Train

__all__ = ["FORWARD_ONLY", "NO_OPTIMIZER_STEP", "ModelResult", "TraceConfig", "analyse_all", "analyse_model",
           "problems", "summary", "training_step_of", "with_trace_notes"]

#: The note a report gets when the script ran backward through its model and the report has no training step
#: (it could not be priced, or the report is a measured forward): its costs are the forward's alone.
FORWARD_ONLY = "forward pass only: backward and the optimizer step are not analysed"

#: The note of a model that ran backward while no torch.optim optimizer stepped its parameters.
NO_OPTIMIZER_STEP = ("backward ran but no optimizer.step() of a torch.optim optimizer was seen for it: the step is "
                     "priced with AdamW, shapeprof's default")


@dataclass
class TraceConfig:
    """Everything `shapeprof trace` can be told; the CLI takes its defaults from here (and only from here).

    Attributes:
        spec: device to predict for: a built-in name (`shapeprof specs`) or a .toml/.json spec file.
        dtype: analyse as if parameters and floating inputs were in this dtype (a name from
            `shapeprof.precision.DTYPES`); None analyses the dtypes the script actually used.
        top: rows in each report's "top nodes" table.
        logdir: the folder each trace makes its own run directory in (see `shapeprof.rundir`): its reports,
            trace.json and TensorBoard runs go there, so traces never overwrite each other.
        run_name: the run directory's name; ``{script}`` is the script's (or module's) name, ``{time}`` the
            start time (``-2``, ``-3`` ... are added while the name is taken).
        outputs: the output formats written for each model (`shapeprof.output.available()`); "json" is what
            `shapeprof report` reads back.
        json: print one JSON document on stdout instead of the rich reports (the script's own stdout then goes
            to stderr, so stdout holds nothing but the JSON).
        profile: also run each model for real under the profiler and show measured times beside predicted ones.
        profile_steps: measured steps per model for `profile`; None: `shapeprof.profiling.profile`'s default.
        optimize: also apply shapeprof's verified rewrites to each model: predicted time before and after (and
            measured before and after on this machine, with `profile`).
        all_modules: also analyse top-level modules without parameters or buffers (a loss function called as
            ``criterion(out, y)``); by default they are listed as skipped.
        method: capture method: auto, symbolic_trace, export or dispatch.
        strict: an op without a cost formula is an analysis error instead of a coverage warning.
        progress: show a progress display; None: only when stdout and stderr are terminals (and not `json`).
    """

    spec: str = DEFAULT_SPEC_NAME
    dtype: str | None = None
    top: int = 15
    logdir: str = "runs/shapeprof"
    run_name: str = RUN_NAME
    outputs: tuple[str, ...] = ("json", "tensorboard")
    json: bool = False
    profile: bool = False
    profile_steps: int | None = None
    optimize: bool = False
    all_modules: bool = False
    method: str = "auto"
    strict: bool = False
    progress: bool | None = None
    phase: str | None = None      # "prefill" or "decode": analyse that phase instead of the first call's inputs
    batch: int = 1                # --phase: sequences
    context: int = 4096           # --phase decode: positions in the cache
    tokens: int = 2048            # --phase prefill: the prompt's tokens

    def phase_input(self):
        """`shapeprof.Decode` / `shapeprof.Prefill` for `phase` (None without one)."""
        from .phases import Decode, Prefill
        if self.phase is None:
            return None
        return Decode(self.batch, self.context) if self.phase == "decode" else Prefill(self.batch, self.tokens)

    @property
    def keeps_real_inputs(self) -> bool:
        """Measuring (profile) and verifying rewrites (optimize) need the real module and real inputs."""
        return self.profile or self.optimize


@dataclass
class ModelResult:
    """One recorded model, as far as the session got with it."""

    traced: TracedModel
    results: Results | None = None          # the analysis (and measurement, optimize report): what is written
    error: str | None = None                # why the analysis failed (one line)
    warnings: list[str] = field(default_factory=list)
    outputs: dict[str, dict[str, Path]] = field(default_factory=dict)   # format -> what it wrote (kind -> path)


# ---------------------------------------------------------------------------------------------- analysing

_ANALYZE_KEYWORDS = ("spec", "dtype", "strict", "method", "tf32", "train")


def analyse_model(traced: TracedModel, config: TraceConfig, spec: Any = None) -> Report:
    """`shapeprof.analyze` of a recorded model on its first call's inputs, as `config` says, with the notes of
    what the script did that the analysis leaves out (`with_trace_notes`).

    A model the script ran backward through is priced as a training step (`report.training`: forward, backward,
    the optimizer's update) with the optimizer and loss the script used (`training_step_of`), unless `config`
    asks for a phase (an inference step). If the step cannot be priced, the report is the forward's, with a note
    saying why.

    Args:
        spec: an already resolved DeviceSpec (default: `config.spec`).
    """
    report, notes = _analyse(traced, config, spec)
    return with_trace_notes(report, traced, notes)


def _analyse(traced: TracedModel, config: TraceConfig, spec: Any) -> tuple[Report, tuple[str, ...]]:
    """analyze's report, and the notes of how the script's training step was (or was not) priced."""
    _check_clash(traced.type_name, traced.kwargs, _ANALYZE_KEYWORDS, "analyze")
    phase = config.phase_input()
    args, kwargs = ((phase,), {}) if phase is not None else (traced.args, traced.kwargs)
    options = dict(spec=spec if spec is not None else config.spec, dtype=config.dtype, strict=config.strict,
                   method=config.method)
    train, notes = training_step_of(traced) if phase is None else (None, [])
    if train is not None:
        try:
            return analyze(traced.target(), *args, train=train, **options, **kwargs), tuple(notes)
        except UncoveredOpError:   # strict: the forward's own error, which the forward alone would raise too
            raise
        except Exception as e:   # the forward's report is never lost for the step's sake
            _debug_traceback(e)
            notes = [f"the training step could not be priced: {one_line(e)}"]
    return analyze(traced.target(), *args, **options, **kwargs), tuple(notes)


def training_step_of(traced: TracedModel) -> tuple[Train | None, list[str]]:
    """The `shapeprof.Train` that prices the training step the script ran on this model, and notes saying where
    its parts came from; (None, why) when there is no step to price (no backward ran: (None, [])).

    The optimizer is the one whose step() held the model's parameters (its class, group 0's settings); with none
    seen, AdamW (`NO_OPTIMIZER_STEP`). The loss is the loss module the script called on the model's output (with
    that call's other inputs as targets), else the model's own (`.loss`, a loss in the tuple it returns), else
    output.sum() (`capture_backward` says so).
    """
    if not traced.ran_backward:
        return None, []
    seen = traced.optimizer
    notes: list[str] = []
    if seen is None:
        optimizer, kwargs = "adamw", {}
        notes.append(NO_OPTIMIZER_STEP)
    else:
        from .optimizer_step import _optimizer_class
        try:
            _optimizer_class(seen.cls)
        except ValueError:
            return None, [f"the script's optimizer is {_qualified(seen.cls)}, which shapeprof cannot price (it "
                          f"prices torch.optim SGD, Adam and AdamW): the training step is not analysed"]
        optimizer, kwargs = seen.cls, dict(seen.kwargs)
        notes.append(_optimizer_note(traced, seen))
    loss_fn, targets = None, ()
    if traced.loss is not None:
        loss = traced.loss
        loss_fn, targets = _LossCall(loss.module.target(), loss.output, loss.shape, dict(loss.module.kwargs)), \
            loss.targets
        how = "" if loss.by_identity else " (matched to it by shape and dtype)"
        notes.append(f"the loss is the script's {loss.module.type_name} on {traced.name}'s output{how}, with the "
                     f"other inputs of its first call")
    return Train(optimizer=optimizer, optimizer_kwargs=kwargs, loss_fn=loss_fn, targets=targets), notes


def _optimizer_note(traced: TracedModel, seen: OptimizerSeen) -> str:
    state = ", ".join(f"{k} {str(d).removeprefix('torch.')}" for k, d in seen.state_dtypes.items())
    text = f"the optimizer is the script's {seen.describe()}, as at its first step()"
    if state:
        text += f" (its state: {state})"
    if seen.differing:
        text += (f"; its {seen.groups} param groups set {', '.join(seen.differing)} differently: group 0's is "
                 f"priced for every parameter")
    if seen.parameters < seen.trainable:
        text += (f"; it holds {seen.parameters} of {traced.name}'s {seen.trainable} trainable parameters: all are "
                 f"priced")
    if seen.others:
        text += f"; {', '.join(dict.fromkeys(seen.others))} stepped some of its parameters too and is not priced"
    return text


def _qualified(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.optim"):
        module = "torch.optim"
    return f"{module}.{cls.__qualname__}"


class _LossCall:
    """loss_fn for `Train`: the script's loss module (its meta shadow) on the tensor of the model's output it
    took, in the shape it took it, with the other inputs of its call (``criterion(logits.view(-1, V), y)``)."""

    def __init__(self, module: Any, output: int, shape: tuple[int, ...], kwargs: dict[str, Any]) -> None:
        self.module, self.output, self.shape, self.kwargs = module, output, shape, kwargs

    def __call__(self, output: Any, *targets: Any) -> Any:
        leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]
        if self.output >= len(leaves):
            raise ValueError(f"the model's output holds {len(leaves)} tensors, not the {self.output + 1} the "
                             f"script's loss was called on")
        x = leaves[self.output]
        if tuple(x.shape) != self.shape:
            x = x.reshape(self.shape)   # the loss took a view: logits.view(-1, vocab)
        return self.module(x, *targets, **self.kwargs)


def with_trace_notes(report: Report, traced: TracedModel, notes: tuple[str, ...] | list[str] = ()) -> Report:
    """`report` with the notes of what the script did that the analysis leaves out, each once: `notes` (how its
    training step was priced, or why not), and `FORWARD_ONLY` when the script ran backward through the model and
    the report has no training step."""
    notes = (*notes, *((FORWARD_ONLY,) if traced.ran_backward and report.training is None else ()))
    missing = tuple(dict.fromkeys(n for n in notes if n not in report.notes))
    return dataclasses.replace(report, notes=report.notes + missing) if missing else report


def analyse_all(models: list[TracedModel], config: TraceConfig, spec: DeviceSpec, run_dir: str | os.PathLike,
                on_step: Callable[[int, str], None] | None = None) -> Iterator[ModelResult]:
    """Analyse (profile, optimize) and write out each model in turn, yielding its result once its files are
    written. `on_step(i, what)` is told each step of model `i` ('analysing', 'profiling', 'optimizing', 'saving')."""
    for i, model in enumerate(models):
        result = ModelResult(model)
        _analyse_one(result, config, spec, Path(run_dir), lambda what: on_step(i, what) if on_step else None)
        yield result


def steps_per_model(config: TraceConfig) -> int:
    """How many `on_step` calls `analyse_all` makes per model (a progress display's total)."""
    return 2 + config.profile + config.optimize


def _analyse_one(result: ModelResult, config: TraceConfig, spec: DeviceSpec, run_dir: Path, step) -> None:
    traced = result.traced
    step("analysing")
    try:
        report, notes = _analyse(traced, config, spec)
        results = result.results = Results(traced.name, with_trace_notes(report, traced, notes))
    except Exception as e:
        result.error = one_line(e)
        _debug_traceback(e)
        return
    if config.profile:
        step("profiling")
        try:
            profiled = _profile(traced, config, spec)
            # the measured run is the forward's; the predicted training step is the analysis's
            predicted = profiled.predicted
            if predicted.training is None and report.training is not None:
                predicted = dataclasses.replace(predicted, training=report.training)
            results.report = with_trace_notes(predicted, traced, notes)
            results.measured = with_trace_notes(profiled.measured, traced)
            results.measured_trace, results.note = profiled.trace, profiled.note
        except Exception as e:
            result.warnings.append(f"--profile failed: {one_line(e)}")
            _debug_traceback(e)
    if config.optimize:
        step("optimizing")
        try:
            results.optimized = _optimize(traced, config, spec)
        except Exception as e:
            result.warnings.append(f"--optimize failed: {one_line(e)}")
            _debug_traceback(e)
    step("saving")
    for name in config.outputs:
        try:
            result.outputs[name] = output.get(name).write(results, run_dir)
        except Exception as e:   # a format that cannot write loses its own files, never the others'
            result.warnings.append(f"the {name} output could not be written: {one_line(e)}")
            _debug_traceback(e)


def _profile(traced: TracedModel, config: TraceConfig, spec: DeviceSpec):
    from .profiling import profile
    module, args, kwargs = traced.real
    own = {"steps": config.profile_steps} if config.profile_steps is not None else {}
    _check_clash(traced.type_name, kwargs, ("logdir", "spec", "dtype", "method", "steps", "warmup",
                                             "machine_spec"), "profile")
    # logdir=None: the TensorBoard runs are written by the tensorboard output, with the other runs of this trace
    phase = config.phase_input()
    if phase is not None:   # the measured step is the phase's, on the script's model
        return profile(module, phase, logdir=None, spec=spec, dtype=config.dtype, **own)
    return profile(module, *args, logdir=None, spec=spec, dtype=config.dtype, method=config.method, **own,
                   **kwargs)


def _optimize(traced: TracedModel, config: TraceConfig, spec: DeviceSpec):
    """The optimized drop-in's `shapeprof_report` (predicted before/after; measured too with --profile)."""
    from .optimize import optimize
    module, args, kwargs = traced.real
    _check_clash(traced.type_name, kwargs, ("rewrites", "verify", "measure", "spec", "dtype", "pack_weights"),
                 "optimize")
    fast = optimize(module, *args, spec=spec, dtype=resolve_precision(config.dtype).dtype, measure=config.profile,
                    **kwargs)
    return fast.shapeprof_report


def _check_clash(type_name: str, kwargs: dict, reserved: tuple[str, ...], what: str) -> None:
    clash = [k for k in kwargs if k in reserved]
    if clash:
        raise ValueError(f"{type_name}.forward takes keyword input(s) {', '.join(map(repr, clash))}, "
                         f"which shapeprof's {what}() reserves for itself")


def _debug_traceback(e: BaseException) -> None:
    if os.environ.get("SHAPEPROF_DEBUG"):
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- trace.json

def summary(run: ScriptRun, results: list[ModelResult], skipped: list[TracedModel], config: TraceConfig,
            spec: DeviceSpec, run_dir: RunDir | None, *, inline: bool, status: str = "complete",
            pending: list[TracedModel] = ()) -> dict[str, Any]:
    """The trace as one JSON document (trace.json): what ran, how it ended, each model finished (`inline`: with
    its whole reports), and, while `status` is 'analysing' or 'interrupted', the models not (yet) analysed."""
    exc = run.exception
    return {
        "schema": TRACE_SCHEMA, "version": TRACE_SCHEMA_VERSION,
        "target": run.target, "is_module": run.is_module, "argv": run.argv,
        "exit_code": run.exit_code,
        "exception": None if exc is None else {"type": type(exc).__name__, "message": str(exc)},
        "script_seconds": run.seconds, "spec": spec.name, "dtype": config.dtype,
        "status": status,   # analysing (still, or killed), interrupted (Ctrl-C), complete
        "logdir": str(run_dir.logdir) if run_dir else None,
        "run_dir": str(run_dir.path) if run_dir else None,
        "models": [_model_summary(r, inline) for r in results],
        "not_analysed": [m.name for m in pending],
        "failed": sum(r.error is not None for r in results),
        "skipped": [{"name": m.name, "type": m.type_name, "calls": m.calls,
                     "reason": "no parameters or buffers"} for m in skipped],
    }


def _model_summary(r: ModelResult, inline: bool) -> dict[str, Any]:
    t = r.traced
    files = r.outputs.get("json", {})
    d: dict[str, Any] = {
        "name": t.name, "type": t.type_name, "calls": t.calls, "distinct_inputs": t.distinct_inputs,
        "first_call_raised": t.first_call_raised, "error": r.error, "warnings": r.warnings,
        # what the script did with it beyond calling it (its report prices the training step from these)
        "ran_backward": t.ran_backward, "optimizer": t.optimizer.describe() if t.optimizer else None,
        "loss": t.loss.module.type_name if t.loss else None,
        "report_path": _path(files.get("report")), "measured_report_path": _path(files.get("measured")),
        "optimize_path": _path(files.get("optimize")),
        "tensorboard_runs": {str(k): str(v) for k, v in r.outputs.get("tensorboard", {}).items()},
        "outputs": {fmt: {k: str(v) for k, v in written.items()} for fmt, written in r.outputs.items()},
    }
    res = r.results
    if res is not None:
        d["inputs"] = list(res.report.inputs)
        d["notes"] = list(res.report.notes)   # what the numbers leave out: forward pass only, say
        d["predicted_seconds"] = res.report.total.predicted_seconds
        if inline:
            d["report"] = res.report.to_dict()
        if res.measured is not None:
            d["measured_on"] = res.measured.spec.name
            d["measured_seconds"] = res.measured.total.measured_seconds
            d["measured_predicted_seconds"] = res.measured.total.predicted_seconds
            if inline:
                d["measured_report"] = res.measured.to_dict()
        if res.optimized is not None:   # the one shape optimize.json holds too
            d["optimize"] = optimize_document(res.optimized)
    return d


def _path(p: Path | None) -> str | None:
    return str(p) if p is not None else None


# ---------------------------------------------------------------------------------------------- what went wrong

def no_model_message(run: ScriptRun) -> str:
    what = f"`{'python -m ' if run.is_module else ''}{run.target}`"
    if run.models:
        return f"{what} ran no model with parameters or buffers: nothing to analyse."
    return (f"{what} ran no nn.Module at top level: no model to analyse (a model called only inside a "
            f"torch.compile'd function is not seen)")


def problems(run: ScriptRun, results: list[ModelResult]) -> list[str]:
    """One line per thing that went wrong: no model, a model that failed, warnings, recording errors."""
    out = [no_model_message(run)] if not results else []
    out += [f"could not analyse {r.traced.name}: {r.error}" for r in results if r.error]
    out += [f"{r.traced.name}: {w}" for r in results for w in r.warnings]
    out += [f"recording: {e}" for e in run.recorder_errors]
    return out


def calls(traced: TracedModel) -> str:
    """'GPT: called 40x at top level, analysed once on the inputs of its first call'."""
    text = f"{traced.name}: called {traced.calls}x at top level"
    if traced.calls > 1:
        text += ", analysed once on the inputs of its first call"
        if traced.distinct_inputs > 1:
            text += f" (the calls had {traced.distinct_inputs} different input shapes)"
    if traced.first_call_raised:
        text += "; its first call raised an exception"
    return text
