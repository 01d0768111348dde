"""Guards: what a rewritten forward assumed about its module, checked on every call.

A rewritten graph is the module's forward as symbolic tracing saw it: the submodules it called (or inlined), the
attribute values it read (a ``temperature``, a ``use_act`` flag), no hooks, the parameters' dtypes and devices.
Change any of these after optimize - register a hook, set the flag, wrap a Linear in a LoRA module, ``.half()``
- and the graph no longer is the forward. So, as torch.compile guards its graphs, the graph runs only while
everything it assumed still holds; otherwise the class's own forward runs, correct and unoptimized, and
`violation` says why (the drop-in warns once, naming it).

What is checked, for every module of the rewritten subtree: the same module objects as children; the same
hooks (forward, pre-forward, backward) and no new global ones; the same training mode; the same plain attribute
values (by identity, or equality for numbers, strings and tuples of them) and no new attributes; parameters and
buffers present with the same shape, dtype and device. A parameter *object* may change (``load_state_dict(...,
assign=True)``): the graph reads it through the module, so the new one is used.

`Follow` keeps the drop-in's parameters and buffers in step with the user's original model, which it shares them
with: when the original gets new tensor objects (``load_state_dict(assign=True)`` on the original), the drop-in
takes them too, unless the drop-in's own were replaced since (then the drop-in's are the user's choice).

The checks are plain Python over the subtree, a few microseconds per module per call.

    >>> import torch
    >>> block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> state = SubtreeState(block)
    >>> state.violation(block) is None
    True
    >>> _ = block[0].register_forward_hook(lambda *a: None)
    >>> state.violation(block)
    "'0' (Linear) has a forward hook registered after optimize"
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import is_
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules import module as _module_globals

__all__ = ["Follow", "SubtreeState"]

# nn.Module's own bookkeeping: not attribute values a forward reads
_INTERNAL = frozenset({
    "_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set", "_is_full_backward_hook",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_compiled_call_impl", "shapeprof_report"})
_HOOKS = {"_forward_hooks": "forward ", "_forward_pre_hooks": "forward pre-", "_backward_hooks": "backward ",
          "_backward_pre_hooks": "backward pre-"}
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)
MISSING = object()


def _plain(v: Any) -> bool:
    return isinstance(v, _PLAIN) or (type(v) is tuple and all(_plain(x) for x in v))


@dataclass
class _Entry:
    module: nn.Module
    label: str
    training: bool
    children: tuple[tuple[str, Any], ...]
    tensors: tuple[tuple[str, str, tuple, torch.dtype, torch.device], ...]   # (group, name, shape, dtype, device)
    hooks: tuple[tuple[str, tuple], ...]                                     # (dict name, hook ids)
    attrs: tuple[tuple[str, Any], ...]
    n_attrs: int
    # the same, for the fast check (`SubtreeState.unchanged`): every value of the module's __dict__ the checks read
    n_dict: int = 0
    watched: tuple[str, ...] = ()
    values: tuple = ()


class SubtreeState:
    """What a module subtree looked like when its graph was installed."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.entries = [self._entry(m, path) for path, m in root.named_modules()]
        self.global_hooks = self._global_hooks()

    @staticmethod
    def _entry(m: nn.Module, path: str) -> _Entry:
        label = f"'{path}' ({type(m).__name__})" if path else f"the module ({type(m).__name__})"
        d = vars(m)
        tensors = tuple((group, name, tuple(t.shape), t.dtype, t.device)
                        for group in ("_parameters", "_buffers") for name, t in d[group].items() if t is not None)
        attrs = tuple((k, v) for k, v in d.items() if k not in _INTERNAL and k not in _HOOKS)
        watched = tuple(k for k, _ in attrs)
        return _Entry(m, label, m.training, tuple(d["_modules"].items()), tensors,
                      tuple((name, tuple(d[name])) for name in _HOOKS if name in d), attrs, len(attrs),
                      len(d), watched, tuple(d[k] for k in watched))

    @staticmethod
    def _global_hooks() -> tuple:
        return tuple(tuple(getattr(_module_globals, name, {})) for name in _GLOBAL_HOOKS)

    def unchanged(self, module: nn.Module) -> bool:
        """True when every value the checks read is the very object it was (and every tensor has its shape,
        dtype and device): then `violation` is None. A decode step is short, so this runs at C speed where it can
        (identity over tuples); False only means: ask `violation`."""
        if module is not self.root or self._global_hooks() != self.global_hooks:
            return False
        for e in self.entries:
            d = vars(e.module)
            if len(d) != e.n_dict or d["training"] is not e.training:
                return False
            if not all(map(is_, map(d.__getitem__, e.watched), e.values)):
                return False
            for name, ids in e.hooks:
                if len(d[name]) != len(ids) or (ids and tuple(d[name]) != ids):
                    return False
            if tuple(d["_modules"].items()) != e.children:   # modules compare by identity
                return False
            for group, name, shape, dtype, device in e.tensors:
                t = d[group].get(name)
                if t is None or t.dtype is not dtype or t.shape != shape or t.device != device:
                    return False
        return True

    def violation(self, module: nn.Module) -> str | None:
        """Why `module` (the one the state was taken of) no longer runs as its graph, or None."""
        if self.unchanged(module):
            return None
        if module is not self.root:
            return "this is a copy of the optimized module (copy.deepcopy): its graph was checked on the original"
        if self._global_hooks() != self.global_hooks:
            return "global module hooks were registered or removed after optimize"
        for e in self.entries:
            d = vars(e.module)
            if e.module.training != e.training:
                return f"{e.label} is in {'training' if e.module.training else 'eval'} mode now"
            for name, ids in e.hooks:
                if tuple(d[name]) != ids:
                    return f"{e.label} has a {_HOOKS[name]}hook registered after optimize"
            modules = d["_modules"]
            if len(modules) != len(e.children):
                return f"{e.label} has other submodules now"
            for name, child in e.children:
                if modules.get(name, MISSING) is not child:
                    return f"{e.label}.{name} was replaced (a wrapper, another module) after optimize"
            for group, name, shape, dtype, device in e.tensors:
                t = d[group].get(name)
                if t is None:
                    return f"{e.label}.{name} was removed"
                if t.dtype != dtype or t.device != device or tuple(t.shape) != shape:
                    return (f"{e.label}.{name} is {str(t.dtype).removeprefix('torch.')} on {t.device} now, "
                            f"{str(dtype).removeprefix('torch.')} on {device} when optimized")
            for name, value in e.attrs:
                now = d.get(name, MISSING)
                if now is not value and not (_plain(value) and type(now) is type(value) and now == value):
                    return f"{e.label}.{name} changed after optimize"
            if sum(1 for k in d if k not in _INTERNAL and k not in _HOOKS) != e.n_attrs:
                return f"{e.label} has other attributes now"
        return None


class Follow:
    """Keeps a drop-in subtree's tensors the same objects as the original's (see the module docstring)."""

    def __init__(self, original: nn.Module, dropin: nn.Module):
        self.pairs: list[list] = []   # [original module, drop-in module, group, name, last seen tensor]
        ours = dict(dropin.named_modules())
        for path, m in original.named_modules():
            twin = ours.get(path)
            if twin is None:
                continue
            for group in ("_parameters", "_buffers"):
                for name, t in vars(m)[group].items():
                    if t is not None and vars(twin)[group].get(name) is t:
                        self.pairs.append([m, twin, group, name, t])

    def sync(self) -> None:
        for pair in self.pairs:
            original, twin, group, name, last = pair
            now = vars(original)[group].get(name)
            if now is last:
                continue
            ours = vars(twin)[group]
            if ours.get(name) is last and now is not None:   # the drop-in's own are as they were: take the new
                ours[name] = now
            pair[4] = now
