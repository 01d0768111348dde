"""Mixture of experts: recognise the MoE blocks of a model and price what a step reads under a routing.

An MoE layer holds E experts and a router that sends each token to top_k of them. A token computes with
top_k experts only (its *active* parameters), but a batch of tokens reads every expert that any of its
tokens picked: at batch 1 a decode step reads top_k experts per layer, at a large batch all E. Which experts
the tokens pick is data-dependent, and on meta there is no data, so the routing is an assumption, said in
the report: "balanced" (every expert equally likely, tokens independent).

    >>> round(expected_distinct_experts(8, 2, 1), 3), round(expected_distinct_experts(8, 2, 64), 3)
    (2.0, 8.0)

Measured and user-given routings (`shapeprof.routing`) replace the assumption with each expert's pick
probability; a hand-written loop over experts, which meta cannot run, is priced by `shapeprof.expert_loop`.
Capacity factors and dropped tokens are not modelled.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

import torch
import torch.nn as nn

__all__ = ["MoEInfo", "MoELayer", "all_experts_batch", "expected_distinct_experts", "experts_read", "moe_decode_bytes",
           "recognise", "routing_top_k", "top_k_for"]

BALANCED = "balanced"
_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_expert_gate")
_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "topk", "k")
_EXPERT_COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts")


def expected_distinct_experts(experts: int, top_k: int, tokens: float) -> float:
    """Expected number of distinct experts that `tokens` independent tokens read, each picking `top_k` of
    `experts` under balanced routing: E x (1 - (1 - k/E)^b).

    Why: a token picks k distinct experts out of E, every k-subset equally likely, so a given expert is among
    its picks with probability k/E and missed with probability 1 - k/E. Tokens are independent, so the expert
    is missed by all b tokens with probability (1 - k/E)^b. By linearity of expectation, the expected number
    of experts read is E times the probability that one is read. This is exact for top-k without
    replacement (no approximation in the per-token step); what it assumes is balance and independence.

        >>> expected_distinct_experts(8, 2, 1), round(expected_distinct_experts(8, 2, 8), 3)
        (2.0, 7.199)

    Args:
        experts: E, the experts in the layer.
        top_k: k, the experts each token picks (1 <= k <= E).
        tokens: b, tokens routed together (a decode batch, or batch x sequence in a prefill); may be 0.
    """
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"expected 1 <= top_k <= experts, got top_k={top_k}, experts={experts}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def all_experts_batch(experts: int, top_k: int) -> int:
    """The smallest batch whose tokens read every expert anyway: expected distinct experts >= E - 0.5
    (fewer than half an expert left unread on average).

    Solves E (1 - k/E)^b <= 0.5, so b = ceil(ln(0.5 / E) / ln(1 - k/E)).

        >>> all_experts_batch(8, 2)    # 8 (1 - 2/8)^10 = 0.45 <= 0.5 < 8 (0.75)^9 = 0.60
        10
    """
    expected_distinct_experts(experts, top_k, 0)   # validates
    if top_k == experts:
        return 1
    b = math.ceil(math.log(0.5 / experts) / math.log(1.0 - top_k / experts))
    while b > 1 and expected_distinct_experts(experts, top_k, b - 1) >= experts - 0.5:   # float-safe edge
        b -= 1
    return max(b, 1)


@dataclass(frozen=True, slots=True)
class MoELayer:
    """One recognised MoE block.

    path: the block's module path ('model.layers.0.mlp'); experts: E; top_k: k; routing: how the tokens split
    ("balanced", assumed; "measured" or "given", see shapeprof.routing); picks: each expert's probability of being
    among a token's top_k (they sum to k; None when balanced: k/E each); imbalance: the busiest expert's load over
    the mean load (1.0 balanced); expert_params / bytes_per_expert: one routed expert's weights;
    shared_params / shared_bytes: the always-active shared expert(s) and their gate (0 when none);
    router_params: the router's weights; tokens: tokens routed in the analysed step (None when unknown);
    expected_experts_read: expected distinct experts those tokens read (None when tokens is None).
    """

    path: str
    experts: int
    top_k: int
    routing: str
    expert_params: int
    bytes_per_expert: int
    shared_params: int = 0
    shared_bytes: int = 0
    router_params: int = 0
    tokens: int | None = None
    expected_experts_read: float | None = None
    picks: tuple[float, ...] | None = None
    imbalance: float = 1.0

    @property
    def all_experts_batch(self) -> int | None:
        """The batch from which every expert of this layer is read anyway (see `all_experts_batch`); under a
        routing that never picks some expert, the batch from which all it does pick are read. None when no
        batch up to 2^20 tokens gets there."""
        if self.picks is None:
            return all_experts_batch(self.experts, self.top_k)
        reachable = sum(1 for p in self.picks if p > 0)
        b = 1
        while experts_read(self, b) < reachable - 0.5:
            b *= 2
            if b > 1 << 20:
                return None
        lo = b // 2 + 1 if b > 1 else 1
        while lo < b:   # the smallest batch in (b/2, b] that gets there
            mid = (lo + b) // 2
            if experts_read(self, mid) >= reachable - 0.5:
                b = mid
            else:
                lo = mid + 1
        return b


def experts_read(layer: MoELayer, tokens: float) -> float:
    """Expected distinct experts of `layer` that `tokens` independent tokens read under its routing:
    sum_e 1 - (1 - p_e)^b over the experts' pick probabilities (E x (1 - (1 - k/E)^b) when balanced).

        >>> layer = MoELayer("mlp", 4, 1, "given", 1, 2, picks=(0.5, 0.5, 0.0, 0.0))
        >>> experts_read(layer, 1), experts_read(layer, 2)
        (1.0, 1.5)
    """
    if layer.picks is None:
        return expected_distinct_experts(layer.experts, layer.top_k, tokens)
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return sum(1.0 - (1.0 - p) ** tokens for p in layer.picks)


@dataclass(frozen=True, slots=True)
class MoEInfo:
    """A model's MoE blocks and its parameter totals.

    total_params: every parameter once; dense_params: all but the routed experts (attention, embeddings,
    norms, routers, shared experts), which every token reads; active_params: what one token computes with,
    dense_params + top_k x expert_params per MoE layer. dtype_bytes: bytes per weight the byte figures use.
    """

    layers: tuple[MoELayer, ...]
    total_params: int
    dense_params: int
    active_params: int
    dtype_bytes: int
    routing: str = BALANCED

    @property
    def dense_bytes(self) -> int:
        return self.dense_params * self.dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def decode_bytes(self, batch: int, dtype_bytes: int | None = None) -> int:
        """Weights read by one decode step of `batch` tokens (see `moe_decode_bytes`)."""
        return moe_decode_bytes(self, batch, dtype_bytes)

    def all_experts_batch(self) -> int:
        """The smallest batch from which every MoE layer reads all its experts anyway (None: not by 2^20)."""
        batches = [layer.all_experts_batch for layer in self.layers]
        return None if None in batches else max(batches, default=1)


def moe_decode_bytes(info: MoEInfo, batch: int, dtype_bytes: int | None = None) -> int:
    """Weight bytes one decode step of `batch` sequences reads: the dense weights + for every MoE layer the
    expected distinct experts that `batch` tokens pick x bytes per expert (balanced, independent routing).
    The KV cache is not included: it is read as for a dense model.

        >>> layer = MoELayer("mlp", 8, 2, "balanced", expert_params=100, bytes_per_expert=200)
        >>> info = MoEInfo((layer,), total_params=1000, dense_params=200, active_params=400, dtype_bytes=2)
        >>> moe_decode_bytes(info, 1)     # 200 x 2 dense + 2 experts x 100 x 2
        800

    Args:
        info: what `recognise` found.
        batch: tokens in the step (one per sequence in decode).
        dtype_bytes: bytes per weight; default info.dtype_bytes.
    """
    size = info.dtype_bytes if dtype_bytes is None else dtype_bytes
    experts = sum(experts_read(layer, batch) * layer.expert_params for layer in info.layers)
    return info.dense_params * size + round(experts * size)


# ---------------------------------------------------------------------------------------------
# Recognition


def recognise(model: nn.Module, dtype_bytes: int | None = None) -> MoEInfo | None:
    """The MoE blocks of `model` (None when it has none): HF Mixtral, Qwen2-MoE (with its shared expert),
    DeepSeek-style `shared_experts`, or a hand-written block.

    A block is a module with an `experts` attribute (an nn.ModuleList of identical experts, or a module holding
    a parameter bank whose first dim is the expert count) and a `gate` or `router` submodule whose weight has
    one row per expert. top_k comes from the block or its router (`top_k`, `num_experts_per_tok`), else from
    `model.config.num_experts_per_tok`.

        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gate, self.top_k = nn.Linear(16, 4, bias=False), 2
        ...         self.experts = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(4))
        >>> info = recognise(nn.Sequential(Block()))
        >>> info.layers[0].experts, info.layers[0].top_k, info.total_params, info.active_params
        (4, 2, 1088, 576)

    Args:
        model: any nn.Module (meta included).
        dtype_bytes: bytes per weight for the byte figures; default each parameter's own element size.
    Raises:
        ValueError: a block was found whose top_k cannot be determined (named in the message).
    """
    config = getattr(model, "config", None)
    layers: list[MoELayer] = []
    claimed: list[str] = []
    routed = 0
    for path, module in model.named_modules():
        if any(path.startswith(c + ".") for c in claimed):
            continue
        found = _block(path, module, config, dtype_bytes)
        if found is None:
            continue
        layers.append(found)
        claimed.append(path)
        routed += found.experts * found.expert_params
    if not layers:
        return None
    params = _unique_params(model)
    total = sum(p.numel() for p in params)
    size = dtype_bytes if dtype_bytes is not None else max((p.element_size() for p in params), default=4)
    dense = total - routed
    active = dense + sum(layer.top_k * layer.expert_params for layer in layers)
    return MoEInfo(tuple(layers), total, dense, active, size)


def _block(path: str, module: nn.Module, config, dtype_bytes: int | None) -> MoELayer | None:
    experts = getattr(module, "experts", None)
    router = router_of(module)
    if not isinstance(experts, nn.Module) or router is None:
        return None
    weight = _router_weight(router)
    if isinstance(experts, nn.ModuleList):
        count = len(experts)
    else:
        count = next((getattr(experts, n) for n in _EXPERT_COUNT_NAMES if isinstance(getattr(experts, n, None), int)),
                     None)
        if count is None and weight is not None:
            count = weight.shape[0]
    if not count or weight is None or weight.shape[0] != count:
        return None
    expert_params = _unique_params(experts)
    n_expert = sum(p.numel() for p in expert_params)
    if n_expert == 0 or n_expert % count:
        return None
    top_k = _top_k(module, router, config)
    if top_k is None:
        raise ValueError(f"MoE block '{path}' ({type(module).__name__}, {count} experts): no top_k attribute on the "
                         f"block or its router and no config.num_experts_per_tok")
    shared = [p for n in _SHARED_NAMES if isinstance(getattr(module, n, None), nn.Module)
              for p in _unique_params(getattr(module, n))]
    per_expert = n_expert // count

    def nbytes(ps) -> int:
        return sum(p.numel() * (dtype_bytes if dtype_bytes is not None else p.element_size()) for p in ps)

    return MoELayer(path, count, top_k, BALANCED, per_expert, nbytes(expert_params) // count,
                    sum(p.numel() for p in shared), nbytes(shared), sum(p.numel() for p in _unique_params(router)))


def router_of(block: nn.Module) -> nn.Module | None:
    """The block's router submodule (`gate` or `router`), None when it has neither."""
    return next((getattr(block, n) for n in _ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)


def _router_weight(router: nn.Module) -> torch.Tensor | None:
    # nn.Linear and HF's TopKRouter hold `weight` (experts, hidden); a router wrapping a Linear holds it one down
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    inner = [m for m in router.children() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    return inner[0].weight if len(inner) == 1 else None


def _top_k(module: nn.Module, router: nn.Module, config) -> int | None:
    for owner in (module, router, getattr(module, "experts", None), config):
        for name in _TOP_K_NAMES:
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
    return None


def _unique_params(module: nn.Module) -> list:
    seen: dict[int, Any] = {}
    for p in module.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def step_weight_bytes(info: MoEInfo, all_weights: int, tokens: int) -> int:
    """The weights a step of `tokens` tokens reads, from `all_weights` (every parameter read once): each MoE
    layer's routed experts count for the expected distinct experts those tokens pick, not all of them.

        >>> layer = MoELayer("mlp", 8, 2, "balanced", expert_params=100, bytes_per_expert=200)
        >>> info = MoEInfo((layer,), total_params=1000, dense_params=200, active_params=400, dtype_bytes=2)
        >>> step_weight_bytes(info, 2000, tokens=1)     # 2000 - 8 x 200 + 2 x 200
        800
    """
    routed = sum(layer.experts * layer.bytes_per_expert for layer in info.layers)
    read = sum(experts_read(layer, tokens) * layer.bytes_per_expert for layer in info.layers)
    return all_weights - routed + round(read)


def expert_reads_note(info: MoEInfo, tokens: int) -> str:
    """What a step of `tokens` tokens reads of the experts, and from which batch every expert is read anyway."""
    layer = info.layers[0]
    read = _mean_read(info, tokens)
    formula = "E (1 - (1 - k/E)^b)" if layer.picks is None else "sum_e 1 - (1 - p_e)^b"
    every = info.all_experts_batch()
    tail = (f"from {every} tokens per step every expert {'the routing picks ' if layer.picks else ''}is read "
            f"anyway, and the step's weight bytes stop growing" if every else
            "some experts stay unread at any batch up to 2^20 tokens")
    return (f"mixture of experts: {tokens} token(s) per step read {read:.2f} of {layer.experts} experts per layer on "
            f"average ({formula}, {info.routing} routing); {tail}")


def expert_reads_finding(info: MoEInfo, nodes: list, tokens: int):
    """A `Finding` for a decode step whose MoE blocks are memory-bound: what their expert reads cost and from which
    batch every expert is read anyway; None when their nodes are not mostly memory-bound or take no time."""
    from .report import Finding
    paths = [la.path for la in info.layers]
    members = [n for n in nodes if any(n.module_path == p or n.module_path.startswith(p + ".") for p in paths)]
    seconds = sum(n.predicted_seconds for n in members)
    memory = sum(n.predicted_seconds for n in members if n.bound == "memory")
    if not members or seconds <= 0 or memory < seconds / 2:
        return None
    flops, nbytes = sum(n.flops for n in members), sum(n.bytes_read + n.bytes_written for n in members)
    ridge = max(n.ridge for n in members)
    layer = info.layers[0]
    read = _mean_read(info, tokens)
    expert_bytes = sum(experts_read(la, tokens) * la.bytes_per_expert for la in info.layers)
    every = info.all_experts_batch()
    why = (f"a decode step of {tokens} token(s) reads {read:.2f} of {layer.experts} experts per MoE layer "
           f"({_size(expert_bytes)} of expert weights, {info.routing} routing) and does "
           f"{flops / max(nbytes, 1):.1f} FLOP/byte with them, under the ridge {ridge:.0f}: the experts' matmuls wait "
           f"on memory")
    if every is not None and tokens < every:
        suggestion = (f"batch more: each added token reads fewer new experts, and from batch {every} every expert is "
                      f"read anyway, so tokens per step grow while the expert bytes stop growing")
    else:
        suggestion = ("every expert is read already: more tokens per step now cost only their own FLOPs and KV "
                      "cache, as in a dense model")
    return Finding("moe expert reads", "experts", len(members), seconds / sum(n.predicted_seconds for n in nodes),
                   flops / max(nbytes, 1), ridge, why, suggestion)


def _mean_read(info: MoEInfo, tokens: int) -> float:
    """Expected distinct experts `tokens` tokens read, averaged over the MoE layers."""
    return sum(experts_read(la, tokens) for la in info.layers) / len(info.layers)


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def with_tokens(info: MoEInfo, tokens: int | None) -> MoEInfo:
    """`info` with every layer's tokens and expected experts read set for a step of `tokens` tokens."""
    if tokens is None:
        return info
    return replace(info, layers=tuple(
        replace(layer, tokens=tokens, expected_experts_read=experts_read(layer, tokens))
        for layer in info.layers))


def tokens_routed(capture, info: MoEInfo) -> int | None:
    """Tokens the first MoE layer's router saw in a capture (its first op's first input, all dims but the
    last): the b of the expected-experts formula for the analysed step. None when no router node is found."""
    first = info.layers[0].path
    routers = {f"{first}.{n}" if first else n for n in _ROUTER_NAMES}
    routers |= {first} if first else set()   # a block kept whole (shapeprof.expert_loop): its first op reads the tokens
    for cn in capture.nodes:
        if cn.module_path in routers or any(cn.module_path.startswith(r + ".") for r in routers):
            for rec in cn.records:
                metas = rec.input_metas()
                if metas and len(metas[0].shape) >= 2:
                    return math.prod(metas[0].shape[:-1])
    return None


# ---------------------------------------------------------------------------------------------
# The routing the grouped-matmul cost formulas see (shapeprof.costs)

_ROUTING: contextvars.ContextVar[dict[int, tuple[MoELayer, ...]]] = contextvars.ContextVar(
    "shapeprof_moe_routing", default={})


@contextlib.contextmanager
def routing_top_k(info: MoEInfo | None) -> Iterator[None]:
    """While costing a model, tell the grouped-matmul formulas its MoE layers and their routing, keyed by expert
    count (a count shared by layers with different top_k is left out: the formulas then use their fallback)."""
    table: dict[int, list[MoELayer]] = {}
    for layer in (info.layers if info is not None else ()):
        table.setdefault(layer.experts, []).append(layer)
    token = _ROUTING.set({e: tuple(layers) for e, layers in table.items()
                          if len({la.top_k for la in layers}) == 1})
    try:
        yield
    finally:
        _ROUTING.reset(token)


def top_k_for(experts: int) -> int | None:
    """The top_k `routing_top_k` set for layers of `experts` experts, None outside it."""
    layers = _ROUTING.get().get(experts)
    return layers[0].top_k if layers else None


def experts_read_for(experts: int, rows: int) -> float | None:
    """Expected distinct experts a grouped matmul over `rows` (token, expert) rows reads, for layers of `experts`
    experts under `routing_top_k`: rows / top_k tokens, averaged over those layers (a grouped-matmul record does
    not say which layer it is; the layers' total is exact when they have the same shapes). None outside it."""
    layers = _ROUTING.get().get(experts)
    if not layers:
        return None
    return sum(experts_read(la, rows / la.top_k) for la in layers) / len(layers)


def of_model(model: nn.Module, dtype=None, routing=None) -> tuple[MoEInfo | None, list[str]]:
    """What `shapeprof.analyze` attaches: `recognise(model)` with bytes at `dtype` (a torch.dtype or None for the
    parameters' own) under `routing` (a shapeprof.routing.Routing; None: balanced), and the notes the report must
    carry (the routing used, or why no routing was found)."""
    try:
        info = recognise(model, dtype.itemsize if dtype is not None else None)
    except ValueError as e:
        return None, [f"mixture of experts not priced by routing: {e}"]
    if info is None:
        return None, []
    described = "routing assumed balanced (every expert equally likely, tokens independent)"
    if routing is not None:
        info, described = routing.apply(info), routing.describe()
    worst = max(info.layers, key=lambda la: la.imbalance)
    imbalance = (f"; busiest expert {worst.imbalance:.2f}x the mean load (layer '{worst.path}')"
                 if info.routing != BALANCED else "")
    return info, [f"mixture of experts: {len(info.layers)} MoE layer(s), {described}{imbalance}; grouped matmuls "
                  f"read the expected distinct experts"]


class MoERoutingError(RuntimeError):
    """A recognised MoE block routes tokens with data-dependent ops that a meta capture cannot follow."""


_DATA_DEPENDENT = ("data-dependent", "GuardOnDataDependentSymNode", "DataDependentOutputException")


def raise_if_data_dependent(info: MoEInfo | None, error: BaseException) -> None:
    """Raise a one-line MoERoutingError (from `error`) when capturing a model with MoE blocks failed on a
    data-dependent op (a loop over experts that selects each expert's tokens with torch.where / nonzero);
    return otherwise, leaving `error` to its caller."""
    if info is None:
        return
    chain, e = [], error
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    hit = next((c for c in chain if any(m in f"{type(c).__name__}: {c}" for m in _DATA_DEPENDENT)), None)
    if hit is None:
        return
    first = str(hit).strip().splitlines()[0] if str(hit).strip() else type(hit).__name__
    paths = ", ".join(f"'{layer.path}'" for layer in info.layers)
    raise MoERoutingError(
        f"cannot capture MoE block {paths} on meta: its routing is data-dependent (which tokens reach which expert "
        f"depends on the router's values, which meta tensors do not hold), and its experts are not an nn.ModuleList "
        f"of modules that a fixed split could run (shapeprof.expert_loop); an experts module that runs one grouped "
        f"matmul (as HF Mixtral's) or a loop over an nn.ModuleList is priced. Cause: {type(hit).__name__}: "
        f"{first}") from error


@contextlib.contextmanager
def data_dependent_routing(info: MoEInfo | None) -> Iterator[None]:
    """Around a capture or its costing: a data-dependent failure in a model with MoE blocks becomes one
    MoERoutingError naming them (see `raise_if_data_dependent`); any other error passes unchanged."""
    try:
        yield
    except MoERoutingError:
        raise
    except Exception as e:
        raise_if_data_dependent(info, e)
        raise
