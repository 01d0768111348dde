"""What one `optimizer.step()` costs on a GPU, priced from the ATen ops torch.optim really runs.

A step is memory-bound: it reads every parameter, its gradient and the optimizer state, and writes the
parameter and the state back. How many times it does so depends on the implementation torch.optim picks:
the for-loop launches one small op per tensor per elementwise step, foreach launches one `aten._foreach_*`
op per step over the whole tensor list (same passes over memory, far fewer kernels), and fused runs the
whole update as one kernel (`aten._fused_adamw_` ...): a single pass. The step runs on meta copies of the
parameters under an OpRecorder; every recorded op is priced by `shapeprof.costs` and held against the
device's roofline, and the result sets the real traffic beside the single-pass minimum.

    >>> import torch
    >>> model = torch.nn.Linear(1024, 1024)              # 1,049,600 parameters in 2 tensors
    >>> for impl in ("for-loop", "foreach", "fused"):
    ...     c = optimizer_step("adamw", model, foreach=impl == "foreach", fused=impl == "fused")
    ...     print(c.implementation, c.kernels, c.bytes_read // c.parameters, c.bytes_written // c.parameters)
    for-loop 16 48 32
    foreach 8 48 32
    fused 2 16 12

What runs on meta in torch 2.13: the for-loop and foreach paths as they are. Fused Adam/AdamW run too, but
torch's fused device check rejects the meta device when it creates the state, so the state is made by a
for-loop twin's first step and loaded with `load_state_dict` (which places `step` on the device, as fused
expects). Fused SGD passes the check once the optimizer's own "checked" flag is set, but torch has no meta
kernel for `aten._fused_sgd_`: the call is recorded with its arguments and not run (on meta an in-place
update changes nothing).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from .costs import OpCost
from .hardware import DeviceSpec, get_spec
from .records import OpRecorder
from .roofline import node_time, op_time, record_time

__all__ = ["IdealStep", "OptimizerStepCost", "StepOp", "optimizer_step"]

_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}

# Fused kernels torch has no meta kernel for. They update their lists in place and return nothing, so on
# meta, where there is no data to update, recording the call without running it loses nothing.
_RECORD_WITHOUT_RUNNING = {torch.ops.aten._fused_sgd_} if hasattr(torch.ops.aten, "_fused_sgd_") else set()


@dataclass(frozen=True)
class StepOp:
    """One ATen op of the step, summed over its calls."""

    count: int
    flops: int
    bytes_read: int
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class IdealStep:
    """The single-pass minimum: read each parameter, its gradient and its state once, write back what changes.

    Adam/AdamW read param, grad, exp_avg, exp_avg_sq (+ max_exp_avg_sq with amsgrad) and write param and that
    state; SGD with momentum reads param, grad, buffer and writes param, buffer; plain SGD reads param and grad
    and writes param. FLOPs are the step's own (the math is the same in one pass or in many).
    """

    bytes_read: int
    bytes_written: int
    flops: int
    seconds: float


@dataclass(frozen=True)
class OptimizerStepCost:
    """What one steady-state `optimizer.step()` costs on `spec`.

    Only ops on the device are priced and counted as kernels. Ops on the host (`host_ops`: the CPU-held
    `step` counters of the for-loop and foreach paths, torch's `.item()` on them) are left out: on a CUDA
    device they run on the CPU too. `state_bytes` counts what `optimizer.state` holds after the step, each
    storage once, host-held step counters included.
    """

    optimizer: str            # "AdamW"
    implementation: str       # "for-loop", "foreach" or "fused": what was recorded and priced
    spec: str
    parameters: int           # elements
    tensors: int
    bytes_read: int
    bytes_written: int
    flops: int
    kernels: int              # device ops that compute or move bytes (a foreach op counts once)
    seconds: float            # predicted: the sum of each kernel's roofline time
    state_bytes: int
    ops: dict[str, StepOp]    # "aten._foreach_mul_" -> its calls, summed
    ideal: IdealStep
    host_ops: int
    uncovered: tuple[str, ...] = ()   # device ops with no cost formula (their bytes are counted, FLOPs are not)
    notes: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def passes(self) -> float:
        """Bytes moved over the single pass's bytes: 1.0 is as good as a step can be."""
        ideal = self.ideal.bytes_read + self.ideal.bytes_written
        return self.bytes / ideal if ideal else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for json.dumps (derived figures included)."""
        return {**dataclasses.asdict(self), "bytes": self.bytes, "passes": self.passes}


def optimizer_step(optimizer_cls_or_name: type[torch.optim.Optimizer] | str = "adamw",
                   params_or_model: nn.Module | Iterable[torch.Tensor] | Iterable[dict] | None = None, *,
                   spec: str | DeviceSpec | None = None, param_dtype: torch.dtype | None = None,
                   state_dtype: torch.dtype | None = None, **optimizer_kwargs: Any) -> OptimizerStepCost:
    """Price one steady-state step of a torch.optim SGD, Adam or AdamW over these parameters.

        >>> import torch
        >>> c = optimizer_step("sgd", torch.nn.Linear(8, 4), momentum=0.9)     # 36 parameters, fp32
        >>> c.implementation, c.bytes_read, c.bytes_written, c.ideal.bytes_read
        ('foreach', 720, 432, 432)

    Args:
        optimizer_cls_or_name: torch.optim.SGD, Adam or AdamW (or a subclass), or "sgd", "adam", "adamw";
            `optimizer_step(model)` prices AdamW.
        params_or_model: an nn.Module (its parameters with requires_grad), tensors, or param-group dicts as
            torch.optim takes them. Only their shapes, strides and dtypes are read: the step runs on meta copies
            with meta gradients, and nothing of the caller's (tensors, .grad, optimizers) changes.
        spec: the device (a name, a spec file or a DeviceSpec); default A100-80GB SXM.
        param_dtype: price floating parameters (and their gradients) in this dtype; default: their own.
        state_dtype: the optimizer state's dtype. torch.optim keeps state in each parameter's dtype and runs
            nothing else (its for-loop and foreach ops reject mixed dtypes, CUDA's fused kernels require one
            dtype), so any other dtype raises ValueError.
        **optimizer_kwargs: passed to the optimizer (lr, momentum, weight_decay, amsgrad, maximize, foreach,
            fused ...). With foreach and fused both left None, the step is priced as torch runs it on CUDA
            parameters: foreach (on meta tensors torch would fall back to the for-loop); `notes` says so.

    Returns:
        An OptimizerStepCost.
    Raises:
        ValueError: an unknown optimizer, no trainable parameters, or a state_dtype torch.optim cannot run.
        RuntimeError: the chosen implementation cannot run on meta tensors (one line, torch's reason).
    """
    if params_or_model is None and not isinstance(optimizer_cls_or_name, (str, type)):
        optimizer_cls_or_name, params_or_model = "adamw", optimizer_cls_or_name   # optimizer_step(model)
    if params_or_model is None:
        raise ValueError("no parameters given: optimizer_step(optimizer, model_or_params)")
    cls = _optimizer_class(optimizer_cls_or_name)
    groups = _meta_groups(params_or_model, param_dtype)
    params = [p for g in groups for p in g["params"]]
    if state_dtype is not None and any(p.dtype != state_dtype for p in params):
        raise ValueError(f"state_dtype={state_dtype} differs from the parameters' dtype: torch.optim keeps "
                         f"{cls.__name__} state in each parameter's dtype and cannot run another")
    impl, notes = _implementation(optimizer_kwargs)
    kwargs = {**optimizer_kwargs, "foreach": impl == "foreach", "fused": impl == "fused"}
    device = get_spec(spec)

    opt = cls(_fresh(groups), **kwargs)
    try:
        if impl == "fused":
            notes += _prepare_fused(opt, cls, groups, optimizer_kwargs)
        recorder = _steady_step(opt)
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"torch {torch.__version__} cannot run a {impl} {cls.__name__} step on meta tensors: "
                           f"{reason}") from e
    notes += recorder.notes
    return _price(cls.__name__, impl, opt, params, recorder, device, tuple(notes))


# ---------------------------------------------------------------------------------------------
# Building the optimizer on meta copies


def _optimizer_class(which) -> type[torch.optim.Optimizer]:
    if isinstance(which, str):
        cls = _OPTIMIZERS.get(which.lower())
        if cls is None:
            raise ValueError(f"unknown optimizer {which!r}: use one of {sorted(_OPTIMIZERS)} or a torch.optim class")
        return cls
    if isinstance(which, type) and issubclass(which, (torch.optim.SGD, torch.optim.Adam)):
        return which
    raise ValueError(f"unsupported optimizer {which!r}: torch.optim.SGD, Adam, AdamW (or a subclass) or "
                     f"one of {sorted(_OPTIMIZERS)}")


def _meta_groups(params_or_model, dtype: torch.dtype | None) -> list[dict]:
    """Param groups over meta copies of the trainable parameters, each with a meta gradient."""
    if isinstance(params_or_model, nn.Module):
        items: list = list(params_or_model.parameters())
        what = type(params_or_model).__name__
    else:
        items = list(params_or_model)
        what = "the parameters given"
    raw = items if items and isinstance(items[0], dict) else [{"params": items}]
    seen: set[int] = set()
    groups = []
    for group in raw:
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        copies = []
        for p in tensors:
            if not p.requires_grad or id(p) in seen:   # frozen ones get no grad; a shared one is stepped once
                continue
            seen.add(id(p))
            copies.append(_meta_copy(p, dtype))
        if copies:
            groups.append({**group, "params": copies})
    if not groups:
        raise ValueError(f"{what}: no trainable parameters (none with requires_grad=True)")
    return groups


def _meta_copy(p: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # only shape, strides and dtype are read from p; a gradient has its parameter's layout and dtype
    d = dtype if dtype is not None and p.is_floating_point() else p.dtype
    copy = torch.empty_strided(tuple(p.shape), tuple(p.stride()), dtype=d, device="meta", requires_grad=True)
    copy.grad = torch.empty_like(copy)
    return copy


def _fresh(groups: list[dict]) -> list[dict]:
    # torch.optim adopts (and edits) the dicts it is given: each optimizer gets its own, over the same tensors
    return [{**g, "params": list(g["params"])} for g in groups]


def _implementation(kwargs: dict) -> tuple[str, list[str]]:
    """Which implementation to record, and a note when torch's default chose it."""
    foreach, fused = kwargs.get("foreach"), kwargs.get("fused")
    if foreach and fused:
        raise ValueError("`fused` and `foreach` cannot be True together (torch.optim refuses them too)")
    if fused:
        return "fused", []
    if foreach:
        return "foreach", []
    if foreach is None and fused is None:
        # torch.optim's own rule (adam() and sgd() in torch/optim): with neither set it picks foreach for
        # parameters on a device with foreach kernels (CUDA), unless differentiable, or (Adam) lr is a Tensor
        # without capturable. On meta tensors the same rule falls back to the for-loop.
        if kwargs.get("differentiable") or (isinstance(kwargs.get("lr"), torch.Tensor)
                                            and not kwargs.get("capturable")):
            return "for-loop", ["foreach and fused unset: torch picks the for-loop here, on CUDA too"]
        return "foreach", ["foreach and fused unset: priced foreach, what torch picks for CUDA parameters "
                           "(on meta tensors it would run the for-loop)"]
    return "for-loop", []   # one of them False: torch then never defaults to foreach


def _prepare_fused(opt, cls, groups: list[dict], kwargs: dict) -> list[str]:
    """Get a fused optimizer past torch's device check, which accepts no meta tensors."""
    if issubclass(cls, torch.optim.SGD):
        # SGD checks on each step until this flag (set by the check itself once it passed) is False
        opt._need_device_dtype_check_for_fused = False
        return []
    # Adam checks when it creates a parameter's state: create it with a for-loop twin's first step, and load
    # it keeping this optimizer's own groups; load_state_dict places `step` on the device as fused keeps it
    twin = cls(_fresh(groups), **{**kwargs, "foreach": False, "fused": False})
    twin.step()
    state = twin.state_dict()
    state["param_groups"] = opt.state_dict()["param_groups"]
    opt.load_state_dict(state)
    return ["fused on meta: the state was created by a for-loop twin's first step and loaded with "
            "load_state_dict (torch's fused device check accepts no meta tensors)"]


class _StepRecorder(OpRecorder):
    """Records a step's ATen ops, and for each whether it ran on the host (only CPU tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_host: list[bool] = []
        self.notes: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except NotImplementedError:
            if func.overloadpacket not in _RECORD_WITHOUT_RUNNING:
                raise
            self.record(func, args, kwargs or {}, None)
            note = f"torch has no meta kernel for {func.overloadpacket}: its calls were recorded, not run"
            if note not in self.notes:
                self.notes.append(note)
            return None

    def record(self, op, args, kwargs, out) -> None:
        if op.namespace == "profiler":
            return   # the record_function range torch.optim opens around step(): no work
        super().record(op, args, kwargs, out)
        devices = {t.device.type for t in _tensors((args, kwargs, out))}
        self.on_host.append(bool(devices) and "meta" not in devices)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _steady_step(opt: torch.optim.Optimizer) -> _StepRecorder:
    """Record one steady-state step: if the first step created the state (Adam's zeros_like moments, SGD's
    momentum buffers start as a copy of the grad), it was a warm-up, and the next one is recorded."""
    was_empty = not opt.state
    with _StepRecorder() as recorder:
        opt.step()
    if was_empty and opt.state:
        with _StepRecorder() as recorder:
            opt.step()
    return recorder


# ---------------------------------------------------------------------------------------------
# Pricing


def _price(name: str, impl: str, opt, params: list[torch.Tensor], recorder: _StepRecorder, device: DeviceSpec,
           notes: tuple[str, ...]) -> OptimizerStepCost:
    timed, uncovered = [], []
    by_op: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0, 0.0])
    kernels = host_ops = 0
    for rec, on_host in zip(recorder.records, recorder.on_host):
        if on_host:
            host_ops += 1
            continue
        cost, t = record_time(rec, device)
        timed.append((cost, t))
        if cost.flops or cost.bytes or not cost.covered:
            kernels += 1
            row = by_op[rec.name]
            row[0] += 1
            row[1] += cost.flops
            row[2] += cost.bytes_read
            row[3] += cost.bytes_written
            row[4] += t.seconds
        if not cost.covered and rec.name not in uncovered:
            uncovered.append(rec.name)
    flops = sum(c.flops for c, _ in timed)
    ideal_read, ideal_written = _single_pass(opt)
    ideal_cost = OpCost(flops, ideal_read, ideal_written)
    ideal = IdealStep(ideal_read, ideal_written, flops, op_time(ideal_cost, params[0].dtype, device).seconds)
    return OptimizerStepCost(
        optimizer=name, implementation=impl, spec=device.name,
        parameters=sum(p.numel() for p in params), tensors=len(params),
        bytes_read=sum(c.bytes_read for c, _ in timed), bytes_written=sum(c.bytes_written for c, _ in timed),
        flops=flops, kernels=kernels, seconds=node_time(timed, device).seconds,
        state_bytes=_state_bytes(opt), ops={k: StepOp(*v) for k, v in by_op.items()}, ideal=ideal,
        host_ops=host_ops, uncovered=tuple(uncovered), notes=notes)


def _single_pass(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(read, written) of the single pass, from each group's settings (see IdealStep)."""
    read = written = 0
    for group in opt.param_groups:
        if isinstance(opt, torch.optim.Adam):
            state = 3 if group["amsgrad"] else 2          # exp_avg, exp_avg_sq (, max_exp_avg_sq)
        else:
            state = 1 if group["momentum"] != 0 else 0    # momentum_buffer
        for p in group["params"]:
            size = p.numel() * p.element_size()           # the state has its parameter's dtype
            read += size * (2 + state)                    # param, grad, state
            written += size * (1 + state)                 # param, state
    return read, written


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    storages: dict[int, int] = {}
    for per_param in opt.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage._cdata] = storage.nbytes()   # one entry per storage, however many views
    return sum(storages.values())
