"""Paged KV cache: the cache `kv_cache` inserted, in fixed-size blocks through block tables, for many sequences.

The contiguous cache of `kv_cache` serves one sequence batch at one position. This pass turns the cached forward
into its ragged variant (`shapeprof.batching.ragged_graph`): every row of a batch at a position of its own, its
keys and values in blocks of a shared pool (`shapeprof.paging`), so that `shapeprof.generate_batch` decodes many
requests of different lengths in one step under a memory budget. Plain calls of the drop-in keep the contiguous
cache. `shapeprof.optimize` checks the ragged step against the model (three sequences of different lengths, one
batched step) before it keeps the pass.
"""
from __future__ import annotations

import torch.fx as fx

from shapeprof.batching import RaggedUnsupported, ragged_graph
from shapeprof.paging import blocks_in_budget
from shapeprof.text import fmt_bytes

from .base import Match, Rewrite, RewriteContext, RewriteResult, Skip, register

__all__ = ["PagedKVCache"]

BLOCK_SIZE = 16           # tokens per block: vLLM's default, < 4% waste at the lengths it measured
EXAMPLE_BUDGET = 2**30    # the pool size the report works out, for scale


@register
class PagedKVCache(Rewrite):
    """The kv_cache's contiguous cache -> paged blocks with block tables, for batched generation."""

    name = "paged_kv_cache"
    description = ("the cache kv_cache inserted -> paged memory (blocks of 16 tokens, block tables, copy-on-write), "
                   "so shapeprof.generate_batch decodes many requests of different lengths in one batched step")
    capture = "cached"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> RewriteResult:
        result = RewriteResult(self.name)
        decoder = ctx.decoder
        if decoder is None:
            result.skipped.append(Skip("the model", "it needs the cache kv_cache inserts, and kv_cache did not apply"))
            return result
        if decoder.ids_ndim != 2 or decoder.seq_dim != 1:
            result.skipped.append(Skip("the model", "its token ids are not (batch, sequence)"))
            return result
        try:
            result.decoding = ragged_graph(gm, decoder.ids_index)
        except RaggedUnsupported as e:
            result.skipped.append(Skip("the cached forward", str(e)))
            return result
        per = decoder.bytes_per_position
        result.applied.append(Match("the cached forward", f"contiguous KV cache -> paged: blocks of {BLOCK_SIZE} "
                                                          f"tokens ({fmt_bytes(per * BLOCK_SIZE)} each), a block "
                                                          f"table per sequence, each row at its own position"))
        blocks = blocks_in_budget(EXAMPLE_BUDGET, per, BLOCK_SIZE)
        line = (f"paged KV pool: {fmt_bytes(per)} per token; a 1 GiB budget holds {blocks:,} blocks of {BLOCK_SIZE} "
                f"({blocks * BLOCK_SIZE:,} tokens)")
        if decoder.max_length:
            line += (f", where a contiguous cache reserving the model's {decoder.max_length:,} positions per "
                     f"sequence fits {2**30 // (per * decoder.max_length):,} sequences")
        result.notes.append(line)
        result.notes.append("plain calls keep the contiguous cache; shapeprof.generate_batch(fast, prompts, "
                            "kv_budget=..., block_size=16) runs many requests on the paged pool")
        return result
