"""Phases of LLM inference as analysis inputs: a prefill of T tokens, or one decode step over a cache of N.

A decode step is not a forward over one token: it reads the whole KV cache. `Decode(batch, context)` stands in for
the example inputs wherever `analyze` takes them, and becomes the inputs the model really decodes with:

- a HuggingFace model gets its own cache class (``transformers.DynamicCache`` built from its config), filled with
  `context` positions of meta tensors, and the next token's ids;
- a model whose forward takes no cache (nanoGPT, a hand-written Llama) gets one inserted: the kv_cache rewrite's
  pass (`shapeprof.rewrites.kv_cache`) turns its whole-forward graph into the cached one, which is analysed over a
  `shapeprof.kvcache.KVCache` holding `context` positions: keys and values are written for the new position only
  and attention reads all of them;
- a hand-written decoder that keeps its cache in its modules and is told the position (Meta's reference Llama's
  `forward(tokens, start_pos)`, gpt-fast's `forward(idx, input_pos)`) is called with the ids and that position,
  its cache's figures read off the graph (what its attention reads);
- a model with a cache argument of another kind (a cache object passed in) is refused with the reason: pass a
  filled cache as its example inputs instead.

    >>> import torch, shapeprof
    >>> from examples.nanogpt import GPT, GPTConfig
    >>> with torch.device("meta"):
    ...     gpt = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=128))
    >>> r = shapeprof.analyze(gpt, shapeprof.Decode(batch=2, context=32))
    >>> r.phase.kv_read_bytes          # 2 sequences x 33 positions x 2 layers x (k + v) x 64 wide x 4 bytes
    67584
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .capture import InputShape

__all__ = ["Decode", "PhaseError", "PhaseInfo", "Prefill", "is_phase", "real_inputs", "resolve"]


class PhaseError(ValueError):
    """A phase that cannot be built for this model (one line naming why)."""


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PhaseError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Prefill:
    """The prompt's forward: `batch` sequences of `tokens` tokens each, the cache empty before it."""

    batch: int = 1
    tokens: int = 2048

    def __post_init__(self) -> None:
        _positive("Prefill.batch", self.batch)
        _positive("Prefill.tokens", self.tokens)

    kind = "prefill"

    @property
    def new_tokens(self) -> int:
        return self.tokens

    @property
    def context(self) -> int:
        return 0


@dataclass(frozen=True)
class Decode:
    """One decode step: `batch` sequences each with `context` positions cached, `tokens` new positions each.

    `tokens=1` is plain decoding. A target model verifying g drafted tokens (speculative decoding,
    `shapeprof.speculative`) runs one forward with `tokens=g + 1` query positions per sequence against the cache:
    attention reads `context + tokens` positions, the cache is written for `tokens` of them, and every weight is
    read once, which is why that one pass costs about what a single step does while it is memory-bound."""

    batch: int = 1
    context: int = 4096
    tokens: int = 1

    def __post_init__(self) -> None:
        _positive("Decode.batch", self.batch)
        _positive("Decode.context", self.context)
        _positive("Decode.tokens", self.tokens)

    kind = "decode"

    @property
    def new_tokens(self) -> int:
        return self.tokens


def is_phase(x: Any) -> bool:
    return isinstance(x, (Prefill, Decode))


@dataclass(frozen=True)
class PhaseInfo:
    """What a phase's report was analysed as, and its bytes split the way decode is explained.

    `weight_bytes`: the weights a step reads (every parameter once; an embedding table only its rows, unless the
    table is tied to the output head). `kv_read_bytes` / `kv_written_bytes`: what any implementation of the step
    must move of the KV cache (attention reads every cached position and the new ones; the new positions are written).
    What the eager graph moves besides (activations, and a cache class that copies itself) is the report's total
    bytes minus these: `other_bytes`. A prefill's graph may write no cache at all (a model without one, analysed
    as it is): `kv_in_graph` then says the written figure is what
    a cache would take, outside the total.
    """

    kind: str                  # 'prefill' or 'decode'
    batch: int
    tokens: int                # new tokens per sequence in this step (prefill: the prompt; decode: 1, or the
    #                            query positions of a verification pass, Decode(tokens=g + 1))
    context: int               # positions cached before the step
    cache: str                 # how the cache was given: "transformers DynamicCache", "inserted (kv_cache rewrite)"
    kv_bytes_per_token: int    # one position of one sequence: keys and values of every layer
    max_context: int | None    # the model's longest sequence, where it says (config or its position table)
    layers: int                # attention layers holding a cache
    hidden: int | None         # the residual stream's width (what a tensor-parallel all-reduce moves per token)
    weight_bytes: int
    kv_read_bytes: int
    kv_written_bytes: int
    total_bytes: int
    kv_in_graph: bool = True

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.tokens

    @property
    def other_bytes(self) -> int:
        written = self.kv_written_bytes if self.kv_in_graph else 0
        return self.total_bytes - self.weight_bytes - self.kv_read_bytes - written

    def describe(self) -> str:
        if self.kind == "prefill":
            return f"prefill: batch {self.batch} x {self.tokens} tokens"
        each = f", {self.tokens} query positions each" if self.tokens > 1 else ""
        return f"decode step: batch {self.batch}{each}, cache of {self.context} positions ({self.cache})"


@dataclass
class ResolvedPhase:
    """What to capture for a phase: the module, its inputs and how, and what the report says about it."""

    phase: Prefill | Decode
    module: nn.Module
    args: tuple
    kwargs: dict
    method: str
    cache: str
    kv_bytes_per_token: int
    kv_read_per_sequence: list[int]   # bytes one sequence's step reads of each layer's (or slot's) cache
    max_context: int | None
    layers: int
    hidden: int | None
    notes: list[str] = field(default_factory=list)
    kv_in_graph: bool = True
    kv_from_graph: bool = False       # the model keeps its own cache: its figures are read off the analysed graph

    def info(self, model: nn.Module, dtype: torch.dtype | None, total_bytes: int, capture=None) -> PhaseInfo:
        p = self.phase
        per_token, layers = self.kv_bytes_per_token, self.layers
        read_per_sequence = self.kv_read_per_sequence
        if self.kv_from_graph:   # the model's own cache: what its attention ops read, over the positions they span
            layers, nbytes = _attention_reads(capture)
            span = p.context + p.new_tokens
            per_token = nbytes // (p.batch * span) if layers else 0
            read_per_sequence = [span * per_token]
        read = p.batch * sum(read_per_sequence) if p.kind == "decode" else 0
        weights = weight_bytes(model, dtype, p.batch * p.new_tokens)
        return PhaseInfo(p.kind, p.batch, p.new_tokens, p.context, self.cache, per_token, self.max_context, layers,
                         self.hidden, weights, read, p.batch * p.new_tokens * per_token, total_bytes,
                         self.kv_in_graph)


def resolve(model: nn.Module, phase: Prefill | Decode, dtype: torch.dtype | None) -> ResolvedPhase:
    """The inputs `model` takes for `phase` (see the module docstring for the cases)."""
    from .capture import unwrap
    model = unwrap(model)   # torch.compile's OptimizedModule, DDP: the module they wrap takes the phase
    if _is_hf(model):
        return _hf(model, phase, dtype)
    own = _own_cache_parameter(model)
    if own in _POSITION_ARGUMENTS:
        return _own_cache(model, phase, own)
    if own is not None:
        raise PhaseError(f"{type(model).__name__}.forward takes a cache of its own ('{own}'): shapeprof builds "
                         f"HuggingFace's and inserts one where there is none; for this model pass the token ids "
                         f"and a cache filled to the context you want as its example inputs instead")
    return _inserted(model, phase, dtype)


def real_inputs(model: nn.Module, phase: Prefill | Decode) -> tuple[nn.Module, tuple, dict]:
    """What to run for a measured `phase` (`shapeprof.profile`): the module and real inputs on the model's device.

    Token ids are zeros; a decode step's cache holds `context` positions of zeros (transformers' DynamicCache) or
    of whatever the buffer held (the inserted cache: only their number matters to the time). The model's own
    weights run; nothing of it is copied or changed."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "meta":
        raise PhaseError("a measured phase runs the model: its weights must hold data, not be on meta")
    ids = torch.zeros(phase.batch, phase.new_tokens, dtype=torch.long, device=device)
    if _is_hf(model):
        params = inspect.signature(model.forward).parameters
        ids_kw = "input_ids" if "input_ids" in params else next(iter(params))
        if phase.kind == "prefill":
            return model, (), {ids_kw: ids}
        kwargs = _hf(model, phase, None).kwargs    # the cache built on meta: its layers' shapes, filled with zeros
        cache_kw = next(k for k in ("past_key_values", "cache") if k in kwargs)
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config.get_text_config()) if hasattr(model.config, "get_text_config") \
            else DynamicCache()
        for i, layer in enumerate(kwargs[cache_kw].layers):
            cache.update(torch.zeros(layer.keys.shape, dtype=param.dtype, device=device),
                         torch.zeros(layer.values.shape, dtype=param.dtype, device=device), i)
        return model, (), {ids_kw: ids, cache_kw: cache, "use_cache": True}
    own = _own_cache_parameter(model)
    if own in _POSITION_ARGUMENTS:   # its own cache, written in place (profile puts its buffers back)
        return model, (ids,), {own: _own_cache(model, phase, own).kwargs[own]}
    if phase.kind == "prefill":
        return model, (ids,), {}
    seq, _ = _insert_cache(model, phase, None, copies=(model,))
    from .kvcache import KVCache
    cache = KVCache()
    cache.start = phase.context
    leaves = list(seq.leaves)
    leaves[seq.ids_index] = ids
    return seq.gm, (*leaves, cache), {}


# ---------------------------------------------------------------------------------------------- weights read

def weight_bytes(model: nn.Module, dtype: torch.dtype | None, rows: int) -> int:
    """Bytes of weights one step reads: every distinct parameter once, in `dtype` where it is floating, except an
    embedding table that nothing else uses, of which only the `rows` looked-up rows are read (or the whole table
    when there are more rows than it has)."""
    users: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    lookups = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Embedding)}
    total = 0
    for p in model.parameters():    # each distinct parameter once
        emb = lookups.get(id(p)) if users[id(p)] == 1 else None
        elements = min(rows, emb.num_embeddings) * emb.embedding_dim if emb is not None else p.numel()
        total += elements * (dtype.itemsize if dtype is not None and p.is_floating_point() else p.element_size())
    return total


# ---------------------------------------------------------------------------------------------- HuggingFace

def _is_hf(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _hf(model: nn.Module, phase: Prefill | Decode, dtype: torch.dtype | None) -> ResolvedPhase:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not layers or not heads:
        raise PhaseError(f"{type(model).__name__}'s config names no num_hidden_layers / num_attention_heads: "
                         f"shapeprof cannot build its cache")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    cache_dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    per_token = layers * 2 * kv_heads * head_dim * cache_dtype.itemsize
    params = inspect.signature(model.forward).parameters
    ids_kw = "input_ids" if "input_ids" in params else next(iter(params))
    max_context = getattr(cfg, "max_position_embeddings", None)
    windows = _hf_windows(cfg, layers)
    if phase.kind == "prefill":
        kwargs = {ids_kw: InputShape((phase.batch, phase.tokens), torch.long)}
        return ResolvedPhase(phase, model, (), kwargs, "auto", "none before the prefill", per_token, [],
                             max_context, layers, cfg.hidden_size)   # its DynamicCache copies the keys in
    from transformers import DynamicCache
    try:
        cache = DynamicCache(config=cfg)
    except TypeError:      # older transformers: one kind of layer
        cache = DynamicCache()
    shape = (phase.batch, kv_heads, phase.context, head_dim)
    try:
        for i in range(layers):
            cache.update(torch.empty(shape, dtype=cache_dtype, device="meta"),
                         torch.empty(shape, dtype=cache_dtype, device="meta"), i)
    except Exception as e:
        raise PhaseError(f"{type(model).__name__}: its DynamicCache could not be filled on meta: {e}") from e
    cache_kw = next((k for k in ("past_key_values", "cache") if k in params), None)
    if cache_kw is None:
        raise PhaseError(f"{type(model).__name__}.forward takes no past_key_values: it keeps no KV cache that "
                         f"shapeprof can fill (a state-space model's state is not one)")
    new = phase.new_tokens
    kwargs = {ids_kw: InputShape((phase.batch, new), torch.long), cache_kw: cache, "use_cache": True}
    # the ideal reads: every layer's keys and values, of the positions each layer attends to (a sliding window:
    # the last `w` before each of the new positions, w + new - 1 in all)
    positions = [min(phase.context + new, w + new - 1) if w else phase.context + new for w in windows]
    per_layer = 2 * kv_heads * head_dim * cache_dtype.itemsize
    notes = [f"decode step over {type(cache).__name__} holding {phase.context} positions (transformers' own cache "
             f"class, on meta)" + (f", {new} new positions per sequence in one forward" if new > 1 else "")]
    if type(cache).__name__ == "DynamicCache":
        notes.append("transformers' DynamicCache concatenates: each eager step copies every layer's whole cache "
                     "(in the report's bytes, not in its KV read / written figures, which a static or paged "
                     "cache would match)")
    return ResolvedPhase(phase, model, (), kwargs, "auto", "transformers " + type(cache).__name__, per_token,
                         [n * per_layer for n in positions], max_context, layers, cfg.hidden_size, notes)


def _hf_windows(cfg, layers: int) -> list[int | None]:
    """Per layer, the sliding window it attends over (None: every position)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types and window:
        return [window if t == "sliding_attention" else None for t in types[:layers]]
    if window and getattr(cfg, "use_sliding_window", True) and type(cfg).__name__.startswith("Mistral"):
        return [window] * layers
    return [None] * layers


# ---------------------------------------------------------------------------------------------- a cache of its own

#: where a hand-written decoder keeps its cache inside and is told the position: Meta's reference Llama
#: (`forward(tokens, start_pos)`, cache_k / cache_v buffers), gpt-fast (`forward(idx, input_pos)` after
#: setup_caches): a position (an int) or the new positions (a tensor)
_POSITION_ARGUMENTS = {"start_pos": "int", "input_pos": "positions", "cache_position": "positions"}


def _own_cache(model: nn.Module, phase: Prefill | Decode, name: str) -> ResolvedPhase:
    """A decoder whose cache lives in its modules, told where the new tokens go: called with the ids and that
    position; its cache's figures are read off the graph (what its attention reads, over the positions it spans)."""
    params = list(inspect.signature(model.forward).parameters)
    if params[0] == name:
        raise PhaseError(f"{type(model).__name__}.forward takes '{name}' first: shapeprof passes the token ids first")
    start, new = phase.context, phase.new_tokens
    position = start if _POSITION_ARGUMENTS[name] == "int" else torch.arange(start, start + new)
    limit = _longest(model)
    if limit is not None and start + new > limit:
        raise PhaseError(f"{phase.kind} of {type(model).__name__}: {start} + {new} positions exceed the "
                         f"{limit} its cache holds")
    notes = [f"{phase.kind} through the model's own cache ({name}={start}): its KV figures are what its attention "
             f"ops read, over the {start + new} positions they span (grouped heads repeated before attention "
             f"count as read)"]
    return ResolvedPhase(phase, model, (InputShape((phase.batch, new), torch.long),), {name: position}, "auto",
                         f"its own ({name})", 0, [], limit, 0, _width(model), notes, kv_from_graph=True)


def _attention_reads(capture) -> tuple[int, int]:
    """(attention calls, bytes of keys and values they read) in an analysed graph."""
    from .costs import ATTENTION_OPS
    calls = nbytes = 0
    for cn in capture.nodes if capture is not None else ():
        for rec in cn.records:
            if rec.name in ATTENTION_OPS:
                calls += cn.repeats
                nbytes += cn.repeats * sum(m.nbytes for m in rec.input_metas()[1:3])
    return calls, nbytes


def _longest(model: nn.Module) -> int | None:
    """The longest sequence a hand-written decoder says it holds (`params.max_seq_len`, `config.block_size` ...)."""
    for holder in (model, getattr(model, "params", None), getattr(model, "config", None)):
        for attr in ("max_seq_len", "max_seq_length", "block_size", "max_position_embeddings"):
            value = getattr(holder, attr, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


# ---------------------------------------------------------------------------------------------- a cache inserted

_OWN_CACHE_NAMES = ("past_key_values", "past_key_value", "kv_cache", "cache", "layer_past", "past", "use_cache",
                    "input_pos", "start_pos", "cache_position")


def _own_cache_parameter(model: nn.Module) -> str | None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((p for p in _OWN_CACHE_NAMES if p in params), None)


def _inserted(model: nn.Module, phase: Prefill | Decode, dtype: torch.dtype | None) -> ResolvedPhase:
    """The model's whole forward with the kv_cache rewrite's cache inserted, over a cache holding `context`
    positions (none for a prefill, which then writes its keys and values into it, as a serving engine's does)."""
    from .kvcache import KVCache

    memo = _MEMO.get()
    key = (id(model), dtype)
    if memo is None or key not in memo:
        with warnings.catch_warnings():   # torch's own pytree deprecation, from copying the exported program
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            cached = _insert_cache(model, phase, dtype)
        if memo is not None:
            memo[key] = cached
    else:
        cached = memo[key]
    seq, plan = cached
    per_token = plan.bytes_per_position
    if dtype is not None:   # the slots were sized in the captured dtype
        per_token = sum(s.bytes_per_position // _itemsize(s.dtype) * dtype.itemsize for s in plan.slots)
    layers, width, limit = len(plan.slots) // 2, _width(model), seq.max_length.get(plan.seq_dim)
    if phase.kind == "prefill":
        # the model's own forward, as every other analysis captures it (module paths, its own kernels); the
        # cache it fills is counted beside it
        return ResolvedPhase(phase, model, (InputShape((phase.batch, phase.tokens), torch.long),), {}, "auto",
                             "inserted (kv_cache rewrite)", per_token, [], limit, layers, width,
                             [f"prefill analysed as the model's forward; the KV cache the kv_cache rewrite would "
                              f"fill ({len(plan.slots)} cached tensors) is counted beside its bytes"],
                             kv_in_graph=False)
    cache = KVCache()
    cache.start = phase.context
    leaves = list(seq.leaves)
    leaves[seq.ids_index] = InputShape((phase.batch, phase.new_tokens), torch.long)
    new = phase.new_tokens
    notes = [f"decode over the KV cache shapeprof's kv_cache rewrite inserts ({len(plan.slots)} cached tensors): "
             f"keys and values written for the " + (f"{new} new positions" if new > 1 else "new position") +
             " only, attention over every cached one"]
    return ResolvedPhase(phase, seq.gm, (*leaves, cache), {}, "dispatch", "inserted (kv_cache rewrite)", per_token,
                         [(phase.context + new) * per_token], limit, layers, width, notes)


_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("shapeprof_phase_memo", default=None)


@contextlib.contextmanager
def reusing_captures():
    """Within it, a model's cached graph is captured once and reused by every phase analysed (a batch sweep):
    the model must not change meanwhile."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _insert_cache(model: nn.Module, phase: Prefill | Decode, dtype: torch.dtype | None, copies=None):
    from .rewrites.base import RewriteContext
    from .rewrites.kv_cache import KVCacheInsertion
    from .sequence import SequenceCaptureError, capture_sequence

    name = type(model).__name__
    rewrite = KVCacheInsertion()
    why = rewrite.unsuitable(model)
    if why:
        raise PhaseError(f"{phase.kind} of {name}: {why}")
    # Captured on a meta copy in `dtype`: export bakes the dtypes it traces into the graph (RMSNorm's `.type_as(x)`
    # becomes `.to(float32)`) and the layouts of the kernels it ran (a `view` after a CPU attention kernel's
    # output), while the analysis runs the graph on meta. A mask known only by its values (a tril buffer) cannot
    # be read on meta: then, where the model has its data and is small, the graph comes from a copy of it.
    from .capture import meta_shadow
    why = None
    for copy in copies or (meta_shadow(model, dtype), _real_copy(model, dtype)):
        if copy is None:
            continue
        try:
            seq = capture_sequence(copy, torch.zeros(2, 8, dtype=torch.long,
                                                     device=next((t.device for t in copy.parameters()), "cpu")))
        except SequenceCaptureError as e:
            raise PhaseError(f"{phase.kind} of {name} needs a KV cache inserted, and its forward could not be "
                             f"captured with the sequence length symbolic: {e}") from e
        result = rewrite(seq.gm, RewriteContext(sequence=seq, dtype=dtype))
        if result.changed:
            return seq, result.decoding
        why = "; ".join(f"{s.where}: {s.reason}" for s in result.skipped[:2]) or "no causal self-attention found"
    on_meta = _real_copy(model, dtype) is None
    hint = " (on meta a mask buffer has no values: build the model on the CPU)" if on_meta and "mask" in why else ""
    raise PhaseError(f"{phase.kind} of {name} needs a KV cache, and none could be inserted: {why}{hint}")


def _real_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module | None:
    """The model with its data, in `dtype` (a copy; the model itself when no dtype is asked), or None when it is
    on meta or its weights would take more than `_REAL_COPY_LIMIT`."""
    from .capture import meta_shadow
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    if any(t.is_meta for _, t in tensors):
        return None
    if dtype is None:
        return model
    size = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for t in {id(t): t for _, t in tensors}.values())
    if size > _REAL_COPY_LIMIT:
        return None
    shadow = meta_shadow(model, dtype)
    copies: dict[int, torch.Tensor] = {}
    for path, t in tensors:
        owner, _, leaf = path.rpartition(".")
        module = shadow.get_submodule(owner)
        new = copies.get(id(t))
        if new is None:   # tied tensors stay tied
            data = t.detach().to(dtype if t.is_floating_point() else t.dtype, copy=True)
            new = copies[id(t)] = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
        (module._parameters if leaf in module._parameters else module._buffers)[leaf] = new
    return shadow


_REAL_COPY_LIMIT = 2 * 2 ** 30


def _width(model: nn.Module) -> int | None:
    """The residual stream's width of a hand-written decoder: its token embedding's (the widest table)."""
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(tables, key=lambda m: m.num_embeddings).embedding_dim if tables else None


def _itemsize(dtype_name: str) -> int:
    return getattr(torch, dtype_name.removeprefix("torch.")).itemsize
