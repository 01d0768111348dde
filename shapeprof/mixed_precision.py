"""Autocast on meta: the casts ``torch.autocast("cuda", dtype=torch.bfloat16)`` makes, made where it makes them.

Mixed-precision training keeps fp32 master weights and runs the forward under autocast: each matmul-like op
casts its floating inputs to the low-precision dtype (a weight once per forward: autocast caches the cast of a
leaf that requires grad), ops that need range run in fp32, and everything else runs in the dtype its inputs
have (an fp32 and a bf16 input promote to fp32). Backward follows the same casts in reverse (the gradient of a
cast is a cast back), so the weights' gradients arrive in fp32 for an fp32 optimizer step.

torch's autocast dispatch key applies only to tensors of its device type, never to meta tensors, so a step
priced on meta applies autocast's CUDA policy itself, at the torch-function level, from the op lists below
(torch's ``autocast_mode.cpp``, CUDA: lower_precision_fp, fp32, fp32_set_opt_dtype and promote). What each op
then runs is the ATen op the GPU runs on those dtypes; the casts are recorded (``aten._to_copy``) and priced
as the memory passes they are.

    >>> import torch
    >>> policy = AutocastPolicy(torch.bfloat16)
    >>> w = torch.empty(4, 8, device="meta", requires_grad=True)
    >>> x = torch.empty(2, 8, device="meta")
    >>> args, _ = policy.cast(torch.nn.functional.linear, (x, w), {})
    >>> [a.dtype for a in args], policy.cast(torch.nn.functional.linear, (x, w), {})[0][1] is args[1]
    ([torch.bfloat16, torch.bfloat16], True)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

__all__ = ["AutocastPolicy", "FP32", "FP32_DTYPE_ARGUMENT", "LOWER_PRECISION", "PROMOTE"]

T = torch.Tensor

#: Run in the low-precision dtype: the matmuls and convolutions (and attention, which is matmuls).
LOWER_PRECISION = frozenset({
    F.linear, F.bilinear, torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.mm, T.mm, torch.bmm, T.bmm,
    torch.addmm, T.addmm, torch.addbmm, torch.baddbmm, T.baddbmm, torch.addmv, torch.addr, torch.mv, T.mv,
    torch.einsum, torch.chain_matmul, torch.linalg.multi_dot, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
    F.conv_transpose2d, F.conv_transpose3d, F.prelu, F.scaled_dot_product_attention,
})

#: Run in fp32 (a low-precision input is cast up): ops that need fp32's range or precision.
FP32 = frozenset({
    torch.acos, torch.asin, torch.cosh, torch.erfinv, torch.exp, T.exp, torch.expm1, torch.log, T.log, torch.log10,
    torch.log2, torch.log1p, torch.reciprocal, T.reciprocal, torch.rsqrt, T.rsqrt, torch.sinh, torch.tan, torch.pow,
    T.pow, T.__pow__, F.softplus, F.layer_norm, F.group_norm, torch.norm, T.norm, torch.linalg.vector_norm,
    torch.linalg.matrix_norm, F.cosine_similarity, F.poisson_nll_loss, F.cosine_embedding_loss, F.nll_loss,
    F.hinge_embedding_loss, F.kl_div, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.mse_loss, F.margin_ranking_loss,
    F.multilabel_margin_loss, F.soft_margin_loss, F.triplet_margin_loss, F.multi_margin_loss,
    F.binary_cross_entropy_with_logits, torch.dist, torch.cdist, torch.renorm, torch.logsumexp, T.logsumexp,
    F.cross_entropy,   # (its log_softmax and nll_loss are autocast's; at this level it is one call)
})

#: fp32_set_opt_dtype: run with dtype=float32 when given a low-precision input and no dtype (the kernel reads the
#: input as it is and accumulates and writes fp32: no cast pass of its own).
FP32_DTYPE_ARGUMENT = frozenset({torch.prod, T.prod, torch.cumprod, T.cumprod, torch.cumsum, T.cumsum, torch.sum,
                                 T.sum, torch.softmax, T.softmax, F.softmax, torch.log_softmax, T.log_softmax,
                                 F.log_softmax})

#: Run in the widest floating dtype among the inputs.
PROMOTE = frozenset({torch.cat, torch.stack, torch.addcdiv, T.addcdiv, torch.addcmul, T.addcmul, torch.atan2,
                     torch.cross, torch.dot, torch.tensordot, T.index_put, T.index_put_, T.scatter_add,
                     torch.scatter_add})


class AutocastPolicy:
    """autocast("cuda", dtype)'s casts for one forward: `cast(func, args, kwargs)` gives the arguments as
    autocast would pass them to func. Casts of leaves that require grad (weights) are cached for the forward,
    as autocast caches them."""

    def __init__(self, dtype: torch.dtype) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast prices bf16 or fp16 mixed precision, not {dtype}")
        self.dtype = dtype
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id(leaf) -> (leaf, its cast)

    def cast(self, func: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if func in LOWER_PRECISION:
            return self._map(args, kwargs, lambda t: t.is_floating_point() and t.dtype != torch.float64
                             and t.dtype != self.dtype, self.dtype)
        if func in FP32_DTYPE_ARGUMENT:
            first = next((t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)), None)
            if kwargs.get("dtype") is None and first is not None and first.dtype in (torch.float16, torch.bfloat16):
                return args, {**kwargs, "dtype": torch.float32}
            return args, kwargs
        if func in FP32:
            return self._map(args, kwargs, lambda t: t.dtype in (torch.float16, torch.bfloat16), torch.float32)
        if func in PROMOTE:
            floats = [t.dtype for t in pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if len(set(floats)) > 1:
                widest = max(floats, key=lambda d: (d.itemsize, d == torch.float32))
                return self._map(args, kwargs, lambda t: t.is_floating_point() and t.dtype != widest, widest)
        return args, kwargs

    def _map(self, args, kwargs, needs, dtype):
        def convert(t):
            if not isinstance(t, torch.Tensor) or not needs(t):
                return t
            if t.is_leaf and t.requires_grad:   # a weight: cast once per forward, as autocast's cache does
                hit = self._cache.get(id(t))
                if hit is not None and hit[0] is t and hit[1].dtype == dtype:
                    return hit[1]
                out = t.to(dtype)
                self._cache[id(t)] = (t, out)
                return out
            return t.to(dtype)
        return pytree.tree_map(convert, args), pytree.tree_map(convert, kwargs)

    def clear(self) -> None:
        """Leave the autocast region: the cached casts go (backward keeps those it saved)."""
        self._cache.clear()
