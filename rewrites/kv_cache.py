"""KV-cache insertion: a decoder written without a cache decodes in O(n), its own generate() unchanged.

A decoder with no cache (nanoGPT, minGPT, a hand-written Llama) runs the whole sequence again for every new
token: n tokens cost O(n^2) FLOPs and re-read every weight n times. This pass takes the model's whole forward as an
ATen graph with the sequence length a symbol T (`shapeprof.sequence`) and makes it compute only the positions
``[start, start + T)`` of a sequence whose first `start` positions it has seen:

- every causal self-attention (`attention_sites`) writes its new keys and values into a preallocated buffer of a
  `shapeprof.kvcache.KVCache` and attends over all positions so far; its causal mask becomes the bottom-right
  aligned one (``scaled_dot_product_attention(is_causal=True)`` aligns top-left, wrong with fewer queries than
  keys), in the form the model's own mask had;
- what the forward derives from positions becomes the rows of the new positions: ``arange(0, T)`` becomes
  ``arange(start, start + T)``, a table sliced ``cos[:T]`` becomes ``cos[start:start + T]``, and anything else
  computed from T (a mask built with ``triu``, a table computed on the fly) is computed for all ``start + T``
  positions and its new rows taken.

Preconditions, each refused with the reason (the rest of optimize still applies): at least one attention and
every one causal (an encoder's bidirectional attention cannot be cached), self-attention over the token ids'
sequence, masks that do not depend on the tokens' values, no attention dropout, and everything outside attention
acting position by position (`shapeprof.positions`: no convolution, cumulative op, pooling or mean over the
sequence). A model with a cache of its own (HuggingFace's ``past_key_values``) is left alone, with the reason.

Whether the result equals the original is not assumed: `shapeprof.optimize` runs a prefill and decode steps
against the original's full forward (and a rewind) before it keeps the rewrite.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from shapeprof.kvcache import OutputKind, causal_attention, causal_mask, kv_start
from shapeprof.masks import _Evaluator
from shapeprof.positions import arg, mixing, size_is
from shapeprof.sequence import data_dependent, hinted, sizes_with, symbols_in
from shapeprof.text import fmt_bytes

from .attention_sites import AttentionSite, Mask, cache_point, describe_shape, find_sites, per_position_bytes
from .base import Match, Rewrite, RewriteContext, RewriteResult, Skip, register

__all__ = ["CachePlan", "CacheSlot", "KVCacheInsertion", "kv_append"]

aten = torch.ops.aten

_OWN_CACHE = ("past_key_values", "past_key_value", "layer_past", "use_cache", "cache_params", "kv_cache")
_REMOVED = -1e4    # a score this low (or a mask value this low) is removed by softmax in any float dtype
_OURS = "shapeprof.kv_cache"   # node.meta key of the nodes this pass adds
_SHAPE_ARGS = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.expand", "aten.unflatten", "aten.new_zeros",
               "aten.new_ones", "aten.new_empty", "aten.new_full", "aten.zeros", "aten.ones", "aten.empty",
               "aten.full", "aten.zeros_like", "aten.ones_like", "aten.empty_like", "aten.full_like",
               "aten.slice", "aten.narrow", "aten.sym_size"}


def kv_append(cache, slot: int, x: torch.Tensor, dim: int) -> torch.Tensor:
    """The graph's call to `KVCache.append`: store the new positions of `x`, return every position so far."""
    return cache.append(slot, x, dim)


@dataclass(frozen=True)
class CacheSlot:
    """One cached tensor: an attention's keys or values."""

    where: str
    what: str                 # 'keys' or 'values'
    shape: str                # '(B, 4, T, 16)'
    dtype: str
    bytes_per_position: int   # for one sequence


@dataclass
class CachePlan:
    """What the rewritten graph needs at run time and what the report says about it."""

    seq_dim: int
    max_length: int | None
    outputs: list[OutputKind]
    slots: list[CacheSlot]
    positions: list[str] = field(default_factory=list)   # how position-derived values were moved

    @property
    def bytes_per_position(self) -> int:
        """Cache bytes one position of one sequence takes (keys and values of every attention)."""
        return sum(s.bytes_per_position for s in self.slots)


@register
class KVCacheInsertion(Rewrite):
    """Causal self-attention without a cache -> keys and values kept in a preallocated cache."""

    name = "kv_cache"
    description = ("causal self-attention in a decoder without a cache -> keys and values kept in a preallocated "
                   "cache, so a call that extends the last sequence computes only its new positions")
    capture = "sequence"

    def unsuitable(self, model: torch.nn.Module) -> str | None:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return None
        own = [p for p in _OWN_CACHE if p in params]
        if own:
            return (f"{type(model).__name__} has a KV cache of its own (its forward takes '{own[0]}'): it already "
                    f"decodes incrementally with use_cache=True, so it is left as it is")
        return None

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> RewriteResult:
        result = RewriteResult(self.name)
        seq = ctx.sequence
        if seq is None:
            result.skipped.append(Skip("the model", "no sequence capture (a whole-forward export with the sequence "
                                                    "length symbolic) was given"))
            return result
        gm.graph.eliminate_dead_code(is_impure_node=_impure)
        planner = _Planner(gm, seq, ctx)
        plan = planner.plan()
        if isinstance(plan, Skip):
            result.skipped.append(plan)
            return result
        planner.transform()
        result.applied.extend(planner.matches)
        result.notes.extend(planner.notes())
        result.decoding = planner.cache_plan
        return result


def _impure(node: fx.Node) -> bool:
    """fx's rule, except that an in-place op on a tensor made in the graph and read by nothing else (a mask
    built with masked_fill_ on zeros_like) may go when its result is unused."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.args and \
            isinstance(node.args[0], fx.Node) and node.args[0].op == "call_function" and \
            len(node.args[0].users) == 1 and node.target._schema.is_mutable and \
            str(node.target.overloadpacket).endswith("_"):
        return False
    return node.is_impure()


class _Planner:
    """Checks one graph for a KV cache and rewrites it."""

    def __init__(self, gm: fx.GraphModule, seq, ctx: RewriteContext):
        self.gm, self.graph, self.seq, self.ctx = gm, gm.graph, seq, ctx
        self.sites: list[AttentionSite] = []
        self.matches: list[Match] = []
        self.cache_plan: CachePlan | None = None
        self.exact: dict[fx.Node, tuple] = {}      # mask node -> (form, fill, dtype, ndim): exactly causal
        self.sym = None
        self.seq_dim = -1

    # ------------------------------------------------------------------ checks
    def plan(self) -> CachePlan | Skip:
        self.sites = find_sites(self.graph)
        if not self.sites:
            return Skip("the model", "no attention found in the forward (scaled_dot_product_attention, or "
                                     "q @ k^T -> softmax -> @ v): nothing to cache")
        why = self._sequence() or self._dropout() or self._causal() or self._position_wise() or self._outputs()
        if why is not None:
            return why
        return self.cache_plan

    def _where(self, site: AttentionSite) -> str:
        source = self.ctx.source(site.node)
        return (site.module_path or site.node.name) + (f" ({source})" if source else "")

    def _sequence(self) -> Skip | None:
        """The ids' dimension that every attention's keys run along (self-attention over the tokens)."""
        candidates = {sym: d for d, sym in self.seq.dim_symbols.items()}
        chosen = None
        for site in self.sites:
            k, q = site.k.meta.get("val"), site.q.meta.get("val")
            if not isinstance(k, torch.Tensor) or not isinstance(q, torch.Tensor) or k.dim() < 2:
                return Skip(self._where(site), "the attention's operands have no shapes in the graph")
            key_len, query_len = k.shape[-2], q.shape[-2]
            sym = next((s for s in candidates if size_is(key_len, s)), None)
            if sym is None:
                return Skip(self._where(site), f"its keys run along {key_len}, not along a dimension of the token "
                                               f"ids: cross-attention, which a self-attention cache does not serve")
            if not size_is(query_len, sym):
                return Skip(self._where(site), f"its queries run along {query_len} and its keys along {key_len}: "
                                               f"not self-attention over one sequence")
            if chosen is not None and sym != chosen:
                return Skip(self._where(site), "the attentions run along different dimensions of the token ids")
            chosen = sym
        self.sym, self.seq_dim = chosen, candidates[chosen]
        return None

    def _dropout(self) -> Skip | None:
        for site in self.sites:
            if site.dropout:
                return Skip(self._where(site), f"attention dropout p={site.dropout} is active (training?): "
                                               f"a cached decode would drop other scores")
        return None

    def _causal(self) -> Skip | None:
        """Every attention causal: no query sees a later key, by is_causal or by a mask checked at two lengths."""
        lengths = self._lengths()
        data = data_dependent(self.graph, [self.seq.ids_node])
        evaluators = {n: _Evaluator(self._leaf(n)) for n in lengths}
        for site in self.sites:
            if site.is_causal and not site.masks:
                continue
            if not site.masks:
                return Skip(self._where(site), "the attention has no causal mask (it attends both ways, as an "
                                               "encoder's does), so a position's keys are not final when it is "
                                               "computed: nothing can be cached")
            for m in site.masks:
                if m.node in data:
                    return Skip(self._where(site), f"its mask ('{m.node.name}') depends on the token values (a "
                                                   f"padding mask?): a cache could not tell when it changes")
                if m.form in ("drop", "keep") and m.fill is not None and m.fill > _REMOVED:
                    return Skip(self._where(site), f"its mask sets scores to {m.fill}, which softmax does not remove")
            exact = len(site.masks) == 1 and not site.is_causal
            for n in lengths:
                keep = None
                for m in site.masks:
                    value = evaluators[n].value(m.node)
                    if not isinstance(value, torch.Tensor) or value.is_meta:
                        return Skip(self._where(site), f"its mask ('{m.node.name}') could not be evaluated")
                    k = _keep(m, value, n)
                    keep = k if keep is None else keep & k
                    exact = exact and _exactly_causal(m, value, k, n) is not None
                future = torch.ones(n, n, dtype=torch.bool).triu(1)
                if bool((keep & future).any()):
                    return Skip(self._where(site), "its mask lets a position attend to later ones: not causal (an "
                                                   "encoder?), so nothing can be cached")
            if exact:
                m = site.masks[0]
                value = evaluators[lengths[0]].value(m.node)
                self.exact[m.node] = _exactly_causal(m, value, _keep(m, value, lengths[0]), lengths[0])
        return None

    def _lengths(self) -> list[int]:
        """Two sequence lengths to evaluate masks at (the example's and one more the model accepts)."""
        t = int(self.seq.leaves[self.seq.ids_index].shape[self.seq_dim])
        limit = self.seq.max_length.get(self.seq_dim)
        other = t + 1 if limit is None or t + 1 <= limit else t - 1
        return [t] + ([other] if other >= 2 and other != t else [])

    def _leaf(self, length: int):
        placeholders = self.seq.placeholders
        ids = self.seq.leaves[self.seq.ids_index]
        shape = list(ids.shape)
        shape[self.seq_dim] = length
        probe = torch.zeros(shape, dtype=ids.dtype)

        def value(node: fx.Node) -> Any:
            if node.op == "placeholder":
                i = placeholders.index(node)
                return probe if i == self.seq.ids_index else self.seq.leaves[i]
            try:
                return operator.attrgetter(node.target)(self.gm)
            except AttributeError:
                return None
        return value

    def _position_wise(self) -> Skip | None:
        data = data_dependent(self.graph, [self.seq.ids_node])
        interior = {n for s in self.sites for n in s.interior}
        for node in self.graph.nodes:
            if node not in data or node in interior or node.op != "call_function":
                continue
            why = mixing(node, self.sym) or self._length_as_value(node)
            if why is not None:
                source = self.ctx.source(node)
                return Skip(self.ctx.where(node) + (f" ({source})" if source else ""),
                            f"{why}: a position's value would depend on other positions than the causal "
                            f"attention lets it see, so the model cannot decode incrementally")
        return None

    def _length_as_value(self, node: fx.Node) -> str | None:
        """A data op that reads the sequence length as a number (x / T), not as a size."""
        name = str(getattr(node.target, "overloadpacket", node.target))
        if name in _SHAPE_ARGS:
            return None
        for a in node.args:
            if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.SymInt) and \
                    self.sym in symbols_in(a.meta["val"]):
                return f"{name} uses the sequence length as a value"
        return None

    def _outputs(self) -> Skip | None:
        kinds = []
        for i, out in enumerate(self._flat_outputs()):
            value = out.meta.get("val") if isinstance(out, fx.Node) else None
            if not isinstance(value, torch.Tensor):
                kinds.append(OutputKind("constant"))
                continue
            dims = sizes_with(value, self.sym)
            if not dims:
                kinds.append(OutputKind("last"))
            elif len(dims) == 1 and size_is(value.shape[dims[0]], self.sym):
                kinds.append(OutputKind("full", dims[0]))
            else:
                return Skip(f"output {i}", f"its shape {list(value.shape)} merges the sequence with other "
                                           f"dimensions, so the new positions cannot be appended to it")
        self.cache_plan = CachePlan(self.seq_dim, self.seq.max_length.get(self.seq_dim), kinds, [])
        return None

    def _flat_outputs(self) -> list:
        out = next(n for n in self.graph.nodes if n.op == "output")
        return list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]

    # ------------------------------------------------------------------ the rewrite
    def transform(self) -> None:
        graph = self.graph
        placeholders = self.seq.placeholders
        with graph.inserting_after(placeholders[-1]):
            self.cache = graph.placeholder("kv_cache")
        self.length = self.seq.size_node(self.seq_dim)   # T: this call's new positions
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = max((self.cache, self.length), key=lambda n: order[n])
        with graph.inserting_after(anchor):
            self.start = self._ours(graph.call_function(kv_start, (self.cache,)))
        with graph.inserting_after(self.start):
            self.total = self._ours(graph.call_function(operator.add, (self.start, self.length)))   # start + T
        self._memo: dict[fx.Node, bool] = {}
        batch_syms = {s: 1 for d, s in self.seq.dim_symbols.items() if d != self.seq_dim}
        names = {s: ("B" if i == 0 else f"B{i}") for i, s in enumerate(batch_syms)}
        slots: list[CacheSlot] = []
        for site in self.sites:
            where = self._where(site)
            k_new, k_slot = self._cached(site, site.k, len(slots), where, "keys", batch_syms, names, slots)
            v_new, v_slot = self._cached(site, site.v, len(slots), where, "values", batch_syms, names, slots)
            if site.kind == "sdpa":
                self._attend(site, k_new, v_new)
            else:
                site.k_user.update_arg(0, k_new)
                site.node.update_arg(1, v_new)
                for m in site.masks:
                    self._mask(site, m)
            self.matches.append(Match(where, f"{site.label} -> cached attention: keys {k_slot.shape} and values "
                                             f"{v_slot.shape} ({k_slot.dtype}) kept between calls"))
        positions, bounds = self._positions()   # (the replaced masks, now unused, are no tables: no users)
        limit = self.cache_plan.max_length
        for b in bounds:
            limit = b if limit is None else min(limit, b)
        self.cache_plan.max_length = limit
        self.cache_plan.slots = slots
        self.cache_plan.positions = positions
        graph.eliminate_dead_code(is_impure_node=_impure)
        graph.lint()

    def _ours(self, node: fx.Node) -> fx.Node:
        node.meta[_OURS] = True
        return node

    def _cached(self, site: AttentionSite, operand: fx.Node, slot: int, where: str, what: str, batch_syms, names,
                slots: list) -> tuple[fx.Node, CacheSlot]:
        found = cache_point(operand, self.sym)
        if isinstance(found, str):   # checked before: cache_point on a clean operand cannot fail
            raise RuntimeError(f"{where}: {found}")
        point, chain = found
        value = point.meta["val"]
        dim = sizes_with(value, self.sym)[0]
        with self.graph.inserting_after(point):
            stored = self._ours(self.graph.call_function(kv_append, (self.cache, slot, point, dim)))
        new = stored
        if chain:   # replicated after the cache (grouped-query heads): replay the replication over every position
            with self.graph.inserting_before(site.k_user if what == "keys" else site.node):
                new = self._rebuild(operand, {point: stored})
        info = CacheSlot(where, what, describe_shape(value, self.sym, names), str(value.dtype).removeprefix("torch."),
                         per_position_bytes(value, self.sym, batch_syms))
        slots.append(info)
        return new, info

    def _attend(self, site: AttentionSite, k: fx.Node, v: fx.Node) -> None:
        node = site.node
        exact = site.is_causal or (site.masks and site.masks[0].node in self.exact)
        if exact:
            with self.graph.inserting_before(node):
                new = self.graph.call_function(causal_attention, (site.q, k, v), {
                    "dropout_p": 0.0, "scale": site.options.get("scale"),
                    "enable_gqa": site.options.get("enable_gqa", False)})
            new.meta.update({key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta})
            node.replace_all_uses_with(new)
            self.graph.erase_node(node)
            return
        node.update_arg(1, k)
        node.update_arg(2, v)
        mask = site.masks[0]
        with self.graph.inserting_before(node):
            rows = self._rows(mask.node)
        if len(node.args) > 3:
            node.update_arg(3, rows)
        else:
            node.update_kwarg("attn_mask", rows)

    def _mask(self, site: AttentionSite, m: Mask) -> None:
        """The mask of the new query rows over every key: exactly the causal one, made directly, or the model's
        own mask computed for all positions and its new rows taken."""
        if m.node in self.exact:
            form, fill, dtype, ndim = self.exact[m.node]
            with self.graph.inserting_before(m.user):
                new = self._ours(self.graph.call_function(causal_mask, (site.q, self.total, form, fill, dtype,
                                                                        ndim)))
        else:
            with self.graph.inserting_before(m.user):
                new = self._rows(m.node)
        index = next(i for i, a in enumerate(m.user.args) if a is m.node)
        m.user.update_arg(index, new)

    def _rows(self, mask: fx.Node) -> fx.Node:
        full = self._rebuild(mask, {})
        value = mask.meta["val"]
        q_dim = value.dim() - 2
        if q_dim >= 0 and size_is(value.shape[q_dim], self.sym):
            full = self._ours(self.graph.call_function(aten.narrow.default, (full, q_dim, self.start, self.length)))
        return full

    # ------------------------------------------------------------------ positions
    def _depends(self, node: Any) -> bool:
        """Whether a node's value depends on the sequence length (through a size, structurally)."""
        if not isinstance(node, fx.Node) or node.meta.get(_OURS):
            return False
        memo = self._memo
        if node in memo:
            return memo[node]
        memo[node] = False   # (no cycles in a graph; this only stops re-entry)
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt) and self.sym in symbols_in(value):
            memo[node] = True
        else:
            memo[node] = any(self._depends(i) for i in node.all_input_nodes)
        return memo[node]

    def _rebuild(self, node: Any, mapping: dict) -> Any:
        """`node` recomputed for all start + T positions: every use of T replaced by start + T, `mapping`'s nodes
        by what it maps them to. New nodes go at the graph's insertion point."""
        if not isinstance(node, fx.Node):
            return node
        if node in mapping:
            return mapping[node]
        if not self._depends(node):
            return node
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt):
            if size_is(value, self.sym):
                return self.total
            if node.op != "call_function" or node.target.__module__ != "_operator":
                raise RuntimeError(f"cannot recompute the size '{node.name}' ({value}) for every position")
        new = self.graph.node_copy(node, lambda n: self._rebuild(n, mapping))
        self._ours(new)
        mapping[node] = new
        return new

    def _positions(self) -> tuple[list[str], list[int]]:
        """Move what the forward derives from positions to the new positions; (what was done, the length bounds
        the tables give)."""
        data = data_dependent(self.graph, [self.seq.ids_node])
        boundaries = [n for n in self.graph.nodes
                      if n.op == "call_function" and n not in data and not n.meta.get(_OURS)
                      and isinstance(n.meta.get("val"), torch.Tensor) and self._depends(n)
                      and any(u in data or u.op == "output" for u in n.users)]
        region = self._region(boundaries)
        sources = [n for n in region if self._source(n) is not None]
        bounds = [b for b in (self._bound(n) for n in sources) if b is not None]
        if not boundaries:
            return [], bounds
        if self._early(region, sources):
            done = []
            for n in sources:
                done.append(self._shift(n))
            return done, bounds
        done = []
        for b in boundaries:
            with self.graph.inserting_after(b):
                full = self._rebuild(b, {})
                rows = full
                value = b.meta["val"]
                for d in sizes_with(value, self.sym):
                    if not size_is(value.shape[d], self.sym):
                        raise RuntimeError(f"the position table '{b.name}' has size {value.shape[d]} along the "
                                           f"sequence, not its length")
                    rows = self._ours(self.graph.call_function(aten.narrow.default, (rows, d, self.start,
                                                                                     self.length)))
            b.replace_all_uses_with(rows, delete_user_cb=lambda u: u in data or u.op == "output")
            done.append(f"{self._at(b)}'{b.name}' computed for every position, the new ones taken")
        return done, bounds

    def _region(self, boundaries: list[fx.Node]) -> list[fx.Node]:
        seen: set[fx.Node] = set()
        stack = list(boundaries)
        while stack:
            n = stack.pop()
            if n in seen or not self._depends(n):
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return [n for n in self.graph.nodes if n in seen]

    def _source(self, node: fx.Node) -> str | None:
        """'arange' or 'slice' when `node` makes positions 0..T-1 (or the first T rows of a fixed table)."""
        if node.op != "call_function":
            return None
        t = node.target
        if t is aten.arange.default and self._is_length(node.args[0]):
            return "arange"
        if t is aten.arange.start and node.args[0] == 0 and self._is_length(node.args[1]):
            return "arange"
        if t is aten.arange.start_step and node.args[0] == 0 and self._is_length(node.args[1]) and \
                (len(node.args) < 3 or node.args[2] == 1):
            return "arange"
        if t is aten.slice.Tensor and arg(node, "start") in (None, 0) and arg(node, "step", 1) == 1 and \
                self._is_length(arg(node, "end")) and not self._depends(node.args[0]):
            return "slice"
        return None

    def _is_length(self, x: Any) -> bool:
        return isinstance(x, fx.Node) and size_is(x.meta.get("val"), self.sym)

    def _early(self, region: list[fx.Node], sources: list[fx.Node]) -> bool:
        """Whether shifting the sources alone moves every table to the new positions: everything between them and
        the data acts position by position and reads T only as a size."""
        for n in region:
            value = n.meta.get("val")
            if n in sources or isinstance(value, torch.SymInt):
                continue
            if mixing(n, self.sym) is not None:
                return False
            name = str(getattr(n.target, "overloadpacket", n.target))
            if name not in _SHAPE_ARGS and any(isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.SymInt)
                                               and self.sym in symbols_in(a.meta["val"]) for a in n.args):
                return False
        return True

    def _shift(self, node: fx.Node) -> str:
        kind = self._source(node)
        if kind == "arange":
            with self.graph.inserting_before(node):
                new = self._ours(self.graph.call_function(aten.arange.start, (self.start, self.total),
                                                          dict(node.kwargs)))
            what = f"{self._at(node)}arange(0, T) -> arange(start, start + T)"
        else:
            with self.graph.inserting_before(node):
                new = self._ours(self.graph.call_function(aten.slice.Tensor, (node.args[0], arg(node, "dim", 0),
                                                                              self.start, self.total)))
            table = node.args[0].target if node.args[0].op == "get_attr" else node.args[0].name
            what = f"{self._at(node)}{table}[:T] -> {table}[start:start + T]"
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        return what

    def _at(self, node: fx.Node) -> str:
        source = self.ctx.source(node)
        return f"{source}: " if source else ""

    def _bound(self, node: fx.Node) -> int | None:
        """The most positions a source can give: a table's rows, or the rows of the embedding an arange indexes."""
        if self._source(node) == "slice":
            table = node.args[0].meta.get("val")
            d = arg(node, "dim", 0)
            return int(hinted(table.shape[d])) if isinstance(table, torch.Tensor) else None
        sizes = [u.args[0].meta["val"].shape[0] for u in node.users
                 if u.op == "call_function" and u.target is aten.embedding.default and u.args[1] is node
                 and isinstance(u.args[0], fx.Node) and isinstance(u.args[0].meta.get("val"), torch.Tensor)]
        return int(min(sizes)) if sizes else None

    # ------------------------------------------------------------------ the report
    def notes(self) -> list[str]:
        plan = self.cache_plan
        per = plan.bytes_per_position
        example = self.seq.bound[self.seq.ids_param]
        batch = 1
        for d, s in enumerate(example.shape):
            if d != plan.seq_dim:
                batch *= s
        lines = [f"KV cache: {len(plan.slots)} tensors (keys and values of {len(self.sites)} attention"
                 f"{'s' if len(self.sites) != 1 else ''}), {fmt_bytes(per)} per position per sequence"]
        if plan.max_length is not None:
            lines[-1] += (f"; {fmt_bytes(per * plan.max_length)} per sequence at the model's maximum of "
                          f"{plan.max_length:,} positions, {fmt_bytes(per * plan.max_length * batch)} for the "
                          f"example's batch of {batch}")
        lines.append("the cache is allocated as it fills (doubling, up to the maximum), on the model's device and "
                     "in its dtype, and is not in state_dict()")
        for p in plan.positions:
            lines.append(f"positions: {p}")
        lines.append("a call whose token ids extend (or share a prefix with) the last call's computes only the new "
                     "positions, checked on every call; any other call runs from scratch and fills the cache again; "
                     "fast.prefill(ids) / fast.decode(next_ids, state) for your own loop")
        return lines


def _keep(m: Mask, value: torch.Tensor, n: int) -> torch.Tensor:
    """Booleans (..., n, n): True where the mask keeps a score."""
    if m.form == "drop":
        keep = ~value.bool()
    elif m.form == "keep":
        keep = value.bool()
    else:
        keep = value > _REMOVED if value.is_floating_point() else value.bool()
    return keep.expand(torch.broadcast_shapes(tuple(keep.shape), (n, n)))


def _exactly_causal(m: Mask, value: torch.Tensor, keep: torch.Tensor, n: int) -> tuple | None:
    """(form, fill, dtype, ndim) of a mask that is exactly the causal mask in every plane (so `causal_mask`
    rebuilds it for any rows), or None."""
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    if not bool((keep == tril).all()) or value.dim() < 2:
        return None
    if m.form == "add":
        if not value.is_floating_point():
            return None
        v = value.expand(keep.shape)
        kept, dropped = v[keep], v[~keep]
        if kept.numel() and bool((kept != 0).any()):
            return None
        fill = float(dropped.flatten()[0]) if dropped.numel() else float("-inf")
        if dropped.numel() and not bool((dropped == fill).all()):
            return None
        return "add", fill, value.dtype, value.dim()
    if value.dtype != torch.bool:
        return None
    return m.form, float(m.fill) if m.fill is not None else 0.0, torch.bool, value.dim()

