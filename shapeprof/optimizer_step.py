"""What one `optimizer.step()` costs on a GPU, priced from the ATen ops torch.optim really runs.

A step is memory-bound: it reads every parameter, its gradient and the optimizer state, and writes the
parameter and the state back. How many times it does so depends on the implementation torch.optim picks:
the for-loop launches one small op per tensor per elementwise step, foreach launches one `aten._foreach_*`
op per step over the whole tensor list (same passes over memory, far fewer kernels), and fused runs the
whole update as one kernel (`aten._fused_adamw_` ...): a single pass. The step runs on meta copies of the
parameters under an OpRecorder; every recorded op is priced by `shapeprof.costs` and held against the
device's roofline, and the result sets the real traffic beside the single-pass minimum. Parameters that
share a group, shape, strides and dtype take the same ops, so the step runs on one of each and every op is
priced for all the parameters it stands for (a transformer's hundreds of tensors have a handful of shapes).

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
import inspect
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from .costs import OpCost, cost_of
from .hardware import DeviceSpec, get_spec
from .records import OpRecord, OpRecorder, TensorMeta, tensors_in
from .roofline import compute_dtype, node_time, op_time, record_time

__all__ = ["IdealStep", "OptimizerStepCost", "StepOp", "optimizer_step", "step_temporaries"]

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
                   state_dtype: torch.dtype | None = None, _dedupe: bool = True,
                   **optimizer_kwargs: Any) -> OptimizerStepCost:
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

    The step runs on one representative per distinct (param group, shape, strides, dtype), and each recorded
    op is priced for every parameter it stands for (`_dedupe_step`): the figures are those of the step over
    every parameter, which `_dedupe=False` (for tests) runs instead.
    """
    if params_or_model is None and not isinstance(optimizer_cls_or_name, (str, type)):
        optimizer_cls_or_name, params_or_model = "adamw", optimizer_cls_or_name   # optimizer_step(model)
    if params_or_model is None:
        raise ValueError("no parameters given: optimizer_step(optimizer, model_or_params)")
    cls = _optimizer_class(optimizer_cls_or_name)
    dedupe = _dedupe and _steps_as_torch(cls)
    groups = _meta_groups(params_or_model, param_dtype, grads=not dedupe)   # (the representatives' get theirs)
    params = [p for g in groups for p in g["params"]]
    if state_dtype is not None and any(p.dtype != state_dtype for p in params):
        raise ValueError(f"state_dtype={state_dtype} differs from the parameters' dtype: torch.optim keeps "
                         f"{cls.__name__} state in each parameter's dtype and cannot run another")
    impl, notes = _implementation(optimizer_kwargs)
    kwargs = {**optimizer_kwargs, "foreach": impl == "foreach", "fused": impl == "fused"}
    device = get_spec(spec)

    if dedupe:
        cost = _dedupe_step(cls, impl, groups, params, kwargs, optimizer_kwargs, device, notes)
        if cost is not None:
            return cost
        _give_grads(params)
    opt, recorder, notes = _record(cls, impl, groups, kwargs, optimizer_kwargs, notes)
    return _price(cls.__name__, impl, params, _entries(recorder), device, tuple(notes), _single_pass(opt),
                  _state_bytes(opt))


def step_temporaries(optimizer_cls_or_name: type[torch.optim.Optimizer] | str, params_or_model: nn.Module,
                     param_dtype: torch.dtype | None = None, _dedupe: bool = True, **optimizer_kwargs: Any) -> int:
    """The most bytes a steady-state step holds at once beyond the parameters, gradients and state: the
    temporaries its ops make (foreach's out-of-place list ops take a copy of every tensor in the group at
    once; the for-loop's, one parameter's at a time). Fused kernels update in place and make none: 0.

    Measured by following the step's storages on meta (`shapeprof.step_memory.LiveBytes`). The for-loop steps
    every parameter (what is alive at once depends on their order). Foreach steps each param group on its own
    (torch.optim's groups run one after the other, each op over the group's whole list, its temporaries gone when
    the group is done) over one representative per (shape, strides, dtype), each of its list entries counted
    for the parameters it stands for; tests/test_step_memory.py holds this equal to stepping every parameter.
    """
    cls = _optimizer_class(optimizer_cls_or_name)
    impl, _ = _implementation(optimizer_kwargs)
    if impl == "fused":
        return 0
    groups = _meta_groups(params_or_model, param_dtype)
    kwargs = {**optimizer_kwargs, "foreach": impl == "foreach", "fused": False}
    try:
        if impl == "for-loop" or not _dedupe or not _steps_as_torch(cls):
            return _watched_step(cls, groups, kwargs)
        return max(_watched_step(cls, reps, kwargs, weight)
                   for reps, weight in (_representatives(group) for group in groups))
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        raise RuntimeError(f"torch {torch.__version__} cannot run a {impl} {cls.__name__} step on meta tensors: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e


def _representatives(group: dict) -> tuple[list[dict], Any]:
    """A param group over the first parameter of each (shape, strides, dtype), and a weight for LiveBytes: a
    tensor shaped like a representative counts for the parameters it stands for; a 0-dim one (a per-parameter
    scalar of a foreach list, one per entry) for the group's parameters over its representatives."""
    counts: dict[tuple, int] = defaultdict(int)
    firsts: dict[tuple, torch.Tensor] = {}
    for p in group["params"]:
        key = _layout(p)
        counts[key] += 1
        firsts.setdefault(key, p)
    per_scalar = len(group["params"]) / len(firsts)

    def weight(t: torch.Tensor) -> float:
        if t.dim() == 0:
            return per_scalar
        return counts.get(_layout(t), 1)
    return [{**group, "params": list(firsts.values())}], weight


def _layout(t: torch.Tensor) -> tuple:
    """What makes two parameters of a group step alike: shape, strides, dtype (one representative stands for all)."""
    return tuple(t.shape), tuple(t.stride()), t.dtype


def _watched_step(cls, groups: list[dict], kwargs: dict, weight=None) -> int:
    """The most bytes alive at once in a steady-state step beyond the parameters, gradients and state."""
    from .step_memory import LiveBytes
    opt = cls(_fresh(groups), **kwargs)
    opt.step()   # the first step makes the state; the steady one is watched
    params = [p for g in opt.param_groups for p in g["params"]]
    live = LiveBytes(known=[*params, *(p.grad for p in params), *tensors_in(list(opt.state.values()))],
                     weight=weight)
    with live.watching():
        opt.step()
    live.close()
    return int(round(live.peak))


def _record(cls, impl: str, groups: list[dict], kwargs: dict, optimizer_kwargs: dict, notes: list[str],
            index: dict[int, int] | None = None) -> tuple[torch.optim.Optimizer, "_StepRecorder", list[str]]:
    """Build the optimizer over `groups` and record its steady-state step (`index`: see `_steady_step`)."""
    opt = cls(_fresh(groups), **kwargs)
    try:
        if impl == "fused":
            notes = notes + _prepare_fused(opt, cls, groups, optimizer_kwargs)
        recorder = _steady_step(opt, index)
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"torch {torch.__version__} cannot run a {impl} {cls.__name__} step on meta tensors: "
                           f"{reason}") from e
    return opt, recorder, notes + recorder.notes


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


def _meta_groups(params_or_model, dtype: torch.dtype | None, grads: bool = True) -> list[dict]:
    """Param groups over meta copies of the trainable parameters, each with a meta gradient (with `grads`;
    else none yet: see `_give_grads`)."""
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
            copies.append(_meta_copy(p, dtype, grads))
        if copies:
            groups.append({**group, "params": copies})
    if not groups:
        raise ValueError(f"{what}: no trainable parameters (none with requires_grad=True)")
    return groups


def _meta_copy(p: torch.Tensor, dtype: torch.dtype | None, grad: bool = True) -> torch.Tensor:
    # only shape, strides and dtype are read from p; a gradient has its parameter's layout and dtype
    d = dtype if dtype is not None and p.is_floating_point() else p.dtype
    copy = torch.empty_strided(tuple(p.shape), tuple(p.stride()), dtype=d, device="meta", requires_grad=True)
    if grad:
        copy.grad = torch.empty_like(copy)
    return copy


def _give_grads(copies: Iterable[torch.Tensor]) -> None:
    for copy in copies:
        if copy.grad is None:
            copy.grad = torch.empty_like(copy)


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
    """Records a step's ATen ops, and for each whether it ran on the host (only CPU tensors).

    With `owners` (id of a tensor -> (the index of the representative parameter it belongs to, the tensor, kept
    alive so that its id stays its own)), it also notes whom each op stands for in `layout` (see `_attribute`),
    and extends `owners` to what the op returns.
    """

    def __init__(self, owners: dict[int, tuple[int, torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.on_host: list[bool] = []
        self.notes: list[str] = []
        self.owners = owners
        self.layout: list[tuple[str, Any] | None] = []

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
        devices = {t.device.type for t in tensors_in((args, kwargs, out))}
        self.on_host.append(bool(devices) and "meta" not in devices)
        if self.owners is not None:
            self.layout.append(self._attribute(args, kwargs, out))

    def _attribute(self, args, kwargs, out) -> tuple[str, Any] | None:
        """Whom one op stands for: ("list", (representative of each entry, ...)) for an op over tensor lists
        (every list entry i of one representative's tensors; every other tensor a 0-dim one of none), ("one", k)
        for an op on tensors of representative k only (and tensors of none), ("all", None) for one on tensors of
        none (a constant, lr as a tensor). None for any other op: the step does not decompose."""
        owners = self.owners
        values = (*args, *kwargs.values())
        if any(isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v) for v in values):
            n = next(len(v) for v in values if isinstance(v, (list, tuple)) and v)
            entries: list[int | None] = [None] * n
            for v in values:
                if isinstance(v, torch.Tensor):
                    if id(v) in owners or v.dim() != 0:
                        return None
                elif isinstance(v, (list, tuple)) and v:
                    if len(v) != n:
                        return None
                    for i, x in enumerate(v):
                        if isinstance(x, torch.Tensor):
                            owner = owners.get(id(x))
                            if owner is None or entries[i] not in (None, owner[0]):
                                return None
                            entries[i] = owner[0]
                        elif isinstance(x, (list, tuple, dict)):
                            return None
            if None in entries or len(set(entries)) != n:
                return None
            returned = list(tensors_in(out))
            if returned:
                if not (isinstance(out, (list, tuple)) and len(out) == n == len(returned)):
                    return None
                for k, t in zip(entries, out):
                    if not self._own(t, k):
                        return None
            return "list", tuple(entries)
        found = {owners[id(t)][0] for t in tensors_in((args, kwargs)) if id(t) in owners}
        if len(found) > 1:
            return None
        if not found:
            return "all", None
        k = found.pop()
        return ("one", k) if all(self._own(t, k) for t in tensors_in(out)) else None

    def _own(self, t: torch.Tensor, k: int) -> bool:
        owner = self.owners.setdefault(id(t), (k, t))
        return owner[0] == k


def _steady_step(opt: torch.optim.Optimizer, index: dict[int, int] | None = None) -> _StepRecorder:
    """Record one steady-state step: if the first step created the state (Adam's zeros_like moments, SGD's
    momentum buffers start as a copy of the grad), it was a warm-up, and the next one is recorded.
    With `index` (id of a representative parameter -> its index), the records say whom they stand for."""
    was_empty = not opt.state
    with _StepRecorder(_owners(opt, index)) as recorder:
        opt.step()
    if was_empty and opt.state:
        with _StepRecorder(_owners(opt, index)) as recorder:
            opt.step()
    return recorder


def _owners(opt: torch.optim.Optimizer, index: dict[int, int] | None) -> dict[int, tuple[int, torch.Tensor]] | None:
    """Each representative's own tensors: the parameter, its gradient and its state."""
    if index is None:
        return None
    owners: dict[int, tuple[int, torch.Tensor]] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            k = index[id(p)]
            for t in (p, p.grad, *tensors_in(opt.state.get(p, {}))):
                if isinstance(t, torch.Tensor):
                    owners.setdefault(id(t), (k, t))
    return owners


# ---------------------------------------------------------------------------------------------
# One representative per distinct parameter


def _steps_as_torch(cls) -> bool:
    """Whether cls steps as torch.optim's SGD / Adam do (a subclass that changes how may do anything)."""
    base = torch.optim.Adam if issubclass(cls, torch.optim.Adam) else torch.optim.SGD
    # (torch wraps each class's step in its profiling hook when the first instance is made: unwrap)
    return all(inspect.unwrap(getattr(cls, name)) is inspect.unwrap(getattr(base, name))
               for name in ("step", "_init_group") if hasattr(base, name))


def _dedupe_step(cls, impl: str, groups: list[dict], params: list[torch.Tensor], kwargs: dict,
                 optimizer_kwargs: dict, device: DeviceSpec, notes: list[str]) -> OptimizerStepCost | None:
    """The step over every parameter, priced from a step over one representative per distinct parameter.

    Parameters of one group with one shape, strides and dtype take the same ops (torch.optim's for-loop runs
    the same ops on each; a foreach or fused op treats each list entry alike), so the step runs on the first
    of each and every recorded op is priced as the step over all of them would have it: an op on one
    representative's tensors once per parameter it stands for (the for-loop's ops, the `.item()` of each step
    counter), an op over tensor lists once, on lists where each representative's entry appears once per
    parameter it stands for (in the parameters' order; records hold only shapes and dtypes, so repeating an
    entry runs nothing), an op on none of them once. The state is counted as every parameter's, the
    single pass over every parameter. None when there is nothing to share, the step fails or an op fits none
    of these (the caller then runs every parameter, and raises its error in its own words).
    """
    reps: list[torch.Tensor] = []
    rep_of: list[int] = []          # for each parameter, in `params` order: its representative's index
    rep_groups = []
    for group in groups:
        firsts: dict[tuple, int] = {}
        for p in group["params"]:
            key = _layout(p)
            k = firsts.get(key)
            if k is None:
                k = firsts[key] = len(reps)
                reps.append(p)
            rep_of.append(k)
        rep_groups.append({**group, "params": [reps[k] for k in firsts.values()]})
    if len(reps) == len(params):
        return None
    settings = [kwargs, *({k: v for k, v in g.items() if k != "params"} for g in groups)]
    if impl == "for-loop" and next(tensors_in(settings), None) is not None:
        return None   # a Tensor lr, beta ...: the for-loop may compute on it once per parameter
    _give_grads(reps)
    index = {id(p): k for k, p in enumerate(reps)}
    try:
        opt, recorder, notes = _record(cls, impl, rep_groups, kwargs, optimizer_kwargs, notes, index)
    except Exception:
        return None
    entries = _spread_step(recorder, rep_of)
    if entries is None:
        return None
    return _price(cls.__name__, impl, params, entries, device, tuple(notes), _single_pass(opt, groups),
                  _state_bytes(opt, index, rep_of))


def _spread_step(recorder: _StepRecorder, rep_of: list[int]) -> list[tuple[Any, bool]] | None:
    """The (record, on host) sequence of the step over every parameter, from the representatives' step.

    Consecutive ops on single representatives (a for-loop's body, a list comprehension's `.item()` calls)
    form a block, which a representative's return after another's ends. A block runs, for each parameter in
    order whose representative is in it, that representative's ops: the for-loop's order. Lists are spread
    by `_spread`."""
    entries: list[tuple[Any, bool]] = []
    block: list[tuple[int, Any, bool]] = []

    def flush() -> None:
        segments: dict[int, list] = defaultdict(list)
        for k, rec, on_host in block:
            segments[k].append((rec, on_host))
        for k in rep_of:
            if k in segments:
                entries.extend(segments[k])
        block.clear()

    last = None          # "one" or "list": the kind of the last op that was not on none of them
    interrupted = False  # an op on none of them came after ops on single representatives
    for rec, on_host, layout in zip(recorder.records, recorder.on_host, recorder.layout):
        if layout is None:
            return None
        kind, who = layout
        if kind == "one":
            if interrupted:
                return None   # it may run once per parameter (a for-loop's `-lr` of a Tensor lr): not known
            if block and block[-1][0] != who and any(k == who for k, _, _ in block):
                flush()
            block.append((who, rec, on_host))
            last = kind
            continue
        flush()
        if kind == "list":
            rec = _spread(rec, who, rep_of)
            last, interrupted = kind, False
        else:
            interrupted = interrupted or last == "one"
        entries.append((rec, on_host))
    flush()
    return entries


def _spread(rec: OpRecord, who: tuple[int, ...], rep_of: list[int]) -> "OpRecord | _Spread":
    """`rec`, an op over lists whose entry i is representative who[i]'s, as the step over every parameter
    those stand for runs it: over their lists, in the parameters' order."""
    position = {k: i for i, k in enumerate(who)}
    plan: list[tuple[int, int]] = []
    copies: dict[int, int] = defaultdict(int)
    for k in rep_of:
        i = position.get(k)
        if i is not None:
            plan.append((i, copies[k]))
            copies[k] += 1
    return rec if len(plan) == len(who) else _Spread(rec, tuple(plan))


@dataclass(frozen=True)
class _Spread:
    """An op over lists of every parameter, from `record`, the representatives' op: its entry j is copy
    plan[j][1] of the representatives' entry plan[j][0]. `expanded()` is that record."""

    record: OpRecord
    plan: tuple[tuple[int, int], ...]

    @property
    def name(self) -> str:
        return self.record.name

    def expanded(self, plan: tuple[tuple[int, int], ...] | None = None, distinct: bool = True) -> OpRecord:
        """The record over the lists `plan` (default: the parameters') lays out: every list argument, and the
        outputs of an op that returns a list, entry by entry. Copy 0 of an entry holds the representative's
        TensorMeta objects; with `distinct`, each other copy its own ones (the real lists hold distinct tensors:
        a cost that counts each input tensor once counts each), one per tensor within the copy."""
        rec, plan = self.record, self.plan if plan is None else plan
        n = 1 + max(i for i, _ in self.plan)
        made: dict[tuple[int, int], TensorMeta] = {}

        def entry(x, c):
            if c == 0 or not distinct or not isinstance(x, TensorMeta):
                return x
            meta = made.get((id(x), c))
            if meta is None:
                meta = made[id(x), c] = TensorMeta(x.shape, x.dtype, x.stride)
            return meta

        def spread(v):
            if isinstance(v, (list, tuple)) and len(v) == n:
                return type(v)([entry(v[i], c) for i, c in plan])
            return v

        return OpRecord(rec.op, tuple(spread(v) for v in rec.args), {k: spread(v) for k, v in rec.kwargs.items()},
                        tuple(spread(rec.outputs)) if rec.outputs else rec.outputs)

    def time(self, device: DeviceSpec) -> tuple[OpCost, Any]:
        """What `record_time` gives for `expanded()`, pricing each representative's entry once where the cost
        is a sum over entries plus a part shared by all (see `_per_entry_cost`), else `expanded()` itself."""
        cost = _per_entry_cost(self)
        if cost is None:
            return record_time(self.expanded(), device)
        ordered = self.expanded(distinct=False)   # record_time's number format: the first floating input's
        return cost, op_time(cost, compute_dtype(ordered.input_metas(), ordered.outputs), device)


def _per_entry_cost(spread: _Spread) -> OpCost | None:
    """The cost of `spread.expanded()` as shared + sum over entries of each entry's own part, both read off
    the representatives' lists: every list op costs.py prices so (`_foreach_sum`: a sum of the per-tensor op
    over entries, `scalars` read once; `_fused_adam` / `_fused_sgd`: per-element FLOPs and the bytes of every
    list, lr / grad_scale / found_inf read once; an uncovered op's default bytes). The parts are solved from
    the lists as they are and each entry alone, and checked on the lists with every entry twice (three times
    for one entry); None (price `expanded()` itself) when that check fails or a part is not a whole number."""
    rec, plan = spread.record, spread.plan
    n = 1 + max(i for i, _ in plan)
    try:
        alone = [cost_of(spread.expanded(((i, 0),))) for i in range(n)]
        if n == 1:
            twice = cost_of(spread.expanded(((0, 0), (0, 1))))
            check_plan, times = ((0, 0), (0, 1), (0, 2)), 3
            own = [_minus(twice, alone[0])]
            shared = _minus(alone[0], own[0])
        else:
            whole = cost_of(rec)
            extra = _minus(_plus(*alone), whole)              # (n - 1) x the shared part
            if any(v % (n - 1) for v in extra):
                return None
            shared = tuple(v // (n - 1) for v in extra)
            own = [_minus(c, shared) for c in alone]
            check_plan, times = tuple((i, c) for i in range(n) for c in (0, 1)), 2
        check = cost_of(spread.expanded(check_plan))
    except Exception:
        return None
    flags = {(c.covered, c.matmul) for c in (*alone, check)}
    if len(flags) != 1:
        return None
    if _fields(check) != _plus(shared, *(_scale(o, times) for o in own)):
        return None
    many = [0] * n
    for i, _ in plan:
        many[i] += 1
    flops, read, written = _plus(shared, *(_scale(o, m) for o, m in zip(own, many)))
    covered, matmul = flags.pop()
    return OpCost(flops, read, written, covered, matmul)


def _fields(c) -> tuple[int, int, int]:
    return (c.flops, c.bytes_read, c.bytes_written) if isinstance(c, OpCost) else c


def _minus(a, b) -> tuple[int, int, int]:
    return tuple(x - y for x, y in zip(_fields(a), _fields(b)))


def _plus(*costs) -> tuple[int, int, int]:
    return tuple(sum(v) for v in zip(*(_fields(c) for c in costs)))


def _scale(c, m: int) -> tuple[int, int, int]:
    return tuple(m * v for v in _fields(c))


# ---------------------------------------------------------------------------------------------
# Pricing


def _entries(recorder: _StepRecorder) -> list[tuple[Any, bool]]:
    return list(zip(recorder.records, recorder.on_host))


def _price(name: str, impl: str, params: list[torch.Tensor], entries: list[tuple[Any, bool]], device: DeviceSpec,
           notes: tuple[str, ...], single_pass: tuple[int, int], state_bytes: int) -> OptimizerStepCost:
    """Price the step's (record, on host) sequence; a record object met again is priced once."""
    timed, uncovered = [], []
    by_op: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0, 0.0])
    kernels = host_ops = 0
    priced: dict[int, tuple] = {}
    for rec, on_host in entries:
        if on_host:
            host_ops += 1
            continue
        cost, t = priced.get(id(rec)) or priced.setdefault(
            id(rec), rec.time(device) if isinstance(rec, _Spread) else record_time(rec, device))
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
    ideal_read, ideal_written = single_pass
    ideal_cost = OpCost(flops, ideal_read, ideal_written)
    ideal = IdealStep(ideal_read, ideal_written, flops, op_time(ideal_cost, params[0].dtype, device).seconds)
    return OptimizerStepCost(
        optimizer=name, implementation=impl, spec=device.name,
        parameters=sum(p.numel() for p in params), tensors=len(params),
        bytes_read=sum(c.bytes_read for c, _ in timed), bytes_written=sum(c.bytes_written for c, _ in timed),
        flops=flops, kernels=kernels, seconds=node_time(timed, device).seconds,
        state_bytes=state_bytes, ops={k: StepOp(*v) for k, v in by_op.items()}, ideal=ideal,
        host_ops=host_ops, uncovered=tuple(uncovered), notes=notes)


def _single_pass(opt: torch.optim.Optimizer, groups: list[dict] | None = None) -> tuple[int, int]:
    """(read, written) of the single pass, from each group's settings (see IdealStep); over `groups`' params
    (those of opt's groups, one to one) when given."""
    read = written = 0
    for i, group in enumerate(opt.param_groups):
        if isinstance(opt, torch.optim.Adam):
            state = 3 if group["amsgrad"] else 2          # exp_avg, exp_avg_sq (, max_exp_avg_sq)
        else:
            state = 1 if group["momentum"] != 0 else 0    # momentum_buffer
        for p in (group if groups is None else groups[i])["params"]:
            size = p.numel() * p.element_size()           # the state has its parameter's dtype
            read += size * (2 + state)                    # param, grad, state
            written += size * (1 + state)                 # param, state
    return read, written


def _state_bytes(opt: torch.optim.Optimizer, index: dict[int, int] | None = None,
                 rep_of: list[int] | None = None) -> int:
    """Bytes of the storages opt.state holds, each once. With `index` (opt's parameters are representatives)
    and `rep_of`: as if each parameter held its representative's state (a storage shared by two
    representatives' states is counted once)."""
    storages: dict[int, int] = {}
    held: dict[int, set[int]] = defaultdict(set)
    for p, per_param in opt.state.items():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage._cdata] = storage.nbytes()   # one entry per storage, however many views
                if index is not None:
                    held[storage._cdata].add(index[id(p)])
    if index is None or rep_of is None:
        return sum(storages.values())
    many = defaultdict(int)
    for k in rep_of:
        many[k] += 1
    return sum(n * (many[next(iter(held[c]))] if len(held[c]) == 1 else 1) for c, n in storages.items())
