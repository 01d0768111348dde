"""The example models are correct PyTorch models: shapes, equivalences, determinism, traceability."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from examples.cnn import SmallCNN
from examples.llama import LlamaConfig, RMSNorm, Transformer, apply_rotary_emb, precompute_rope
from examples.mlp import MLP, FunctionalMLP
from examples.nanogpt import GPT, GPTConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- MLP


@pytest.mark.parametrize("activation, act_type", [("relu", nn.ReLU), ("gelu", nn.GELU), ("silu", nn.SiLU)])
def test_mlp_is_sequential_linear_activation_blocks(activation, act_type):
    model = MLP(d_in=16, d_hidden=32, d_out=8, n_blocks=3, activation=activation)
    assert len(model.blocks) == 3
    for block in model.blocks:
        assert isinstance(block, nn.Sequential)
        assert [type(m) for m in block] == [nn.Linear, act_type]
    assert model(torch.randn(5, 16)).shape == (5, 8)
    assert model(torch.randn(2, 7, 16)).shape == (2, 7, 8)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_functional_mlp_matches_mlp_with_the_same_weights(activation):
    mlp = MLP(d_in=16, d_hidden=32, d_out=8, n_blocks=2, activation=activation)
    fmlp = FunctionalMLP(d_in=16, d_hidden=32, d_out=8, n_blocks=2, activation=activation)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == len(fmlp.weights) == len(fmlp.biases) == 3
    with torch.no_grad():
        for linear, w, b in zip(linears, fmlp.weights, fmlp.biases):
            w.copy_(linear.weight)
            b.copy_(linear.bias)
    x = torch.randn(4, 16)
    torch.testing.assert_close(fmlp(x), mlp(x))


def test_mlp_default_sizes():
    # 768 -> 3072 -> 3072 -> 768: (768*3072+3072) + (3072*3072+3072) + (3072*768+768)
    #                              = 2,362,368 + 9,440,256 + 2,360,064 = 14,162,688
    for cls in (MLP, FunctionalMLP):
        model = cls()
        assert sum(p.numel() for p in model.parameters()) == 14_162_688
        assert model(torch.randn(2, 768)).shape == (2, 768)


def test_functional_mlp_traces_to_functional_calls():
    gm = fx.symbolic_trace(FunctionalMLP(d_in=16, d_hidden=32, d_out=8))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(F.linear) == 3 and targets.count(F.relu) == 2
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]


# ---------------------------------------------------------------- CNN


def test_small_cnn_forward():
    model = SmallCNN(num_classes=10).eval()
    # convs 3*32*9 + 32*64*9 + 64*128*9 = 93,024; batchnorms 2*(32+64+128) = 448; linear 128*10+10 = 1,290
    assert sum(p.numel() for p in model.parameters()) == 94_762
    with torch.no_grad():
        assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert SmallCNN(num_classes=7).train()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


# ---------------------------------------------------------------- nanoGPT


def test_gpt_forward_with_and_without_targets():
    config = GPTConfig.tiny()
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (3, 10))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 10, config.vocab_size)
    assert loss.shape == () and torch.isfinite(loss)
    last, no_loss = model(idx)
    assert last.shape == (3, 1, config.vocab_size) and no_loss is None
    torch.testing.assert_close(last, logits[:, [-1], :])


def test_gpt_weight_tying_and_block_size():
    config = GPTConfig.tiny()
    model = GPT(config)
    assert model.transformer.wte.weight is model.lm_head.weight
    with pytest.raises(AssertionError, match="block size"):
        model(torch.zeros(1, config.block_size + 1, dtype=torch.long))


def test_gpt_manual_attention_matches_flash():
    flash = GPT(GPTConfig.tiny(flash=True)).eval()
    manual = GPT(GPTConfig.tiny(flash=False)).eval()
    # The manual path has one extra buffer per layer, the causal mask; it is built, not loaded.
    missing, unexpected = manual.load_state_dict(flash.state_dict(), strict=False)
    assert sorted(missing) == [f"transformer.h.{i}.attn.bias" for i in range(2)] and unexpected == []
    idx = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        logits_flash, loss_flash = flash(idx, targets=idx)
        logits_manual, loss_manual = manual(idx, targets=idx)
    torch.testing.assert_close(logits_manual, logits_flash, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_manual, loss_flash)


@pytest.mark.parametrize("flash", [True, False])
def test_gpt_is_causal(flash):
    model = GPT(GPTConfig.tiny(flash=flash)).eval()
    a = torch.randint(0, 256, (1, 20))
    b = a.clone()
    b[:, 12:] = (b[:, 12:] + 1) % 256  # change only the future
    with torch.no_grad():
        la, _ = model(a, targets=a)
        lb, _ = model(b, targets=b)
    torch.testing.assert_close(la[:, :12], lb[:, :12])
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_gpt_generate():
    config = GPTConfig.tiny()
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 5))
    out1 = model.generate(idx, max_new_tokens=7, greedy=True)
    out2 = model.generate(idx, max_new_tokens=7, greedy=True)
    assert out1.shape == (2, 12)
    assert torch.equal(out1, out2)
    assert torch.equal(out1[:, :5], idx)
    logits, _ = model(idx)
    assert torch.equal(out1[:, 5], logits[:, -1].argmax(-1))
    # sampling runs too, with top_k, and crops a context longer than block_size
    long = torch.randint(0, config.vocab_size, (1, config.block_size + 3))
    assert model.generate(long, max_new_tokens=2, temperature=0.8, top_k=5).shape == (1, config.block_size + 5)


def test_gpt2_parameter_count_on_meta():
    with torch.device("meta"):
        model = GPT(GPTConfig.gpt2())
    # wte 50304*768 = 38,633,472 (shared with lm_head); wpe 1024*768 = 786,432; ln_f 2*768 = 1,536;
    # per layer: ln_1 + ln_2 2*1,536 = 3,072; c_attn 768*2304+2304 = 1,771,776; attn c_proj 768*768+768 = 590,592;
    #            c_fc 768*3072+3072 = 2,362,368; mlp c_proj 3072*768+768 = 2,360,064; sum 7,087,872; x12 = 85,054,464
    # total 38,633,472 + 786,432 + 1,536 + 85,054,464 = 124,475,904
    assert model.get_num_params(non_embedding=False) == 124_475_904
    assert model.get_num_params() == 124_475_904 - 786_432  # nanoGPT prints "123.69M"
    logits, _ = model(torch.zeros(1, 1024, dtype=torch.long, device="meta"))
    assert logits.shape == (1, 1, 50304)


@pytest.mark.parametrize("flash", [True, False])
def test_gpt_symbolic_trace_fails(flash):
    # `assert t <= self.config.block_size` is Python control flow on a shape: symbolic_trace cannot follow it,
    # so the library captures nanoGPT with torch.export instead.
    with pytest.raises(fx.proxy.TraceError, match="control flow"):
        fx.symbolic_trace(GPT(GPTConfig.tiny(flash=flash)))


# ---------------------------------------------------------------- Llama


def test_llama_tiny_forward():
    config = LlamaConfig.tiny()
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 17))
    with torch.no_grad():
        assert model(tokens).shape == (2, 17, config.vocab_size)
    assert config.hidden_dim == 192  # int(2*4*64/3) = 170, rounded up to a multiple of 32
    assert model.output.weight is not model.tok_embeddings.weight
    # the rope tables follow from the config: buffers, but not in the state_dict
    assert {"cos", "sin"} <= dict(model.named_buffers()).keys()
    assert not {"cos", "sin"} & model.state_dict().keys()


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_llama_grouped_query_attention(n_kv_heads):
    config = LlamaConfig.tiny(n_kv_heads=n_kv_heads)
    model = Transformer(config).eval()
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (4 * 16, 64)
    assert attn.wk.weight.shape == attn.wv.weight.shape == (n_kv_heads * 16, 64)
    with torch.no_grad():
        assert model(torch.randint(0, 256, (2, 9))).shape == (2, 9, 256)


def test_llama_gqa_equals_attention_with_repeated_kv_heads():
    # 2 kv heads for 4 query heads is the same as 4 kv heads with each kv head's weights repeated twice
    gqa = Transformer(LlamaConfig.tiny(n_kv_heads=2)).eval()
    mha = Transformer(LlamaConfig.tiny(n_kv_heads=4)).eval()
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            state[key] = state[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)  # (nkv*2*hd, dim)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(mha(tokens), gqa(tokens))


def test_llama_is_causal():
    model = Transformer(LlamaConfig.tiny()).eval()
    a = torch.randint(0, 256, (1, 20))
    b = a.clone()
    b[:, 12:] = (b[:, 12:] + 1) % 256
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :12], lb[:, :12])
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_rotary_embedding_matches_meta_complex_formulation():
    head_dim, seqlen, theta = 16, 10, 500000.0
    cos, sin = precompute_rope(head_dim, 32, theta)
    x = torch.randn(2, seqlen, 3, head_dim)  # (B, T, n, hd)
    # Meta's reference: pairs as complex numbers times exp(i * position * freq)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs_cis = torch.polar(torch.ones(seqlen, head_dim // 2), torch.outer(torch.arange(seqlen).float(), freqs))
    x_c = torch.view_as_complex(x.reshape(2, seqlen, 3, head_dim // 2, 2))  # (B, T, n, hd/2)
    expected = torch.view_as_real(x_c * freqs_cis[None, :, None, :]).flatten(3)  # (B, T, n, hd)
    torch.testing.assert_close(apply_rotary_emb(x, cos[:seqlen], sin[:seqlen]), expected)


def test_rmsnorm():
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 7, 32)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (32,), norm.weight, eps=1e-5))
    # computed in float32, returned in the input's dtype
    x16 = x.to(torch.bfloat16)
    assert norm.to(torch.bfloat16)(x16).dtype == torch.bfloat16


def test_llama_symbolic_trace():
    model = Transformer(LlamaConfig.tiny()).eval()
    # Slicing the rope buffers by the traced sequence length needs them as Proxies, not real tensors.
    tracer = fx.Tracer()
    tracer.proxy_buffer_attributes = True
    gm = fx.GraphModule(model, tracer.trace(model))
    gm.graph.lint()
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} >= {"cos", "sin"}
    assert any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
    tokens = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(gm(tokens), model(tokens))
        torch.testing.assert_close(gm(tokens[:, :5]), model(tokens[:, :5]))  # the length is not baked in


def test_llama_generate():
    model = Transformer(LlamaConfig.tiny()).eval()
    tokens = torch.randint(0, 256, (2, 6))
    out1 = model.generate(tokens, max_new_tokens=7)
    out2 = model.generate(tokens, max_new_tokens=7, greedy=True)
    assert out1.shape == (2, 13)
    assert torch.equal(out1, out2)
    assert torch.equal(out1[:, :6], tokens)
    with torch.no_grad():
        full = model(out1)
    # every generated token is the argmax of the full forward at the position before it
    assert torch.equal(out1[:, 6:], full[:, 5:-1].argmax(-1))
    assert model.generate(tokens, max_new_tokens=2, greedy=False, temperature=0.7).shape == (2, 8)


# 8B: attention per layer 2*4096*4096 (wq, wo) + 2*4096*1024 (wk, wv; 8 kv heads * 128) = 41,943,040;
#     SwiGLU 3*4096*14336 = 176,160,768; norms 2*4096 = 8,192; per layer 218,112,000; x32 = 6,979,584,000;
#     tok_embeddings + output 2*128256*4096 = 1,050,673,152; final norm 4,096
#     total 6,979,584,000 + 1,050,673,152 + 4,096 = 8,030,261,248
# 405B: attention 2*16384*16384 + 2*16384*1024 = 570,425,344; SwiGLU 3*16384*53248 = 2,617,245,696;
#     norms 2*16384 = 32,768; per layer 3,187,703,808; x126 = 401,650,679,808;
#     tok_embeddings + output 2*128256*16384 = 4,202,692,608; final norm 16,384
#     total 401,650,679,808 + 4,202,692,608 + 16,384 = 405,853,388,800
@pytest.mark.parametrize(
    "preset, hidden_dim, n_params",
    [
        ("llama3_8b", 14336, 8_030_261_248),  # int(1.3 * int(8*4096/3)) = 14198 -> multiple of 1024
        ("llama3_405b", 53248, 405_853_388_800),  # int(1.2 * int(8*16384/3)) = 52428 -> multiple of 4096
    ],
)
def test_llama_presets_on_meta(preset, hidden_dim, n_params):
    config = getattr(LlamaConfig, preset)()
    assert config.hidden_dim == hidden_dim
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert model.cos.device.type == "meta" and model.sin.device.type == "meta"
    logits = model(torch.zeros(1, 2048, dtype=torch.long, device="meta"))
    assert logits.shape == (1, 2048, 128256) and logits.device.type == "meta"
