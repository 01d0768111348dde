"""The `shapeprof` command line: trace, specs, calibrate, report, view.

Thin: it parses arguments, calls the library (`shapeprof.scripts` runs the script, `shapeprof.session` analyses and
writes out its models, `shapeprof.output` has the formats) and prints. Defaults come from the config dataclasses
(`TraceConfig`, `ViewConfig`, `CalibrateConfig`), never from here.

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
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import output, viewer
from .calibration import calibrate
from .capture import METHODS
from .hardware import DeviceSpec, SpecError, check_spec_path, get_spec, list_specs
from .jsondata import ReportFormatError
from .output.jsonfiles import optimize_document, read_saved, saved_files
from .output.terminal import render, terminal_width
from .precision import resolve as resolve_precision
from .report import Report
from .rundir import RunDir, RunDirError
from .scripts import ScriptNotFound, ScriptRun, TracedModel, check_target, run_script, script_name
from .session import (ModelResult, TraceConfig, analyse_all, calls, no_model_message, problems, steps_per_model,
                      summary)
from .text import fmt_bytes, fmt_flops, fmt_intensity, fmt_seconds, one_line, printable, slug, without_control


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
    trace.add_argument("--output", type=_formats_arg, default=trace_defaults.outputs, metavar="FORMATS",
                       help=f"output formats written for each model, comma-separated, from: "
                            f"{', '.join(name for name, _ in output.available())} "
                            f"(default: {','.join(trace_defaults.outputs)})")
    trace.add_argument("--no-tensorboard", dest="no_tensorboard", action="store_true",
                       help="leave tensorboard out of --output")
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
    trace.add_argument("--phase", choices=("prefill", "decode"), default=trace_defaults.phase,
                       help="analyse each LLM's prefill or one decode step instead of its first call's inputs")
    _phase_arguments(trace, trace_defaults)
    trace.add_argument("target", metavar="SCRIPT", nargs="?", help="the script to run (or module, with -m)")
    trace.add_argument("script_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    trace.set_defaults(func=_cmd_trace, parser=trace)

    adv = sub.add_parser(
        "advise", formatter_class=fmt, help="run a script and advise on the batch and shapes of the LLM it runs",
        description="Run a Python script as python would, take the largest model it calls, and say what its "
                    "prefill and decode cost on the spec, the batch at which each matmul turns compute-bound, the "
                    "largest batch that keeps every user above reading speed, what fits in memory, and which GEMM "
                    "shapes waste the GPU.",
        usage="shapeprof advise [options] SCRIPT [-- script args ...]")
    adv.add_argument("--spec", default=trace_defaults.spec,
                     help="device to advise for: a built-in name (see `shapeprof specs`) or a .toml/.json file")
    adv.add_argument("--dtype", type=_dtype_arg, default="bf16", metavar="DTYPE",
                     help="weights, activations and cache priced in this dtype (default: bf16)")
    adv.add_argument("--context", type=_positive_int, default=None, metavar="N",
                     help="decode steps over a cache of N positions (default: the model's maximum, at most 4096)")
    adv.add_argument("--json", action="store_true", help="print the advice as JSON on stdout")
    adv.add_argument("--logdir", default=None,
                     help="also write it for TensorBoard (Text: the tables, Images: the batch sweep) and as "
                          "advice.json, in a new folder <SCRIPT>-advise here")
    adv.add_argument("target", metavar="SCRIPT", nargs="?", help="the script to run")
    adv.add_argument("script_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    adv.set_defaults(func=_cmd_advise, parser=adv)

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
    rep.add_argument("--html", metavar="FILE", default=None,
                     help="write them instead as one self-contained HTML file (the SHAPEPROF tab's views: "
                          "roofline, node table, module tree, before/after) that opens offline")
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
        resolve_precision(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip().lower().removeprefix("torch.")


def _formats_arg(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for name in names:
        try:
            output.get(name)
        except KeyError as e:
            raise argparse.ArgumentTypeError(e.args[0]) from None
    return names


def _whole_number(text: str, what: str = "a whole number", low: int = 1, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}" if high is None else
                                         f"{what} is between {low} and {high}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text)


def _port(text: str) -> int:
    return _whole_number(text, "a port number", 1, 65535)


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

def _cmd_trace(ns: argparse.Namespace) -> int:
    if ns.target is None:
        ns.parser.error("the following arguments are required: SCRIPT (or -m MODULE)")
    outputs = tuple(o for o in ns.output if not (ns.no_tensorboard and o == "tensorboard"))
    if ns.phase is not None and ns.optimize:
        raise CliError("--phase analyses a step the script does not run: it cannot be combined with --optimize")
    config = TraceConfig(spec=ns.spec, dtype=ns.dtype, top=ns.top, logdir=ns.logdir, outputs=outputs,
                         json=ns.json, profile=ns.profile, profile_steps=ns.steps, optimize=ns.optimize,
                         all_modules=ns.all_modules, method=ns.method, strict=ns.strict, phase=ns.phase,
                         batch=ns.batch, context=ns.context, tokens=ns.tokens)
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
    results: list[ModelResult] = []
    if not analysed:   # nothing will be saved: leave no empty folder behind
        run_dir.discard()
        run_dir = None
    else:
        def save_trace(status: str) -> None:
            _write_summary(run_dir, summary(run, results, skipped, config, spec, run_dir, inline=False,
                                            status=status, pending=analysed[len(results):]))
        # trace.json is rewritten as each model's reports are saved, so that a Ctrl-C (or a kill) during the
        # analysis leaves one listing what was finished, never reports that nothing points at
        save_trace("analysing")
        show = config.progress if config.progress is not None else (
            sys.stdout.isatty() and sys.stderr.isatty() and not config.json)
        try:   # closing: a Ctrl-C between two models still ends the progress display before the message
            with _progress(show, analysed, steps_per_model(config)) as progress, \
                    contextlib.closing(analyse_all(analysed, config, spec, run_dir.path, progress.step)) as done:
                for result in done:
                    results.append(result)
                    save_trace("analysing" if len(results) < len(analysed) else "complete")
        except KeyboardInterrupt:
            save_trace("interrupted")
            print(printable(f"shapeprof: interrupted while analysing {analysed[len(results)].name}: "
                            f"{_display_path(run_dir.path / 'trace.json')} lists the {len(results)} of "
                            f"{len(analysed)} models finished"), file=sys.stderr)
            return 130
    batch_lines = _write_batches(run, run_dir)
    if config.json:
        out = sys.stdout
        out.write(json.dumps(summary(run, results, skipped, config, spec, run_dir, inline=True), indent=1) + "\n")
        out.flush()
        for message in problems(run, results):
            print(printable(f"shapeprof: {message}"), file=sys.stderr)
    else:
        _print_results(run, results, skipped, config, run_dir)
    for line in batch_lines:
        print(printable(line), file=sys.stderr if config.json else sys.stdout)
    sys.stdout.flush()
    if run.exception is not None:   # as python would: the traceback of the user's code, on stderr
        sys.excepthook(type(run.exception), run.exception, run.exception.__traceback__)
    elif run.exit_message is not None:
        print(run.exit_message, file=sys.stderr)
    return run.exit_code


def _phase_arguments(parser: argparse.ArgumentParser, defaults: TraceConfig) -> None:
    parser.add_argument("--batch", type=_positive_int, default=defaults.batch, metavar="N",
                        help="--phase: sequences in the step")
    parser.add_argument("--context", type=_positive_int, default=defaults.context, metavar="N",
                        help="--phase decode: positions already in the KV cache")
    parser.add_argument("--tokens", type=_positive_int, default=defaults.tokens, metavar="N",
                        help="--phase prefill: the prompt's tokens")


# ---------------------------------------------------------------------------------------------- advise

def _cmd_advise(ns: argparse.Namespace) -> int:
    from .advice import advise
    if ns.target is None:
        ns.parser.error("the following arguments are required: SCRIPT")
    spec = _spec(ns.spec)
    try:
        check_target(ns.target, False)
    except ScriptNotFound as e:
        raise CliError(str(e)) from None
    run = run_script(ns.target, ns.script_args, is_module=False, keep_real=False, stdout_to_stderr=ns.json)
    models = [m for m in run.models if m.has_state]
    if not models:
        raise CliError(f"{ns.target} called no model with parameters at top level: nothing to advise on")
    model = max(models, key=lambda m: sum(p.numel() for p in m.target().parameters()))
    try:
        adv = advise(model.target(), spec=spec, dtype=ns.dtype, context=ns.context)
    except Exception as e:
        raise CliError(f"advise on {model.name}: {one_line(e)}") from e
    if ns.logdir is not None:
        try:
            folder = adv.write_tensorboard(ns.logdir, run=f"{slug(script_name(ns.target, False))}-advise")
            adv.to_json(folder / "advice.json")
        except OSError as e:
            raise CliError(f"cannot write into --logdir {ns.logdir}: {e}") from None
    if ns.json:
        sys.stdout.write(adv.to_json() + "\n")
    else:
        Console(width=terminal_width()).print(adv)
    if ns.logdir is not None:
        print(f"advice saved in {_display_path(folder)}", file=sys.stderr if ns.json else sys.stdout)
    return 0


def _write_batches(run: ScriptRun, run_dir: RunDir | None) -> list[str]:
    """Each shapeprof.generate_batch the script ran: its per-step stats as TensorBoard scalars in the run
    directory; a line saying so (or why not) for each."""
    lines = []
    for stats in run.batches:
        head = (f"generate_batch: {len(stats.steps)} decode steps, peak {stats.peak_concurrent} sequences, KV waste "
                f"{stats.waste:.1%}, {stats.preemptions} preemptions, {stats.tokens_per_second:.1f} tokens/s")
        if run_dir is None:
            lines.append(head)
            continue
        try:
            lines.append(f"{head}; per-step scalars in {_display_path(stats.write_tensorboard(run_dir.path))}")
        except OSError as e:
            lines.append(f"{head}; its scalars could not be written: {one_line(e)}")
    return lines


def _spec(text: str) -> DeviceSpec:
    try:
        return get_spec(text)
    except SpecError as e:
        raise CliError(str(e)) from None


class _Progress:
    """The progress display (rich, on stderr), or nothing when `show` is False."""

    def __init__(self, show: bool, models: list[TracedModel], steps: int):
        self.models, self.steps = models, steps
        self.bar = None
        if show:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                console=Console(stderr=True), transient=True)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
            self.task = self.bar.add_task("analysing", total=len(self.models) * self.steps)
            self.done = 0
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc) if self.bar is not None else False

    def step(self, i: int, what: str) -> None:
        if self.bar is not None:
            label = printable(f"[{i + 1}/{len(self.models)}] {self.models[i].name}")
            self.done += 1
            self.bar.update(self.task, completed=self.done, description=f"{label}: {what}")


def _progress(show: bool, models: list[TracedModel], steps: int) -> _Progress:
    return _Progress(show, models, steps)


def _text(text: str, style: str = "") -> Text:
    """A line for the terminal: class names, exception messages and paths come from the user's code and files,
    so they go through `printable` (the reports themselves do so in their renderer)."""
    return Text(printable(text), style=style)


def _print_results(run: ScriptRun, results: list[ModelResult], skipped: list[TracedModel], config: TraceConfig,
                   run_dir: RunDir | None) -> None:
    console = _stdout_console()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if not results:
        console.print(_text(f"shapeprof: {no_model_message(run)}"))
    for i, r in enumerate(results, 1):
        t = r.traced
        console.rule(_text(f"model {i} of {len(results)}: {t.name}", style="bold"), align="left")
        console.print(_text(calls(t), style="bold"))
        if r.error is not None:
            err.print(_text(f"shapeprof: could not analyse {t.name}: {r.error}", style="red"))
            continue
        res = r.results
        console.print(render(res.report, top=config.top))
        if res.measured is not None:
            m = res.measured
            console.rule(_text(f"{t.name} measured on this machine", style="bold"), align="left")
            console.print(_text(f"{m.spec.display_name}: median step {fmt_seconds(m.total.measured_seconds or 0.0)}, "
                                f"{fmt_seconds(m.total.predicted_seconds)} predicted on its own roofline",
                                style="bold"))
            if res.note:
                console.print(_text(res.note, style="dim"))
            console.print(render(m, top=config.top))
        if res.optimized is not None:
            console.rule(_text(f"{t.name} --optimize: before and after", style="bold"), align="left")
            console.print(without_control(res.optimized))
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
    if run_dir is not None and any(r.outputs for r in results):
        where = _display_path(run_dir.path)
        line = f"reports saved in {where}"
        if any(r.outputs.get("tensorboard") for r in results):   # quoted: to paste into a shell, spaces and all
            line += f"; see them in TensorBoard: {shlex.join(['shapeprof', 'view', where])}"
        console.print(_text(line))


def _write_summary(run_dir: RunDir, data: dict[str, Any]) -> None:
    try:
        run_dir.write_json("trace.json", data)
    except OSError as e:
        print(printable(f"shapeprof: could not write {run_dir.path / 'trace.json'}: {one_line(e)}"),
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
        spec = calibrate(device=ns.device, **({} if ns.budget is None else {"budget_seconds": ns.budget}))
    except Exception as e:   # no CUDA device, say: one line
        raise CliError(f"calibration failed: {one_line(e)}") from e
    output = Path(ns.output) if ns.output else Path(slug(spec.name, empty="calibrated") + ".toml")
    try:
        spec.save(output)
    except SpecError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write {output}: {one_line(e)}") from None
    print(f"wrote {output}: {spec.display_name}: fp32 {fmt_flops(spec.peak_flops['fp32'])}/s, "
          f"memory bandwidth {fmt_bytes(spec.memory_bandwidth)}/s")
    print(f"use it with: shapeprof trace --spec {output} SCRIPT")
    return 0


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
    if ns.html:
        return _write_report_html(Path(ns.html), path, reports)
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


def _write_report_html(out: Path, source: Path, reports: list[tuple[Path, Any]]) -> int:
    from .output.html import write_html
    from .output.jsonfiles import saved_label
    if out.is_dir():
        raise CliError(f"--html {out} is a folder: give the file to write, e.g. {out / 'report.html'}")
    base = source if source.is_dir() else source.parent
    named = [(saved_label(p, base, r.model), r) for p, r in reports]
    try:
        write_html(out, named, title=f"shapeprof: {source.name}")
    except OSError as e:
        raise CliError(f"cannot write {out}: {one_line(e)}") from None
    print(printable(f"wrote {_display_path(out)}: {len(named)} report{'s' if len(named) != 1 else ''}, "
                    f"opens offline in a browser"))
    return 0


# ---------------------------------------------------------------------------------------------- view

def _cmd_view(ns: argparse.Namespace) -> int:
    logdir = Path(ns.logdir)
    if not logdir.is_dir():
        raise CliError(f"logdir {logdir} does not exist" if not logdir.exists() else f"{logdir} is not a directory")
    if importlib.util.find_spec("tensorboard") is None:
        raise CliError("view needs the tensorboard package: pip install tensorboard")
    host = ViewConfig().host
    print(printable(f"TensorBoard on http://{host}:{ns.port}/ over {logdir} (Ctrl-C stops it); shapeprof's own "
                    f"views: http://{host}:{ns.port}/#shapeprof"), flush=True)
    return viewer.serve(logdir, host=host, port=ns.port)   # stops TensorBoard on every way out, SIGTERM too
