"""What models a script runs: run an unmodified script and record every nn.Module it calls at top level.

`shapeprof trace train.py` runs ``train.py`` as ``python train.py`` would (its argv, ``__name__ == "__main__"``,
its directory first on sys.path) while two *global* module hooks are installed: a forward pre-hook and a forward
hook (``torch.nn.modules.module.register_module_forward_pre_hook`` / ``register_module_forward_hook``). Together
they keep a per-thread stack of the module calls in progress, so a call is *top level* when no other module's
forward is running in that thread: ``model(x)`` in a training loop is, ``self.attn(x)`` inside ``Block.forward``
is not, and each ``self(idx)`` of nanoGPT's ``generate()`` loop is (``generate`` is not a forward).

For each distinct top-level module (by identity) the recorder keeps, from its FIRST call:

- the inputs, converted at once to metadata: every tensor becomes a meta tensor of the same shape, dtype and
  strides (so the script can later change it in place, or free it, without changing what is analysed);
  every other value is kept as it is;
- a meta *shadow* of the module, taken when that first call returns (lazy modules have their parameters by
  then): analysis runs on it, so the recorder holds no reference to the script's weights and a script that
  loads one model after another does not run out of memory under shapeprof;
- its number of top-level calls, and how many distinct input shapes those calls had.

A module compiled with ``torch.compile(model)`` is recorded as itself (its hooks run outside the compiled
region); inside a region that torch.compile traces the hooks do nothing, so they cause no graph breaks, and a
model called only from inside a compiled *function* is not seen.

Calls made by the autograd engine (activation checkpointing recomputes blocks during ``backward()``) are not
top level: they are part of the model that owns them. Whether the script also trained a model is seen three ways,
none of which puts anything on the user's tensors or modules:

- backward: its parameters' ``.grad`` is read (only read) at each later top-level call, at each optimizer step and
  when the script ends (`TracedModel.ran_backward`);
- the optimizer: torch's *global* optimizer step post-hook
  (``torch.optim.optimizer.register_optimizer_step_post_hook``) sees every ``optimizer.step()``; at an optimizer's
  first step the models whose parameters its param groups hold (by identity) get `TracedModel.optimizer`: its
  class, its settings (param group 0's, as its constructor takes them: foreach, fused, momentum, weight_decay,
  amsgrad ...) and its state's dtypes after that step (`OptimizerSeen`). Only ids of the parameters are compared:
  nothing of the optimizer or its tensors is kept;
- the loss: a top-level module without parameters (``nn.CrossEntropyLoss()``) whose first call took a model's
  output (that tensor or a view of it of the same size; failing that, a tensor of the same shape and dtype as the
  output of the model that returned last) as its first argument and returned a tensor that requires grad becomes
  that model's `TracedModel.loss` (`LossSeen`). The model keeps weak references to the tensors its last call
  returned until a loss is found, to compare them; a loss computed by a function (``F.cross_entropy``) is not seen.

`shapeprof.session` then prices the training step (forward, backward, the script's optimizer) of a model that ran
backward. The hooks are removed in ``finally``, even when the script raises; nothing is left on the user's modules
or optimizers (global hooks live in torch's tables, not on them). Analysis happens after the script finishes, on
the recorded shadows.

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    >>> with ModelRecorder() as rec:
    ...     for _ in range(3):
    ...         _ = model(torch.randn(4, 8))
    >>> [(m.name, m.calls, tuple(m.args[0].shape)) for m in rec.models]
    [('Sequential', 3, (4, 8))]
"""
from __future__ import annotations

import contextlib
import inspect
import os
import runpy
import sys
import threading
import time
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils import _pytree as pytree

from .batching import observe_batches
from .capture import meta_shadow, unwrap
from .text import one_line

__all__ = ["LossSeen", "ModelRecorder", "OptimizerSeen", "ScriptNotFound", "ScriptRun", "TracedModel", "check_target",
           "run_script", "script_name"]

#: Optimizer settings that change what a step moves through memory (which passes, which state), as opposed to
#: the numbers it computes with (lr, betas, eps): a param group that sets one of these otherwise is told of.
PRICED_SETTINGS = ("foreach", "fused", "momentum", "dampening", "nesterov", "weight_decay", "amsgrad", "maximize",
                   "capturable", "differentiable", "decoupled_weight_decay")


@dataclass
class OptimizerSeen:
    """The optimizer whose ``step()`` updated a model's parameters, as at its first step.

    Nothing of the optimizer itself is kept, nor any of its tensors: its class, plain copies of its settings and
    its state's dtypes.
    """

    cls: type                           # the optimizer's class (torch.optim.AdamW ...)
    kwargs: dict[str, Any]              # param group 0's settings that its constructor takes (0-dim tensors as numbers)
    state_dtypes: dict[str, torch.dtype]   # after that step, of a parameter of group 0: exp_avg -> torch.float32 ...
    parameters: int                     # the model's parameters (tensors) it holds
    trainable: int                      # the model's parameters with requires_grad
    groups: int                         # its param groups
    differing: tuple[str, ...] = ()     # PRICED_SETTINGS that another group sets otherwise than group 0
    others: list[str] = field(default_factory=list)   # class names of other optimizers stepping this model too

    @property
    def name(self) -> str:
        return self.cls.__name__

    def describe(self) -> str:
        """'AdamW(weight_decay=0.1, foreach=True, fused=False)': the settings that change what a step moves, where
        they differ from the constructor's defaults."""
        try:
            defaults = {k: p.default for k, p in inspect.signature(self.cls.__init__).parameters.items()}
        except (TypeError, ValueError):
            defaults = {}
        shown = [f"{k}={v!r}" for k, v in self.kwargs.items()
                 if k in PRICED_SETTINGS and (k not in defaults or defaults[k] != v)]
        return f"{self.name}({', '.join(shown)})"


@dataclass
class LossSeen:
    """A loss module the script called on a model's output: ``loss_fn(model(x), y)``."""

    module: "TracedModel"               # the loss module's own record: its shadow, and its first call's inputs
    output: int                         # which tensor of the model's output it took (in pytree leaf order)
    shape: tuple[int, ...]              # the shape it took it in (a view of the output: logits.view(-1, V))
    by_identity: bool = True            # False: matched only by shape and dtype

    @property
    def targets(self) -> tuple:
        """Its other positional inputs (meta tensors), as its first call had them."""
        return tuple(self.module.args[1:])


@dataclass(eq=False)
class TracedModel:
    """One module the script called at top level: its first call's inputs (as metadata) and its call count."""

    name: str                      # unique in the run: "GPT", or "GPT-2" for a second GPT object
    type_name: str
    args: tuple                    # first call's positional inputs; tensors as meta tensors
    kwargs: dict[str, Any]         # first call's keyword inputs; likewise
    calls: int = 1                 # top-level calls
    signatures: set = field(default_factory=set, repr=False)   # distinct input shapes seen (capped)
    has_state: bool = True         # has parameters or buffers (known once the first call returned)
    first_call_raised: bool = False
    ran_backward: bool = False     # its parameters had gradients at a later call, a step or the end (backward ran)
    optimizer: OptimizerSeen | None = None   # the optimizer that stepped its parameters, at its first step
    loss: LossSeen | None = None   # the loss module called on its output, if one was
    finished: bool = False         # its first call has returned (or raised); has_state and shadow are set
    shadow: nn.Module | None = field(default=None, repr=False)    # meta copy, taken when the first call returned
    real: tuple | None = field(default=None, repr=False)          # (module, args, kwargs) for profile/optimize
    _ref: Any = field(default=None, repr=False)                   # weakref to the script's module
    _outputs: list = field(default_factory=list, repr=False)      # weakrefs to the last call's output tensors
    _loss_of: tuple | None = field(default=None, repr=False)      # (model, leaf, shape, by identity): a candidate

    @property
    def distinct_inputs(self) -> int:
        """How many different input shapes/dtypes its calls had (at most `_MAX_SIGNATURES` are told apart)."""
        return len(self.signatures)

    @property
    def module(self) -> nn.Module | None:
        """The script's module itself, if still alive."""
        if self.real is not None:
            return self.real[0]
        return self._ref() if self._ref is not None else None

    def target(self) -> nn.Module:
        """What analysis runs on: the meta shadow, else the module itself (if its shadow could not be made)."""
        target = self.shadow if self.shadow is not None else self.module
        if target is None:
            raise RuntimeError(f"{self.type_name} was freed by the script before it could be recorded")
        return target


_MAX_SIGNATURES = 1000

# The function torch's Module._call_impl runs the hooks from. The global pre-hook API passes no kwargs, but that
# frame holds them: reading them there lets the first call's keyword inputs be recorded before forward runs
# (a KV cache passed by keyword is updated by forward). If torch ever moves it, kwargs are taken after the call.
_CALL_IMPL_INNER = next((c for c in nn.Module._call_impl.__code__.co_consts
                         if isinstance(c, types.CodeType) and c.co_name == "inner"), None)


class ModelRecorder:
    """Context manager: while active, record every nn.Module called at top level (see the module docstring).

    Args:
        keep_real: also keep a strong reference to each module and a copy of its first call's real inputs
            (`TracedModel.real`), for profiling and rewriting, which run the model.

    The hooks never raise into the script: an internal failure is kept in `errors` and recording goes on.
    """

    def __init__(self, keep_real: bool = False) -> None:
        self.keep_real = keep_real
        self.models: list[TracedModel] = []
        self.errors: list[str] = []
        self._by_id: dict[int, TracedModel] = {}
        self._names: dict[str, int] = {}
        self._local = threading.local()
        self._lock = threading.RLock()
        self._handles: list[Any] = []
        # each optimizer seen stepping -> ids of the TracedModels already compared with it (the optimizer itself
        # is only weakly referenced: a script that makes a new one per epoch frees the old ones)
        self._optimizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._last_returned: TracedModel | None = None   # the model whose top-level call returned last

    def __enter__(self) -> "ModelRecorder":
        self._handles = [register_module_forward_pre_hook(self._pre_hook),
                         register_module_forward_hook(self._hook, with_kwargs=True, always_call=True),
                         register_optimizer_step_post_hook(self._optimizer_hook)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
            # torch's handle forgets the with_kwargs entry of a global forward hook; left there, it makes
            # torch.compile'd modules warn about global hooks for the rest of the process
            torch.nn.modules.module.__dict__.get("_global_forward_hooks_with_kwargs", {}).pop(handle.id, None)
        self._handles = []
        self._optimizers = weakref.WeakKeyDictionary()
        self._last_returned = None
        for traced in self.models:   # a first call that never returned (the script raised or exited inside it)
            if not traced.finished:
                self._finish_first_call(traced, traced.module)
            self._check_backward(traced, traced.module)   # a script whose last step was a backward
            traced._outputs, traced._loss_of = [], None

    # -- hooks ---------------------------------------------------------------------------------------------
    def _stack(self) -> list[nn.Module]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():   # inside a region torch.compile traces: see the module docstring
            return None
        stack = self._stack()
        # kwargs live in the caller's frame (torch's _call_impl.inner): see _CALL_IMPL_INNER
        caller = sys._getframe(1)
        if not stack and torch._C._current_autograd_node() is None:   # top level, and not a backward recompute
            kwargs = None
            if caller.f_code is _CALL_IMPL_INNER and caller.f_locals.get("self") is module:
                kwargs = caller.f_locals.get("kwargs")
            try:
                self._on_top_level_call(module, args, kwargs)
            except Exception as e:   # never break the user's script
                self._internal_error(e)
        del caller
        stack.append(module)

    def _hook(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        # normal return: (kwargs, output) as registered with_kwargs; after an exception torch passes (output,)
        if torch.compiler.is_compiling():
            return None
        stack = self._stack()
        if not stack or stack[-1] is not module:   # its pre-hook did not run (installed mid-call, or skipped)
            return None
        stack.pop()
        if stack:
            return None
        try:
            traced = self._by_id.get(id(module))
            if traced is None or traced.module is not module:
                return None
            if not traced.finished:
                if len(rest) == 2 and traced.kwargs is _PENDING:
                    traced.kwargs = _to_meta(dict(rest[0]))
                if len(rest) != 2:
                    traced.first_call_raised = True
                self._finish_first_call(traced, module)
                if traced._loss_of is not None:
                    self._confirm_loss(traced, rest[1] if len(rest) == 2 else None)
            if len(rest) == 2 and traced.has_state and traced.loss is None:
                # what the loss (a module called next, at top level) will be compared with: see _loss_candidate
                traced._outputs = [weakref.ref(t) for t in _tensor_leaves(rest[1])]
                self._last_returned = traced
        except Exception as e:
            self._internal_error(e)
        return None

    def _optimizer_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            return None
        try:
            self._on_optimizer_step(optimizer)
        except Exception as e:   # never break the user's script
            self._internal_error(e)
        return None

    # -- recording -----------------------------------------------------------------------------------------
    def _on_top_level_call(self, module: nn.Module, args: tuple, kwargs: dict | None) -> None:
        with self._lock:
            traced = self._by_id.get(id(module))
            if traced is not None and traced.module is module:
                traced.calls += 1
                if len(traced.signatures) < _MAX_SIGNATURES:
                    traced.signatures.add(_signature(args, kwargs))
                self._check_backward(traced, module)   # a training loop: the previous step's backward
                return
            type_name = type(unwrap(module)).__name__
            k = self._names[type_name] = self._names.get(type_name, 0) + 1
            traced = TracedModel(
                name=type_name if k == 1 else f"{type_name}-{k}", type_name=type_name, args=_to_meta(tuple(args)),
                kwargs=_to_meta(dict(kwargs)) if kwargs is not None else _PENDING,
                signatures={_signature(args, kwargs)}, _ref=weakref.ref(module))
            if self.keep_real:
                traced.real = (module, _clone(tuple(args)), _clone(dict(kwargs or {})))
            if args and isinstance(args[0], torch.Tensor) and not any(True for _ in unwrap(module).parameters()):
                traced._loss_of = self._loss_candidate(args[0])
            self._by_id[id(module)] = traced
            self.models.append(traced)

    def _loss_candidate(self, x: torch.Tensor) -> tuple | None:
        """(model, which output tensor, shape, by identity) if `x` is a model's last output: that tensor, or a
        view of it with as many elements (``logits.view(-1, V)``); else a tensor of the shape and dtype of an
        output of the model that returned last. None if neither."""
        base = x._base
        for traced in reversed(self.models):
            if traced.loss is not None:
                continue
            for i, ref in enumerate(traced._outputs):
                t = ref()
                if t is None:
                    continue
                if x is t or (base is not None and (base is t or base is t._base) and x.numel() == t.numel()):
                    return traced, i, tuple(x.shape), True
        last = self._last_returned
        if last is not None and last.loss is None:
            for i, ref in enumerate(last._outputs):
                t = ref()
                if t is not None and t.shape == x.shape and t.dtype == x.dtype:
                    return last, i, tuple(x.shape), False
        return None

    @staticmethod
    def _confirm_loss(traced: TracedModel, output: Any) -> None:
        """A candidate loss is one if its call returned a tensor autograd can differentiate (an inference-time
        softmax under no_grad is not a loss)."""
        model, leaf, shape, by_identity = traced._loss_of
        traced._loss_of = None
        if isinstance(output, torch.Tensor) and output.requires_grad and model.loss is None:
            model.loss = LossSeen(traced, leaf, shape, by_identity)
            model._outputs = []

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        with self._lock:
            compared = self._optimizers.get(optimizer)
            if compared is None:
                compared = self._optimizers[optimizer] = set()
            todo = [t for t in self.models if t.finished and t.has_state and id(t) not in compared]
            if not todo:
                return
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for traced in todo:
                compared.add(id(traced))
                module = traced.module
                if module is None:
                    continue
                params = list(unwrap(module).parameters())
                mine = sum(id(p) in held for p in params)
                if not mine:
                    continue
                if not traced.ran_backward:   # the step used gradients: they are still there after it
                    traced.ran_backward = any(p.grad is not None for p in params)
                if traced.optimizer is None:
                    traced.optimizer = _optimizer_seen(optimizer, mine, sum(p.requires_grad for p in params))
                elif len(traced.optimizer.others) < 10:
                    traced.optimizer.others.append(type(optimizer).__name__)

    def _finish_first_call(self, traced: TracedModel, module: nn.Module | None) -> None:
        traced.finished = True
        if traced.kwargs is _PENDING:   # the call raised before torch handed kwargs to a hook
            traced.kwargs = {}
        if module is None:
            return
        inner = unwrap(module)
        traced.has_state = any(True for _ in inner.parameters()) or any(True for _ in inner.buffers())
        if traced.real is None:
            try:
                traced.shadow = meta_shadow(inner)
            except Exception as e:   # an attribute that cannot be deep-copied: analyse the module itself later
                traced.real = (module, None, None)
                self.errors.append(f"{traced.name}: could not copy it to the meta device ({one_line(e)}); "
                                   f"keeping the module itself")

    @staticmethod
    def _check_backward(traced: TracedModel, module: nn.Module | None) -> None:
        # Reading .grad is all: a training loop's parameters have gradients from its previous step at the next
        # top-level call, and a script ending in backward leaves them set. (Hooks on the parameters or on the
        # autograd graph would see more, but would be shapeprof's objects inside the user's.)
        if traced.ran_backward or module is None:
            return
        traced.ran_backward = any(p.grad is not None for p in unwrap(module).parameters())

    def _internal_error(self, e: Exception) -> None:
        if len(self.errors) < 20:
            self.errors.append(one_line(e))


def _optimizer_seen(optimizer: torch.optim.Optimizer, parameters: int, trainable: int) -> OptimizerSeen:
    """What is kept of an optimizer at its first step (see `OptimizerSeen`)."""
    cls = type(optimizer)
    groups = optimizer.param_groups
    keys = _constructor_keys(cls)
    if keys is None:
        keys = set(getattr(optimizer, "defaults", {}))
    kwargs = {k: _plain(v) for k, v in groups[0].items() if k != "params" and k in keys}
    differing = tuple(k for k in PRICED_SETTINGS if k in kwargs
                      and any(_plain(g.get(k, kwargs[k])) != kwargs[k] for g in groups[1:]))
    state_dtypes: dict[str, torch.dtype] = {}
    for p in groups[0]["params"]:
        state = optimizer.state.get(p)
        if state:
            state_dtypes = {k: v.dtype for k, v in state.items() if isinstance(v, torch.Tensor)}
            break
    return OptimizerSeen(cls, kwargs, state_dtypes, parameters, trainable, len(groups), differing)


def _constructor_keys(cls: type) -> set[str] | None:
    """The keyword arguments an optimizer class's constructor takes by name (a subclass whose __init__ takes
    **kwargs: its nearest base's that names them); None if no class in its MRO names them."""
    for c in cls.__mro__:
        if c in (torch.optim.Optimizer, object):
            break
        try:
            params = inspect.signature(c.__init__).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        return {name for name in params if name not in ("self", "params")}
    return None


def _plain(value: Any) -> Any:
    """A setting as a plain value: a one-element tensor (a Tensor lr) as its number, tuples item by item; the
    optimizer's own tensors are never kept."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


class _Pending(dict):
    """Marker: keyword inputs not known yet (they are read when the first call returns)."""


_PENDING: Any = _Pending()


def _to_meta(tree: Any) -> Any:
    def convert(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        try:
            meta = torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="meta")
        except (RuntimeError, TypeError, NotImplementedError):   # sparse, nested: no strides
            meta = torch.empty(tuple(x.shape), dtype=x.dtype, device="meta")
        if x.requires_grad and (meta.is_floating_point() or meta.is_complex()):
            meta.requires_grad_(True)
        return meta
    return pytree.tree_map(convert, tree)


def _clone(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def _signature(args: tuple, kwargs: dict | None) -> tuple:
    leaves = pytree.tree_leaves((args, kwargs or {}))
    return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves)


# ---------------------------------------------------------------------------------------------- running a script

@dataclass
class ScriptRun:
    """What running the script gave: its models, and how it ended."""

    target: str                    # the script path or module name, as given
    is_module: bool
    argv: list[str]                # sys.argv as the script saw it at the start
    exit_code: int                 # as `python script.py` would exit
    exit_message: str | None = None            # sys.exit("text"): python prints it to stderr
    exception: BaseException | None = None     # uncaught; its traceback starts at the user's code
    models: list[TracedModel] = field(default_factory=list)   # in order of first call
    recorder_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    batches: list = field(default_factory=list)   # BatchStats of each shapeprof.generate_batch the script ran

    @property
    def name(self) -> str:
        return script_name(self.target, self.is_module)


def script_name(target: str, is_module: bool = False) -> str:
    """A script's name for paths: 'train' for train.py, the directory's name for a directory, 'mypkg.serve' for
    a module."""
    if is_module:
        return target
    path = Path(target).resolve()
    return (path.name if path.is_dir() else path.stem) or "script"


class ScriptNotFound(ValueError):
    """The script file or module to run does not exist; the message is one line."""


def check_target(target: str, is_module: bool) -> None:
    """Raise `ScriptNotFound` (one line) unless `target` can be run; never runs or imports the script itself."""
    if not is_module:
        path = Path(target)
        if not path.exists():
            raise ScriptNotFound(f"can't open file '{target}': no such file")
        if path.is_dir() and not (path / "__main__.py").exists():
            raise ScriptNotFound(f"'{target}' is a directory without a __main__.py")
        return
    import importlib.util
    saved_path = sys.path[:]
    sys.path.insert(0, os.getcwd())   # as `python -m` has the working directory on sys.path
    try:
        spec = importlib.util.find_spec(target)
        if spec is not None and spec.submodule_search_locations is not None:   # a package: runs its __main__
            spec = importlib.util.find_spec(f"{target}.__main__")
            if spec is None:
                raise ScriptNotFound(f"'{target}' is a package and has no __main__ module")
    except (ImportError, ValueError) as e:
        raise ScriptNotFound(f"cannot find module '{target}': {one_line(e)}") from None
    except Exception:   # its package's __init__ raised: running it shows that with the user's traceback
        return
    finally:
        sys.path[:] = saved_path
    if spec is None:
        raise ScriptNotFound(f"no module named '{target}'")


def run_script(target: str, args: list[str] | tuple[str, ...] = (), *, is_module: bool = False,
               keep_real: bool = False, stdout_to_stderr: bool = False) -> ScriptRun:
    """Run a script (or ``-m`` module) as python would, recording the models it calls. Never raises for the
    script's sake: its exit code, `sys.exit` message and uncaught exception are in the returned `ScriptRun`.

    Args:
        target: path of the script (or of a directory with __main__.py), or a module name with `is_module`.
        args: the script's arguments (``sys.argv[1:]`` as it sees them).
        is_module: run `target` like ``python -m target`` (``runpy.run_module(alter_sys=True)``).
        keep_real: see `ModelRecorder`.
        stdout_to_stderr: send the script's stdout to stderr, at the file-descriptor level (so subprocesses and
            C extensions follow): for ``--json``, whose stdout must be nothing but JSON.

    sys.argv and sys.path are restored afterwards; the modules the script imported stay imported.
    """
    saved_argv, saved_path = sys.argv, sys.path[:]
    recorder = ModelRecorder(keep_real=keep_real)
    run = ScriptRun(target, is_module, [target, *args], 0)
    start = time.perf_counter()
    namespace = None   # the script's globals: kept until the recorder has looked at its models a last time
    try:
        sys.argv = [target, *args]
        with (_stdout_to_stderr() if stdout_to_stderr else contextlib.nullcontext()), recorder, \
                observe_batches() as run.batches:
            if is_module:
                sys.path.insert(0, os.getcwd())
                namespace = runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                namespace = runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        run.exit_code, run.exit_message = _exit_status(e.code)
    except BaseException as e:   # KeyboardInterrupt too: a Ctrl-C'd training loop still gets its reports
        run.exception = e.with_traceback(_user_traceback(e.__traceback__))
        run.exit_code = 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        run.seconds = time.perf_counter() - start
    del namespace
    run.models = recorder.models
    run.recorder_errors = recorder.errors
    return run


def _exit_status(code: Any) -> tuple[int, str | None]:
    """What python makes of ``sys.exit(code)``: None -> 0, an int -> itself, anything else -> printed, 1."""
    if code is None:
        return 0, None
    if isinstance(code, int):
        return int(code), None
    return 1, str(code)


def _user_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback from the first frame that is the user's: shapeprof's and runpy's frames dropped."""
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if not (name == "runpy" or name == "shapeprof" or name.startswith("shapeprof.")):
            break
        tb = tb.tb_next
    return tb


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """sys.stdout -> sys.stderr, and file descriptor 1 -> 2 (for subprocesses, C extensions, os.write)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    try:
        os.fstat(1), os.fstat(2)
        saved = os.dup(1)
    except OSError:
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


# ---------------------------------------------------------------------------------------------- analysis

#: analyze()'s own keyword arguments: a model input by one of these names cannot be passed through it.
