"""The backward pass of a training step, captured and priced on meta, op by op, next to the forward.

`capture_backward` runs the forward of a meta shadow of the model with autograd on, takes the loss, and runs
`loss.backward()` on meta too, recording every ATen op of both passes (`OpRecorder`). Each op is priced by
`shapeprof.costs` against the roofline of a device, and filed under the module it belongs to, so a module's
forward and backward cost sit side by side:

- a forward op belongs to the module whose forward is running (forward pre/post hooks on the shadow's modules);
- a backward op belongs to the module whose forward created the autograd node that runs it. After every torch
  call of the forward, the autograd nodes behind its outputs (and behind its tensor arguments, which an in-place
  op re-points) that no earlier call claimed are claimed for the current module; during backward,
  ``torch._C._current_autograd_node()`` names the node each op runs under. A parameter's AccumulateGrad node
  belongs to the module that holds the parameter. An op whose node was never claimed is filed under
  ``(unattributed)``, counted, never dropped.

Every tensor autograd saves for backward passes `torch.autograd.graph.saved_tensors_hooks`: each storage is
counted once, parameters and buffers (memory the weights take anyway) apart from activations.

Attention is priced as the fused kernels a GPU runs for it, forward and backward: on meta,
``F.scaled_dot_product_attention`` would fall back to its math path (a materialised score matrix, saved for
backward, and its matmuls in the backward), so it runs as the flash kernel (no mask; grouped-query attention
native) or the memory-efficient one (a mask), which meta supports with their backward kernels. The forward is
recorded as the one ``aten.scaled_dot_product_attention`` op it stands for, as everywhere in shapeprof.

    >>> import torch
    >>> p = capture_backward(torch.nn.Linear(64, 32), torch.randn(8, 64))
    >>> p.loss_source, p.forward.flops, p.backward.flops   # no loss returned or given: output.sum()
    ('output.sum()', 33024, 33024)

Forward: addmm 2*8*64*32 = 32768, the loss's sum 8*32 = 256. Backward: grad of the weight, one mm of
2*8*64*32 = 32768, and of the bias, a sum over the batch: 8*32 = 256; the input needs no gradient, so its
matmul is never run.

Counting convention: `shapeprof.costs.FLOP_CONVENTION`, and for the backward kernels (costs.py's last sections):
- convolution_backward: the forward's count for each gradient it computes (input, weight: its output_mask),
  the bias's sum left out, exactly as FlopCounterMode;
- fused attention backward: five matmuls per kept score (the kernel recomputes Q K^T, then dV, dP, dQ, dK), as
  FlopCounterMode counts it, over the scores the mask keeps (causal: the half computed, as the forward).
- norms, softmax, embeddings, losses, pooling, select/slice: as costs.py's "backward ops" section counts them.
An op with no formula (glu_backward, the upsample backwards ...) is listed in `uncovered` with its bytes (it is
memory-bound: its predicted time is its bytes over the bandwidth).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .analysis import _NodeCoster, _precision_name
from .capture import _user_global_hooks_silenced, collector_paused, meta_inputs, meta_shadow, unwrap
from .hardware import DeviceSpec, get_spec
from .mixed_precision import AutocastPolicy
from .precision import Precision
from .precision import resolve as resolve_precision
from .records import OpRecord, OpRecorder, tensors_in
from .step_memory import LiveBytes, PeakAt
from .text import one_line

__all__ = ["LOSS", "UNATTRIBUTED", "BlockCheckpoint", "ModulePasses", "OpTotal", "PassCost", "TrainingPasses",
           "blocks_of", "capture_backward", "refuse_untrainable"]

aten = torch.ops.aten

#: The module path of ops that run outside the model: the loss computed from its output, the loss's seed gradient.
LOSS = "(loss)"
#: The module path of backward ops whose autograd node no module's forward created (or that run under none).
UNATTRIBUTED = "(unattributed)"


@dataclass(frozen=True)
class PassCost:
    """What one pass (forward or backward) costs, of the whole model or of one module."""

    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0      # predicted: the sum of each op's roofline time (each op is its own kernel)
    ops: int = 0              # ATen ops recorded (views included)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass(frozen=True)
class ModulePasses:
    """One module's own ops (not its submodules'), forward and backward; module path '' is the model itself."""

    path: str
    type: str                       # "Linear"; "" for (loss) and (unattributed)
    forward: PassCost
    backward: PassCost
    saved_activation_bytes: int     # storages autograd saved first while this module ran (each counted once)


@dataclass(frozen=True)
class OpTotal:
    """One ATen op of one pass, summed over its calls (ops that move nothing, views, are left out)."""

    op: str                         # "aten.mm"
    phase: str                      # "forward" or "backward"
    count: int
    flops: int
    bytes: int
    seconds: float
    covered: bool                   # False: no cost formula; its bytes are counted, its FLOPs are not


@dataclass(frozen=True)
class BlockCheckpoint:
    """What activation checkpointing one block would trade: the activations it would no longer keep for
    backward (what it saves, less its input, which a checkpoint keeps), for its forward run again in backward."""

    path: str
    saves_bytes: int
    recompute_flops: int
    recompute_seconds: float


@dataclass(frozen=True)
class TrainingPasses:
    """The forward and backward pass of one training step on `spec`, in total and per module.

    `saved_activation_bytes`: what the storages autograd keeps from forward to backward hold, each storage once
    (inputs the forward saves count here too), parameters and buffers left out: those are in
    `saved_parameter_bytes`. `unattributed_ops`: backward ops tied to no module, filed under UNATTRIBUTED.
    """

    model: str
    spec: str
    dtype: str | None
    loss_source: str                # "model .loss", "output[1]", "loss_fn", "output.sum()" ...
    forward: PassCost
    backward: PassCost
    modules: dict[str, ModulePasses]
    ops: tuple[OpTotal, ...]        # by phase, then by predicted time, longest first
    saved_activation_bytes: int
    saved_parameter_bytes: int
    unattributed_ops: int
    notes: tuple[str, ...] = ()
    capture_seconds: float = 0.0    # what this capture took on the host
    # memory over forward and backward, above the weights and inputs (shapeprof.step_memory): the most alive at
    # once and where, and what is left when backward ends (the gradients, and the output the loop still holds)
    peak_bytes: int = 0
    peak_at: PeakAt | None = None
    end_bytes: int = 0
    input_bytes: int = 0            # the inputs and targets, each storage once
    checkpointed: tuple[str, ...] = ()          # blocks run under activation checkpointing
    recompute_flops: int = 0                    # their forward, run again in backward
    blocks: tuple[BlockCheckpoint, ...] = ()    # per block of the model's longest layer list: what checkpointing
                                                # it would trade (in the step as priced)

    @property
    def seconds(self) -> float:
        """Predicted time of forward + backward."""
        return self.forward.seconds + self.backward.seconds

    @property
    def uncovered(self) -> tuple[OpTotal, ...]:
        """The ops with no cost formula, most bytes first."""
        return tuple(sorted((o for o in self.ops if not o.covered), key=lambda o: -o.bytes))

    def subtree(self, path: str) -> ModulePasses:
        """A module with its submodules: the sum of the rows of `path` and of every path under it."""
        rows = [m for p, m in self.modules.items() if p not in (LOSS, UNATTRIBUTED)
                and (p == path or path == "" or p.startswith(path + "."))]
        if not rows:
            raise KeyError(f"no ops ran under module {path!r}")
        return ModulePasses(path, self.modules[path].type if path in self.modules else "",
                            _add(m.forward for m in rows), _add(m.backward for m in rows),
                            sum(m.saved_activation_bytes for m in rows))

    def flops_by_op(self, phase: str | None = None) -> dict[str, int]:
        """{"aten.mm": FLOPs} over both passes, or over one ("forward", "backward")."""
        out: dict[str, int] = defaultdict(int)
        for o in self.ops:
            if phase is None or o.phase == phase:
                out[o.op] += o.flops
        return dict(out)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for json.dumps (derived figures included)."""
        d = dataclasses.asdict(self)
        for phase in ("forward", "backward"):
            d[phase]["bytes"] = getattr(self, phase).bytes
        d["modules"] = [{**dataclasses.asdict(m), **{phase: {**dataclasses.asdict(getattr(m, phase)),
                                                             "bytes": getattr(m, phase).bytes}
                                                     for phase in ("forward", "backward")}}
                        for m in self.modules.values()]
        d["seconds"] = self.seconds
        d["uncovered"] = [dataclasses.asdict(o) for o in self.uncovered]
        return d


@collector_paused()   # no garbage collection while it runs: see capture.collector_paused
def capture_backward(model: nn.Module, *args: Any, loss_fn: Callable[..., torch.Tensor] | None = None,
                     targets: tuple = (), spec: str | DeviceSpec | None = None,
                     dtype: torch.dtype | str | None = None, checkpoint: str | tuple | list | None = None,
                     autocast: torch.dtype | str | None = None, model_kwargs: dict[str, Any] | None = None,
                     **kwargs: Any) -> TrainingPasses:
    """Capture the forward and backward pass of a training step on meta and price both, per module.

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> p = capture_backward(net, torch.randn(8, 16), loss_fn=torch.nn.functional.cross_entropy,
        ...                      targets=(torch.zeros(8, dtype=torch.long),))
        >>> p.modules["2"].forward.flops, p.modules["2"].backward.flops   # mm 2*8*32*4; input + weight grads
        (2048, 4128)

    Args:
        model: any nn.Module (on any device, meta included). It is not run, moved or changed: the passes run on a
            meta shadow, whose parameters get the gradients. Its mode is kept: dropout and batch norm run as
            they would in it (train() for a training step; eval mode adds a note).
        *args, **kwargs: example inputs as its forward takes them (only shapes, dtypes and requires_grad matter;
            `InputShape`s too). HuggingFace models given `labels` return their loss.
        loss_fn: called as `loss_fn(output, *targets)` for the loss; without it the loss is the model's own
            (a `.loss` output, or a 0-dim tensor requiring grad in a tuple it returns), else `output.sum()`.
        targets: tensors passed to `loss_fn` after the output.
        checkpoint: run these modules under activation checkpointing (``torch.utils.checkpoint``, non-reentrant,
            as a training script applies it): "blocks" for every block of the model's longest ModuleList (a
            transformer's layers), or a list of module paths. Their forward runs again in backward (counted in
            `recompute_flops`, hardware FLOPs, not model FLOPs) and they keep only their inputs for backward.
        autocast: bf16 or fp16 mixed precision: the forward (and loss) as under ``torch.autocast("cuda", dtype)``
            with the parameters kept in their own dtype (fp32 master weights): matmuls on cast copies, the casts
            and their gradients recorded and priced (`shapeprof.mixed_precision`). Not with a `dtype` other than
            fp32.
        model_kwargs: keyword inputs of the model whose names are this function's own (nanoGPT's
            ``model(idx, targets=y)``): passed to its forward with **kwargs.
        spec: the device (a name, a spec file or a DeviceSpec); default A100-80GB SXM.
        dtype: price as if parameters, buffers and floating inputs were in this dtype (a torch.dtype or a name:
            "bf16", "fp16", "fp32", "tf32"), as `analyze` does. 8-bit formats are refused: they price W8A8
            inference.

    Returns:
        A TrainingPasses.
    Raises:
        ValueError: no trainable parameters, called under torch.inference_mode, an output (or loss) that is not
            differentiable, an 8-bit dtype. One line, naming why.
        RuntimeError: the forward or backward cannot run on meta tensors (one line: torch's reason, the module).
    """
    start = time.perf_counter()
    name = type(model).__name__
    kwargs = {**kwargs, **(model_kwargs or {})}
    refuse_untrainable(model)
    model = unwrap(model)
    precision = resolve_precision(dtype)
    policy = _autocast_policy(autocast, precision)
    if precision.matmul_dtype is not None:
        raise ValueError(f"dtype {dtype!r} prices a W8A8 quantised model for inference; a training step's dtype "
                         f"is a float type (bf16, fp16, fp32, tf32)")
    device = get_spec(spec)
    notes = [] if model.training else [f"{name} is in eval mode: dropout and batch norm ran as in evaluation "
                                       f"(call model.train() before, to price them as a training step runs)"]
    with _user_global_hooks_silenced():
        shadow = meta_shadow(model, precision.dtype)
        meta_args, meta_kwargs = _meta_inputs_keeping_grad((args, kwargs), precision.dtype)
        meta_targets = tuple(meta_inputs(tuple(targets), precision.dtype))
        run = _Run(shadow, blocks_of(shadow), policy)
        run.memory.know(tensors_in((meta_args, meta_kwargs, meta_targets)))
        run.checkpoint(_checkpoint_paths(shadow, checkpoint, name))
        source, loss_notes = run.forward(meta_args, meta_kwargs, loss_fn, meta_targets, name)
        run.backward(name)
    notes += loss_notes + run.notes
    inputs = _unique_bytes(tensors_in((meta_args, meta_kwargs, meta_targets)))
    return _price(name, run, source, device, precision, notes, start, inputs)


def _autocast_policy(autocast, precision: Precision) -> AutocastPolicy | None:
    if autocast is None:
        return None
    if precision.dtype not in (None, torch.float32):
        raise ValueError(f"autocast={autocast!r} keeps fp32 master weights: it cannot be priced with parameters in "
                         f"{precision.name} (leave dtype unset, or fp32)")
    low = resolve_precision(autocast).dtype
    if low not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast={autocast!r}: mixed precision is bf16 or fp16")
    return AutocastPolicy(low)


def refuse_untrainable(model: nn.Module) -> None:
    """ValueError (one line, naming why) where a training step of `model` cannot be: under inference_mode, or
    with no trainable parameter."""
    name = type(model).__name__
    if torch.is_inference_mode_enabled():
        raise ValueError(f"a training step of {name} was asked for under torch.inference_mode, where autograd "
                         f"records nothing: there is no backward; call it outside inference_mode")
    if not any(p.requires_grad for p in unwrap(model).parameters()):
        raise ValueError(f"{name} has no trainable parameters (none with requires_grad=True): a training step "
                         f"would compute no weight gradient")


def blocks_of(model: nn.Module) -> tuple[str, ...]:
    """The paths of the blocks of `model`'s longest ModuleList (a transformer's layers): what checkpointing and
    FSDP wrap, one unit each; none (an empty tuple) when it has no list of two or more."""
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        return ()
    path, longest = max(lists, key=lambda pm: len(pm[1]))
    return tuple(f"{path}.{i}" if path else str(i) for i in range(len(longest)))


def _checkpoint_paths(model: nn.Module, checkpoint, name: str) -> tuple[str, ...]:
    if checkpoint is None:
        return ()
    if checkpoint == "blocks":
        paths = blocks_of(model)
        if not paths:
            raise ValueError(f'checkpoint="blocks": {name} has no ModuleList of blocks to checkpoint; give the '
                             f'module paths to checkpoint')
        return paths
    if isinstance(checkpoint, str) or not all(isinstance(p, str) for p in checkpoint):
        raise TypeError(f'checkpoint= takes "blocks" or a list of module paths, not {checkpoint!r}')
    known = dict(model.named_modules())
    for p in checkpoint:
        if p not in known or p == "":
            raise ValueError(f"checkpoint: {name} has no submodule {p!r}")
    return tuple(checkpoint)


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        key, nbytes = _storage_key(t)
        seen[key] = nbytes
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------
# Inputs


def _meta_inputs_keeping_grad(tree: Any, dtype: torch.dtype | None) -> Any:
    """meta_inputs, with requires_grad kept on the floating tensors that had it: whether an input needs a
    gradient decides whether its backward matmul runs."""
    meta = meta_inputs(tree, dtype)
    for given, copy in zip(pytree.tree_leaves(tree), pytree.tree_leaves(meta)):
        if isinstance(given, torch.Tensor) and given.requires_grad and isinstance(copy, torch.Tensor) \
                and copy.is_floating_point() and copy.is_leaf:
            copy.requires_grad_(True)
    return meta


# ---------------------------------------------------------------------------------------------
# The run: forward, loss, backward, with every op's module


class _PassRecorder(OpRecorder):
    """An OpRecorder that files each record under a module path (`paths`, parallel to `records`)."""

    def __init__(self, run: "_Run") -> None:
        super().__init__(meta=True)
        # F.scaled_dot_product_attention is recorded whole by the run's own function mode, which runs it as a fused
        # kernel (_Run.attention); OpRecorder's would record it whole too, but over torch's math path, whose
        # autograd nodes then run the math path's backward
        self._whole = contextlib.nullcontext()
        self.run = run
        self.paths: list[str] = []
        self.recomputed: list[bool] = []    # run again in backward by activation checkpointing

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.run.memory.created(out, func, self.run.where)   # every op, recorded or not (a fused kernel's own)
        return out

    def record(self, op, args, kwargs, out) -> None:
        super().record(op, args, kwargs, out)
        self.paths.append(self.run.path_now())
        self.recomputed.append(bool(self.run.recomputing))


# torch's own Python functions that call F.scaled_dot_product_attention inside (nn.MultiheadAttention's, in training
# or with need_weights=False): the run follows them in, so that their attention runs fused too. Only these: following
# every function in would send some (Tensor.unflatten, which calls itself through super()) round in circles.
_CALLS_ATTENTION = frozenset({F.multi_head_attention_forward})


class _Run(TorchFunctionMode):
    """Runs the shadow's forward and backward, knowing at each op which module it belongs to."""

    def __init__(self, shadow: nn.Module, blocks: tuple[str, ...] = (),
                 autocast: AutocastPolicy | None = None) -> None:
        super().__init__()
        self.shadow = shadow
        self.autocast = autocast
        self.blocks = blocks
        self._handles: list = []
        self.end_bytes = 0
        self.block_inputs: dict[str, set[int]] = {}   # block path -> the storages of its inputs (first call)
        self.last_save: dict[str, int] = {}     # block path -> records made before its last saved tensor
        self.recomputing: list[str] = []     # checkpointed blocks whose forward is running again in backward
        self.checkpointed: tuple[str, ...] = ()
        self.recorder = _PassRecorder(self)
        self.stack: list[str] = []          # module paths whose forward is running, innermost last
        self.in_backward = False
        self.node_paths: dict[int, str] = {}   # id(autograd node) -> module path
        self._nodes: list[Any] = []         # the nodes themselves: alive, so their ids stay theirs
        self.param_paths: dict[int, str] = {}  # id(parameter) -> the module holding it (the first, if tied)
        self.types: dict[str, str] = {}
        for path, m in shadow.named_modules():
            self.types[path] = type(m).__name__
            for p in m._parameters.values():
                if p is not None:
                    self.param_paths.setdefault(id(p), path)
        self.weight_storages = {_storage_key(t)[0] for t in (*shadow.parameters(), *shadow.buffers())}
        self.saved: dict[int, tuple[int, bool, str]] = {}   # storage -> (bytes, is a parameter/buffer, path)
        self.memory = LiveBytes(known=(*shadow.parameters(), *shadow.buffers()))
        self.n_forward = 0
        self.loss: torch.Tensor | None = None
        self.output: Any = None   # held until backward ends, as a training loop holds its logits
        self.notes: list[str] = []

    # ------------------------------------------------------------------ where an op belongs

    def path_now(self) -> str:
        if not self.in_backward:
            return self.stack[-1] if self.stack else LOSS
        if self.recomputing:   # a checkpointed block's forward again: filed under its modules, as in forward
            return self.stack[-1] if self.stack else self.recomputing[-1]
        node = torch._C._current_autograd_node()
        if node is None:
            return UNATTRIBUTED
        return self.node_paths.get(id(node), UNATTRIBUTED)

    def where(self) -> tuple[str, str]:
        """(phase, module path) of the op running now: where LiveBytes files a new peak."""
        return ("backward" if self.in_backward else "forward"), self.path_now()

    def _claim(self, value: Any, path: str) -> None:
        """File every autograd node behind `value`'s tensors that no earlier call claimed under `path`."""
        for t in _tensors(value):
            node = t.grad_fn
            if node is None or id(node) in self.node_paths:
                continue
            todo = [node]
            while todo:
                n = todo.pop()
                if n is None or id(n) in self.node_paths:
                    continue
                self._nodes.append(n)
                if isinstance(n, torch._C._functions.AccumulateGrad):
                    # a leaf's gradient sink: it belongs to the module holding the parameter, wherever it is used
                    self.node_paths[id(n)] = self.param_paths.get(id(n.variable), path)
                    continue
                self.node_paths[id(n)] = path
                todo.extend(f for f, _ in n.next_functions)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.autocast is not None:
            args, kwargs = self.autocast.cast(func, args, kwargs)
        if func is F.scaled_dot_product_attention:
            out = self.attention(*args, **kwargs)
        elif func in _CALLS_ATTENTION:
            with self:   # the calls func makes come here too, its attention among them
                out = torch.overrides.redispatch_function(func, types, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if self.in_backward:   # a checkpointed block's forward again: its nodes are freed as backward goes on
            return out
        path = self.stack[-1] if self.stack else LOSS
        self._claim(out, path)
        self._claim(args, path)    # an in-place op gives its tensor argument a new node (add_, copy_, setitem)
        return out

    # ------------------------------------------------------------------ attention as the fused kernels run it

    def attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        rec = self.recorder
        rec._paused += 1
        try:
            out = _fused_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        except (RuntimeError, NotImplementedError) as e:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                 enable_gqa=enable_gqa)
            note = (f"an attention call ran torch's math path on meta (no fused kernel took it: {one_line(e)}): "
                    f"its backward is priced as the math path's ops")
            if note not in self.notes:
                self.notes.append(note)
        finally:
            rec._paused -= 1
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                      enable_gqa=enable_gqa)
        rec.record(aten.scaled_dot_product_attention.default, (query, key, value), kwargs, out)
        return out

    # ------------------------------------------------------------------ saved tensors

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key not in self.saved:
            self.saved[key] = (nbytes, key in self.weight_storages, self.stack[-1] if self.stack else LOSS)
        if not self.in_backward:
            for path in self.stack:   # a checkpoint of a block stops recomputing once its last saved tensor is back
                if path in self.blocks:
                    self.last_save[path] = len(self.recorder.records)
        return t

    # ------------------------------------------------------------------ activation checkpointing

    def checkpoint(self, paths: tuple[str, ...]) -> None:
        """Run each of these modules' forward under torch.utils.checkpoint (non-reentrant), as a training
        script wraps them: autograd keeps their inputs, and their forward runs again when backward needs it."""
        for path in paths:
            module = self.shadow.get_submodule(path)
            module.forward = self._checkpointed(module.forward, path)
        self.checkpointed = tuple(paths)

    def _checkpointed(self, forward: Callable, path: str) -> Callable:
        from torch.utils.checkpoint import checkpoint

        def again(*args, **kwargs):
            if not self.in_backward:
                return forward(*args, **kwargs)
            self.recomputing.append(path)
            try:
                with self:   # the autograd engine runs this without the forward's function modes: attention fused
                    return forward(*args, **kwargs)
            finally:
                self.recomputing.pop()

        def run(*args, **kwargs):
            for t in tensors_in((args, kwargs)):   # what the checkpoint keeps for backward: its inputs
                if t.requires_grad or t.grad_fn is not None:
                    key, nbytes = _storage_key(t)
                    if key not in self.saved:
                        self.saved[key] = (nbytes, key in self.weight_storages, path)
            # no RNG state to keep on meta; dropout's masks are drawn again, as with preserve_rng_state off
            return checkpoint(again, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        return run

    # ------------------------------------------------------------------ the passes

    def forward(self, args: tuple, kwargs: dict, loss_fn, targets: tuple, name: str) -> tuple[str, list[str]]:
        def enter(path: str) -> Callable:
            def hook(module, args):
                self.stack.append(path)
                if path in self.blocks and path not in self.block_inputs and not self.in_backward:
                    self.block_inputs[path] = {_storage_key(t)[0] for t in tensors_in(args)}
            return hook

        def leave(module, args, output):   # returns None: a forward hook's return value replaces the output
            self.stack.pop()

        handles = []
        for path, m in self.shadow.named_modules():
            handles.append(m.register_forward_pre_hook(enter(path)))
            handles.append(m.register_forward_hook(leave, always_call=True))
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack), \
                    self.recorder, self:
                try:
                    output = self.shadow(*args, **kwargs)
                except Exception as e:
                    path = self._failing_module(e)
                    where = f" in module '{path}'" if path else " in its own forward" if path == "" else ""
                    raise RuntimeError(f"{name}'s forward cannot run on meta tensors{where}: {one_line(e)}") from e
                loss, source, notes = _loss_of(output, loss_fn, targets, name)
                if self.autocast is not None:   # the autocast region ends with the loss: its cached casts go
                    self.autocast.clear()
        except BaseException:
            for h in handles:
                h.remove()
            raise
        self._handles = handles   # kept through backward: a checkpointed block's submodules run again there
        self.n_forward = len(self.recorder.records)
        self.output = output
        self.loss = loss
        return source, notes

    def _failing_module(self, e: BaseException) -> str | None:
        """The path of the innermost shadow module whose forward the traceback of `e` runs through (the stack is
        empty by then: the post-hooks, always called, have popped it)."""
        paths = {id(m): path for path, m in self.shadow.named_modules()}
        found, tb = None, e.__traceback__
        while tb is not None:
            module = tb.tb_frame.f_locals.get("self")
            if id(module) in paths and tb.tb_frame.f_code.co_name == "forward":
                found = paths[id(module)]
            tb = tb.tb_next
        return found

    def backward(self, name: str) -> None:
        try:
            with self.recorder:
                seed = torch.ones_like(self.loss)   # the loss's gradient: made here, it is a backward op of (loss)
                self.in_backward = True
                self.loss.backward(seed)
        except Exception as e:
            raise RuntimeError(f"{name}'s backward cannot run on meta tensors: {one_line(e)}") from e
        finally:
            self.in_backward = False
            for h in self._handles:
                h.remove()
        self.end_bytes = self.memory.current
        self.loss = self.output = seed = None
        self.memory.close()


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    """(an id of the storage t views, the bytes of that storage)."""
    try:
        storage = t.untyped_storage()
        return storage._cdata, storage.nbytes()
    except (RuntimeError, NotImplementedError):   # a tensor without a storage (sparse, nested): count it alone
        return id(t), t.numel() * t.element_size()


def _tensors(x: Any):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, (list, tuple)):
                yield from _tensors(v)


def _fused_attention(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa):
    """The output of the fused kernel a GPU runs for this attention, run on meta with its autograd node.

    No mask: the flash kernel (what torch picks on CUDA for the fp16/bf16 of training; fp32 would take the
    memory-efficient one, priced the same), which takes grouped-query k/v as they are. A mask: the
    memory-efficient kernel, with a float bias (a boolean mask becomes 0 / -inf, as torch converts it) and, for
    grouped-query attention, k/v repeated to the query heads (its kernel has no GQA; their gradients are summed back).
    """
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad
    if mask is None and q.shape[-1] == v.shape[-1]:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)   # (B, nh, S, hd)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        mask = mask.expand(*q.shape[:-2], q.shape[-2], k.shape[-2])   # (B, nh, L, S): a view
    return aten._scaled_dot_product_efficient_attention(q, k, v, mask, needs_grad, dropout_p, is_causal,
                                                        scale=scale)[0]


# ---------------------------------------------------------------------------------------------
# The loss


def _loss_of(output: Any, loss_fn, targets: tuple, name: str) -> tuple[torch.Tensor, str, list[str]]:
    """(the loss, where it came from, notes)."""
    if loss_fn is not None:
        loss, source = loss_fn(output, *targets), "loss_fn"
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"loss_fn returned {type(loss).__name__}, not a tensor: there is nothing to "
                             f"differentiate")
        return _differentiable(loss, source, name), source, []
    own = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(own, torch.Tensor) and not isinstance(output, torch.Tensor):
        return _differentiable(own, "model .loss", name), "model .loss", []
    if isinstance(output, (tuple, list)):
        for i, v in enumerate(output):
            if isinstance(v, torch.Tensor) and v.dim() == 0 and v.requires_grad:
                return v, f"output[{i}]", []
    found = _first_floating(output)
    if found is None:
        raise ValueError(f"{name}'s output holds no floating tensor: there is nothing to differentiate "
                         f"(give loss_fn)")
    where, t = found
    source = f"{where}.sum()"
    loss = _differentiable(t, where, name).sum()
    return loss, source, [f"no loss given or returned: the backward is that of {source} (a gradient of ones "
                          f"on every output element); give loss_fn (and targets) for a real loss"]


def _first_floating(output: Any) -> tuple[str, torch.Tensor] | None:
    if isinstance(output, torch.Tensor):
        return ("output", output) if output.is_floating_point() else None
    items = output.items() if isinstance(output, dict) else enumerate(output) \
        if isinstance(output, (tuple, list)) else ()
    for key, v in items:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return f"output[{key!r}]", v
    return None


def _differentiable(t: torch.Tensor, what: str, name: str) -> torch.Tensor:
    if not t.requires_grad:
        raise ValueError(f"{name}'s {what} is not differentiable (requires_grad=False: no trainable parameter or "
                         f"input reaches it, or the forward detached it or ran it under no_grad)")
    return t


# ---------------------------------------------------------------------------------------------
# Pricing


def _price(name: str, run: _Run, source: str, device: DeviceSpec, precision: Precision, notes: list[str],
           start: float, input_bytes: int) -> TrainingPasses:
    rec = run.recorder
    groups: dict[tuple[str, str], list[OpRecord]] = defaultdict(list)
    order: dict[str, None] = {}
    recomputed: list[OpRecord] = []
    for i, (record, path, again) in enumerate(zip(rec.records, rec.paths, rec.recomputed)):
        phase = "forward" if i < run.n_forward else "backward"
        groups[(phase, path)].append(record)
        order.setdefault(path, None)
        if again:
            recomputed.append(record)
    coster = _NodeCoster(device, precision)
    costs: dict[tuple[str, str], PassCost] = {}
    ops: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0, 0.0, True])   # count, flops, bytes, s, covered
    for (phase, path), records in groups.items():
        c = coster(tuple(records))
        costs[(phase, path)] = PassCost(c.flops, c.bytes_read, c.bytes_written, c.time.seconds, len(records))
        for a in c.aten:
            row = ops[(phase, a.op)]
            row[0] += 1
            row[1] += a.flops
            row[2] += a.bytes
            row[3] += a.seconds
            row[4] = a.covered
    saved_by_path: dict[str, int] = defaultdict(int)
    for nbytes, is_weight, path in run.saved.values():
        if not is_weight:
            saved_by_path[path] += nbytes
    modules = {path: ModulePasses(path, run.types.get(path, ""), costs.get(("forward", path), PassCost()),
                                  costs.get(("backward", path), PassCost()), saved_by_path.get(path, 0))
               for path in order}
    unattributed = costs.get(("backward", UNATTRIBUTED), PassCost()).ops
    if unattributed:
        notes.append(f"{unattributed} backward ops ran under autograd nodes no module's forward created: they are "
                     f"filed under {UNATTRIBUTED}")
    return TrainingPasses(
        model=name, spec=device.name,
        dtype=_precision_name(precision),
        loss_source=source, forward=_sum(costs, "forward"), backward=_sum(costs, "backward"), modules=modules,
        ops=tuple(OpTotal(op, phase, *row) for (phase, op), row in
                  sorted(ops.items(), key=lambda kv: (kv[0][0] != "forward", -kv[1][3]))),
        saved_activation_bytes=sum(n for n, w, _ in run.saved.values() if not w),
        saved_parameter_bytes=sum(n for n, w, _ in run.saved.values() if w),
        unattributed_ops=unattributed, notes=tuple(notes + coster.notes([])),
        capture_seconds=time.perf_counter() - start, peak_bytes=run.memory.peak, peak_at=run.memory.peak_at,
        end_bytes=run.end_bytes, input_bytes=input_bytes, checkpointed=run.checkpointed,
        recompute_flops=coster(tuple(recomputed)).flops if recomputed else 0,
        blocks=_block_trades(run, coster))


def _block_trades(run: _Run, coster: _NodeCoster) -> tuple[BlockCheckpoint, ...]:
    """Per block: the activations it saves that are not its inputs (what a checkpoint of it would free), and the
    part of its forward a checkpoint runs again: torch's non-reentrant checkpoint stops once the last tensor
    backward needs is back, so the ops after the block's last saved tensor are not recomputed. A block already
    checkpointed keeps only its inputs: it trades nothing more."""
    blocks = [b for b in run.blocks if b not in run.checkpointed]
    if not blocks:
        return ()
    block_of: dict[str, str | None] = {}    # module path -> the block it is in (each path looked up once)

    def of(path: str) -> str | None:
        if path not in block_of:
            block_of[path] = next((b for b in blocks if path == b or path.startswith(b + ".")), None)
        return block_of[path]
    saves: dict[str, int] = defaultdict(int)
    for key, (n, weight, path) in run.saved.items():
        b = of(path)
        if b is not None and not weight and key not in run.block_inputs.get(b, ()):
            saves[b] += n
    again: dict[str, list[OpRecord]] = defaultdict(list)
    rec = run.recorder
    for i in range(run.n_forward):
        b = of(rec.paths[i])
        if b is not None and i < run.last_save.get(b, 0):
            again[b].append(rec.records[i])
    out = []
    for b in blocks:
        cost = coster(tuple(again[b]))
        out.append(BlockCheckpoint(b, saves[b], cost.flops, cost.time.seconds))
    return tuple(out)


def _sum(costs: dict[tuple[str, str], PassCost], phase: str) -> PassCost:
    return _add(c for (p, _), c in costs.items() if p == phase)


def _add(costs) -> PassCost:
    rows = list(costs)
    return PassCost(sum(c.flops for c in rows), sum(c.bytes_read for c in rows), sum(c.bytes_written for c in rows),
                    sum(c.seconds for c in rows), sum(c.ops for c in rows))
