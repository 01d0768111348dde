"""HuggingFace transformers models built from configs with random weights (nothing is downloaded)."""
import pytest
import torch

import shapeprof

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _gpt2():
    c = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=128)
    return transformers.GPT2LMHeadModel(c), (torch.randint(0, 1000, (2, 16)),), "transformer.h.1.mlp.c_fc"


def _llama():
    c = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1000)
    return transformers.LlamaForCausalLM(c), (torch.randint(0, 1000, (2, 16)),), "model.layers.1.mlp.down_proj"


def _bert():
    c = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                vocab_size=1000)
    return transformers.BertModel(c), (torch.randint(0, 1000, (2, 16)),), "encoder.layer.1.intermediate.dense"


def _vit():
    c = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               image_size=32, patch_size=8)
    return transformers.ViTModel(c), (torch.randn(2, 3, 32, 32),), "layers.1.mlp.fc1"


@pytest.mark.parametrize("build", [_gpt2, _llama, _bert, _vit], ids=["gpt2", "llama", "bert", "vit"])
def test_hf_models_analyse_as_users_call_them(build):
    model, args, module = build()
    model.eval()
    with torch.no_grad():
        out = model(*args)                      # the default call: a ModelOutput (with a cache for the LMs)
    assert isinstance(out, transformers.utils.ModelOutput)
    report = shapeprof.analyze(model, *args)
    # their forward takes **kwargs: symbolic_trace can't; ViT's attention is still whole under dispatch
    assert report.capture.method == "dispatch"
    assert report.capture.reused_nodes > 0      # layer 1 is a twin of layer 0
    assert report.coverage.complete
    assert any(n.module_path == module for n in report.nodes)
    # every token goes through every projection once (2 FLOPs per weight per token), except the pooler of
    # BERT/ViT, which sees only the first token of each sequence; ViT has 16 patches + the CLS token
    tokens = 2 * 16 if args[0].dtype == torch.long else 2 * ((32 // 8) ** 2 + 1)
    pooler = sum(_weights(m) for name, m in model.named_modules() if name == "pooler")
    expected = 2 * tokens * (_weights(model) - pooler) + 2 * 2 * pooler
    projections = sum(a.flops for n in report.nodes for a in n.aten if a.op in PROJECTIONS)
    assert projections == expected


PROJECTIONS = {"aten.linear", "aten.addmm", "aten.mm", "aten.matmul"}


def _weights(model):
    """Weights of every projection: nn.Linear, and GPT-2's Conv1D (a Linear with its weight transposed)."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")


def test_hf_llama_with_attention_mask_and_no_cache():
    model, (ids,), _ = _llama()
    mask = torch.ones_like(ids)
    report = shapeprof.analyze(model.eval(), ids, attention_mask=mask, use_cache=False)
    assert report.coverage.complete
    sdpa = [n for n in report.nodes if n.op == "scaled_dot_product_attention"]
    assert len(sdpa) == 2


def test_hf_llama_8b_shape_on_meta():
    c = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(c)
    report = shapeprof.analyze(model, shapeprof.InputShape((1, 512), torch.long), dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters()) - 128256 * 4096   # the embedding does no matmul
    assert report.total.flops == pytest.approx(2 * params * 512, rel=0.02)


def test_analyze_leaves_a_users_cache_as_it_was():
    import copy
    model, (ids,), _ = _llama()
    model.eval()
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    tensors = lambda c: [t for layer in c.layers for t in (layer.keys, layer.values)]   # noqa: E731
    before, length = [t.clone() for t in tensors(cache)], cache.get_seq_length()
    step = torch.randint(0, 1000, (2, 1))
    first = shapeprof.analyze(model, step, past_key_values=cache)
    second = shapeprof.analyze(model, step, past_key_values=cache)
    assert first.total == second.total                      # no drift between analyses
    assert cache.get_seq_length() == length
    assert all(t.device.type == "cpu" and torch.equal(t, b) for t, b in zip(tensors(cache), before))
    # the user's next real decode step runs, and gives what it gives on an untouched copy of the cache
    reference = copy.deepcopy(cache)
    with torch.no_grad():
        got = model(step, past_key_values=cache).logits
        want = model(step, past_key_values=reference).logits
    torch.testing.assert_close(got, want)


def test_hf_mamba_scan_folds_its_steps_and_counts_what_the_unrolled_capture_counts():
    import sys
    capture_module = sys.modules["shapeprof.capture"]
    c = transformers.MambaConfig(num_hidden_layers=3, hidden_size=64, state_size=8, vocab_size=1000)
    with torch.device("meta"):
        model = transformers.MambaForCausalLM(c)
    ids = shapeprof.InputShape((1, 48), torch.long)
    folded = shapeprof.analyze(model, ids)
    assert folded.capture.method == "dispatch"
    assert folded.capture.folded_calls > 40 * 5 and folded.capture.reused_nodes > 0
    # the same recording with every layer run and every time step its own node
    real_run = capture_module._run_dispatch
    capture_module._run_dispatch = lambda *a, **k: real_run(*a, **{**k, "twins": False, "fold": False})
    try:
        unrolled = shapeprof.analyze(model, ids, method="dispatch")
    finally:
        capture_module._run_dispatch = real_run
    assert unrolled.capture.folded_calls == 0 and unrolled.capture.reused_nodes == 0
    assert folded.capture.graph_nodes < unrolled.capture.graph_nodes / 5
    f, u = folded.total, unrolled.total
    assert (f.flops, f.bytes_read, f.bytes_written) == (u.flops, u.bytes_read, u.bytes_written)
    assert f.predicted_seconds == pytest.approx(u.predicted_seconds, rel=1e-9)
    # and torch.export, which unrolls the loop its own way, counts the same FLOPs
    assert folded.total.flops == shapeprof.analyze(model, ids, method="export").total.flops


@pytest.mark.parametrize("lengths", [(12, 12, 12, 12), (12, 12, 5, 12)], ids=["uniform", "layer-2-shorter"])
def test_hf_layers_reading_their_cache_are_twins_and_count_what_running_every_layer_counts(lengths, monkeypatch):
    import sys
    capture_module = sys.modules["shapeprof.capture"]
    c = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(c).eval()
    cache = transformers.DynamicCache(config=c)
    for i, n in enumerate(lengths):
        k = torch.empty(1, 2, n, 16, device="meta")   # (B, kv_heads, cached positions, head_dim)
        cache.update(k, torch.empty_like(k), i)
    step = shapeprof.InputShape((1, 1), torch.long)
    twins = shapeprof.analyze(model, step, cache=cache)
    prefill = shapeprof.analyze(model, shapeprof.InputShape((1, 16), torch.long))
    real_run = capture_module._run_dispatch
    monkeypatch.setattr(capture_module, "_run_dispatch", lambda *a, **k: real_run(*a, **{**k, "twins": False}))
    every_layer = shapeprof.analyze(model, step, cache=cache, method="dispatch")
    every_layer_prefill = shapeprof.analyze(model, shapeprof.InputShape((1, 16), torch.long), method="dispatch")
    assert every_layer.capture.reused_nodes == 0
    for reused, run in ((twins, every_layer), (prefill, every_layer_prefill)):
        assert [(n.name, n.module_path, n.flops, n.bytes_read, n.bytes_written, n.output) for n in reused.nodes] == \
            [(n.name, n.module_path, n.flops, n.bytes_read, n.bytes_written, n.output) for n in run.nodes]
        assert reused.capture.graph_nodes == run.capture.graph_nodes
    # each attention reads its own layer of the cache object (no argument carries it): a layer is copied whole from
    # layer 0 where its part of the cache is like layer 0's, and run where it is not (layer 2, shorter)
    attention = [n.twin_of is not None for n in twins.nodes if n.op == "scaled_dot_product_attention"]
    assert attention == [False, True, lengths[2] == lengths[0], True]
    assert [n.twin_of is not None for n in prefill.nodes if n.op == "scaled_dot_product_attention"] == \
        [False, True, True, True]
    assert cache.get_seq_length() == lengths[0]   # the caller's cache is as it was
