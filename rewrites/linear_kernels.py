"""Linear kernels: a Linear found in a graph (whatever wrote it) and the fused oneDNN / cuBLASLt call it becomes.

Shared by the rewrites that lower a Linear: `fuse_linear_activation` (with an activation after it) and
`prepack_linear` (without). `as_linear` finds a Linear by what it computes (``nn.Linear``, ``F.linear``,
``aten.linear``, or HuggingFace's Conv1D ``addmm`` against an (in, out) weight); `choose_kernel` picks the
kernel for the weight's device and dtype; `replace_linear` puts the `fused_linear_activation` call in its place.
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

from shapeprof.capture import CapturedNode
from shapeprof.records import OpRecord, TensorMeta

from .base import CAPTURE_KEY, RewriteContext
from .packed_weights import packed_weight

aten = torch.ops.aten

KERNELS = {"mkldnn": "cpu", "cublaslt": "cuda"}       # kernel -> the device type it runs on
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")   # gelu is the exact (erf) GELU
# oneDNN post-op (attr, algorithm) per activation
_MKLDNN_POST_OP = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"),
                   "silu": ("swish", ""), "none": ("none", "")}
ACT_LABELS = {"relu": "ReLU", "gelu": "GELU", "gelu_tanh": "GELU(tanh)", "silu": "SiLU", "none": "no activation"}


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
            f"shapeprof: this Linear + {ACT_LABELS.get(activation, activation)} was fused for "
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
class Linear:
    node: fx.Node
    input: fx.Node
    weight: fx.Node | None       # the graph node carrying the weight (None: a module's own, see `module`)
    bias: fx.Node | None
    has_bias: bool
    label: str
    module: nn.Module | None = None
    transposed: bool = False     # the weight is (in, out): addmm(b, x2d, W), HuggingFace's Conv1D
    inner: tuple = ()            # the nodes between `input` and `node` (views, the addmm) the fused call replaces


def call_arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def as_linear(node: fx.Node, gm: fx.GraphModule) -> Linear | None:
    """The Linear `node` computes, or None if it is not a Linear."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m).forward is not nn.Linear.forward:   # a subclass with its own forward (LoRA ...) is not a Linear
            return None
        return Linear(node, call_arg(node, 0, "input"), None, None, m.bias is not None, "Linear", m)
    if node.op == "call_function" and node.target in (F.linear, aten.linear.default):
        bias = call_arg(node, 2, "bias")
        label = "F.linear" if node.target is F.linear else "aten.linear"
        return Linear(node, call_arg(node, 0, "input"), call_arg(node, 1, "weight"), bias, bias is not None, label)
    return _as_addmm(node, gm)


_ADDMM = (torch.addmm, aten.addmm.default)
_VIEWS = {"view", "reshape"}


def _as_addmm(node: fx.Node, gm: fx.GraphModule) -> Linear | None:
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
    return Linear(node, flat.args[0], weight, bias, True, f"addmm ({weight.target})", transposed=True,
                   inner=(flat, mm))


def lookup_attr(gm: fx.GraphModule, target: str):
    try:
        return operator.attrgetter(target)(gm)
    except AttributeError:
        return None


def replace_linear(gm: fx.GraphModule, lin: Linear, last: fx.Node, activation: str, kernel: str,
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


def linear_metas(gm, ctx: RewriteContext, lin: Linear, output: fx.Node):
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

def choose_kernel(device: torch.device, x: TensorMeta, w: TensorMeta, b: TensorMeta | None, kind: str) -> str:
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


def fused_record(kernel: str, x: TensorMeta, w: TensorMeta, b: TensorMeta | None, out: TensorMeta,
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


def kernel_name(kernel: str, kind: str) -> str:
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


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def global_hooks() -> bool:
    from torch.nn.modules import module as _m
    return any(bool(getattr(_m, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))
