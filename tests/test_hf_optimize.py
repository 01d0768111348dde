"""optimize on the HuggingFace models people download, called with their default arguments (a cache comes back).

Built from configs with random weights (nothing is downloaded). The oracle is the original model: every output
field, the cache's tensors included, and its own generate() with greedy decoding.
"""
import warnings

import pytest
import torch

import shapeprof
from shapeprof.rewrites.fuse_linear_activation import fused_linear_activation

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
T = transformers


def _llama():
    c = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000)
    return T.LlamaForCausalLM(c), {"input_ids": torch.randint(3, 1000, (2, 12))}, 2   # gate_proj + SiLU per layer


def _gpt2():
    c = T.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=128, bos_token_id=0,
                     eos_token_id=0)
    return T.GPT2LMHeadModel(c), {"input_ids": torch.randint(3, 1000, (2, 12))}, 2   # Conv1D c_fc + NewGELU


def _t5():
    c = T.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=1000,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    inputs = {"input_ids": torch.randint(3, 1000, (2, 10)), "decoder_input_ids": torch.randint(3, 1000, (2, 4))}
    return T.T5ForConditionalGeneration(c), inputs, 4                             # wi + ReLU, 2 + 2 blocks


def _whisper():
    c = T.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                        max_source_positions=32, max_target_positions=64, vocab_size=1000, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    inputs = {"input_features": torch.randn(2, 16, 64), "decoder_input_ids": torch.randint(3, 1000, (2, 4))}
    return T.WhisperForConditionalGeneration(c), inputs, 4                        # fc1 + GELU, 2 + 2 layers


def _bert():
    c = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=1000)
    return T.BertModel(c), {"input_ids": torch.randint(3, 1000, (2, 16))}, 2       # intermediate dense + GELU


MODELS = {"llama": _llama, "gpt2": _gpt2, "t5": _t5, "whisper": _whisper, "bert": _bert}


def fused(module) -> int:
    return sum(sum(1 for n in type(m)._shapeprof_graph_module.graph.nodes if n.target is fused_linear_activation)
               for m in module.modules() if hasattr(type(m), "_shapeprof_graph_module"))


def tensors_of(out, path="out"):
    """(path, tensor) of a model output, through ModelOutputs and HF's cache objects (by their public layers)."""
    if isinstance(out, torch.Tensor):
        return [(path, out)]
    if isinstance(out, (tuple, list)):
        return [x for i, v in enumerate(out) for x in tensors_of(v, f"{path}[{i}]")]
    if isinstance(out, dict):       # ModelOutput is an OrderedDict of its set fields
        return [x for k, v in out.items() for x in tensors_of(v, f"{path}.{k}")]
    if isinstance(out, T.EncoderDecoderCache):
        return tensors_of(out.self_attention_cache, f"{path}.self") + \
            tensors_of(out.cross_attention_cache, f"{path}.cross")
    if isinstance(out, T.Cache):
        return [x for i, layer in enumerate(out.layers)
                for x in tensors_of((layer.keys, layer.values), f"{path}.layers[{i}]")]
    return []


@pytest.fixture(params=list(MODELS))
def built(request):
    torch.manual_seed(0)
    model, inputs, expected = MODELS[request.param]()
    return request.param, model.eval(), inputs, expected


def test_optimize_with_default_arguments_keeps_every_fusion_and_every_output(built):
    name, model, inputs, expected = built
    with torch.no_grad():
        reference = model(**inputs)
    fast = shapeprof.optimize(model, **inputs)
    report = fast.shapeprof_report
    assert fused(fast) == expected, report
    assert report.verified and not report.refused
    with torch.no_grad():
        got = fast(**inputs)
    want_tensors, got_tensors = tensors_of(reference), tensors_of(got)
    assert [p for p, _ in got_tensors] == [p for p, _ in want_tensors]
    assert any(".layers[" in p for p, _ in want_tensors) or name == "bert"   # the cache is compared too
    for (path, a), (_, b) in zip(got_tensors, want_tensors):
        torch.testing.assert_close(a, b, msg=path)
    text = str(report)
    assert "nothing rewritten" not in text and "rewrote the traced forward of" in text


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "whisper"])
def test_generate_on_the_drop_in_gives_the_same_greedy_tokens(name):
    torch.manual_seed(0)
    model, inputs, _ = MODELS[name]()
    model.eval()
    fast = shapeprof.optimize(model, **inputs)
    prompt = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast.generate(**prompt, max_new_tokens=8, do_sample=False)
    want = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(got, want)
    # the rewritten graphs ran: no guard sent a call back to the unoptimized forward
    assert not [w for w in caught if "runs its own forward" in str(w.message)]
