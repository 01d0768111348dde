"""Step-by-step verification: a rewrite that changes how a model is called over time is checked the way it is used.

One call proves nothing about a KV cache: its first call computes everything from scratch, like the original.
So a rewrite whose capture is 'sequence' is verified on a `schedule` of calls, each compared with the original's
full forward on the same tokens (the testing method of TensorRT-LLM's AutoDeploy and HuggingFace's cache tests):

1. the example itself, from scratch (the rewritten full forward equals the original);
2. one new token at a time, several times (each call must reuse what the cache holds);
3. a rewind: back to an earlier prefix, then a different token than before (the cache must drop what follows).

The new tokens are the example's own ids, so they are valid for its embedding.

    >>> import torch
    >>> [s.label for s in schedule(torch.tensor([[5, 6, 7]]), 1, None, decode_steps=2)]
    ['the example (3 positions)', 'one more token (4)', 'one more token (5)', 'back to 4 positions', 'another token at position 4']
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Step", "schedule"]


@dataclass(frozen=True)
class Step:
    """One call of the schedule: its token ids, and whether the candidate should reuse its cache on it."""

    label: str
    ids: torch.Tensor
    reuses: bool


def schedule(ids: torch.Tensor, seq_dim: int, max_length: int | None, decode_steps: int = 4) -> list[Step]:
    """The calls that verify a decoder on the example `ids` (sequence along `seq_dim`), within `max_length`."""
    d = seq_dim
    t = ids.shape[d]
    room = decode_steps + 1 if max_length is None else max(0, max_length - t)
    steps = min(decode_steps, room)
    extra = _tokens(ids, d, steps)
    seq = torch.cat([ids, extra], d) if steps else ids
    first = t
    if steps < 2:   # no room to grow past the example: start from a shorter prefix of it
        first = max(1, t - decode_steps)
        seq = ids
    out = [Step(f"the example ({t} positions)", ids, False)]
    if first < t:
        # a prefix of the last call: the cache keeps it (all but its last position), like any rewind
        out.append(Step(f"a prefix of the example ({first} positions)", seq.narrow(d, 0, first), first > 1))
    for n in range(first + 1, seq.shape[d] + 1):
        out.append(Step(f"one more token ({n})", seq.narrow(d, 0, n), True))
    end = seq.shape[d]
    if end - first >= 2:
        back = end - 1
        out.append(Step(f"back to {back} positions", seq.narrow(d, 0, back), True))
        changed = seq.narrow(d, 0, back).clone()
        last = changed.narrow(d, back - 1, 1)
        last.copy_(torch.where(last == ids.min(), ids.max(), ids.min()))
        out.append(Step(f"another token at position {back}", changed, True))
    return out


def _tokens(ids: torch.Tensor, d: int, n: int) -> torch.Tensor:
    """n more positions for every sequence, taken from the example's own tokens (in reverse, so they differ
    from what precedes them)."""
    if n == 0:
        return ids.narrow(d, 0, 0)
    src = ids.flip(d)
    reps = -(-n // src.shape[d])
    return torch.cat([src] * reps, d).narrow(d, 0, n)
