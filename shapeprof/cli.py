"""The `shapeprof` command line: trace, specs, calibrate, report, view.

Thin: it parses arguments, calls the library (`shapeprof.tracing`, `shapeprof.analyze`, the renderers) and prints.
Defaults come from the config dataclasses (`TraceConfig`, `ViewConfig`, `CalibrateConfig`), never from here.

    shapeprof trace train.py -- --epochs 1     # run train.py as python would; report every model it ran
    shapeprof trace -m mypkg.serve             # a module, like python -m
    shapeprof specs                            # the built-in device specs
    shapeprof calibrate -o mine.toml           # measure this machine -> a spec file for --spec
    shapeprof report runs/shapeprof/...        # print saved report(s) again
    shapeprof view runs/                       # TensorBoard on 127.0.0.1

Exit status: 2 for bad input (one line on stderr, no traceback); for `trace`, the script's own status (0, its
sys.exit code, 1 for an uncaught exception, 130 for Ctrl-C), whether or not every model could be analysed: the
output says which could not (set SHAPEPROF_DEBUG=1 for their tracebacks); 130 for a Ctrl-C during the analysis
(trace.json then lists the models finished); for `view`, 0 after Ctrl-C, 143 after SIGTERM.

Each trace writes into a run directory of its own, `<logdir>/<script>-<time>` (see `shapeprof.rundir`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import viewer
from .capture import METHODS
from .hardware import DeviceSpec, SpecError, check_spec_path, get_spec, list_specs
from .report import Report, ReportFormatError
from .rundir import (TRACE_SCHEMA, TRACE_SCHEMA_VERSION, RunDir, RunDirError, optimize_document, read_saved,
                     saved_files, write_json)
from .terminal import (fmt_bytes, fmt_flops, fmt_intensity, fmt_seconds, printable, render, terminal_width,
                       without_control)
from .tracing import (ScriptNotFound, ScriptRun, TraceConfig, TracedModel, analyse_model, check_target,
                      resolve_dtype, run_script, script_name, with_trace_notes)


@dataclass
class ViewConfig:
    """`shapeprof view`: TensorBoard over a logdir, on 127.0.0.1 only."""

    port: int = 6006
    host: str = "127.0.0.1"


@dataclass
class CalibrateConfig:
    """`shapeprof calibrate`: measure this machine and write a spec file."""

    output: str | None = None     # None: '<spec name>.toml' in the working directory
    device: str | None = None     # None: shapeprof.calibrate's choice (CUDA if available, else the CPU)
    budget_seconds: float | None = None   # None: shapeprof.calibrate's default


class CliError(Exception):
    """Bad input or an unavailable feature: printed as one line on stderr, exit status 2."""


# ---------------------------------------------------------------------------------------------- adapters

def _profile(model, args: tuple, kwargs: dict, *, spec: DeviceSpec, dtype, steps: int | None, method: str):
    from . import profiling
    own = {"steps": steps} if steps is not None else {}
    _check_clash(model, kwargs, ("logdir", "spec", "dtype", "method", "steps", "warmup", "device_spec"), "profile")
    # logdir=None: the TensorBoard runs are written below, with the other runs of this trace, named like them
    return profiling.profile(model, *args, logdir=None, spec=spec, dtype=dtype, method=method, **own, **kwargs)


def _optimize(model, args: tuple, kwargs: dict, *, spec: DeviceSpec, dtype, measure: bool):
    """The optimized drop-in's `shapeprof_report`: an OptimizeReport (rich-renderable; predicted before/after, and
    measured before/after with `measure`)."""
    from .optimize import optimize
    _check_clash(model, kwargs, ("rewrites", "verify", "measure", "spec", "dtype"), "optimize")
    fast = optimize(model, *args, spec=spec, dtype=dtype, measure=measure, **kwargs)
    return fast.shapeprof_report


def _check_clash(model, kwargs: dict, reserved: tuple[str, ...], what: str) -> None:
    clash = [k for k in kwargs if k in reserved]
    if clash:
        raise ValueError(f"{type(model).__name__}.forward takes keyword input(s) {', '.join(map(repr, clash))}, "
                         f"which shapeprof's {what}() reserves for itself")


def _export_tensorboard(logdir: Path, report: Report, *, measured=None, measured_trace=None, name: str):
    from . import tensorboard
    return tensorboard.export_tensorboard(logdir, report, measured=measured, measured_trace=measured_trace,
                                          name=name)


def _calibrate(device: str | None, budget_seconds: float | None = None) -> DeviceSpec:
    from . import calibration
    if budget_seconds is None:
        return calibration.calibrate(device=device)
    return calibration.calibrate(device=device, budget_seconds=budget_seconds)


# ---------------------------------------------------------------------------------------------- arguments

class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default (from the config dataclasses) unless the help says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default in (None, True, False)
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    trace_defaults, view_defaults, cal_defaults = TraceConfig(), ViewConfig(), CalibrateConfig()
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="shapeprof", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Where does the time of a PyTorch model go on a given GPU, and why.",
        epilog="`python -m shapeprof ...` works the same. Set SHAPEPROF_DEBUG=1 for tracebacks of analysis errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    trace = sub.add_parser(
        "trace", formatter_class=fmt, help="run a script and report every model it runs",
        description="Run a Python script (or -m module) as python would, record every nn.Module it calls at top "
                    "level with the inputs of its first call, and report each one: predicted time per node on "
                    "the device spec, what bounds it, module rollup, coverage. shapeprof's options go before the "
                    "script; everything after the script is the script's own (a `--` there is optional).",
        usage="shapeprof trace [options] (SCRIPT | -m MODULE) [-- script args ...]")
    trace.add_argument("-m", dest="is_module", action="store_true",
                       help="SCRIPT is a module name, run like `python -m SCRIPT`")
    trace.add_argument("--spec", default=trace_defaults.spec,
                       help="device to predict for: a built-in name (see `shapeprof specs`) or a .toml/.json file")
    trace.add_argument("--dtype", type=_dtype_arg, default=trace_defaults.dtype, metavar="DTYPE",
                       help="analyse as if weights and float inputs were in this dtype (bf16, fp16, fp32, tf32, "
                            "fp8, ...); default: the dtypes the script used")
    trace.add_argument("--top", type=_positive_int, default=trace_defaults.top, metavar="N",
                       help="rows in each report's top-nodes table")
    trace.add_argument("--logdir", default=trace_defaults.logdir,
                       help=f"each trace writes its reports, trace.json and TensorBoard runs into a new folder of "
                            f"its own in this one, "
                            f"{trace_defaults.run_name.format(script='SCRIPT', time='YYYYmmdd-HHMMSS')}[-N]")
    trace.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                       default=trace_defaults.tensorboard, help="write no TensorBoard runs (report.json still)")
    trace.add_argument("--json", action="store_true", default=trace_defaults.json,
                       help="print one JSON document on stdout (the script's own stdout goes to stderr)")
    trace.add_argument("--profile", action="store_true", default=trace_defaults.profile,
                       help="also run each model under the profiler: measured times beside predicted ones")
    trace.add_argument("--steps", type=_positive_int, default=trace_defaults.profile_steps, metavar="N",
                       help="--profile: measured steps per model (default: shapeprof.profile's)")
    trace.add_argument("--optimize", action="store_true", default=trace_defaults.optimize,
                       help="also rewrite each model with shapeprof's verified rewrites: predicted before and "
                            "after (and measured, with --profile)")
    trace.add_argument("--all-modules", action="store_true", default=trace_defaults.all_modules,
                       help="also analyse top-level modules without parameters or buffers (loss functions)")
    trace.add_argument("--method", choices=("auto", *METHODS), default=trace_defaults.method,
                       help="how to capture each model's graph")
    trace.add_argument("--strict", action="store_true", default=trace_defaults.strict,
                       help="an op without a cost formula fails that model's analysis")
    trace.add_argument("target", metavar="SCRIPT", nargs="?", help="the script to run (or module, with -m)")
    trace.add_argument("script_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    trace.set_defaults(func=_cmd_trace, parser=trace)

    specs = sub.add_parser("specs", formatter_class=fmt, help="list the built-in device specs",
                           description="The built-in device specs: peaks, bandwidth, memory, bf16 ridge point.")
    specs.add_argument("--json", action="store_true", help="print them as JSON")
    specs.set_defaults(func=_cmd_specs)

    cal = sub.add_parser("calibrate", formatter_class=fmt, help="measure this machine and write a spec file",
                         description="Measure this machine's matmul peak and memory bandwidth and write a device "
                                     "spec file usable as `shapeprof trace --spec FILE`.")
    cal.add_argument("-o", "--output", default=cal_defaults.output,
                     help="spec file to write, .toml or .json (default: <spec name>.toml)")
    cal.add_argument("--device", default=cal_defaults.device, metavar="{cpu,cuda,cuda:N}",
                     help="device to measure (default: the CUDA device if there is one, else the CPU)")
    cal.add_argument("--budget", type=float, default=cal_defaults.budget_seconds, metavar="SECONDS",
                     help="about how long the measurement may take (default: shapeprof.calibrate's)")
    cal.set_defaults(func=_cmd_calibrate)

    rep = sub.add_parser("report", formatter_class=fmt, help="print saved reports again",
                         description="Print a saved report again (report.json, measured.json or optimize.json), "
                                     "or every one of them under a folder (a run directory, a logdir).")
    rep.add_argument("path", help="a report file, or a folder to search for them")
    rep.add_argument("--top", type=_positive_int, default=trace_defaults.top, metavar="N",
                     help="rows in the top-nodes table")
    rep.add_argument("--json", action="store_true", help="print the report(s) as JSON")
    rep.set_defaults(func=_cmd_report)

    view = sub.add_parser("view", formatter_class=fmt, help="start TensorBoard over a logdir",
                          description=f"Start TensorBoard on {view_defaults.host} over a logdir; Ctrl-C (or SIGTERM) "
                                      f"stops it.")
    view.add_argument("logdir", help="e.g. runs/ or runs/shapeprof/train-20250101-120000")
    view.add_argument("--port", type=_port, default=view_defaults.port, help="port to serve on")
    view.set_defaults(func=_cmd_view)
    return parser


def _dtype_arg(text: str) -> str:
    try:
        resolve_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip().lower().removeprefix("torch.")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script and `python -m shapeprof` exit with it)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:   # the message may quote a file's contents: no escape sequence reaches the terminal
        print(f"shapeprof: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # a Ctrl-C while shapeprof itself works (the script's own is handled in trace)
        print("shapeprof: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------- trace

@dataclass
class _ModelResult:
    traced: TracedModel
    report: Report | None = None            # predicted on the spec
    measured: Report | None = None          # --profile: measured on this machine, against its own roofline
    measured_trace: dict | None = None      # --profile: the profiler's Kineto trace
    profile_note: str = ""
    measured_path: Path | None = None
    optimized: Any = None                   # --optimize: the OptimizeReport (before/after)
    error: str | None = None                # why the analysis failed (one line)
    warnings: list[str] = field(default_factory=list)
    report_path: Path | None = None
    optimized_path: Path | None = None      # optimize.json: what --optimize did, as JSON
    tensorboard: dict[str, str] = field(default_factory=dict)


def _cmd_trace(ns: argparse.Namespace) -> int:
    if ns.target is None:
        ns.parser.error("the following arguments are required: SCRIPT (or -m MODULE)")
    config = TraceConfig(spec=ns.spec, dtype=ns.dtype, top=ns.top, logdir=ns.logdir, tensorboard=ns.tensorboard,
                         json=ns.json, profile=ns.profile, profile_steps=ns.steps, optimize=ns.optimize,
                         all_modules=ns.all_modules, method=ns.method, strict=ns.strict)
    # Everything that can be wrong with the command is found before the script runs (a typo in --spec must not
    # cost a training run).
    spec = _spec(config.spec)
    try:
        check_target(ns.target, ns.is_module)
    except ScriptNotFound as e:
        raise CliError(str(e)) from None
    try:   # a folder of its own, made now: an unwritable logdir must not cost a training run either
        run_dir: RunDir | None = RunDir.create(config.logdir, script_name(ns.target, ns.is_module),
                                               name=config.run_name)
    except RunDirError as e:
        raise CliError(str(e)) from None

    run = run_script(ns.target, ns.script_args, is_module=ns.is_module, keep_real=config.keeps_real_inputs,
                     stdout_to_stderr=config.json)

    analysed = [m for m in run.models if m.has_state or config.all_modules]
    skipped = [m for m in run.models if m not in analysed]
    results: list[_ModelResult] = []
    if not analysed:   # nothing will be saved: leave no empty folder behind
        run_dir.discard()
        run_dir = None
    else:
        def save_trace(status: str) -> None:
            _write_summary(run_dir, _summary(run, results, skipped, config, spec, run_dir, inline=False,
                                             status=status, pending=analysed[len(results):]))
        # trace.json is rewritten as each model's reports are saved, so that a Ctrl-C (or a kill) during the
        # analysis leaves one listing what was finished, never reports that nothing points at
        save_trace("analysing")
        try:   # closing: a Ctrl-C between two models still ends the progress display before the message
            with contextlib.closing(_analyse_all(analysed, config, spec, run_dir.path)) as finished:
                for result in finished:
                    results.append(result)
                    save_trace("analysing" if len(results) < len(analysed) else "complete")
        except KeyboardInterrupt:
            save_trace("interrupted")
            print(printable(f"shapeprof: interrupted while analysing {analysed[len(results)].name}: "
                            f"{_display_path(run_dir.path / 'trace.json')} lists the {len(results)} of "
                            f"{len(analysed)} models finished"), file=sys.stderr)
            return 130
    if config.json:
        out = sys.stdout
        out.write(json.dumps(_summary(run, results, skipped, config, spec, run_dir, inline=True), indent=1) + "\n")
        out.flush()
        for message in _problems(run, results):
            print(printable(f"shapeprof: {message}"), file=sys.stderr)
    else:
        _print_results(run, results, skipped, config, run_dir)
    sys.stdout.flush()
    if run.exception is not None:   # as python would: the traceback of the user's code, on stderr
        sys.excepthook(type(run.exception), run.exception, run.exception.__traceback__)
    elif run.exit_message is not None:
        print(run.exit_message, file=sys.stderr)
    return run.exit_code


def _spec(text: str) -> DeviceSpec:
    try:
        return get_spec(text)
    except SpecError as e:
        raise CliError(str(e)) from None


def _analyse_all(models: list[TracedModel], config: TraceConfig, spec: DeviceSpec, run_dir: Path):
    """Analyse (and save) each model in turn, yielding its result as soon as its files are written."""
    steps = 2 + config.profile + config.optimize   # analyse, [profile], [optimize], save
    show = config.progress if config.progress is not None else (
        sys.stdout.isatty() and sys.stderr.isatty() and not config.json)
    with _progress(show) as progress:
        task = progress.add_task("analysing", total=len(models) * steps)
        for i, model in enumerate(models, 1):
            result = _ModelResult(model)
            label = printable(f"[{i}/{len(models)}] {model.name}")
            progress.update(task, description=f"{label}: analysing")
            _analyse_one(result, config, spec, run_dir, lambda what: progress.update(
                task, advance=1, description=f"{label}: {what}"))
            progress.update(task, completed=i * steps)
            yield result


def _analyse_one(result: _ModelResult, config: TraceConfig, spec: DeviceSpec, run_dir: Path, step) -> None:
    traced = result.traced
    try:
        result.report = analyse_model(traced, config, spec)
    except Exception as e:
        result.error = _one_line(e)
        _debug_traceback(e)
        return
    model_dir = run_dir / traced.name
    if config.profile:
        step("profiling")
        module, args, kwargs = traced.real
        try:
            profiled = _profile(module, args, kwargs, spec=spec, dtype=resolve_dtype(config.dtype)[0],
                                steps=config.profile_steps, method=config.method)
            result.report = with_trace_notes(profiled.target, traced)
            result.measured = with_trace_notes(profiled.report, traced)
            result.measured_trace, result.profile_note = profiled.trace, profiled.note
        except CliError:
            raise
        except Exception as e:
            result.warnings.append(f"--profile failed: {_one_line(e)}")
            _debug_traceback(e)
    if config.optimize:
        step("optimizing")
        module, args, kwargs = traced.real
        try:
            result.optimized = _optimize(module, args, kwargs, spec=spec, dtype=resolve_dtype(config.dtype)[0],
                                         measure=config.profile)   # --profile: measured before/after too
        except CliError:
            raise
        except Exception as e:
            result.warnings.append(f"--optimize failed: {_one_line(e)}")
            _debug_traceback(e)
    step("saving")
    try:
        # each path is set once its file is written: trace.json never lists a report that is not there
        result.report.to_json(model_dir / "report.json")
        result.report_path = model_dir / "report.json"
        if result.measured is not None:
            result.measured.to_json(model_dir / "measured.json")
            result.measured_path = model_dir / "measured.json"
        if result.optimized is not None:
            result.optimized_path = write_json(model_dir / "optimize.json", optimize_document(result.optimized))
    except OSError as e:
        result.warnings.append(f"could not save the report: {_one_line(e)}")
    if config.tensorboard:
        runs: dict[str, Any] = {}
        try:
            runs.update(_export_tensorboard(run_dir, result.report, measured=result.measured,
                                            measured_trace=result.measured_trace, name=traced.name))
        except CliError as e:
            result.warnings.append(str(e))
        except Exception as e:
            result.warnings.append(f"TensorBoard export failed: {_one_line(e)}")
            _debug_traceback(e)
        result.tensorboard = {str(k): str(v) for k, v in runs.items()}


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass


def _progress(show: bool):
    if not show:
        return _NoProgress()
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def _debug_traceback(e: BaseException) -> None:
    if os.environ.get("SHAPEPROF_DEBUG"):
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)


def _calls(traced: TracedModel) -> str:
    text = f"{traced.name}: called {traced.calls}x at top level"
    if traced.calls > 1:
        text += ", analysed once on the inputs of its first call"
        if traced.distinct_inputs > 1:
            text += f" (the calls had {traced.distinct_inputs} different input shapes)"
    if traced.first_call_raised:
        text += "; its first call raised an exception"
    return text


def _text(text: str, style: str = "") -> Text:
    """A line for the terminal: class names, exception messages and paths come from the user's code and files,
    so they go through `printable` (the reports themselves do so in their renderer)."""
    return Text(printable(text), style=style)


def _print_results(run: ScriptRun, results: list[_ModelResult], skipped: list[TracedModel], config: TraceConfig,
                   run_dir: RunDir | None) -> None:
    console = _stdout_console()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if not results:
        console.print(_text(f"shapeprof: {_no_model_message(run)}"))
    for i, r in enumerate(results, 1):
        t = r.traced
        console.rule(_text(f"model {i} of {len(results)}: {t.name}", style="bold"), align="left")
        console.print(_text(_calls(t), style="bold"))
        if r.error is not None:
            err.print(_text(f"shapeprof: could not analyse {t.name}: {r.error}", style="red"))
            continue
        console.print(render(r.report, top=config.top))
        if r.measured is not None:
            m = r.measured
            console.rule(_text(f"{t.name} measured on this machine", style="bold"), align="left")
            console.print(_text(f"{m.spec.display_name}: median step {fmt_seconds(m.total.measured_seconds or 0.0)}, "
                                f"{fmt_seconds(m.total.predicted_seconds)} predicted on its own roofline",
                                style="bold"))
            if r.profile_note:
                console.print(_text(r.profile_note, style="dim"))
            console.print(render(m, top=config.top))
        if r.optimized is not None:
            console.rule(_text(f"{t.name} --optimize: before and after", style="bold"), align="left")
            console.print(without_control(r.optimized))
        for w in r.warnings:
            err.print(_text(f"shapeprof: {t.name}: {w}", style="yellow"))
    if skipped:
        names = ", ".join(f"{m.name} ({m.calls}x)" for m in skipped)
        console.print(_text(f"not analysed, no parameters or buffers: {names} (--all-modules analyses them)",
                            style="dim"))
    for e in run.recorder_errors:
        err.print(_text(f"shapeprof: recording: {e}", style="yellow"))
    failed = sum(r.error is not None for r in results)
    if failed:
        err.print(_text(f"shapeprof: {failed} of {len(results)} model{'s' if len(results) > 1 else ''} could not "
                        f"be analysed", style="bold red"))
    if run_dir is not None and any(r.report_path for r in results):
        where = _display_path(run_dir.path)
        line = f"reports saved in {where}"
        if any(r.tensorboard for r in results):   # quoted: a command to paste into a shell, spaces and all
            line += f"; see them in TensorBoard: {shlex.join(['shapeprof', 'view', where])}"
        console.print(_text(line))


def _no_model_message(run: ScriptRun) -> str:
    what = f"`{'python -m ' if run.is_module else ''}{run.target}`"
    if run.models:
        return f"{what} ran no model with parameters or buffers: nothing to analyse."
    return (f"{what} ran no nn.Module at top level: no model to analyse (a model called only inside a "
            f"torch.compile'd function is not seen)")


def _problems(run: ScriptRun, results: list[_ModelResult]) -> list[str]:
    out = [_no_model_message(run)] if not results else []
    out += [f"could not analyse {r.traced.name}: {r.error}" for r in results if r.error]
    out += [f"{r.traced.name}: {w}" for r in results for w in r.warnings]
    out += [f"recording: {e}" for e in run.recorder_errors]
    return out


def _summary(run: ScriptRun, results: list[_ModelResult], skipped: list[TracedModel], config: TraceConfig,
             spec: DeviceSpec, run_dir: RunDir | None, *, inline: bool, status: str = "complete",
             pending: list[TracedModel] = ()) -> dict[str, Any]:
    """The trace as one JSON document: what ran, how it ended, each model finished (`inline`: with its whole
    report), and, while `status` is 'analysing' or 'interrupted', the models not (yet) analysed."""
    def model(r: _ModelResult) -> dict[str, Any]:
        t = r.traced
        d: dict[str, Any] = {
            "name": t.name, "type": t.type_name, "calls": t.calls, "distinct_inputs": t.distinct_inputs,
            "first_call_raised": t.first_call_raised, "error": r.error, "warnings": r.warnings,
            "report_path": str(r.report_path) if r.report_path else None,
            "measured_report_path": str(r.measured_path) if r.measured_path else None,
            "optimize_path": str(r.optimized_path) if r.optimized_path else None,
            "tensorboard_runs": r.tensorboard,
        }
        if r.report is not None:
            d["inputs"] = list(r.report.inputs)
            d["notes"] = list(r.report.notes)   # what the numbers leave out: forward pass only, say
            d["predicted_seconds"] = r.report.total.predicted_seconds
            if inline:
                d["report"] = r.report.to_dict()
        if r.measured is not None:
            d["measured_on"] = r.measured.spec.name
            d["measured_seconds"] = r.measured.total.measured_seconds
            d["measured_predicted_seconds"] = r.measured.total.predicted_seconds
            if inline:
                d["measured_report"] = r.measured.to_dict()
        if r.optimized is not None:
            d["optimize"] = _optimize_summary(r.optimized)
        return d

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
        "models": [model(r) for r in results],
        "not_analysed": [m.name for m in pending],
        "failed": sum(r.error is not None for r in results),
        "skipped": [{"name": m.name, "type": m.type_name, "calls": m.calls,
                     "reason": "no parameters or buffers"} for m in skipped],
    }


def _optimize_summary(report: Any) -> dict[str, Any]:
    """An OptimizeReport as plain JSON-ready data: what was rewritten where, verified or not, before and after."""
    m = report.measurement
    return {
        "model": report.model, "spec": report.spec.name, "device": report.device, "verified": report.verified,
        "refused": report.refused or None,
        "rewrites": [{"name": o.name, "status": o.status, "error": o.error or None} for o in report.outcomes],
        "applied": [{"where": a.where, "what": a.what, "bytes_saved": a.bytes_saved,
                     "seconds_saved": a.seconds_saved} for a in report.applied],
        "skipped": [{"where": k.where, "reason": k.reason} for k in report.skipped],
        "predicted_seconds_before": report.predicted_seconds,
        "predicted_seconds_after": report.predicted_seconds - report.seconds_saved,
        "measured": None if m is None else {"device": m.device, "original_seconds": m.original_seconds,
                                            "optimized_seconds": m.optimized_seconds, "speedup": m.speedup},
    }


def _write_summary(run_dir: RunDir, summary: dict[str, Any]) -> None:
    try:
        run_dir.write_json("trace.json", summary)
    except OSError as e:
        print(printable(f"shapeprof: could not write {run_dir.path / 'trace.json'}: {_one_line(e)}"),
              file=sys.stderr)


def _stdout_console() -> Console:
    tty = sys.stdout.isatty()
    # COLUMNS, else the terminal's width, else 120 (piped): the reports lay themselves out for whatever it is
    return Console(file=sys.stdout, width=terminal_width(), force_terminal=tty,
                   color_system="auto" if tty else None, highlight=False, soft_wrap=False)


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------- specs

def _cmd_specs(ns: argparse.Namespace) -> int:
    import torch
    specs = list_specs()
    if ns.json:
        print(json.dumps([{**s.to_dict(), "ridge_bf16": s.ridge(torch.bfloat16)} for s in specs], indent=1))
        return 0
    default = get_spec().name
    table = Table(title="Built-in device specs (dense peaks; `--spec NAME` or a .toml/.json file)",
                  title_justify="left", header_style="bold")
    table.add_column("name", no_wrap=True)
    table.add_column("display name")
    for col in ("bf16 peak", "fp32 peak", "bandwidth", "memory", "ridge bf16"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in specs:
        bf16 = s.peak_flops.get("bf16")
        table.add_row(s.name + (" (default)" if s.name == default else ""), s.display_name,
                      f"{fmt_flops(bf16)}/s" if bf16 else "-", f"{fmt_flops(s.peak_flops['fp32'])}/s",
                      f"{fmt_bytes(s.memory_bandwidth)}/s", f"{s.memory_capacity / 2**30:.0f} GiB",
                      f"{fmt_intensity(s.ridge(torch.bfloat16))} FLOP/B")
    _stdout_console().print(table)
    return 0


# ---------------------------------------------------------------------------------------------- calibrate

def _cmd_calibrate(ns: argparse.Namespace) -> int:
    try:   # before the seconds (or minutes) of measuring: a spec that cannot be saved is work lost
        # without -o the file is '<spec name>.toml' here, its name known only after measuring: check the folder
        check_spec_path(ns.output if ns.output else Path("calibrated.toml"))
    except SpecError as e:
        raise CliError(str(e)) from None
    if ns.budget is not None and not ns.budget > 0:
        raise CliError(f"--budget must be a positive number of seconds, got {ns.budget}")
    try:
        spec = _calibrate(ns.device, ns.budget)
    except CliError:
        raise
    except Exception as e:   # no CUDA device, say: one line
        raise CliError(f"calibration failed: {_one_line(e)}") from e
    output = Path(ns.output) if ns.output else Path(_slug(spec.name) + ".toml")
    try:
        spec.save(output)
    except SpecError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write {output}: {_one_line(e)}") from None
    print(f"wrote {output}: {spec.display_name}: fp32 {fmt_flops(spec.peak_flops['fp32'])}/s, "
          f"memory bandwidth {fmt_bytes(spec.memory_bandwidth)}/s")
    print(f"use it with: shapeprof trace --spec {output} SCRIPT")
    return 0


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "calibrated"


# ---------------------------------------------------------------------------------------------- report

def _cmd_report(ns: argparse.Namespace) -> int:
    path = Path(ns.path)
    if path.is_dir():
        paths = saved_files(path)
        if not paths:
            raise CliError(f"no report.json, measured.json or optimize.json under {path}")
    elif path.exists():
        paths = [path]
    else:
        raise CliError(f"{path}: no such file or directory")
    reports = []
    for p in paths:
        try:
            reports.append((p, read_saved(p)))
        except ReportFormatError as e:
            raise CliError(f"{p}: {e}") from None
    if ns.json:
        docs = [r.to_dict() if isinstance(r, Report) else optimize_document(r) for _, r in reports]
        if len(reports) == 1 and not path.is_dir():
            print(json.dumps(docs[0], indent=1))
        else:
            print(json.dumps([{"path": str(p), "report": doc} for (p, _), doc in zip(reports, docs)], indent=1))
        return 0
    console = _stdout_console()
    for p, r in reports:
        if len(reports) > 1:
            console.rule(_text(str(p), style="bold"), align="left")
        # an OptimizeReport renders itself (shapeprof.optimize.render); its strings come from a file too
        console.print(render(r, top=ns.top) if isinstance(r, Report) else without_control(r))
    return 0


# ---------------------------------------------------------------------------------------------- view

def _cmd_view(ns: argparse.Namespace) -> int:
    logdir = Path(ns.logdir)
    if not logdir.is_dir():
        raise CliError(f"logdir {logdir} does not exist" if not logdir.exists() else f"{logdir} is not a directory")
    if importlib.util.find_spec("tensorboard") is None:
        raise CliError("view needs the tensorboard package: pip install tensorboard")
    host = ViewConfig().host
    print(printable(f"TensorBoard on http://{host}:{ns.port}/ over {logdir} (Ctrl-C stops it)"), flush=True)
    return viewer.serve(logdir, host=host, port=ns.port)   # stops TensorBoard on every way out, SIGTERM too


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
