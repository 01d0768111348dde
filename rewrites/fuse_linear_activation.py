"""Linear followed by ReLU, GELU or SiLU, fused into one kernel that applies the activation before it writes.

Unfused, a Linear writes its (M, N) output to memory and the activation reads it back and writes it again; fused,
the activation runs on the matmul's accumulators and the intermediate never reaches memory: 2 x M x N x itemsize
bytes less traffic per match. Whether that is worth much depends on the roofline: a lot for a memory-bound
Linear (small M), little for a compute-bound one.

Matched, in every way users write it (module-level graphs from ``symbolic_trace`` and ATen-level ones from
``torch.export`` alike):

- the Linear: ``nn.Linear`` (and subclasses that keep its forward), ``F.linear``, ``aten.linear``; with or
  without bias;
- the activation: ``nn.ReLU`` (inplace or not), ``F.relu``, ``torch.relu``, ``torch.relu_``, ``F.relu_``,
  ``Tensor.relu``, ``Tensor.relu_``; ``nn.GELU`` / ``F.gelu`` with ``approximate="none"`` (exact, erf) or
  ``"tanh"``; ``nn.SiLU`` / ``F.silu``; and their ``aten`` ops.

Lowered to a kernel that really fuses, chosen by the device the weights are on when the model is optimized:

- CPU: oneDNN's linear with a post-op, ``torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], algorithm)``:
  "relu"; "gelu" with "none" (erf, exactly ``F.gelu``) or "tanh"; "swish" for SiLU. fp32 always, bf16/fp16
  where oneDNN supports them on this CPU; inputs of any rank and strides.
- CUDA: ``torch.ops.aten._addmm_activation(bias, x2d, w.t(), use_gelu=...)``, a cuBLASLt epilogue: ReLU, and
  GELU only with ``approximate="tanh"`` (the epilogue computes the tanh approximation; an exact-erf GELU is
  skipped, never silently approximated). It needs a bias. bf16 and fp16; fp32 for ReLU only. Measured with
  torch 2.11 on an H200 (torch.profiler): bf16 ReLU and GELU run as one GEMM kernel with the activation in its
  epilogue for 1 to 512 rows; fp32 ReLU as one kernel too, but fp32 GELU as a GEMM plus a separate cuBLASLt
  epilogue kernel, which is why it is skipped. (Older PyTorch releases route a single row through addmm + a
  separate activation: correct, but unfused.)

Skipped, with the reason: a Linear whose output has another user (the fused kernel never produces it), modules
with hooks (a fused kernel would bypass them), training mode or example inputs that require grad (the fused
kernels have no backward), a dtype or device no kernel covers, and a match whose roofline saving on the chosen
device is under `MIN_SAVING` of the pair's time: a Linear bound by reading its weights (batch 1) gains nothing
the roofline can see, while a kernel change has per-call costs it cannot see (oneDNN's ~10-20 us setup per
call on a CPU).

At run time the fused call checks what could have changed since: a model moved to another device raises a
clear error (optimize again after ``.to()``: the lowering was chosen and verified for the old device); with
autograd recording (grad enabled and an input or the weight requires grad) or under autocast, it computes the
unfused reference instead, so gradients and autocast dtypes stay right, and warns once.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from shapeprof.capture import target_name
from shapeprof.records import OpRecord
from shapeprof.roofline import record_time

from .base import Match, Rewrite, RewriteContext, RewriteResult, Skip, register
from .linear_kernels import (ACT_LABELS, ACTIVATIONS, Linear, as_linear, call_arg, choose_kernel,
                             fused_linear_activation, fused_record, global_hooks, has_hooks, kernel_name,
                             linear_metas, replace_linear)

# fused_linear_activation, the call a fused node makes, lives in linear_kernels; it is found here too
__all__ = ["ACTIVATIONS", "MIN_SAVING", "FuseLinearActivation", "fused_linear_activation"]

aten = torch.ops.aten

MIN_SAVING = 0.01   # skip a match whose predicted saving is under this fraction of the unfused pair's time

# ---------------------------------------------------------------------------------------------- matching

@dataclass(frozen=True)
class _Activation:
    node: fx.Node
    kind: str            # one of ACTIVATIONS
    inplace: bool
    input: fx.Node
    label: str           # how the user wrote it: 'ReLU', 'F.relu', 'Tensor.relu_' ...
    module: nn.Module | None = None
    nodes: tuple = ()    # written as elementwise ops: all of them (`node` is the last)


_RELU_FUNCTIONS = {F.relu: ("F.relu", None), torch.relu: ("torch.relu", False), torch.relu_: ("torch.relu_", True),
                   aten.relu.default: ("aten.relu", False), aten.relu_.default: ("aten.relu_", True)}
_SILU_FUNCTIONS = {F.silu: ("F.silu", None), torch._C._nn.silu: ("torch.silu", False),
                   torch._C._nn.silu_: ("torch.silu_", True), aten.silu.default: ("aten.silu", False),
                   aten.silu_.default: ("aten.silu_", True)}
_GELU_FUNCTIONS = {F.gelu: "F.gelu", aten.gelu.default: "aten.gelu"}


@dataclass(frozen=True)
class _Computed:
    """An activation written out as elementwise ops (HuggingFace's NewGELU: 0.5 * x * (1 + tanh(...))), found by
    what the subgraph computes on a probe, not by how it is written."""

    kind: str
    nodes: tuple[fx.Node, ...]   # the subgraph's nodes in graph order; the last is its output
    input: fx.Node


_POINTWISE_FUNCTIONS = {operator.mul, operator.add, operator.sub, operator.truediv, operator.pow, operator.neg,
                        torch.mul, torch.add, torch.sub, torch.div, torch.pow, torch.tanh, torch.sigmoid, torch.exp,
                        torch.erf, torch.sqrt, torch.rsqrt, torch.neg, torch.relu, F.relu, F.gelu, F.silu,
                        torch.sigmoid, F.sigmoid, torch.clamp, torch.abs}
_POINTWISE_METHODS = {"mul", "add", "sub", "div", "pow", "tanh", "sigmoid", "exp", "erf", "sqrt", "rsqrt", "neg",
                      "relu", "clamp", "abs", "__mul__", "__add__", "__rmul__", "__radd__", "__truediv__"}
_PROBE = torch.linspace(-8.0, 8.0, 2049, dtype=torch.float64)
_REFERENCES = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "silu": F.silu}


def _computed_activation(y: fx.Node) -> _Computed | None:
    """The elementwise subgraph that reads only `y` (and numbers) and has one output, if it computes one of the
    activations this rewrite fuses (checked on 2,049 points in [-8, 8], in float64, to 1e-9)."""
    inside: list[fx.Node] = []
    members = {y}
    frontier = list(y.users)
    while frontier:
        n = frontier.pop(0)
        if n in members or not _pointwise(n):
            continue
        if not all(i in members for i in n.all_input_nodes):
            continue
        members.add(n)
        inside.append(n)
        frontier.extend(n.users)
        if len(inside) > 32:
            return None
    if not inside or any(u not in members for u in y.users):
        return None
    order = {n: i for i, n in enumerate(y.graph.nodes)}
    inside.sort(key=order.__getitem__)
    outputs = [n for n in inside if any(u not in members for u in n.users)]
    if len(outputs) != 1 or outputs[0] is not inside[-1]:
        return None
    env = {y: _PROBE}
    try:
        for n in inside:
            args = fx.node.map_arg(n.args, env.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
            env[n] = n.target(*args, **kwargs) if n.op == "call_function" else \
                getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:
        return None
    out = env[inside[-1]]
    for kind, ref in _REFERENCES.items():
        if isinstance(out, torch.Tensor) and out.shape == _PROBE.shape and \
                torch.allclose(out, ref(_PROBE), rtol=1e-9, atol=1e-9):
            return _Computed(kind, tuple(inside), y)
    return None


def _pointwise(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _POINTWISE_FUNCTIONS:
        pass
    elif n.op == "call_method" and n.target in _POINTWISE_METHODS:
        pass
    else:
        return False
    # besides graph nodes, only numbers (no tensors, no inplace flags that would write the input)
    return all(isinstance(a, (fx.Node, int, float)) and not isinstance(a, bool) for a in n.args) and \
        all(k in ("alpha", "approximate") for k in n.kwargs)


def _as_activation(node: fx.Node, gm: fx.GraphModule) -> _Activation | None:
    """The activation `node` computes, or None if it is not one this rewrite can fuse."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        x = call_arg(node, 0, "input")
        forward = type(m).forward
        if forward is nn.ReLU.forward:
            return _Activation(node, "relu", bool(m.inplace), x, "ReLU", m)
        if forward is nn.SiLU.forward:
            return _Activation(node, "silu", bool(m.inplace), x, "SiLU", m)
        if forward is nn.GELU.forward and m.approximate in ("none", "tanh"):
            return _Activation(node, "gelu" if m.approximate == "none" else "gelu_tanh", False, x,
                               "GELU" if m.approximate == "none" else "GELU(tanh)", m)
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return _Activation(node, "relu", node.target == "relu_", node.args[0], f"Tensor.{node.target}")
    if node.op != "call_function":
        return None
    target = node.target
    for table, kind in ((_RELU_FUNCTIONS, "relu"), (_SILU_FUNCTIONS, "silu")):
        if target in table:
            label, inplace = table[target]
            if inplace is None:   # F.relu / F.silu take inplace=
                inplace = call_arg(node, 1, "inplace", False)
                if not isinstance(inplace, bool):
                    return None
            return _Activation(node, kind, inplace, call_arg(node, 0, "input"), label)
    if target in _GELU_FUNCTIONS:
        approximate = call_arg(node, 1, "approximate", "none")
        if approximate not in ("none", "tanh"):
            return None
        kind = "gelu" if approximate == "none" else "gelu_tanh"
        label = _GELU_FUNCTIONS[target] + ("(tanh)" if kind == "gelu_tanh" else "")
        return _Activation(node, kind, False, call_arg(node, 0, "input", call_arg(node, 0, "self")), label)
    return None


# ---------------------------------------------------------------------------------------------- the pass

@register
class FuseLinearActivation(Rewrite):
    """Linear followed by ReLU/GELU/SiLU -> one kernel that applies the activation before writing."""

    name = "fuse_linear_activation"
    description = ("Linear followed by ReLU/GELU/SiLU -> one kernel that applies the activation before writing "
                   "(oneDNN post-op on CPU, cuBLASLt epilogue on CUDA)")
    min_saving = MIN_SAVING

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> RewriteResult:
        result = RewriteResult(self.name)
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph:   # erased by an earlier match
                continue
            try:
                self._match(gm, ctx, node, result)
            except Exception as e:   # name the node, as every per-node failure in shapeprof does
                source = ctx.source(node)
                raise RuntimeError(f"{self.name} at node '{node.name}' ({node.op} {target_name(node)})"
                                   f"{' at ' + source if source else ''}: {type(e).__name__}: {e}") from e
        return result

    def _match(self, gm, ctx: RewriteContext, node: fx.Node, result: RewriteResult) -> None:
        act = _as_activation(node, gm)
        if act is None:   # a Linear whose output goes through an activation written as elementwise ops?
            lin = as_linear(node, gm)
            computed = _computed_activation(lin.node) if lin is not None else None
            if computed is None:
                return
            act = _Activation(computed.nodes[-1], computed.kind, False, lin.node,
                              f"{ACT_LABELS[computed.kind]} written as {len(computed.nodes)} elementwise ops",
                              nodes=computed.nodes)
        if not isinstance(act.input, fx.Node):
            return
        lin = as_linear(act.input, gm)
        if lin is None:
            return
        where = f"{ctx.where(lin.node)} -> {ctx.where(act.node)}"
        source = ctx.source(lin.node)
        if source:
            where += f" ({source})"
        plan = self._plan(gm, ctx, lin, act)
        if isinstance(plan, str):
            result.skipped.append(Skip(where, plan))
            return
        kernel, after_users, fused_record, before_records = plan
        before = ctx.seconds(before_records)
        seconds = before - ctx.seconds([fused_record])
        saved = ctx.bytes(before_records) - ctx.bytes([fused_record])
        if seconds <= self.min_saving * before:   # the roofline gate
            result.skipped.append(Skip(where, (
                f"the roofline predicts {max(seconds, 0) / before:.1%} of the pair's time saved on "
                f"{ctx.roofline_spec.display_name} (under {self.min_saving:.0%}): the Linear is bound by "
                f"{_bound_by(ctx, before_records)}, not by its output")))
            return
        self._replace(gm, lin, act, kernel, after_users, fused_record, ctx.pack_weights)
        result.applied.append(Match(
            where, f"{lin.label} + {act.label} -> {kernel_name(kernel, act.kind)}", saved, seconds))

    # ------------------------------------------------------------------ preconditions
    def _plan(self, gm, ctx: RewriteContext, lin: Linear, act: _Activation):
        """(kernel, users to redirect, fused op record, unfused records), or the reason to skip."""
        for m, what in ((lin.module, "Linear"), (act.module, "activation")):
            if m is not None and has_hooks(m):
                return f"the {what} module has hooks, which a fused kernel would bypass"
        if global_hooks():
            return "global module hooks are registered (torch.nn.modules.module.register_module_forward_*)"
        training = lin.module.training if lin.module is not None else ctx.training
        if training:
            return "training mode: the fused kernels have no backward (call model.eval() before optimizing)"
        if ctx.inputs_require_grad:
            return "an example input requires grad: the fused kernels have no backward"
        others = [u for u in lin.node.users if u is not act.node and u not in act.nodes]
        if others and not act.inplace:
            return (f"the Linear's output is also used by {', '.join(u.name for u in others)}, "
                    f"and the fused kernel never produces it")
        order = {n: i for i, n in enumerate(gm.graph.nodes)} if others else {}
        early = [u for u in others if order[u] < order[act.node]]
        if early:
            return (f"the Linear's output is read by {', '.join(u.name for u in early)} before the in-place "
                    f"{act.label} changes it")
        if lin.input is None or not isinstance(lin.input, fx.Node):
            return "the Linear's input is not a tensor of the graph"
        metas = linear_metas(gm, ctx, lin, act.node)
        if isinstance(metas, str):
            return metas
        x, w, b, out, device = metas
        kernel = choose_kernel(device, x, w, b, act.kind)
        if kernel.startswith("skip:"):
            return kernel[len("skip:"):].strip()
        fused = fused_record(kernel, x, w, b, out, act.kind)
        linear_nodes = (*lin.inner, lin.node)
        act_nodes = act.nodes or (act.node,)
        captured = [ctx.captured(n) for n in (*linear_nodes, *act_nodes)]
        if any(c is None for c in captured) or not any(c.records for c in captured[:len(linear_nodes)]) or \
                not any(c.records for c in captured[len(linear_nodes):]):
            return "no captured ATen ops for the Linear or the activation, so no cost to compare"
        before = tuple(r for c in captured for r in c.records)
        return kernel, others, fused, before

    # ------------------------------------------------------------------ the replacement
    def _replace(self, gm, lin: Linear, act: _Activation, kernel: str, after_users, record: OpRecord,
                 pack: str = "frozen"):
        fused = replace_linear(gm, lin, act.node, act.kind, kernel, record, pack)
        for user in after_users:   # an in-place activation: later readers of the Linear's output saw it activated
            user.replace_input_with(lin.node, fused)
        act.node.replace_all_uses_with(fused)
        for n in reversed(act.nodes or (act.node,)):   # users first
            gm.graph.erase_node(n)
        for n in (lin.node, *reversed(lin.inner)):
            gm.graph.erase_node(n)


def _bound_by(ctx: RewriteContext, records) -> str:
    """'reading its weights (12.6 MB)' or 'its FLOPs': what holds the unfused Linear up on the roofline."""
    spec = ctx.roofline_spec
    main = max(records, key=lambda r: ctx.seconds([r]))
    rec = ctx.as_dtype(main)
    t = record_time(rec, spec)[1]
    if t.bound == "compute":
        return "its FLOPs"
    weights = max((m for m in rec.input_metas() if len(m.shape) == 2), key=lambda m: m.nbytes, default=None)
    return f"reading its weights ({weights.nbytes / 1e6:.3g} MB)" if weights is not None else "memory traffic"
