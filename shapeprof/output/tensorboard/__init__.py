"""TensorBoard export: a Report (and a measured run) as runs TensorBoard and its PyTorch Profiler tab show.

`export_tensorboard` writes, under a log directory:

- ``<name>-predicted-<spec>``: a Kineto trace of the timeline the roofline predicts on the report's GPU (the
  PyTorch Profiler tab's Overview, Operator, Kernel and Trace views), and TensorBoard summaries: Text (the top
  nodes, modules, findings and coverage as markdown tables), Images (the roofline), Graphs (the fx graph, each node
  with its costs, its module path as namespace and its bound as device) and Scalars (totals); and the report
  itself (report.json), which the SHAPEPROF tab shows (`tensorboard/plugin.py`);
- ``<name>-measured-<device>`` (given a measured trace): the real trace, every graph node's range and every ATen op
  carrying ``shapeprof.*`` args (see `shapeprof.kineto`), and the measured report's summaries (and measured.json).

`tensorboard_trace_handler` is a drop-in for `torch.profiler.tensorboard_trace_handler` that adds our costs to the
ATen ops of a plain eager run, and the predicted run of the model beside it.

Every run is written into a temporary folder inside the log directory and renamed into place when complete; the
trace file, which the profiler plugin reads only once, gets its final name last. So TensorBoard never loads a
half-written run, and an export that fails leaves nothing behind.

    >>> import tempfile, torch, shapeprof
    >>> report = shapeprof.analyze(torch.nn.Linear(1024, 4096), torch.randn(512, 1024), dtype=torch.bfloat16)
    >>> runs = export_tensorboard(tempfile.mkdtemp(), report)
    >>> list(runs)
    ['Linear-predicted-a100-80gb-sxm']
"""
from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ...report import Report
from ...text import slug
from ..base import Format, Results, register
from ..markdown import markdown_sections
from . import kineto
from .graphdef import graph_def

__all__ = ["ExportError", "TensorBoardFormat", "export_tensorboard", "tensorboard_trace_handler"]

TRACE_SUFFIX = ".pt.trace.json"
_STAGED = ".partial"     # a staged trace's name ends in this, which the profiler plugin's file pattern rejects
TOP_NODES = 15          # rows of the Text tab's top-nodes table


class ExportError(RuntimeError):
    """The TensorBoard logs could not be written; the message (one line) names the folder or run and why."""


# ------------------------------------------------------------------------------------------------ export

def export_tensorboard(logdir: str | os.PathLike, predicted: Report, *, measured: Report | None = None,
                       measured_trace: Mapping[str, Any] | None = None, name: str | None = None) -> dict[str, Path]:
    """Write `predicted` (and a measured run) under `logdir` as TensorBoard runs; return {run name: folder}.

        >>> import tempfile, torch, shapeprof
        >>> report = shapeprof.analyze(torch.nn.Linear(64, 64), torch.randn(8, 64))
        >>> logdir = tempfile.mkdtemp()
        >>> list(export_tensorboard(logdir, report, name="demo")), list(export_tensorboard(logdir, report, name="demo"))
        (['demo-predicted-a100-80gb-sxm'], ['demo-predicted-a100-80gb-sxm-2'])

    Args:
        logdir: the folder `tensorboard --logdir` is pointed at (created if missing).
        predicted: the analysis on the target device; its run is ``<name>-predicted-<spec name>``.
        measured: the report of the measured run (with `measured_seconds`), on the device it ran on: its figures go
            on the measured trace's node ranges and into the measured run's summaries (Text, Images, Graphs,
            Scalars, with measured times).
        measured_trace: the Kineto trace of the measured run, as torch.profiler wrote it (a dict), written with
            ``shapeprof.*`` args on its node ranges and ATen ops. Either of the two makes the run
            ``<name>-measured-<device>``, the device being `measured`'s spec (else the trace's GPU, else "cpu").
        name: run name prefix; default the report's model name.

    Returns:
        Run name -> folder. A name already taken under `logdir` gets a suffix (-2, -3 ...), the same for every run
        of one export, because the profiler plugin reads a run only once.

    Raises:
        ExportError: the report has no nodes doing work, or `logdir` cannot be written.
    """
    if not predicted.nodes:
        raise ExportError(f"nothing to export: the report of {predicted.model} has no nodes doing work (empty run)")
    if measured_trace is not None and not isinstance(measured_trace.get("traceEvents"), list):
        raise ExportError("measured_trace is not a Kineto trace: it has no 'traceEvents' list")
    logdir = Path(logdir)
    _make_logdir(logdir)
    base = slug(name or predicted.model)
    plan: list[tuple[str, Callable[[Path], None]]] = []
    if measured_trace is not None or measured is not None:
        device = measured.spec.name if measured is not None else _trace_device(measured_trace)
        plan.append((f"{base}-measured-{slug(device)}",
                     lambda d: _write_measured_run(d, measured_trace, measured, predicted)))
    plan.append((f"{base}-predicted-{slug(predicted.spec.name)}", lambda d: _write_predicted_run(d, predicted)))
    names = _free_names(logdir, [run for run, _ in plan])
    with _Staging(logdir) as staging:
        for run, (_, write) in zip(names, plan):
            try:
                write(staging.folder(run))
            except OSError as e:
                raise ExportError(f"cannot write TensorBoard run '{run}' in '{logdir}': {e.strerror or e}") from e
        return staging.publish()


def _write_predicted_run(folder: Path, report: Report) -> None:
    write_trace(folder, kineto.predicted_trace(report))
    write_summaries(folder, report)
    report.to_json(folder / "report.json")     # what the SHAPEPROF tab shows (tensorboard/plugin.py)


def _write_measured_run(folder: Path, trace: Mapping[str, Any] | None, measured: Report | None,
                        predicted: Report) -> None:
    if trace is not None:
        # node ranges get the measured report's figures (on the device it ran on), else the predicted ones
        report = measured or predicted
        annotated = kineto.annotate_trace(trace, nodes={n.name: n for n in report.nodes}, spec=report.spec)
        if measured is not None:
            annotated["shapeprof"] = kineto.summary(measured, "measured")
        write_trace(folder, annotated)
    if measured is not None:   # without a measured report they would repeat the predicted run's
        write_summaries(folder, measured, measured=True)
        measured.to_json(folder / "measured.json")


def _trace_device(trace: Mapping[str, Any]) -> str:
    props = trace.get("deviceProperties") or []
    return props[0].get("name", "gpu") if props else "cpu"


def _make_logdir(logdir: Path) -> None:
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".shapeprof-probe-", dir=logdir)
        os.rmdir(probe)
    except OSError as e:
        raise ExportError(f"cannot write TensorBoard logs to '{logdir}': {e.strerror or e}") from e


def _free_names(logdir: Path, runs: list[str]) -> list[str]:
    """`runs`, or `runs` with the first suffix -k free for all of them (the runs of one export stay paired)."""
    k = 1
    while True:
        names = [run if k == 1 else f"{run}-{k}" for run in runs]
        if not any((logdir / n).exists() for n in names):
            return names
        k += 1


class _Staging:
    """Run folders built in hidden temporary folders inside the log directory, moved into place all at once.

    The profiler plugin scans the whole log directory (hidden folders too) and loads a run once, the moment it
    sees a trace file. Traces are therefore written under a name its pattern rejects and renamed last, after the
    folder is in place. (TensorBoard's own loader may list a temporary folder's event files for a moment; it reads
    them incrementally, so it never sees a broken run, and forgets the folder when it is renamed.) On any error
    every folder this staging made, temporary or published, is removed.
    """

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.staged: list[tuple[Path, Path]] = []     # (temporary folder, final folder)
        self.published: list[Path] = []

    def __enter__(self) -> "_Staging":
        return self

    def folder(self, run: str) -> Path:
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{run}.", suffix=".tmp", dir=self.logdir))
        except OSError as e:
            raise ExportError(f"cannot write TensorBoard run '{run}' in '{self.logdir}': {e.strerror or e}") from e
        self.staged.append((tmp, self.logdir / run))
        return tmp

    def publish(self) -> dict[str, Path]:
        for tmp, final in self.staged:
            try:
                if final.exists():   # taken since the name was chosen: never merge into someone else's run
                    raise FileExistsError(17, "a run of that name appeared while exporting")
                os.replace(tmp, final)
            except OSError as e:
                raise ExportError(f"cannot publish TensorBoard run '{final}': {e.strerror or e}") from e
            self.published.append(final)
        for final in self.published:
            for staged in final.glob(f"*{_STAGED}"):
                try:
                    os.replace(staged, staged.with_name(staged.name.removesuffix(_STAGED)))
                except OSError as e:
                    raise ExportError(f"cannot publish trace '{staged}': {e.strerror or e}") from e
        return {final.name: final for final in self.published}

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        for tmp, _ in self.staged:
            shutil.rmtree(tmp, ignore_errors=True)
        for final in self.published:
            shutil.rmtree(final, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ traces

def worker_name() -> str:
    """The worker name torch.profiler.tensorboard_trace_handler uses by default: '<host>_<pid>'."""
    return f"{socket.gethostname()}_{os.getpid()}"


def trace_file_name(worker: str | None = None, *, gzip_: bool = False) -> str:
    """'<worker>.<milliseconds>.pt.trace.json[.gz]', the name torch's handler gives a trace (the number is the span)."""
    return f"{worker or worker_name()}.{time.time_ns() // 1_000_000}{TRACE_SUFFIX}{'.gz' if gzip_ else ''}"


def write_trace(folder: Path, trace: Mapping[str, Any], file_name: str | None = None) -> Path:
    """Write a trace into a staged run folder under a name the plugin ignores until `_Staging.publish` renames it."""
    name = file_name or trace_file_name()
    path = folder / (name + _STAGED)
    path.write_bytes(_encode(trace, gzip_=name.endswith(".gz")))
    return path


def _encode(trace: Mapping[str, Any], *, gzip_: bool) -> bytes:
    text = kineto.dumps(trace).encode()
    return gzip.compress(text) if gzip_ else text


# ------------------------------------------------------------------------------------------------ summaries

def write_summaries(folder: Path, report: Report, *, measured: bool = False, top: int = TOP_NODES) -> None:
    """Text, Images, Scalars and Graphs summaries of `report` in `folder`."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(folder))
    try:
        write_text(writer, report, top)
        write_roofline(writer, report, measured=measured)
        write_scalars(writer, report)
    finally:
        writer.close()
    write_graph(folder, report)


def write_text(writer, report: Report, top: int = TOP_NODES) -> None:
    for tag, text in markdown_sections(report, top).items():
        writer.add_text(f"shapeprof/{tag}", text, global_step=0)


def write_roofline(writer, report: Report, *, measured: bool = False) -> None:
    from .plots import roofline_figure
    writer.add_figure("shapeprof/roofline", roofline_figure(report, measured=measured), global_step=0)


def write_scalars(writer, report: Report) -> None:
    for tag, value in total_scalars(report).items():
        writer.add_scalar(f"totals/{tag}", value, global_step=0)


def write_graph(folder: Path, report: Report) -> None:
    from torch.utils.tensorboard.writer import FileWriter
    writer = FileWriter(str(folder))
    try:
        writer.add_graph(graph_def(report))
    finally:
        writer.close()


def total_scalars(report: Report) -> dict[str, float]:
    """The report's totals as scalars (units in the tag)."""
    t = report.total
    memory = sum(n.predicted_seconds for n in report.nodes if n.bound == "memory")
    out = {"predicted_ms": t.predicted_seconds * 1e3, "gflop": t.flops / 1e9, "bytes_moved_mb": t.bytes / 1e6,
           "memory_bound_share": memory / t.predicted_seconds if t.predicted_seconds else 0.0,
           "nodes": float(len(report.nodes))}
    if math.isfinite(t.intensity):
        out["intensity_flop_per_byte"] = t.intensity
    if t.measured_seconds:
        out["measured_ms"] = t.measured_seconds * 1e3
        out["efficiency"] = t.efficiency
    return out


# ------------------------------------------------------------------------------------------------ handler

class _TraceHandler:
    """on_trace_ready callback: the trace with our costs on its ATen ops, and the model's predicted run beside it."""

    def __init__(self, dir_name: str | os.PathLike, model: nn.Module | None, worker_name: str | None, spec,
                 dtype: torch.dtype | None, use_gzip: bool):
        from ...hardware import get_spec
        self.dir_name = Path(dir_name)
        self.worker_name = worker_name
        self.spec = get_spec(spec)
        self.dtype = dtype
        self.use_gzip = use_gzip
        self.model = model
        self.inputs: tuple[tuple, dict] | None = None
        self.hook = model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True) \
            if model is not None else None
        self.predicted_written = False
        self.coster = kineto.OpCoster(self.spec)

    def _capture_inputs(self, module, args, kwargs):
        # Shapes are all the analysis needs: keep meta copies, not the user's tensors.
        self.inputs = pytree.tree_map(_to_meta, (args, kwargs))
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def __call__(self, prof) -> None:
        self._remove_hook()
        _make_logdir(self.dir_name)
        trace = self._annotated_trace(prof)
        self._write_trace(trace)
        if self.model is not None and not self.predicted_written:
            self._write_predicted()

    def _annotated_trace(self, prof) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f)
        if not any("Input Dims" in (e.get("args") or {}) for e in trace.get("traceEvents", [])):
            warnings.warn("shapeprof.tensorboard_trace_handler: the trace has no input shapes, so no costs were "
                          "attached; profile with record_shapes=True", stacklevel=3)
        flops = {e.id: e.flops for e in prof.events() if getattr(e, "flops", 0)}
        return kineto.annotate_trace(trace, nodes={}, spec=self.spec, coster=self.coster, torch_flops=flops)

    def _write_trace(self, trace: dict) -> Path:
        name = trace_file_name(self.worker_name, gzip_=self.use_gzip)
        path = self.dir_name / name
        staged = path.with_name(name + _STAGED)
        try:
            staged.write_bytes(_encode(trace, gzip_=self.use_gzip))
            os.replace(staged, path)
        except OSError as e:
            staged.unlink(missing_ok=True)
            raise ExportError(f"cannot write trace '{path}': {e.strerror or e}") from e
        return path

    def _write_predicted(self) -> None:
        from ...analysis import analyze
        self.predicted_written = True
        if self.inputs is None:
            warnings.warn("shapeprof.tensorboard_trace_handler: the model was not called while profiling, so there "
                          "is no predicted run", stacklevel=3)
            return
        args, kwargs = self.inputs
        try:
            report = analyze(self.model, *args, spec=self.spec, dtype=self.dtype, **kwargs)
        except Exception as e:   # the trace is written; a model we cannot analyse must not end the user's profiling
            warnings.warn(f"shapeprof.tensorboard_trace_handler: no predicted run, the model could not be analysed: "
                          f"{type(e).__name__}: {e}", stacklevel=3)
            return
        export_tensorboard(self.dir_name, report)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="meta")
    return x


def tensorboard_trace_handler(dir_name: str | os.PathLike, model: nn.Module | None = None, *,
                              worker_name: str | None = None, spec=None, dtype: torch.dtype | None = None,
                              use_gzip: bool = False):
    """A drop-in for `torch.profiler.tensorboard_trace_handler` that also says what each ATen op costs.

    The trace lands where torch's handler puts it (``<dir_name>/<worker>.<ms>.pt.trace.json[.gz]``, dir_name
    being the run), every ATen op recorded with ``record_shapes=True`` carrying ``shapeprof.*`` args (our FLOPs,
    bytes, intensity, bound and predicted time on `spec`) and, with ``with_flops=True``, PyTorch's own FLOP count
    as ``shapeprof.torch_flops``. Given `model`, the inputs of its first forward are kept (as meta tensors, by a
    forward pre-hook removed on that call, and again when the handler runs) and the first trace also writes the
    model's predicted run (`export_tensorboard`) inside `dir_name`.

        with torch.profiler.profile(record_shapes=True,
                                    on_trace_ready=shapeprof.tensorboard_trace_handler("runs/exp1", model)) as prof:
            for _ in range(3):
                model(x)
                prof.step()

    Args:
        dir_name: the run folder, as for torch's handler (created if missing).
        model: the profiled module, for the predicted run; None for costs on the trace only.
        worker_name: as torch's (default '<host>_<pid>').
        spec: device the costs and the prediction are for (default A100-80GB SXM).
        dtype: analyse the model as if in this dtype.
        use_gzip: write ``.pt.trace.json.gz``.
    """
    return _TraceHandler(dir_name, model, worker_name, spec, dtype, use_gzip)


@register
class TensorBoardFormat(Format):
    """TensorBoard runs in the run directory: the predicted one, and the measured one when the model was profiled
    (`export_tensorboard`); `shapeprof view` opens them."""

    name = "tensorboard"
    description = "TensorBoard runs (predicted, and measured when profiled): `shapeprof view` opens them"

    def write(self, results: Results, run_dir: Path) -> dict[str, Path]:
        return export_tensorboard(run_dir, results.report, measured=results.measured,
                                  measured_trace=results.measured_trace, name=results.name)
