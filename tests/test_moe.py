"""Mixture of experts: recognition, active/total parameters, expected experts read, grouped-matmul costs."""
import importlib
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import shapeprof
from shapeprof.costs import cost_of
from shapeprof.moe import (MoEInfo, MoELayer, all_experts_batch, expected_distinct_experts, moe_decode_bytes,
                           recognise, routing_top_k)
from shapeprof.records import OpRecord, OpRecorder, TensorMeta
from shapeprof.report import Report

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

GROUPED = {"transformers.grouped_mm_fallback", "aten._grouped_mm"}


def _meta(shape, dtype=torch.bfloat16):
    stride, acc = [], 1
    for size in reversed(shape):
        stride.insert(0, acc)
        acc *= size
    return TensorMeta(tuple(shape), dtype, tuple(stride))


def _mixtral_8x7b():
    cfg = transformers.MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                     num_local_experts=8, num_experts_per_tok=2)
    with torch.device("meta"):
        return transformers.MixtralForCausalLM(cfg)


def _tiny_cfg(**kw):
    return transformers.MixtralConfig(**{**dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                num_local_experts=4, num_experts_per_tok=2), **kw})


# ------------------------------------------------------------------ expected distinct experts


@pytest.mark.parametrize("experts,top_k,tokens", [(8, 2, 1), (8, 2, 3), (8, 2, 8), (64, 6, 5), (16, 1, 20)])
def test_expected_distinct_experts_matches_monte_carlo(experts, top_k, tokens):
    rng = np.random.default_rng(1234)
    trials = 20_000
    # each token picks top_k distinct experts uniformly: the top_k smallest of E uniform keys
    keys = rng.random((trials, tokens, experts))
    picks = np.argsort(keys, axis=-1)[..., :top_k]                      # (trials, tokens, k)
    read = np.zeros((trials, experts), dtype=bool)
    np.put_along_axis(read, picks.reshape(trials, -1), True, axis=1)
    measured = read.sum(axis=1).mean()
    assert expected_distinct_experts(experts, top_k, tokens) == pytest.approx(measured, rel=0.01)


def test_expected_distinct_experts_edges_and_all_experts_batch():
    assert expected_distinct_experts(8, 2, 0) == 0.0
    assert expected_distinct_experts(8, 2, 1) == 2.0               # one token reads exactly its k experts
    assert expected_distinct_experts(8, 8, 1) == 8.0
    # 8 * (1 - 0.75**9) = 7.399 < 7.5 <= 8 * (1 - 0.75**10) = 7.549
    assert all_experts_batch(8, 2) == 10
    assert all_experts_batch(8, 8) == 1
    with pytest.raises(ValueError, match="top_k"):
        expected_distinct_experts(8, 9, 1)


def test_decode_bytes_e8_k2_by_hand():
    # 1000 dense params, one MoE layer of 8 experts of 100 params each, 2 bytes per weight
    layer = MoELayer("mlp", 8, 2, "balanced", expert_params=100, bytes_per_expert=200)
    info = MoEInfo((layer,), total_params=1800, dense_params=1000, active_params=1200, dtype_bytes=2)
    dense = 1000 * 2
    assert moe_decode_bytes(info, 1) == dense + 2 * 200                              # 2 experts
    assert moe_decode_bytes(info, 8) == dense + round(8 * (1 - 0.75 ** 8) * 200)    # 7.199 experts: 1440
    assert moe_decode_bytes(info, 8) == 3440
    assert moe_decode_bytes(info, 64) == dense + round(8 * (1 - 0.75 ** 64) * 200)  # ~8 experts: 1600
    assert moe_decode_bytes(info, 64) == 3600
    assert info.decode_bytes(1, dtype_bytes=4) == 1000 * 4 + 2 * 100 * 4


# ------------------------------------------------------------------ Mixtral-8x7B parameters


def test_mixtral_8x7b_total_and_active_params_match_published():
    info = recognise(_mixtral_8x7b(), dtype_bytes=2)
    assert len(info.layers) == 32 and {(la.experts, la.top_k) for la in info.layers} == {(8, 2)}
    assert info.layers[0].path == "model.layers.0.mlp"
    assert info.layers[0].expert_params == 3 * 4096 * 14336                # w1, w3 (fused gate_up) and w2
    assert info.layers[0].bytes_per_expert == 3 * 4096 * 14336 * 2
    assert info.total_params == pytest.approx(46.7e9, rel=0.01)             # Mistral: 46.7B total
    assert info.active_params == pytest.approx(12.9e9, rel=0.01)            # Mistral: 12.9B active per token
    # decode at batch 1 reads the dense weights and 2 of 8 experts per layer, in bf16
    assert info.decode_bytes(1) == info.dense_params * 2 + 32 * 2 * info.layers[0].bytes_per_expert
    assert info.all_experts_batch() == 10


# ------------------------------------------------------------------ tiny Mixtral on meta


def test_tiny_mixtral_matmul_flops_per_token_are_active_params_plus_attention():
    cfg = _tiny_cfg()
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(cfg)
    batch, seq = 1, 16
    rep = shapeprof.analyze(model, torch.zeros(batch, seq, dtype=torch.long, device="meta"))
    assert not any(o.op in GROUPED for o in rep.coverage.ops)
    h, inter, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    # active matmul parameters per token: q, o (h x h), k, v (h x kv), the router (h x E), k experts of
    # gate, up, down (3 x h x inter) per layer; the lm_head (h x vocab). The embedding is a gather.
    per_layer = 2 * h * h + 2 * h * kv + h * e + k * 3 * h * inter
    active_matmul = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size
    # causal attention: Q K^T and P V over the seq*(seq+1)/2 kept scores, per head
    attention = cfg.num_hidden_layers * cfg.num_attention_heads * 2 * (2 * hd) * seq * (seq + 1) // 2
    matmul_ops = GROUPED | {"aten.linear", "aten.mm", "aten.addmm", "aten.bmm", "aten.matmul",
                            "aten.scaled_dot_product_attention"}
    flops = sum(a.flops for n in rep.nodes for a in n.aten if a.op in matmul_ops)
    assert flops == batch * seq * 2 * active_matmul + batch * attention
    assert rep.moe is not None and rep.moe.layers[0].tokens == batch * seq
    assert rep.moe.layers[0].expected_experts_read == pytest.approx(expected_distinct_experts(e, k, 16))
    assert any("routing assumed balanced" in note for note in rep.notes)
    back = Report.from_json(rep.to_json())
    assert back.moe == rep.moe


def test_report_json_without_moe_still_reads():
    rep = shapeprof.analyze(nn.Linear(8, 8), torch.randn(2, 8))
    d = json.loads(rep.to_json())
    assert d["moe"] is None
    del d["moe"]                                   # a file written before the field existed
    assert Report.from_dict(d).moe is None


# ------------------------------------------------------------------ grouped-matmul formulas by hand


def test_grouped_mm_fallback_formulas_by_hand():
    importlib.import_module("transformers.integrations.moe")   # defines the custom ops
    fwd = torch.ops.transformers.grouped_mm_fallback.default
    bwd = torch.ops.transformers.grouped_mm_fallback_backward.default
    x, w, offs = _meta((6, 16)), _meta((4, 16, 32)), _meta((4,), torch.int32)
    out = _meta((6, 32))
    c = cost_of(OpRecord(fwd, (x, w, offs), {}, (out,)))
    assert c.covered and c.matmul
    assert c.flops == 6144                          # 2 * 6*16*32
    # unknown top_k: min(E, S) = 4 experts read, all of w: 6*16*2 + 4*16*32*2 + 4*4 read, 6*32*2 written
    assert (c.bytes_read, c.bytes_written) == (192 + 4096 + 16, 384)
    with routing_top_k(MoEInfo((MoELayer("m", 4, 2, "balanced", 512, 1024),), 0, 0, 0, 2)):
        c2 = cost_of(OpRecord(fwd, (x, w, offs), {}, (out,)))
    # top_k 2: 6 rows are 3 tokens, 4 * (1 - 0.5**3) = 3.5 experts of 1024 bytes each
    assert c2.flops == 6144 and c2.bytes_read == 192 + 3584 + 16
    gi, gw = _meta((6, 16)), _meta((4, 16, 32))
    cb = cost_of(OpRecord(bwd, (x, w, offs, out), {}, (gi, gw)))
    assert cb.flops == 12288                        # two matmuls: 2 * 2 * 6*16*32
    assert (cb.bytes_read, cb.bytes_written) == (192 + 4096 + 16 + 384, 192 + 4096)
    # one row: one expert of the four is read
    c1 = cost_of(OpRecord(fwd, (_meta((1, 16)), w, offs), {}, (_meta((1, 32)),)))
    assert c1.flops == 1024 and c1.bytes_read == 32 + 1024 + 16


def test_aten_grouped_mm_formula_by_hand():
    a = torch.zeros(6, 16, dtype=torch.bfloat16, device="meta")
    w = torch.zeros(4, 16, 32, dtype=torch.bfloat16, device="meta")
    offs = torch.zeros(4, dtype=torch.int32, device="meta")
    with OpRecorder() as rec:
        torch._grouped_mm(a, w, offs=offs)
    r = [r for r in rec.records if r.name == "aten._grouped_mm"][0]
    c = cost_of(r)
    assert c.covered and c.matmul and c.flops == 6144                           # 2 * 6*16*32
    assert c.bytes_read == 192 + 4096 + 16 and c.bytes_written == 384
    b3 = torch.zeros(4, 8, 16, dtype=torch.bfloat16, device="meta")
    with OpRecorder() as rec:
        torch._grouped_mm(b3, w)                                                # 3D x 3D: a bmm
    c = cost_of([r for r in rec.records if r.name == "aten._grouped_mm"][0])
    assert c.flops == 2 * 4 * 8 * 16 * 32


def test_real_cpu_mixtral_grouped_flops_equal_per_expert_count_from_router():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: chosen.append(o[2].detach().clone()))
             for layer in model.model.layers]
    try:
        with torch.no_grad(), OpRecorder() as rec:
            model(ids)
    finally:
        for hk in hooks:
            hk.remove()
    grouped = [r for r in rec.records if r.name in GROUPED]
    assert grouped, sorted({r.name for r in rec.records})
    assert all(cost_of(r).covered for r in grouped)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    expected = 0
    for idx in chosen:                              # (tokens, k) expert indices the router really picked
        counts = torch.bincount(idx.flatten(), minlength=cfg.num_local_experts)
        for n in counts.tolist():                   # per expert: gate_up (n x h x 2*inter) + down (n x inter x h)
            expected += 2 * n * h * 2 * inter + 2 * n * inter * h
    assert len(chosen) == cfg.num_hidden_layers
    assert sum(cost_of(r).flops for r in grouped) == expected
    # the meta analysis, which knows nothing of the split, counts the same FLOPs
    rep = shapeprof.analyze(model, ids)
    assert sum(a.flops for n in rep.nodes for a in n.aten if a.op in GROUPED) == expected


# ------------------------------------------------------------------ recognition


def test_qwen2_moe_recognised_with_shared_expert():
    cfg = transformers.Qwen2MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256, num_experts=4, num_experts_per_tok=2)
    with torch.device("meta"):
        model = transformers.Qwen2MoeForCausalLM(cfg)
    info = recognise(model)
    assert [la.path for la in info.layers] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    la = info.layers[0]
    assert (la.experts, la.top_k, la.expert_params) == (4, 2, 3 * 64 * 32)
    assert la.shared_params == 3 * 64 * 48 + 64                    # shared MLP + its 1-output gate
    assert la.router_params == 4 * 64
    total = sum(p.numel() for p in model.parameters())
    assert info.total_params == total
    assert info.active_params == total - 2 * (4 - 2) * 3 * 64 * 32    # all but the 2 unpicked experts per layer


class _LoopMoE(nn.Module):
    """A hand-written top-k MoE: a router, a loop over experts, each on the tokens that picked it."""

    def __init__(self, dim=32, hidden=64, experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                                     for _ in range(experts))

    def forward(self, x):                                          # x (T, dim)
        weights, picks = self.gate(x).softmax(-1).topk(self.top_k, dim=-1)   # (T, k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(picks == e)                  # data-dependent: who picked e
            out[token] += weights[token, slot, None] * expert(x[token])
        return out


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 32)
        self.moe = _LoopMoE()

    def forward(self, x):
        return self.moe(self.inp(x))


def test_hand_written_moe_recognised():
    net = _Net()
    info = recognise(net)
    expert = 32 * 64 + 64 + 64 * 32 + 32
    assert (info.layers[0].path, info.layers[0].experts, info.layers[0].top_k) == ("moe", 4, 2)
    assert info.layers[0].expert_params == expert
    assert info.dense_params == 32 * 32 + 32 + 32 * 4
    assert info.active_params == info.dense_params + 2 * expert
    # its loop over experts is priced on meta by shapeprof.expert_loop: see test_routing.py


def test_block_without_top_k_is_a_named_error():
    block = _LoopMoE()
    del block.top_k
    with pytest.raises(ValueError, match="MoE block '' .*no top_k"):
        recognise(block)


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_a_decode_steps_weight_bytes_count_the_experts_its_tokens_read(batch):
    # PhaseInfo.weight_bytes of a Mixtral decode step: what a dense model's would be (every parameter, the
    # embedding table's rows only), less the routed experts, plus the experts `batch` tokens are expected to pick
    cfg = _tiny_cfg()
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(cfg)
    rep = shapeprof.analyze(model, shapeprof.Decode(batch=batch, context=16), dtype=torch.bfloat16)
    e, k, layers = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    expert = 3 * cfg.hidden_size * cfg.intermediate_size * 2        # w1, w3, w2 in bf16
    every = sum(p.numel() for p in model.parameters()) * 2
    embedding_rows = cfg.vocab_size * cfg.hidden_size * 2 - batch * cfg.hidden_size * 2   # a step reads its rows
    expected = e * (1 - (1 - k / e) ** batch)
    assert rep.phase.weight_bytes == every - embedding_rows - layers * e * expert + round(layers * expected * expert)


def test_fp32_mixtral_decode_captures_on_meta_as_bf16_does():
    # transformers calls torch._grouped_mm on meta whatever the dtype, and its meta kernel accepts bf16 only: the
    # recorder runs it on bf16 stand-ins for the shape, so the default fp32 config is analysed too
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(_tiny_cfg())
    fp32 = shapeprof.analyze(model, shapeprof.Decode(batch=8, context=16))
    bf16 = shapeprof.analyze(model, shapeprof.Decode(batch=8, context=16), dtype=torch.bfloat16)
    assert fp32.total.flops == bf16.total.flops
    assert fp32.phase.weight_bytes == 2 * bf16.phase.weight_bytes
    grouped = [a for n in fp32.nodes for a in n.aten if a.op in GROUPED]
    assert grouped and all(a.covered for a in grouped)


@pytest.mark.parametrize("batch,all_read", [(1, False), (16, True)])
def test_a_memory_bound_moe_decode_step_gets_a_finding_on_its_expert_reads(batch, all_read):
    cfg = _tiny_cfg()   # 4 experts, top-2: every expert is read from batch 3 on
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(cfg)
    rep = shapeprof.analyze(model, shapeprof.Decode(batch=batch, context=16), dtype=torch.bfloat16)
    finding = rep.findings[0]
    assert finding.pattern == "moe expert reads" and finding.intensity < finding.ridge
    read = 4 * (1 - 0.5 ** batch)
    assert f"reads {read:.2f} of 4 experts per MoE layer" in finding.why
    if all_read:
        assert finding.suggestion.startswith("every expert is read already")
    else:
        assert "from batch 3 every expert is read anyway" in finding.suggestion
    assert finding.share == pytest.approx(sum(n.share for n in rep.nodes if ".mlp" in n.module_path))
    # a plain forward (no decode phase) gets no such finding
    plain = shapeprof.analyze(model, torch.zeros(1, 16, dtype=torch.long, device="meta"))
    assert all(f.pattern != "moe expert reads" for f in plain.findings)
    assert Report.from_json(rep.to_json()).findings == rep.findings
