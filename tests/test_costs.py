"""Tests for shapeprof/costs.py: exact FLOP counts by hand, FlopCounterMode side by side, bytes, rules."""
import itertools

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import shapeprof
from torch.utils.flop_counter import FlopCounterMode

from shapeprof import costs
from shapeprof.costs import (FLOP_CONVENTION, CostFormulaError, OpCost, cost_of, has_formula, register_cost,
                             registered_ops)
from shapeprof.records import OpRecord, OpRecorder, TensorMeta

aten = torch.ops.aten
F32, F16, I64 = 4, 2, 8  # bytes per element


def meta(*shape, dtype=torch.float32) -> TensorMeta:
    """A contiguous TensorMeta."""
    stride, n = [], 1
    for size in reversed(shape):
        stride.insert(0, n)
        n *= size
    return TensorMeta(tuple(shape), dtype, tuple(stride))


def cost(op, *args, out, **kwargs) -> OpCost:
    """The cost of a hand-made record of `op`."""
    outputs = tuple(out) if isinstance(out, (list, tuple)) else (out,)
    return cost_of(OpRecord(op, args, kwargs, outputs))


def t(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def record(fn) -> list[OpRecord]:
    with OpRecorder() as rec:
        fn()
    return rec.records


def only(records: list[OpRecord], name: str) -> OpRecord:
    found = [r for r in records if r.name == name]
    assert len(found) == 1, [r.name for r in records]
    return found[0]


def export_records(model: nn.Module, args: tuple) -> list[OpRecord]:
    """One record per ATen node of the torch.export graph (the ATen-level capture path)."""
    ep = torch.export.export(model, args, strict=False)

    def val(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a
    return [OpRecord.of(n.target, fx.node.map_arg(n.args, val), fx.node.map_arg(n.kwargs, val), n.meta["val"])
            for n in ep.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]


# --------------------------------------------------------------------------------------------
# Side by side with FlopCounterMode, on meta tensors, for every family it counts


def _sdpa_inputs(hq=4, hk=4, lq=8, lk=8, e=16, ev=16):
    return t(2, hq, lq, e), t(2, hk, lk, e), t(2, hk, lk, ev)


_q, _k, _v = _sdpa_inputs(lq=8, lk=12, ev=24)
_gq, _gk, _gv = _sdpa_inputs(hq=8, hk=2)
# the low-level flash/efficient kernels take (B, L, H, E); FlopCounterMode reads their dense inputs as
# (B, H, L, E), so the two agree only when H == Lq == Lk: these inputs make the layouts indistinguishable
_bl = t(2, 4, 4, 16, dtype=torch.float16)

SIDE_BY_SIDE = {
    "mm": lambda: t(8, 16) @ t(16, 32),
    "addmm": lambda: torch.addmm(t(32), t(8, 16), t(16, 32)),
    "bmm": lambda: torch.bmm(t(4, 8, 16), t(4, 16, 32)),
    "baddbmm": lambda: torch.baddbmm(t(4, 8, 32), t(4, 8, 16), t(4, 16, 32)),
    "linear_3d": lambda: F.linear(t(2, 5, 16), t(32, 16), t(32)),
    "matmul_broadcast": lambda: t(3, 1, 8, 16) @ t(4, 16, 32),
    "conv1d": lambda: F.conv1d(t(2, 4, 20), t(6, 4, 3), t(6), stride=2, padding=1),
    "conv2d_groups": lambda: F.conv2d(t(2, 4, 10, 12), t(8, 2, 3, 3), groups=2, padding=1, stride=(2, 1)),
    "conv2d_unbatched": lambda: F.conv2d(t(4, 10, 12), t(8, 4, 3, 3), dilation=2),
    "conv3d": lambda: F.conv3d(t(1, 2, 5, 6, 7), t(3, 2, 2, 3, 3)),
    "conv_transpose1d": lambda: F.conv_transpose1d(t(2, 4, 9), t(4, 3, 3), stride=2),
    "conv_transpose2d_groups": lambda: F.conv_transpose2d(t(2, 4, 5, 5), t(4, 2, 3, 3), groups=2, stride=2,
                                                          output_padding=1),
    # On CPU, FlopCounterMode counts sdpa as 0: the CPU kernel _scaled_dot_product_flash_attention_for_cpu
    # has no formula there (pytorch #195460). On meta, sdpa runs the math path, whose two bmm it counts;
    # OpRecorder records the sdpa call whole, so this compares our sdpa formula with those bmm.
    "sdpa": lambda: F.scaled_dot_product_attention(_q, _k, _v),
    "sdpa_gqa": lambda: F.scaled_dot_product_attention(_gq, _gk, _gv, enable_gqa=True),
    "sdpa_mask": lambda: F.scaled_dot_product_attention(_q, _k, _v, attn_mask=t(8, 12)),
    # the fused kernels, called directly (meta kernels exist): FlopCounterMode's sdpa formula
    "sdpa_flash": lambda: aten._scaled_dot_product_flash_attention(_q, _k, _v),
    "sdpa_efficient": lambda: aten._scaled_dot_product_efficient_attention(_q, _k, _v, None, False),
    "sdpa_cudnn": lambda: aten._scaled_dot_product_cudnn_attention(_q, _k, _v, None, False),
    "flash_attention_forward": lambda: aten._flash_attention_forward(_bl, _bl, _bl, None, None, 4, 4, 0.0,
                                                                     False, False),
    "efficient_attention_forward": lambda: aten._efficient_attention_forward(_bl, _bl, _bl, None, None, None,
                                                                             4, 4, 0.0, 0),
}


@pytest.mark.parametrize("name", SIDE_BY_SIDE)
def test_equals_flop_counter_mode(name):
    with FlopCounterMode(display=False) as counter, OpRecorder() as rec:
        SIDE_BY_SIDE[name]()
    ours = sum(cost_of(r).flops for r in rec.records)
    assert counter.get_total_flops() > 0
    assert ours == counter.get_total_flops()


# --------------------------------------------------------------------------------------------
# Matmul class, exact by hand


def test_mm_flops_and_bytes():
    c = cost_of(only(record(lambda: t(8, 16) @ t(16, 32)), "aten.mm"))
    assert c.flops == 2 * 8 * 16 * 32  # M*K*N multiply-adds x 2
    assert c.bytes_read == (8 * 16 + 16 * 32) * F32
    assert c.bytes_written == 8 * 32 * F32
    assert c.bytes == c.bytes_read + c.bytes_written
    assert c.covered and c.matmul


def test_addmm_reads_bias_but_does_not_count_its_add():
    c = cost(aten.addmm.default, meta(32), meta(8, 16), meta(16, 32), out=meta(8, 32))
    assert c.flops == 2 * 8 * 16 * 32  # the bias add is left out, as FlopCounterMode does
    assert c.bytes_read == (32 + 8 * 16 + 16 * 32) * F32


def test_linear_equals_its_decomposition():
    x, w, b = meta(2, 5, 16), meta(32, 16), meta(32)
    c = cost(aten.linear.default, x, w, b, out=meta(2, 5, 32))
    assert c.flops == 2 * (2 * 5) * 16 * 32  # (B*T) rows x K x N
    assert c.bytes_read == (2 * 5 * 16 + 32 * 16 + 32) * F32
    dispatched = record(lambda: F.linear(t(2, 5, 16), t(32, 16), t(32)))  # t, view, addmm, view
    assert sum(cost_of(r).flops for r in dispatched) == c.flops
    assert sum(cost_of(r).bytes for r in dispatched) == c.bytes  # the views and t move nothing


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="PyTorch built without oneDNN")
def test_mkldnn_linear_pointwise_is_a_linear_plus_its_post_op_without_the_intermediate():
    x, w, b, out = meta(2, 5, 16), meta(32, 16), meta(32), meta(2, 5, 32)
    fused = torch.ops.mkldnn._linear_pointwise.default
    c = cost(fused, x, w, b, "relu", [], "", out=out)
    assert c.flops == 2 * (2 * 5) * 16 * 32 + 2 * 5 * 32   # (B*T) x K x N multiply-adds, + 1 per output (relu)
    assert c.bytes_read == (2 * 5 * 16 + 32 * 16 + 32) * F32 and c.bytes_written == 2 * 5 * 32 * F32
    assert c.covered and c.matmul
    assert cost(fused, x, w, None, "none", [], "", out=out).flops == 2 * (2 * 5) * 16 * 32   # a plain linear
    # unfused, the (2, 5, 32) output is written by the linear and read back and written again by the relu
    unfused = cost(aten.linear.default, x, w, b, out=out).bytes + cost(aten.relu.default, out, out=out).bytes
    assert unfused - c.bytes == 2 * (2 * 5 * 32) * F32
    recorded = only(record(lambda: fused(t(2, 5, 16), t(32, 16), t(32), "gelu", [], "none")),
                    "mkldnn._linear_pointwise")
    assert cost_of(recorded) == cost(fused, x, w, b, "gelu", [], "none", out=out)


def test_matmul_shapes():
    assert cost(aten.matmul.default, meta(16), meta(16), out=meta()).flops == 2 * 16  # dot: K
    assert cost(aten.matmul.default, meta(3, 8, 16), meta(16), out=meta(3, 8)).flops == 2 * 3 * 8 * 16
    assert cost(aten.matmul.default, meta(16), meta(3, 16, 4), out=meta(3, 4)).flops == 2 * 3 * 16 * 4
    c = cost(aten.matmul.default, meta(3, 1, 8, 16), meta(4, 16, 32), out=meta(3, 4, 8, 32))
    assert c.flops == 2 * (3 * 4) * 8 * 16 * 32  # broadcast batch 3x4


def test_vector_products_are_not_tensor_core_ops():
    c = cost(aten.mv.default, meta(8, 16), meta(16), out=meta(8))
    assert c.flops == 2 * 8 * 16 and not c.matmul
    assert cost(aten.dot.default, meta(16), meta(16), out=meta()).flops == 2 * 16
    assert cost(aten.outer.default, meta(8), meta(16), out=meta(8, 16)).flops == 8 * 16  # products only
    assert cost(aten.addmv.default, meta(8), meta(8, 16), meta(16), out=meta(8)).flops == 2 * 8 * 16


def test_bmm_family():
    b1, b2 = meta(4, 8, 16), meta(4, 16, 32)
    assert cost(aten.bmm.default, b1, b2, out=meta(4, 8, 32)).flops == 2 * 4 * 8 * 16 * 32  # B*M*K*N
    assert cost(aten.addbmm.default, meta(8, 32), b1, b2, out=meta(8, 32)).flops == 2 * 4 * 8 * 16 * 32


@pytest.mark.parametrize("equation, shapes, out, flops", [
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], (2, 3, 5), 2 * 2 * 3 * 4 * 5),  # 2 x b*i*j*k
    ("bhqd,bhkd->bhqk", [(2, 4, 8, 16), (2, 4, 10, 16)], (2, 4, 8, 10), 2 * 2 * 4 * 8 * 10 * 16),
    ("...ij,...jk", [(6, 3, 4), (4, 5)], (6, 3, 5), 2 * 6 * 3 * 4 * 5),  # ellipsis, implicit output
    ("i,i", [(7,), (7,)], (), 2 * 7),  # implicit output of a dot: the scalar
    # three operands, left to right: (ij,jk -> ik) then (ik,kl -> il)
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], (2, 5), 2 * 2 * 3 * 4 + 2 * 2 * 4 * 5),
    ("ij->j", [(3, 4)], (4,), 3 * 4),  # one operand summing i away: 1 add per element
    ("ij->ji", [(3, 4)], (4, 3), 0),  # a permutation
])
def test_einsum(equation, shapes, out, flops):
    c = cost(aten.einsum.default, equation, [meta(*s) for s in shapes], out=meta(*out))
    assert c.flops == flops and c.matmul


def test_einsum_equals_its_bmm_decomposition():
    x, y = t(2, 4, 8, 16), t(2, 4, 10, 16)
    records = record(lambda: torch.einsum("bhqd,bhkd->bhqk", x, y))
    ours = cost(aten.einsum.default, "bhqd,bhkd->bhqk", [TensorMeta.of(x), TensorMeta.of(y)],
                out=meta(2, 4, 8, 10))
    assert sum(cost_of(r).flops for r in records) == ours.flops == 2 * 2 * 4 * 8 * 10 * 16


# --------------------------------------------------------------------------------------------
# Convolution


def test_conv2d_by_hand():
    # out (2, 8, 5, 12); weight (8, 2, 3, 3) with groups=2; 2 x batch x prod(weight) x out positions
    c = cost(aten.conv2d.default, meta(2, 4, 10, 12), meta(8, 2, 3, 3), None, [2, 1], [1, 1], [1, 1], 2,
             out=meta(2, 8, 5, 12))
    assert c.flops == 2 * 2 * (8 * 2 * 3 * 3) * (5 * 12) and c.matmul


def test_conv_unbatched_input_as_export_keeps_it():
    # conv1d on (C_in, L) = (4, 20): batch 1, weight (6, 4, 3), out (6, 18)
    c = cost(aten.conv1d.default, meta(4, 20), meta(6, 4, 3), out=meta(6, 18))
    assert c.flops == 2 * 1 * (6 * 4 * 3) * 18


def test_conv_transpose_counts_input_positions():
    # input (2, 4, 9), weight (4, 3, 3), stride 2 -> out (2, 3, 19): 2 x batch x prod(weight) x 9 inputs
    c = cost(aten.convolution.default, meta(2, 4, 9), meta(4, 3, 3), None, [2], [0], [1], True, [0], 1,
             out=meta(2, 3, 19))
    assert c.flops == 2 * 2 * (4 * 3 * 3) * 9


# --------------------------------------------------------------------------------------------
# Attention


def _sdpa_cost(q, k, v, *args, out=None, **kwargs):
    out = out or meta(*q.shape[:-1], v.shape[-1])
    return cost(aten.scaled_dot_product_attention.default, q, k, v, *args, out=out, **kwargs)


def test_causal_attention_counts_the_kept_half():
    q, k, v = meta(2, 3, 8, 16), meta(2, 3, 8, 16), meta(2, 3, 8, 16)
    full = _sdpa_cost(q, k, v)
    causal = _sdpa_cost(q, k, v, is_causal=True)
    assert full.flops == 2 * 2 * 3 * (8 * 8) * (16 + 16)  # QK^T and PV over all 64 scores
    assert causal.flops == 2 * 2 * 3 * (8 * 9 // 2) * (16 + 16)  # L(L+1)/2 = 36 scores kept
    assert causal.bytes == full.bytes == 4 * 2 * 3 * 8 * 16 * F32  # q, k, v read, out written


def test_causal_binds_positional_arguments():
    q = meta(1, 1, 8, 4)
    # (query, key, value, attn_mask, dropout_p, is_causal) positionally, as a Python call may pass them
    assert _sdpa_cost(q, q, q, None, 0.0, True).flops == _sdpa_cost(q, q, q, is_causal=True).flops


def test_causal_mask_is_top_left_when_lq_differs_from_lk():
    # PyTorch's is_causal is tril aligned top-left: query row i keeps keys j <= i
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 10, 8)
    mask = torch.ones(4, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, k, is_causal=True),
                               F.scaled_dot_product_attention(q, k, k, attn_mask=mask))
    c = _sdpa_cost(meta(1, 1, 4, 8), meta(1, 1, 10, 8), meta(1, 1, 10, 8), is_causal=True)
    assert c.flops == 2 * 1 * 1 * (1 + 2 + 3 + 4) * (8 + 8)
    # Lq > Lk: rows past Lk keep every key: 1 + 2 + 3 + 4 + 4 + 4
    c = _sdpa_cost(meta(1, 1, 6, 8), meta(1, 1, 4, 8), meta(1, 1, 4, 8), is_causal=True)
    assert c.flops == 2 * 18 * (8 + 8)


def test_causal_on_the_recorded_call():
    q = t(2, 4, 8, 16)
    rec = only(record(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)),
               "aten.scaled_dot_product_attention")
    assert cost_of(rec).flops == 2 * 2 * 4 * 36 * (16 + 16)


def test_gqa_flops_follow_query_heads_bytes_the_real_kv():
    q, kv = meta(1, 8, 6, 16, dtype=torch.float16), meta(1, 2, 6, 16, dtype=torch.float16)
    c = _sdpa_cost(q, kv, kv, enable_gqa=True)
    assert c.flops == 2 * 1 * 8 * (6 * 6) * (16 + 16)  # 8 query heads
    # q, and k and v with their 2 heads (not repeated to 8); the same kv object passed twice is read once
    assert c.bytes_read == (8 * 6 * 16 + 2 * 6 * 16) * F16
    c = _sdpa_cost(q, kv, meta(1, 2, 6, 16, dtype=torch.float16), enable_gqa=True)
    assert c.bytes_read == (8 * 6 * 16 + 2 * 2 * 6 * 16) * F16


def test_explicit_mask_full_flops_and_broadcast_mask_read_once():
    q, k, v = (torch.empty(2, 4, 8, 16, device="meta") for _ in range(3))
    mask = torch.ones(8, 8, dtype=torch.bool, device="meta").tril().expand(2, 4, 8, 8)  # stride (0, 0, 8, 1)
    rec = only(record(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
               "aten.scaled_dot_product_attention")
    c = cost_of(rec)
    assert c.flops == 2 * 2 * 4 * (8 * 8) * (16 + 16)  # a mask gives no discount: every score is computed
    assert c.bytes_read == 3 * (2 * 4 * 8 * 16) * F32 + 8 * 8  # q, k, v and the 8x8 bool mask once
    # the same tensor passed as q, k and v is read once
    rec = only(record(lambda: F.scaled_dot_product_attention(q, q, q)), "aten.scaled_dot_product_attention")
    assert cost_of(rec).bytes_read == (2 * 4 * 8 * 16) * F32
    assert c.bytes_written == 2 * 4 * 8 * 16 * F32  # no score matrix


def test_flash_kernels_align_causal_bottom_right():
    q, k = meta(1, 1, 4, 8, dtype=torch.float16), meta(1, 1, 10, 8, dtype=torch.float16)
    c = cost(aten._scaled_dot_product_flash_attention.default, q, k, k, 0.0, True,
             out=[meta(1, 1, 4, 8, dtype=torch.float16)])
    assert c.flops == 2 * (7 + 8 + 9 + 10) * (8 + 8)  # row i keeps j <= i + (10 - 4)
    # (B, L, H, E) layout, causal with a window of 2 keys back: rows keep 1, 2, 3, 3, 3, 3, 3, 3
    x = meta(1, 8, 2, 8, dtype=torch.float16)
    c = cost(aten._flash_attention_forward.default, x, x, x, None, None, 8, 8, 0.0, True, False,
             window_size_left=2, out=[x])
    assert c.flops == 2 * 1 * 2 * 21 * (8 + 8)


def test_efficient_attention_mask_types():
    x = meta(1, 6, 2, 8, dtype=torch.float16)  # (B, L, H, E)
    args = (x, x, x, None, None, None, 6, 6, 0.0)
    assert cost(aten._efficient_attention_forward.default, *args, 0, out=[x]).flops == 2 * 2 * 36 * 16
    assert cost(aten._efficient_attention_forward.default, *args, 1, out=[x]).flops == 2 * 2 * 21 * 16


def test_kept_scores_matches_brute_force():
    for lq, lk in itertools.product(range(7), range(7)):
        for hi in [None, -2, 0, 1, 3]:
            for lo in [None] + ([hi - 2, hi] if hi is not None else []):
                brute = sum(1 for i in range(lq) for j in range(lk)
                            if (lo is None or j >= i + lo) and (hi is None or j <= i + hi))
                assert costs._kept_scores(lq, lk, lo, hi) == brute, (lq, lk, lo, hi)


# --------------------------------------------------------------------------------------------
# Bytes: gathers, views, broadcasts, in-place, out=


def test_embedding_reads_only_gathered_rows():
    c = cost(aten.embedding.default, meta(1000, 64), meta(2, 5, dtype=torch.int64), out=meta(2, 5, 64))
    assert c.flops == 0
    assert c.bytes_read == 10 * I64 + 10 * 64 * F32  # indices + 10 rows, not the 1000-row table
    assert c.bytes_written == 10 * 64 * F32


def test_embedding_bag_sums_gathered_rows():
    indices, offsets = meta(12, dtype=torch.int64), meta(3, dtype=torch.int64)
    bookkeeping = [meta(12, dtype=torch.int64), meta(3, dtype=torch.int64), meta(3, dtype=torch.int64)]
    c = cost(aten._embedding_bag.default, meta(1000, 64), indices, offsets, out=[meta(3, 64), *bookkeeping])
    assert c.flops == 12 * 64  # one add per gathered element
    assert c.bytes_read == (12 + 3) * I64 + 12 * 64 * F32


def test_index_select_and_gather_read_what_they_gather():
    c = cost(aten.index_select.default, meta(100, 64), 0, meta(10, dtype=torch.int64), out=meta(10, 64))
    assert (c.flops, c.bytes_read, c.bytes_written) == (0, 10 * I64 + 10 * 64 * F32, 10 * 64 * F32)
    c = cost(aten.gather.default, meta(100, 64), 1, meta(100, 2, dtype=torch.int64), out=meta(100, 2))
    assert c.bytes_read == 200 * I64 + 200 * F32


def test_views_move_nothing():
    x = t(4, 6, 8)
    records = record(lambda: (x.view(24, 8), x.transpose(0, 1), x.permute(2, 0, 1), x.unsqueeze(0), x[1:3],
                              x[0], x.expand(2, 4, 6, 8), x.split(2), x.detach(), aten.alias(x),
                              x.as_strided((2, 2), (1, 1)), x.squeeze()))
    assert records
    for r in records:
        assert cost_of(r) == OpCost(0, 0, 0, covered=True), r.name
    assert cost(aten._unsafe_view.default, meta(4, 6, 8), [24, 8], out=meta(24, 8)) == OpCost(0, 0, 0)
    assert cost(aten.lift_fresh.default, meta(3), out=meta(3)) == OpCost(0, 0, 0)


def test_broadcast_operand_read_once():
    x, b = t(64, 32), t(32)
    c = cost_of(only(record(lambda: x + b.expand(64, 32)), "aten.add"))
    assert c.flops == 64 * 32  # pointwise: 1 per output element
    assert c.bytes_read == 64 * 32 * F32 + 32 * F32  # the stride-0 dim of the expanded bias counts once
    assert c.bytes_written == 64 * 32 * F32


def test_in_place_and_out_variants():
    x, y, out = t(8, 8), t(8, 8), t(8, 8)
    records = record(lambda: (x.add_(y), x.relu_(), torch.add(x, y, out=out)))
    add_, relu_, add_out = (cost_of(r) for r in records)
    assert add_ == OpCost(64, 2 * 64 * F32, 64 * F32)  # reads x and y, writes x
    assert relu_ == OpCost(64, 64 * F32, 64 * F32)
    assert add_out == OpCost(64, 2 * 64 * F32, 64 * F32)  # out= is written, not read


def test_in_place_op_without_formula_uses_its_functional_one():
    mask = meta(8, 8, dtype=torch.bool)
    c = cost(aten.masked_fill_.Scalar, meta(8, 8), mask, 0.0, out=meta(8, 8))
    assert c.covered and c.flops == 64  # as masked_fill (pointwise)
    c = cost(aten.addmm_.default, meta(8, 32), meta(8, 16), meta(16, 32), out=meta(8, 32))
    assert c.flops == 2 * 8 * 16 * 32 and c.matmul


def test_kv_cache_writes_only_the_new_entries():
    cache, new = t(2, 4, 16, 8), t(2, 4, 1, 8)
    copy = only(record(lambda: cache[:, :, 5:6].copy_(new)), "aten.copy_")
    assert cost_of(copy) == OpCost(0, 2 * 4 * 8 * F32, 2 * 4 * 8 * F32)  # not the 16-slot cache
    # index_put_ of 3 rows of a (16, 4, 8) cache
    c = cost(aten.index_put_.default, meta(16, 4, 8), [meta(3, dtype=torch.int64)], meta(3, 4, 8), False,
             out=meta(16, 4, 8))
    assert c == OpCost(0, 3 * I64 + 3 * 4 * 8 * F32, 3 * 4 * 8 * F32)
    # the functional form copies the whole cache
    c = cost(aten.index_put.default, meta(16, 4, 8), [meta(3, dtype=torch.int64)], meta(3, 4, 8), True,
             out=meta(16, 4, 8))
    assert c == OpCost(3 * 4 * 8, (16 * 4 * 8 + 3 * 4 * 8) * F32 + 3 * I64, 16 * 4 * 8 * F32)


def test_scatter_add_reads_one_src_element_per_index():
    c = cost(aten.scatter_add.default, meta(4, 8), 1, meta(4, 2, dtype=torch.int64), meta(4, 8), out=meta(4, 8))
    assert c.flops == 4 * 2  # one add per index entry
    assert c.bytes_read == 4 * 8 * F32 + 4 * 2 * I64 + 4 * 2 * F32  # self, index, the src elements used


@pytest.mark.parametrize("shape, stride, new_shape", [
    ((4, 6), (6, 1), (24,)),  # contiguous
    ((4, 6), (1, 4), (24,)),  # transposed: flattening needs a copy
    ((4, 6), (1, 4), (4, 2, 3)),  # transposed, splitting a dim: a view
    ((2, 3, 4), (12, 1, 3), (6, 4)),  # last two dims transposed: merging the first two still views
    ((2, 3, 4), (12, 1, 3), (2, 12)),
    ((5, 1, 4), (4, 100, 1), (20,)),  # a size-1 dim's stride does not matter
    ((3, 4), (0, 1), (12,)),  # expanded
])
def test_reshape_is_a_view_exactly_when_torch_can_view(shape, stride, new_shape):
    try:
        torch.empty_strided(shape, stride, device="meta").view(new_shape)
        viewable = True
    except RuntimeError:
        viewable = False
    self = TensorMeta(shape, torch.float32, stride)
    c = cost(aten.reshape.default, self, list(new_shape), out=meta(*new_shape))
    assert c == (OpCost(0, 0, 0) if viewable else OpCost(0, self.nbytes, meta(*new_shape).nbytes))


def test_to_and_contiguous_copy_only_when_something_changes():
    x = meta(4, 8)
    assert cost(aten.to.dtype, x, torch.float32, out=x) == OpCost(0, 0, 0)
    half = meta(4, 8, dtype=torch.float16)
    assert cost(aten.to.dtype, x, torch.float16, out=half) == OpCost(0, 32 * F32, 32 * F16)
    assert cost(aten.contiguous.default, x, out=x) == OpCost(0, 0, 0)
    xt = TensorMeta((8, 4), torch.float32, (1, 8))
    assert cost(aten.contiguous.default, xt, out=meta(8, 4)) == OpCost(0, 32 * F32, 32 * F32)


def test_data_movement_and_factories():
    c = cost(aten.cat.default, [meta(2, 8), meta(3, 8)], 0, out=meta(5, 8))
    assert c == OpCost(0, 5 * 8 * F32, 5 * 8 * F32)
    assert cost(aten.clone.default, meta(4, 8), out=meta(4, 8)).flops == 0  # a copy, though tagged pointwise
    assert cost(aten.zeros.default, [3, 4], out=meta(3, 4)) == OpCost(0, 0, 12 * F32)
    assert cost(aten.zeros_like.default, meta(3, 4), out=meta(3, 4)) == OpCost(0, 0, 12 * F32)  # shape only
    assert cost(aten.empty.memory_format, [3, 4], out=meta(3, 4)) == OpCost(0, 0, 0)
    assert cost(aten.fill_.Scalar, meta(3, 4), 1.0, out=meta(3, 4)) == OpCost(0, 0, 12 * F32)  # old values unread
    assert cost(aten._local_scalar_dense.default, meta(), out=[]) == OpCost(0, 0, 0)
    assert cost(aten.sym_size.int, meta(3, 4), 0, out=[]) == OpCost(0, 0, 0)


def test_dropout_training_writes_its_mask():
    x = meta(4, 8)
    assert cost(aten.dropout.default, x, 0.1, False, out=x) == OpCost(0, 0, 0)  # eval: the identity
    c = cost(aten.dropout.default, x, 0.1, True, out=meta(4, 8))
    assert c.flops == 2 * 32  # compare against p, multiply by the scaled mask
    assert c.bytes_written == 32 * F32 + 32  # output + a 1-byte-per-element mask
    c = cost(aten.native_dropout.default, x, 0.1, True, out=[meta(4, 8), meta(4, 8, dtype=torch.bool)])
    assert (c.flops, c.bytes_written) == (2 * 32, 32 * F32 + 32)


# --------------------------------------------------------------------------------------------
# Normalisation, softmax, reductions, pooling


def test_norm_constants():
    x, w, b = meta(4, 10, 32), meta(32), meta(32)
    n = 4 * 10 * 32
    assert cost(aten.layer_norm.default, x, [32], w, b, out=x).flops == n * (5 + 2)  # 5 + weight + bias
    assert cost(aten.native_layer_norm.default, x, [32], None, None, 1e-5,
                out=[x, meta(4, 10, 1), meta(4, 10, 1)]).flops == n * 5
    assert cost(aten.rms_norm.default, x, [32], w, out=x).flops == n * (3 + 1)  # square, sum, scale + weight
    img, c = meta(2, 3, 4, 4), meta(3)
    m = 2 * 3 * 4 * 4
    assert cost(aten.batch_norm.default, img, c, c, c, c, False, 0.1, 1e-5, True, out=img).flops == m * (2 + 2)
    assert cost(aten.batch_norm.default, img, c, c, c, c, True, 0.1, 1e-5, True, out=img).flops == m * (5 + 2)
    assert cost(aten._native_batch_norm_legit_no_training.default, img, None, None, c, c, 0.1, 1e-5,
                out=[img, meta(0), meta(0)]).flops == m * 2
    assert cost(aten.group_norm.default, img, 3, c, c, out=img).flops == m * (5 + 2)


def test_softmax_and_reductions():
    x = meta(4, 10)
    assert cost(aten._softmax.default, x, -1, False, out=x).flops == 5 * 40  # max, sub, exp, sum, div
    assert cost(aten.log_softmax.int, x, -1, out=x).flops == 5 * 40
    assert cost(aten.sum.dim_IntList, x, [1], out=meta(4)).flops == 40
    assert cost(aten.var.correction, x, [1], out=meta(4)).flops == 4 * 40  # mean, sub, square, sum
    assert cost(aten.logsumexp.default, x, [1], out=meta(4)).flops == 4 * 40
    assert cost(aten.max.dim, x, 1, out=[meta(4), meta(4, dtype=torch.int64)]).flops == 40
    assert cost(aten.max.other, x, x, out=x).flops == 40  # elementwise maximum
    assert cost(aten.linalg_vector_norm.default, x, 2, out=meta()).flops == 2 * 40  # square, sum
    assert cost(aten.linalg_vector_norm.default, x, 3, out=meta()).flops == 3 * 40  # abs, pow, sum


def test_pooling_windows():
    # max_pool2d 2x2 on (1, 2, 8, 8): 32 outputs x 4 compares
    assert cost(aten.max_pool2d.default, meta(1, 2, 8, 8), [2, 2], out=meta(1, 2, 4, 4)).flops == 32 * 4
    # a single kernel size means a square window: 3 -> 3x3
    assert cost(aten.avg_pool2d.default, meta(1, 2, 8, 8), [3], [1, 1], out=meta(1, 2, 6, 6)).flops == 72 * 9
    # 1-D as the dispatcher runs it: avg_pool2d with kernel (1, 2)
    assert cost(aten.avg_pool2d.default, meta(2, 8, 1, 8), [1, 2], out=meta(2, 8, 1, 4)).flops == 64 * 2
    # adaptive 5 -> 3: bins [0, 2), [1, 4), [3, 5), widths 2 + 3 + 2 = 7, for each of 2 x 4 channels
    assert cost(aten.adaptive_avg_pool1d.default, meta(2, 4, 5), [3], out=meta(2, 4, 3)).flops == 8 * 7
    # adaptive 2-D, 8 -> 4 divides: every input element in exactly one bin
    assert cost(aten._adaptive_avg_pool2d.default, meta(1, 3, 8, 8), [4, 4], out=meta(1, 3, 4, 4)).flops == 192


def test_ops_the_pointwise_tag_misses():
    x = meta(4, 8)
    assert cost(aten.hardswish.default, x, out=x).flops == 32  # an activation: 1 per output element
    assert cost(aten.__and__.Tensor, x, x, out=x).flops == 32  # `a & b`, as torch.export keeps it
    assert cost(aten.where.ScalarOther, x, x, 0.0, out=x).flops == 32  # untagged overload, tagged packet
    assert cost(aten.glu.default, x, -1, out=meta(4, 4)).flops == 2 * 16  # sigmoid and multiply
    assert cost(aten.diff.default, x, 1, -1, out=meta(4, 7)).flops == 4 * 7  # one subtraction per output
    assert cost(aten.diff.default, x, 2, -1, out=meta(4, 6)).flops == 4 * (7 + 6)  # order 2: 7 then 6 per row


def test_cross_entropy_reads_only_the_picked_log_probabilities():
    logits, target = t(16, 1000), torch.zeros(16, dtype=torch.int64, device="meta")
    records = record(lambda: F.cross_entropy(logits, target))  # _log_softmax, nll_loss_forward
    assert all(cost_of(r).covered for r in records)
    c = cost_of(only(records, "aten.nll_loss_forward"))
    assert c.flops == 16  # one add per target
    assert c.bytes_read == 16 * I64 + 16 * F32  # targets and one log-probability each, not 16 x 1000


def test_upsampling():
    x = meta(1, 3, 4, 4)
    assert cost(aten.upsample_bilinear2d.default, x, [8, 8], False, out=meta(1, 3, 8, 8)).flops == 192 * 2 * 4
    c = cost(aten.upsample_nearest2d.default, x, [8, 8], out=meta(1, 3, 8, 8))  # a gather: data movement
    assert c == OpCost(0, 48 * F32, 192 * F32)


# --------------------------------------------------------------------------------------------
# Both capture levels agree, and cover what small models use


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(50, 32), nn.LayerNorm(32)
        self.qkv, self.proj, self.fc = nn.Linear(32, 96), nn.Linear(32, 32), nn.Linear(32, 64)
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, idx, img):
        x = self.ln(self.emb(idx))  # (B, T, C)
        q, k, v = self.qkv(x).view(2, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 6, 32)
        x = x + self.proj(y)
        x = x + F.gelu(self.fc(x)).view(2, 6, 32, 2).sum(-1)
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)), -1)  # (B, nh, T, T)
        z = torch.einsum("bhqk,bhkd->bhqd", att, v)
        c = F.adaptive_avg_pool2d(F.max_pool2d(F.relu(self.bn(self.conv(img))), 2), 1)  # (B, 8, 1, 1)
        return x.mean() + z.amax() + c.sum()


def test_export_and_dispatch_levels_agree_and_are_covered():
    model = _Block().eval()
    args = (torch.randint(0, 50, (2, 6)), torch.randn(2, 3, 8, 8))
    exported = export_records(model, args)
    with OpRecorder() as rec:
        model(*args)
    for level in (exported, rec.records):
        assert [r.name for r in level if not cost_of(r).covered] == []
    names = {r.name for r in exported}
    assert {"aten.linear", "aten.layer_norm", "aten.scaled_dot_product_attention", "aten.conv2d",
            "aten.einsum", "aten.matmul", "aten.batch_norm"} <= names
    assert sum(cost_of(r).flops for r in exported) == sum(cost_of(r).flops for r in rec.records)


# --------------------------------------------------------------------------------------------
# The registry


@pytest.fixture
def scratch_op(request):
    """A fresh custom op `shapeprof_test::<test name>(Tensor x) -> Tensor`, its formula removed afterwards."""
    lib = torch.library.Library("shapeprof_test", "FRAGMENT")
    name = request.node.name.replace("[", "_").replace("]", "")
    lib.define(f"{name}(Tensor x) -> Tensor")
    packet = getattr(torch.ops.shapeprof_test, name)
    yield packet
    costs._REGISTRY.pop(packet, None)
    costs._RULES.clear()


def test_duplicate_registration_raises_naming_the_op():
    with pytest.raises(ValueError, match="aten.mm"):
        register_cost(aten.mm)(lambda self, mat2, *, output: 0)
    with pytest.raises(ValueError, match="aten.mm"):  # an overload registers its packet
        register_cost(aten.mm.default)(lambda self, mat2, *, output: 0)


def test_registration_rejects_unknown_argument_names(scratch_op):
    with pytest.raises(ValueError, match="wieght"):
        register_cost(scratch_op)(lambda x, wieght=None, *, output: 0)
    assert not has_formula(scratch_op)


def test_custom_formula_gets_schema_names_and_output(scratch_op):
    seen = {}

    @register_cost(scratch_op, matmul=True)
    def _formula(x, *, output):
        seen.update(x=x, output=output)
        return 7

    x = meta(2, 3)
    c = cost(scratch_op.default, x, out=meta(2, 3))
    assert c == OpCost(7, 6 * F32, 6 * F32, covered=True, matmul=True)
    assert seen == {"x": x, "output": (meta(2, 3),)}
    assert has_formula(scratch_op) and str(scratch_op) in registered_ops()


def test_formula_that_raises_names_op_and_shapes(scratch_op):
    @register_cost(scratch_op)
    def _broken(x, *, output):
        return x.shape[0] // 0

    with pytest.raises(CostFormulaError, match=r"shapeprof_test\..*float32\[2, 3\]") as info:
        cost(scratch_op.default, meta(2, 3), out=meta(2, 3))
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_formula_must_return_int_or_opcost(scratch_op):
    register_cost(scratch_op)(lambda x, *, output: 1.5)
    with pytest.raises(CostFormulaError, match="1.5"):
        cost(scratch_op.default, meta(2), out=meta(2))


def test_op_without_formula_is_uncovered_with_default_bytes():
    assert not has_formula(aten._fft_r2c.default)
    c = cost(aten._fft_r2c.default, meta(8, 16), [1], 0, True, out=meta(8, 9, dtype=torch.complex64))
    assert c == OpCost(0, 8 * 16 * F32, 8 * 9 * 8, covered=False, matmul=False)


def test_registry_listing_and_generic_rules():
    names = registered_ops()
    assert names == sorted(names)
    assert {"aten.mm", "aten.convolution", "aten.scaled_dot_product_attention", "aten.embedding"} <= set(names)
    assert has_formula(aten.gelu.default) and "aten.gelu" not in names  # pointwise tag
    assert has_formula(aten.view.default) and has_formula(aten.t)  # views
    assert has_formula(aten.max)


def test_convention_is_stated_in_code_and_docs():
    assert "1 multiply-add = 2 FLOPs" in FLOP_CONVENTION
    assert "0 FLOPs and 0 bytes" in FLOP_CONVENTION
    assert FLOP_CONVENTION in costs.__doc__


def test_weight_norm_costs_three_flops_per_weight_element():
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(16, 16, 5, padding=2, groups=4), dim=2)
    report = shapeprof.analyze(conv, torch.randn(1, 16, 40))
    assert report.coverage.complete
    norm = [a for n in report.nodes for a in n.aten if a.op == "aten._weight_norm_interface" or a.op == "aten._weight_norm"]
    assert norm and norm[0].flops == 3 * 16 * 4 * 5      # v is (16, 16/4, 5)
