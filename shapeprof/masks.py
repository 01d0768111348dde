"""Attention masks: which scores an explicit mask keeps, so attention is priced for the scores really computed.

HuggingFace decoders build an explicit boolean mask while they are traced and call
``scaled_dot_product_attention(..., attn_mask=mask, is_causal=False)``; hand-written models pass
``torch.tril(...)`` or a slice of a registered buffer. The op's record only says "a mask of shape (1, 1, T, T)",
and counting all T x T scores would price a causal decoder as a bidirectional encoder (7% high for GPT-2 at 1,024
tokens, 14% for Llama at 8k). The mask's *values* are almost always a function of shapes and positions only
(``arange``, comparisons, ``tril``), or of a padding mask the user gave, so they can be computed exactly:

1. walk the graph back from the mask argument to its sources;
2. re-run that subgraph on the CPU, with real values where they are known (factories, the user's real inputs,
   the model's real buffers) and meta tensors where they are not (parameters, inputs given by shape);
3. if the mask comes out real, count the kept scores and name its structure: causal, sliding window, padding,
   or custom.

What the counts mean (the convention of `shapeprof.costs`): attention costs its two matmuls over the scores the
mask keeps. A causal mask is priced as ``is_causal=True``: the fused kernel a GPU runs for it skips the masked
blocks and reads no mask. A padding or window mask keeps what it keeps, and is read. A mask whose values
cannot be known (it depends on an input given as a shape) is counted in full, and the report says so.

    >>> import torch
    >>> keep = torch.ones(4, 4, dtype=torch.bool).tril()
    >>> describe(keep, lq=4, lk=4)
    MaskKind(kind='causal', kept=10)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree
from torch.fx.node import map_aggregate

from .records import OpRecord, TensorMeta

#: Masks are evaluated on the CPU; a subgraph with an intermediate larger than this many elements is left
#: unevaluated (counted in full, with a note) rather than allocating gigabytes: a (1, 1, 16k, 16k) mask fits.
MAX_ELEMENTS = 1 << 28

_SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention,
                 torch.ops.aten.scaled_dot_product_attention.default}
_SDPA_OP = "aten.scaled_dot_product_attention"
_MASK_POSITION = 3   # (query, key, value, attn_mask, ...) in both F.scaled_dot_product_attention and the ATen op


@dataclass(frozen=True, slots=True)
class MaskedScores(TensorMeta):
    """The mask argument of an attention record, with what its values keep.

    `kept` is the number of True (or not -inf) entries of the mask broadcast to (*its leading dims, Lq, Lk); the
    cost formula scales it to the batch and heads the mask broadcasts over. `kind` is 'causal', 'sliding window of W', 'padding',
    'none' (keeps everything) or 'custom'.
    """

    kept: int = 0
    kind: str = "custom"

    @property
    def priced_as_causal(self) -> bool:
        """Whether the kernel the GPU runs for it takes no mask (is_causal, or no mask at all)."""
        return self.kind in ("causal", "none")


@dataclass(frozen=True)
class MaskKind:
    kind: str
    kept: int


def describe(keep: torch.Tensor, lq: int, lk: int) -> MaskKind:
    """What a boolean keep-mask of logical shape (..., lq, lk) is, and how many entries it keeps."""
    kept = int(keep.sum())
    planes = keep.reshape(-1, lq, lk)
    i = torch.arange(lq, device=keep.device).unsqueeze(1)   # on the mask's device, whatever the default one is
    j = torch.arange(lk, device=keep.device).unsqueeze(0)   # (a `with torch.device("meta")` block around analyze)
    offset = lk - lq     # the cache length before these queries: bottom-right alignment, as decoding needs
    causal = j <= i + offset
    if bool(planes.all()):
        return MaskKind("none", kept)
    if bool((planes == causal).all()):
        return MaskKind("causal", kept)
    width = int(planes.sum(-1).max())
    window = causal & (j > i + offset - width)
    if bool((planes == window).all()):
        return MaskKind(f"sliding window of {width}", kept)
    # padding: within every plane, whole key columns are dropped from a causal (or full) pattern
    columns = planes.any(-2, keepdim=True)
    if bool((planes == (causal & columns)).all()) or bool((planes == columns.expand_as(planes)).all()):
        return MaskKind("padding", kept)
    return MaskKind("custom", kept)


def keep_mask(mask: torch.Tensor) -> torch.Tensor:
    """Booleans: True where a score is kept. A float mask is added to the scores: -inf (or the dtype's most
    negative value, which HuggingFace uses) removes a score, any other value (an ALiBi bias) keeps it."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def annotate(nodes: list, leaf_value: Callable[[fx.Node], Any]) -> list[str]:
    """Give every attention record with an explicit mask the mask's kept scores (a `MaskedScores`).

    `nodes` are `CapturedNode`s, changed in place (their `records` tuples are replaced; twins that shared a
    tuple share the new one). `leaf_value(node)` gives a placeholder's or get_attr's value: a real tensor
    when known, a meta tensor when only its shape is, or None when it cannot say.

    Returns:
        Notes for the report: which masks were found and how they were priced, and any left unevaluated.
    """
    evaluator = _Evaluator(leaf_value)
    replaced: dict[tuple[int, fx.Node], tuple[tuple[OpRecord, ...], dict[str, int], int]] = {}
    kinds: dict[str, int] = {}
    unknown: list[str] = []
    for cn in nodes:
        node = cn.node
        if node.op != "call_function" or node.target not in _SDPA_TARGETS:
            continue
        mask_node = _mask_arg(node)
        if not isinstance(mask_node, fx.Node):
            continue
        key = (id(cn.records), mask_node)
        if key not in replaced:   # twins share their records: evaluated once, counted for every call
            found: dict[str, int] = {}
            missed: list[str] = []
            replaced[key] = (_with_mask(cn.records, evaluator.value(mask_node), found, missed, node.name),
                             found, len(missed))
        cn.records, found, missed = replaced[key]
        for kind, n in found.items():
            kinds[kind] = kinds.get(kind, 0) + n
        unknown.extend([node.name] * missed)
    notes = [f"attention mask{'s' if n > 1 else ''} found {kind}: priced "
             + ("as is_causal (half the scores; the fused kernel reads no mask)" if kind == "causal" else
                "as the full score matrix" if kind == "none" else "for the scores it keeps, and read")
             + f" ({n} attention call{'s' if n > 1 else ''})" for kind, n in kinds.items()]
    if unknown:
        notes.append(f"{len(unknown)} attention mask(s) could not be evaluated (first at node '{unknown[0]}': "
                     f"its values depend on an input given without values); all their scores are counted")
    return notes


def _mask_arg(node: fx.Node) -> Any:
    if len(node.args) > _MASK_POSITION:
        return node.args[_MASK_POSITION]
    return node.kwargs.get("attn_mask")


def _with_mask(records: tuple[OpRecord, ...], value: Any, kinds: dict, unknown: list, name: str
               ) -> tuple[OpRecord, ...]:
    out = []
    for rec in records:
        mask = _record_mask(rec)
        if rec.name != _SDPA_OP or mask is None:
            out.append(rec)
            continue
        if not isinstance(value, torch.Tensor) or value.is_meta or tuple(value.shape) != mask.shape:
            unknown.append(name)
            out.append(rec)
            continue
        q, k = rec.args[0], rec.args[1]
        lq, lk = q.shape[-2], k.shape[-2]
        # a (B, 1, 1, Lk) padding mask stands for (B, 1, Lq, Lk) scores: count over that logical shape
        full = torch.broadcast_shapes(tuple(value.shape), (lq, lk))
        if math.prod(full) > MAX_ELEMENTS:
            unknown.append(name)
            out.append(rec)
            continue
        what = describe(keep_mask(value).expand(full), lq, lk)
        kinds[what.kind] = kinds.get(what.kind, 0) + 1
        out.append(_replace_mask(rec, MaskedScores(mask.shape, mask.dtype, mask.stride, kept=what.kept,
                                                   kind=what.kind)))
    return tuple(out)


def _record_mask(rec: OpRecord) -> TensorMeta | None:
    if len(rec.args) > _MASK_POSITION and isinstance(rec.args[_MASK_POSITION], TensorMeta):
        return rec.args[_MASK_POSITION]
    m = rec.kwargs.get("attn_mask")
    return m if isinstance(m, TensorMeta) else None


def _replace_mask(rec: OpRecord, masked: MaskedScores) -> OpRecord:
    if len(rec.args) > _MASK_POSITION and isinstance(rec.args[_MASK_POSITION], TensorMeta):
        args = rec.args[:_MASK_POSITION] + (masked,) + rec.args[_MASK_POSITION + 1:]
        return OpRecord(rec.op, args, rec.kwargs, rec.outputs)
    return OpRecord(rec.op, rec.args, {**rec.kwargs, "attn_mask": masked}, rec.outputs)


class _Evaluator:
    """Re-runs the subgraph that computes a value on the CPU: real where the sources are known, meta elsewhere."""

    def __init__(self, leaf_value: Callable[[fx.Node], Any]):
        self.leaf_value = leaf_value
        self.values: dict[fx.Node, Any] = {}

    def value(self, target: fx.Node) -> Any:
        order: list[fx.Node] = []
        seen: set[fx.Node] = set()
        stack = [(target, False)]
        while stack:   # iterative post-order: mask subgraphs can be hundreds of nodes deep
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if node in seen or node in self.values:
                continue
            seen.add(node)
            stack.append((node, True))
            stack.extend((i, False) for i in node.all_input_nodes if i not in self.values)
        for node in order:
            if node not in self.values:
                self.values[node] = self._run(node)
        return self.values[target]

    def _run(self, node: fx.Node) -> Any:
        if node.op in ("placeholder", "get_attr"):
            value = self.leaf_value(node)
            if value is None:
                return _UNKNOWN
            # a copy on the CPU: the user's tensors are only read, wherever they live
            return value.detach().to('cpu', copy=True) if isinstance(value, torch.Tensor) and not value.is_meta \
                else value
        if node.op not in ("call_function", "call_method"):
            return _UNKNOWN
        args = map_aggregate(node.args, self._arg)
        kwargs = map_aggregate(node.kwargs, self._arg)
        if any(v is _UNKNOWN for v in _flat((args, kwargs))):
            return _UNKNOWN
        try:
            if any(isinstance(a, torch.Tensor) and a.is_meta for a in _flat((args, kwargs))):
                return self._call(node, _as_meta(args), _as_meta(kwargs))
            shaped = self._call(node, _as_meta(args), _as_meta(kwargs))   # sizes first: never allocate gigabytes
            if any(isinstance(t, torch.Tensor) and t.numel() > MAX_ELEMENTS for t in _flat(shaped)):
                return shaped
            return self._call(node, args, kwargs)
        except Exception:   # anything this cannot re-run stays unknown: the mask is then counted in full
            return _UNKNOWN

    def _arg(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.values.get(a, _UNKNOWN)
        if isinstance(a, torch.device) and a.type == "meta":
            return torch.device("cpu")    # factories the capture sent to meta run on the CPU here
        return a

    @staticmethod
    def _call(node: fx.Node, args, kwargs):
        with torch.no_grad():
            if node.op == "call_method":
                self_obj, *rest = args
                return getattr(self_obj, node.target)(*rest, **kwargs)
            return node.target(*args, **kwargs)


_UNKNOWN = object()


def _flat(tree: Any) -> list:
    return pytree.tree_leaves(tree)


def _as_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x if x.is_meta else x.to("meta")
    if isinstance(x, torch.device):
        return torch.device("meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_as_meta(v) for v in x) if type(x) in (list, tuple) else x
    if isinstance(x, dict):
        return {k: _as_meta(v) for k, v in x.items()}
    return x
