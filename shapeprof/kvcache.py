"""The KV cache a rewritten decoder runs with, and the runtime that decides call by call what it may reuse.

`rewrites.kv_cache` turns a decoder's forward into a graph that takes, besides the token ids, a `KVCache`: every
causal attention writes the keys and values of the new positions into a preallocated buffer (in place, at
``[start, start + T)`` along the sequence) and attends over ``[0, start + T)``. What runs that graph:

- `IncrementalDecoder.__call__`: the drop-in's forward. A call whose token ids extend the ones of the last call
  (the same batch, the same prefix: compared, not assumed) computes only the new positions; a call that shares a
  shorter prefix (a rewind) reuses that prefix; anything else (a new prompt, a window shifted at block_size,
  another batch size, training mode, other arguments, weights changed in between) runs from scratch and fills
  the cache again. The output is what the original returns: a full-sequence output is kept in a history buffer
  and returned whole, a last-position output as computed.
- `IncrementalDecoder.prefill` / `decode`: the explicit form for a serving loop, with a `DecodeState` per
  sequence batch and the cache's size chosen up front.

Buffers grow by doubling (never a ``torch.cat`` per step, which is O(n^2) in copies) up to the model's maximum
length, or are fixed at ``max_tokens``. They live in the `KVCache` object, on the device and in the dtype of the
keys written into them, and are never registered on the model: ``state_dict()`` does not change.

    >>> import torch
    >>> cache = KVCache()
    >>> cache.append(0, torch.ones(1, 2, 3, 4), dim=2).shape      # a prompt of 3 positions
    torch.Size([1, 2, 3, 4])
    >>> cache.start = 3
    >>> cache.append(0, torch.zeros(1, 2, 1, 4), dim=2).shape     # one more: attends over 4
    torch.Size([1, 2, 4, 4])
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .text import fmt_bytes

__all__ = ["CacheFull", "DecodeError", "DecodeState", "IncrementalDecoder", "KVCache", "MISSING", "OutputKind",
           "causal_attention", "causal_mask", "kv_start"]

MISSING = object()          # the decoder cannot serve this call: the drop-in's other forward runs it
_FIRST_CAPACITY = 256       # positions a growing buffer starts with


class DecodeError(RuntimeError):
    """prefill/decode cannot run this call (one line naming why)."""


class CacheFull(DecodeError):
    """A fixed-size cache (``max_tokens``) has no room for the new positions."""


# ---------------------------------------------------------------------------------------------- the cache

class KVCache:
    """Preallocated buffers, one per cached tensor (each attention's keys, its values), written in place.

    Args:
        capacity: a fixed number of positions (CacheFull past it); None: grow by doubling, up to `limit`.
        limit: the model's maximum length (None: unbounded).
    """

    def __init__(self, capacity: int | None = None, limit: int | None = None):
        self.capacity = capacity
        self.limit = limit
        self.buffers: dict[int, torch.Tensor] = {}
        self.start = 0     # positions this call keeps from before (set by the runtime before each call)
        self.length = 0    # positions held after the last call

    def append(self, slot: int, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Write `x` (the new positions, along `dim`) at ``[start, start + T)`` of buffer `slot`; return the
        buffer's ``[0, start + T)``: every position so far."""
        t = x.shape[dim]
        end = self.start + t
        buf = self.buffers.get(slot)
        if buf is None or not _fits(buf, x, dim):
            buf = self._allocate(slot, x, dim, end, keep=None)
        elif buf.shape[dim] < end:
            buf = self._allocate(slot, x, dim, end, keep=buf)
        elif _frozen(buf):
            buf = self.buffers[slot] = buf.clone()
        buf.narrow(dim, self.start, t).copy_(x)
        return buf.narrow(dim, 0, end)

    def _allocate(self, slot: int, x: torch.Tensor, dim: int, end: int, keep: torch.Tensor | None) -> torch.Tensor:
        if self.capacity is not None:
            if end > self.capacity:
                raise CacheFull(f"the KV cache holds {self.capacity} positions (max_tokens) and this call needs "
                                f"{end}: prefill again with a larger max_tokens")
            size = self.capacity
        else:
            old = keep.shape[dim] if keep is not None else 0
            size = max(end, 2 * old, _FIRST_CAPACITY)
            if self.limit is not None:
                size = max(end, min(size, self.limit))
        shape = list(x.shape)
        shape[dim] = size
        buf = torch.empty(shape, dtype=x.dtype, device=x.device)
        if keep is not None and self.start:
            buf.narrow(dim, 0, self.start).copy_(keep.narrow(dim, 0, self.start))
        self.buffers[slot] = buf
        return buf

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold now (allocated, not only filled)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def __repr__(self) -> str:
        return f"<KVCache: {len(self.buffers)} buffers, {self.length} positions, {fmt_bytes(self.nbytes)}>"


def _frozen(buf: torch.Tensor) -> bool:
    """A buffer made under torch.inference_mode cannot be written outside it: it is copied once (the cache a
    prefill under inference_mode made, a decode under no_grad extends)."""
    return buf.is_inference() and not torch.is_inference_mode_enabled()


def _fits(buf: torch.Tensor, x: torch.Tensor, dim: int) -> bool:
    return buf.dim() == x.dim() and buf.dtype == x.dtype and buf.device == x.device and \
        all(a == b for d, (a, b) in enumerate(zip(buf.shape, x.shape)) if d != dim)


# ---------------------------------------------------------------------------------------------- what the graph calls

def kv_start(cache: KVCache) -> int:
    """The first position this call computes (the graph's offset for positions and masks)."""
    return cache.start


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention of the last ``q.shape[-2]`` positions over all ``k.shape[-2]``, aligned bottom-right.

    ``scaled_dot_product_attention(is_causal=True)`` aligns its mask top-left, which is wrong as soon as there
    are fewer queries than keys (decoding): query i may see keys up to ``i + (Lk - Lq)``, not up to i.

        >>> q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
        >>> out = causal_attention(q, k, k)
        >>> ref = F.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(3, 5, dtype=torch.bool).tril(2))
        >>> torch.testing.assert_close(out, ref)
    """
    lq, lk = q.shape[-2], k.shape[-2]
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale,
                                              enable_gqa=enable_gqa)
    mask = None
    if lq > 1:   # one query (a decode step) may see every key: no mask at all
        mask = causal_mask(q, lk, "keep", 0.0, torch.bool, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=enable_gqa)


def causal_mask(q: torch.Tensor, length: int, form: str, fill: float, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    """The causal mask of the last ``q.shape[-2]`` query positions over `length` keys, in the form the model's
    own mask had: 'keep' (True where attended), 'drop' (True where masked: ``masked_fill``) or 'add' (0 where
    attended, `fill` where masked, in `dtype`), with ``ndim - 2`` leading dimensions of 1.

        >>> causal_mask(torch.zeros(2, 4), 4, "drop", 0.0, torch.bool, 2).int()
        tensor([[0, 0, 0, 1],
                [0, 0, 0, 0]], dtype=torch.int32)
    """
    lq = q.shape[-2]
    i = torch.arange(length - lq, length, device=q.device).unsqueeze(1)   # (Lq, 1): absolute query positions
    j = torch.arange(length, device=q.device).unsqueeze(0)                # (1, Lk)
    future = j > i                                                        # (Lq, Lk)
    if form == "drop":
        mask = future
    elif form == "keep":
        mask = ~future
    else:
        mask = torch.zeros(future.shape, dtype=dtype, device=q.device).masked_fill_(future, fill)
    return mask.view((1,) * (ndim - 2) + tuple(mask.shape))


# ---------------------------------------------------------------------------------------------- the runtime

@dataclass(frozen=True)
class OutputKind:
    """What one flat output of the graph is: 'full' (one value per position, along `dim`), 'last' (no sequence
    dimension: the last position's, or independent of positions) or 'constant' (None, a number)."""

    kind: str
    dim: int = -1


@dataclass
class DecodeState:
    """One batch of sequences being decoded: its cache and how far it got. `prefill` makes one; `decode` extends
    it. Several can be live at once (a server's requests): each has its own cache."""

    cache: KVCache
    batch: tuple[int, ...] = ()          # the ids' sizes other than the sequence dimension
    length: int = 0                      # positions in the cache
    weights: list = field(default_factory=list)   # what the cache was computed with (see _Weights)
    failed: str = ""                     # why a step on it raised part-way (its cache is then not to be trusted)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def __repr__(self) -> str:
        return f"<DecodeState: batch {list(self.batch)}, {self.length} positions, {fmt_bytes(self.nbytes)} of cache>"


class IncrementalDecoder:
    """Runs a cached graph on the drop-in, call by call.

    Args:
        forward: ``forward(module, *flat_inputs, cache[, attributes])`` -> the graph's flat outputs, run on the
            module itself.
        signature: the model forward's signature (without self); `example` the example call's bound arguments:
            a call whose other arguments differ is not served.
        ids_param, ids_index, leaves, out_spec: which argument the token ids are, where they go among the graph's
            flat inputs (the example's `leaves` give the others), and how the flat outputs become the model's.
        seq_dim: the ids' sequence dimension; max_length the most positions the model accepts (None: no bound).
        outputs: an `OutputKind` per flat output.
        attributes: the module attributes (dotted paths: parameters, buffers, constants) the forward takes as
            one trailing tuple instead of reading them through the module (`attributes_as_input`); empty: none.
        graph_module, bytes_per_position: the cached graph `forward` runs and the cache bytes one position of one
            sequence takes (for `shapeprof.batching`, which runs a variant of the graph on paged memory).
    """

    def __init__(self, forward: Callable, signature: inspect.Signature, example: dict[str, Any], ids_param: str,
                 ids_index: int, leaves: list[Any], out_spec: Any, seq_dim: int, max_length: int | None,
                 outputs: list[OutputKind], attributes: tuple[str, ...] = (), graph_module: Any = None,
                 bytes_per_position: int = 0):
        self.forward = forward
        self.graph_module = graph_module
        self.bytes_per_position = bytes_per_position
        self.attributes = tuple(attributes)
        self._slots: tuple[nn.Module | None, list[tuple[dict, str]]] = (None, [])
        self.signature = signature
        self.example = example
        self.ids_param = ids_param
        self.ids_index = ids_index
        self.leaves = leaves
        self.out_spec = out_spec
        self.seq_dim = seq_dim
        self.max_length = max_length
        self.outputs = outputs
        self.ids_dtype = example[ids_param].dtype
        self.ids_ndim = example[ids_param].dim()
        self.calls = {"incremental": 0, "from scratch": 0, "not served": 0}
        self._lock = threading.Lock()
        self.reset()

    def fresh(self) -> "IncrementalDecoder":
        """The same decoder with an empty cache (for a copy of the drop-in)."""
        return IncrementalDecoder(self.forward, self.signature, self.example, self.ids_param, self.ids_index,
                                  self.leaves, self.out_spec, self.seq_dim, self.max_length, self.outputs,
                                  self.attributes, self.graph_module, self.bytes_per_position)

    def reset(self) -> None:
        """Forget what the cache holds (the next call runs from scratch)."""
        self._state: DecodeState | None = None
        self._tokens: torch.Tensor | None = None
        self._history: dict[int, torch.Tensor] = {}       # flat output index -> its buffer
        self._history_lengths: dict[int, int] = {}        # -> positions it holds
        self._history_versions: dict[int, int] = {}       # -> its version counter after our last write

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the decoder holds between calls (cache buffers, output history, the last tokens)."""
        held = list(self._history.values())
        if self._state is not None:
            held.extend(self._state.cache.buffers.values())
        if self._tokens is not None:
            held.append(self._tokens)
        return held

    # ------------------------------------------------------------------ the transparent forward
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The output for this call, or MISSING when this call is not one the cache may serve (a call from
        another thread while one runs is not: the original forward is pure, the cache is one sequence's)."""
        if not self._lock.acquire(blocking=False):
            self.calls["not served"] += 1
            return MISSING
        try:
            return self._serve(module, args, kwargs)
        except BaseException:
            self.reset()   # a call that raised part-way may have written some layers' keys: trust none
            raise
        finally:
            self._lock.release()

    def _serve(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        ids = self._ids_of(module, args, kwargs)
        if ids is None:
            self.calls["not served"] += 1
            self.reset()
            return MISSING
        length = ids.shape[self.seq_dim]
        state = self._state
        keep = self._reusable(module, ids, state) if state is not None else 0
        if keep == 0:
            state = self._state = DecodeState(KVCache(limit=self.max_length), _batch(ids, self.seq_dim))
            self._history, self._history_lengths, self._history_versions = {}, {}, {}
        self.calls["incremental" if keep else "from scratch"] += 1
        flat = self._run(module, ids.narrow(self.seq_dim, keep, length - keep), state, keep)
        outs = [self._full(i, out, keep, length) if kind.kind == "full" else out
                for i, (kind, out) in enumerate(zip(self.outputs, flat))]
        self._tokens = ids.detach().clone()
        return pytree.tree_unflatten(outs, self.out_spec)

    def _ids_of(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The token ids, when this call is like the example in everything else; None otherwise."""
        if module.training:
            return None
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        for name, value in bound.arguments.items():
            if name == self.ids_param:
                continue
            expected = self.example.get(name, MISSING)
            if not (value is expected or (type(value) is type(expected) and not isinstance(value, torch.Tensor)
                                          and _equal(value, expected))):
                return None
        ids = bound.arguments.get(self.ids_param)
        if not isinstance(ids, torch.Tensor) or type(ids) is not torch.Tensor or ids.dtype != self.ids_dtype \
                or ids.dim() != self.ids_ndim or ids.shape[self.seq_dim] == 0:
            return None
        if self.max_length is not None and ids.shape[self.seq_dim] > self.max_length:
            return None   # the original raises its own error for a sequence the model does not take
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            return None   # autograd must see the whole computation, not the cached part
        return ids

    def _reusable(self, module: nn.Module, ids: torch.Tensor, state: DecodeState) -> int:
        """How many leading positions of `ids` the cache holds as they are now (at most all but the last)."""
        tokens = self._tokens
        if tokens is None or _batch(ids, self.seq_dim) != state.batch or ids.device != tokens.device:
            return 0
        if not _Weights.unchanged(state.weights) or any(self._history[i]._version != v
                                                       for i, v in self._history_versions.items()):
            return 0   # the weights changed, or an output we returned was written into: nothing is reusable
        d = self.seq_dim
        n = min(tokens.shape[d], ids.shape[d])
        a, b = ids.narrow(d, 0, n), tokens.narrow(d, 0, n)
        if torch.equal(a, b):
            same = n
        else:
            rows = (a == b).movedim(d, -1).reshape(-1, n).all(0)   # (n,): position equal in every sequence
            same = int((~rows).int().argmax())                     # the first that differs
        return min(same, ids.shape[d] - 1)

    def _run(self, module: nn.Module, new: torch.Tensor, state: DecodeState, keep: int) -> tuple:
        cache = state.cache
        cache.start = keep
        leaves = list(self.leaves)
        leaves[self.ids_index] = new
        leaves.append(cache)
        if self.attributes:
            leaves.append(self.attributes_of(module))
        flat = self.forward(module, *leaves)
        cache.length = state.length = keep + new.shape[self.seq_dim]
        if keep == 0:
            state.weights = _Weights.of(module)
        return flat

    def attributes_of(self, module: nn.Module) -> tuple:
        """The current value of each of `attributes`. Where each lives (which parameter, buffer or attribute dict
        of which submodule) is found once per module: the drop-in's guards keep its submodules the same objects
        while the decoder runs, and a parameter replaced in its dict is read anew."""
        owner, slots = self._slots
        if owner is not module:
            slots = []
            for path in self.attributes:
                *parents, name = path.split(".")
                m = module
                for p in parents:
                    m = m._modules[p]
                d = vars(m)
                slots.append(next((d[g], name) for g in ("_parameters", "_buffers") if name in d[g])
                             if name in d["_parameters"] or name in d["_buffers"] else (d, name))
            self._slots = (module, slots)
        return tuple([d[name] for d, name in slots])

    def _full(self, i: int, out: torch.Tensor, keep: int, length: int) -> torch.Tensor:
        """A full-sequence output: the new positions written after the kept ones in a history buffer, returned
        whole. A rewind starts a new buffer, so that an output returned earlier never changes."""
        d = self.outputs[i].dim
        old = self._history.get(i)
        if old is None or keep == 0 or keep < self._history_lengths.get(i, 0) or not _fits(old, out, d) \
                or old.shape[d] < length or _frozen(old):
            size = max(length, 2 * old.shape[d] if old is not None and keep else 0,
                       min(_FIRST_CAPACITY, self.max_length or _FIRST_CAPACITY))
            shape = list(out.shape)
            shape[d] = size
            buf = torch.empty(shape, dtype=out.dtype, device=out.device)
            if keep:
                buf.narrow(d, 0, keep).copy_(old.narrow(d, 0, keep))
            self._history[i] = old = buf
        old.narrow(d, keep, length - keep).copy_(out)
        self._history_lengths[i] = length
        if old.is_inference():
            # an inference tensor keeps no version counter, so a write into what we return could not be seen:
            # return a copy (the original writes a whole new output every call too)
            self._history_versions.pop(i, None)
            return old.narrow(d, 0, length).clone()
        self._history_versions[i] = old._version
        return old.narrow(d, 0, length)

    # ------------------------------------------------------------------ the explicit form
    def prefill(self, module: nn.Module, ids: torch.Tensor, max_tokens: int | None = None
                ) -> tuple[Any, DecodeState]:
        """Run the prompt `ids`, keep its keys and values: (the model's output for it, a new `DecodeState`).

        `max_tokens` is the cache's size in positions, allocated now; None: the model's maximum length when it
        has one, else the cache grows as needed."""
        ids = self._explicit_ids(module, ids, "prefill")
        length = ids.shape[self.seq_dim]
        if self.max_length is not None and length > self.max_length:
            raise DecodeError(f"prefill: {length} positions, but the model takes at most {self.max_length}")
        size = max_tokens if max_tokens is not None else self.max_length
        if size is not None and length > size:
            raise CacheFull(f"prefill: {length} positions do not fit max_tokens={size}")
        state = DecodeState(KVCache(capacity=size, limit=self.max_length), _batch(ids, self.seq_dim))
        with torch.no_grad():
            flat = self._run(module, ids, state, 0)
        return pytree.tree_unflatten(list(flat), self.out_spec), state

    def decode(self, module: nn.Module, next_ids: torch.Tensor, state: DecodeState) -> tuple[Any, DecodeState]:
        """Run `next_ids` (the new positions only) after what `state` holds: (the model's output for the new
        positions, the same state, extended)."""
        if not isinstance(state, DecodeState) or state.length == 0:
            raise DecodeError("decode: pass the DecodeState that prefill returned")
        if state.failed:
            raise DecodeError(f"decode: an earlier step on this state raised part-way ({state.failed}), so its "
                              f"cache may hold some layers' keys of that step: prefill again")
        ids = self._explicit_ids(module, next_ids, "decode")
        if _batch(ids, self.seq_dim) != state.batch:
            raise DecodeError(f"decode: next_ids has batch {list(_batch(ids, self.seq_dim))}, the state "
                              f"{list(state.batch)}")
        total = state.length + ids.shape[self.seq_dim]
        if self.max_length is not None and total > self.max_length:
            raise DecodeError(f"decode: {total} positions, but the model takes at most {self.max_length}")
        if not _Weights.unchanged(state.weights):
            raise DecodeError("decode: the model's weights changed since prefill, so the cached keys and values "
                              "are stale: prefill again")
        if state.cache.capacity is not None and total > state.cache.capacity:
            raise CacheFull(f"decode: {total} positions do not fit the cache's max_tokens={state.cache.capacity}: "
                            f"prefill again with a larger max_tokens (this state is unchanged)")
        with torch.no_grad():
            try:
                flat = self._run(module, ids, state, state.length)
            except BaseException as e:
                state.failed = f"{type(e).__name__}: {e}"[:200]
                raise
        return pytree.tree_unflatten(list(flat), self.out_spec), state

    def _explicit_ids(self, module: nn.Module, ids: Any, what: str) -> torch.Tensor:
        if module.training:
            raise DecodeError(f"{what}: the model is in training mode; call .eval() first")
        if not isinstance(ids, torch.Tensor) or ids.dtype != self.ids_dtype or ids.dim() != self.ids_ndim:
            got = f"{ids.dtype} with {ids.dim()} dims" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise DecodeError(f"{what}: expected token ids of {self.ids_dtype} with {self.ids_ndim} dims, got {got}")
        if ids.shape[self.seq_dim] == 0:
            raise DecodeError(f"{what}: no tokens")
        return ids


def _batch(ids: torch.Tensor, seq_dim: int) -> tuple[int, ...]:
    return tuple(s for d, s in enumerate(ids.shape) if d != seq_dim)


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


class _Weights:
    """What a cache was computed with: every parameter and buffer object of the model and its version counter
    (in-place writes, an optimizer step, load_state_dict bump it; a new object replaces it). A write PyTorch does
    not see (through ``.data`` or numpy, or into a parameter made under inference_mode) is not detected, as for
    any cached computation."""

    @staticmethod
    def of(module: nn.Module) -> list:
        seen = []
        for m in module.modules():
            for group in (m._parameters, m._buffers):
                for name, t in group.items():
                    if t is not None:
                        seen.append((group, name, t, _version(t)))
        return seen

    @staticmethod
    def unchanged(seen: list) -> bool:
        return all(group.get(name) is t and _version(t) == v for group, name, t, v in seen)


def _version(t: torch.Tensor) -> int | None:
    """The version counter; None for an inference tensor, which keeps none (and cannot be written outside
    torch.inference_mode)."""
    return None if t.is_inference() else t._version
