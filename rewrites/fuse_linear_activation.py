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
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.overrides import handle_torch_function, has_torch_function

from shapeprof.capture import CapturedNode, target_name
from shapeprof.costs import cost_of
from shapeprof.records import OpRecord, TensorMeta
from shapeprof.roofline import compute_dtype, op_time

from . import register
from .base import CAPTURE_KEY, Match, Rewrite, RewriteContext, RewriteResult, Skip
from .packed_weights import packed_weight

aten = torch.ops.aten

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")   # gelu is the exact (erf) GELU
# the fused call also serves a Linear with no post-op ("none"): the prepack_linear rewrite's oneDNN linear
MIN_SAVING = 0.01   # skip a match whose predicted saving is under this fraction of the unfused pair's time
KERNELS = {"mkldnn": "cpu", "cublaslt": "cuda"}       # kernel -> the device type it runs on

# oneDNN post-op (attr, algorithm) per activation
_MKLDNN_POST_OP = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"),
                   "silu": ("swish", ""), "none": ("none", "")}
_ACT_LABEL = {"relu": "ReLU", "gelu": "GELU", "gelu_tanh": "GELU(tanh)", "silu": "SiLU", "none": "no activation"}


# ---------------------------------------------------------------------------------------------- the fused call

def fused_linear_activation(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            activation: str, kernel: str, pack: str = "frozen", transposed: bool = False
                            ) -> torch.Tensor:
    """``activation(F.linear(input, weight, bias))`` in one kernel: the call a fused graph node makes.

        >>> import torch
        >>> x, w, b = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)
        >>> y = fused_linear_activation(x, w, b, "relu", "mkldnn")
        >>> torch.testing.assert_close(y, torch.relu(torch.nn.functional.linear(x, w, b)))

    On the CPU a weight that cannot change behind PyTorch's back is oneDNN-packed once and reused (`packed_weight`):
    with ``pack="frozen"`` (the default) one that does not require grad, with "always" every one (the user's
    promise), with "never" none. Any other weight is passed as it is (oneDNN reorders it per call): a fused
    optimizer step, a write through ``.data`` or a numpy view changes a weight without a trace PyTorch keeps, and a
    packed copy would go stale. A single row runs unfused: MKL's matrix-vector path beats oneDNN's there (0.18 vs
    0.23 ms for 768x3072 on a 2-core x86 VM), and so does a no-activation call whose weight is not packed.

    Args:
        activation: one of ACTIVATIONS ("gelu" is the exact erf GELU, "gelu_tanh" its tanh approximation), or
            "none": a oneDNN linear with a packed weight and no post-op.
        kernel: "mkldnn" (CPU, oneDNN post-op) or "cublaslt" (CUDA epilogue; relu and gelu_tanh only).
        transposed: the weight is (in, out), as HuggingFace's Conv1D keeps it (``addmm(b, x, W)``), not (out, in).
    Raises:
        RuntimeError: the tensors are on another device than the kernel was chosen for (the model was moved
            after it was optimized).
    """
    operands = (input, weight) if bias is None else (input, weight, bias)
    if has_torch_function(operands):   # fx Proxies (tracing the optimized model), tensor subclasses
        return handle_torch_function(fused_linear_activation, operands, input, weight, bias, activation, kernel,
                                     pack, transposed)
    device = input.device.type
    if device != "meta" and device != KERNELS[kernel]:
        raise RuntimeError(
            f"shapeprof: this Linear + {_ACT_LABEL.get(activation, activation)} was fused for "
            f"{KERNELS[kernel]} ({kernel}) when the model was optimized, but now runs on {input.device}; "
            f"call shapeprof.optimize() again on the moved model")
    out_in = weight.t() if transposed else weight                      # (N, K), as F.linear takes it
    if torch.is_grad_enabled() and any(t.requires_grad for t in operands) and not _analysing(input):
        _warn_once("autograd is recording (an input or the weight requires grad), and the fused kernel has no "
                   "backward: running Linear and activation unfused. Call the model under torch.no_grad() or "
                   "torch.inference_mode() to use the fused kernel.")
        return reference(input, out_in, bias, activation)
    if device != "meta" and torch.is_autocast_enabled(device):
        # autocast casts F.linear's operands to its dtype; the fused kernels are not on its lists
        _warn_once(f"autocast is on for {device}: running Linear and activation unfused, as autocast would.")
        return reference(input, out_in, bias, activation)
    if kernel == "mkldnn":
        if not _analysing(input) and input.numel() == input.shape[-1]:   # one row
            return reference(input, out_in, bias, activation)
        packs = pack == "always" or (pack == "frozen" and not weight.requires_grad)
        if activation == "none" and not packs and not _analysing(input):
            return reference(input, out_in, bias, activation)   # MKL's GEMM: the packing was the point
        attr, algorithm = _MKLDNN_POST_OP[activation]
        w = packed_weight(weight, transposed=transposed) if packs else out_in
        return torch.ops.mkldnn._linear_pointwise(input, w, bias, attr, [], algorithm)
    k = input.shape[-1]
    x2d = input.reshape(-1, k)                                         # (M, K), M = all leading dims
    out = torch._addmm_activation(bias, x2d, out_in.t(), use_gelu=activation == "gelu_tanh")   # (M, N)
    return out.view(*input.shape[:-1], out.shape[-1])                   # (..., N)


def reference(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str):
    """The unfused computation a fused call stands for."""
    y = F.linear(input, weight, bias)
    if activation == "none":
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    raise ValueError(f"unknown activation {activation!r}; one of {', '.join(ACTIVATIONS)}")


def _analysing(t: torch.Tensor) -> bool:
    # meta or fake tensors: the model is being traced or costed (shapeprof.analyze, torch.export), never
    # differentiated with real data; record the fused kernel it will run. (A plain Tensor is never fake: that
    # check first keeps is_fake, a few microseconds, off every real call.)
    return t.device.type == "meta" or (type(t) not in _PLAIN and is_fake(t))


_PLAIN = (torch.Tensor, nn.Parameter)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"shapeprof: {message}", RuntimeWarning, stacklevel=3)


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


@dataclass(frozen=True)
class _Linear:
    node: fx.Node
    input: fx.Node
    weight: fx.Node | None       # the graph node carrying the weight (None: a module's own, see `module`)
    bias: fx.Node | None
    has_bias: bool
    label: str
    module: nn.Module | None = None
    transposed: bool = False     # the weight is (in, out): addmm(b, x2d, W), HuggingFace's Conv1D
    inner: tuple = ()            # the nodes between `input` and `node` (views, the addmm) the fused call replaces


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


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
        x = _arg(node, 0, "input")
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
                inplace = _arg(node, 1, "inplace", False)
                if not isinstance(inplace, bool):
                    return None
            return _Activation(node, kind, inplace, _arg(node, 0, "input"), label)
    if target in _GELU_FUNCTIONS:
        approximate = _arg(node, 1, "approximate", "none")
        if approximate not in ("none", "tanh"):
            return None
        kind = "gelu" if approximate == "none" else "gelu_tanh"
        label = _GELU_FUNCTIONS[target] + ("(tanh)" if kind == "gelu_tanh" else "")
        return _Activation(node, kind, False, _arg(node, 0, "input", _arg(node, 0, "self")), label)
    return None


def _as_linear(node: fx.Node, gm: fx.GraphModule) -> _Linear | None:
    """The Linear `node` computes, or None if it is not a Linear."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m).forward is not nn.Linear.forward:   # a subclass with its own forward (LoRA ...) is not a Linear
            return None
        return _Linear(node, _arg(node, 0, "input"), None, None, m.bias is not None, "Linear", m)
    if node.op == "call_function" and node.target in (F.linear, aten.linear.default):
        bias = _arg(node, 2, "bias")
        label = "F.linear" if node.target is F.linear else "aten.linear"
        return _Linear(node, _arg(node, 0, "input"), _arg(node, 1, "weight"), bias, bias is not None, label)
    return _as_addmm(node, gm)


_ADDMM = (torch.addmm, aten.addmm.default)
_VIEWS = {"view", "reshape"}


def _as_addmm(node: fx.Node, gm: fx.GraphModule) -> _Linear | None:
    """A Linear written at the level of the ops it runs: ``addmm(b, x.view(-1, K), W).view(..., N)`` with W a
    (K, N) parameter, as HuggingFace's Conv1D (GPT-2 and its family) computes it; found by what it runs, whatever
    module produced it. `node` is the final view back to (..., N)."""
    if node.op != "call_method" or node.target not in _VIEWS or not node.args:
        return None
    mm = node.args[0]
    if not (isinstance(mm, fx.Node) and mm.op == "call_function" and mm.target in _ADDMM and len(mm.args) >= 3
            and not mm.kwargs and len(mm.users) == 1):
        return None
    bias, flat, weight = mm.args[:3]
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (bias, weight)):
        return None
    if not (isinstance(flat, fx.Node) and flat.op == "call_method" and flat.target in _VIEWS and flat.args
            and isinstance(flat.args[0], fx.Node) and len(flat.users) == 1):
        return None
    w, b = lookup_attr(gm, weight.target), lookup_attr(gm, bias.target)
    if not (isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(b, torch.Tensor) and b.dim() == 1
            and b.shape[0] == w.shape[1]):
        return None
    return _Linear(node, flat.args[0], weight, bias, True, f"addmm ({weight.target})", transposed=True,
                   inner=(flat, mm))


def lookup_attr(gm: fx.GraphModule, target: str):
    try:
        return operator.attrgetter(target)(gm)
    except AttributeError:
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
            lin = _as_linear(node, gm)
            computed = _computed_activation(lin.node) if lin is not None else None
            if computed is None:
                return
            act = _Activation(computed.nodes[-1], computed.kind, False, lin.node,
                              f"{_ACT_LABEL[computed.kind]} written as {len(computed.nodes)} elementwise ops",
                              nodes=computed.nodes)
        if not isinstance(act.input, fx.Node):
            return
        lin = _as_linear(act.input, gm)
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
                f"{ctx.device_spec.display_name} (under {self.min_saving:.0%}): the Linear is bound by "
                f"{_bound_by(ctx, before_records)}, not by its output")))
            return
        self._replace(gm, lin, act, kernel, after_users, fused_record, ctx.pack_weights)
        result.applied.append(Match(
            where, f"{lin.label} + {act.label} -> {_kernel_name(kernel, act.kind)}", saved, seconds))

    # ------------------------------------------------------------------ preconditions
    def _plan(self, gm, ctx: RewriteContext, lin: _Linear, act: _Activation):
        """(kernel, users to redirect, fused op record, unfused records), or the reason to skip."""
        for m, what in ((lin.module, "Linear"), (act.module, "activation")):
            if m is not None and _has_hooks(m):
                return f"the {what} module has hooks, which a fused kernel would bypass"
        if _global_hooks():
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
        kernel = _choose_kernel(device, x, w, b, act.kind)
        if kernel.startswith("skip:"):
            return kernel[len("skip:"):].strip()
        fused = _fused_record(kernel, x, w, b, out, act.kind)
        linear_nodes = (*lin.inner, lin.node)
        act_nodes = act.nodes or (act.node,)
        captured = [ctx.captured(n) for n in (*linear_nodes, *act_nodes)]
        if any(c is None for c in captured) or not any(c.records for c in captured[:len(linear_nodes)]) or \
                not any(c.records for c in captured[len(linear_nodes):]):
            return "no captured ATen ops for the Linear or the activation, so no cost to compare"
        before = tuple(r for c in captured for r in c.records)
        return kernel, others, fused, before

    # ------------------------------------------------------------------ the replacement
    def _replace(self, gm, lin: _Linear, act: _Activation, kernel: str, after_users, record: OpRecord,
                 pack: str = "frozen"):
        fused = replace_linear(gm, lin, act.node, act.kind, kernel, record, pack)
        for user in after_users:   # an in-place activation: later readers of the Linear's output saw it activated
            user.replace_input_with(lin.node, fused)
        act.node.replace_all_uses_with(fused)
        for n in reversed(act.nodes or (act.node,)):   # users first
            gm.graph.erase_node(n)
        for n in (lin.node, *reversed(lin.inner)):
            gm.graph.erase_node(n)


def replace_linear(gm: fx.GraphModule, lin: _Linear, last: fx.Node, activation: str, kernel: str,
                   record: OpRecord, pack: str = "frozen") -> fx.Node:
    """A `fused_linear_activation` node placed before `last` (the node it replaces the output of), with the
    Linear's module path and source line and a capture record of the one op it runs. The caller rewires users."""
    graph = gm.graph
    with graph.inserting_before(last):
        if lin.module is not None:
            weight = graph.get_attr(f"{lin.node.target}.weight")
            bias = graph.get_attr(f"{lin.node.target}.bias") if lin.has_bias else None
        else:
            weight, bias = lin.weight, lin.bias
        kwargs = {"activation": activation, "kernel": kernel, "pack": pack}
        if lin.transposed:
            kwargs["transposed"] = True
        call = graph.call_function(fused_linear_activation, (lin.input, weight, bias), kwargs)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in lin.node.meta:
            call.meta[key] = lin.node.meta[key]
    cl = lin.node.meta.get(CAPTURE_KEY)
    cl_last = last.meta.get(CAPTURE_KEY)
    call.meta[CAPTURE_KEY] = CapturedNode(call, cl.module_path if cl else "", cl.module_type if cl else "",
                                          (record,), cl_last.output if cl_last else None)
    return call


def linear_metas(gm, ctx: RewriteContext, lin: _Linear, output: fx.Node):
    """(input, weight, bias, output metas, weight device) of a Linear whose result `output` is, or why not."""
    x = ctx.output(lin.input)
    out = ctx.output(output)
    if x is None or out is None:
        return "no captured shape for the Linear's input or output"
    if lin.module is not None:
        weight, bias = lin.module.weight, lin.module.bias
        if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
            return "the Linear's weight is not initialised"
        if type(weight) not in (torch.Tensor, nn.Parameter) or weight.layout != torch.strided:
            return f"the Linear's weight is a {type(weight).__name__} ({weight.layout}), not a dense tensor"
        w, b, device = TensorMeta.of(weight), (TensorMeta.of(bias) if bias is not None else None), weight.device
    else:
        if not isinstance(lin.weight, fx.Node) or (lin.bias is not None and not isinstance(lin.bias, fx.Node)):
            return "the weight or bias is not a tensor of the graph"
        w = ctx.output(lin.weight)
        b = ctx.output(lin.bias) if lin.bias is not None else None
        if w is None or (lin.bias is not None and b is None):
            return "no captured shape for the weight or bias"
        if lin.transposed:   # (in, out) as stored: describe it as the (out, in) weight a Linear takes
            w = TensorMeta((w.shape[1], w.shape[0]), w.dtype, (1, w.shape[1]))
        device = _device_of(gm, lin.weight) or ctx.device
    if len(w.shape) != 2 or (b is not None and len(b.shape) != 1) or not x.shape:
        return f"unusual shapes: input {list(x.shape)}, weight {list(w.shape)}"
    if device is None:
        return "the device of the weight is unknown"
    return x, w, b, out, torch.device(device)


# ---------------------------------------------------------------------------------------------- lowering

def _choose_kernel(device: torch.device, x: TensorMeta, w: TensorMeta, b: TensorMeta | None, kind: str) -> str:
    """'mkldnn' or 'cublaslt', or 'skip: <reason>'."""
    dtypes = {x.dtype, w.dtype} | ({b.dtype} if b is not None else set())
    if len(dtypes) > 1:
        return f"skip: mixed dtypes {sorted(str(d) for d in dtypes)}"
    dtype = x.dtype
    if device.type == "cpu":
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return "skip: this PyTorch build has no oneDNN (mkldnn), so no fused CPU kernel"
        if not torch.backends.mkldnn.enabled:
            return "skip: oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
        supported = {torch.float32}
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            supported.add(torch.bfloat16)
        if torch.ops.mkldnn._is_mkldnn_fp16_supported():
            supported.add(torch.float16)
        if dtype not in supported:
            return (f"skip: oneDNN's fused linear on this CPU takes "
                    f"{', '.join(sorted(str(d).removeprefix('torch.') for d in supported))}, not "
                    f"{str(dtype).removeprefix('torch.')}")
        return "mkldnn"
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "skip: the cuBLASLt epilogue path is not verified on ROCm"
        if kind == "gelu":
            return ("skip: the cuBLASLt GELU epilogue is the tanh approximation, and this model uses the exact "
                    "(erf) GELU")
        if kind == "silu":
            return "skip: cuBLASLt has no SiLU epilogue that PyTorch exposes"
        if b is None:
            return "skip: the cuBLASLt epilogue path (_addmm_activation) needs a bias"
        if dtype == torch.float32 and kind == "gelu_tanh":
            # measured (torch 2.11, H200): fp32 runs the GELU epilogue as a second cuBLASLt kernel
            return "skip: in fp32, cuBLASLt applies the GELU epilogue in a separate kernel, which is no fusion"
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"skip: no cuBLASLt epilogue for {str(dtype).removeprefix('torch.')}"
        return "cublaslt"
    return f"skip: no fused Linear + activation kernel on {device.type}"


def _fused_record(kernel: str, x: TensorMeta, w: TensorMeta, b: TensorMeta | None, out: TensorMeta,
                  kind: str) -> OpRecord:
    """The ATen op the fused call runs, as a record the cost registry prices."""
    if kernel == "mkldnn":
        attr, algorithm = _MKLDNN_POST_OP[kind]
        return OpRecord(torch.ops.mkldnn._linear_pointwise.default, (x, w, b, attr, [], algorithm), {}, (out,))
    k, n = w.shape[1], w.shape[0]
    rows = x.numel // k
    x2d = TensorMeta((rows, k), x.dtype, (k, 1))
    wt = TensorMeta((k, n), w.dtype, (1, k))
    out2d = TensorMeta((rows, n), out.dtype, (n, 1))
    return OpRecord(aten._addmm_activation.default, (b, x2d, wt), {"use_gelu": kind == "gelu_tanh"}, (out2d,))


def _bound_by(ctx: RewriteContext, records) -> str:
    """'reading its weights (12.6 MB)' or 'its FLOPs': what holds the unfused Linear up on the roofline."""
    spec = ctx.device_spec
    main = max(records, key=lambda r: ctx.seconds([r]))
    rec = ctx.as_dtype(main)
    t = op_time(cost_of(rec), compute_dtype(rec.input_metas(), rec.outputs), spec)
    if t.bound == "compute":
        return "its FLOPs"
    weights = max((m for m in rec.input_metas() if len(m.shape) == 2), key=lambda m: m.nbytes, default=None)
    return f"reading its weights ({weights.nbytes / 1e6:.3g} MB)" if weights is not None else "memory traffic"


def _kernel_name(kernel: str, kind: str) -> str:
    if kernel == "mkldnn":
        attr, algorithm = _MKLDNN_POST_OP[kind]
        return f"mkldnn._linear_pointwise({attr}{', ' + algorithm if algorithm else ''})"
    return f"aten._addmm_activation({'use_gelu' if kind == 'gelu_tanh' else 'relu'}) [cuBLASLt epilogue]"


def _device_of(gm: fx.GraphModule, node: fx.Node) -> torch.device | None:
    if node.op == "get_attr":
        try:
            value = operator.attrgetter(node.target)(gm)
        except AttributeError:
            return None
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m
    return any(bool(getattr(_m, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))
