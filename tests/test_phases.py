"""shapeprof.Prefill / shapeprof.Decode as analysis inputs: a decode step reads the whole cache, exactly."""
import json
import warnings

import pytest
import torch

import shapeprof
from examples.llama import LlamaConfig, Transformer
from examples.nanogpt import GPT, GPTConfig
from shapeprof.costs import cost_of

transformers = pytest.importorskip("transformers")


def _on_meta(build):
    with torch.device("meta"):
        return build()


def _records(report):
    for cn in report.graph_capture.nodes:
        for rec in cn.records:
            for _ in range(cn.repeats):
                yield rec


def _attention_kv_bytes(report) -> int:
    """The oracle: what the graph's attention ops read as keys and values."""
    return sum(m.nbytes for rec in _records(report) if rec.name == "aten.scaled_dot_product_attention"
               for m in rec.input_metas()[1:3])


def test_llama_decode_bytes_split_exactly():
    model = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    r = shapeprof.analyze(model, shapeprof.Decode(batch=2, context=32))
    p = r.phase
    assert (p.kind, p.batch, p.tokens, p.context, p.layers) == ("decode", 2, 1, 32, 2)
    # per position of one sequence: 2 layers x (k + v) x 2 kv heads x head_dim 16 x 4 bytes (fp32) = 512
    assert p.kv_bytes_per_token == 512
    # attention reads the 32 cached positions and the new one, for both sequences: 2 x 33 x 512 = 33,792
    assert p.kv_read_bytes == 33_792 == _attention_kv_bytes(r)
    # the new position written once per sequence: 2 x 512; the graph's cache writes (copy_ into the buffers) agree
    assert p.kv_written_bytes == 1_024
    assert sum(cost_of(rec).bytes_written for rec in _records(r) if rec.name == "aten.copy_") == 1_024
    # weights: 131,392 parameters (embedding 256x64, per layer wq 4096 + wk 2048 + wv 2048 + wo 4096 + three FFN
    # matrices of 64x192 + two norms 64, final norm 64, output 64x256); the untied embedding only has its 2 rows
    # read: (131,392 - 16,384) x 4 + 2 x 64 x 4
    assert p.weight_bytes == 460_544
    # matmul-class FLOPs: Linears 2 x 2 x (12,288 + 36,864) per layer, output 2 x 2 x 16,384, attention
    # 2 (qk, pv) x 2 x B 2 x 4 heads x 33 keys x 16 per layer
    matmul = sum(cost_of(rec).flops for rec in _records(r) if cost_of(rec).matmul)
    assert matmul == 2 * 196_608 + 65_536 + 2 * 16_896
    assert p.total_bytes == r.total.bytes and p.other_bytes == r.total.bytes - 460_544 - 33_792 - 1_024
    assert r.inputs == ("decode step: batch 2, cache of 32 positions (inserted (kv_cache rewrite))",)


def test_prefill_is_the_model_forward_and_counts_the_cache_beside_it():
    model = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    r = shapeprof.analyze(model, shapeprof.Prefill(batch=1, tokens=16))
    plain = shapeprof.analyze(model, shapeprof.InputShape((1, 16), torch.long))
    assert (r.phase.kind, r.phase.kv_read_bytes, r.phase.kv_written_bytes) == ("prefill", 0, 16 * 512)
    assert r.phase.kv_in_graph is False and (r.total.flops, r.total.bytes) == (plain.total.flops, plain.total.bytes)
    assert r.phase.other_bytes == r.total.bytes - r.phase.weight_bytes
    assert r.nodes[0].module_path   # the model's own capture, with its module paths


def test_manual_mask_decoder_needs_its_mask_values():
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=128, flash=False)
    torch.manual_seed(0)
    r = shapeprof.analyze(GPT(config), shapeprof.Decode(2, 16), dtype=torch.bfloat16)
    # attention over 17 positions: 2 x 17 x 2 layers x (k + v) x 64 x 2 bytes; the manual chain stays manual
    assert r.phase.kv_read_bytes == 2 * 17 * 2 * 2 * 64 * 2
    assert any(rec.name in ("aten.bmm", "aten.matmul") and rec.input_metas()[1].shape[-1] == 17
               for rec in _records(r))
    with pytest.raises(shapeprof.PhaseError, match="its mask .* could not be evaluated .*on meta a mask buffer"):
        shapeprof.analyze(_on_meta(lambda: GPT(config)), shapeprof.Decode(2, 16))


def test_decode_batch_and_dtype_follow():
    model = _on_meta(lambda: GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=128)))
    one = shapeprof.analyze(model, shapeprof.Decode(1, 64), dtype=torch.bfloat16)
    four = shapeprof.analyze(model, shapeprof.Decode(4, 64), dtype=torch.bfloat16)
    # bf16: 2 layers x 2 x 64 wide x 2 bytes per position; 65 positions read per sequence
    assert one.phase.kv_bytes_per_token == 512 and one.phase.kv_read_bytes == 65 * 512
    assert four.phase.kv_read_bytes == 4 * 65 * 512 == _attention_kv_bytes(four)
    # nanoGPT ties its token embedding to the head (the whole table is read, at any batch); of its position
    # table (128 x 64, bf16) only a row per sequence is
    table = 128 * 64 * 2
    assert one.phase.weight_bytes == one.parameter_bytes - table + 1 * 64 * 2
    assert four.phase.weight_bytes == one.parameter_bytes - table + 4 * 64 * 2
    assert one.phase.max_context == 128


def test_phase_survives_json():
    model = _on_meta(lambda: Transformer(LlamaConfig.tiny()))
    r = shapeprof.analyze(model, shapeprof.Decode(batch=3, context=8))
    back = shapeprof.Report.from_json(r.to_json())
    assert back.phase == r.phase and back.phase.other_bytes == r.phase.other_bytes
    assert json.loads(r.to_json())["phase"]["kv_read_bytes"] == 3 * 9 * 512


def _hf(cls, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _on_meta(lambda: cls(cfg))


HF = {
    "llama": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512)),
    "gpt2": lambda: (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        n_embd=128, n_layer=2, n_head=4, vocab_size=512, bos_token_id=0, eos_token_id=0)),
    "mistral": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, sliding_window=None)),
}


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_decode_reads_its_own_cache(name):
    cls, cfg = HF[name]()
    model = _hf(cls, cfg)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = shapeprof.analyze(model, shapeprof.Decode(batch=2, context=40), dtype=torch.bfloat16)
    p = r.phase
    assert p.cache == "transformers DynamicCache"
    # 2 layers x (k + v) x kv heads x head_dim 32 x 2 bytes
    assert p.kv_bytes_per_token == 2 * 2 * kv_heads * 32 * 2
    assert p.kv_read_bytes == 2 * 41 * p.kv_bytes_per_token
    # attention over 41 keys, the grouped heads read once (transformers passes enable_gqa to SDPA)
    sdpa = [rec for rec in _records(r) if rec.name == "aten.scaled_dot_product_attention"]
    assert len(sdpa) == 2 and all(rec.input_metas()[1].shape[-2] == 41 for rec in sdpa)
    assert _attention_kv_bytes(r) == p.kv_read_bytes
    assert "copies every layer's whole cache" in " ".join(r.notes)


def test_hf_sliding_window_reads_its_window():
    cls, cfg = HF["mistral"]()
    cfg.sliding_window = 16
    model = _hf(cls, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = shapeprof.analyze(model, shapeprof.Decode(batch=1, context=100))
    # each layer attends to its last 16 positions: 2 layers x 16 x (k + v) x 2 kv heads x 32 x 4 bytes
    assert r.phase.kv_read_bytes == 2 * 16 * 2 * 2 * 32 * 4


def test_phase_errors_name_the_problem():
    with pytest.raises(shapeprof.PhaseError, match="Decode.batch must be a positive int"):
        shapeprof.Decode(batch=0)
    with pytest.raises(shapeprof.PhaseError, match="Prefill.tokens"):
        shapeprof.Prefill(tokens=1.5)

    class OwnCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def forward(self, ids, kv_cache=None):
            return self.emb(ids)

    with pytest.raises(shapeprof.PhaseError, match="takes a cache of its own \\('kv_cache'\\)"):
        shapeprof.analyze(OwnCache(), shapeprof.Decode(1, 8))

    encoder = torch.nn.Sequential(torch.nn.Embedding(10, 16), torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1))
    with pytest.raises(shapeprof.PhaseError, match="decode of Sequential needs a KV cache"):
        shapeprof.analyze(encoder, shapeprof.Decode(1, 8))


def test_phase_leaves_a_real_model_alone():
    torch.manual_seed(0)
    model = Transformer(LlamaConfig.tiny()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = shapeprof.analyze(model, shapeprof.Decode(2, 16))
    assert r.phase.kv_read_bytes == 2 * 17 * 512
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    compiled = shapeprof.analyze(torch.compile(model), shapeprof.Decode(2, 16))   # what a user analyses next
    assert (compiled.phase, compiled.total.flops) == (r.phase, r.total.flops)


@pytest.mark.parametrize("build", ["llama", "hf"])
def test_profile_measures_a_decode_step(build):
    torch.manual_seed(0)
    if build == "hf":
        cls, cfg = HF["llama"]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls(cfg).eval()
    else:
        model = Transformer(LlamaConfig.tiny()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = shapeprof.profile(model, shapeprof.Decode(2, 24), steps=2, warmup=1, machine_spec="a100-80gb-sxm")
    assert result.predicted.phase.kind == "decode" and result.predicted.phase.context == 24
    assert result.measured.total.measured_seconds > 0 and len(result.step_seconds) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(shapeprof.PhaseError, match="runs the model"):
        shapeprof.profile(_on_meta(lambda: Transformer(LlamaConfig.tiny())), shapeprof.Decode(1, 8))


class _CachedAttention(torch.nn.Module):
    """Attention as Meta's reference Llama writes it: its cache preallocated in buffers, written at start_pos."""

    def __init__(self, dim=64, heads=4, max_batch=4, max_seq=128):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.wqkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.wo = torch.nn.Linear(dim, dim, bias=False)
        self.register_buffer("cache_k", torch.zeros(max_batch, heads, max_seq, self.hd), persistent=False)
        self.register_buffer("cache_v", torch.zeros(max_batch, heads, max_seq, self.hd), persistent=False)

    def forward(self, x, start_pos):
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)   # 3 x (B, H, T, hd)
        self.cache_k[:b, :, start_pos:start_pos + t] = k
        self.cache_v[:b, :, start_pos:start_pos + t] = v
        keys, values = self.cache_k[:b, :, :start_pos + t], self.cache_v[:b, :, :start_pos + t]
        out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, is_causal=t > 1)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class _ReferenceStyleLlama(torch.nn.Module):
    def __init__(self, layers=2, dim=64, vocab=256, max_seq=128):
        super().__init__()
        self.max_seq_len = max_seq
        self.emb = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(_CachedAttention(dim, max_seq=max_seq) for _ in range(layers))
        self.out = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, start_pos: int):
        h = self.emb(tokens)
        for layer in self.layers:
            h = h + layer(h, start_pos)
        return self.out(h)


def test_a_model_with_its_own_cache_is_decoded_through_it():
    model = _on_meta(_ReferenceStyleLlama)
    r = shapeprof.analyze(model, shapeprof.Decode(batch=2, context=40))
    p = r.phase
    assert p.cache == "its own (start_pos)" and p.layers == 2 and p.max_context == 128
    # per position: 2 layers x (k + v) x 4 heads x 16 x 4 bytes = 1,024; 41 positions read per sequence
    assert (p.kv_bytes_per_token, p.kv_read_bytes, p.kv_written_bytes) == (1024, 2 * 41 * 1024, 2 * 1024)
    assert _attention_kv_bytes(r) == p.kv_read_bytes
    with pytest.raises(shapeprof.PhaseError, match="139 \\+ 1 positions exceed the 128 its cache holds"):
        shapeprof.analyze(model, shapeprof.Decode(batch=1, context=139))
    prefill = shapeprof.analyze(model, shapeprof.Prefill(batch=1, tokens=16))
    assert prefill.phase.kv_read_bytes == 0 and prefill.phase.kv_written_bytes == 16 * 1024
    torch.manual_seed(0)
    real = _ReferenceStyleLlama().eval()
    before = {k: v.clone() for k, v in real.named_buffers()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = shapeprof.profile(real, shapeprof.Decode(2, 40), steps=2, warmup=1, machine_spec="a100-80gb-sxm")
    assert measured.measured.total.measured_seconds > 0 and measured.predicted.phase.kv_read_bytes == 2 * 41 * 1024
    assert all(torch.equal(before[k], v) for k, v in real.named_buffers())   # its cache is as it was
