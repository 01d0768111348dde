"""Findings: the memory-bound nodes that dominate predicted time, why they are slow and what would help.

Nodes are grouped with their twins (same module pattern, see `report.module_patterns`, and same op), so a model
of 126 layers gets one finding for `layers.*.feed_forward · mul`, not 126.

What helps depends on what the op is and on what produced its input: an activation straight after a Linear
fuses into it (`shapeprof.optimize` does that rewrite), a BatchNorm after a conv in eval mode folds into the
conv's weights, a pooling layer is a windowed reduction. The advice is chosen from the node's ATen records and
those of the node its input comes from, and names a tool only where that tool does the job.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Mapping

from .costs import ATTENTION_OPS, cost_of
from .hardware import DeviceSpec
from .records import OpRecord
from .report import Finding, NodeStats, intensity, module_patterns
from .text import fmt_bytes, fmt_intensity

_MATMUL_2D = {"aten.mm", "aten.addmm", "aten.linear", "aten.matmul"}

# The activations rewrites/fuse_linear_activation.py fuses into a Linear before them (nn.ReLU, F.relu,
# torch.relu_, Tensor.relu, nn.GELU / F.gelu exact or tanh, nn.SiLU / F.silu), as the ATen ops they all run.
_FUSABLE_ACTIVATIONS = {"aten.relu": "relu", "aten.relu_": "relu", "aten.gelu": "gelu", "aten.gelu_": "gelu",
                        "aten.silu": "silu", "aten.silu_": "silu"}
# Other activations: pointwise like those, but no rewrite here matches them.
_OTHER_ACTIVATIONS = {"aten.sigmoid", "aten.sigmoid_", "aten.tanh", "aten.tanh_", "aten.hardtanh",
                      "aten.hardtanh_", "aten.hardswish", "aten.hardswish_", "aten.hardsigmoid",
                      "aten.hardsigmoid_", "aten.leaky_relu", "aten.leaky_relu_", "aten.elu", "aten.elu_",
                      "aten.mish", "aten.mish_", "aten.softplus", "aten.prelu", "aten._prelu_kernel",
                      "aten.celu", "aten.selu", "aten.threshold", "aten.threshold_", "aten.relu6"}
_CONV = re.compile(r"aten\.(_|cudnn_|mkldnn_|miopen_|slow_|thnn_)?conv")   # convolution, conv2d, _convolution ...
_NORMS = ("layer_norm", "group_norm", "rms_norm", "instance_norm")
_SOFTMAX = {"aten._softmax", "aten.softmax", "aten._log_softmax", "aten.log_softmax",
            "aten._safe_softmax"}


def find(nodes: list[NodeStats], records_of: Mapping[str, tuple[OpRecord, ...]], total_seconds: float,
         spec: DeviceSpec, *, producers: Mapping[str, str] | None = None, min_share: float = 0.01,
         limit: int = 8) -> list[Finding]:
    """Up to `limit` memory-bound groups taking at least `min_share` of the predicted time, biggest first.

    Args:
        producers: node name -> the name of the graph node its (first) input comes from; what the advice for
            an activation or a BatchNorm depends on. Without it, that advice names no producer.
    """
    patterns = module_patterns(nodes)
    by_name = {n.name: n for n in nodes}
    producers = producers or {}

    def producer(n: NodeStats | None) -> tuple[NodeStats | None, tuple[OpRecord, ...]]:
        p = by_name.get(producers.get(n.name, "")) if n is not None else None
        return p, records_of.get(p.name, ()) if p is not None else ()

    groups: dict[tuple[str, str], list[NodeStats]] = defaultdict(list)
    for n in nodes:
        if n.bound == "memory":
            groups[(patterns.get(n.module_path, n.module_path), n.op)].append(n)
    found = []
    for (pattern, op), members in groups.items():   # every memory-bound `mul` of layers.*.attention together
        seconds = sum(m.predicted_seconds for m in members)
        share = seconds / total_seconds if total_seconds else 0.0
        if share < min_share:
            continue
        flops, nbytes = sum(m.flops for m in members), sum(m.bytes for m in members)
        ratio = intensity(flops, nbytes)
        first = members[0]
        calls = sum(m.repeats for m in members)
        why = (f"{fmt_intensity(ratio)} FLOP/byte against a ridge of {fmt_intensity(first.ridge)} on "
               f"{spec.display_name}: it waits on memory ({fmt_bytes(first.bytes // first.repeats)} per call, "
               f"{calls} call{'s' if calls > 1 else ''})")
        before = producer(first)
        found.append(Finding(pattern, op, len(members), share, ratio, first.ridge, why,
                             suggest(first, records_of.get(first.name, ()), before, producer(before[0]))))
    found.sort(key=lambda f: f.share, reverse=True)
    return found[:limit]


_NO_PRODUCER: tuple[NodeStats | None, tuple[OpRecord, ...]] = (None, ())


def suggest(node: NodeStats, records: tuple[OpRecord, ...],
            producer: tuple[NodeStats | None, tuple[OpRecord, ...]] = _NO_PRODUCER,
            producer_of_producer: tuple[NodeStats | None, tuple[OpRecord, ...]] = _NO_PRODUCER) -> str:
    """What would raise this memory-bound node's intensity or cut its bytes.

    Args:
        node, records: the node and the ATen ops it ran.
        producer: the node its input comes from, with its records ((None, ()) if unknown or a node that does
            no work); producer_of_producer: likewise for that node (a conv before a BatchNorm before a ReLU).
    """
    matmuls = [(cost_of(r), r) for r in records]
    matmuls = [(c, r) for c, r in matmuls if c.matmul]
    if matmuls:
        _, rec = max(matmuls, key=lambda cr: cr[0].flops)
        if rec.name in ATTENTION_OPS:
            return _attention(rec)
        mkn = _mkn(rec)
        if mkn is not None:
            return _rows_to_ridge(*mkn, itemsize=rec.input_metas()[0].itemsize, ridge=node.ridge)
        return "a batched matmul with few rows per matrix: batch more rows per call, or fuse the batch"
    if node.flops == 0:
        return (f"pure data movement ({node.op}): no math, only bytes; avoid the copy (a view instead of "
                f".contiguous(), a preallocated buffer instead of cat)")
    kind = _kind(node, records)
    before = _kind(*producer) if producer[0] is not None else None
    if kind.startswith("activation"):
        return _activation(kind, before, producer_of_producer)
    if kind.startswith("batch_norm"):
        return _batch_norm(kind, before, node, producer[0])
    if kind == "pool":
        return ("pooling is a windowed reduction: about one FLOP per element it reads, memory-bound at any batch "
                "size. What saves its round trip through memory is not running it on its own: fused with the op "
                "before it (torch.compile), or a strided convolution in its place")
    if kind == "norm":
        return ("a normalisation reads its input for the statistics and again to scale it unless one kernel does "
                "both: a fused norm kernel (torch.compile generates one, also fusing the residual add before it; "
                "apex and Transformer Engine have fused LayerNorm/RMSNorm)")
    if kind == "softmax":
        return ("a softmax reads and writes its whole input: over attention scores, a fused attention kernel "
                "(F.scaled_dot_product_attention, FlashAttention) never writes the scores at all; elsewhere a "
                "fused kernel (torch.compile) joins it to the ops around it")
    return ("elementwise work has a fixed, low FLOP/byte and reaches the ridge at no batch size: fuse it with "
            "its neighbours so the tensor stays on chip (torch.compile fuses chains of elementwise ops)")


def _attention(rec: OpRecord) -> str:
    """Advice for a memory-bound fused attention, from its shapes: a cache read (fewer queries than keys) or not."""
    q, k = rec.args[0], rec.args[1]
    if rec.name in ("aten._flash_attention_forward", "aten._efficient_attention_forward"):
        lq, lk = q.shape[1], k.shape[1]          # (B, L, H, E)
    else:
        lq, lk = q.shape[-2], k.shape[-2]        # (B, H, L, E)
    if lq < lk:
        return (f"{lq} quer{'y' if lq == 1 else 'ies'} per head read all {lk} cached keys and values: decoding "
                f"re-reads the whole KV cache per token, and batching more sequences does not help (each reads its "
                f"own cache); fewer K/V heads (grouped-query attention), a quantised or paged KV cache, or more "
                f"queries per step (speculative decoding) do")
    return (f"each head attends {lq} queries to {lk} keys: at so few tokens per call the fused kernel does too "
            f"little math per byte of q, k and v (its FLOP/byte grows with the sequence, not the batch). Longer "
            f"sequences per call (packing several short ones into one, with a block-diagonal mask) raise it, and "
            f"fusing the attention with the projections around it (torch.compile, TensorRT) saves the round trips")


def _kind(node: NodeStats, records: tuple[OpRecord, ...]) -> str:
    """What a node is, from its ATen records (and its op name where ATen loses it: AdaptiveAvgPool2d(1) runs
    aten.mean): 'linear', 'matmul', 'conv', 'batch_norm_eval', 'batch_norm_train', 'activation_<relu|gelu|
    gelu_tanh|silu>', 'activation', 'pool', 'norm', 'softmax' or 'other'."""
    names = [r.name for r in records if cost_of(r).flops or cost_of(r).bytes]
    if any(_CONV.match(name) for name in names):
        return "conv"
    if any(cost_of(r).matmul for r in records):
        # a Linear (nn.Linear or a subclass keeping its forward, F.linear, aten.linear) is what
        # shapeprof.optimize's rewrite matches; an addmm or mm of an ATen-level graph or a torch.mm is not
        is_linear = node.op == "linear" or (node.kind == "call_module" and node.op.endswith("Linear"))
        return "linear" if is_linear and all(n in _MATMUL_2D for n in names) else "matmul"
    bn = [r for r in records if "batch_norm" in r.name]
    if bn:
        return "batch_norm_train" if _training(bn[0]) else "batch_norm_eval"
    if names and all(n in _FUSABLE_ACTIVATIONS for n in names) and len(names) == 1:
        kind = _FUSABLE_ACTIVATIONS[names[0]]
        if kind == "gelu" and _approximate(records) == "tanh":
            kind = "gelu_tanh"
        return f"activation_{kind}"
    if names and all(n in _OTHER_ACTIVATIONS or n in _FUSABLE_ACTIVATIONS for n in names):
        return "activation"
    if "pool" in node.op.lower() or any("pool" in n for n in names):
        return "pool"
    if any(norm in n for n in names for norm in _NORMS) or node.op.lower().endswith("norm"):
        return "norm"
    if any(n in _SOFTMAX for n in names):
        return "softmax"
    return "other"


def _training(rec: OpRecord) -> bool:
    # batch_norm, native_batch_norm, _native_batch_norm_legit, cudnn_batch_norm ...: the first bool argument
    # is `training`; _native_batch_norm_legit_no_training says it in its name
    if "no_training" in rec.name:
        return False
    return next((a for a in rec.args if isinstance(a, bool)), True)


def _approximate(records: tuple[OpRecord, ...]) -> str:
    for r in records:
        for a in (*r.args[1:], *r.kwargs.values()):
            if isinstance(a, str):
                return a
    return "none"


def _activation(kind: str, before: str | None,
                producer_of_producer: tuple[NodeStats | None, tuple[OpRecord, ...]]) -> str:
    fixed = "an activation is elementwise, at a FLOP/byte no batch size raises; what helps is never writing its input"
    if before == "linear" and kind != "activation":
        if kind in ("activation_relu", "activation_gelu_tanh"):
            return (f"{fixed}: it comes straight from a Linear, and shapeprof.optimize fuses the two for "
                    f"inference (eval mode): the activation runs on the matmul's accumulators, in a cuBLASLt "
                    f"epilogue on CUDA, a oneDNN post-op on the CPU")
        return (f"{fixed}: it comes straight from a Linear; shapeprof.optimize fuses the two for inference (eval "
                f"mode) on the CPU, a oneDNN post-op, while its CUDA epilogue covers only ReLU and tanh-GELU: on a "
                f"GPU, torch.compile fuses it into the matmul")
    if before in ("linear", "matmul"):
        return f"{fixed}: fuse it into the matmul before it as an epilogue (torch.compile does)"
    if before == "conv":
        return (f"{fixed}: fuse it into the convolution before it as an epilogue (torch.compile does; for ReLU "
                f"cuDNN has a fused conv + bias + ReLU kernel, torch.cudnn_convolution_relu)")
    if before == "batch_norm_eval" and producer_of_producer[0] is not None \
            and _kind(*producer_of_producer) == "conv":
        return (f"{fixed}: fold the BatchNorm before it into the conv before that (in eval mode it is a fixed "
                f"scale and shift); then this follows the conv directly and fuses into its epilogue (torch.compile; "
                f"for ReLU, cuDNN's fused conv + bias + ReLU kernel, torch.cudnn_convolution_relu)")
    if before and before.startswith("batch_norm"):
        return f"{fixed}: fuse it with the BatchNorm before it into one kernel (torch.compile does)"
    return f"{fixed}: fuse it into the op its input comes from (torch.compile fuses it with its neighbours)"


def _batch_norm(kind: str, before: str | None, node: NodeStats, producer: NodeStats | None) -> str:
    if kind == "batch_norm_train":
        return ("in training a BatchNorm computes batch statistics (a reduction over its input) before it "
                "normalises, so it cannot be folded away; a fused kernel (cuDNN's, or torch.compile joining it "
                "to the activation after it) keeps it to the fewest passes over memory")
    scale = ("in eval mode a BatchNorm is a fixed per-channel scale and shift and need not run at all: fold it "
             "into the weights of the op before it (weight * gamma / sqrt(var + eps) per output channel, the bias "
             "likewise)")
    if before == "conv":
        pair = (f', [["{producer.module_path}", "{node.module_path}"]]'
                if producer is not None and producer.module_path and node.module_path else "")
        return (f"{scale}, here a conv: torch.fx.experimental.optimization.fuse(model) folds every conv + "
                f"BatchNorm pair, torch.ao.quantization.fuse_modules(model{pair}) this one, torch.compile does "
                f"it with torch._inductor.config.freezing = True")
    if before == "linear":
        return (f"{scale}, here a Linear: torch.fx.experimental.optimization.fuse(model) folds a Linear + "
                f"BatchNorm1d pair")
    return (f"{scale}, if that op is linear (a conv or a Linear); otherwise fuse it with its neighbours "
            f"(torch.compile)")


def _mkn(rec: OpRecord) -> tuple[int, int, int] | None:
    """(rows M, inner K, columns N) of a 2-D-weight matmul record, or None."""
    ins = rec.input_metas()
    if rec.name == "aten.addmm":
        ins = ins[1:]
    if rec.name not in _MATMUL_2D or len(ins) < 2:
        return None
    a, w = ins[0], ins[1]
    if len(w.shape) != 2 or not a.shape:
        return None
    k = a.shape[-1]
    n = w.shape[0] if rec.name == "aten.linear" else w.shape[1]
    return math.prod(a.shape[:-1]), k, n


def _rows_to_ridge(m: int, k: int, n: int, *, itemsize: int, ridge: float) -> str:
    # intensity(M) = 2MKN / (b(MK + KN + MN)); it equals the ridge r at M* = r b K N / (2KN - r b (K + N))
    denominator = 2 * k * n - ridge * itemsize * (k + n)
    if denominator <= 0:
        return (f"a {k}x{n} weight is too small to reach the ridge at any batch: fuse it with its neighbours or "
                f"run it in a larger matmul")
    rows = math.ceil(ridge * itemsize * k * n / denominator)
    return (f"it multiplies a {k}x{n} weight by only {m} row{'s' if m != 1 else ''} (tokens): at about {rows} "
            f"rows per call it would reach the ridge; batch more sequences or tokens per step")
