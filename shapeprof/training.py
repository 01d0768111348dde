"""One training step, phase by phase: forward, backward and the optimizer update, their memory, GPUs and MFU.

`train_step` puts together what three modules price on meta: the forward and backward pass of the user's loss
(`shapeprof.backward`), the optimizer's update as torch.optim runs it (`shapeprof.optimizer_step`), and the
memory per GPU under DDP and FSDP (`shapeprof.distributed`). Nothing of the user's model changes.

MFU and HFU as large-scale training reports them (PaLM, Chowdhery et al. 2022, appendix B): model FLOPs per
second over the device's peak, where model FLOPs are the forward and the backward of the model as written, and
hardware FLOPs what the kernels really compute. The two differ by recomputation: a fused attention backward
recomputes the scores (the forward's Q K^T) instead of keeping them, so its hardware FLOPs are the five products
shapeprof prices, its model FLOPs twice the forward's two. The optimizer update is in neither (it is in the time).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    >>> step = train_step(net, torch.randn(32, 64), loss_fn=torch.nn.functional.cross_entropy,
    ...                   targets=(torch.zeros(32, dtype=torch.long),))
    >>> list(step.phases), step.memory["optimizer_state"] - 2 * step.memory["weights"]   # exp_avg, exp_avg_sq
    (['forward', 'backward', 'optimizer'], 16)

(The 16 bytes: AdamW's four fp32 step counters, one per parameter tensor.)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from .hardware import get_spec
from .precision import resolve as resolve_precision
from .text import fmt_bytes, fmt_flops, fmt_seconds

if TYPE_CHECKING:   # imported where used: backward imports analysis, which the Report (and so this) is under
    from .backward import TrainingPasses
    from .distributed import FitResult
    from .optimizer_step import OptimizerStepCost

__all__ = ["BlockTrade", "Phase", "Train", "TrainStep", "TrainingSummary", "as_train", "train_step"]


@dataclass(frozen=True)
class Train:
    """What `analyze(model, x, train=Train(...))` prices as a training step (train=True: all defaults).

    optimizer: torch.optim's SGD, Adam or AdamW by name or class, with `optimizer_kwargs` (foreach, fused,
    momentum, weight_decay ...); loss_fn(output, *targets) the loss, else the model's own (HF `.loss` with labels,
    nanoGPT's `(logits, loss)`), else output.sum() with a note. checkpoint: "blocks" (every block of the
    model's longest ModuleList) or module paths, run under activation checkpointing (torch.utils.checkpoint).
    autocast: "bf16" or "fp16" mixed precision, fp32 master weights: the forward as under torch.autocast("cuda"),
    gradients and optimizer state in the parameters' fp32 (`shapeprof.mixed_precision`).
    """

    optimizer: Any = "adamw"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    loss_fn: Callable[..., torch.Tensor] | None = None
    targets: tuple = ()
    checkpoint: str | tuple[str, ...] | list[str] | None = None
    autocast: torch.dtype | str | None = None


def as_train(model: nn.Module, train: Any) -> Train:
    """`train=` as analyze and profile take it (True or a Train) as a Train, refused before any work: TypeError
    for anything else, ValueError (one line) where no training step can be (see backward.refuse_untrainable)."""
    from .backward import refuse_untrainable
    if train is True:
        train = Train()
    if not isinstance(train, Train):
        raise TypeError(f"train= takes True or a shapeprof.Train(...), not {type(train).__name__}")
    refuse_untrainable(model)
    return train


@dataclass(frozen=True)
class Phase:
    """What one phase of the step costs on the spec (predicted: each op its own kernel, at the roofline)."""

    flops: int
    bytes_read: int
    bytes_written: int
    predicted_seconds: float

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass(frozen=True)
class BlockTrade:
    """What checkpointing one block would trade in the step as priced: bytes no longer kept for backward, for
    FLOPs and predicted seconds of its forward run again in backward."""

    path: str
    saves_bytes: int
    recompute_flops: int
    recompute_seconds: float


@dataclass(frozen=True)
class TrainingSummary:
    """The training step as a Report keeps it (`Report.training`; JSON round trip): phases, memory, MFU, GPUs."""

    optimizer: str                # "AdamW (foreach)"
    loss: str                     # where the loss came from: "model .loss", "output[1]", "loss_fn", "output.sum()"
    phases: dict[str, Phase]      # forward, backward, optimizer
    memory: dict[str, int]        # weights, gradients, optimizer_state, activations, peak
    model_flops: int
    hardware_flops: int
    peak_flops: float
    ddp_gpus: int | None          # the smallest N that fits (None: none does), and why, per strategy
    ddp: str
    fsdp_gpus: int | None
    fsdp: str
    notes: tuple[str, ...] = ()
    peak_at: str = ""             # where the peak falls: "backward in 'h.0.mlp' (aten.mm)", "optimizer step"
    checkpointed: tuple[str, ...] = ()     # the blocks priced under activation checkpointing
    blocks: tuple[BlockTrade, ...] = ()    # per block not checkpointed: what checkpointing it would trade

    @property
    def seconds(self) -> float:
        return sum(p.predicted_seconds for p in self.phases.values())

    @property
    def mfu(self) -> float:
        return self.model_flops / self.seconds / self.peak_flops if self.seconds else 0.0

    @property
    def hfu(self) -> float:
        return self.hardware_flops / self.seconds / self.peak_flops if self.seconds else 0.0


@dataclass(frozen=True)
class TrainStep:
    """A training step on `spec`: `phases` forward / backward / optimizer, `memory` in bytes, MFU and HFU.

    memory: weights (every parameter), gradients (the trainable ones'), optimizer_state (what the optimizer holds
    after a step), activations (what autograd keeps for backward, each storage once; under checkpointing, the
    checkpointed blocks' inputs instead of their insides), and peak: the most one GPU holds at once over the
    step, `peak_at` saying where. The peak follows every storage of forward and backward on meta
    (`shapeprof.step_memory`: the activations, the gradients as backward makes them, each op's temporaries, the
    output the loop holds) on top of the weights, inputs and optimizer state, and the optimizer step's own
    temporaries on top of the gradients; it is that of a steady-state step with zero_grad(set_to_none=True),
    torch's default (with set_to_none=False the previous gradients are alive through forward too).
    """

    model: str
    spec: str
    dtype: str | None
    passes: TrainingPasses
    optimizer: OptimizerStepCost
    model_flops: int              # forward + backward of the model as written (no recomputation)
    hardware_flops: int           # forward + backward as the kernels compute them
    peak_flops: float             # the spec's matmul peak in the step's dtype
    memory: dict[str, int]        # weights, gradients, optimizer_state, activations, peak (see above)
    peak_at: str
    largest_unit_bytes: int       # FSDP: parameters of the largest unit (a block, or what the root keeps)
    ddp: FitResult
    fsdp: FitResult
    notes: tuple[str, ...] = ()

    @property
    def phases(self) -> dict[str, Phase]:
        p, o = self.passes, self.optimizer
        return {"forward": Phase(p.forward.flops, p.forward.bytes_read, p.forward.bytes_written, p.forward.seconds),
                "backward": Phase(p.backward.flops, p.backward.bytes_read, p.backward.bytes_written,
                                  p.backward.seconds),
                "optimizer": Phase(o.flops, o.bytes_read, o.bytes_written, o.seconds)}

    @property
    def seconds(self) -> float:
        """Predicted time of the whole step (the phases one after the other)."""
        return self.summary().seconds

    @property
    def mfu(self) -> float:
        return self.summary().mfu

    @property
    def hfu(self) -> float:
        return self.summary().hfu

    def summary(self) -> TrainingSummary:
        return TrainingSummary(f"{self.optimizer.optimizer} ({self.optimizer.implementation})",
                               self.passes.loss_source, self.phases, dict(self.memory), self.model_flops,
                               self.hardware_flops, self.peak_flops, self.ddp.gpus, self.ddp.reason,
                               self.fsdp.gpus, self.fsdp.reason, self.notes, self.peak_at,
                               self.passes.checkpointed,
                               tuple(BlockTrade(b.path, b.saves_bytes, b.recompute_flops, b.recompute_seconds)
                                     for b in self.passes.blocks))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "spec": self.spec, "dtype": self.dtype,
                "phases": {k: {**dataclasses.asdict(v), "bytes": v.bytes} for k, v in self.phases.items()},
                "seconds": self.seconds, "model_flops": self.model_flops, "hardware_flops": self.hardware_flops,
                "peak_flops": self.peak_flops, "mfu": self.mfu, "hfu": self.hfu, "memory": self.memory,
                "peak_at": self.peak_at,
                "largest_unit_bytes": self.largest_unit_bytes, "ddp": self.ddp.to_dict(),
                "fsdp": self.fsdp.to_dict(), "passes": self.passes.to_dict(),
                "optimizer": self.optimizer.to_dict(), "notes": list(self.notes)}

    def __str__(self) -> str:
        lines = [f"training step of {self.model} on {self.spec}" + (f" as {self.dtype}" if self.dtype else "") +
                 f": predicted {fmt_seconds(self.seconds)}, MFU {self.mfu:.1%}, HFU {self.hfu:.1%}"]
        for name, ph in self.phases.items():
            lines.append(f"  {name:<9} {fmt_flops(ph.flops):>12} {fmt_bytes(ph.bytes):>10} "
                         f"{fmt_seconds(ph.predicted_seconds):>10} ({ph.predicted_seconds / self.seconds:.0%})")
        lines.append("  memory: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.memory.items()) +
                     f" (the peak in {self.peak_at})")
        for name, fit in (("DDP", self.ddp), ("FSDP", self.fsdp)):
            lines.append(f"  {name}: {fit.reason}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def train_step(model: nn.Module, *args: Any, optimizer: str | type[torch.optim.Optimizer] = "adamw",
               optimizer_kwargs: dict[str, Any] | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
               targets: tuple = (), spec: str | Any = None, dtype: torch.dtype | str | None = None,
               checkpoint: str | tuple[str, ...] | list[str] | None = None,
               autocast: torch.dtype | str | None = None, model_kwargs: dict[str, Any] | None = None,
               **kwargs: Any) -> TrainStep:
    """Price one training step of `model` on `args`: forward, backward, the optimizer's update.

    Args:
        model, *args, **kwargs, loss_fn, targets, model_kwargs: as `shapeprof.backward.capture_backward` takes
            them (model_kwargs: the model's keyword inputs named like an argument here, e.g. targets=).
        optimizer: torch.optim's SGD, Adam or AdamW, by class or name (default AdamW), with `optimizer_kwargs`
            (foreach, fused, momentum, weight_decay ...) as `shapeprof.optimizer_step.optimizer_step` takes them.
        spec: the device (default A100-80GB SXM). dtype: parameters, activations and optimizer state in this dtype
            (torch.optim keeps its state in the parameters' dtype).
        checkpoint: "blocks" or module paths to run under activation checkpointing (see capture_backward).
        autocast: "bf16" / "fp16" (or the torch.dtype): mixed precision with the parameters, gradients and
            optimizer state in the model's own dtype (fp32 master weights), the forward as autocast runs it; MFU
            and HFU against that dtype's matmul peak.
    """
    from .backward import capture_backward
    from .distributed import smallest_fit
    from .optimizer_step import optimizer_step, step_temporaries
    device = get_spec(spec)
    precision = resolve_precision(dtype, False)
    passes = capture_backward(model, *args, loss_fn=loss_fn, targets=targets, spec=device, dtype=dtype,
                              checkpoint=checkpoint, autocast=autocast, model_kwargs=model_kwargs, **kwargs)
    opt = optimizer_step(optimizer, model, spec=device, param_dtype=precision.dtype, **(optimizer_kwargs or {}))
    temporaries = step_temporaries(optimizer, model, precision.dtype, **(optimizer_kwargs or {}))
    notes = list(passes.notes) + list(opt.notes)
    element = precision.dtype.itemsize if precision.dtype is not None else _first_trainable(model).element_size()
    # every parameter, frozen ones too; parameters() yields a tied one once
    weights = sum(p.numel() * (element if p.is_floating_point() and precision.dtype is not None
                               else p.element_size()) for p in model.parameters())
    grads = opt.parameters * element
    unit = _largest_unit(model, weights)
    memory = {"weights": weights, "gradients": grads, "optimizer_state": opt.state_bytes,
              "activations": passes.saved_activation_bytes}
    base = weights + opt.state_bytes + passes.input_bytes    # alive all through the step
    in_passes, in_step = base + passes.peak_bytes, base + passes.end_bytes + temporaries
    memory["peak"] = max(in_passes, in_step)
    peak_at = str(passes.peak_at) if in_passes >= in_step else "optimizer step"
    figures = dict(parameter_bytes=weights, gradient_bytes=grads, optimizer_state_bytes=opt.state_bytes,
                   activation_bytes=passes.saved_activation_bytes, spec=device, param_dtype_bytes=element,
                   largest_unit_bytes=unit)
    if precision.dtype not in (None, torch.float32):
        notes.append(f"parameters, gradients and optimizer state are all {precision.name}, as torch.optim keeps "
                     f"them; for mixed precision with fp32 master weights, price it with autocast=\"bf16\"")
    compute = resolve_precision(autocast).dtype if autocast is not None else None
    hardware = passes.forward.flops + passes.backward.flops
    step = TrainStep(model=type(model).__name__, spec=device.name, dtype=precision.name if precision.dtype else None,
                     passes=passes, optimizer=opt,
                     model_flops=hardware - _recomputed(passes) - passes.recompute_flops,
                     hardware_flops=hardware,
                     peak_flops=device.peak_for(compute or precision.dtype or _first_trainable(model).dtype,
                                                matmul=True),
                     memory=memory, peak_at=peak_at, largest_unit_bytes=unit,
                     ddp=smallest_fit(strategy="ddp", **figures),
                     fsdp=smallest_fit(strategy="fsdp", **figures), notes=tuple(notes))
    return step


def _recomputed(passes: TrainingPasses) -> int:
    """FLOPs a fused attention backward recomputes: its products beyond twice the forward's (see the module
    docstring). Each fused forward has its backward in a training step, so the totals pair up (a checkpointed
    block's attention forward, run again in backward, is in `passes.recompute_flops`)."""
    forward = sum(o.flops for o in passes.ops if o.phase == "forward" and "attention" in o.op)
    backward = sum(o.flops for o in passes.ops if o.phase == "backward" and "attention_backward" in o.op)
    return max(0, backward - 2 * forward) if backward else 0


def _first_trainable(model: nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters() if p.requires_grad)


def _largest_unit(model: nn.Module, weights: int) -> int:
    """FSDP's largest unit as it is usually wrapped: one block of the longest ModuleList (a transformer's layers),
    or what the root keeps besides them (embeddings, head), whichever is bigger; a model without such a list is
    one unit."""
    from .backward import blocks_of
    blocks = blocks_of(model)
    if not blocks:
        return weights
    def nbytes(m: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())
    per_block = [nbytes(model.get_submodule(b)) for b in blocks]
    as_is = nbytes(model)
    largest = max(max(per_block), as_is - sum(per_block))      # a block, or the root's own parameters
    return int(largest * weights / max(1, as_is))               # in the step's dtype, as `weights` is
