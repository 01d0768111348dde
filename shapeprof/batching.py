"""Batched generation of many requests on paged KV memory: sequences of different lengths decode in one step.

`shapeprof.optimize` gives a decoder without a cache a cached forward (`rewrites.kv_cache`) whose calls share one
start position. `generate_batch` runs a variant of that graph (`ragged_graph`) in which every row of the batch has a
position of its own: its positions come from the cache (``arange(start, start + T)`` becomes the rows' own), its
keys and values are written to and read from a `paging.BlockAllocator`'s blocks through its block table, and its
attention sees its own keys only (a mask per row, bottom-right causal). The loop around it is continuous batching:

- a waiting request is admitted (its prompt prefilled on its own) when the blocks for it are free;
- every step decodes one token for each running request, in one batched call;
- when a step needs a block and none is free, the request admitted last is preempted: its blocks are freed and it
  waits again, to be prefilled later on its prompt and the tokens it has so far (recomputed, nothing lost);
- a request that cannot fit even alone is refused with the budget it needs.

What it records (`BatchOutputs.stats`): per step the running requests, blocks in use and the waste (slots reserved
and holding no token); the peak number of concurrent requests, preemptions and tokens/s.

Supported: positions from ``arange`` (learned absolute positions, as nanoGPT's) or from a table sliced per step
(rotary cos/sin, as Llama's), attention by SDPA (its keys gathered per group of rows of similar length, in one call)
or the manual chain with a causal mask. Whatever the graph, the ragged step is checked against the model before it
runs (`check_ragged`); a model it does not match, or one that folds heads into the batch or shares a 2-D mask, is
refused with `RaggedUnsupported`, never run wrong.
"""
from __future__ import annotations

import contextlib
import operator
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .files import new_folder
from .kvcache import causal_attention, causal_mask, kv_start
from .paging import BlockAllocator, PagedStore, blocks_in_budget

__all__ = ["BatchOutputs", "BatchStats", "RaggedUnsupported", "check_ragged", "generate_batch", "ragged_graph"]

aten = torch.ops.aten


_observers: list[Callable[["BatchStats"], None]] = []   # each is given the stats of every generate_batch run


@contextlib.contextmanager
def observe_batches() -> Iterator[list["BatchStats"]]:
    """While active, the stats of every `generate_batch` run are appended to the list it yields (`shapeprof trace`
    writes them into its run directory as TensorBoard scalars)."""
    seen: list[BatchStats] = []
    _observers.append(seen.append)
    try:
        yield seen
    finally:
        _observers.remove(seen.append)


class RaggedUnsupported(RuntimeError):
    """The model's cached graph cannot run rows at different positions (one line naming why)."""


# ---------------------------------------------------------------------------------------------- the paged cache

class RaggedCache:
    """What the ragged graph calls for one step: each row's new slots and every slot it holds, as index tensors."""

    def __init__(self, allocator: BlockAllocator, device: torch.device):
        self.allocator = allocator
        self.device = device
        self.stores: dict[int, PagedStore] = {}
        self.rows: list[Hashable] = []
        self.starts = torch.zeros(0, dtype=torch.long)
        self.new = 0
        self.width = 0                                   # the longest row's positions, this step
        self.unmasked = self.same_start = False
        self.tables = torch.zeros(0, 0, dtype=torch.long)
        self._groups: list[tuple] | None = None   # see `groups`
        self._row_lengths: list[int] = []
        self.dims: dict[int, int] = {}

    def begin(self, rows: list[Hashable], new: int) -> None:
        """A step of `new` tokens for each of `rows`, whose slots the allocator has reserved (`append`)."""
        a, size = self.allocator, self.allocator.block_size
        self.rows, self.new = rows, new
        lengths = [a.lengths[r] for r in rows]
        width = max(lengths)
        per_row = -(-width // size)
        pad = a.num_blocks                          # an extra, all-zero block: padding reads finite values
        flat = []                                   # the block tables, padded: Python work per block, not token
        for r in rows:
            table = a.tables[r]
            flat.extend(table)
            flat.extend([pad] * (per_row - len(table)))
        tables = torch.tensor(flat, dtype=torch.long).view(len(rows), per_row)
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.starts = self.lengths - new
        self.tables = tables.to(self.device)
        self.width = width
        self.unmasked = new == 1 and min(lengths) == width   # one new token per row, no padding: it sees all
        self.same_start = min(lengths) == width
        new_cols = self.starts[:, None] + torch.arange(new)                        # (B, T): the new positions
        self.new_blocks = tables.gather(1, new_cols // size).to(self.device)
        self.new_offsets = (new_cols % size).to(self.device)
        self.starts, self.lengths = self.starts.to(self.device), self.lengths.to(self.device)
        self._row_lengths = lengths
        self._groups: list[tuple] | None = None

    @property
    def groups(self) -> list[tuple]:
        """The rows in groups of similar length, made at the first `attend` of the step: per group its rows (in
        row order, so one group is all of them), their blocks, their longest length and the mask (None when every
        row sees all it holds)."""
        if self._groups is None:
            size, lengths, self._groups = self.allocator.block_size, self._row_lengths, []
            for rows_of, w in _length_groups(lengths):
                rows_of = sorted(rows_of)
                index = torch.tensor(rows_of, dtype=torch.long, device=self.device)
                blocks = self.tables.index_select(0, index)[:, :-(-w // size)]
                unmasked = self.new == 1 and all(lengths[i] == w for i in rows_of)
                self._groups.append((index, blocks, w, None if unmasked else
                                     self._keep(self.starts.index_select(0, index), w)))
        return self._groups

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for store in self.stores.values():
            store.copy_blocks(copies)

    def append(self, slot: int, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Write each row's new positions of `x` (batch first, sequence along `dim`) to its slots; return every
        row's positions so far, padded to the longest: (B, ..., max length along `dim`, ...)."""
        self.write(slot, x, dim)
        return self._gather(self.stores[slot], self.tables, self.width, dim)

    def write(self, slot: int, x: torch.Tensor, dim: int) -> int:
        """Write each row's new positions of `x` (batch first, sequence along `dim`) to its slots, and read
        nothing back (`attend` reads them, per group of rows of similar length): -> `slot`."""
        rows = x.movedim(dim, 1)                                   # (B, T, *inner)
        store = self.stores.get(slot)
        if store is None:
            store = self.stores[slot] = PagedStore(self.allocator.num_blocks + 1, self.allocator.block_size,
                                                   tuple(rows.shape[2:]), x.dtype, x.device)
        store.data[self.new_blocks, self.new_offsets] = rows.to(store.data.dtype)
        self.dims[slot] = dim
        return slot

    def attend(self, q: torch.Tensor, k_slot: int, v_slot: int, **sdpa) -> torch.Tensor:
        """Attention of each row's new queries over its own keys and values, in groups of rows of similar length:
        each group gathers its blocks up to its own longest row, so one long sequence does not make every row of
        the batch read and attend over its length."""
        k_store, v_store = self.stores[k_slot], self.stores[v_slot]
        out = None
        for rows, blocks, width, keep in self.groups:
            keys, values = (self._gather(store, blocks, width, self.dims[slot])
                            for store, slot in ((k_store, k_slot), (v_store, v_slot)))
            q_rows = q if len(self.groups) == 1 else q.index_select(0, rows)
            mask = None if keep is None else keep.view(keep.shape[0], *([1] * (q.dim() - 3)), *keep.shape[1:])
            res = F.scaled_dot_product_attention(q_rows, keys, values, attn_mask=mask, **sdpa)
            if len(self.groups) == 1:
                return res
            if out is None:   # in the queries' memory layout, as SDPA's own output: the graph may view its
                #               transpose without a copy
                shape = (*q.shape[:-1], res.shape[-1])
                order = sorted(range(q.dim()), key=lambda d: (-q.stride(d), d))
                out = res.new_empty([shape[d] for d in order]).permute([order.index(d) for d in range(q.dim())])
            out.index_copy_(0, rows, res)
        return out

    def _gather(self, store: PagedStore, blocks: torch.Tensor, width: int, dim: int) -> torch.Tensor:
        """The positions [0, width) of the rows whose block tables are `blocks`, with the sequence along `dim`:
        whole blocks copied in table order, then cut. What lies past a row's length (the rest of its last block,
        the all-zero padding block) is for the mask to hide."""
        g, n = blocks.shape
        held = store.data.index_select(0, blocks.flatten())
        return held.view(g, n * store.data.shape[1], *store.data.shape[2:])[:, :width].movedim(1, dim)

    def positions(self) -> torch.Tensor:
        """(B, T): each row's new positions."""
        return self.starts[:, None] + torch.arange(self.new, device=self.device)

    def keep(self, ndim: int) -> torch.Tensor:
        """(B, 1.., T, width) booleans: True where a row's query may see a key (its own, up to itself)."""
        keep = self._keep(self.starts, self.width)
        return keep.view(keep.shape[0], *([1] * (ndim - 3)), *keep.shape[1:])

    def _keep(self, starts: torch.Tensor, width: int) -> torch.Tensor:
        """(rows, T, width): the bottom-right causal mask of rows whose new positions start at `starts`."""
        positions = starts[:, None] + torch.arange(self.new, device=self.device)     # (rows, T)
        return torch.arange(width, device=self.device)[None, None, :] <= positions[:, :, None]


def ragged_positions(cache: RaggedCache, dtype: torch.dtype) -> torch.Tensor:
    """The graph's ``arange(start, start + T)`` for rows at positions of their own: (B, T)."""
    return cache.positions().to(dtype)


def ragged_rows(table: torch.Tensor, dim: int, cache: RaggedCache) -> torch.Tensor:
    """The graph's ``table[start:start + T]`` (along `dim`): the same slice when every row starts at one position;
    else, for one new position per row, each row's table row with the batch where the positions were and a
    sequence dimension of 1 after it. Whether the model then broadcasts it per row is not assumed:
    `generate_batch` checks the ragged step against the model before it runs."""
    starts = cache.starts
    if cache.same_start:
        return table.narrow(dim, int(starts[0]), cache.new)
    if cache.new != 1:
        raise RaggedUnsupported("rows at different positions take one new token each")
    return table.index_select(dim, starts).unsqueeze(dim + 1)


def ragged_write(cache: RaggedCache, slot: int, x: torch.Tensor, dim: int) -> int:
    return cache.write(slot, x, dim)


def paged_attention(q, cache: RaggedCache, k_slot: int, v_slot: int, dropout_p: float = 0.0,
                    scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    return cache.attend(q, k_slot, v_slot, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)


def ragged_attention(q, k, v, cache: RaggedCache, dropout_p: float = 0.0, scale: float | None = None,
                     enable_gqa: bool = False) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if cache.unmasked else cache.keep(q.dim()),
                                          dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)


def ragged_mask(q, cache: RaggedCache, form: str, fill: float, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    keep = cache.keep(ndim)
    if form == "keep":
        return keep
    if form == "drop":
        return ~keep
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, fill)


def ragged_graph(gm: fx.GraphModule, ids_index: int) -> fx.GraphModule:
    """The cached graph (rewrites.kv_cache, weights as an input tuple; the token ids its `ids_index`-th input)
    with each row of the batch at its own position.

    Raises:
        RaggedUnsupported: the graph uses the shared start in a way rows of their own cannot (a table slice), or
            caches tensors whose first dimension is not the batch (heads folded into it, as nn.MultiheadAttention
            does).
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    nodes = list(graph.nodes)
    cache = next((n for n in nodes if n.op == "placeholder" and n.name == "kv_cache"), None)
    start = [n for n in nodes if n.op == "call_function" and n.target is kv_start]
    if cache is None or len(start) != 1:
        raise RaggedUnsupported("the graph has no KV cache input")
    (start,) = start
    whole_batch = True   # every attention reads the cache itself (paged_attention): one call for all rows
    ids = [n for n in nodes if n.op == "placeholder"][ids_index]
    batch = ids.meta["val"].shape[0] if isinstance(ids.meta.get("val"), torch.Tensor) else None
    for n in nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "kv_append":
            x = n.args[2].meta.get("val")
            if not isinstance(x, torch.Tensor) or batch is None or str(x.shape[0]) != str(batch):
                raise RaggedUnsupported(f"'{n.name}' caches {list(x.shape) if isinstance(x, torch.Tensor) else x}: "
                                        f"its first dimension is not the batch ({batch}), so rows cannot have "
                                        f"positions of their own")
        if n.op == "call_function" and n.target is causal_mask and n.args[5] < 3:
            raise RaggedUnsupported(f"'{n.name}': the model's mask is {n.args[5]}-D, shared by the batch; rows at "
                                    f"positions of their own need a mask per row")
    for n in nodes:
        if n.op != "call_function":
            continue
        if n.target is aten.arange.start and n.args[0] is start:
            with graph.inserting_before(n):
                new = graph.call_function(ragged_positions, (cache, n.kwargs.get("dtype") or torch.long))
            n.replace_all_uses_with(new)
            graph.erase_node(n)
        elif n.target is aten.slice.Tensor and len(n.args) >= 3 and n.args[2] is start:
            with graph.inserting_before(n):   # a position table (rotary cos/sin) sliced [start:start + T]
                new = graph.call_function(ragged_rows, (n.args[0], n.args[1], cache))
            n.replace_all_uses_with(new)
            graph.erase_node(n)
        elif n.target is causal_mask:
            whole_batch = False
            with graph.inserting_before(n):
                new = graph.call_function(ragged_mask, (n.args[0], cache) + tuple(n.args[2:]))
            n.replace_all_uses_with(new)
            graph.erase_node(n)
        elif n.target is causal_attention:
            k, v = n.args[1], n.args[2]
            direct = all(isinstance(x, fx.Node) and getattr(x.target, "__name__", "") == "kv_append"
                         and len(x.users) == 1 for x in (k, v))
            with graph.inserting_before(n):
                if direct:   # keys and values straight from the cache: read per group of similar length
                    slots = []
                    for x in (k, v):
                        with graph.inserting_before(x):
                            w = graph.call_function(ragged_write, (cache,) + tuple(x.args[1:]))
                        slots.append(w)
                    new = graph.call_function(paged_attention, (n.args[0], cache, *slots), dict(n.kwargs))
                else:
                    new = graph.call_function(ragged_attention, tuple(n.args[:3]) + (cache,), dict(n.kwargs))
                    whole_batch = False
            n.replace_all_uses_with(new)
            graph.erase_node(n)
            if direct:
                for x in (k, v):
                    graph.erase_node(x)
        elif getattr(n.target, "__name__", "") == "kv_append" and any(
                getattr(u.target, "__name__", "") != "causal_attention" for u in n.users):
            whole_batch = False   # keys read by the model's own ops: gathered for the whole call, padded
    graph.eliminate_dead_code()
    for n in graph.nodes:   # what still reads the shared start: positions the rows cannot have
        if n.op == "call_function" and start in n.all_input_nodes and n.target is not operator.add:
            raise RaggedUnsupported(f"'{n.name}' ({n.target}) reads the shared start position: rows at positions "
                                    f"of their own need it per row (a position table slice?)")
        if n.op == "call_function" and n.target is operator.add and start in n.all_input_nodes and n.users:
            raise RaggedUnsupported(f"'{n.name}' (start + T) is used by {', '.join(u.name for u in n.users)}: "
                                    f"rows at positions of their own need it per row")
    graph.lint()
    module = fx.GraphModule(nn.Module(), graph, class_name="RaggedDecoder")
    module.whole_batch = whole_batch
    return module


# ---------------------------------------------------------------------------------------------- the loop

@dataclass
class BatchStats:
    """What a generate_batch run did."""

    steps: list[dict] = field(default_factory=list)   # per decode step: running, blocks_in_use, waste, waiting,
    #                                                     seconds (the batched call)
    preemptions: int = 0
    peak_concurrent: int = 0
    seconds: float = 0.0
    new_tokens: int = 0
    num_blocks: int = 0
    block_size: int = 0

    @property
    def waste(self) -> float:
        """Reserved KV slots holding no token, averaged over the steps."""
        return sum(s["waste"] for s in self.steps) / len(self.steps) if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def write_tensorboard(self, logdir: str | Path, run: str = "generate_batch") -> Path:
        """Each step's running sequences, blocks in use, waste, waiting requests and step time as TensorBoard
        scalars (``generate_batch/...``, step = the decode step), in a new run folder `logdir`/`run` (`run`-1,
        -2, ... if taken), written whole: into a hidden folder first, renamed when done. -> the run folder."""
        from torch.utils.tensorboard import SummaryWriter
        with new_folder(logdir, run) as (staging, target):
            writer = SummaryWriter(log_dir=str(staging))
            try:
                for step, record in enumerate(self.steps):
                    for key in ("running", "blocks_in_use", "waste", "waiting"):
                        writer.add_scalar(f"generate_batch/{key}", record[key], step)
                    if "seconds" in record:
                        writer.add_scalar("generate_batch/step_ms", record["seconds"] * 1e3, step)
                writer.add_scalar("generate_batch/tokens_per_second", self.tokens_per_second, len(self.steps))
                writer.add_scalar("generate_batch/preemptions", self.preemptions, len(self.steps))
                writer.add_scalar("generate_batch/peak_concurrent", self.peak_concurrent, len(self.steps))
            finally:
                writer.close()
        return target


class BatchOutputs(list):
    """One 1-D tensor per request (its prompt, then its new tokens), and `.stats`."""

    stats: BatchStats


@dataclass
class _Request:
    index: Hashable              # (request, sample)
    tokens: list[int]
    prompt_length: int
    max_new: int
    generator: torch.Generator | None
    temperature: float
    top_k: int | None

    @property
    def done(self) -> bool:
        return len(self.tokens) - self.prompt_length >= self.max_new


def generate_batch(fast: nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int | Sequence[int] = 32,
                   kv_budget: int | str = "1GiB", block_size: int = 16, temperature: float | Sequence[float] = 0.0,
                   top_k: int | None = None, seed: int = 0, n: int = 1, reserve: str = "paged") -> BatchOutputs:
    """Generate for every prompt, many at once, on paged KV memory of `kv_budget` bytes.

    Args:
        fast: a drop-in from ``shapeprof.optimize(model, ids)`` with the kv_cache rewrite applied.
        prompts: 1-D token tensors of any lengths; max_new_tokens: one count, or one per request.
        kv_budget: bytes of KV memory (an int or "2GiB"); block_size: tokens per block.
        temperature: 0 (greedy, the default) or > 0 to sample, one value or one per request; top_k: sample among
            the k most likely; seed: sampling is seeded per request and sample, so it does not depend on what else
            runs.
        n: samples per prompt (parallel sampling): the prompt is prefilled once and its blocks shared by the n
            samples until they diverge (copy-on-write). ``outs[i]`` is then (n, length), else 1-D.
        reserve: "paged" (blocks taken as tokens come) or "contiguous": what a cache without paging does, each
            sequence admitted only with room for the model's maximum length (or its own prompt and new tokens if
            the model has none) reserved up front; the same kernels, to compare the two on one model.
    Raises:
        ValueError: a request that cannot fit the budget even alone (naming the budget it needs), bad arguments.
    """
    decoder = type(fast).__dict__.get("_shapeprof_decoder")
    if decoder is None or decoder.graph_module is None:
        raise ValueError(f"{type(fast).__name__} has no cached forward: call shapeprof.optimize(model, ids) with the "
                         f"kv_cache rewrite first (its report says why it did not apply)")
    if decoder.ids_ndim != 2 or decoder.seq_dim != 1:
        raise RaggedUnsupported("generate_batch takes models whose token ids are (batch, sequence)")
    why = type(fast)._shapeprof_state.violation(fast)
    if why is not None:
        raise RaggedUnsupported(f"{why}: the cached forward is not this model's any more; optimize it again")
    ragged = ragged_graph(decoder.graph_module, decoder.ids_index)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if reserve not in ("paged", "contiguous"):
        raise ValueError(f"reserve must be 'paged' or 'contiguous', got {reserve!r}")
    count = len(prompts)
    news = [max_new_tokens] * count if isinstance(max_new_tokens, int) else list(max_new_tokens)
    temps = [float(temperature)] * count if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    if len(news) != count or len(temps) != count:
        raise ValueError("max_new_tokens and temperature take one value, or one per prompt")
    per_token = decoder.bytes_per_position
    num_blocks = blocks_in_budget(kv_budget, per_token, block_size)
    limit = decoder.max_length
    requests = []
    for i, (p, m, t) in enumerate(zip(prompts, news, temps)):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0 or p.is_floating_point() \
                or p.is_complex() or p.dtype == torch.bool:
            raise ValueError(f"prompt {i}: expected a non-empty 1-D tensor of integer token ids")
        if not isinstance(m, int) or m < 0:
            raise ValueError(f"prompt {i}: max_new_tokens must be a non-negative int, got {m!r}")
        total = p.numel() + m
        if limit is not None and total > limit:
            raise ValueError(f"prompt {i}: {p.numel()} + {m} new tokens exceed the model's {limit} positions")
        need = -(-total // block_size)
        if need > num_blocks:
            raise ValueError(f"prompt {i} needs {need} blocks of {block_size} tokens ({need * block_size * per_token:,}"
                             f" bytes of KV memory) even alone; kv_budget={kv_budget!r} holds {num_blocks}")
        requests.append([_Request((i, j), p.tolist(), p.numel(), m, _generator(seed, i, j) if t > 0 else None, t,
                                  top_k) for j in range(n)])

    device = next((t.device for t in fast.parameters()), torch.device("cpu"))
    allocator = BlockAllocator(num_blocks, block_size)
    cache = RaggedCache(allocator, device)
    stats = BatchStats(num_blocks=num_blocks, block_size=block_size)
    reserved: dict[Hashable, int] = {}   # reserve="contiguous": blocks each running sequence holds room for

    def room(r: _Request) -> int:
        return -(-(limit or r.prompt_length + r.max_new) // block_size)

    def admissible(group: list[_Request]) -> bool:
        if reserve == "contiguous":
            return sum(reserved.values()) + len(group) * room(group[0]) <= num_blocks
        # a request is admitted only with a few blocks to spare (vLLM's watermark, 1%): admitted into the last
        # free block, it would be preempted at once, its prefill wasted
        spare = max(1, num_blocks // 100) if running else 0
        return allocator.blocks_in_use + _admission_blocks(group, block_size) + spare <= num_blocks

    def finish(r: _Request) -> None:
        running.remove(r)
        allocator.free(r.index)
        reserved.pop(r.index, None)

    widest = max((room(group[0]) for group in requests), default=0)
    if reserve == "contiguous" and widest > num_blocks:
        raise ValueError(f"reserve='contiguous' holds {widest * block_size * per_token:,} bytes for a sequence; "
                         f"kv_budget={kv_budget!r} holds {num_blocks * block_size * per_token:,}")
    # a prompt's samples are admitted together, sharing it; one with no new tokens to make is done already
    waiting: list[list[_Request]] = [group for group in requests if group[0].max_new > 0]
    running: list[_Request] = []
    attrs = decoder.attributes_of(fast) if decoder.attributes else None
    with torch.no_grad():
        check_ragged(fast, decoder, ragged, attrs, device)
    started = time.perf_counter()

    def run(rows: list[_Request], ids: torch.Tensor) -> torch.Tensor:
        return _step(ragged, decoder, cache, attrs, [r.index for r in rows], ids)

    with torch.no_grad():
        while waiting or running:
            # admit: prefill the waiting requests, in order, while their blocks are free
            while waiting and admissible(waiting[0]):
                group = waiting.pop(0)
                first = group[0]
                allocator.add(first.index)
                allocator.append(first.index, len(first.tokens))
                logits = run([first], torch.tensor([first.tokens], device=device))
                for r in group[1:]:   # the other samples share the prompt's blocks
                    allocator.fork(first.index, r.index)
                for r in group:
                    r.tokens.append(_pick(logits[0], r))
                    stats.new_tokens += 1
                    running.append(r)
                    if reserve == "contiguous":
                        reserved[r.index] = room(r)
                    if r.done:
                        finish(r)
            if not running:
                if waiting and len(waiting[0]) > 1:   # its samples do not fit together: one by one, unshared
                    waiting[:1] = [[r] for r in waiting[0]]
                elif waiting:   # every block is free and one sequence fits alone (checked up front)
                    raise RuntimeError("generate_batch: nothing runs and nothing can be admitted (blocks leaked?)")
                continue
            # a slot each for the next step; preempt the newest while the blocks fall short
            while sum(allocator.blocks_needed(r.index, 1) for r in running) > len(allocator.free_blocks):
                victim = running[-1]
                finish(victim)
                waiting.insert(0, [victim])   # alone now: it is recomputed from its own tokens
                stats.preemptions += 1
            if not running:
                continue
            for r in running:
                _, copies = allocator.append(r.index, 1)
                cache.copy_blocks(copies)
            stats.peak_concurrent = max(stats.peak_concurrent, len(running))
            if reserve == "contiguous":
                slots = sum(reserved.values()) * block_size
                waste = 1 - sum(allocator.lengths[r.index] for r in running) / slots
                in_use = sum(reserved.values())
            else:
                waste, in_use = allocator.waste(), allocator.blocks_in_use
            stats.steps.append({"running": len(running), "blocks_in_use": in_use, "waste": waste,
                                "waiting": len(waiting)})
            began = time.perf_counter()
            picked = []
            groups = [running] if ragged.whole_batch else _by_length(running, allocator)
            calls = len(groups)
            for group in groups:
                logits = run(group, torch.tensor([[r.tokens[-1]] for r in group], device=device))
                picked.extend(zip(group, logits))
            stats.steps[-1]["seconds"] = time.perf_counter() - began   # the batched calls (no sampling)
            stats.steps[-1]["calls"] = calls
            for r, row in picked:
                r.tokens.append(_pick(row, r))
                stats.new_tokens += 1
                if r.done:
                    finish(r)
    stats.seconds = time.perf_counter() - started
    outputs = BatchOutputs(torch.tensor(group[0].tokens) if n == 1 else torch.tensor([r.tokens for r in group])
                           for group in requests)
    outputs.stats = stats
    for observer in list(_observers):
        observer(stats)
    return outputs


def _step(ragged: fx.GraphModule, decoder, cache: RaggedCache, attrs, rows: list, ids: torch.Tensor) -> torch.Tensor:
    """One ragged call: `ids` (B, T) the new tokens of `rows`, whose slots are reserved -> (B, vocab) logits of
    each row's last position."""
    cache.begin(rows, ids.shape[1])
    leaves = list(decoder.leaves)
    leaves[decoder.ids_index] = ids
    leaves.append(cache)
    if attrs is not None:
        leaves.append(attrs)
    return _last_logits(ragged.forward(*leaves))   # not ragged(...): no module hooks (a trace records none)


def _last_logits(outputs) -> torch.Tensor:
    logits = next(o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor) and o.is_floating_point())
    return logits[:, -1] if logits.dim() == 3 else logits


def check_ragged(fast: nn.Module, decoder, ragged: fx.GraphModule, attrs, device) -> list[tuple[str, float, float]]:
    """Sequences of different lengths (the longest first, so that rows are grouped out of order), prefilled one
    by one, then one batched step of all: each row must give what the model gives for it alone, or the model is
    not run this way (`RaggedUnsupported`). -> (what, max abs diff, tolerance) per row."""
    example = decoder.leaves[decoder.ids_index].flatten().tolist()
    lengths = (6, 1, 3) if decoder.max_length is None or decoder.max_length >= 7 else (2, 1)
    seqs = [(example * 8)[:n + 1] for n in lengths]
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    cache = RaggedCache(allocator, device)
    try:
        for i, sq in enumerate(seqs):
            allocator.add(i)
            allocator.append(i, len(sq) - 1)
            _step(ragged, decoder, cache, attrs, [i], torch.tensor([sq[:-1]], device=device))
        for i in range(len(seqs)):
            allocator.append(i, 1)
        got = _step(ragged, decoder, cache, attrs, list(range(len(seqs))),
                    torch.tensor([[sq[-1]] for sq in seqs], device=device))
    except RaggedUnsupported:
        raise
    except Exception as e:
        raise RaggedUnsupported(f"a batched step of rows at different positions fails on this model: "
                                f"{type(e).__name__}: {e}") from e
    checks = []
    for i, sq in enumerate(seqs):
        expected = _last_logits(decoder.prefill(fast, torch.tensor([sq], device=device))[0])[0]
        tol = 1e-4 if expected.dtype == torch.float32 else 3e-2
        diff = float((got[i] - expected).abs().max())
        if not torch.allclose(got[i], expected, rtol=tol, atol=tol * float(expected.abs().max())):
            raise RaggedUnsupported(f"a batched step of rows at different positions differs from the model's own "
                                    f"output (max abs diff {diff:.3g}): the model does not take per-row positions "
                                    f"the way this rewrite gives them")
        checks.append((f"row {i} of a batched step, at position {len(sq) - 1}", diff, tol))
    return checks


def _length_groups(lengths: list[int], slack: float = 1.5) -> list[tuple[list[int], int]]:
    """Indices of `lengths` in groups of similar length, and each group's longest: a group's keys are padded to
    its longest, so one long sequence among short ones would make them all read and attend over its length. A
    group grows while its padded size stays within `slack` times its real size."""
    groups: list[tuple[list[int], int]] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        length = lengths[i]
        if groups and (len(groups[-1][0]) + 1) * length <= slack * (total + length):
            groups[-1][0].append(i)
            total += length
            groups[-1] = (groups[-1][0], length)
        else:
            groups.append(([i], length))
            total = length
    return groups


def _by_length(running: list[_Request], allocator: BlockAllocator) -> list[list[_Request]]:
    """The running sequences in groups of similar length, one call each (for a model whose attention reads the
    padded keys through its own ops, where `RaggedCache.attend` cannot group them inside one call)."""
    return [[running[i] for i in rows] for rows, _ in _length_groups([allocator.lengths[r.index] for r in running])]


def _admission_blocks(group: list[_Request], block_size: int) -> int:
    """Blocks a waiting prompt's samples take to be prefilled and make their first step: the prompt's, shared,
    then a new block each when it ends on a block boundary, else a copy of the part-filled last block for all but
    one of them (copy-on-write)."""
    length, samples = len(group[0].tokens), len(group)
    return -(-length // block_size) + (samples if length % block_size == 0 else samples - 1)


def _generator(seed: int, request: int, sample: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + request * 1009 + sample)


def _pick(logits: torch.Tensor, r: _Request) -> int:
    if r.temperature <= 0:
        return int(logits.argmax())
    scaled = logits.float() / r.temperature
    if r.top_k is not None:
        kth = scaled.topk(min(r.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    # sampled on the CPU, where the request's generator is: the same draws whatever device the model is on
    return int(torch.multinomial(scaled.softmax(-1).cpu(), 1, generator=r.generator))
