"""The one cost registry: FLOPs and bytes moved by every ATen op, computed from its OpRecord.

Every capture path ends here: a module-level node costs the sum of the ATen ops it dispatched, an
ATen-level node (torch.export) costs itself, and both look their ops up in this one table, keyed by
`OpOverloadPacket`. Formulas see shapes, dtypes and strides (`TensorMeta`), never tensors.

    >>> import torch
    >>> from shapeprof.records import OpRecorder
    >>> with OpRecorder() as rec:
    ...     _ = torch.ones(8, 16, device="meta") @ torch.ones(16, 32, device="meta")
    >>> cost_of(rec.records[-1])     # 2 * 8*16*32 FLOPs; reads (8*16 + 16*32) * 4 B, writes 8*32 * 4 B
    OpCost(flops=8192, bytes_read=2560, bytes_written=1024, covered=True, matmul=True)

How an op is costed, first match wins:
  1. a formula registered for its packet with `register_cost`;
  2. a view or alias (every return aliases an input and is not written, or the op is tagged
     `inplace_view`): 0 FLOPs, 0 bytes;
  3. an in-place op (`masked_fill_`) with no formula of its own uses its functional op's formula;
  4. a pointwise op (`torch.Tag.pointwise` on any overload of its packet, or of its functional
     packet): 1 FLOP per output element, default bytes;
  5. a `*_copy` op tagged `view_copy`: 0 FLOPs, reads what it copies, writes its output;
  6. otherwise uncovered: `covered=False`, 0 FLOPs, default bytes. Callers must list it, never
     report it as free.
Default bytes: every distinct input tensor (by identity) is read once, every output written once.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch._ops import OpOverload, OpOverloadPacket

from .masks import MaskedScores
from .records import OpRecord, TensorMeta

__all__ = ["ATTENTION_OPS", "FLOP_CONVENTION", "CostFormulaError", "OpCost", "cost_of", "has_formula", "register_cost",
           "registered_ops"]

aten = torch.ops.aten

FLOP_CONVENTION = """\
Counting convention (shapeprof.costs):
- 1 multiply-add = 2 FLOPs. Matmul-class ops (mm, bmm, addmm, linear, matmul, einsum) count
  2*M*K*N for the products only: a bias add or beta/alpha scaling is not counted, as in
  torch.utils.flop_counter.FlopCounterMode.
- Grouped matmuls (aten._grouped_mm, transformers::grouped_mm_fallback and its backward) count
  2*S*K*N for S rows (4*S*K*N backward), whatever the split among groups. Of the (E, K, N) weight they
  read the experts the rows are expected to touch: with top_k known from a recognised MoE layer,
  E x (1 - (1 - k/E)^(S/k)) (balanced, independent routing); otherwise min(E, S), an upper bound.
- Convolution counts 2 x batch x prod(weight shape) x output positions (input positions when
  transposed), bias not counted: the same number FlopCounterMode gives.
- Attention counts its two matmuls (Q K^T and P V) over the score entries actually computed: all
  Lq*Lk of them, or with is_causal only those the mask keeps (scaled_dot_product_attention's mask is
  aligned top-left: query row i keeps keys j <= i). The softmax on the scores is left out, as in
  FlopCounterMode. A fused kernel never writes the score matrix: bytes are q, k, v, mask and outputs.
- Pointwise ops count 1 FLOP per output element, whatever the function (add, exp, gelu, where ...).
- Normalisations, softmax and reductions count a fixed number of FLOPs per input element, stated at
  each formula; the few operations per row or per output element (a variance's rsqrt, a mean's
  divide) are left out.
- Views, reshapes that can view, transposes, expands and other aliases: 0 FLOPs and 0 bytes.
- Data movement (copies, cat, index, gather, scatter, pad, sort, topk, factories, random fills):
  0 FLOPs; its bytes are counted.
- Every other formula (interpolation, losses, glu, embedding_bag ...) states its count beside it.
- Bytes: each distinct input tensor is read once and each output written once, counting the memory
  it addresses (a broadcast stride-0 dim counts once); gathers read only what they gather; in-place
  ops read their inputs and write their output. Caches and kernel-internal re-reads are ignored.
"""
__doc__ += "\n" + FLOP_CONVENTION  # one text, shown both by help(costs) and by the constant


@dataclass(frozen=True, slots=True)
class OpCost:
    """What one ATen op costs.

    Args:
        flops: floating-point operations, counted as FLOP_CONVENTION says.
        bytes_read, bytes_written: main-memory traffic.
        covered: False when no formula exists; flops is 0 then and callers must report the op as
            uncovered rather than free.
        matmul: the op runs on tensor cores (mm, conv, attention ...): the roofline holds it against
            the tensor-core peak, every other op against the vector units' peak.
    """

    flops: int
    bytes_read: int
    bytes_written: int
    covered: bool = True
    matmul: bool = False

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


_FREE = OpCost(0, 0, 0)


class CostFormulaError(Exception):
    """A registered formula failed on a record; the message names the op and its argument shapes."""


@dataclass(frozen=True)
class _Formula:
    fn: Callable[..., Any]
    matmul: bool
    params: frozenset[str] | None  # the argument names fn takes; None when it takes **kwargs (all)


_REGISTRY: dict[OpOverloadPacket, _Formula] = {}
_RULES: dict[Any, Any] = {}  # op overload -> how it is costed (a _Formula or a rule name); reset on register


def register_cost(*ops: OpOverloadPacket | OpOverload, matmul: bool = False):
    """Register a cost formula for one or more ATen ops (keyed by packet: every overload shares it).

    The formula is called with the op's arguments bound by their schema names (defaults filled,
    tensors as TensorMeta; it declares only those it needs) and the keyword `output`, the tuple of
    output TensorMetas. It returns the FLOPs (bytes then follow the default rule) or an OpCost whose
    flops and bytes are used as they are.

        >>> lib = torch.library.Library("shapeprof_demo", "DEF")
        >>> _ = lib.define("scale(Tensor x, float factor) -> Tensor")
        >>> @register_cost(torch.ops.shapeprof_demo.scale)
        ... def _scale(x, *, output):
        ...     return x.numel  # one multiply per element
        >>> x = TensorMeta((4, 8), torch.float32, (8, 1))
        >>> cost_of(OpRecord(torch.ops.shapeprof_demo.scale.default, (x, 2.0), {}, (x,)))
        OpCost(flops=32, bytes_read=128, bytes_written=128, covered=True, matmul=False)

    Args:
        ops: `torch.ops.aten.mm` (a packet) or an overload such as `torch.ops.aten.mm.default`,
            whose packet is used.
        matmul: the ops run on tensor cores.
    Raises:
        ValueError: an op already has a formula, or the formula takes an argument that none of
            the ops' schemas has (a misspelt name would otherwise silently take its default).
    """
    packets = [_packet(op) for op in ops]

    def decorate(fn):
        formula = _Formula(fn, matmul, _param_names(fn))
        _check_params(formula, packets)
        seen: set[OpOverloadPacket] = set()
        for p in packets:
            if p in _REGISTRY or p in seen:
                owner = _REGISTRY[p].fn.__qualname__ if p in _REGISTRY else fn.__qualname__
                raise ValueError(f"a cost formula for {p} is already registered ({owner})")
            seen.add(p)
        for p in packets:
            _REGISTRY[p] = formula
        _RULES.clear()
        return fn

    return decorate


def cost_of(record: OpRecord) -> OpCost:
    """FLOPs and bytes of one recorded ATen op; never raises for an op without a formula.

        >>> x = TensorMeta((4, 8), torch.float32, (8, 1))
        >>> cost_of(OpRecord(torch.ops.aten.exp.default, (x,), {}, (x,)))
        OpCost(flops=32, bytes_read=128, bytes_written=128, covered=True, matmul=False)

    Returns:
        The op's OpCost; `covered=False` (0 FLOPs, default bytes) when no formula or rule applies.
    Raises:
        CostFormulaError: a registered formula raised; the message names the op and its shapes.
    """
    rule = _rule(record.op)
    if isinstance(rule, _Formula):
        return _apply(rule, record)
    if rule == "view":
        return _FREE
    if rule == "pointwise":
        flops = record.outputs[0].numel if record.outputs else 0
        return OpCost(flops, *_default_bytes(record))
    if rule == "view_copy":
        written = _nbytes(record.outputs)
        source = record.input_metas()[:1]
        return OpCost(0, min(_nbytes(source), written), written)
    return OpCost(0, *_default_bytes(record), covered=False)


def has_formula(op: OpOverloadPacket | OpOverload) -> bool:
    """Whether cost_of covers `op`, by a registered formula or a generic rule (view, pointwise ...).

    A packet counts as covered when it has a formula or any of its overloads is covered.

        >>> has_formula(torch.ops.aten.mm), has_formula(torch.ops.aten.gelu.default)
        (True, True)
    """
    if isinstance(op, OpOverloadPacket):
        return op in _REGISTRY or any(_rule(getattr(op, name)) is not None for name in op.overloads())
    return _rule(op) is not None


def registered_ops() -> list[str]:
    """Names of the ops with a registered formula, sorted: ['aten._adaptive_avg_pool2d', ...]."""
    return sorted(str(p) for p in _REGISTRY)


# ---------------------------------------------------------------------------------------------
# Lookup and the default rule


def _packet(op) -> OpOverloadPacket:
    if isinstance(op, OpOverload):
        return op.overloadpacket
    if isinstance(op, OpOverloadPacket):
        return op
    raise TypeError(f"register_cost takes ATen ops (torch.ops.aten.mm), got {op!r}")


def _param_names(fn) -> frozenset[str] | None:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not p.VAR_POSITIONAL)


def _check_params(formula: _Formula, packets: list[OpOverloadPacket]) -> None:
    schema_names = {a.name for p in packets for name in p.overloads()
                    for a in getattr(p, name)._schema.arguments if not a.is_out}
    if "output" in schema_names:
        raise ValueError(f"{packets} take an argument named 'output', which formulas get as the outputs")
    unknown = (formula.params or frozenset()) - schema_names - {"output"}
    if unknown:
        raise ValueError(f"{formula.fn.__qualname__} takes {sorted(unknown)}, which no schema of {packets} has")


def _rule(op):
    """How `op` is costed: a _Formula, "view", "pointwise", "view_copy" or None (uncovered)."""
    if op not in _RULES:
        _RULES[op] = _find_rule(op)
    return _RULES[op]


def _find_rule(op):
    if not isinstance(op, OpOverload):
        return None
    packet = op.overloadpacket
    if packet in _REGISTRY or _register_named(packet):
        return _REGISTRY[packet]
    returns = op._schema.returns
    if torch.Tag.inplace_view in op.tags or (
            returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)):
        return "view"
    functional = _functional(op)
    if functional is not None and functional in _REGISTRY:
        return _REGISTRY[functional]
    if any(_is_pointwise(p) for p in (packet, functional) if p is not None):
        return "pointwise"
    if torch.Tag.view_copy in op.tags:
        return "view_copy"
    return None


def _functional(op: OpOverload) -> OpOverloadPacket | None:
    """`aten.masked_fill` for `aten.masked_fill_.Scalar`; None for an op that is not in-place."""
    namespace, name = op._schema.name.split("::")
    args = op._schema.arguments
    # in-place: writes its first argument (schema `Tensor(a!) self`); read from the schema rather than
    # torch.Tag.inplace, which older torch releases don't have
    writes_self = bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    if not writes_self or not name.endswith("_") or name.endswith("__"):
        return None
    return getattr(getattr(torch.ops, namespace), name[:-1], None)


def _is_pointwise(packet: OpOverloadPacket) -> bool:
    # Per packet, not per overload: the tag is missing on some overloads of the same elementwise
    # math (masked_fill.Tensor, rsub.Tensor, where.ScalarOther), which torch.export keeps.
    return any(torch.Tag.pointwise in getattr(packet, name).tags for name in packet.overloads())


def _apply(formula: _Formula, record: OpRecord) -> OpCost:
    try:
        kwargs = _bind(record.op, record.args, record.kwargs)
        if formula.params is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in formula.params}
        if formula.params is None or "output" in formula.params:
            kwargs["output"] = record.outputs
        result = formula.fn(**kwargs)
        if isinstance(result, OpCost):
            return replace(result, covered=True, matmul=formula.matmul)
        if not isinstance(result, (int, torch.SymInt)):
            raise TypeError(f"returned {result!r}; a formula returns an int (FLOPs) or an OpCost")
    except Exception as e:
        raise CostFormulaError(
            f"cost formula {formula.fn.__qualname__} failed on {_describe(record)}: "
            f"{type(e).__name__}: {e}") from e
    return OpCost(result, *_default_bytes(record), covered=True, matmul=formula.matmul)


def _bind(op: OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled (absent optionals are None).
    out= arguments are left out: they are the outputs, which formulas get as `output`."""
    params = op._schema.arguments
    bound = {p.name: v for p, v in zip(params, args)}
    for p in params[len(args):]:
        if p.name in kwargs:
            bound[p.name] = kwargs[p.name]
        else:
            bound[p.name] = p.default_value if p.has_default_value() else None
    for p in params:
        if p.is_out:
            bound.pop(p.name, None)
    return bound


def _default_bytes(record: OpRecord) -> tuple[int, int]:
    """(read, written): each distinct input TensorMeta object once, each output once; out= args are outputs."""
    inputs = record.input_metas()
    if record.kwargs and isinstance(record.op, OpOverload):
        outs = [record.kwargs[a.name] for a in record.op._schema.arguments if a.is_out and a.name in record.kwargs]
        out_ids = {id(m) for m in _metas(outs)}
        inputs = [m for m in inputs if id(m) not in out_ids]
    distinct = {id(m): m for m in inputs}
    return _nbytes(list(distinct.values())), _nbytes(record.outputs)


def _metas(values) -> list[TensorMeta]:
    found = []
    for v in values:
        if isinstance(v, TensorMeta):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found.extend(_metas(v))
    return found


def _nbytes(*values) -> int:
    """Bytes addressed by every TensorMeta among `values` (lists flattened, None and scalars skipped)."""
    return sum(m.nbytes for m in _metas(values))


def _describe(record: OpRecord) -> str:
    def show(v):
        if isinstance(v, TensorMeta):
            return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(show(x) for x in v) + "]"
        return repr(v)
    args = [show(a) for a in record.args] + [f"{k}={show(v)}" for k, v in record.kwargs.items()]
    return f"{record.op}({', '.join(args)}) -> {show(list(record.outputs))}"


def _existing(*names: str) -> list[OpOverloadPacket]:
    # For ops newer than the oldest torch shapeprof supports (pyproject: torch>=2.5).
    return [p for p in (getattr(aten, n, None) for n in names) if p is not None]


# ---------------------------------------------------------------------------------------------
# Matmul class: 2 FLOPs per multiply-add, bias and alpha/beta scaling left out (as FlopCounterMode)


@register_cost(aten.mm, aten._scaled_mm, aten._int_mm, matmul=True)
def _mm(self, mat2, *, output):
    return 2 * self.shape[0] * self.shape[1] * mat2.shape[1]  # M*K*N multiply-adds


@register_cost(aten.addmm, matmul=True)
def _addmm(mat1, mat2, *, output):
    return 2 * mat1.shape[0] * mat1.shape[1] * mat2.shape[1]  # M*K*N; + bias not counted


@register_cost(aten._addmm_activation, matmul=True)
def _addmm_activation(mat1, mat2, *, output):
    # M*K*N multiply-adds, then the fused relu/gelu: 1 per output element, as it would cost unfused
    return 2 * mat1.shape[0] * mat1.shape[1] * mat2.shape[1] + output[0].numel


def _mkldnn_ops(*names: str) -> list[OpOverloadPacket]:
    # oneDNN ops exist only in builds with mkldnn (every x86 and aarch64 wheel; not every source build)
    return [p for p in (getattr(torch.ops.mkldnn, n, None) for n in names) if p is not None]


@register_cost(*_mkldnn_ops("_linear_pointwise"), matmul=True)
def _linear_pointwise(X, W, attr, *, output):
    # oneDNN linear with a post-op fused into it (the `.binary` overload's post-op takes a second
    # tensor, `other`): M*K*N multiply-adds, then the post-op, 1 per output element as it would cost
    # unfused (as _addmm_activation counts its activation); attr "none" is a plain linear. Default
    # bytes: reads X, W, the bias (and `other`), writes Y once; the pre-activation is never written.
    post_op = 0 if attr == "none" else output[0].numel
    return 2 * output[0].numel * W.shape[-1] + post_op


@register_cost(aten.bmm, matmul=True)
def _bmm(self, mat2, *, output):
    b, m, k = self.shape
    return 2 * b * m * k * mat2.shape[2]  # B*M*K*N


@register_cost(aten.baddbmm, aten.addbmm, matmul=True)
def _baddbmm(batch1, batch2, *, output):
    # addbmm also sums over the batch: that sum is the same accumulation, B*M*K*N multiply-adds
    b, m, k = batch1.shape
    return 2 * b * m * k * batch2.shape[2]


@register_cost(aten.matmul, matmul=True)
def _matmul(self, other, *, output):
    # every output element (broadcast batch included) is a K-long dot product; holds for 1-D operands
    # too (vector @ vector: 1 output, K multiply-adds)
    return 2 * output[0].numel * self.shape[-1]


@register_cost(aten.linear, matmul=True)
def _linear(input, weight, *, output):
    # output (..., out_features), each an in_features-long dot product; + bias not counted, so a
    # linear costs what its decomposition t + addmm costs
    return 2 * output[0].numel * weight.shape[-1]


# Grouped matmuls (mixture of experts): input (S, K) with its rows sorted by group, weight (E, K, N), offs (E,)
# the cumulative row counts. Every row meets one group's weight once, so FLOPs = 2*S*K*N whatever the split
# (exact on meta, where offs holds no data). Bytes depend on the split: a group with no rows is never read.
# Each formula reads input, offs and output in full and, of the weight, the experts the S rows are expected to
# touch (`_experts_read`), or all of them when the split cannot matter.


def _experts_read(experts: int, rows: int) -> float:
    """Expected distinct groups (experts) that `rows` sorted rows touch, for a grouped matmul on meta.

    The rows are (token, expert) pairs of a top-k routing. When the analysis recognised an MoE layer with this
    many experts (shapeprof.moe.routing_top_k), the rows are rows/k tokens, each picking k distinct experts
    under the layer's routing: E x (1 - (1 - k/E)^(rows/k)) when balanced (shapeprof.moe.experts_read_for).
    Otherwise the count is min(E, rows): exact when the rows are one token's k picks (decode at batch 1), an
    upper bound on what a balanced routing reads at larger batches, never an undercount of bytes."""
    from .moe import experts_read_for
    if experts <= 0 or rows <= 0:
        return 0.0
    read = experts_read_for(experts, rows)
    return float(min(experts, rows)) if read is None else read


def _weight_read(weight: TensorMeta, rows: int) -> int:
    experts = weight.shape[0]
    return round(weight.nbytes * _experts_read(experts, rows) / experts) if experts else 0


@register_cost(aten._grouped_mm, matmul=True)
def _grouped_mm(self, mat2, offs=None, bias=None, *, output):
    # Forms (torch._grouped_mm): 2D x 3D with offs (MoE: rows ragged over groups), 3D x 3D (a bmm), 3D x 2D
    # (N ragged) and 2D x 2D (K ragged, output (G, M, N)). Every output element is a K-long dot product, except
    # 2D x 2D, where group g's output sums only its own slice of K: together 2*M*K_total*N. Bias not counted.
    # Bytes: 2D x 3D reads the expected experts of `mat2` (_experts_read); the other forms read everything.
    out = output[0]
    if len(self.shape) == 2 and len(mat2.shape) == 2:
        flops = 2 * self.shape[0] * self.shape[1] * mat2.shape[1]
    else:
        flops = 2 * out.numel * self.shape[-1]
    if len(self.shape) == 2 and len(mat2.shape) == 3:
        read = self.nbytes + _weight_read(mat2, self.shape[0]) + _nbytes(offs, bias)
        return OpCost(flops, read, out.nbytes)
    return flops


def _grouped_mm_fallback(input, weight, offs, *, output):
    # transformers' grouped_mm_fallback: a loop of torch.mm(input[start:end], weight[i]) per non-empty group:
    # 2*S*K*N FLOPs in all. Reads input, offs and the experts its rows touch; writes the (S, N) output.
    s, k = input.shape
    return OpCost(2 * s * k * weight.shape[2], input.nbytes + offs.nbytes + _weight_read(weight, s),
                  _nbytes(output))


def _grouped_mm_fallback_backward(input, weight, offs, grad_output, *, output):
    # Per group two matmuls: grad_input = grad_output @ weight[i].T and grad_weight[i] = input.T @ grad_output,
    # each 2*S_i*K*N: 4*S*K*N in all. Reads input, grad_output, offs and the experts touched; writes grad_input
    # (S, K) and all of grad_weight (E, K, N): the fallback zero-fills the experts no row chose.
    s, k = input.shape
    read = input.nbytes + grad_output.nbytes + offs.nbytes + _weight_read(weight, s)
    return OpCost(4 * s * k * weight.shape[2], read, _nbytes(output))


# Ops that exist only once a library defines them (transformers' custom ops, defined when
# transformers.integrations.moe is imported): registered when present, else when cost_of first meets them.
_BY_NAME: dict[str, tuple[Callable[..., Any], bool]] = {
    "transformers::grouped_mm_fallback": (_grouped_mm_fallback, True),
    "transformers::grouped_mm_fallback_backward": (_grouped_mm_fallback_backward, True),
}


def _register_named(packet: OpOverloadPacket) -> bool:
    """Register the _BY_NAME formula for `packet` if it has one; whether it did."""
    if packet in _REGISTRY:
        return False
    namespace, _, name = packet._qualified_op_name.partition("::")
    entry = _BY_NAME.get(f"{namespace}::{name}")
    if entry is None:
        return False
    register_cost(packet, matmul=entry[1])(entry[0])
    return True


def _named_packet(qualified: str) -> OpOverloadPacket | None:
    namespace, _, name = qualified.partition("::")
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


for _name in _BY_NAME:
    _found = _named_packet(_name)
    if _found is not None:
        _register_named(_found)


# Matrix-vector and vector products run as gemv/dot kernels on the vector units (and are
# memory-bound whatever the peak), so they are not `matmul`.
@register_cost(aten.mv)
def _mv(self, vec, *, output):
    return 2 * self.shape[0] * self.shape[1]  # M*K


@register_cost(aten.addmv)
def _addmv(mat, vec, *, output):
    return 2 * mat.shape[0] * mat.shape[1]  # M*K; + self not counted


@register_cost(aten.dot, aten.vdot)
def _dot(self, *, output):
    return 2 * self.shape[0]  # K


@register_cost(aten.outer, aten.ger)
def _outer(self, vec2, *, output):
    return self.shape[0] * vec2.shape[0]  # M*N products, nothing summed


@register_cost(aten.einsum, matmul=True)
def _einsum(equation, tensors, *, output):
    # Two operands: 2 x the product of the sizes of all distinct indices (each combination of
    # indices is one multiply-add). More operands: contracted left to right, pairwise, keeping the
    # indices a later operand or the output needs; `path` is ignored. One operand: 1 add per element
    # when it sums an index away, else 0 (a permutation or diagonal view).
    terms, out = _einsum_labels(equation, [t.shape for t in tensors])
    sizes: dict[str, int] = {}
    for term, t in zip(terms, tensors):
        for label, size in zip(term, t.shape):
            sizes[label] = max(sizes.get(label, 1), size)  # size-1 dims broadcast
    if len(terms) == 1:
        return math.prod(sizes.values()) if set(terms[0]) - set(out) else 0
    flops, acc = 0, terms[0]
    for k, term in enumerate(terms[1:], start=1):
        labels = dict.fromkeys(acc + term)
        flops += 2 * math.prod(sizes[label] for label in labels)
        needed = set(out).union(*terms[k + 1:])
        acc = [label for label in labels if label in needed]
    return flops


def _einsum_labels(equation: str, shapes) -> tuple[list[list[str]], list[str]]:
    """Each operand's index labels and the output's; the dims an ellipsis covers get labels ".0", ".1" ...
    aligned from the right, so that they broadcast against each other."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    raw = lhs.split(",")
    n_ell = max((len(shape) - (len(t) - 3) for t, shape in zip(raw, shapes) if "..." in t), default=0)

    def expand(term: str, ndim: int) -> list[str]:
        head, ell, tail = term.partition("...")
        if not ell:
            return list(term)
        k = ndim - len(head) - len(tail)
        return list(head) + [f".{i}" for i in range(n_ell - k, n_ell)] + list(tail)

    terms = [expand(t, len(shape)) for t, shape in zip(raw, shapes)]
    if arrow:
        out = expand(rhs, len(rhs) - 3 + n_ell if "..." in rhs else len(rhs))
    else:  # implicit output: the ellipsis dims, then the letters used once, in alphabetical order
        letters = [c for t in raw for c in t if c != "."]
        out = [f".{i}" for i in range(n_ell)] + sorted(c for c in set(letters) if letters.count(c) == 1)
    return terms, out


# ---------------------------------------------------------------------------------------------
# Convolution: 2 x batch x prod(weight shape) x positions, exactly FlopCounterMode's count. Each
# weight element (C_out x C_in/groups x kernel) meets the input once per output position (per
# input position for a transposed conv). Bias not counted.


def _conv_flops(x: TensorMeta, w: TensorMeta, out: TensorMeta, transposed: bool) -> int:
    spatial = len(w.shape) - 2
    batch = math.prod(x.shape[:-(spatial + 1)])  # 1 for an unbatched input (C, *spatial)
    positions = math.prod((x if transposed else out).shape[-spatial:])
    return 2 * batch * math.prod(w.shape) * positions


@register_cost(aten.convolution, aten._convolution, aten.convolution_overrideable, matmul=True)
def _convolution(input, weight, transposed, *, output):
    return _conv_flops(input, weight, output[0], transposed)


@register_cost(aten.conv1d, aten.conv2d, aten.conv3d, matmul=True)
def _conv(input, weight, *, output):
    return _conv_flops(input, weight, output[0], transposed=False)


@register_cost(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d, matmul=True)
def _conv_transpose(input, weight, *, output):
    return _conv_flops(input, weight, output[0], transposed=True)


@register_cost(aten.cudnn_convolution, aten.mkldnn_convolution, aten.miopen_convolution,
               aten.miopen_depthwise_convolution, aten._slow_conv2d_forward, aten.slow_conv3d_forward,
               aten._conv_depthwise2d, aten.slow_conv_dilated2d, aten.slow_conv_dilated3d, matmul=True)
def _conv_backend(self, weight, *, output):
    return _conv_flops(self, weight, output[0], transposed=False)


@register_cost(aten.cudnn_convolution_transpose, aten.miopen_convolution_transpose,
               aten.slow_conv_transpose2d, aten.slow_conv_transpose3d, matmul=True)
def _conv_transpose_backend(self, weight, *, output):
    return _conv_flops(self, weight, output[0], transposed=True)


# ---------------------------------------------------------------------------------------------
# Attention: 2 FLOPs per multiply-add of Q K^T (E per score) and of P V (Ev per score), over the
# scores computed. The softmax is left out (as FlopCounterMode). Bytes follow the default rule:
# q, k, v (GQA: the real, smaller k and v), mask or bias (broadcast dims once) and small extras
# such as sequence offsets are read; the outputs (attention output, logsumexp ...) are written;
# a fused kernel never writes the score matrix.


def _attention_flops(batch_heads: int, scores: int, e: int, ev: int) -> int:
    return 2 * batch_heads * scores * (e + ev)


def _kept_scores(lq: int, lk: int, lo: int | None = None, hi: int | None = None) -> int:
    """Number of (i, j), i < lq, j < lk, with i + lo <= j <= i + hi (None: no bound on that side).

    Top-left causal (row i keeps j <= i): hi=0; for lq == lk that is lq*(lq+1)/2.
    Bottom-right causal: hi = lk - lq. A sliding window of w keys back adds lo = hi - w.
    """
    # row i keeps the j below i+hi+1 minus the j below i+lo, each count clamped to [0, lk]
    below_hi = lq * lk if hi is None else _sum_clamped(lq, hi + 1, lk)
    below_lo = 0 if lo is None else _sum_clamped(lq, lo, lk)
    return below_hi - below_lo


def _sum_clamped(n: int, c: int, m: int) -> int:
    """sum(min(max(c + i, 0), m) for i in range(n)), in closed form (n can be 10^5 rows)."""
    first, last = c, c + n - 1
    lo, hi = max(first, 1), min(last, m - 1)  # values inside (0, m) count as themselves
    inside = (lo + hi) * (hi - lo + 1) // 2 if lo <= hi else 0
    return inside + m * max(0, last - max(first, m) + 1)  # values >= m count m each


@register_cost(aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
               aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
               *_existing("_scaled_dot_product_fused_attention_overrideable"), matmul=True)
def _sdpa(query, key, value, attn_mask=None, is_causal=False, *, output):
    # q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev); the output's leading dims are batch x query
    # heads (with GQA the query's heads, not the fewer k/v heads). is_causal keeps j <= i (top-left).
    lq, lk = query.shape[-2], key.shape[-2]
    batch_heads = math.prod(output[0].shape[:-2])
    if isinstance(attn_mask, MaskedScores):
        # an explicit mask whose values capture worked out (shapeprof.masks): the scores it keeps, scaled to the
        # batch and heads it broadcasts over. A causal one is priced as is_causal: its kernel reads no mask.
        lead = (1,) * (len(output[0].shape) - len(attn_mask.shape)) + attn_mask.shape[:-2]
        scores = attn_mask.kept * (batch_heads // math.prod(lead))
        read = _nbytes(query, key, value, None if attn_mask.priced_as_causal else attn_mask)
        return OpCost(_attention_flops(1, scores, query.shape[-1], value.shape[-1]), read, _nbytes(output))
    scores = _kept_scores(lq, lk, hi=0) if is_causal else lq * lk
    return _attention_flops(batch_heads, scores, query.shape[-1], value.shape[-1])


@register_cost(aten._scaled_dot_product_flash_attention, matmul=True)
def _sdpa_flash(query, key, value, is_causal=False, *, output):
    # FlashAttention-2 aligns its causal mask bottom-right (row i keeps j <= i + Lk - Lq); sdpa only
    # routes is_causal here when Lq == Lk, where both alignments agree.
    lq, lk = query.shape[-2], key.shape[-2]
    scores = _kept_scores(lq, lk, hi=lk - lq) if is_causal else lq * lk
    return _attention_flops(math.prod(output[0].shape[:-2]), scores, query.shape[-1], value.shape[-1])


@register_cost(aten._flash_attention_forward, matmul=True)
def _flash_attention_forward(query, key, value, cum_seq_q, max_q, max_k, is_causal,
                             window_size_left=None, window_size_right=None, *, output):
    # Layout (B, L, H, E), or (total tokens, H, E) with cum_seq_q offsets for variable lengths: the
    # offsets' values are not in the record, so every sequence counts at max_q x max_k (an upper
    # bound, as FlopCounterMode does on fake tensors). Masks align bottom-right (FlashAttention-2);
    # a window keeps keys within [i + off - left, i + off + right], off = Lk - Lq; -1 = unbounded.
    if cum_seq_q is not None:
        batch, lq, lk = cum_seq_q.numel - 1, max_q, max_k
    else:
        batch, lq, lk = query.shape[0], query.shape[1], key.shape[1]
    off = lk - lq
    right = 0 if is_causal else window_size_right
    hi = off + right if right is not None and right >= 0 else None
    lo = off - window_size_left if window_size_left is not None and window_size_left >= 0 else None
    return _attention_flops(batch * query.shape[-2], _kept_scores(lq, lk, lo, hi),
                            query.shape[-1], value.shape[-1])


@register_cost(aten._efficient_attention_forward, matmul=True)
def _efficient_attention_forward(query, key, value, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
                                 custom_mask_type, *, output):
    # Layout (B, L, H, E); variable lengths (cu_seqlens_q) count as for flash above.
    # custom_mask_type: 0 none, 1 causal top-left, 2 causal bottom-right. A local `window_size`, when
    # given, keeps fewer scores than counted here: the count is then an upper bound.
    if cu_seqlens_q is not None:
        batch, lq, lk = cu_seqlens_q.numel - 1, max_seqlen_q, max_seqlen_k
    else:
        batch, lq, lk = query.shape[0], query.shape[1], key.shape[1]
    hi = {0: None, 1: 0, 2: lk - lq}[custom_mask_type]
    return _attention_flops(batch * query.shape[-2], _kept_scores(lq, lk, hi=hi),
                            query.shape[-1], value.shape[-1])


#: The fused attention ops (their formulas above): the report says how they are priced, and 8-bit precisions
#: leave them in bf16.
ATTENTION_OPS = frozenset(str(p) for p in (
    aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_flash_attention, aten._flash_attention_forward, aten._efficient_attention_forward,
    *_existing("_scaled_dot_product_fused_attention_overrideable")))


# ---------------------------------------------------------------------------------------------
# Normalisation, softmax, reductions: FLOPs per input element, constants stated per formula.


def _affine(weight, bias) -> int:
    return (weight is not None) + (bias is not None)  # x * weight: 1, + bias: 1 per element


@register_cost(aten.layer_norm, aten.native_layer_norm, aten.group_norm, aten.native_group_norm)
def _layer_norm(input, weight, bias, *, output):
    # mean: 1 add, x - mean: 1, square: 1, sum: 1, * rstd: 1  -> 5 per element, + affine
    return input.numel * (5 + _affine(weight, bias))


@register_cost(aten.rms_norm, *_existing("_fused_rms_norm"))
def _rms_norm(input, weight, *, output):
    # square: 1, sum: 1, * rstd: 1  -> 3 per element, + 1 for the weight
    return input.numel * (3 + _affine(weight, None))


def _batch_norm_flops(input, weight, bias, training) -> int:
    # training: the batch statistics as for layer norm, 5 per element (running-stat updates are per
    # channel and left out); inference: (x - running_mean) * rstd, 2 per element; + affine either way
    return input.numel * ((5 if training else 2) + _affine(weight, bias))


@register_cost(aten._weight_norm, aten._weight_norm_interface)
def _weight_norm(v, g, *, output):
    # w = g * v / ||v||, the norm over every dim but `dim` (Wav2Vec2's positional conv computes it each forward):
    # square 1 + sum 1 per element of v, then v * (g / norm) 1 -> 3 per element; the per-slice g / norm is left out
    return 3 * v.numel


@register_cost(aten.batch_norm, aten.native_batch_norm, aten._native_batch_norm_legit,
               aten._native_batch_norm_legit_functional, aten.cudnn_batch_norm, aten.miopen_batch_norm)
def _batch_norm(input, weight, bias, training, *, output):
    return _batch_norm_flops(input, weight, bias, training)


@register_cost(aten._native_batch_norm_legit_no_training, aten._batch_norm_no_update)
def _batch_norm_inference(input, weight, bias, *, output):
    return _batch_norm_flops(input, weight, bias, training=False)


@register_cost(aten._batch_norm_with_update)
def _batch_norm_training(input, weight, bias, *, output):
    return _batch_norm_flops(input, weight, bias, training=True)


@register_cost(aten.instance_norm)
def _instance_norm(input, weight, bias, use_input_stats, *, output):
    return _batch_norm_flops(input, weight, bias, training=use_input_stats)  # per-instance statistics


@register_cost(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, *_existing("_safe_softmax"))
def _softmax(self, *, output):
    # max: 1, x - max: 1, exp: 1, sum: 1, divide (log_softmax: subtract the log-sum): 1 -> 5
    return 5 * self.numel


def _per_input_element(n: int):
    def formula(self, *, output):
        return n * self.numel
    formula.__qualname__ = f"_{n}_per_input_element"
    return formula


# 1 add / compare / multiply per element
register_cost(aten.sum, aten.nansum, aten.mean, aten.prod, aten.amax, aten.amin, aten.argmax, aten.argmin,
              aten.any, aten.all, aten.count_nonzero, aten.cumsum, aten.cumprod, aten.cummax,
              aten.cummin)(_per_input_element(1))
# aminmax: 2 compares per element
register_cost(aten.aminmax)(_per_input_element(2))
# var/std: mean 1, x - mean 1, square 1, sum 1; logsumexp: max 1, x - max 1, exp 1, sum 1
register_cost(aten.var, aten.std, aten.var_mean, aten.std_mean, aten.logsumexp,
              aten.logcumsumexp)(_per_input_element(4))


@register_cost(aten.max, aten.min)
def _max_min(self, other=None, *, output):
    if other is not None:  # max.other / min.other: elementwise, 1 per output element
        return output[0].numel
    return self.numel  # max() / max.dim: 1 compare per element


def _vector_norm_flops(x: TensorMeta, p) -> int:
    # p = 2: square 1 + sum 1; p = 1, inf, 0: abs or compare 1 + sum or max 1; other p: abs, pow, sum
    return x.numel * (2 if p is None or p in (0, 1, 2, math.inf, -math.inf) else 3)


@register_cost(aten.norm)
def _norm(self, p=2, *, output):
    return _vector_norm_flops(self, p)


@register_cost(aten.linalg_vector_norm)
def _linalg_vector_norm(self, ord=2, *, output):
    return _vector_norm_flops(self, ord)


# ---------------------------------------------------------------------------------------------
# Elementwise ops without the pointwise tag, and the ones it would count wrong


@register_cost(aten.hardswish, aten.hardswish_, aten.prelu, aten._prelu_kernel, aten.log_sigmoid_forward,
               aten.polar, aten.__and__, aten.__or__, aten.__iand__, aten.__ior__)
def _elementwise(*, output):
    return output[0].numel  # 1 per output element, as for every tagged pointwise op


@register_cost(aten.glu)
def _glu(*, output):
    return 2 * output[0].numel  # a * sigmoid(b): sigmoid 1 + multiply 1 per output element


@register_cost(aten.diff)
def _diff(n=1, dim=-1, *, output):
    # order k subtracts neighbours along rows of (out_len + n - k) elements: n = 1 is 1 per output element
    out_len = output[0].shape[dim]
    rows = output[0].numel // out_len if out_len else 0
    return rows * sum(out_len + n - k for k in range(1, n + 1))


@register_cost(aten.mse_loss)
def _mse_loss(self, *, output):
    return 3 * self.numel  # subtract 1, square 1, the mean's (or sum's) add 1


@register_cost(aten.nll_loss, aten.nll_loss_forward, aten.nll_loss2d_forward, aten.nll_loss_nd)
def _nll_loss(self, target, weight=None, *, output):
    # picks one log-probability per target and sums them (1 add each): reads the targets and those
    # picked elements (and the class weights), not the whole (N, C) input
    picked = target.numel * self.itemsize
    return OpCost(target.numel, _nbytes(target, weight) + picked, _nbytes(output))


# ---------------------------------------------------------------------------------------------
# Upsampling: nearest is data movement; interpolation is one multiply-add per neighbour of each
# output element (2 per dim: 2, 4, 8 neighbours; bicubic 4 x 4).


@register_cost(aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
               aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d,
               aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle, aten.native_channel_shuffle)
def _resample_copy(*, output):
    return 0  # default bytes: input read once, output written


def _interpolation(neighbours: int):
    def formula(*, output):
        return 2 * neighbours * output[0].numel
    formula.__qualname__ = f"_interpolation_{neighbours}"
    return formula


register_cost(aten.upsample_linear1d)(_interpolation(2))
register_cost(aten.upsample_bilinear2d)(_interpolation(4))
register_cost(aten.upsample_trilinear3d)(_interpolation(8))
register_cost(aten.upsample_bicubic2d)(_interpolation(16))


# ---------------------------------------------------------------------------------------------
# Pooling: out_numel x window (a compare or add per window element). Padded positions count too.


def _window(kernel_size, dims: int) -> int:
    ks = [kernel_size] if isinstance(kernel_size, int) else list(kernel_size)
    return math.prod(ks * dims if len(ks) == 1 else ks)  # a single size means a cube


def _pool(dims: int):
    def formula(self, kernel_size, *, output):
        return output[0].numel * _window(kernel_size, dims)
    formula.__qualname__ = f"_pool{dims}d"
    return formula


register_cost(aten.max_pool1d, aten.max_pool1d_with_indices, aten.avg_pool1d)(_pool(1))
register_cost(aten.max_pool2d, aten.max_pool2d_with_indices, aten.avg_pool2d)(_pool(2))
register_cost(aten.max_pool3d, aten.max_pool3d_with_indices, aten.avg_pool3d)(_pool(3))


@register_cost(aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
               aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d, aten.adaptive_max_pool1d,
               aten.adaptive_max_pool2d, aten.adaptive_max_pool3d)
def _adaptive_pool(self, output_size, *, output):
    # Bin i of a dim covers [floor(i*In/Out), ceil((i+1)*In/Out)); dims are independent, so the
    # windows' total is the product over dims of each dim's summed bin widths (= In when Out divides In).
    dims = len(output_size)
    total = 1
    for n_in, n_out in zip(self.shape[-dims:], output[0].shape[-dims:]):
        total *= sum(-(-(i + 1) * n_in // n_out) - (i * n_in // n_out) for i in range(n_out))  # ceil - floor
    return math.prod(output[0].shape[:-dims]) * total


# ---------------------------------------------------------------------------------------------
# Data movement: 0 FLOPs, with the bytes each op really moves.


@register_cost(aten.cat, aten.stack, aten.hstack, aten.vstack, aten.repeat, aten.tile, aten.repeat_interleave,
               aten.roll, aten.flip, aten.tril, aten.triu, aten.constant_pad_nd, aten.pad,
               aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d, aten.replication_pad1d,
               aten.replication_pad2d, aten.replication_pad3d, aten.clone, aten._to_copy, aten.im2col,
               aten.sort, aten.argsort, aten.msort, aten.topk, aten.masked_select, aten.nonzero,
               aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter, aten.as_strided_scatter)
def _data_movement(*, output):
    # default bytes: every input read once, every output written once (clone is tagged pointwise:
    # this formula overrides that, a copy computes nothing)
    return 0


@register_cost(aten._unsafe_view, aten.unsafe_split, aten.unsafe_split_with_sizes, aten.unsafe_chunk,
               aten._assert_tensor_metadata, aten._assert_async, aten._assert_scalar,
               aten._functional_assert_async, aten.sym_size, aten.sym_stride, aten.sym_numel,
               aten.sym_storage_offset, aten._local_scalar_dense, aten.sym_constrain_range,
               aten.sym_constrain_range_for_size, aten._functional_sym_constrain_range,
               aten._functional_sym_constrain_range_for_size, aten.record_stream, aten.is_same_size,
               aten._fused_sdp_choice)
def _free(*, output):
    # views without an alias annotation (_unsafe_view, unsafe_split), metadata queries and asserts;
    # _local_scalar_dense (.item()) reads one scalar, a sync rather than traffic
    return _FREE


@register_cost(aten.contiguous, aten.to, aten.type_as, aten._autocast_to_reduced_precision,
               aten._autocast_to_full_precision, aten.resolve_conj, aten.resolve_neg)
def _copy_if_changed(self, copy=False, *, output):
    # These return `self` itself when nothing changes (dtype, strides) and a copy otherwise. A device
    # move that keeps the dtype looks unchanged: TensorMeta holds no device.
    if not copy and output[0] == self:
        return _FREE
    return OpCost(0, self.nbytes, output[0].nbytes)


@register_cost(aten.reshape, aten.reshape_as, aten.flatten, aten.ravel)
def _reshape(self, *, output):
    # a view when the strides allow one (a contiguous input always does), else a copy
    if not self.stride or _can_view(self.shape, self.stride, output[0].shape):
        return _FREE
    return OpCost(0, self.nbytes, output[0].nbytes)


def _can_view(shape, stride, new_shape) -> bool:
    """Whether `view(new_shape)` works on these strides (ATen's computeStride test, without a tensor).

    Walking from the last dim, the old dims split into chunks that are contiguous among themselves;
    each chunk must be exactly covered by consecutive new dims.
    """
    if not shape or math.prod(shape) == 0:
        return True
    view_d, chunk_stride = len(new_shape) - 1, stride[-1] if stride else 1
    chunk_numel = view_numel = 1
    for d in range(len(shape) - 1, -1, -1):
        chunk_numel *= shape[d]
        if d == 0 or (shape[d - 1] != 1 and stride[d - 1] != chunk_numel * chunk_stride):
            while view_d >= 0 and (view_numel < chunk_numel or new_shape[view_d] == 1):
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != chunk_numel:
                return False
            if d > 0:
                chunk_stride, chunk_numel, view_numel = stride[d - 1], 1, 1
    return view_d == -1


@register_cost(aten.copy, aten.copy_)
def _copy(src, *, output):
    # reads src (broadcast dims once), writes the destination; the destination's old values are not read
    return OpCost(0, src.nbytes, _nbytes(output))


@register_cost(aten.arange, aten.zeros, aten.ones, aten.full, aten.scalar_tensor, aten.eye, aten.zeros_like,
               aten.ones_like, aten.full_like, aten.new_zeros, aten.new_ones, aten.new_full, aten.rand,
               aten.randn, aten.randint, aten.randperm, aten.rand_like, aten.randn_like, aten.randint_like,
               aten.linspace, aten.logspace, aten.triu_indices, aten.tril_indices)
def _factory(*, output):
    # writes its output, reads nothing (a *_like op only takes its input's shape); generating random
    # numbers is counted as data movement, like every factory
    return OpCost(0, 0, _nbytes(output))


@register_cost(aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
               aten.empty_permuted)
def _empty(*, output):
    return _FREE  # allocates, writes nothing


@register_cost(aten.fill, aten.zero, aten.normal, aten.uniform, aten.exponential, aten.random, aten.cauchy,
               aten.log_normal, aten.geometric, aten.normal_functional)
def _overwrite(self=None, *, output, **args):
    # `self` (also for the in-place fill_, zero_, normal_ ...) only gives the shape: its old values are
    # not read. Tensor arguments (fill.Tensor's value, normal's mean/std tensors) are.
    return OpCost(0, _nbytes(list(args.values())), _nbytes(output))


@register_cost(aten.bernoulli)
def _bernoulli(self, p=None, *, output):
    # bernoulli(self) draws with probabilities `self` (read); bernoulli(self, p) / bernoulli_ use p
    read = self.nbytes if p is None else _nbytes(p)
    return OpCost(0, read, _nbytes(output))


@register_cost(aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout)
def _dropout(input, p, train, *, output):
    if not train or p == 0:
        return _FREE  # the identity: returns its input
    # compare a random draw against p: 1, multiply by the scaled mask: 1 -> 2 per element; the
    # boolean keep-mask (1 byte per element) is written besides the output
    return OpCost(2 * input.numel, input.nbytes, output[0].nbytes + input.numel)


@register_cost(aten.native_dropout)
def _native_dropout(input, train, *, output):
    # as dropout; the mask is its second output, so default bytes count it
    return 0 if train is False else 2 * input.numel


@register_cost(aten.embedding)
def _embedding(weight, indices, *, output):
    # a gather: reads the indices and only the rows it gathers (the output's bytes), not the table
    return OpCost(0, indices.nbytes + output[0].nbytes, output[0].nbytes)


@register_cost(aten.embedding_bag, aten._embedding_bag, aten._embedding_bag_forward_only)
def _embedding_bag(weight, indices, offsets, per_sample_weights=None, *, output):
    # gathers one row per index and reduces it into its bag: 1 add (or compare) per gathered element,
    # 1 more multiply per element with per_sample_weights. Reads indices, offsets, the gathered rows;
    # writes every output (the bags, plus the bookkeeping tensors _embedding_bag returns).
    gathered = indices.numel * weight.shape[-1]
    flops = gathered * (2 if per_sample_weights is not None else 1)
    read = _nbytes(indices, offsets, per_sample_weights) + gathered * weight.itemsize
    return OpCost(flops, read, _nbytes(output))


@register_cost(aten.index, aten._unsafe_index, aten.index_select, aten.gather, aten.take, aten.take_along_dim,
               *_existing("_unsafe_masked_index"))
def _gather(self, *, output, **args):
    # reads the index tensors (and a mask) and only the elements gathered (= the output), not all of self
    return OpCost(0, _nbytes(list(args.values())) + _nbytes(output), _nbytes(output))


def _indexed_numel(self: TensorMeta, indices) -> int:
    """Elements of `self` an advanced index addresses: broadcast(index shapes) x the dims left whole.
    A boolean mask counts as if every element were selected (an upper bound)."""
    shapes, d, whole = [], 0, 1
    for idx in indices:
        if idx is None:  # a ':' dim
            whole *= self.shape[d]
            d += 1
        elif idx.dtype in (torch.bool, torch.uint8):
            shapes.append((idx.numel,))
            d += len(idx.shape)
        else:
            shapes.append(idx.shape)
            d += 1
    return _broadcast_numel(shapes) * whole * math.prod(self.shape[d:])


def _broadcast_numel(shapes) -> int:
    ndim = max((len(s) for s in shapes), default=0)
    dims = [max((s[i - ndim + len(s)] for s in shapes if i - ndim + len(s) >= 0), default=1)
            for i in range(ndim)]
    return math.prod(dims)


@register_cost(aten.index_put, aten._unsafe_index_put)
def _index_put(self, indices, values, accumulate, *, output):
    # out of place: copies self, then writes values at the indexed elements (accumulate: 1 add each)
    flops = _indexed_numel(self, indices) if accumulate else 0
    return OpCost(flops, _nbytes(self, indices, values), _nbytes(output))


@register_cost(aten.index_put_)
def _index_put_(self, indices, values, accumulate, *, output):
    # in place (a KV-cache write): reads indices and values, writes only the indexed elements
    # (accumulate: reads them too, 1 add each)
    n = _indexed_numel(self, indices)
    region = n * self.itemsize
    return OpCost(n if accumulate else 0, _nbytes(indices, values) + (region if accumulate else 0), region)


def _scatter_cost(self, index, src, combines: bool, inplace: bool, output) -> OpCost:
    # one src element per index entry (src may be larger than index; the rest is never read);
    # combining (scatter_add, a reduce) is 1 FLOP per entry and reads the destination element
    moved = index.numel * self.itemsize
    src_read = moved if isinstance(src, TensorMeta) else 0
    if inplace:
        return OpCost(index.numel if combines else 0, index.nbytes + src_read + (moved if combines else 0), moved)
    return OpCost(index.numel if combines else 0, self.nbytes + index.nbytes + src_read, _nbytes(output))


@register_cost(aten.scatter)
def _scatter(self, index, src=None, reduce=None, *, output):
    return _scatter_cost(self, index, src, reduce is not None, False, output)


@register_cost(aten.scatter_)
def _scatter_(self, index, src=None, reduce=None, *, output):
    return _scatter_cost(self, index, src, reduce is not None, True, output)


@register_cost(aten.scatter_add, aten.scatter_reduce)
def _scatter_add(self, index, src, *, output):
    return _scatter_cost(self, index, src, True, False, output)


@register_cost(aten.scatter_add_, aten.scatter_reduce_)
def _scatter_add_(self, index, src, *, output):
    return _scatter_cost(self, index, src, True, True, output)


def _index_slices_cost(self, index, source, adds: bool, inplace: bool, output) -> OpCost:
    # writes source's slices into self at `index`; index_add adds them (1 FLOP per source element,
    # reading the destination slices). Out of place, self is copied whole first.
    flops = source.numel if adds else 0
    if inplace:
        moved = source.numel * self.itemsize
        return OpCost(flops, _nbytes(index, source) + (moved if adds else 0), moved)
    return OpCost(flops, _nbytes(self, index, source), _nbytes(output))


def _index_slices(adds: bool, inplace: bool):
    def formula(self, index, source, *, output):
        return _index_slices_cost(self, index, source, adds, inplace, output)
    formula.__qualname__ = f"_index_{'add' if adds else 'copy'}{'_' if inplace else ''}"
    return formula


register_cost(aten.index_add)(_index_slices(adds=True, inplace=False))
register_cost(aten.index_copy)(_index_slices(adds=False, inplace=False))
register_cost(aten.index_add_)(_index_slices(adds=True, inplace=True))
register_cost(aten.index_copy_)(_index_slices(adds=False, inplace=True))


# ---------------------------------------------------------------------------------------------
# Optimizer steps: foreach list ops and the fused optimizer kernels (shapeprof.optimizer_step).
#
# A `_foreach_X` op applies the per-tensor op X to every entry of its tensor lists in one launch (or
# a few: multi_tensor_apply splits long lists into chunks, left out here). It costs the sum of X over
# the entries, each priced by this table as X is (FLOPs and bytes alike), so a foreach op and the
# for-loop it replaces cost the same; only the number of kernels differs.


def _foreach_sum(single: OpOverloadPacket, inplace: bool):
    def formula(*, output, **args):
        lists = [v for v in args.values() if isinstance(v, (list, tuple))]   # Tensor[] and float[]: one per entry
        selves = next((v for v in lists if v and isinstance(v[0], TensorMeta)), [])
        flops = read = written = 0
        if isinstance(args.get("scalars"), TensorMeta):
            # addcmul_/addcdiv_.Tensor: one 1-D tensor holds every entry's scalar; read once
            read, args = args["scalars"].nbytes, {**args, "scalars": 1.0}
        for i in range(len(lists[0]) if lists else 0):
            entry = tuple(v[i] if isinstance(v, (list, tuple)) else v for v in args.values())
            # in place, entry i writes its self; out of place it writes output i. (An out= variant's
            # outputs don't reach formulas: they have self's shape and dtype, so self stands in.)
            outs = (selves[i],) if inplace or not output else (output[i],)
            c = cost_of(OpRecord(_entry_overload(single, entry), entry, {}, outs))
            flops, read, written = flops + c.flops, read + c.bytes_read, written + c.bytes_written
        return OpCost(flops, read, written)
    formula.__qualname__ = f"_foreach_sum_{single._qualified_op_name.split('::')[1]}"
    return formula


def _entry_overload(single: OpOverloadPacket, entry: tuple) -> OpOverload:
    # The per-tensor overload only matters to a formula that binds argument names (copy_'s `src`,
    # norm's `p`): take `default`, else the Tensor or Scalar one the entry's second argument fits.
    names = single.overloads()
    kind = "Tensor" if any(isinstance(v, TensorMeta) for v in entry[1:]) else "Scalar"
    for name in ("default", kind):
        if name in names:
            return getattr(single, name)
    return getattr(single, names[0])


def _register_foreach_ops() -> None:
    # Every aten::_foreach_X whose per-tensor X (or, for an in-place X_ that has no in-place
    # per-tensor op such as maximum_, its functional X) has a cost here. The rest stay uncovered.
    names = sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("aten::_foreach_")})
    for name in names:
        packet = getattr(aten, name)
        x = name[len("_foreach_"):]
        inplace = x.endswith("_")
        single = getattr(aten, x, None) or (getattr(aten, x[:-1], None) if inplace else None)
        if packet in _REGISTRY or single is None or not has_formula(single):
            continue
        matmul = single in _REGISTRY and _REGISTRY[single].matmul   # _foreach_mm: a list of mm
        register_cost(packet, matmul=matmul)(_foreach_sum(single, inplace))


_register_foreach_ops()


# The fused optimizer kernels read every tensor once and write what they update once. Their FLOPs
# per element are the for-loop's for the same math, counted as this table counts those ops (1 per
# pointwise op per element), so the three implementations of a step agree on FLOPs and differ in bytes.

@register_cost(*_existing("_fused_adam_", "_fused_adamw_"))
def _fused_adam(self, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, weight_decay, amsgrad,
                maximize, grad_scale=None, found_inf=None, *, output):
    # Per element: exp_avg lerp 1; exp_avg_sq * beta2 and += (1 - beta2) g^2 (mul_, addcmul_) 2;
    # denominator sqrt, / bias correction, + eps 3; param addcdiv 1 -> 7. Weight decay +1 (AdamW
    # scales the param, Adam adds wd * param to the grad), maximize +1 (negates the grad), amsgrad +1
    # (the running max), grad_scale +1 (unscales the grad). The per-tensor step and bias corrections
    # are left out.
    per_element = 7 + (weight_decay != 0) + bool(maximize) + bool(amsgrad) + (grad_scale is not None)
    state = [exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []]
    # reads param, grad, state and each tensor's step; writes param and state (not the grad, not the step)
    read = _nbytes(self, grads, *state, state_steps, grad_scale, found_inf, lr)
    return OpCost(per_element * sum(p.numel for p in self), read, _nbytes(self, *state))


@register_cost(*_existing("_fused_sgd_"))
def _fused_sgd(self, grads, momentum_buffer_list, weight_decay, momentum, lr, nesterov, maximize, is_first_step,
               grad_scale=None, found_inf=None, *, output):
    # Per element: param += -lr * d 1; with momentum, buf = momentum * buf + (1 - dampening) * g 2
    # (mul_, add_; the first step copies g into buf: 0), nesterov +1; weight decay +1, maximize +1,
    # grad_scale +1 (as _fused_adam). The first step writes the buffer without reading it.
    moving = momentum != 0
    per_element = (1 + (weight_decay != 0) + bool(maximize) + (grad_scale is not None)
                   + (moving and (bool(nesterov) + 2 * (not is_first_step))))
    bufs_read = momentum_buffer_list if moving and not is_first_step else []
    read = _nbytes(self, grads, bufs_read, grad_scale, found_inf, lr)
    written = _nbytes(self, momentum_buffer_list if moving else [])
    return OpCost(per_element * sum(p.numel for p in self), read, written)


# ---------------------------------------------------------------------------------------------
# Backward kernels (shapeprof.backward prices a training step's backward with them).

@register_cost(aten.convolution_backward, matmul=True)
def _convolution_backward(grad_output, input, weight, transposed, output_mask, *, output):
    # grad_input is a (transposed) convolution of grad_output with the weight, grad_weight one of the input with
    # grad_output: each does the forward's multiply-adds. The bias's gradient (a sum of grad_output) is left out.
    forward = _conv_flops(input, weight, grad_output, transposed)
    return forward * (bool(output_mask[0]) + bool(output_mask[1]))


@register_cost(aten._scaled_dot_product_flash_attention_backward,
               aten._scaled_dot_product_efficient_attention_backward,
               aten._scaled_dot_product_flash_attention_for_cpu_backward, matmul=True)
def _sdpa_backward(query, key, value, is_causal=False, *, output):
    # Q K^T is recomputed (E per score), then dV = P^T dO and dP = dO V^T (Ev each), dQ = dS K and dK = dS^T Q
    # (E each): five matmuls per kept score, as FlopCounterMode counts it. Causal keeps j <= i, as the forward.
    lq, lk = query.shape[-2], key.shape[-2]
    scores = _kept_scores(lq, lk, hi=0) if is_causal else lq * lk
    return _attention_flops(math.prod(query.shape[:-2]), scores, 3 * query.shape[-1], 2 * value.shape[-1])


# ---------------------------------------------------------------------------------------------
# Backward kernels of norms, softmax, embeddings, losses, pooling and indexing (what a training step's
# backward runs besides matmuls, convolutions and attention). Each counts its elementwise work in the
# style of its forward formula above: FLOPs per element, the per-row or per-channel operations (a mean's
# divide, w * rstd) left out. The backward of an activation is 1 FLOP per element, as every pointwise op:
# the tagged ones (gelu_backward, silu_backward, tanh_backward, sigmoid_backward, threshold_backward ...) by
# the pointwise rule, the untagged ones by _activation_backward below.
#
# Bytes: the default rule, except that an input which only gives a shape (max_pool's `self`, nll_loss's
# `self`, layer norm's `bias`) is not read, and a gradient that is mostly zeros, which eager PyTorch makes
# as a zero-filled tensor and then writes part of (select/slice/diagonal_backward, nll_loss_backward,
# embedding_dense_backward), writes the whole tensor (the fill) plus the part written over it. A kernel that
# computes every element of its gradient writes it once (a redundant zero fill before it, which some CUDA
# pooling kernels run, is left out). Scratch buffers (embedding's index sort, partial sums) are left out.


def _norm_backward_per_element(weight, output_mask, centred: bool) -> int:
    """FLOPs per element of a layer/group norm (centred) or RMS norm backward, for the gradients asked for.

    x_hat = (x - mean) * rstd is recomputed from the saved statistics: 2 (RMS: x * rstd, 1). grad_input
    = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * weight: g 1 (with a weight), sum(g) 1,
    g * x_hat 1, its sum 1, x_hat * that mean 1, two subtracts 2, * rstd 1 -> 7 + weight (RMS has no
    mean(g) term: 5 + weight). grad_weight: dy * x_hat 1, summed over rows 1 -> 2; grad_bias: dy summed 1.
    All three with a weight (layer norm): 2 + 8 + 2 + 1 = 13 per element (forward: 5 + 2); RMS norm with
    both: 1 + 6 + 2 = 9 (forward: 3 + 1).
    """
    dx, dw, db = (list(output_mask) + [False] * 3)[:3]
    x_hat = (2 if centred else 1) if (dx or dw) else 0
    grad_input = ((7 if centred else 5) + (weight is not None)) if dx else 0
    return x_hat + grad_input + 2 * bool(dw) + bool(db)


@register_cost(aten.native_layer_norm_backward)
def _layer_norm_backward(grad_out, input, mean, rstd, weight, output_mask, *, output):
    # reads dy, x, the saved mean and rstd, the weight; not the bias (its gradient's shape comes from it)
    flops = input.numel * _norm_backward_per_element(weight, output_mask, centred=True)
    return OpCost(flops, _nbytes(grad_out, input, mean, rstd, weight), _nbytes(output))


@register_cost(aten.native_group_norm_backward)
def _group_norm_backward(input, weight, output_mask, *, output):
    # as layer norm (the forward counts both alike); the per-channel weight scales each element of dy once.
    # Default bytes: dy, x, mean, rstd, weight (group norm's backward takes no bias)
    return input.numel * _norm_backward_per_element(weight, output_mask, centred=True)


@register_cost(*_existing("_fused_rms_norm_backward"))
def _rms_norm_backward(input, weight, output_mask, *, output):
    return input.numel * _norm_backward_per_element(weight, output_mask, centred=False)


def _batch_norm_backward_cost(grad_out, input, weight, running, saved, train, output_mask, output,
                              extra=()) -> OpCost:
    # Training (batch statistics): x_hat recomputed 2; sum(dy) 1 and sum(dy * x_hat) 2, which are also the
    # bias's and weight's gradients (the same per-channel sums); grad_input = (w * invstd) * (dy - mean(dy)
    # - x_hat * mean(dy * x_hat)): x_hat * that mean 1, two subtracts 2, the per-channel scale 1 -> 4. All
    # three: 2 + 1 + 2 + 4 = 9 per element (forward: 5 + affine). Inference (running statistics): grad_input
    # = dy * (w * invstd) 1; grad_weight = sum(dy * x_hat) with x_hat recomputed: 2 + 2; grad_bias sum(dy)
    # 1 -> 6 (forward: 2 + affine). Reads dy, x, the weight and the statistics its mode uses (+ cudnn's
    # reserve space); writes the gradients asked for.
    dx, dw, db = (bool(m) for m in output_mask)
    if train:
        per_element = 2 * (dx or dw) + (dx or db) + 2 * (dx or dw) + 4 * dx
    else:
        per_element = dx + 4 * dw + db
    read = _nbytes(grad_out, input, weight, saved if train else running, list(extra))
    # the meta kernel returns all three gradients whatever the mask (a GPU's leaves the others undefined):
    # count only those asked for
    written = [o for o, m in zip(output, output_mask) if m] if len(output) == 3 else output
    return OpCost(input.numel * per_element, read, _nbytes(written))


@register_cost(aten.native_batch_norm_backward)
def _native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd,
                                train, output_mask, *, output):
    return _batch_norm_backward_cost(grad_out, input, weight, [running_mean, running_var],
                                     [save_mean, save_invstd], train, output_mask, output)


@register_cost(aten.batch_norm_backward)
def _batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_var, update,
                         output_mask, reserve, *, output):
    # the backward of _batch_norm_with_update (update=True: batch statistics) and _batch_norm_no_update
    return _batch_norm_backward_cost(grad_out, input, weight, [running_mean, running_var],
                                     [save_mean, save_var], update, output_mask, output, extra=(reserve,))


@register_cost(aten.cudnn_batch_norm_backward, aten.miopen_batch_norm_backward)
def _cudnn_batch_norm_backward(input, grad_output, weight, running_mean, running_var, save_mean, save_var,
                               reserveSpace=None, *, output):
    # training only, all three gradients (miopen's schema has no reserve space)
    return _batch_norm_backward_cost(grad_output, input, weight, [running_mean, running_var],
                                     [save_mean, save_var], True, (True, True, True), output,
                                     extra=(reserveSpace,))


def _register_taking_no_output(*ops: OpOverloadPacket):
    """register_cost for ops whose schema has an argument named `output` (the softmax backwards: the saved
    softmax output), which register_cost refuses because formulas get the op's outputs under that name. The
    formula must not take `output` at all: it then sees neither, and `_apply` passes it only the arguments it
    names. Duplicates and unknown argument names are refused as register_cost refuses them."""
    def decorate(fn):
        formula = _Formula(fn, False, _param_names(fn))
        schema_names = {a.name for p in ops for name in p.overloads() for a in getattr(p, name)._schema.arguments}
        if formula.params is None or "output" in formula.params or not formula.params <= schema_names:
            raise ValueError(f"{fn.__qualname__} must name only arguments of {list(ops)}, and not 'output'")
        for p in ops:
            if p in _REGISTRY:
                raise ValueError(f"a cost formula for {p} is already registered ({_REGISTRY[p].fn.__qualname__})")
        for p in ops:
            _REGISTRY[p] = formula
        _RULES.clear()
        return fn
    return decorate


@_register_taking_no_output(aten._softmax_backward_data, aten._log_softmax_backward_data)
def _softmax_backward(grad_output):
    # softmax: y * (dy - sum(dy * y)): dy * y 1, sum 1, subtract 1, * y 1 -> 4 per element; log_softmax:
    # dy - exp(y) * sum(dy): sum 1, exp 1, multiply 1, subtract 1 -> 4 (forward: 5). Default bytes: dy and
    # the saved output y read, the gradient written
    return 4 * grad_output.numel


@register_cost(aten.embedding_dense_backward)
def _embedding_dense_backward(grad_output, indices, num_weights, scale_grad_by_freq, *, output):
    # The weight's gradient: a zero-filled (num_weights, D) tensor into which each row of dy is added at its
    # index (a scatter-add): 1 add per element of dy, as index_add counts; scale_grad_by_freq divides each
    # by its index's count, 1 more. Rows at padding_idx are skipped by the kernel but counted here (which
    # indices hit it is not in the shapes). Reads dy and the indices; writes the zero fill (the whole
    # gradient) and then the rows the indices touch, at most one per index and num_weights in all.
    dim = grad_output.shape[-1]    # dy is (*indices.shape, D)
    flops = grad_output.numel * (1 + bool(scale_grad_by_freq))
    touched = min(indices.numel, num_weights) * dim * output[0].itemsize
    return OpCost(flops, _nbytes(grad_output, indices), _nbytes(output) + touched)


@register_cost(aten.nll_loss_backward, aten.nll_loss2d_backward)
def _nll_loss_backward(grad_output, target, weight, total_weight, *, output):
    # The input's gradient is zero but at the picked log-probabilities, one per target, which get
    # -grad_output (* the class weight / total_weight): 1 FLOP per target, as the forward counts 1 per target.
    # Reads dy, the targets, the class weights and total_weight (not the input: it only gives the shape);
    # writes the zero fill of the (N, C, ...) gradient and the picked elements over it.
    picked = target.numel * output[0].itemsize
    return OpCost(target.numel, _nbytes(grad_output, target, weight, total_weight), _nbytes(output) + picked)


@register_cost(aten.mse_loss_backward)
def _mse_loss_backward(self, *, output):
    # (x - target) * (2 / n * dy): subtract 1, multiply 1 -> 2 per element; the scalar 2 / n * dy is left out
    # (with reduction="none", dy is a tensor and that product 1 more per element, also left out). Default bytes
    return 2 * self.numel


@register_cost(aten.max_pool2d_with_indices_backward, aten.max_pool3d_with_indices_backward,
               aten.adaptive_max_pool2d_backward, aten.adaptive_max_pool3d_backward)
def _max_pool_backward(grad_output, indices, *, output):
    # each element of dy is added into the input position its saved index names: 1 add per element of dy
    # (windows overlap, so positions can sum several). Reads dy and the indices (not the input: its shape
    # only); writes the input's gradient.
    return OpCost(grad_output.numel, _nbytes(grad_output, indices), _nbytes(output))


def _avg_pool_backward(dims: int):
    def formula(grad_output, kernel_size, *, output):
        # each element of dy (divided by its window's count, left out as in the forward) is added into every
        # input position of its window: window adds per element of dy, the forward's count. Reads dy, not the
        # input (its shape only); writes the input's gradient.
        return OpCost(grad_output.numel * _window(kernel_size, dims), grad_output.nbytes, _nbytes(output))
    formula.__qualname__ = f"_avg_pool{dims}d_backward"
    return formula


register_cost(aten.avg_pool2d_backward)(_avg_pool_backward(2))
register_cost(aten.avg_pool3d_backward)(_avg_pool_backward(3))


def _adaptive_avg_pool_backward(dims: int):
    def formula(grad_output, self, *, output):
        # each element of dy is added into every input position of its bin: the forward's count (the summed
        # bin widths), with dy's shape as the pooled output. Reads dy, not the input (its shape only).
        flops = _adaptive_pool(self, grad_output.shape[-dims:], output=(grad_output,))
        return OpCost(flops, grad_output.nbytes, _nbytes(output))
    formula.__qualname__ = f"_adaptive_avg_pool{dims}d_backward"
    return formula


register_cost(aten._adaptive_avg_pool2d_backward)(_adaptive_avg_pool_backward(2))
register_cost(aten._adaptive_avg_pool3d_backward)(_adaptive_avg_pool_backward(3))


@register_cost(aten.select_backward, aten.slice_backward, aten.diagonal_backward)
def _view_backward(grad_output, *, output):
    # The gradient of a view: a zero-filled tensor of the input's size with dy copied into the viewed part
    # (eager: at::zeros, then a copy into the slice). Data movement, 0 FLOPs; reads dy, writes the fill and the
    # viewed part over it.
    return OpCost(0, grad_output.nbytes, _nbytes(output) + grad_output.numel * output[0].itemsize)


@register_cost(*_existing("hardswish_backward", "hardsigmoid_backward", "leaky_relu_backward", "elu_backward",
                          "softplus_backward", "hardtanh_backward", "log_sigmoid_backward", "softshrink_backward",
                          "hardshrink_backward", "mish_backward", "rrelu_with_noise_backward"))
def _activation_backward(*, output):
    # dy * f'(x) of an elementwise activation whose backward lacks the pointwise tag: 1 per output element,
    # as gelu_backward and silu_backward count by the pointwise rule. Default bytes (log_sigmoid's buffer too)
    return output[0].numel
