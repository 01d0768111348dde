"""A CPU Linear with no activation after it -> oneDNN's linear on a weight packed once, not on every call.

Only a weight that cannot change behind PyTorch's back is packed (optimize's ``pack_weights``: by default one that
does not require grad, checked at every call); any other runs the plain Linear, as if unrewritten.

`fuse_linear_activation` already runs its CPU matches through oneDNN on packed weights; this pass does the same
for the Linears it leaves (a projection before a residual add, an MLP's second Linear, an LM head). It removes no
memory traffic the roofline can see, so it reports 0 bytes and 0 s saved: its gain is the per-call reorder of the
weight into oneDNN's blocked layout, which a roofline of main-memory bytes does not model. Measured on a 2-core
x86 VM, fp32, 768x3072: 1.24 -> 0.98 ms at 64 rows, a tie at 512; at one row MKL's matrix-vector path is faster,
so one row runs the plain Linear at call time, and a graph whose example has one row is left alone.

Skipped with the reason: not on the CPU, a dtype oneDNN lacks here, training or inputs that require grad, hooks.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .base import Match, Rewrite, RewriteContext, RewriteResult, Skip, register
from .linear_kernels import (as_linear, choose_kernel, fused_record, global_hooks, has_hooks, linear_metas,
                             lookup_attr, replace_linear)


@register
class PrepackLinear(Rewrite):
    """CPU Linear -> oneDNN linear with its weight packed once (repacked when the parameter changes)."""

    name = "prepack_linear"
    description = ("CPU Linear (no activation after it) -> oneDNN linear on a weight packed once, not reordered on "
                   "every call (repacked if the parameter changes; costs one more copy of the weight)")

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> RewriteResult:
        result = RewriteResult(self.name)
        for node in list(gm.graph.nodes):
            lin = as_linear(node, gm)
            if lin is None:
                continue
            source = ctx.source(node)
            where = ctx.where(node) + (f" ({source})" if source else "")
            plan = self._plan(gm, ctx, lin)
            if isinstance(plan, str):
                result.skipped.append(Skip(where, plan))
                continue
            call = replace_linear(gm, lin, lin.node, "none", "mkldnn", plan, ctx.pack_weights)
            lin.node.replace_all_uses_with(call)
            gm.graph.erase_node(lin.node)
            when = {"frozen": " while it does not require grad", "always": ""}[ctx.pack_weights]
            result.applied.append(Match(where, f"{lin.label} -> mkldnn._linear_pointwise(none) on a packed weight"
                                               f"{when}"))
        return result

    def _plan(self, gm, ctx: RewriteContext, lin):
        """The record of the oneDNN call that replaces the Linear, or the reason to leave it."""
        if lin.module is not None and has_hooks(lin.module):
            return "the Linear module has hooks, which the oneDNN call would bypass"
        if global_hooks():
            return "global module hooks are registered (torch.nn.modules.module.register_module_forward_*)"
        if (lin.module.training if lin.module is not None else ctx.training) or ctx.inputs_require_grad:
            return "training: the oneDNN linear has no backward (call model.eval() before optimizing)"
        if ctx.pack_weights == "never":
            return "pack_weights='never'"
        weight = lin.module.weight if lin.module is not None else \
            lookup_attr(gm, lin.weight.target) if isinstance(lin.weight, fx.Node) and lin.weight.op == "get_attr" \
            else None
        if ctx.pack_weights == "frozen" and isinstance(weight, torch.Tensor) and weight.requires_grad:
            return ("the weight requires grad, and only frozen weights are packed (a trained one could change "
                    "unseen): model.requires_grad_(False) for inference, or pack_weights='always'")
        metas = linear_metas(gm, ctx, lin, lin.node)
        if isinstance(metas, str):
            return metas
        x, w, b, out, device = metas
        if device.type != "cpu":
            return f"packing is for oneDNN on the CPU; this weight is on {device.type}"
        if math.prod(x.shape[:-1]) == 1:
            return "one row: MKL's matrix-vector path beats oneDNN's linear there"
        kernel = choose_kernel(device, x, w, b, "none")
        if kernel.startswith("skip:"):
            return kernel[len("skip:"):].strip()
        return fused_record("mkldnn", x, w, b, out, "none")
