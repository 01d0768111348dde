"""Tests for shapeprof/paging.py: the block allocator under random admit / append / fork / finish / preempt
sequences (hypothesis), checked against a plain model of what each sequence holds."""
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shapeprof.paging import BlockAllocator, OutOfBlocks, PagedStore, blocks_in_budget, parse_bytes

POISON = -1


class AllocatorMachine(RuleBasedStateMachine):
    """Each sequence's tokens live in a PagedStore of ints through its block table; `expected` is what it holds.
    A freed block is poisoned: no other sequence may ever read the poison."""

    def __init__(self):
        super().__init__()
        self.allocator = BlockAllocator(num_blocks=12, block_size=4)
        self.store = PagedStore(12, 4, (), torch.long)
        self.expected: dict[int, list[int]] = {}
        self.next_id = 0
        self.next_token = 0

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    @rule()
    def admit(self):
        seq = self._new_id()
        self.allocator.add(seq)
        self.expected[seq] = []

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), n=st.integers(1, 9))
    def append(self, data, n):
        seq = data.draw(st.sampled_from(sorted(self.expected)))
        before = (list(self.allocator.free_blocks), dict(self.allocator.tables), list(self.allocator.refs))
        if not self.allocator.can_append(seq, n):
            with pytest.raises(OutOfBlocks):
                self.allocator.append(seq, n)
            assert (self.allocator.free_blocks, self.allocator.refs) == (before[0], before[2])   # nothing changed
            return
        slots, copies = self.allocator.append(seq, n)
        self.store.copy_blocks(copies)
        tokens = list(range(self.next_token, self.next_token + n))
        self.next_token += n
        self.store.write(slots, torch.tensor(tokens))
        self.expected[seq].extend(tokens)

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.expected)))
        child = self._new_id()
        self.allocator.fork(parent, child)
        self.expected[child] = list(self.expected[parent])

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def finish_or_preempt(self, data):
        seq = data.draw(st.sampled_from(sorted(self.expected)))
        held = set(self.allocator.tables[seq])
        self.allocator.free(seq)
        del self.expected[seq]
        for b in held & set(self.allocator.free_blocks):    # poison what was freed
            self.store.data[b].fill_(POISON)

    @invariant()
    def counts_match_the_tables(self):
        a = self.allocator
        holders = [0] * a.num_blocks
        for table in a.tables.values():
            for b in table:
                holders[b] += 1
        assert holders == a.refs                                  # none shared without a count
        assert len(set(a.free_blocks)) == len(a.free_blocks)      # none freed twice
        assert all(a.refs[b] == 0 for b in a.free_blocks)
        assert len(a.free_blocks) + sum(1 for r in a.refs if r) == a.num_blocks   # none leaked

    @invariant()
    def every_sequence_reads_what_it_wrote(self):
        for seq, tokens in self.expected.items():
            assert self.allocator.lengths[seq] == len(tokens)
            got = self.store.read(self.allocator.slots(seq)).tolist() if tokens else []
            assert got == tokens

    @invariant()
    def waste_is_a_fraction(self):
        assert 0.0 <= self.allocator.waste() < 1.0


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_only_the_last_block_is_partly_empty():
    a = BlockAllocator(num_blocks=100, block_size=16)
    for i, n in enumerate([1, 15, 16, 17, 100]):
        a.add(i)
        a.append(i, n)
    assert a.blocks_in_use == 1 + 1 + 1 + 2 + 7
    assert a.waste() == pytest.approx(1 - 149 / (12 * 16))


def test_forks_share_until_they_diverge():
    a = BlockAllocator(num_blocks=8, block_size=4)
    a.add("prompt")
    a.append("prompt", 8)                         # two full blocks
    for child in ("a", "b", "c"):
        a.fork("prompt", child)
    assert a.blocks_in_use == 2 and a.refs[:2] == [4, 4]
    _, copies = a.append("a", 1)                  # the shared blocks are full: a new block, no copy
    assert copies == [] and a.blocks_in_use == 3
    a.free("prompt")
    assert a.refs[:2] == [3, 3]


def test_out_of_blocks_changes_nothing():
    a = BlockAllocator(num_blocks=2, block_size=4)
    a.add(0)
    a.append(0, 6)
    with pytest.raises(OutOfBlocks, match="needs 1 free blocks, 0 are free"):
        a.append(0, 3)
    assert a.lengths[0] == 6 and a.tables[0] == [0, 1] and a.free_blocks == []


def test_budgets():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000
    assert blocks_in_budget("2GiB", bytes_per_token=36_864, block_size=16) == 2 * 2**30 // (36_864 * 16)
    for bad in ("two gigs", "-1GB", True, -5):
        with pytest.raises(ValueError):
            parse_bytes(bad)
