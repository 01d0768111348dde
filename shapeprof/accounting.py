"""Two accountings of one analysed forward: eager (every ATen op its own kernel) and fused (what a serving engine runs).

The Report prices what eager PyTorch runs: each ATen op is a kernel that reads its inputs from memory and writes its
outputs back (fused attention ops, SDPA, already one flash kernel). vLLM, TensorRT-LLM and torch.compile (Inductor)
run fewer, bigger kernels. `accountings` prices the same graph both ways, op for op the same FLOPs:

    >>> import torch, shapeprof
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> acc = accountings(shapeprof.analyze(mlp, torch.randn(4, 16)))
    >>> [(a.name, a.kernels, a.bytes, a.flops) for a in acc.values()]   # the GELU rides on the first GEMM
    [('eager', 3, 5664, 6272), ('fused', 2, 4640, 6272)]

The fused accounting's rules, in the order they are applied:

1. Fusible ops that are connected in the dataflow form one kernel. Fusible is every op that computes each output
   element from a few input elements or reduces along a dimension of one tensor: pointwise math, casts (`_to_copy`),
   layout copies (clone, reshape copies), factories (arange, full, random fills: a kernel computes them in
   registers), normalisations, softmax, reductions (sum, mean, amax, var ...) and cat (Inductor lowers it to a
   pointwise load from one of its inputs). In-place ops on a tensor the graph made fuse too (a compiler makes them
   functional: dropout's bernoulli_ and div_ on a fresh tensor). Not fusible, each its own kernel as in eager:
   matmul-class ops (the registry's tensor-core `matmul` flag: mm, bmm, addmm, conv ...; and the gemv/dot
   contractions), attention ops (`costs.ATTENTION_OPS`), gathers (embedding, index, gather, nll_loss: their reads
   depend on index values; serving engines run them as their own kernels), writes into a region of a tensor (copy_,
   index_put, scatter, slice_scatter: KV-cache updates), in-place ops on a graph input or buffer, a cat that appends
   to a tensor from outside the graph or whose result is returned (a KV cache), sort-based and data-dependent ops
   (sort, topk, nonzero, unique), ops without a cost formula (their work is unknown), and ops whose formula says
   they read only part of their inputs (the kernel's reads could not be worked out from its inputs).
   A group reads each distinct tensor from outside it once (views covering all of one tensor are that tensor; views
   of parts of it, as q, k, v split from one projection, count up to its size; a folded node stands for several
   tensors, so its reads never merge) and writes only the results read outside it or returned (what the op writes
   eager: native_layer_norm's mean and rstd too; a result nothing reads is written all the same, since the graph
   cannot tell a dead op from one whose output the model keeps elsewhere). It is grown from the consumer side and
   only ever convex (no path leaves it and comes back), and only nodes standing for the same number of calls (a
   folded loop step's `repeats`) share a kernel. An HF RMSNorm (to fp32, pow, mean, add eps, rsqrt, mul, to, mul
   weight) becomes one kernel reading x and the weight and writing y; a residual add whose result feeds the next
   norm joins that norm's kernel (vLLM's fused_add_rms_norm), writing the residual stream once.
2. Manual attention: a softmax group between two matmuls (q @ k^T, then scale / mask / softmax / cast, then @ v),
   whose score and probability tensors nothing else reads, is one flash kernel with both matmuls. It reads q, k, v
   and any mask made outside it (layout copies in front of the matmuls, such as HF's repeat_kv for GQA, are absorbed:
   a flash kernel reads strided and grouped heads as they are) and writes the output; the scores are never written.
   The mask's own ops (a causal mask built from arange and compares) stay a kernel of their own that writes it.
3. Epilogue: a group of pointwise ops (no reduction: a GEMM epilogue sees one output tile at a time, and a norm or a
   softmax needs the whole row) fed by a matmul or attention kernel whose output nothing else reads runs in that
   kernel before the result is written: the output write and the group's read of it disappear (Linear + GELU;
   conv + inference batch norm + ReLU, the batch norm being a per-channel scale and shift; the transpose-and-copy
   after attention, which FlashAttention writes in (B, T, H, D) directly). When the group reads
   two such outputs (the SwiGLU's act(gate) * up) only the first in graph order takes it (gate's GEMM computes
   act(gate) * up, reading up's output from memory): two separate GEMMs cannot both be one kernel's producers. An
   engine that concatenates gate and up into one GEMM (vLLM's gate_up_proj with SiluAndMul) moves more than this,
   not less: it writes both halves and reads them back. Copies a GEMM's operands need (torch.matmul on a transposed
   operand) stay kernels of their own.
4. Each kernel is priced on the roofline, max(FLOPs / peak, bytes / bandwidth): the tensor-core peak of its matmul
   (the one with the most FLOPs) if it has one, else the lowest vector peak among its ops' compute dtypes (an
   upcast to fp32 runs at the fp32 rate); times its `calls` (a folded loop node stands for `repeats` calls).

FLOPs are the same in both accountings, op for op, as `costs.FLOP_CONVENTION` counts them: fusion changes what is
moved and launched, not the arithmetic. In particular a manual attention's flash kernel keeps the eager count, both
matmuls over all Lq x Lk scores plus the scale, mask and softmax FLOPs (a causal flash kernel would skip about half
of the scores; SDPA's own count, causal half and softmax left out, is unchanged too).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx
from torch._ops import OpOverload

from .costs import ATTENTION_OPS, OpCost, cost_of
from .hardware import DeviceSpec, SpecError
from .precision import Precision, quantise
from .precision import resolve as resolve_precision
from .records import OpRecord, TensorMeta
from .report import Report
from .roofline import OpTime, compute_dtype, op_time

__all__ = ["Accounting", "Kernel", "accountings"]


@dataclass(frozen=True, slots=True)
class Kernel:
    """One kernel launch site: the graph nodes it covers and what it costs over its `calls` (totals, as NodeStats).

    kind: 'matmul', 'matmul + epilogue', 'attention', 'attention + epilogue', 'elementwise' (one fusible op),
    'fused elementwise' (several), 'gather', 'copy' (cat, writes into a tensor), 'cache write' (a cat onto
    a cache, fused: the new positions only), 'other'.
    """

    kind: str
    nodes: tuple[str, ...]     # the fx node names it covers, in graph order
    ops: tuple[str, ...]       # the ATen ops it runs ('aten.mm', 'aten.gelu')
    flops: int
    bytes_read: int
    bytes_written: int
    seconds: float             # roofline time, over all its calls
    calls: int = 1             # launches it stands for (a folded loop step's repeats)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass(frozen=True)
class Accounting:
    """One way of counting the forward's kernels: totals and every kernel."""

    name: str
    description: str           # one line: what it assumes
    flops: int
    bytes_read: int
    bytes_written: int
    predicted_seconds: float
    kernels: int               # kernel launches, repeats included
    kernels_detail: tuple[Kernel, ...] = field(repr=False)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def to_dict(self) -> dict[str, Any]:
        """Plain data (json.dumps takes it as it is)."""
        d = asdict(self)
        d["kernels_detail"] = [{**k, "nodes": list(k["nodes"]), "ops": list(k["ops"])} for k in d["kernels_detail"]]
        return d


EAGER = ("every ATen op is its own kernel that reads its inputs from memory and writes its outputs back, as eager "
         "PyTorch runs it (attention ops are one flash kernel)")
FUSED = ("what a serving engine runs (vLLM, TensorRT-LLM, torch.compile): connected elementwise, norm and reduction "
         "ops are one kernel, pointwise epilogues run in the GEMM before them, manual attention is one flash kernel; "
         "FLOPs as eager")


def accountings(report: Report) -> dict[str, Accounting]:
    """The report's forward counted as eager PyTorch runs it and as a fusing serving engine runs it.

        >>> import torch, shapeprof
        >>> r = shapeprof.analyze(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), torch.randn(2, 8))
        >>> acc = accountings(r)
        >>> acc["eager"].bytes == r.total.bytes, acc["fused"].kernels_detail[0].kind
        (True, 'matmul + epilogue')

    Args:
        report: what `shapeprof.analyze` returned (it keeps the analysed graph; a Report read back from JSON has none).
    Returns:
        {"eager": Accounting, "fused": Accounting}. "eager" equals the report's totals exactly.
    Raises:
        ValueError: the report has no graph.
    """
    cap = report.graph_capture
    if cap is None:
        raise ValueError("accountings need the analysed graph: a Report read back from JSON has none; "
                         "use the Report shapeprof.analyze returned")
    pricer, eager = _eager_pricer(report)
    graph = _Graph(cap, pricer)
    fused = graph.fused_kernels()
    # every op eager runs is in exactly one fused kernel, with its FLOPs
    flops, ops = sum(k.flops for k in fused), sum(len(k.ops) * k.calls for k in fused)
    assert (flops, ops) == (report.total.flops, sum(k.calls for k in eager)), \
        f"fused kernels hold {ops} ops and {flops} FLOPs; eager runs {sum(k.calls for k in eager)} and " \
        f"{report.total.flops}"
    t = report.total
    return {
        "eager": Accounting("eager", EAGER, t.flops, t.bytes_read, t.bytes_written, t.predicted_seconds,
                            sum(k.calls for k in eager), tuple(eager)),
        "fused": _total("fused", FUSED, fused),
    }


def _total(name: str, description: str, kernels: list[Kernel]) -> Accounting:
    return Accounting(name, description, sum(k.flops for k in kernels), sum(k.bytes_read for k in kernels),
                      sum(k.bytes_written for k in kernels), sum(k.seconds for k in kernels),
                      sum(k.calls for k in kernels), tuple(kernels))


# ---------------------------------------------------------------------------------------------- pricing


@dataclass(frozen=True, slots=True)
class _Priced:
    record: OpRecord     # as priced: a W8A8 model's matmuls read 8-bit operands
    cost: OpCost
    time: OpTime
    captured: OpRecord   # as captured: its tensors are the ones the graph's other records hold

    def read_bytes(self, meta: TensorMeta) -> int:
        """The bytes this op reads for one of its captured input tensors (8-bit where the op was quantised)."""
        if self.record is self.captured:
            return meta.nbytes
        for mine, priced in zip(self.captured.input_metas(), self.record.input_metas()):
            if mine is meta:
                return priced.nbytes
        return meta.nbytes

    @property
    def costed(self) -> bool:
        """Whether it is a kernel at all (the Report lists exactly these ops: views and no-op copies are not)."""
        return bool(self.cost.flops or self.cost.bytes or not self.cost.covered)


class _Pricer:
    """Prices one record exactly as `analysis.analyze` did (8-bit precisions quantise matmul-class records;
    a spec without a dtype's peak falls back to fp32), so that the eager accounting reproduces the Report."""

    def __init__(self, spec: DeviceSpec, precision: Precision, tf32: bool):
        self.spec, self.precision, self.tf32 = spec, precision, tf32
        self.cache: dict[int, tuple[OpRecord, _Priced]] = {}   # twins share their records: price each once

    def __call__(self, rec: OpRecord) -> _Priced:
        hit = self.cache.get(id(rec))
        if hit is not None and hit[0] is rec:
            return hit[1]
        original = rec
        cost = cost_of(rec)
        dtype = compute_dtype(rec.input_metas(), rec.outputs)
        if self.precision.matmul_dtype is not None and cost.matmul and rec.name not in ATTENTION_OPS:
            rec = quantise(rec, self.precision.matmul_dtype)
            cost, dtype = cost_of(rec), self.precision.matmul_dtype
        try:
            t = op_time(cost, dtype, self.spec, tf32=self.tf32)
        except SpecError:
            t = op_time(cost, torch.float32, self.spec, tf32=self.tf32)
        priced = _Priced(rec, cost, t, original)
        self.cache[id(original)] = (original, priced)
        return priced


def _eager_pricer(report: Report) -> tuple[_Pricer, list[Kernel]]:
    """The pricer that reproduces the report's eager numbers.

    The Report names its precision ('bfloat16', 'int8 (W8A8)') but does not record whether fp32 matmuls ran as TF32:
    both are tried, and the one whose eager total matches the report's is kept.
    """
    name = report.dtype.split()[0] if report.dtype else None      # 'int8 (W8A8)' -> 'int8'
    try:
        precision = resolve_precision(name)
    except ValueError:    # a dtype with no short name ('complex64'): the report wrote str(dtype)
        precision = resolve_precision(getattr(torch, name))
    cap, total = report.graph_capture, report.total
    candidates = (False, True) if precision.dtype in (None, torch.float32) else (False,)
    found = []
    for tf32 in candidates:
        pricer = _Pricer(report.spec, precision, tf32)
        kernels = _eager_kernels(cap, pricer)
        got = (sum(k.flops for k in kernels), sum(k.bytes_read for k in kernels),
               sum(k.bytes_written for k in kernels))
        seconds = sum(k.seconds for k in kernels)
        found.append((got, seconds))
        if got == (total.flops, total.bytes_read, total.bytes_written) and \
                abs(seconds - total.predicted_seconds) <= 1e-9 * max(abs(total.predicted_seconds), 1e-30):
            return pricer, kernels
    raise AssertionError(f"the eager accounting does not reproduce the report: (flops, read, written), seconds = "
                         f"{found} vs {(total.flops, total.bytes_read, total.bytes_written)}, "
                         f"{total.predicted_seconds}")


def _eager_kernels(cap, pricer: _Pricer) -> list[Kernel]:
    kernels = []
    for cn in cap.nodes:
        k = cn.repeats
        for rec in cn.records:
            p = pricer(rec)
            if p.costed:
                kernels.append(_single(p, cn.node.name, _EAGER_KIND[_record_class(p)], k))
    return kernels


def _single(p: _Priced, name: str, kind: str, calls: int) -> Kernel:
    return Kernel(kind, (name,), (p.record.name,), p.cost.flops * calls, p.cost.bytes_read * calls,
                  p.cost.bytes_written * calls, p.time.seconds * calls, calls)


# ---------------------------------------------------------------------------------------------- what fuses

def _aten(*names: str) -> frozenset[str]:
    return frozenset(f"aten.{n}" for n in names)


#: contractions that run as gemv/dot kernels (the registry does not flag them `matmul`: vector units)
_CONTRACTIONS = _aten("mv", "addmv", "dot", "vdot")
#: reads depend on index values; engines run the embedding lookup as its own kernel
_GATHERS = _aten("embedding", "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only", "index",
                 "_unsafe_index", "_unsafe_masked_index", "index_select", "gather", "take", "take_along_dim",
                 "nll_loss", "nll_loss_forward", "nll_loss2d_forward", "nll_loss_nd", "masked_select")
#: write a region of a tensor (functional forms of in-place cache updates, as torch.export keeps them)
_SCATTERS = _aten("copy", "index_put", "_unsafe_index_put", "scatter", "scatter_add", "scatter_reduce", "index_add",
                  "index_copy", "slice_scatter", "select_scatter", "diagonal_scatter", "as_strided_scatter")
#: sort-based or with a data-dependent output size: library kernels
_LIBRARY = _aten("sort", "argsort", "msort", "topk", "nonzero", "unique", "_unique", "_unique2", "unique_dim",
                 "unique_consecutive", "kthvalue", "median", "nanmedian", "mode")
_CATS = _aten("cat", "stack", "hstack", "vstack")
#: keep the element count but need a whole row (or the whole tensor): not a GEMM epilogue
_ROW_OPS = _aten("softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax", "layer_norm",
                 "native_layer_norm", "group_norm", "native_group_norm", "rms_norm", "_fused_rms_norm", "batch_norm",
                 "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                 "_native_batch_norm_legit_no_training", "_batch_norm_with_update", "_batch_norm_no_update",
                 "instance_norm", "_weight_norm", "_weight_norm_interface", "cumsum", "cumprod", "cummax", "cummin",
                 "logcumsumexp", "flip", "roll")
_BATCH_NORMS = _aten("batch_norm", "native_batch_norm", "_native_batch_norm_legit",
                     "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
                     "_batch_norm_no_update", "_batch_norm_with_update", "instance_norm")
_SOFTMAX = _aten("softmax", "_softmax", "_safe_softmax")
#: copies that only change the layout: a flash kernel reads the original (strided, or grouped heads for GQA)
_LAYOUT = _aten("clone", "contiguous", "_unsafe_view", "reshape", "_reshape_copy", "repeat", "repeat_interleave")

_EAGER_KIND = {"matmul": "matmul", "contraction": "matmul", "attention": "attention", "fusible": "elementwise",
               "inplace": "elementwise", "cat": "copy", "gather": "gather", "copy": "copy", "other": "other",
               "uncovered": "other"}


def _record_class(p: _Priced) -> str:
    """What kind of kernel one costed record is: see the module docstring for why each is (not) fusible."""
    name, cost = p.record.name, p.cost
    if not cost.covered:
        return "uncovered"
    if name in ATTENTION_OPS:
        return "attention"
    if cost.matmul:
        return "matmul"
    if name in _CONTRACTIONS:
        return "contraction"
    if name in _GATHERS:
        return "gather"
    if name in _SCATTERS or name.rstrip("_") in _SCATTERS:
        return "copy"
    if name in _LIBRARY:
        return "other"
    if name in _CATS:
        return "cat"    # fusible unless it is a cache append: decided with the graph (_Graph._classify)
    # a kernel's reads are worked out from its ops' inputs: an op must read all of them (default bytes) or none (a
    # factory, a fill that only takes its input's shape)
    if cost.bytes_read and cost.bytes_read != _nbytes_distinct(p.record.input_metas()):
        return "other"
    if _written_args(p.record.op):
        return "inplace"   # fusible when what it writes was made in the graph: decided with the graph
    return "fusible"


def _written_args(op) -> list[int]:
    """The positions of the arguments an in-place or out= op writes (add_'s self, bernoulli_'s self, out=)."""
    if not isinstance(op, OpOverload):
        return []
    return [i for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def _training(rec: OpRecord) -> bool:
    """Whether a batch norm computes batch statistics (a reduction over the batch) rather than using running ones."""
    if rec.name in _aten("_native_batch_norm_legit_no_training", "_batch_norm_no_update"):
        return False
    if rec.name in _aten("_batch_norm_with_update"):
        return True
    schema = rec.op._schema.arguments if isinstance(rec.op, OpOverload) else []
    for i, a in enumerate(schema):
        if a.name in ("training", "use_input_stats"):
            value = rec.args[i] if i < len(rec.args) else rec.kwargs.get(a.name, a.default_value)
            return bool(value)
    return True


def _nbytes_distinct(metas: list[TensorMeta]) -> int:
    return sum(m.nbytes for m in {id(m): m for m in metas}.values())


def _is_pointwise(p: _Priced) -> bool:
    """No reduction: every output element depends on input elements at its own position (broadcasts allowed)."""
    if p.record.name in _BATCH_NORMS and not _training(p.record):
        return True     # inference batch norm is a per-channel scale and shift (conv + bn + relu: one kernel)
    if p.record.name in _ROW_OPS or p.record.name in _CATS:
        return False
    out = max((m.numel for m in p.record.outputs), default=0)
    return all(m.numel <= out for m in p.record.input_metas())


# ---------------------------------------------------------------------------------------------- the graph

_INTERNAL = "internal"   # a tensor made inside the node that reads it


class _Group:
    __slots__ = ("members", "max_pos", "calls")

    def __init__(self, unit: fx.Node, pos: int, calls: int):
        self.members: set[fx.Node] = {unit}
        self.max_pos, self.calls = pos, calls


@dataclass
class _Attention:
    units: set[fx.Node]
    out: fx.Node          # the P @ v matmul: its output is the kernel's


class _Graph:
    """The captured graph seen as units (nodes that run kernels) and free nodes (views, getitems) between them."""

    def __init__(self, cap, pricer: _Pricer):
        self.spec = pricer.spec
        self.cn = {cn.node: cn for cn in cap.nodes}
        self.pos = {n: i for i, n in enumerate(cap.graph.nodes)}
        self.priced = {cn.node: [pricer(r) for r in cn.records] for cn in cap.nodes}
        self.units = [n for n in cap.graph.nodes if any(p.costed for p in self.priced.get(n, ()))]
        self.is_unit = set(self.units)
        self._consumers: dict[fx.Node, tuple[frozenset[fx.Node], bool]] = {}
        self.kind = {u: self._classify(u) for u in self.units}

    # ------------------------------------------------------------------ structure
    def calls(self, n: fx.Node) -> int:
        cn = self.cn.get(n)
        return cn.repeats if cn is not None else 1

    def costed(self, u: fx.Node) -> list[_Priced]:
        return [p for p in self.priced[u] if p.costed]

    def is_free(self, n: fx.Node) -> bool:
        return n.op in ("call_function", "call_method", "call_module") and n not in self.is_unit

    def consumers(self, n: fx.Node) -> tuple[frozenset[fx.Node], bool]:
        """The units that read n's output (through views) and whether the graph returns it."""
        hit = self._consumers.get(n)
        if hit is not None:
            return hit
        units: set[fx.Node] = set()
        returned = False
        stack, seen = list(n.users), set()
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                returned = True
            elif user in self.is_unit:
                units.add(user)
            else:
                stack.extend(user.users)
        result = self._consumers[n] = (frozenset(units), returned)
        return result

    def root(self, n: fx.Node) -> fx.Node:
        """The unit (or graph input, parameter) whose memory n is a view of."""
        while self.is_free(n):
            inputs = self._tensor_inputs(n)
            if not inputs:
                return n    # a free node of its own (empty): a source
            n = inputs[0]
        return n

    def _tensor_inputs(self, n: fx.Node) -> list[fx.Node]:
        recs = self.cn[n].records if n in self.cn else ()
        if len(recs) == 1 and self._positional(n):
            return [i for _, i in _pair(recs[0], n) if i is not None]
        return list(n.all_input_nodes)

    def _positional(self, n: fx.Node) -> bool:
        """An ATen-level node (dispatch, export): its args are its one record's args, position by position."""
        recs = self.cn[n].records if n in self.cn else ()
        return n.op == "call_function" and isinstance(n.target, OpOverload) and len(recs) == 1 and \
            recs[0].op == n.target

    def _single_tensor(self, n: fx.Node) -> bool:
        if n.op in ("placeholder", "get_attr"):
            return True
        recs = self.cn[n].records if n in self.cn else ()
        return len(recs[-1].outputs) == 1 if recs else self.cn.get(n) is not None and self.cn[n].output is not None

    def read_key(self, src: fx.Node, consumer: fx.Node, meta: TensorMeta) -> Any:
        """What identifies the tensor read: walking back through views that keep every element (x and x.view(...)
        are one tensor) but stopping at a view of part of a tensor or of one of several outputs (q, k and v split
        from one projection are three). A folded node stands for several calls' tensors: its reads never merge."""
        n, folded = src, False
        while True:
            folded |= self.calls(n) > 1
            if not self.is_free(n):
                break
            recs = self.cn[n].records
            if len(recs) != 1 or len(recs[0].outputs) != 1:
                break
            ins = self._tensor_inputs(n)
            metas = recs[0].input_metas()
            if len(ins) != 1 or len(metas) != 1 or metas[0].numel != recs[0].outputs[0].numel or \
                    not self._single_tensor(ins[0]):
                break
            n = ins[0]
        return ("folded", consumer, id(meta)) if folded else n

    def _classify(self, u: fx.Node) -> str:
        classes = [_record_class(p) for p in self.costed(u)]
        if len(classes) > 1:
            main = [c for c in classes if c != "fusible"]
            if not main:
                return "fusible"
            layout = all(p.record.name in _LAYOUT for p in self.costed(u) if _record_class(p) == "fusible")
            # a matmul with the operand copies it needs (torch.matmul on a transposed operand), else kept as eager
            if len(main) == 1 and main[0] in ("matmul", "attention", "contraction") and layout:
                return main[0]
            return "opaque"
        c = classes[0]
        if c == "cat":
            appends = any(self.root(i).op in ("placeholder", "get_attr") for i in u.all_input_nodes)
            return "copy" if appends or self.consumers(u)[1] else "fusible"
        if c == "inplace":
            # dropout's bernoulli_ and div_ on a tensor the graph made are pointwise ops like any other (a compiler
            # makes them functional); writing into a graph input or buffer (a cache, running stats) is a copy
            written = self._written_inputs(u, self.costed(u)[0].captured)
            made_here = written and all(self.root(w).op not in ("placeholder", "get_attr") for w in written)
            return "fusible" if made_here else "copy"
        return c

    def _written_inputs(self, u: fx.Node, rec: OpRecord) -> list[fx.Node] | None:
        """The fx nodes whose tensors an in-place op writes; None where the node's args are not the op's."""
        if not self._positional(u):
            return None
        schema = rec.op._schema.arguments
        found = []
        for i in _written_args(rec.op):
            value = u.args[i] if i < len(u.args) else u.kwargs.get(schema[i].name)
            if not isinstance(value, fx.Node):
                return None
            found.append(value)
        return found

    def main_record(self, u: fx.Node) -> _Priced:
        costed = self.costed(u)
        main = [p for p in costed if _record_class(p) != "fusible"]
        return (main or costed)[-1]

    def tensor_core(self, u: fx.Node) -> bool:
        return self.kind[u] == "matmul"

    # ------------------------------------------------------------------ rule 1: fusible groups
    def _groups(self) -> dict[fx.Node, _Group]:
        group_of: dict[fx.Node, _Group] = {}
        for u in reversed(self.units):
            if self.kind[u] != "fusible":
                continue
            cons, _ = self.consumers(u)
            chosen = None
            for c in sorted(cons, key=self.pos.__getitem__):
                g = group_of.get(c)
                if g is None or g.calls != self.calls(u):
                    continue
                others = [x for x in cons if group_of.get(x) is not g]
                if not self._reaches(others, g):
                    chosen = g
                    break
            if chosen is None:
                chosen = _Group(u, self.pos[u], self.calls(u))
            chosen.members.add(u)
            chosen.max_pos = max(chosen.max_pos, self.pos[u])
            group_of[u] = chosen
        return group_of

    def _reaches(self, starts, g: _Group) -> bool:
        """Whether a path from `starts` (units outside g) leads into g: then adding their producer breaks convexity."""
        stack, seen = list(starts), set()
        while stack:
            x = stack.pop()
            if x in g.members:
                return True
            if x in seen or self.pos[x] > g.max_pos:
                continue
            seen.add(x)
            stack.extend(self.consumers(x)[0])
        return False

    # ------------------------------------------------------------------ rule 2: manual attention
    def _attention(self, groups: dict[int, set[fx.Node]], group_of: dict[fx.Node, set[fx.Node]]) -> list[_Attention]:
        """Find rule 2's pattern in each group with a softmax; take its ops out of the group (`groups` by id)."""
        found = []
        for key, members in list(groups.items()):
            if key not in groups or not any(p.record.name in _SOFTMAX for u in members for p in self.costed(u)):
                continue
            calls = self.calls(next(iter(members)))
            scores = sorted({r for u in members for r in (self.root(i) for i in u.all_input_nodes)
                             if r in self.is_unit and self.tensor_core(r) and self.calls(r) == calls
                             and not self.consumers(r)[1] and self.consumers(r)[0] <= members},
                            key=self.pos.__getitem__)
            for s in scores:
                inside = self._descendants(s, members)   # the ops on the paths from the scores on
                if not any(p.record.name in _SOFTMAX for u in inside for p in self.costed(u)):
                    continue
                outside, returned = set(), False
                for d in inside:
                    cons, ret = self.consumers(d)
                    returned |= ret
                    outside |= cons - inside
                if returned or len(outside) != 1:
                    continue    # the scores or probabilities are read elsewhere (returned attention weights)
                o = outside.pop()
                if not self.tensor_core(o) or self.calls(o) != calls:
                    continue
                units = {s, o} | inside
                self._absorb_layout(units, group_of, calls)
                found.append(_Attention(units, o))
                del groups[key]
                for u in units:   # absorbed layout copies were groups of their own
                    groups.pop(id(group_of.pop(u, None)), None)
                # what the group held besides (the mask's own ops) stays fused, one kernel per connected part
                for part in self._components(members - inside):
                    groups[id(part)] = part
                    for u in part:
                        group_of[u] = part
                break
        return found

    def _descendants(self, s: fx.Node, members: set[fx.Node]) -> set[fx.Node]:
        inside, stack = set(), [c for c in self.consumers(s)[0] if c in members]
        while stack:
            x = stack.pop()
            if x not in inside:
                inside.add(x)
                stack.extend(c for c in self.consumers(x)[0] if c in members)
        return inside

    def _absorb_layout(self, units: set[fx.Node], group_of, calls: int) -> None:
        """Pull in the layout copies in front of the two matmuls (repeat_kv's expand + copy for GQA) when nothing
        else reads them: the flash kernel reads their sources as they are."""
        frontier = list(units)
        while frontier:
            x = frontier.pop()
            for i in x.all_input_nodes:
                r = self.root(i)
                if r in units or r not in self.is_unit or self.kind[r] != "fusible" or self.calls(r) != calls:
                    continue
                if len(group_of.get(r, ())) != 1 or not all(p.record.name in _LAYOUT and p.cost.flops == 0
                                                              for p in self.costed(r)):
                    continue
                cons, returned = self.consumers(r)
                if returned or not cons <= units:
                    continue
                units.add(r)
                frontier.append(r)

    def _components(self, nodes: set[fx.Node]) -> list[set[fx.Node]]:
        parts, left = [], set(nodes)
        while left:
            seed = left.pop()
            part, stack = {seed}, [seed]
            while stack:
                x = stack.pop()
                near = {c for c in self.consumers(x)[0] if c in left}
                near |= {r for r in (self.root(i) for i in x.all_input_nodes) if r in left}
                left -= near
                part |= near
                stack.extend(near)
            parts.append(part)
        return parts

    # ------------------------------------------------------------------ rules 3 and 4: epilogues, kernels
    def fused_kernels(self) -> list[Kernel]:
        group_of = {u: g.members for u, g in self._groups().items()}
        groups = {id(m): m for m in group_of.values()}
        attention = self._attention(groups, group_of)
        in_attention = {u: a for a in attention for u in a.units}

        epilogue: dict[int, set[fx.Node]] = {}   # id(host) -> the group it took
        hosts: dict[int, Any] = {}
        for members in sorted(groups.values(), key=lambda m: min(self.pos[u] for u in m)):
            if not all(_is_pointwise(p) for u in members for p in self.costed(u)):
                continue
            calls = self.calls(next(iter(members)))
            for r in sorted({self.root(i) for u in members for i in u.all_input_nodes}, key=self.pos.__getitem__):
                if r not in self.is_unit or r in members or self.calls(r) != calls:
                    continue
                host: Any = in_attention.get(r)
                if host is not None and host.out is not r:
                    continue
                if host is None and not (self.tensor_core(r) or self.kind[r] == "attention"):
                    continue
                host = host if host is not None else r
                cons, returned = self.consumers(r)
                if returned or not cons <= members or id(host) in epilogue or \
                        len(self.main_record(r).record.outputs) != 1:
                    continue
                epilogue[id(host)] = members
                hosts[id(host)] = host
                break
        taken = {id(m) for m in epilogue.values()}

        kernels: list[tuple[int, Kernel]] = []
        done: set[fx.Node] = set()
        for a in attention:
            extra = epilogue.get(id(a), set())
            units = a.units | extra
            kind = "attention + epilogue" if extra else "attention"
            kernels.append(self._kernel(kind, units, formula=set()))
            done |= units
        for key, members in epilogue.items():
            host = hosts[key]
            if isinstance(host, _Attention):
                continue
            kind = ("attention" if self.kind[host] == "attention" else "matmul") + " + epilogue"
            kernels.append(self._kernel(kind, members | {host}, formula={host}))
            kernels.extend(self._leftovers(host, keep=self.main_record(host)))
            done |= members | {host}
        for members in groups.values():
            if id(members) in taken:
                continue
            n_ops = sum(len(self.costed(u)) for u in members)
            kernels.append(self._kernel("fused elementwise" if n_ops > 1 else "elementwise", members, formula=set()))
            done |= members
        for u in self.units:
            if u not in done:
                kernels.extend(self._leftovers(u, keep=None))
        return [k for _, k in sorted(kernels, key=lambda pk: pk[0])]

    def _leftovers(self, u: fx.Node, keep: _Priced | None) -> list[tuple[int, Kernel]]:
        """The records of `u` that run as eager runs them (all of them, or all but the one a fused kernel took)."""
        costed = self.costed(u)
        if keep is None and len(costed) == 1 and self.kind[u] == "copy":
            appended = self._cache_append(u, costed[0])
            if appended is not None:
                return [(self.pos[u], appended)]
        return [(self.pos[u], _single(p, u.name, _EAGER_KIND.get(self.kind[u]) if len(costed) == 1 else
                                      _EAGER_KIND[_record_class(p)], self.calls(u)))
                for p in costed if p is not keep]

    def _cache_append(self, u: fx.Node, p: _Priced) -> Kernel | None:
        """A cat onto a tensor from outside the graph (transformers' DynamicCache appending a step's keys) as a
        serving engine runs it: its preallocated (or paged) cache takes the new positions only, read once and
        written once; the positions already there are not copied. None for any other cat."""
        if p.record.name != "aten.cat" or not u.args or not isinstance(u.args[0], (list, tuple)):
            return None
        parts = p.captured.args[0] if p.captured.args else None
        if not isinstance(parts, (list, tuple)) or len(parts) != len(u.args[0]):
            return None
        held = [isinstance(a, fx.Node) and self.root(a).op in ("placeholder", "get_attr") for a in u.args[0]]
        if not any(held) or all(held):
            return None
        new = sum(m.nbytes for m, h in zip(parts, held) if not h and isinstance(m, TensorMeta))
        calls = self.calls(u)
        seconds = 2 * new / self.spec.memory_bandwidth
        return Kernel("cache write", (u.name,), (p.record.name,), 0, new * calls, new * calls, seconds * calls, calls)

    def _kernel(self, kind: str, units: set[fx.Node], formula: set[fx.Node]) -> tuple[int, Kernel]:
        """One fused kernel over `units`: reads each outside tensor once, writes what is read outside it.
        `formula` units (a GEMM or SDPA taking an epilogue) read what their cost formula says; their operand copies
        stay kernels of their own (`_leftovers`)."""
        order = sorted(units, key=self.pos.__getitem__)
        reads: dict[Any, tuple[fx.Node | None, int]] = {}
        priced: list[_Priced] = []
        read_formula = written = 0
        for u in order:
            if u in formula:
                p = self.main_record(u)
                priced.append(p)
                read_formula += p.cost.bytes_read
            else:
                priced.extend(self.costed(u))
                self._reads(u, units, reads)
            cons, returned = self.consumers(u)
            # a result nothing in the graph reads is written all the same: the graph cannot tell a dead op from one
            # whose output the model keeps elsewhere (an attribute, a cache object)
            if returned or not cons or not cons <= units:
                written += self.main_record(u).cost.bytes_written
        calls = self.calls(order[0])
        flops = sum(p.cost.flops for p in priced)
        read = read_formula + self._distinct_bytes(reads)
        matmuls = [p for p in priced if p.cost.matmul]
        if matmuls:
            peak = max(matmuls, key=lambda p: p.cost.flops).time.peak_flops
        else:
            peak = min((p.time.peak_flops for p in priced if p.cost.flops), default=priced[0].time.peak_flops)
        seconds = max(flops / peak, (read + written) / self.spec.memory_bandwidth)
        return self.pos[order[0]], Kernel(kind, tuple(u.name for u in order), tuple(p.record.name for p in priced),
                                          flops * calls, read * calls, written * calls, seconds * calls, calls)

    def _reads(self, u: fx.Node, units: set[fx.Node], reads: dict) -> None:
        """Add the tensors from outside `units` that u's ops read; a tensor made by an op of u itself is internal."""
        positional = self._positional(u)
        made: list[tuple[TensorMeta, Any]] = []     # outputs of u's earlier records -> where their data comes from
        for p in self.priced[u]:
            rec = p.captured
            pairs = _pair(rec, u) if positional else self._pair_by_value(rec, u, made)
            if not p.costed:   # a view inside the node: its output is its input's memory
                src = pairs[0][1] if pairs else None
                made.extend((o, src) for o in rec.outputs)
                continue
            if p.cost.bytes_read:
                for meta, src in pairs:
                    if src is _INTERNAL:
                        continue
                    if src is None:    # a tensor the node holds itself (a module's parameter)
                        key, root = ("private", u, id(meta)), None
                    else:
                        root = self.root(src)
                        if root in units:
                            continue
                        key = self.read_key(src, u, meta)
                    reads[key] = (root, max(reads.get(key, (None, 0))[1], p.read_bytes(meta)))
            made.extend((o, _INTERNAL) for o in rec.outputs)

    def _distinct_bytes(self, reads: dict[Any, tuple[fx.Node | None, int]]) -> int:
        """Bytes of the distinct tensors read. Views of parts of one tensor (q, k, v split from one projection;
        rotate_half's two halves of q, read besides q itself) are read up to that tensor's size, no more."""
        by_root: dict[fx.Node | None, int] = {}
        total = 0
        for root, nbytes in reads.values():
            if root is None:
                total += nbytes
            else:
                by_root[root] = by_root.get(root, 0) + nbytes
        for root, nbytes in by_root.items():
            whole = self._whole_bytes(root)
            total += nbytes if whole is None else min(nbytes, whole * self.calls(root))
        return total

    def _whole_bytes(self, n: fx.Node) -> int | None:
        """The bytes of everything n outputs (None where the capture kept no metadata: dispatch's parameters)."""
        cn = self.cn.get(n)
        if cn is None:
            return None
        first = cn.output.nbytes if cn.output is not None else None
        if n in self.is_unit:   # a node's value comes from its last op (a module's: its last ATen op, or a view of it)
            return max(sum(o.nbytes for o in cn.records[-1].outputs), first or 0)
        return first

    def _pair_by_value(self, rec: OpRecord, u: fx.Node, made) -> list[tuple[TensorMeta, Any]]:
        """For module-level nodes (symbolic_trace: a Linear runs t + addmm on its own weight), whose records' args
        are not the node's: each input is matched by shape, dtype and strides to an earlier record's output inside
        the node, else to one of the node's inputs, else it is the node's own tensor (None)."""
        candidates = [(i, self._outputs(i)) for i in u.all_input_nodes]
        used: set[fx.Node] = set()
        pairs = []
        for meta in {id(m): m for m in rec.input_metas()}.values():
            src: Any = next((s for o, s in reversed(made) if o == meta), _NOTHING)
            if src is _NOTHING:
                matches = [i for i, outs in candidates if meta in outs]
                src = next((i for i in matches if i not in used), matches[0] if matches else None)
                if src is not None:
                    used.add(src)
            pairs.append((meta, src))
        return pairs

    def _outputs(self, n: fx.Node) -> list[TensorMeta]:
        cn = self.cn.get(n)
        if cn is None:
            return []
        metas = [cn.output] if cn.output is not None else []
        return metas + (list(cn.records[-1].outputs) if cn.records else [])


_NOTHING = object()


def _pair(rec: OpRecord, node: fx.Node) -> list[tuple[TensorMeta, fx.Node | None]]:
    """Each distinct input TensorMeta of an ATen node's record with the fx node it came from, argument by argument."""
    pairs: list[tuple[TensorMeta, fx.Node | None]] = []
    for i, value in enumerate(rec.args):
        _walk(value, node.args[i] if i < len(node.args) else None, pairs)
    for name, value in rec.kwargs.items():
        _walk(value, node.kwargs.get(name), pairs)
    distinct: dict[int, tuple[TensorMeta, fx.Node | None]] = {}
    for meta, src in pairs:
        distinct.setdefault(id(meta), (meta, src))
    return list(distinct.values())


def _walk(value, node_value, out: list) -> None:
    if isinstance(value, TensorMeta):
        out.append((value, node_value if isinstance(node_value, fx.Node) else None))
    elif isinstance(value, (list, tuple)):
        same = isinstance(node_value, (list, tuple)) and len(node_value) == len(value)
        for j, v in enumerate(value):
            _walk(v, node_value[j] if same else None, out)
