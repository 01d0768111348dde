"""Snapshots: what a run of the user's model changes (tensors it writes, the RNG) is saved first and put back.

`profile` and `optimize` run the user's model on the user's own parameters and buffers (shared, not copied) and
on the user's inputs. A forward may write them in place: BatchNorm's running statistics in train mode, a step
counter (``self.count += 1``), ``self.w.data.mul_(2)``, ``x.add_(1)`` on its input; it may draw random numbers
(dropout, ``torch.rand``). Nothing the user passes in may change, so:

- `WriteSnapshot` watches runs with a TorchDispatchMode. Before an ATen op writes a tensor that was not made
  during that run (a parameter, a buffer, a tensor attribute, a global: any view of them, ``.data`` included),
  it clones the written view, once per view; `restore()` writes the clones back, newest first. So it copies what
  a forward writes, not the whole model: a BatchNorm's statistics, not its weights. The watched run pays a Python
  call per ATen op, so only untimed runs are watched; a tensor's ``_version`` cannot do this alone, because a
  write through ``.data`` does not bump the parameter's version.
- `copy_inputs` copies input tensors with their sizes, strides and dtype (strides decide what a node costs: a
  transposed input makes ``contiguous`` copy), so a run writes only the copies.
- `rng_kept` puts the CPU generator and those of the CUDA devices used back after the block.

    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(4).train()
    >>> snap = WriteSnapshot()
    >>> with torch.no_grad(), snap.watch():
    ...     _ = bn(torch.randn(8, 4))
    >>> int(bn.num_batches_tracked), snap.saved_bytes   # running_mean, running_var (16 B each), the count (8 B)
    (1, 40)
    >>> snap.restore(); int(bn.num_batches_tracked)
    0
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .capture import tensors_inside

__all__ = ["WriteSnapshot", "copy_inputs", "rng_kept"]

_Key = tuple  # (device, storage data_ptr): which memory a tensor lives in


def _storage_key(t: torch.Tensor) -> _Key | None:
    """The storage `t` lives in, or None where it has none to save (meta, empty, mkldnn, sparse, a subclass
    that hides its storage: a packed weight a rewrite made is such, and is not the user's)."""
    if t.is_meta:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return (t.device, ptr) if ptr else None


@dataclass
class _Saved:
    tensor: torch.Tensor          # the view that was written (it keeps the storage alive)
    storage: Any                  # its storage, offset, size and stride then: a set_ or resize_ is undone too
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    values: torch.Tensor


class WriteSnapshot:
    """The values of every pre-existing tensor the watched runs wrote, as they were before the first write.

    A tensor counts as pre-existing when its storage is first seen as an argument of an op rather than as a
    new output (an intermediate's memory, reused by the allocator, can never be a tensor that lived through the
    run). `ours` tensors given to `watch` (copies made for the run) are noted when written but not saved.
    """

    def __init__(self) -> None:
        self._saved: list[_Saved] = []
        self._views: set[tuple] = set()      # (storage key, offset, size, stride) already saved
        self.written: set[_Key] = set()      # storages of pre-existing tensors written, `ours` included

    @contextlib.contextmanager
    def watch(self, ours: Iterable[Any] = ()) -> Iterator["WriteSnapshot"]:
        """Watch one run: save what it writes before it writes it."""
        skip = {k for t in pytree.tree_leaves(list(ours)) if isinstance(t, torch.Tensor)
                and (k := _storage_key(t)) is not None}
        with _Watch(self, skip):
            yield self

    def restore(self) -> None:
        """Write every saved view back (newest first, so overlapping views end at their oldest values). The
        snapshot stays: a later run that writes the same tensors is restored to the same values."""
        with torch.no_grad():
            for s in reversed(self._saved):
                t = s.tensor
                if (t.untyped_storage().data_ptr() != s.storage.data_ptr() or t.storage_offset() != s.offset
                        or tuple(t.shape) != s.size or tuple(t.stride()) != s.stride):
                    t.set_(s.storage, s.offset, s.size, s.stride)
                t.copy_(s.values)

    def wrote(self, t: torch.Tensor) -> bool:
        """Whether a watched run wrote the memory `t` lives in."""
        key = _storage_key(t)
        return key is not None and key in self.written

    @property
    def saved_bytes(self) -> int:
        """What the snapshot holds: the bytes of the views written."""
        return sum(s.values.numel() * s.values.element_size() for s in self._saved)

    def _save(self, t: torch.Tensor, key: _Key) -> None:
        view = (key, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if view in self._views:
            return
        self._views.add(view)
        self._saved.append(_Saved(t, t.untyped_storage(), *view[1:], t.clone()))


class _Watch(TorchDispatchMode):
    def __init__(self, snapshot: WriteSnapshot, ours: set[_Key]):
        super().__init__()
        self.snapshot = snapshot
        self.ours = ours
        self.outside: dict[_Key, bool] = {}   # storage -> lived before this run (True) or made by it (False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and (key := _storage_key(t)) is not None:
                self.outside.setdefault(key, True)
        for t in _written(func, args, kwargs):
            key = _storage_key(t)
            if key is not None and self.outside.get(key):
                self.snapshot.written.add(key)
                if key not in self.ours:
                    self.snapshot._save(t, key)   # ops called here run unwatched: the mode is off inside
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and (key := _storage_key(t)) is not None:
                self.outside.setdefault(key, False)
        return out


# Ops that write arguments their schema does not mark as written: the batch norm kernels update the running
# statistics in train mode (``native_batch_norm(Tensor input, ..., Tensor? running_mean, ...)``). Treated as
# always written: in eval mode that saves two small vectors for nothing.
_UNMARKED_WRITES = {"native_batch_norm": ("running_mean", "running_var"),
                    "cudnn_batch_norm": ("running_mean", "running_var"),
                    "miopen_batch_norm": ("running_mean", "running_var")}


def _written(func, args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The tensors `func` writes: the arguments its schema marks ``Tensor(a!)`` (in-place ``self``, ``out=``),
    and those of `_UNMARKED_WRITES`."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return
    unmarked = _UNMARKED_WRITES.get(schema.name.removeprefix("aten::"), ())
    for i, arg in enumerate(schema.arguments):
        if (arg.alias_info is None or not arg.alias_info.is_write) and arg.name not in unmarked:
            continue
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor):
                yield t


def copy_inputs(tree: Any) -> Any:
    """`tree` with every tensor copied: same sizes, strides, dtype, device and requires_grad; a tensor given
    twice is copied once. Objects that hold tensors (a HuggingFace cache a forward appends to) are deep-copied
    around the copied tensors, so each run fills its own; an object that cannot be copied is passed as it is (a
    watched run still restores the tensors of it that it writes)."""
    memo: dict[int, Any] = {}
    for t in tensors_inside(tree):
        if id(t) not in memo:
            memo[id(t)] = _copy_tensor(t)
    try:
        return copy.deepcopy(tree, memo)
    except Exception:
        return pytree.tree_map(lambda x: memo.get(id(x), x) if isinstance(x, torch.Tensor) else x, tree)


def _copy_tensor(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if x.layout == torch.strided and type(x) in (torch.Tensor, torch.nn.Parameter) and not x.is_meta:
            # copy the span of memory the view reaches and view it the same way: an expanded (stride 0) or
            # transposed input keeps its strides, which clone() would not for the expanded one
            span = 1 + sum((n - 1) * s for n, s in zip(x.shape, x.stride())) if x.numel() else 0
            base = x.detach().as_strided((span,), (1,), x.storage_offset()).clone()
            y = base.as_strided(tuple(x.shape), tuple(x.stride()))
        else:
            y = x.detach().clone()
    if x.requires_grad:
        y.requires_grad_(True)
    return y


@contextlib.contextmanager
def rng_kept(devices: Iterable[torch.device]) -> Iterator[None]:
    """The CPU generator and those of the CUDA devices in `devices` are put back as they were after the block."""
    cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                   for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield
