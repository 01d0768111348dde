"""How an MoE model's tokens split over its experts: assumed balanced, measured from a real forward, or given.

On meta there is no data, so which experts the tokens pick is an assumption; `Routing` makes it explicit.
A routing holds, per MoE layer, a load per expert (tokens that picked it, or any numbers proportional to
that); from it each expert's *pick probability* p_e = k x load_e / sum(load) (a token picks k distinct
experts, so the p_e sum to k and none exceeds 1). A batch of b independent tokens then reads
sum_e (1 - (1 - p_e)^b) distinct experts on average, which is E x (1 - (1 - k/E)^b) when balanced.

    >>> import torch.nn as nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate, self.top_k = nn.Linear(16, 4, bias=False), 2
    ...         self.experts = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(4))
    >>> from shapeprof.moe import recognise
    >>> info = Routing.given([2, 1, 1, 0]).apply(recognise(nn.Sequential(Block())))
    >>> info.routing, info.layers[0].picks, info.layers[0].imbalance    # expert 0 in every token's pair
    ('given', (1.0, 0.5, 0.5, 0.0), 2.0)

`measure_routing(model, *inputs)` runs the model once, on its own weights, and counts what its routers picked.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .moe import BALANCED, MoEInfo, MoELayer, recognise, router_of

__all__ = ["Routing", "measure_routing", "rows_per_expert"]

MEASURED, GIVEN = "measured", "given"


@dataclass(frozen=True)
class Routing:
    """A routing for `shapeprof.analyze(..., routing=...)`.

    source: "balanced" (every expert equally likely), "measured" (`measure_routing`) or "given" (`Routing.given`);
    loads: MoE layer path -> load per expert (for "given" a single entry under "*" applies to every layer);
    tokens: layer path -> tokens its router saw (measured only).
    """

    source: str = BALANCED
    loads: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    tokens: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def given(cls, loads: Sequence[float] | Mapping[str, Sequence[float]]) -> "Routing":
        """A routing the user states: one sequence of loads per expert for every MoE layer, or a mapping from
        layer path ('model.layers.0.mlp') to its loads. Loads are tokens per expert or anything proportional."""
        if isinstance(loads, Mapping):
            table = {str(path): _loads(v, f"layer '{path}'") for path, v in loads.items()}
        else:
            table = {"*": _loads(loads, "the loads")}
        return cls(GIVEN, table)

    def loads_of(self, layer: MoELayer) -> tuple[float, ...] | None:
        """The loads of `layer` under this routing (None when balanced)."""
        if self.source == BALANCED:
            return None
        found = self.loads.get(layer.path, self.loads.get("*"))
        if found is None:
            raise ValueError(f"routing ({self.source}) has no loads for MoE layer '{layer.path}'; it has "
                             f"{', '.join(repr(p) for p in self.loads) or 'none'}")
        if len(found) != layer.experts:
            raise ValueError(f"routing ({self.source}) for MoE layer '{layer.path}' has {len(found)} loads; the "
                             f"layer has {layer.experts} experts")
        return found

    def apply(self, info: MoEInfo) -> MoEInfo:
        """`info` with every layer's routing, pick probabilities and imbalance set from this routing."""
        if self.source == BALANCED:
            return info
        unknown = sorted(set(self.loads) - {"*"} - {layer.path for layer in info.layers})
        if unknown:
            raise ValueError(f"routing names {', '.join(repr(p) for p in unknown)}, which is not an MoE layer of "
                             f"the model; its MoE layers: {', '.join(repr(la.path) for la in info.layers)}")
        layers = []
        for layer in info.layers:
            loads = self.loads_of(layer)
            total = sum(loads)
            picks = tuple(layer.top_k * v / total for v in loads)
            worst = max(range(layer.experts), key=lambda e: picks[e])
            if picks[worst] > 1 + 1e-9:
                raise ValueError(f"routing ({self.source}) for MoE layer '{layer.path}': expert {worst} has "
                                 f"{loads[worst] / total:.1%} of the load, more than 1/top_k = {1 / layer.top_k:.1%} "
                                 f"(a token picks an expert at most once)")
            layers.append(replace(layer, routing=self.source, picks=tuple(min(p, 1.0) for p in picks),
                                  imbalance=max(loads) / (total / layer.experts)))
        return replace(info, layers=tuple(layers), routing=self.source)

    def describe(self) -> str:
        if self.source == BALANCED:
            return "routing assumed balanced (every expert equally likely, tokens independent)"
        what = (f"routing measured from a real forward ({next(iter(self.tokens.values()), 0)} tokens per layer)"
                if self.source == MEASURED else "routing given by the user")
        return f"{what}; a batch reads sum_e 1 - (1 - p_e)^b experts per layer, p_e each expert's pick probability"


def _loads(values: Sequence[float], what: str) -> tuple[float, ...]:
    try:
        loads = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a sequence of numbers (tokens per expert), got {values!r}") from None
    if not loads or any(v < 0 for v in loads) or sum(loads) <= 0:
        raise ValueError(f"{what}: expected loads >= 0 with a positive sum, got {list(loads)}")
    return loads


def as_routing(routing: Any) -> Routing:
    """None or "balanced" -> the balanced Routing; a Routing as is; a sequence or mapping of loads -> given."""
    if routing is None or routing == BALANCED:
        return Routing()
    if isinstance(routing, Routing):
        return routing
    if isinstance(routing, (Mapping, Sequence)) and not isinstance(routing, str):
        return Routing.given(routing)
    raise ValueError(f"routing: expected 'balanced', a shapeprof.Routing (measure_routing(model, ...) or "
                     f"Routing.given(loads)) or loads per expert, got {routing!r}")


def rows_per_expert(layer: MoELayer, tokens: int) -> list[int]:
    """How `tokens` tokens' tokens x top_k (token, expert) rows split over the layer's experts under its routing:
    expert e gets tokens x p_e rows (balanced: tokens x k / E), rounded by largest remainder so that the rows sum
    to tokens x top_k exactly (FLOPs stay exact) and no expert gets more than every token once.

        >>> layer = MoELayer("mlp", 8, 2, BALANCED, expert_params=1, bytes_per_expert=2)
        >>> rows_per_expert(layer, 1), rows_per_expert(layer, 12)
        ([1, 1, 0, 0, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3])
    """
    picks = layer.picks if layer.picks is not None else (layer.top_k / layer.experts,) * layer.experts
    exact = [tokens * p for p in picks]
    rows = [min(int(x), tokens) for x in exact]
    short = tokens * layer.top_k - sum(rows)
    order = sorted(range(layer.experts), key=lambda e: (-(exact[e] - rows[e]), e))
    for e in order:
        if short <= 0:
            break
        if rows[e] < tokens:
            rows[e] += 1
            short -= 1
    return rows


# ---------------------------------------------------------------------------------------------
# Measured


def measure_routing(model: nn.Module, *args: Any, **kwargs: Any) -> Routing:
    """Run `model(*args, **kwargs)` once on its own weights and count, per MoE layer, the tokens each expert got.

    The picks are read where the model makes them: the expert indices its experts module is called with (HF
    Mixtral, Qwen2-MoE, DeepSeek pass them in), else the router's output (indices it returns, or the top_k of
    its scores). The run is in eval mode, under torch.no_grad and with the RNG forked, so the model, its
    parameters, its mode and the caller's random stream are as they were; it is a real forward, so the model's
    own forward hooks run in it.

    Raises:
        ValueError: the model has no MoE block, or its weights are on meta (nothing to route with).
        RuntimeError: a layer's picks could not be read (named), or the forward failed (torch's reason).
    """
    from .capture import unwrap
    model = unwrap(model)   # torch.compile's wrapper: layer paths as analyze names them, and run eagerly
    info = recognise(model)
    if info is None:
        raise ValueError(f"{type(model).__name__} has no MoE block to measure the routing of")
    on_meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if on_meta is not None:
        raise ValueError(f"measuring the routing runs the model, and its parameter '{on_meta}' is on meta (no "
                         f"values to route with); load real weights, or pass Routing.given(loads)")
    counts = {layer.path: torch.zeros(layer.experts, dtype=torch.long) for layer in info.layers}
    seen = {layer.path: 0 for layer in info.layers}
    handles = []
    modes = {m: m.training for m in model.modules()}
    try:
        for layer in info.layers:
            _watch(model.get_submodule(layer.path), layer, counts, seen, handles)
        model.eval()
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    missing = [path for path, n in seen.items() if n == 0]
    if missing:
        raise RuntimeError(f"the forward ran but no picks were read for MoE layer(s) {', '.join(missing)}: no "
                           f"integer expert indices reached their experts and their router returned no scores "
                           f"with one column per expert")
    return Routing(MEASURED, {p: tuple(int(v) for v in c.tolist()) for p, c in counts.items()},
                   {p: n for p, n in seen.items()})


def _watch(block: nn.Module, layer: MoELayer, counts: dict, seen: dict, handles: list) -> None:
    pending: list[torch.Tensor | None] = [None]

    def from_router(module, inputs, output):
        pending[0] = _picks_in(output, layer, from_scores=True)

    def from_experts(module, inputs, kwargs):
        found = _picks_in((*inputs, *kwargs.values()), layer, from_scores=False)
        if found is not None:
            pending[0] = found

    def commit(module, inputs, output):
        picks = pending[0]
        pending[0] = None
        if picks is None:
            return
        picks = picks.reshape(-1, layer.top_k)
        valid = picks[(picks >= 0) & (picks < layer.experts)]
        counts[layer.path] += torch.bincount(valid.flatten().cpu(), minlength=layer.experts)
        seen[layer.path] += picks.shape[0]

    handles.append(router_of(block).register_forward_hook(from_router))
    if not isinstance(block.experts, nn.ModuleList):   # a module called with the indices (HF's experts)
        handles.append(block.experts.register_forward_pre_hook(from_experts, with_kwargs=True))
    handles.append(block.register_forward_hook(commit))


def _picks_in(value: Any, layer: MoELayer, from_scores: bool) -> torch.Tensor | None:
    """The (tokens, top_k) expert indices in `value`: an integer tensor whose last dim is top_k, else (from a
    router) the top_k of a floating tensor with one column per expert."""
    if isinstance(value, torch.Tensor):
        tensors = [value]
    elif isinstance(value, (tuple, list)):
        tensors = [v for v in value if isinstance(v, torch.Tensor)]
    else:
        tensors = []
    for t in tensors:
        if not t.is_floating_point() and t.dtype != torch.bool and t.dim() >= 1 and t.shape[-1] == layer.top_k:
            return t
    if from_scores:
        for t in tensors:
            if t.is_floating_point() and t.dim() >= 1 and t.shape[-1] == layer.experts:
                return t.topk(layer.top_k, dim=-1).indices
    return None
