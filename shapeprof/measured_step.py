"""A real training step, measured phase by phase on this machine: forward, backward, the optimizer's update.

`shapeprof.training` predicts a step on meta tensors; this module runs one and times it, so the prediction has a
measurement beside it: each phase's seconds, and MFU and HFU as they really came out (model FLOPs, and hardware
FLOPs, per second of the measured step over the machine's peak matmul rate in the step's dtype). The FLOPs are
the prediction's (`train_step`), so measured and predicted MFU divide the same work by different times.

The step runs on a copy (``copy.deepcopy`` of the model, copies of the inputs and targets, a fresh optimizer of
the class `Train` names), never on the user's model: its parameters, their ``.grad``, any optimizer of the
user's and the RNG state are as they were afterwards. The loss is the one the prediction differentiates
(`shapeprof.backward`'s rule: ``loss_fn``, the model's ``.loss``, nanoGPT's ``(logits, loss)``, else
``output.sum()``).

    >>> import torch
    >>> from shapeprof.calibration import calibrate
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    >>> train = Train(loss_fn=torch.nn.functional.cross_entropy, targets=(torch.zeros(32, dtype=torch.long),))
    >>> m = measure_step(net, torch.randn(32, 64), train=train, spec=calibrate("cpu"), steps=3, warmup=1)
    >>> list(m.phases), m.optimizer, m.loss, m.mfu == m.model_flops / m.seconds / m.peak_flops
    (['forward', 'backward', 'optimizer'], 'AdamW (for-loop)', 'loss_fn', True)
"""
from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .analysis import _training_step
from .backward import _loss_of
from .capture import unwrap
from .hardware import DeviceSpec, get_spec
from .optimizer_step import _optimizer_class, _state_bytes
from .profiling import ProfileError, _run_device
from .precision import resolve as resolve_precision
from .snapshot import copy_inputs, rng_kept
from .text import fmt_bytes, fmt_flops, fmt_seconds, one_line
from .training import Train, TrainingSummary, as_train

__all__ = ["PHASES", "MeasuredStep", "measure_step"]

PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class MeasuredStep:
    """A training step as it ran on this machine: seconds per phase, MFU and HFU, next to the prediction.

    Attributes:
        model: the model's class name.
        spec: the roofline the step is held against (the machine it ran on: `profile`'s `machine_spec`).
        device: where it ran ("cpu", "cuda:0").
        dtype: the step's dtype (its first trainable parameter's), whose matmul peak is `peak_flops`.
        optimizer: what ran, as the prediction names it: "AdamW (for-loop)", "SGD (foreach)", "Adam (fused)".
        loss: where the loss came from, as the prediction says it ("loss_fn", "model .loss", "output[1]" ...).
        steps, warmup: measured steps (each phase's figure is the median over them), unmeasured ones before.
        phases: forward (the forward and the loss), backward (``loss.backward()``), optimizer
            (``optimizer.step()``): the median of each phase's seconds over the measured steps.
        phase_seconds: each phase's seconds in every measured step.
        step_seconds: every measured step's seconds, forward start to optimizer end (zero_grad is not timed).
        predicted: each phase's predicted seconds on `spec` (the roofline of each op, as `train_step` prices it).
        model_flops, hardware_flops: the prediction's FLOPs of the step's forward and backward (see
            `shapeprof.training`: model FLOPs leave a fused attention backward's recomputation out).
        peak_flops: `spec`'s peak matmul FLOP/s in `dtype` (TF32's for fp32 where CUDA matmuls run in TF32).
        optimizer_state_bytes: what the optimizer held after the last step, each storage once (the prediction's
            is `memory["optimizer_state"]`).
        checkpointed: the modules whose forward ran under activation checkpointing (``torch.utils.checkpoint``,
            non-reentrant), the ones the prediction priced so (`Train(checkpoint=...)`).
        peak_memory_bytes: on CUDA, the most the device held during a measured step beyond what was allocated
            before the copy was made (``torch.cuda.max_memory_allocated``, reset before each step): the copy's
            weights, its optimizer state, the step's inputs, gradients and activations. None on a CPU.
        notes: what the measurement assumed or where it differs from the prediction.
    """

    model: str
    spec: str
    device: str
    dtype: str
    optimizer: str
    loss: str
    steps: int
    warmup: int
    phases: dict[str, float]
    phase_seconds: dict[str, tuple[float, ...]]
    step_seconds: tuple[float, ...]
    predicted: dict[str, float]
    model_flops: int
    hardware_flops: int
    peak_flops: float
    optimizer_state_bytes: int
    checkpointed: tuple[str, ...] = ()
    peak_memory_bytes: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        """The median measured step."""
        return statistics.median(self.step_seconds)

    @property
    def predicted_seconds(self) -> float:
        return sum(self.predicted.values())

    @property
    def mfu(self) -> float:
        """Model FLOPs per second of the median step, over the peak."""
        return self.model_flops / self.seconds / self.peak_flops

    @property
    def hfu(self) -> float:
        """Hardware FLOPs (recomputation included) per second of the median step, over the peak."""
        return self.hardware_flops / self.seconds / self.peak_flops

    def to_dict(self) -> dict[str, Any]:
        """Plain data for json.dumps (the derived figures included)."""
        return {"model": self.model, "spec": self.spec, "device": self.device, "dtype": self.dtype,
                "optimizer": self.optimizer, "loss": self.loss, "steps": self.steps, "warmup": self.warmup,
                "phases": dict(self.phases), "phase_seconds": {k: list(v) for k, v in self.phase_seconds.items()},
                "step_seconds": list(self.step_seconds), "seconds": self.seconds,
                "predicted": dict(self.predicted), "predicted_seconds": self.predicted_seconds,
                "model_flops": self.model_flops, "hardware_flops": self.hardware_flops,
                "peak_flops": self.peak_flops, "mfu": self.mfu, "hfu": self.hfu,
                "optimizer_state_bytes": self.optimizer_state_bytes, "checkpointed": list(self.checkpointed),
                "peak_memory_bytes": self.peak_memory_bytes, "notes": list(self.notes)}

    def __str__(self) -> str:
        lines = [f"measured training step of {self.model} on {self.spec} ({self.device}, {self.dtype}, "
                 f"{self.optimizer}, loss {self.loss}): {fmt_seconds(self.seconds)} median of {self.steps}, "
                 f"MFU {self.mfu:.1%}, HFU {self.hfu:.1%} of {fmt_flops(self.peak_flops)}/s",
                 f"  {'phase':<9} {'measured':>10} {'predicted':>10}"]
        for name in PHASES:
            lines.append(f"  {name:<9} {fmt_seconds(self.phases[name]):>10} "
                         f"{fmt_seconds(self.predicted[name]) if name in self.predicted else '-':>10}")
        lines.append(f"  {'step':<9} {fmt_seconds(self.seconds):>10} {fmt_seconds(self.predicted_seconds):>10}")
        lines.append(f"  optimizer state {fmt_bytes(self.optimizer_state_bytes)}" +
                     (f", peak memory of the step {fmt_bytes(self.peak_memory_bytes)}"
                      if self.peak_memory_bytes is not None else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def measure_step(model: nn.Module, *args: Any, train: bool | Train = True, spec: str | DeviceSpec | None = None,
                 steps: int = 5, warmup: int = 2, prediction: TrainingSummary | None = None,
                 **kwargs: Any) -> MeasuredStep:
    """Run `warmup` + `steps` training steps of a copy of `model` on this machine and time each phase.

    Each step: ``optimizer.zero_grad(set_to_none=True)`` (not timed), then forward and loss ("forward"),
    ``loss.backward()`` ("backward"), ``optimizer.step()`` ("optimizer"), each between two readings of
    ``time.perf_counter()``; on CUDA each reading follows a ``torch.cuda.synchronize()``, so a phase's time is
    the device's work, not the launches. Every step gets fresh copies of the inputs and targets (made before its
    clock starts), so a forward that writes its input sees the same values each step.

    The copy costs memory: a second set of weights, then its gradients, optimizer state and activations. On
    CUDA the device's peak-memory statistics are reset before each measured step (``peak_memory_bytes``), so
    ``torch.cuda.max_memory_allocated`` reads from that step on afterwards.

    Args:
        model, *args, **kwargs: the model with real parameters on a CPU or one CUDA device, and its real inputs.
        train: True (AdamW, the model's own loss) or a `shapeprof.Train(optimizer=..., optimizer_kwargs=...,
            loss_fn=..., targets=...)`: the optimizer class (torch.optim SGD, Adam, AdamW, by name or class) is
            built fresh over the copy's trainable parameters with `optimizer_kwargs`, as torch.optim takes them.
        spec: the roofline of this machine (default ``shapeprof.calibrate()`` of the device).
        steps: measured steps (>= 1). warmup: unmeasured steps before them (>= 0): the optimizer creates its
            state in its first step, allocators and caches settle.
        prediction: the same step's `TrainingSummary` on `spec` (``analyze(..., spec=spec, train=...).training``),
            whose FLOPs, predicted phases and checkpointed blocks are used; default: that of `analyze` on `spec`.

    Returns:
        A `MeasuredStep`.
    Raises:
        TypeError: `train` is neither True nor a Train.
        ValueError: no trainable parameters, inference_mode, bad step counts, no real data (meta tensors), an
            unknown optimizer.
        ProfileError: the model cannot be copied, or the step failed while running (naming the phase).
    """
    model = unwrap(model)
    cfg = as_train(model, train)
    device = _run_device(model, args, kwargs)
    if spec is None:
        from .calibration import calibrate
        spec = calibrate(device)
    spec = get_spec(spec)
    tf32 = device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"
    if prediction is None:   # as analyze(train=cfg) prices it: every field of Train passed on in one place
        prediction = _training_step(model, args, kwargs, cfg, spec, None)
    return measure(model, args, kwargs, cfg, spec, prediction, device, steps=steps, warmup=warmup, tf32=tf32)


def measure(model: nn.Module, args: tuple, kwargs: dict, cfg: Train, spec: DeviceSpec, prediction: TrainingSummary,
            device: torch.device, *, steps: int, warmup: int, tf32: bool = False) -> MeasuredStep:
    """`measure_step` with everything resolved: what `profile(train=...)` calls, the forward's inputs given as a
    tuple and a dict (so none of them can be taken for this function's own keywords)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    model = unwrap(model)
    name = type(model).__name__
    cls = _optimizer_class(cfg.optimizer)
    cuda = device.type == "cuda"
    with rng_kept([device]), torch.enable_grad():   # dropout in the copy draws: the caller's next draw is unchanged
        if cuda:
            torch.cuda.synchronize(device)
            baseline = torch.cuda.memory_allocated(device)
        try:
            shadow = copy.deepcopy(model)
        except Exception as e:
            raise ProfileError(f"cannot copy {name} to measure a training step on the copy (copy.deepcopy: "
                               f"{one_line(e)}): the step runs on a copy so that the model's parameters, "
                               f"gradients and optimizer state stay as they are") from e
        checkpointed = tuple(prediction.checkpointed)
        _checkpoint(shadow, checkpointed)
        params = [p for p in shadow.parameters() if p.requires_grad]
        optimizer = cls(params, **cfg.optimizer_kwargs)
        implementation = _implementation(cfg.optimizer_kwargs, params)
        samples: dict[str, list[float]] = {p: [] for p in PHASES}
        step_seconds: list[float] = []
        peak: int | None = None
        source, loss_notes = "", []

        def clock() -> float:
            if cuda:
                torch.cuda.synchronize(device)   # the GPU's queued work is part of the phase it was launched in
            return time.perf_counter()

        # mixed precision as the prediction priced it: the forward and loss under autocast, fp32 master weights
        region = torch.autocast(device.type, dtype=resolve_precision(cfg.autocast).dtype) \
            if cfg.autocast is not None else contextlib.nullcontext()
        phase = "forward"
        try:
            for i in range(warmup + steps):
                step_args, step_kwargs, targets = copy_inputs((args, kwargs, tuple(cfg.targets)))
                optimizer.zero_grad(set_to_none=True)
                measured = i >= warmup
                if cuda and measured:
                    torch.cuda.reset_peak_memory_stats(device)
                phase = "forward"
                t0 = clock()
                with region:
                    output = shadow(*step_args, **step_kwargs)
                    loss, source, loss_notes = _loss_of(output, cfg.loss_fn, targets, name)
                t1 = clock()
                phase = "backward"
                loss.backward()
                t2 = clock()
                phase = "optimizer"
                optimizer.step()
                t3 = clock()
                if measured:
                    for key, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
                        samples[key].append(seconds)
                    step_seconds.append(t3 - t0)
                    if cuda:
                        used = torch.cuda.max_memory_allocated(device) - baseline
                        peak = used if peak is None else max(peak, used)
                del output, loss, step_args, step_kwargs, targets
        except Exception as e:
            raise ProfileError(f"{name} failed in the {phase} phase of a measured training step: "
                               f"{one_line(e)}") from e
        state_bytes = _state_bytes(optimizer)
    dtype = resolve_precision(cfg.autocast).dtype if cfg.autocast is not None else params[0].dtype
    ran = f"{cls.__name__} ({implementation})"
    notes = list(loss_notes)
    if ran != prediction.optimizer:
        why = (" (foreach and fused unset: torch runs the for-loop on CPU parameters, the prediction prices "
               "foreach, what it picks on CUDA)" if implementation == "for-loop" and not cuda else "")
        notes.append(f"measured {ran}, the prediction prices {prediction.optimizer}{why}")
    if source != prediction.loss:
        notes.append(f"the measured loss is {source}, the predicted one {prediction.loss}")
    if not model.training:
        notes.append(f"{name} is in eval mode: dropout and batch norm ran as in evaluation")
    return MeasuredStep(
        model=name, spec=spec.name, device=str(device), dtype=str(dtype).removeprefix("torch."), optimizer=ran,
        loss=source, steps=steps, warmup=warmup,
        phases={k: statistics.median(v) for k, v in samples.items()},
        phase_seconds={k: tuple(v) for k, v in samples.items()}, step_seconds=tuple(step_seconds),
        predicted={k: p.predicted_seconds for k, p in prediction.phases.items()},
        model_flops=prediction.model_flops, hardware_flops=prediction.hardware_flops,
        peak_flops=spec.peak_for(dtype, matmul=True, tf32=tf32), optimizer_state_bytes=state_bytes,
        checkpointed=checkpointed, peak_memory_bytes=peak, notes=tuple(notes))


def _checkpoint(shadow: nn.Module, paths: tuple[str, ...]) -> None:
    """Run these modules of the copy under activation checkpointing, as the prediction priced them: each one's
    forward through ``torch.utils.checkpoint`` (non-reentrant), so backward runs it again. Only the copy's
    modules get the wrapper (an instance attribute of each)."""
    from torch.utils.checkpoint import checkpoint
    for path in paths:
        module = shadow.get_submodule(path)
        module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)


def _implementation(kwargs: dict[str, Any], params: list[torch.Tensor]) -> str:
    """Which of torch.optim's implementations the step runs: what was asked for, else what torch picks for these
    parameters (foreach on CUDA, the for-loop on a CPU), by torch's own rule."""
    if kwargs.get("fused"):
        return "fused"
    if kwargs.get("foreach"):
        return "foreach"
    if kwargs.get("foreach") is None and kwargs.get("fused") is None:
        from torch.optim.optimizer import _default_to_fused_or_foreach
        _, foreach = _default_to_fused_or_foreach(params, bool(kwargs.get("differentiable", False)), False)
        return "foreach" if foreach else "for-loop"
    return "for-loop"
