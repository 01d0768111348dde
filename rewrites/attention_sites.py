"""Attention in an ATen graph: where queries meet keys and values, what masks the scores, where a cache goes.

Found in the forms people write, as ``torch.export`` records them:

- ``scaled_dot_product_attention(q, k, v, attn_mask=None | mask, is_causal=...)``: nanoGPT's flash path, a
  hand-written Llama (``enable_gqa=True`` included), ``nn.MultiheadAttention(need_weights=False)`` and
  ``nn.TransformerEncoderLayer`` (both call it);
- the chain spelled out: ``q @ k.transpose(-2, -1)``, a scale, a mask (``masked_fill`` with a sliced ``tril``
  buffer, an additive ``-inf`` mask, ``torch.where``), ``softmax(-1)``, dropout, ``@ v``; and
  ``nn.MultiheadAttention``'s own, ``baddbmm(mask, q, k^T) -> softmax -> bmm(., v)``.

For each, `cache_point` says which tensor a KV cache stores: the keys (values) as they enter attention, or, when
they are replicated on the way (grouped-query attention written as ``expand`` + ``reshape``, or
``repeat_interleave``), the tensor before the replication, so the cache holds n_kv_heads heads, not n_heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from shapeprof.positions import INT_MAX, arg, size_is
from shapeprof.sequence import sizes_with

__all__ = ["AttentionSite", "Mask", "cache_point", "describe_shape", "find_sites", "per_position_bytes"]

aten = torch.ops.aten

_SDPA = {aten.scaled_dot_product_attention.default}
_SCORES = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
_OUT = {aten.matmul.default, aten.bmm.default}
_SCALE = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.type_as.default, aten.to.dtype_layout}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_DROPOUT = {aten.dropout.default}
_CARRY = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.unsqueeze", "aten.squeeze", "aten.clone",
          "aten.contiguous", "aten.alias", "aten.slice", "aten.expand", "aten.repeat_interleave", "aten.repeat",
          "aten.flatten", "aten.unflatten"}
_REPLICATE = {"aten.expand", "aten.repeat_interleave", "aten.repeat"}


@dataclass(frozen=True)
class Mask:
    """A mask applied to the scores: its value node, the op applying it, and how it reads."""

    node: fx.Node
    user: fx.Node
    form: str                    # 'drop' (masked_fill: True is masked), 'keep' (True is kept), 'add' (added)
    fill: float | None = None    # the score a masked position gets ('drop', and 'keep' through torch.where)


@dataclass
class AttentionSite:
    """One attention: its operands as the graph has them, its masks and the nodes that mix positions by design."""

    kind: str                    # 'sdpa' or 'matmul'
    node: fx.Node                # the sdpa call, or the matmul of the weights with the values
    q: fx.Node
    k: fx.Node                   # the keys as they enter ('matmul': before the transpose)
    v: fx.Node
    k_user: fx.Node              # the node that reads `k` (sdpa, or the transpose)
    masks: list[Mask] = field(default_factory=list)
    is_causal: bool = False      # sdpa(is_causal=True)
    options: dict = field(default_factory=dict)   # sdpa's dropout_p, scale, enable_gqa
    interior: list[fx.Node] = field(default_factory=list)
    label: str = ""
    dropout: float = 0.0         # the attention's dropout probability while it runs

    @property
    def module_path(self) -> str:
        stack = self.node.meta.get("nn_module_stack")
        if not stack:
            return ""
        path = next(reversed(stack.values()))[0]
        return path if isinstance(path, str) else ""


def find_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention of the graph, in graph order."""
    sites = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _SDPA:
            sites.append(_sdpa_site(node))
        elif node.target in _SCORES:
            site = _matmul_site(node)
            if site is not None:
                sites.append(site)
    return sites


def _sdpa_site(node: fx.Node) -> AttentionSite:
    q, k, v = (arg(node, n) for n in ("query", "key", "value"))
    mask = arg(node, "attn_mask")
    masks = []
    if isinstance(mask, fx.Node):
        value = mask.meta.get("val")
        form = "keep" if isinstance(value, torch.Tensor) and value.dtype == torch.bool else "add"
        masks.append(Mask(mask, node, form))
    causal = bool(arg(node, "is_causal", False))
    options = {"dropout_p": arg(node, "dropout_p", 0.0), "scale": arg(node, "scale"),
               "enable_gqa": bool(arg(node, "enable_gqa", False))}
    label = "scaled_dot_product_attention(" + ("is_causal=True" if causal else
                                              "attn_mask=mask" if masks else "no mask") + ")"
    return AttentionSite("sdpa", node, q, k, v, node, masks, causal, options, [node], label,
                         float(options["dropout_p"] or 0.0))


def _matmul_site(scores: fx.Node) -> AttentionSite | None:
    """The chain from `scores` (q @ k^T) to the weights' matmul with the values, or None if it is not one."""
    baddbmm = scores.target is aten.baddbmm.default
    q, kt = (scores.args[1], scores.args[2]) if baddbmm else (scores.args[0], scores.args[1])
    k = _untransposed(kt)
    if k is None or not isinstance(q, fx.Node):
        return None
    masks: list[Mask] = []
    steps = ["baddbmm(mask, q, k^T)" if baddbmm else "q @ k^T"]
    if baddbmm:
        if arg(scores, "beta", 1) != 1 or arg(scores, "alpha", 1) != 1:
            return None
        if isinstance(scores.args[0], fx.Node):
            masks.append(Mask(scores.args[0], scores, "add"))
    interior = [kt, scores]
    node, softmaxed, dropout = scores, False, 0.0
    while True:
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        t = user.target
        if user.op != "call_function":
            return None
        if not softmaxed and t in _SCALE and user.args[0] is node and isinstance(user.args[1], (int, float)):
            steps.append("scale")
        elif not softmaxed and t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and user.args[0] is node:
            fill = user.args[2]
            if not isinstance(fill, (int, float)) or not isinstance(user.args[1], fx.Node):
                return None
            masks.append(Mask(user.args[1], user, "drop", float(fill)))
            steps.append("masked_fill")
        elif not softmaxed and t is aten.add.Tensor and node in user.args[:2] and \
                all(isinstance(a, fx.Node) for a in user.args[:2]) and len(user.args) == 2 \
                and arg(user, "alpha", 1) == 1:
            other = user.args[1] if user.args[0] is node else user.args[0]
            masks.append(Mask(other, user, "add"))
            steps.append("+ mask")
        elif not softmaxed and t is aten.where.self and user.args[1] is node and isinstance(user.args[0], fx.Node):
            fill = user.args[2]
            fill = fill if isinstance(fill, (int, float)) else _scalar(fill)
            if fill is None:
                return None
            masks.append(Mask(user.args[0], user, "keep", float(fill)))
            steps.append("where")
        elif t in _CASTS:
            pass
        elif not softmaxed and t in _SOFTMAX and _last_dim(user, node):
            softmaxed = True
            steps.append("softmax")
        elif softmaxed and t in _DROPOUT:
            p, train = arg(user, "p", 0.0), arg(user, "train", True)
            dropout = float(p) if train else 0.0
        elif softmaxed and t in _OUT and user.args[0] is node and isinstance(user.args[1], fx.Node):
            steps.append("@ v")
            interior.append(user)
            return AttentionSite("matmul", user, q, k, user.args[1], kt, masks, False, {}, interior,
                                 ", ".join(steps), dropout)
        else:
            return None
        interior.append(user)
        node = user


def _untransposed(kt: Any) -> fx.Node | None:
    """k, when `kt` is k with its last two dimensions swapped."""
    if not isinstance(kt, fx.Node) or kt.op != "call_function":
        return None
    value = kt.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    n = value.dim()
    if kt.target is aten.transpose.int:
        dims = {d % n for d in kt.args[1:3]}
        return kt.args[0] if dims == {n - 2, n - 1} else None
    if kt.target is aten.permute.default:
        perm = [d % n for d in kt.args[1]]
        return kt.args[0] if perm == list(range(n - 2)) + [n - 1, n - 2] else None
    return None


def _last_dim(softmax: fx.Node, x: fx.Node) -> bool:
    value = x.meta.get("val")
    return isinstance(value, torch.Tensor) and softmax.args[1] % value.dim() == value.dim() - 1


def _scalar(node: Any) -> float | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        try:
            return float(value)
        except Exception:
            return None
    return None


def cache_point(operand: fx.Node, sym: sympy.Symbol) -> tuple[fx.Node, list[fx.Node]] | str:
    """(the tensor to cache, the nodes from it to `operand` a cached read must replay), or why there is none.

    The tensor must have one dimension that is the sequence (size exactly T) and no other involving T."""
    chain: list[fx.Node] = []
    node = operand
    while isinstance(node, fx.Node) and node.op == "call_function" and _name(node) in _CARRY and \
            _carries(node) and isinstance(node.args[0], fx.Node):
        chain.append(node)
        node = node.args[0]
    replicated = [i for i, n in enumerate(chain) if _name(n) in _REPLICATE and _grows(n)]
    if replicated:
        first = replicated[-1]                # the one nearest the source
        for i in range(first + 1, len(chain) + 1):
            candidate = chain[i] if i < len(chain) else node
            if _clean(candidate, sym):
                return candidate, list(reversed(chain[:i]))
    if _clean(operand, sym):
        return operand, []
    value = operand.meta.get("val")
    shape = list(value.shape) if isinstance(value, torch.Tensor) else "?"
    return f"its keys or values have shape {shape}: no single dimension is the sequence"


def _clean(node: fx.Node, sym) -> bool:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return False
    dims = sizes_with(value, sym)
    return len(dims) == 1 and size_is(value.shape[dims[0]], sym)


def _carries(node: fx.Node) -> bool:
    if _name(node) == "aten.slice":   # only a whole slice (x[:, :, :] as written) carries the tensor unchanged
        return arg(node, "start") in (None, 0) and arg(node, "end") in (None, INT_MAX) and arg(node, "step", 1) == 1
    return True


def _grows(node: fx.Node) -> bool:
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return False
    return sympy.simplify(_expr(after.numel()) - _expr(before.numel())) != 0


def _expr(size: Any) -> sympy.Expr:
    return sympy.sympify(size.node.expr if isinstance(size, torch.SymInt) else size)


def _name(node: fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return str(packet) if packet is not None else str(node.target)


def describe_shape(value: torch.Tensor, sym, batch: dict) -> str:
    """'(B, 4, T, 16)': the sequence as T, each batch symbol by its name in `batch`."""
    parts = []
    for s in value.shape:
        if isinstance(s, int):
            parts.append(str(s))
            continue
        expr = _expr(s).subs({sym: sympy.Symbol("T"), **{b: sympy.Symbol(n) for b, n in batch.items()}})
        parts.append(str(expr).replace(" ", ""))
    return "(" + ", ".join(parts) + ")"


def per_position_bytes(value: torch.Tensor, sym, batch: dict[Any, int]) -> int:
    """Bytes one position of this tensor takes, with the batch symbols at the sizes given."""
    total = 1
    for s in value.shape:
        if isinstance(s, int):
            total *= s
            continue
        expr = _expr(s)
        if sym in expr.free_symbols:
            continue
        total *= int(expr.subs(batch))
    return total * value.dtype.itemsize

