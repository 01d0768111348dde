"""Paged KV memory: fixed-size blocks handed out through per-sequence block tables (vLLM's PagedAttention scheme).

A contiguous cache reserves every sequence's maximum length up front; a paged one reserves ``block_size`` slots at a
time, so only each sequence's last block is partly empty. `BlockAllocator` does the bookkeeping, and nothing else
(no tensors): a free list, a reference count per block, a block table and a length per sequence.

- `append(seq, n)` reserves the slots for n more tokens and says where each goes: ``(block, offset)`` pairs, and the
  block copies to make first. A sequence's last block that it shares with another (after a `fork`) is copied before
  it is written (copy-on-write), so sequences forked from one prompt share its blocks until they diverge.
- `fork(parent, child)` gives the child the parent's table, every block's count raised by one.
- `free(seq)` drops a sequence (finished or preempted): a block goes back to the free list when its count reaches 0.
- `can_append` says whether the slots are there, before anything changes: running out is the caller's decision to
  make (admit later, preempt), never a half-done append.

`PagedStore` holds one tensor per cached value (a layer's keys, its values), ``(num_blocks, block_size, ...)``, and
reads a sequence's positions back in order through its table.

    >>> a = BlockAllocator(num_blocks=4, block_size=2)
    >>> a.add("p"); a.append("p", 3)                 # three tokens: blocks 0 and 1, nothing to copy
    ([(0, 0), (0, 1), (1, 0)], [])
    >>> a.fork("p", "c"); a.append("c", 1)           # the child writes into the shared half-full block: copied first
    ([(2, 1)], [(1, 2)])
    >>> a.tables["c"], a.refs[:3]
    ([0, 2], [2, 1, 1])
"""
from __future__ import annotations

import re
from typing import Hashable

import torch

__all__ = ["BlockAllocator", "OutOfBlocks", "PagedStore", "blocks_in_budget", "parse_bytes"]


class OutOfBlocks(RuntimeError):
    """An append needed more free blocks than there are (check `can_append` first)."""


class BlockAllocator:
    """Blocks of `block_size` KV slots, `num_blocks` of them, shared out to sequences by block tables."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))   # a stack: block 0 is handed out first
        self.refs: list[int] = [0] * num_blocks
        self.tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}

    # ------------------------------------------------------------------ sequences
    def add(self, seq: Hashable) -> None:
        """A new sequence, holding nothing yet."""
        if seq in self.tables:
            raise KeyError(f"sequence {seq!r} is already in the allocator")
        self.tables[seq] = []
        self.lengths[seq] = 0

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """`child` starts as `parent` is now, sharing every block (parallel sampling of one prompt)."""
        self.add(child)
        self.tables[child] = list(self.tables[parent])
        self.lengths[child] = self.lengths[parent]
        for b in self.tables[child]:
            self.refs[b] += 1

    def free(self, seq: Hashable) -> None:
        """Drop `seq` (finished, or preempted to be recomputed later); its unshared blocks become free."""
        for b in self.tables.pop(seq):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_blocks.append(b)
        del self.lengths[seq]

    # ------------------------------------------------------------------ slots
    def blocks_needed(self, seq: Hashable, n: int) -> int:
        """Free blocks that appending n tokens to `seq` takes (new blocks, and a copy of a shared last block)."""
        length, size = self.lengths[seq], self.block_size
        used = -(-length // size)
        new = -(-(length + n) // size) - used
        copy = 1 if n and length % size and self.refs[self.tables[seq][-1]] > 1 else 0
        return new + copy

    def can_append(self, seq: Hashable, n: int = 1) -> bool:
        return self.blocks_needed(seq, n) <= len(self.free_blocks)

    def append(self, seq: Hashable, n: int = 1) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Reserve n more slots for `seq`: ([(block, offset)] where each new token goes, [(source, destination)]
        block copies to make before writing them). Raises OutOfBlocks, changing nothing, when they are not free."""
        needed = self.blocks_needed(seq, n)
        if needed > len(self.free_blocks):
            raise OutOfBlocks(f"appending {n} tokens to sequence {seq!r} needs {needed} free blocks, "
                              f"{len(self.free_blocks)} are free")
        table, length, size = self.tables[seq], self.lengths[seq], self.block_size
        copies = []
        if n and length % size and self.refs[table[-1]] > 1:   # copy-on-write of the shared, part-filled block
            shared = table[-1]
            own = self._take()
            self.refs[shared] -= 1
            table[-1] = own
            copies.append((shared, own))
        slots = []
        for position in range(length, length + n):
            if position % size == 0:
                table.append(self._take())
            slots.append((table[position // size], position % size))
        self.lengths[seq] = length + n
        return slots, copies

    def _take(self) -> int:
        b = self.free_blocks.pop()
        self.refs[b] = 1
        return b

    def slots(self, seq: Hashable) -> list[tuple[int, int]]:
        """(block, offset) of each position `seq` holds, in order."""
        table, size = self.tables[seq], self.block_size
        return [(table[p // size], p % size) for p in range(self.lengths[seq])]

    # ------------------------------------------------------------------ what it holds
    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def waste(self) -> float:
        """The fraction of the slots in blocks in use that hold no token (a shared block's slots counted once)."""
        filled: dict[int, int] = {}
        for seq, table in self.tables.items():
            length = self.lengths[seq]
            for i, b in enumerate(table):
                filled[b] = max(filled.get(b, 0), min(self.block_size, length - i * self.block_size))
        reserved = len(filled) * self.block_size
        return 1 - sum(filled.values()) / reserved if reserved else 0.0

    def __repr__(self) -> str:
        return (f"<BlockAllocator: {self.blocks_in_use}/{self.num_blocks} blocks of {self.block_size} in use, "
                f"{len(self.tables)} sequences>")


class PagedStore:
    """One cached value (a layer's keys or values) in paged memory: a tensor ``(num_blocks, block_size, *shape)``."""

    def __init__(self, num_blocks: int, block_size: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.data = torch.zeros((num_blocks, block_size, *shape), dtype=dtype, device=device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.data[dst].copy_(self.data[src])

    def write(self, slots: list[tuple[int, int]], x: torch.Tensor) -> None:
        """x: (len(slots), *shape), the new positions in order."""
        blocks, offsets = _index(slots, self.data.device)
        self.data[blocks, offsets] = x

    def read(self, slots: list[tuple[int, int]]) -> torch.Tensor:
        """The positions at `slots`, in order: (len(slots), *shape)."""
        blocks, offsets = _index(slots, self.data.device)
        return self.data[blocks, offsets]


def _index(slots: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor(slots, dtype=torch.long, device=device).reshape(-1, 2)
    return index[:, 0], index[:, 1]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """A byte count from an int or a string like "2GiB", "512 MB", "1.5e9".

        >>> parse_bytes("2GiB"), parse_bytes("512 MB"), parse_bytes(4096)
        (2147483648, 512000000, 4096)
    """
    if isinstance(value, bool):
        raise ValueError(f"not a byte count: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a byte count cannot be negative: {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte count: {value!r} (a number of bytes, or one with a unit: 512MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def blocks_in_budget(budget: int | str, bytes_per_token: int, block_size: int) -> int:
    """How many blocks of `block_size` tokens a KV budget holds, at `bytes_per_token` (every layer's keys and
    values of one token of one sequence).

        >>> blocks_in_budget("1MiB", bytes_per_token=1024, block_size=16)   # 1024 tokens, 64 blocks
        64
    """
    if bytes_per_token <= 0 or block_size <= 0:
        raise ValueError("bytes_per_token and block_size must be positive")
    return parse_bytes(budget) // (bytes_per_token * block_size)
