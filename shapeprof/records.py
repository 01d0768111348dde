"""ATen op records: what a captured node ran, as shapes and dtypes, never tensors.

Costs are a function of these records only (see costs.py), whichever way the graph was captured:
a module-level fx node owns the records of every ATen op it dispatched, an ATen-level node owns one.

    >>> import torch
    >>> with OpRecorder() as rec:
    ...     _ = torch.ones(2, 3, device="meta") @ torch.ones(3, 4, device="meta")
    >>> [str(r.op) for r in rec.records]
    ['aten.ones.default', 'aten.ones.default', 'aten.mm.default']
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape, dtype and strides of one tensor an op read or wrote."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...]

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorMeta":
        try:
            stride = tuple(t.stride())
        except (RuntimeError, NotImplementedError):  # sparse / nested layouts have no strides
            stride = ()
        return cls(tuple(t.shape), t.dtype, stride)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of distinct memory the tensor addresses.

        A broadcast (expanded) dimension has stride 0 and is read once, not once per index, so
        `bias.expand(4096, 1024)` addresses 1024 elements, not 4M.
        """
        if not self.stride:
            return self.numel * self.itemsize
        n = 1
        for size, stride in zip(self.shape, self.stride):
            if stride != 0:
                n *= size
        if 0 in self.shape:
            n = 0
        return n * self.itemsize


@dataclass(frozen=True, slots=True)
class OpRecord:
    """One ATen op call: the overload, its arguments with tensors replaced by TensorMeta, its outputs."""

    op: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    outputs: tuple[TensorMeta, ...]

    @classmethod
    def of(cls, op: torch._ops.OpOverload, args: tuple, kwargs: dict | None, out: Any) -> "OpRecord":
        seen: dict[int, TensorMeta] = {}   # one TensorMeta per tensor, so `x * x` reads x once
        return cls(op, _to_meta(args, seen), {k: _to_meta(v, seen) for k, v in (kwargs or {}).items()},
                   tuple(_tensors(out)))

    @property
    def name(self) -> str:
        """`aten.addmm.default` -> `aten.addmm` (the overload packet: the key of the cost registry)."""
        return str(self.op.overloadpacket) if hasattr(self.op, "overloadpacket") else str(self.op)

    def input_metas(self) -> list[TensorMeta]:
        """Every TensorMeta among args and kwargs, in order, nested lists flattened."""
        found: list[TensorMeta] = []
        _collect(self.args, found)
        _collect(tuple(self.kwargs.values()), found)
        return found


def _to_meta(x: Any, seen: dict[int, TensorMeta]) -> Any:
    if isinstance(x, torch.Tensor):
        meta = seen.get(id(x))
        if meta is None:
            meta = seen[id(x)] = TensorMeta.of(x)
        return meta
    if isinstance(x, (list, tuple)):
        items = (_to_meta(v, seen) for v in x)
        return type(x)(items) if type(x) in (list, tuple) else tuple(items)
    return x


def _tensors(x: Any):
    if isinstance(x, torch.Tensor):
        yield TensorMeta.of(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _collect(x: Any, found: list) -> None:
    for v in x:
        if isinstance(v, TensorMeta):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            _collect(v, found)


# Ops whose whole meaning is lost when the dispatcher decomposes them (on the meta device
# scaled_dot_product_attention falls back to the math path: a materialised mask, two bmm and a
# softmax, with no trace of is_causal). They are recorded as the one ATen op they stand for,
# which is also what torch.export keeps in its graphs.
_RECORD_WHOLE = {
    F.scaled_dot_product_attention: torch.ops.aten.scaled_dot_product_attention.default,
}


class OpRecorder(TorchDispatchMode):
    """Records every ATen op dispatched inside it into `self.records` (or the list set by `into`).

    With `meta=True`, an op that mixes meta tensors with tensors holding data runs on meta copies of them: a
    model run on meta can still meet real tensors (a module kept in a global rather than as a submodule, a
    tensor its forward makes on the CPU), and only their shapes matter here.
    """

    def __init__(self, meta: bool = False) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self.meta = meta
        self._paused = 0
        self._whole = _WholeOpRecorder(self)

    def into(self, sink: list[OpRecord]) -> None:
        """Send the next records to `sink` (capture points this at the current node's list)."""
        self.records = sink

    def __enter__(self):
        super().__enter__()
        self._whole.__enter__()
        return self

    def __exit__(self, *exc):
        self._whole.__exit__(*exc)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.meta and _mixes_meta((args, kwargs)):
            args, kwargs = _as_meta(args), _as_meta(kwargs)
        out = _grouped_mm_on_meta(args, kwargs) if func is _GROUPED_MM else func(*args, **kwargs)
        if not self._paused:
            self.record(func, args, kwargs, out)
        return out

    def record(self, op, args, kwargs, out) -> None:
        """Called with the real tensors of every op; subclasses that need more than metadata override it."""
        self.records.append(OpRecord.of(op, args, kwargs, out))


_GROUPED_MM = getattr(torch.ops.aten, "_grouped_mm", None)
_GROUPED_MM = _GROUPED_MM.default if _GROUPED_MM is not None else None


def _grouped_mm_on_meta(args: tuple, kwargs: dict) -> Any:
    """aten._grouped_mm, whose meta kernel accepts bf16 only while its CPU kernel (and transformers, which calls it
    on meta for any dtype) takes fp32 and fp16 too: on meta tensors of another float type, the output's shape comes
    from the meta kernel on bf16 stand-ins, in the inputs' dtype."""
    a, b = args[0], args[1]
    if not (a.is_meta and b.is_meta) or a.dtype == torch.bfloat16 or not a.is_floating_point():
        return _GROUPED_MM(*args, **kwargs)
    cast = tuple(x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args)
    out = _GROUPED_MM(*cast, **{k: v for k, v in kwargs.items() if k != "out_dtype"})
    return out.to(kwargs.get("out_dtype") or a.dtype)


def _mixes_meta(tree: Any) -> bool:
    # runs for every op of a meta capture: a loop, no generator, and it stops at the first mix
    meta = other = False
    todo = [tree]
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            if x.is_meta:
                meta = True
            else:
                other = True
            if meta and other:
                return True
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
        elif isinstance(x, dict):
            todo.extend(x.values())
    return False


def tensors_in(x: Any):
    """The tensors in `x` and in the lists, tuples and dicts inside it, in order."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors_in(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors_in(v)


def _as_meta(x: Any) -> Any:
    # inside __torch_dispatch__ this mode is not active: making the copies records nothing
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta":
            return x
        return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_as_meta(v) for v in x) if type(x) in (list, tuple) else x
    if isinstance(x, dict):
        return {k: _as_meta(v) for k, v in x.items()}
    return x


class _WholeOpRecorder(TorchFunctionMode):
    def __init__(self, recorder: OpRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten_op = _RECORD_WHOLE.get(func)
        if aten_op is None or self.recorder._paused:
            return func(*args, **kwargs)
        self.recorder._paused += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.recorder._paused -= 1
        self.recorder.record(aten_op, args, kwargs, out)
        return out
