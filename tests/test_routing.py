"""MoE routings: measured from a real forward, given by the user, and a loop over experts priced on meta."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import shapeprof
from shapeprof.moe import MoELayer, MoERoutingError, experts_read, recognise
from shapeprof.report import Report
from shapeprof.routing import Routing, measure_routing, rows_per_expert
from test_moe import _Net, _tiny_cfg

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

MATMULS = {"aten.mm", "aten.addmm", "aten.linear", "aten.bmm", "transformers.grouped_mm_fallback", "aten._grouped_mm"}


def _matmul_flops(rep):
    return sum(a.flops for n in rep.nodes for a in n.aten if a.op in MATMULS)


# ------------------------------------------------------------------ measured


def test_measured_tokens_per_expert_equal_a_count_made_from_the_router():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(40, 32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    rng = torch.get_rng_state()
    routing = measure_routing(net, x)
    # the test's own count: the router's top-2 on what reaches the block
    with torch.no_grad():
        picks = net.moe.gate(net.inp(x)).softmax(-1).topk(2, dim=-1).indices
    assert routing.source == "measured"
    assert routing.loads == {"moe": tuple(torch.bincount(picks.flatten(), minlength=4).tolist())}
    assert routing.tokens == {"moe": 40}
    # the user's model as it was: weights, mode, RNG, no hooks left
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and net.moe.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert not net.moe._forward_hooks and not net.moe.gate._forward_hooks


def test_measured_routing_of_hf_mixtral_equals_its_own_router_logits():
    torch.manual_seed(1)
    cfg = _tiny_cfg()
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    routing = measure_routing(model, ids)
    with torch.no_grad():
        logits = model(ids, output_router_logits=True).router_logits   # HF's own record of its routers
    for i, layer_logits in enumerate(logits):
        counts = torch.bincount(layer_logits.topk(cfg.num_experts_per_tok, -1).indices.flatten(),
                                minlength=cfg.num_local_experts)
        assert routing.loads[f"model.layers.{i}.mlp"] == tuple(counts.tolist())
    # analysed under it on meta: the report says so and carries each layer's pick probabilities and imbalance
    with torch.device("meta"):
        meta = transformers.MixtralForCausalLM(cfg)
    rep = shapeprof.analyze(meta, shapeprof.Decode(batch=4, context=16), dtype=torch.bfloat16, routing=routing)
    assert rep.moe.routing == "measured"
    for layer in rep.moe.layers:
        loads = routing.loads[layer.path]
        assert layer.picks == pytest.approx([2 * v / sum(loads) for v in loads])
        assert layer.imbalance == pytest.approx(max(loads) / (sum(loads) / 4))
    assert any("routing measured from a real forward (24 tokens per layer)" in n for n in rep.notes)
    assert Report.from_json(rep.to_json()).moe == rep.moe


def test_measuring_needs_real_weights_and_an_moe_model():
    with torch.device("meta"):
        net = _Net()
    with pytest.raises(ValueError, match=r"parameter 'inp.weight' is on meta") as caught:
        measure_routing(net, torch.zeros(4, 32, device="meta"))
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="Linear has no MoE block"):
        measure_routing(nn.Linear(4, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="routing= is for mixture-of-experts models"):
        shapeprof.analyze(nn.Linear(4, 4), torch.zeros(1, 4), routing=[1, 1])


# ------------------------------------------------------------------ given


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_a_given_routing_sets_the_decode_steps_expert_reads_by_hand(batch):
    cfg = _tiny_cfg()   # 4 experts, top-2, 2 layers
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(cfg)
    balanced = shapeprof.analyze(model, shapeprof.Decode(batch=batch, context=16), dtype=torch.bfloat16)
    rep = shapeprof.analyze(model, shapeprof.Decode(batch=batch, context=16), dtype=torch.bfloat16,
                            routing=Routing.given([2, 1, 1, 0]))
    # pick probabilities 2 x load share: (1, 0.5, 0.5, 0); expected experts read = 1 + 2 (1 - 0.5^b) + 0
    read = 1 + 2 * (1 - 0.5 ** batch)
    balanced_read = 4 * (1 - (1 - 2 / 4) ** batch)
    expert = 3 * cfg.hidden_size * cfg.intermediate_size * 2          # bf16
    layers = cfg.num_hidden_layers
    assert rep.moe.routing == "given" and all(la.routing == "given" for la in rep.moe.layers)
    assert [la.expected_experts_read for la in rep.moe.layers] == pytest.approx([read] * layers)
    assert rep.phase.weight_bytes - balanced.phase.weight_bytes == \
        round(layers * read * expert) - round(layers * balanced_read * expert)
    assert rep.moe.layers[0].imbalance == 2.0
    # FLOPs do not depend on the split
    assert _matmul_flops(rep) == _matmul_flops(balanced)
    assert any("routing given by the user" in n for n in rep.notes)


def test_given_routings_that_cannot_be_are_one_line_errors():
    cfg = _tiny_cfg()
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(cfg)
    decode = shapeprof.Decode(batch=1, context=8)
    cases = [([1, 1, 1], "has 3 loads; the layer has 4 experts"),
             ([3, 1, 0, 0], r"expert 0 has 75.0% of the load, more than 1/top_k = 50.0%"),
             ([0, 0, 0, 0], "positive sum"),
             ({"model.layers.0.mlp": [1, 1, 1, 1]}, "no loads for MoE layer 'model.layers.1.mlp'"),
             ({"model.layers.9.mlp": [1, 1, 1, 1]}, "'model.layers.9.mlp', which is not an MoE layer")]
    for loads, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            shapeprof.analyze(model, decode, routing=loads)
        assert "\n" not in str(caught.value)


# ------------------------------------------------------------------ the formula under a routing


def test_experts_read_under_a_skewed_router_matches_sampling_its_tokens():
    # a router with a strong bias: its tokens' picks give each expert's pick probability; batches of tokens drawn
    # independently from them read, on average, sum_e 1 - (1 - p_e)^b distinct experts
    gen = torch.Generator().manual_seed(3)
    experts, k = 8, 2
    logits = torch.randn(20000, experts, generator=gen) + torch.linspace(2, -2, experts)
    picks = logits.topk(k, -1).indices
    p = torch.bincount(picks.flatten(), minlength=experts).double() / picks.shape[0]
    layer = MoELayer("mlp", experts, k, "measured", 1, 2, picks=tuple(p.tolist()))
    rng = np.random.default_rng(0)
    hit = np.zeros((picks.shape[0], experts), dtype=bool)
    hit[np.arange(picks.shape[0])[:, None], picks.numpy()] = True
    for batch in (1, 3, 16):
        rows = rng.integers(0, picks.shape[0], size=(4000, batch))
        measured = hit[rows].any(axis=1).sum(axis=1).mean()
        assert experts_read(layer, batch) == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("tokens", [1, 2, 5, 16, 33])
@pytest.mark.parametrize("picks", [None, (1.0, 0.5, 0.5, 0.0), (0.9, 0.6, 0.3, 0.2)])
def test_rows_per_expert_sum_to_tokens_times_top_k(tokens, picks):
    layer = MoELayer("mlp", 4, 2, "given" if picks else "balanced", 1, 2, picks=picks)
    rows = rows_per_expert(layer, tokens)
    assert sum(rows) == tokens * 2 and all(0 <= r <= tokens for r in rows)
    expected = picks or (0.5,) * 4
    assert all(abs(r - tokens * p) < 1 for r, p in zip(rows, expected))


# ------------------------------------------------------------------ a loop over experts on meta


def test_a_loop_over_experts_is_priced_on_meta_with_exact_matmul_flops():
    with torch.device("meta"):
        net = _Net()
    tokens = 16
    rep = shapeprof.analyze(net, torch.zeros(tokens, 32, device="meta"))
    # inp (32 x 32), the router (32 x 4) on every token, then tokens x top_k rows through an expert's two Linears
    expected = 2 * tokens * 32 * 32 + 2 * tokens * 32 * 4 + tokens * 2 * (2 * 32 * 64 + 2 * 64 * 32)
    assert _matmul_flops(rep) == expected
    assert rep.moe.routing == "balanced" and rep.moe.layers[0].tokens == tokens
    assert any("loop over experts in 'moe'" in n and "balanced routing" in n for n in rep.notes)
    # under a routing that never picks experts 2 and 3, they are never run: the same FLOPs, two experts' weights
    # fewer read
    skewed = shapeprof.analyze(net, torch.zeros(tokens, 32, device="meta"), routing=[1, 1, 0, 0])
    assert _matmul_flops(skewed) == expected
    linears = [a for n in skewed.nodes if n.name == "moe" for a in n.aten if a.op == "aten.addmm"]
    assert len(linears) == 2 * 2    # two experts x two Linears
    assert sum(a.flops for a in linears) == tokens * 2 * (2 * 32 * 64 + 2 * 64 * 32)


def test_the_loop_stand_in_replaces_the_forward_of_the_shadow_only():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(8, 32)
    want = net(x)
    shapeprof.analyze(net, torch.zeros(8, 32, device="meta"))
    assert "forward" not in vars(net.moe)
    assert torch.equal(net(x), want)


class _BankLoopMoE(nn.Module):
    """A loop over a bank of stacked expert weights: no per-expert module to run on a fixed split."""

    def __init__(self, dim=32, experts=4):
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.Module()
        self.experts.weight = nn.Parameter(torch.randn(experts, dim, dim))
        self.experts.num_experts = experts

    def forward(self, x):
        _, picks = self.gate(x).topk(self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e in range(self.experts.num_experts):
            token, _ = torch.where(picks == e)
            out[token] += x[token] @ self.experts.weight[e]
        return out


def test_a_loop_over_a_weight_bank_is_still_a_named_error():
    with torch.device("meta"):
        block = _BankLoopMoE()
    assert recognise(block).layers[0].experts == 4
    with pytest.raises(MoERoutingError, match="MoE block '' on meta") as caught:
        shapeprof.analyze(block, torch.zeros(8, 32, device="meta"))
    assert "\n" not in str(caught.value)


def test_measured_routing_of_hf_qwen2_moe_equals_its_own_router_logits():
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256, num_experts=4, num_experts_per_tok=2)
    model = transformers.Qwen2MoeForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    routing = measure_routing(model, ids)
    with torch.no_grad():
        logits = model(ids, output_router_logits=True).router_logits
    assert [routing.loads[f"model.layers.{i}.mlp"] for i in range(2)] == \
        [tuple(torch.bincount(lg.topk(2, -1).indices.flatten(), minlength=4).tolist()) for lg in logits]


def test_deepseek_v3_shared_experts_recognised_and_its_group_limited_picks_measured():
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=0, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    info = recognise(model)
    layer = info.layers[0]
    assert (layer.experts, layer.top_k, layer.expert_params) == (8, 2, 3 * 64 * 32)
    assert layer.shared_params == 3 * 64 * 32                  # one shared expert of the same width
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    seen = []    # the indices the experts module is called with: group-limited, not a plain top-k of the logits
    hook = model.model.layers[0].mlp.experts.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(next(t for t in (*args, *kwargs.values())
                                                 if isinstance(t, torch.Tensor) and not t.is_floating_point())),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        hook.remove()
    routing = measure_routing(model, ids)
    assert routing.loads["model.layers.0.mlp"] == tuple(torch.bincount(seen[0].flatten(), minlength=8).tolist())


def test_a_compiled_model_is_measured_and_analysed_as_the_module_itself():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(16, 32)
    compiled = torch.compile(net)
    routing = measure_routing(compiled, x)
    assert routing.loads == measure_routing(net, x).loads and set(routing.loads) == {"moe"}
    assert shapeprof.analyze(compiled, x, routing=routing).total.flops == \
        shapeprof.analyze(net, x, routing=routing).total.flops
