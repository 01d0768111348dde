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
top level: they are part of the model that owns them. Analysis covers the forward pass only; whether the script
also ran backward through a model is read from its parameters' ``.grad`` (only read: no hook on a tensor, nothing
patched) at each later top-level call and when the script ends, and the model's report then says so
(`TracedModel.ran_backward`; `shapeprof.session` notes it). The hooks are removed in ``finally``, even when the script
raises; nothing is left on the user's modules (global hooks live in torch's tables, not on the modules).
Analysis happens after the script finishes, on the recorded shadows.

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
from torch.utils import _pytree as pytree

from .batching import observe_batches
from .capture import meta_shadow, unwrap
from .text import one_line

__all__ = ["ModelRecorder", "ScriptNotFound", "ScriptRun", "TracedModel", "check_target", "run_script", "script_name"]

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
    ran_backward: bool = False     # its parameters had gradients at a later call or at the end (backward ran)
    finished: bool = False         # its first call has returned (or raised); has_state and shadow are set
    shadow: nn.Module | None = field(default=None, repr=False)    # meta copy, taken when the first call returned
    real: tuple | None = field(default=None, repr=False)          # (module, args, kwargs) for profile/optimize
    _ref: Any = field(default=None, repr=False)                   # weakref to the script's module

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

    def __enter__(self) -> "ModelRecorder":
        self._handles = [register_module_forward_pre_hook(self._pre_hook),
                         register_module_forward_hook(self._hook, with_kwargs=True, always_call=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
            # torch's handle forgets the with_kwargs entry of a global forward hook; left there, it makes
            # torch.compile'd modules warn about global hooks for the rest of the process
            torch.nn.modules.module.__dict__.get("_global_forward_hooks_with_kwargs", {}).pop(handle.id, None)
        self._handles = []
        for traced in self.models:   # a first call that never returned (the script raised or exited inside it)
            if not traced.finished:
                self._finish_first_call(traced, traced.module)
            self._check_backward(traced, traced.module)   # a script whose last step was a backward

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
            if traced is not None and traced.module is module and not traced.finished:
                if len(rest) == 2 and traced.kwargs is _PENDING:
                    traced.kwargs = _to_meta(dict(rest[0]))
                if len(rest) != 2:
                    traced.first_call_raised = True
                self._finish_first_call(traced, module)
        except Exception as e:
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
            self._by_id[id(module)] = traced
            self.models.append(traced)

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
