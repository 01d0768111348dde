"""Memory over a training step: the bytes of the tensors alive at each op of forward and backward, and their peak.

A GPU's caching allocator holds every tensor until the last reference to its storage goes; what
``torch.cuda.max_memory_allocated`` reports is the most those storages ever took at once. `LiveBytes` follows the
same storages while the step runs on meta: every storage an op creates is counted from that op until Python frees
it (a finalizer on the storage object, which torch keeps alive exactly as long as the storage), so the saved
activations, the gradients as backward makes them, the temporaries of each op and the logits a loss keeps are all
in it, each storage once, views and in-place writes adding nothing. What existed before (the weights, the inputs)
is the base, not counted here.

Checked against torch's own accounting: on a real CPU run, the allocation events of
``torch.profiler.profile(profile_memory=True)`` add up to the same peak (tests/test_step_memory.py).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 1000)).to("meta")
    >>> x = torch.randn(500, 1000, device="meta")
    >>> live = LiveBytes(known=[*net.parameters(), x])
    >>> with live.watching():
    ...     net(x).sum().backward()
    >>> live.peak, live.peak_at.phase, live.current   # after backward: the four gradients, 8,008,000 bytes
    (10008008, 'backward', 8008000)
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .records import tensors_in

__all__ = ["LiveBytes", "PeakAt"]


@dataclass(frozen=True)
class PeakAt:
    """Where the most memory was alive: the phase, the module and the op that made the last allocation."""

    bytes: int            # above the base (weights, inputs, optimizer state)
    phase: str            # "forward", "backward", "optimizer"
    module: str           # a module path; "" the model itself, "(loss)" the loss
    op: str               # "aten.mm"

    def __str__(self) -> str:
        where = f" in {self.module!r}" if self.module else ", in the model's own forward code"
        return f"{self.phase}{where} ({self.op})"


class LiveBytes:
    """The bytes of the storages created since it started that are still alive, and the most there were at once.

    `created(out, where)` is told every op's output (an OpRecorder subclass calls it); `where()` is asked for a
    (phase, module) only when a new peak is reached.
    """

    def __init__(self, known: Iterable[torch.Tensor] = (),
                 weight: Callable[[torch.Tensor], float] | None = None) -> None:
        # torch imports torch._dynamo on the first call of a function it keeps dynamo out of (F.linear's path
        # has one): imported in the middle of a run, the frames running then stay referenced by the import's
        # own cycles, and their tensors would count as alive until a garbage collection. Import it first.
        import torch._dynamo  # noqa: F401
        self._known = {_key(t) for t in known}
        self._weight = weight   # a storage counts for this many (a representative standing for its twins)
        self._alive: dict[int, int] = {}
        self._finalizers: list[weakref.finalize] = []
        self.current = 0
        self.peak = 0
        self.peak_at = PeakAt(0, "forward", "", "")

    def know(self, tensors: Iterable[torch.Tensor]) -> None:
        """Storages that exist anyway (weights, inputs): never counted."""
        self._known.update(_key(t) for t in tensors)

    def created(self, out: Any, op: Any, where: Callable[[], tuple[str, str]]) -> None:
        if getattr(op, "is_view", False):   # a view's storage is its base's: nothing new (and views are many)
            return
        for t in (out,) if isinstance(out, torch.Tensor) else tensors_in(out):
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):   # no storage (sparse, nested): not followed
                continue
            key = storage._cdata
            if key in self._alive or key in self._known:
                continue
            nbytes = storage.nbytes() * (self._weight(t) if self._weight is not None else 1)
            self._alive[key] = nbytes
            self._finalizers.append(weakref.finalize(storage, self._free, key))
            self.current += nbytes
            if self.current > self.peak:
                self.peak = self.current
                phase, module = where()
                name = str(op.overloadpacket) if hasattr(op, "overloadpacket") else str(op)
                self.peak_at = PeakAt(self.peak, phase, module, name)

    def _free(self, key: int) -> None:
        self.current -= self._alive.pop(key, 0)

    def close(self) -> None:
        """Stop following: the finalizers of storages still alive are detached (they would only count down)."""
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()

    @contextlib.contextmanager
    def watching(self, where: Callable[[], tuple[str, str]] | None = None) -> Iterator["LiveBytes"]:
        """Follow every op dispatched inside (on its own, outside a recorder that calls `created`); by default
        an op run by the autograd engine is of the backward."""
        mode = _Watch(self, where or _phase_now)
        with mode:
            yield self


class _Watch(TorchDispatchMode):
    def __init__(self, live: LiveBytes, where) -> None:
        super().__init__()
        self.live, self.where = live, where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live.created(out, func, self.where)
        return out


def _phase_now() -> tuple[str, str]:
    return ("backward" if torch._C._current_autograd_node() is not None else "forward"), ""


def _key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return id(t)
