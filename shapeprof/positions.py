"""Which ops of an ATen graph mix positions along the sequence: the question a KV cache lives or dies by.

A cache may compute only the new positions of a sequence when every position's value depends on positions up to
it and nowhere else does one position see another except in causal attention. With the sequence length a symbol T
(`shapeprof.sequence`), an op mixes positions when it reduces, contracts, convolves, pads, concatenates, sorts or
picks along a dimension whose size involves T, whatever views came before (a ``view(B * T, C)`` keeps positions
apart; a mean over that dimension does not). Picking the last position (``x[:, -1]``, ``x[:, [-1]]``) is the one
selection a decoder head makes, and is allowed: the last new position is the last position.

    >>> import torch, torch.fx as fx
    >>> from torch.export import export, Dim
    >>> m = torch.nn.Conv1d(4, 4, 3, padding=1)
    >>> ep = export(m, (torch.randn(2, 4, 8),), dynamic_shapes=({2: Dim.AUTO},))
    >>> gm = ep.module()
    >>> x = [n for n in gm.graph.nodes if n.op == "placeholder"][0]
    >>> t = next(iter(x.meta["val"].shape[2].node.expr.free_symbols))
    >>> conv = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)][0]
    >>> mixing(conv, t)
    'aten.conv1d convolves along the sequence'
"""
from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_symbols

__all__ = ["arg", "is_last_position", "mixing", "size_is"]

aten = torch.ops.aten

INT_MAX = 2 ** 63 - 1

_CONTRACTIONS = {"aten.mm", "aten.bmm", "aten.matmul", "aten.addmm", "aten.baddbmm", "aten.addbmm", "aten.mv",
                 "aten.dot", "aten.vdot", "aten.linear", "aten.addmv", "aten.tensordot", "aten.inner"}
_ALONG_DIM = {"aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax", "aten.cumsum",
              "aten.cumprod", "aten.cummax", "aten.cummin", "aten.logcumsumexp", "aten.sort", "aten.argsort",
              "aten.topk", "aten.kthvalue", "aten.median", "aten.nanmedian", "aten.mode", "aten.flip", "aten.roll",
              "aten.diff", "aten.unique_dim", "aten.unbind", "aten.split", "aten.split_with_sizes", "aten.chunk",
              "aten.tensor_split", "aten.unfold", "aten.cat", "aten.concat", "aten.concatenate", "aten.index_select",
              "aten.gather", "aten.scatter", "aten.scatter_add", "aten.scatter_reduce", "aten.index_add",
              "aten.index_copy", "aten.index_fill", "aten.take_along_dim", "aten.renorm", "aten.narrow_copy",
              "aten.repeat_interleave"}
_POSITIONAL = {"aten.tril", "aten.triu", "aten.diagonal", "aten.diag_embed", "aten.diag", "aten.trace"}
_NORMS = {"aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm", "aten._fused_rms_norm"}
_POOLS = ("pool",)
_PADS = {"aten.constant_pad_nd", "aten.pad", "aten.reflection_pad1d", "aten.reflection_pad2d",
         "aten.reflection_pad3d", "aten.replication_pad1d", "aten.replication_pad2d", "aten.replication_pad3d",
         "aten.circular_pad1d", "aten.circular_pad2d", "aten.circular_pad3d"}


def arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """An OpOverload node's argument by its schema name (positional or keyword, else the schema's default)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.kwargs.get(name, default)
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            if name in node.kwargs:
                return node.kwargs[name]
            return a.default_value if a.has_default_value() else default
    return default


def size_is(size: Any, sym: sympy.Symbol) -> bool:
    """The size is exactly the symbol (T, not 2*T or T + 1)."""
    return isinstance(size, torch.SymInt) and sympy.sympify(size.node.expr) == sym


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else None


def _sized(size: Any, sym) -> bool:
    return not isinstance(size, int) and sym in free_symbols(size)


def _dims(value: torch.Tensor, dim: Any) -> list[int]:
    """A dim argument (an int, a list, None or [] for all) as non-negative dims of `value`."""
    n = value.dim()
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(n))
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return [d % n if n else 0 for d in dims if isinstance(d, int)]


def is_last_position(node: fx.Node, sym: sympy.Symbol) -> bool:
    """``x[:, -1]``, ``x[:, [-1]]`` or ``x[:, -1:]`` along the sequence: the last position only."""
    name = _name(node)
    x = _val(node.args[0]) if node.args else None
    if not isinstance(x, torch.Tensor):
        return False
    if name == "aten.select":
        d = arg(node, "dim") % x.dim()
        return _sized(x.shape[d], sym) and arg(node, "index") == -1
    if name == "aten.slice":
        d = arg(node, "dim", 0) % x.dim()
        end = arg(node, "end")
        return _sized(x.shape[d], sym) and arg(node, "start") == -1 and end in (None, INT_MAX) and \
            arg(node, "step", 1) == 1
    if name == "aten.index":
        indices = arg(node, "indices")
        picked = [d for d, i in enumerate(indices) if i is not None]
        if len(picked) != 1 or not _sized(x.shape[picked[0]], sym):
            return False
        value = _constant(indices[picked[0]])
        if value is not None and value.is_meta:
            # a model on meta (an analysis of a decode step, never a drop-in: those are verified on real data)
            # has no value for `x[:, [-1]]`'s index: one index along the sequence is taken to be the last, the
            # only one a causal decoder picks
            return value.numel() == 1
        return value is not None and value.numel() >= 1 and bool((value == -1).all())
    return False


def _constant(node: Any) -> torch.Tensor | None:
    """The value of a constant index tensor (a lifted constant, through lift_fresh_copy), if it is one."""
    while isinstance(node, fx.Node) and node.op == "call_function" and _name(node) in ("aten.lift_fresh_copy",
                                                                                         "aten.clone", "aten._to_copy"):
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            value = operator.attrgetter(node.target)(node.graph.owning_module)
        except AttributeError:
            return None
        return value if isinstance(value, torch.Tensor) else None
    return None


def _name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return str(packet) if packet is not None else str(getattr(target, "__name__", target))


def mixing(node: fx.Node, sym: sympy.Symbol) -> str | None:
    """Why `node` mixes positions along dimensions whose size involves `sym`; None when it keeps them apart.

    Only ATen ops are judged; an op this does not know is taken as keeping positions apart (a KV cache still
    checks its result against the original's step by step)."""
    if node.op != "call_function" or not hasattr(node.target, "_schema"):
        return None
    name = _name(node)
    x = _val(node.args[0]) if node.args else None
    inputs = [v for v in (_val(a) for a in node.all_input_nodes) if isinstance(v, torch.Tensor)]
    if not any(_sized(s, sym) for v in inputs for s in v.shape):
        return None
    if name in ("aten.select", "aten.slice", "aten.index") and is_last_position(node, sym):
        return None
    if name in _CONTRACTIONS:
        a = _val(node.args[1] if name in ("aten.addmm", "aten.baddbmm", "aten.addbmm", "aten.addmv")
                 else node.args[0])
        if isinstance(a, torch.Tensor) and a.dim() and _sized(a.shape[-1], sym):
            return f"{name} sums over the sequence (outside an attention recognised as causal)"
        return None
    if name == "aten.einsum":
        return _einsum_mixes(node, sym)
    if name in _NORMS:
        n = len(arg(node, "normalized_shape"))
        return f"{name} normalizes over the sequence" if any(_sized(s, sym) for s in x.shape[x.dim() - n:]) \
            else None
    if name in ("aten.group_norm", "aten.instance_norm") or (name == "aten.batch_norm" and arg(node, "training")):
        return f"{name} normalizes over the sequence" if any(_sized(s, sym) for s in x.shape[1:] if x.dim() > 2) \
            else None
    if "conv" in name:
        return _conv_mixes(node, name, x, sym)
    if any(p in name for p in _POOLS) and isinstance(x, torch.Tensor):
        return f"{name} pools along the sequence" if any(_sized(s, sym) for s in x.shape[2:]) else None
    if name in _PADS:
        pad = list(arg(node, "pad") or [])
        padded = [x.dim() - 1 - i // 2 for i, p in enumerate(pad) if p != 0]
        return f"{name} pads the sequence" if any(_sized(x.shape[d], sym) for d in padded) else None
    if name in _POSITIONAL:
        return f"{name} depends on where a value sits in the sequence"
    tags = getattr(node.target, "tags", ())
    if torch.Tag.reduction in tags or name in _ALONG_DIM:
        dim = arg(node, "dim", arg(node, "dims"))
        if name in ("aten.cat", "aten.concat", "aten.concatenate"):
            x = next((v for v in inputs if v.dim()), x)
        if name == "aten.repeat_interleave" and dim is None:
            dim = None if x is None else list(range(x.dim()))
        if isinstance(x, torch.Tensor) and any(_sized(x.shape[d], sym) for d in _dims(x, dim) if d < x.dim()):
            return f"{name} runs along the sequence"
        return None
    if name in ("aten.select", "aten.slice", "aten.index", "aten.index_put", "aten.masked_select", "aten.take"):
        return _pick_mixes(node, name, x, sym)
    return None


def _pick_mixes(node: fx.Node, name: str, x: Any, sym) -> str | None:
    if not isinstance(x, torch.Tensor):
        return None
    if name == "aten.select":
        d = arg(node, "dim") % x.dim()
        return f"{name} picks one position of the sequence" if _sized(x.shape[d], sym) else None
    if name == "aten.slice":
        d = arg(node, "dim", 0) % x.dim()
        if not _sized(x.shape[d], sym):
            return None
        start, end, step = arg(node, "start"), arg(node, "end"), arg(node, "step", 1)
        whole = start in (None, 0) and step == 1 and (end in (None, INT_MAX) or
                                                       (isinstance(end, fx.Node) and size_is(_val(end), sym)
                                                        and size_is(x.shape[d], sym)))
        return None if whole else f"{name} takes part of the sequence"
    if name == "aten.index":
        indices = arg(node, "indices")
        return f"{name} picks positions of the sequence" if any(
            i is not None and d < x.dim() and _sized(x.shape[d], sym) for d, i in enumerate(indices)) else None
    return f"{name} picks values across the sequence"


def _conv_mixes(node: fx.Node, name: str, x: Any, sym) -> str | None:
    if not isinstance(x, torch.Tensor) or not any(_sized(s, sym) for s in x.shape[2:]):
        return None
    w = _val(arg(node, "weight"))
    stride = arg(node, "stride", [1])
    if isinstance(w, torch.Tensor) and all(s == 1 for s in w.shape[2:]) and all(s == 1 for s in (stride or [1])):
        return None   # a 1x1 convolution is a Linear per position
    return f"{name} convolves along the sequence"


def _einsum_mixes(node: fx.Node, sym) -> str | None:
    equation = arg(node, "equation").replace(" ", "")
    operands = [_val(t) for t in arg(node, "tensors")]
    lhs, _, out = equation.partition("->")
    for letters, v in zip(lhs.split(","), operands):
        if not isinstance(v, torch.Tensor) or "." in letters:
            continue
        for letter, size in zip(letters, v.shape):
            if letter not in out and _sized(size, sym):
                return "aten.einsum sums over the sequence (outside an attention recognised as causal)"
    return None
