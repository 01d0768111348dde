"""A hand-written loop over experts, priced on meta under a routing.

A loop MoE picks each expert's tokens with `torch.where(picks == e)` or a boolean mask: how many there are is
data, which meta tensors do not hold, so its forward cannot run on meta. For the capture, each such block's
forward is replaced on the meta shadow (never on the user's model) by one that does the same work with the
rows fixed by the routing (`shapeprof.routing.rows_per_expert`): the router on every token, softmax and top_k of
its scores, then per expert a gather of its rows, the expert itself on them, the weighting and a scatter-add
back (`index_add_`), and the shared expert(s) on every token. The experts' FLOPs are exact (the rows sum to
tokens x top_k); its gathers and scatters are priced as the real loop's index / index_add_ of those rows.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from .moe import MoEInfo, MoELayer, router_of
from .routing import rows_per_expert

__all__ = ["loop_stand_ins"]

_SHARED = ("shared_expert", "shared_experts")


def loop_stand_ins(model: nn.Module, info: MoEInfo) -> dict[str, Callable[[nn.Module], Callable]] | None:
    """For every MoE layer of `model` whose experts are an nn.ModuleList (a loop runs them), a maker of the
    priced forward for the shadow's copy of the block; None when some layer's experts are not such a list
    (a bank of stacked weights, which has no per-expert module to call)."""
    makers = {}
    for layer in info.layers:
        block = model.get_submodule(layer.path)
        if not isinstance(getattr(block, "experts", None), nn.ModuleList):
            return None
        makers[layer.path] = _maker(layer)
    return makers


def _maker(layer: MoELayer) -> Callable[[nn.Module], Callable]:
    def make(block: nn.Module) -> Callable:
        router, experts = router_of(block), block.experts
        shared = [getattr(block, n) for n in _SHARED if isinstance(getattr(block, n, None), nn.Module)]
        shared_gate = getattr(block, "shared_expert_gate", None)

        def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            flat = hidden.reshape(-1, hidden.shape[-1])
            scores = router(flat)
            if isinstance(scores, (tuple, list)):   # a router returning (logits, ...)
                scores = scores[0]
            weights, _ = torch.topk(scores.softmax(-1), layer.top_k, dim=-1)
            out = torch.zeros_like(flat)
            for expert, rows in zip(experts, rows_per_expert(layer, flat.shape[0])):
                if not rows:
                    continue   # an expert no token picked is not run, and its weights are not read
                index = torch.arange(rows, device=flat.device)
                y = expert(flat[index]) * weights[index, :1].to(flat.dtype)
                out.index_add_(0, index, y.to(out.dtype))
            for module in shared:
                y = module(flat)
                if isinstance(shared_gate, nn.Module):
                    y = torch.sigmoid(shared_gate(flat)) * y
                out = out + y
            return out.reshape(hidden.shape)
        return forward
    return make
