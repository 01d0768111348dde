"""profile(): run the captured graph under torch.profiler, one range per node, and put measured next to predicted.

`analyze` predicts; `profile` also measures. It captures the model as `analyze` does, then runs the *captured
graph* on the user's real model and copies of the real inputs, node by node, under ``torch.profiler.profile`` with one
``record_function`` range per graph node, named after the node. Measured time therefore joins each node of the
Report exactly (no guessing which ATen events belong to which module). The measured run is held against the
roofline of the machine it ran on (``shapeprof.calibrate()``), so ``efficiency = predicted / measured`` says how
close each node came to this machine's roof; the same model is also analysed against the GPU you care about.

    >>> import torch
    >>> from shapeprof.profiling import profile
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU())
    >>> result = profile(model, torch.randn(64, 256), steps=3)
    >>> [(n.name, n.measured_seconds > 0) for n in result.measured.nodes]
    [('_0', True), ('_1', True)]
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import statistics
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
from torch.profiler import ProfilerActivity, record_function, schedule
from torch.utils import _pytree as pytree

from .analysis import analyze
from .calibration import DEFAULT_DTYPES, MEASURED_DTYPES, calibrate
from .capture import InputShape, describe_node, flat_user_inputs, unwrap
from .text import one_line
from .dropin import DropInError, graph_module_over
from .hardware import DeviceSpec, get_spec
from .phases import is_phase, real_inputs
from .report import Report
from .snapshot import WriteSnapshot, copy_inputs, rng_kept

if TYPE_CHECKING:   # imported where used: measured_step imports this module (ProfileError)
    from .measured_step import MeasuredStep
    from .training import Train

__all__ = ["ProfileError", "ProfileResult", "profile"]

_CALLS = ("call_function", "call_method", "call_module")


class ProfileError(RuntimeError):
    """The model could not be profiled: it failed while running (the message names the graph node, its op and
    source line), or the graph it was captured as cannot be fed the real model's weights."""


@dataclass
class ProfileResult:
    """What `profile` measured, joined to what `analyze` predicts.

    Attributes:
        measured: the model analysed against the roofline of the machine it ran on (`machine_spec`), every node
            with `measured_seconds` (median over the profiled steps) and `efficiency` = predicted / measured;
            `measured.total.measured_seconds` is the median step time. On CUDA a node that launched no kernel
            (a ``contiguous`` of a tensor that already is) measures 0.0 and has no efficiency.
        predicted: the same model analysed against the requested `spec` (default A100-80GB SXM), with `dtype`
            applied if given: the predicted picture on the GPU you care about. It carries no measurements.
        machine_spec: the roofline of the machine the model ran on.
        trace: the Kineto (Chrome trace) JSON of the measured run as torch.profiler exported it, with a
            ``ProfilerStep#N`` range per step and one ``user_annotation`` range per graph node per step,
            named after the node.
        steps: how many steps were measured.
        logdir: where TensorBoard runs were written (None without `logdir`).
        runs: TensorBoard run name -> its folder, as the TensorBoard exporter returned them.
        output: the model's output in the last measured step (the same structure `model(*args)` returns).
        step_seconds: each measured step's time.
        node_level: whether node-level times were measured (False for a dispatch-level capture, whose graph
            cannot be run: then only the model total is measured, and `note` says so).
        note: how the measurement was made, in a sentence or two.
        training: with `train=`, the training step measured phase by phase on this machine, with measured MFU and
            HFU (`shapeprof.measured_step.MeasuredStep`); `measured.training` is its prediction on this machine,
            `predicted.training` on `spec`. None without `train=`.
    """

    measured: Report
    predicted: Report
    machine_spec: DeviceSpec
    trace: dict
    steps: int
    logdir: Path | None = None
    runs: dict[str, Path] = field(default_factory=dict)
    output: Any = field(default=None, repr=False)
    step_seconds: tuple[float, ...] = ()
    node_level: bool = True
    note: str = ""
    training: MeasuredStep | None = None

    def to_html(self, path: str | os.PathLike) -> Path:
        """The measured report (predicted and measured times on this machine) and the predicted one on the chosen
        spec, as one HTML file that opens offline, with a selector between the two. Returns the path."""
        from .output.html import write_html
        return write_html(path, [(f"{self.measured.model} · measured on {self.machine_spec.display_name}",
                                  self.measured),
                                 (f"{self.predicted.model} · predicted on {self.predicted.spec.display_name}",
                                  self.predicted)], title=self.measured.model)


def profile(model: nn.Module, *args: Any, logdir: str | os.PathLike | None = None,
            spec: str | DeviceSpec | None = None, steps: int = 5, warmup: int = 2,
            dtype: torch.dtype | str | None = None, machine_spec: str | DeviceSpec | None = None,
            method: str = "auto", train: bool | Train = False, **kwargs: Any) -> ProfileResult:
    """Measure every node of `model` on this machine and join the times to the predicted ones.

    The model is captured as `analyze` captures it, and the captured graph is run on the real model (its own
    parameters and submodules, shared, not copied) and copies of the real inputs, node by node, under
    ``torch.profiler.profile(record_shapes=True)`` with one ``record_function(node.name)`` range per node and a
    ``ProfilerStep#N`` range per step: `warmup` unmeasured steps, then `steps` measured ones, under
    ``torch.no_grad()`` (the analysis is of the forward pass). A node's measured time is the median over the
    steps of its range's duration: CPU time on a CPU; on a CUDA device the GPU time of the kernels launched
    inside the range (not the time to launch them). The model's total is the median step time (on CUDA each
    step ends with a synchronize). Each range includes the interpreter's few microseconds per node.

    Which graph runs depends on the capture: a ``symbolic_trace`` graph runs as an ``fx.GraphModule`` over the
    model itself; an ``export`` graph is fed the model's parameters and buffers through the ExportedProgram's
    graph signature. A ``dispatch`` capture has no graph that can be run on real weights: the model runs eagerly,
    only the total is measured, and ``result.node_level`` is False.

    Nothing passed in is left changed: the model keeps its hooks, device and mode, and every parameter and buffer
    a forward writes (a BatchNorm's running statistics in train mode, ``self.w.data.mul_(2)``) gets its values
    back; each step runs on its own copies of the inputs, so a forward that writes its input (``x.add_(1)``)
    sees the same values every step and the caller's tensors stay as they were; the RNG state (CPU, and the
    CUDA device's) is put back. To know what a forward writes, it is run once more, unmeasured, before the
    warmup steps (see `shapeprof.snapshot`).

    With `train=`, a real training step is measured too, after the forward's nodes: on a copy of the model
    (``copy.deepcopy``: it costs a second set of weights), a fresh optimizer and copies of the inputs, `warmup`
    then `steps` steps, each phase (forward and loss, backward, ``optimizer.step()``) timed on its own
    (`shapeprof.measured_step`), into ``result.training``; both Reports then price the step (`analyze(train=)`).

        >>> import torch
        >>> from shapeprof.profiling import profile
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU())
        >>> r = profile(model, torch.randn(64, 256), steps=3)
        >>> r.measured.nodes[0].op, r.measured.nodes[0].efficiency > 0, r.predicted.spec.name
        ('Linear', True, 'a100-80gb-sxm')

    Args:
        model: an nn.Module with real parameters on a CPU or one CUDA device.
        *args, **kwargs: the real inputs, as the model's forward takes them (not `InputShape`s or meta tensors).
            The keyword arguments named below are this function's own and not passed on.
        logdir: write TensorBoard runs there (the measured trace enriched with the predictions, and the
            predicted timeline on `spec`), via ``shapeprof.export_tensorboard``.
        spec: the device to predict for in `target` (a built-in name, a spec file or a DeviceSpec).
        steps: measured steps (>= 1).
        warmup: unmeasured steps run first (>= 0), under the profiler, so caches, allocators and lazy
            initialisation settle.
        dtype: analyse `target` as if parameters and floating inputs were in this dtype. It changes the
            predictions on `target` only: the measured run runs the model as it is.
        machine_spec: the roofline of the machine it runs on; default ``shapeprof.calibrate()`` of that device
            (measured once per process, about 3 s).
        method: the capture method, as for `analyze` ("auto", "symbolic_trace", "export", "dispatch").
        train: True or a `shapeprof.Train(optimizer=..., optimizer_kwargs=..., loss_fn=..., targets=...)`: also
            measure a training step (``result.training``) and predict it (``measured.training`` on this machine,
            ``predicted.training`` on `spec`), as `analyze(train=...)` prices it.

    Returns:
        A `ProfileResult`.

    Raises:
        ValueError: steps < 1, warmup < 0, a model or inputs on the meta device, or `InputShape` inputs; with
            `train=`, a model without trainable parameters, or a Prefill/Decode phase.
        TypeError: `train` is neither a bool nor a `shapeprof.Train`.
        ProfileError: the model failed during the measured run (naming the node, its op and source line), the
            logdir cannot be written, or a measured step wrote a parameter or buffer the first run did not
            (so its values before profiling could not be kept).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    phase = args[0] if len(args) == 1 and not kwargs and is_phase(args[0]) else None
    if train:   # refused before the calibration and the captures, as analyze(train=...) refuses it
        from .measured_step import measure
        from .training import as_train
        if phase is not None:
            raise ValueError("train= prices a training step, and a Prefill/Decode phase is an inference step: give "
                             "the model example inputs (and targets) instead")
        train = as_train(model, train)
    user_model = model
    if phase is not None:   # a measured prefill or decode step: the module and inputs that step runs
        model, args, kwargs = real_inputs(model, phase)
    device = _run_device(model, args, kwargs)
    if logdir is not None:
        _check_writable(Path(logdir))
    cuda = device.type == "cuda"
    with rng_kept([device]):   # dropout, torch.rand in forward, calibration: the caller's next draw is unchanged
        if machine_spec is None:
            machine_spec = calibrate(device, dtypes=_dtypes_of(model, args, kwargs))
        else:
            machine_spec = get_spec(machine_spec)
        tf32 = cuda and torch.get_float32_matmul_precision() != "highest"
        # "auto" here prefers a graph that runs on the model's weights (export before dispatch): node-level times
        measured = analyze(model, *args, spec=machine_spec, method="runnable" if method == "auto" else method,
                           tf32=tf32, train=train, **kwargs)
        cap = measured.graph_capture
        target = analyze(model, *args, spec=spec, dtype=dtype, method=cap.method, train=train, **kwargs) \
            if phase is None else analyze(user_model, phase, spec=spec, dtype=dtype)

        eager = cap.method.startswith("dispatch")   # dispatch and dispatch_real: no graph runs on the weights
        if eager:
            runner, names = _eager_runner(model), {}
        elif cap.method == "export":
            runner, names = _export_runner(model, cap, args, kwargs, device)
        else:
            runner, names = _symbolic_runner(model, cap, device)

        events, trace, output = _run_profiled(runner, model, args, kwargs, device, steps, warmup)
        # the step as the model runs it here (its own dtype): the FLOPs and phases this machine's prediction gives
        training = measure(model, args, kwargs, train, machine_spec, measured.training, device, steps=steps,
                           warmup=warmup, tf32=tf32) if train else None
    step_seconds, node_seconds = _measurements(events, set(names.values()), steps, cuda)
    total = statistics.median(step_seconds)
    report = measured.with_measurements({k: statistics.median(v) for k, v in node_seconds.items()}, total)
    if eager:
        note = ("dispatch-level capture: its graph of ATen ops cannot be run on the model's weights, so the model "
                "ran eagerly and only its total time was measured; node times are not measured.")
    else:
        how = "GPU time of the kernels launched in each node's range" if cuda else "CPU time of each node's range"
        note = (f"{cap.method} graph run node by node, one profiler range per node; median over {steps} steps of "
                f"the {how}.")
    result = ProfileResult(measured=report, predicted=target, machine_spec=machine_spec, trace=trace, steps=steps,
                           output=output, step_seconds=tuple(step_seconds), node_level=not eager,
                           note=note, training=training)
    if logdir is not None:
        _export(result, Path(logdir))
    return result


# ---------------------------------------------------------------------------------------------- arguments

def _run_device(model: nn.Module, args: tuple, kwargs: dict) -> torch.device:
    tensors = [t for t in (*model.parameters(), *model.buffers())]
    leaves = pytree.tree_leaves((args, kwargs))
    if any(isinstance(x, InputShape) for x in leaves):
        raise ValueError("profile runs the model: give real input tensors, not InputShape")
    inputs = [x for x in leaves if isinstance(x, torch.Tensor)]
    for t in tensors + inputs:
        if t.device.type == "meta":
            raise ValueError("profile runs the model: its parameters and inputs must hold data, "
                             "not be on the meta device (use shapeprof.analyze for a prediction only)")
    devices = {t.device for t in tensors + inputs}
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    if len(cuda) > 1:
        raise ValueError(f"profile measures one device; the model and inputs are on {', '.join(map(str, cuda))}")
    if cuda:
        d = cuda[0]
        return torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())
    others = {d.type for d in devices} - {"cpu"}
    if others:
        raise ValueError(f"profile measures a CPU or a CUDA device, not {', '.join(sorted(others))}")
    return torch.device("cpu")


def _dtypes_of(model: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.dtype, ...]:
    """The default calibration dtypes plus any floating dtype the model or its inputs use."""
    found = list(DEFAULT_DTYPES)
    for t in (*model.parameters(), *model.buffers(), *pytree.tree_leaves((args, kwargs))):
        if isinstance(t, torch.Tensor) and t.dtype in MEASURED_DTYPES and t.dtype not in found:
            found.append(t.dtype)
    return tuple(found)


def _check_writable(logdir: Path) -> None:
    """Fail before minutes of profiling, not after, when the TensorBoard logdir cannot be written."""
    if logdir.exists() and not logdir.is_dir():
        raise ProfileError(f"cannot write TensorBoard runs to {logdir}: it is a file")
    probe = logdir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ProfileError(f"cannot write TensorBoard runs to {logdir}: {probe} is not writable")


# ---------------------------------------------------------------------------------------------- runners

class _RangedInterpreter(fx.Interpreter):
    """Runs a graph node by node, each call node inside ``record_function(<its name in the Report>)``.

    A node that raises is reported by its name, op and source line, as capture's NodeError does.
    """

    def __init__(self, gm: fx.GraphModule, names: dict[fx.Node, str]):
        super().__init__(gm)
        self.names = names
        self.extra_traceback = False   # our own error names the node; keep the original exception as cause

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in _CALLS:
            return super().run_node(n)
        name = self.names[n]
        with record_function(name):
            try:
                return super().run_node(n)
            except Exception as e:
                raise ProfileError(f"{describe_node(n, name)} failed while profiling: {one_line(e)}") from e


def _copy_graph(graph: fx.Graph, device: torch.device) -> tuple[fx.Graph, dict[fx.Node, str]]:
    """A copy of `graph` (the captured one stays as analysed), each copy mapped to its original's name.

    The graph was captured on meta tensors, so a device written into it as a constant (``torch.arange(...,
    device=x.device)`` traced by export) says "meta": the copy says `device` instead.
    """
    g = copy.deepcopy(graph)
    names = {new: old.name for old, new in zip(graph.nodes, g.nodes)}

    def fix(a: Any) -> Any:
        return device if isinstance(a, torch.device) and a.type == "meta" else a
    for node in g.nodes:
        node.args = fx.node.map_aggregate(node.args, fix)
        node.kwargs = fx.node.map_aggregate(node.kwargs, fix)
    return g, names


@dataclass
class _Runner:
    """How to run the captured graph: `prepare` turns (args, kwargs) into what `execute` takes, ahead of the
    timed steps, so a step spends no time binding arguments."""

    prepare: Callable[[tuple, dict], Any]
    execute: Callable[[Any], Any]


def _symbolic_runner(model: nn.Module, cap, device: torch.device) -> tuple[_Runner, dict[fx.Node, str]]:
    """The symbolic_trace graph as a GraphModule over the real model: it shares the model's submodules,
    parameters and buffers (references, never the model's data), and holds the tensor constants the tracer
    made itself; nothing is set on the model."""
    graph, names = _copy_graph(cap.graph, device)
    try:
        gm = graph_module_over(model, graph, cap.root, class_name=f"{type(model).__name__}Graph")
    except DropInError as e:
        raise ProfileError(str(e)) from e
    signature = inspect.signature(model.forward)
    interp = _RangedInterpreter(gm, names)

    def prepare(args: tuple, kwargs: dict) -> list[Any]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return [bound.arguments[name] for name in signature.parameters]
    return _Runner(prepare, lambda values: interp.run(*values)), names


def _export_runner(model: nn.Module, cap, args: tuple, kwargs: dict,
                   device: torch.device) -> tuple[_Runner, dict[fx.Node, str]]:
    """The export graph fed the lifted inputs from the real model, as its graph signature maps them.

    Parameters and buffers come from the model by name. A tensor constant the forward made (an index list,
    say) was traced on meta and has no value in the capture: those are taken from an export of the real model,
    checked to be the same graph.
    """
    from torch.export.graph_signature import InputKind, OutputKind
    program = cap.exported
    signature = program.graph_signature
    graph, names = _copy_graph(program.graph_module.graph, device)
    gm = fx.GraphModule(program.graph_module, graph)
    for node in graph.nodes:    # higher-order op bodies (no_grad, autocast regions) are graphs too
        if node.op == "get_attr":
            sub = _get(gm, node.target)
            if isinstance(sub, fx.GraphModule):
                sub_graph, _ = _copy_graph(sub.graph, device)
                _set(gm, node.target, fx.GraphModule(sub, sub_graph))
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    n_user = sum(1 for s in signature.input_specs if s.kind == InputKind.USER_INPUT)
    real_constants: dict[str, torch.Tensor] | None = None
    lifted: list[Any] = []      # what the graph takes besides the user inputs (None where a user input goes)
    for s in signature.input_specs:
        if s.kind == InputKind.USER_INPUT:
            lifted.append(None)
        elif s.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            if s.target not in tensors:
                raise ProfileError(f"the exported graph reads {s.target!r}, which the model does not have")
            lifted.append(tensors[s.target])
        elif s.kind == InputKind.CONSTANT_TENSOR:
            value = program.constants[s.target]
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                if real_constants is None:
                    real_constants = _real_constants(model, args, kwargs, program)
                value = real_constants[s.target]
            lifted.append(value.to(device) if isinstance(value, torch.Tensor) else value)
        else:
            raise ProfileError(f"cannot feed an exported graph input of kind {s.kind.name} ({s.arg.name})")
    users = [s.kind == InputKind.USER_INPUT for s in signature.input_specs]
    user_outputs = [i for i, s in enumerate(signature.output_specs) if s.kind == OutputKind.USER_OUTPUT]
    out_spec = program.call_spec.out_spec
    interp = _RangedInterpreter(gm, names)

    def prepare(args: tuple, kwargs: dict) -> list[Any]:
        flat = _user_inputs(program, args, kwargs)
        if n_user != len(flat):
            raise ProfileError(f"the exported graph takes {n_user} user inputs, the call gives {len(flat)}")
        user = iter(flat)
        return [next(user) if is_user else value for is_user, value in zip(users, lifted)]

    def execute(values: list[Any]) -> Any:
        out = interp.run(*values)
        flat_out = [out[i] for i in user_outputs]   # buffer mutations are not written back: model untouched
        return pytree.tree_unflatten(flat_out, out_spec)
    return _Runner(prepare, execute), names


def _real_constants(model: nn.Module, args: tuple, kwargs: dict, program) -> dict[str, torch.Tensor]:
    """Export the real model (real inputs, so constants made from Python values keep their values) and take its
    tensor constants, checked to be the same ones, by name, shape and dtype, as the capture's. The two graphs
    themselves may differ a little (a ``contiguous`` that is a no-op on real strides is dropped), so only the
    constants are compared and taken."""
    try:
        real = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        raise ProfileError(f"the forward creates tensor constants whose values the capture on meta tensors does "
                           f"not have, and exporting the real model to get them failed: {one_line(e)}") from e
    for name, value in program.constants.items():
        other = real.constants.get(name)
        if isinstance(value, torch.Tensor) and (not isinstance(other, torch.Tensor) or other.shape != value.shape
                                                or other.dtype != value.dtype):
            raise ProfileError(f"tensor constant {name!r} of the captured graph has no match in an export of the "
                               f"real model")
    return dict(real.constants)


def _eager_runner(model: nn.Module) -> _Runner:
    def execute(call: tuple[tuple, dict]) -> Any:
        args, kwargs = call
        try:
            return model(*args, **kwargs)
        except Exception as e:
            raise ProfileError(f"{type(model).__name__} failed while profiling (run eagerly: the dispatch-level "
                               f"capture has no per-node graph): {one_line(e)}") from e
    return _Runner(lambda args, kwargs: (args, kwargs), execute)


def _get(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set(root: nn.Module, target: str, value: Any) -> None:
    *path, last = target.split(".")
    setattr(_get(root, ".".join(path)) if path else root, last, value)


# ---------------------------------------------------------------------------------------------- the measured run

@contextlib.contextmanager
def _attributes_kept(model: nn.Module):
    """Put back what each module's attributes refer to: a forward run eagerly may rebind them (``self.buf =
    new``, ``self.last = x``), which changes the user's own dicts. References only: no tensor is copied (their
    values are `WriteSnapshot`'s)."""
    saved = [(m, d, dict(d)) for m in model.modules()
             for d in (vars(m), m._parameters, m._buffers, m._modules)]
    try:
        yield
    finally:
        for m, d, before in saved:
            if len(d) != len(before) or any(d.get(k, d) is not v for k, v in before.items()):
                d.clear()
                d.update(before)


def _run_profiled(runner: _Runner, model: nn.Module, args: tuple, kwargs: dict, device: torch.device,
                  steps: int, warmup: int) -> tuple[list, dict, Any]:
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    got: dict[str, Any] = {}

    def ready(p: torch.profiler.profile) -> None:
        got["events"] = p.events()
        with tempfile.TemporaryDirectory(prefix="shapeprof-trace-") as tmp:
            path = os.path.join(tmp, "trace.json")
            p.export_chrome_trace(path)
            with open(path, encoding="utf-8") as f:
                got["trace"] = json.load(f)

    output = None
    snapshot = WriteSnapshot()
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=".*won't be using warmup.*")          # warmup=0 is allowed
        warnings.filterwarnings("ignore", message=".*clears events at the end of each cycle.*")  # one cycle
        stack.enter_context(torch.no_grad())
        stack.enter_context(_attributes_kept(model))
        stack.callback(snapshot.restore)         # on the way out, after the profiler has stopped
        if cuda:
            stack.enter_context(torch.cuda.device(device))
        step_inputs = _step_inputs(runner, snapshot, args, kwargs, warmup + steps)
        unwatched = _unwatched(model, snapshot)
        prof = stack.enter_context(torch.profiler.profile(
            activities=activities, record_shapes=True, on_trace_ready=ready,
            schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1)))
        for values in step_inputs:
            output = runner.execute(values)
            if cuda:
                torch.cuda.synchronize(device)   # inside the step's range: the step time covers the GPU's work
            prof.step()
        changed = [name for name, t, version in unwatched if t._version != version]
        if changed:
            raise ProfileError(f"a measured step wrote {', '.join(changed)}, which the first run of the forward "
                               f"did not write, so the values from before profiling cannot be put back (the "
                               f"forward writes state depending on what it wrote before?)")
    if "events" not in got:
        raise ProfileError("torch.profiler produced no trace for the measured steps")
    return got["events"], got["trace"], output


def _step_inputs(runner: _Runner, snapshot: WriteSnapshot, args: tuple, kwargs: dict, n: int) -> list[Any]:
    """Each of the `n` steps' inputs, prepared, after one watched, unmeasured run that finds what the forward
    writes (and saves those parameters and buffers in `snapshot`, which puts them back at once).

    An input the forward writes gets its own copy in every step, so every step sees the values the caller
    passed; the copies are all made here, before the timed steps (copying inside a step would add to its time),
    so they cost `n` times those inputs' memory. An input it only reads is copied once and shared by the steps.
    """
    first = copy_inputs((args, kwargs))
    try:
        with snapshot.watch(ours=first):
            runner.execute(runner.prepare(*first))
    finally:
        snapshot.restore()
    leaves, spec = pytree.tree_flatten((args, kwargs))
    firsts = pytree.tree_leaves(first)
    written = [isinstance(c, torch.Tensor) and snapshot.wrote(c) for c in firsts]
    if not any(written):
        return [runner.prepare(*first)] * n
    prepared = []
    for _ in range(n):
        fresh = copy_inputs([x if w else None for x, w in zip(leaves, written)])
        args_, kwargs_ = pytree.tree_unflatten([c if w else f for c, f, w in zip(fresh, firsts, written)], spec)
        prepared.append(runner.prepare(args_, kwargs_))
    return prepared


def _unwatched(model: nn.Module, snapshot: WriteSnapshot) -> list[tuple[str, torch.Tensor, int]]:
    """(name, tensor, version) of each parameter and buffer the watched run did not write. A measured step is
    not watched (that would add a Python call per op to its time); should one write such a tensor anyway, its
    version counter says so, and profile fails rather than leave it changed unsaid."""
    found = []
    for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if snapshot.wrote(t):
            continue
        try:
            found.append((name, t, t._version))
        except RuntimeError:   # an inference tensor has no version counter (and cannot be written outside one)
            pass
    return found


def _measurements(events, names: set[str], steps: int, cuda: bool) -> tuple[list[float], dict[str, list[float]]]:
    """Per-step times and, per node name, its range's time in each step (seconds)."""
    step_events = sorted((e for e in events if e.name.startswith("ProfilerStep") and e.cpu_parent is None
                          and e.device_type == torch.autograd.DeviceType.CPU),
                         key=lambda e: e.time_range.start)
    if len(step_events) != steps:
        raise ProfileError(f"expected {steps} profiled steps in the trace, found {len(step_events)}")
    step_seconds = [e.time_range.elapsed_us() / 1e6 for e in step_events]
    per_node: dict[str, list[float]] = {}
    for step in step_events:
        for child in step.cpu_children:
            if child.name in names:
                us = child.device_time_total if cuda else child.time_range.elapsed_us()
                per_node.setdefault(child.name, []).append(us / 1e6)
    return step_seconds, per_node


# ---------------------------------------------------------------------------------------------- TensorBoard

def _export(result: ProfileResult, logdir: Path) -> None:
    try:
        from .output.tensorboard import export_tensorboard
    except ImportError as e:
        raise ProfileError(f"logdir given but the TensorBoard exporter cannot be imported: {one_line(e)}") from e
    runs = export_tensorboard(logdir, result.predicted, measured=result.measured, measured_trace=result.trace)
    result.logdir = logdir
    if isinstance(runs, Mapping):
        result.runs = {str(k): Path(v) for k, v in runs.items()}


def _user_inputs(program, args: tuple, kwargs: dict) -> list[Any]:
    try:
        return flat_user_inputs(program, args, kwargs, strict=True)
    except ValueError as e:
        raise ProfileError(str(e)) from None
