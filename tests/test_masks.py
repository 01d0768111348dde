"""Attention masks: explicit masks priced for the scores they keep (causal, window, padding), as HF builds them."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shapeprof
from shapeprof.masks import describe, keep_mask

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _causal_pairs(t: int) -> int:
    return t * (t + 1) // 2          # query i sees keys 0..i


def _attention_flops(report) -> list[int]:
    return [a.flops for n in report.nodes for a in n.aten if a.op == "aten.scaled_dot_product_attention"]


# ---------------------------------------------------------------------------------------------- describe

def test_describe_names_each_structure_and_counts_what_it_keeps():
    i, j = torch.arange(6).unsqueeze(1), torch.arange(6).unsqueeze(0)
    assert describe(j <= i, 6, 6).kind == "causal" and describe(j <= i, 6, 6).kept == 21
    window = (j <= i) & (j > i - 3)
    assert describe(window, 6, 6).kind == "sliding window of 3"
    assert describe(window, 6, 6).kept == 1 + 2 + 3 * 4
    padded = (j <= i) & (j >= 2)                        # left padding: the first 2 keys are pads
    assert describe(padded, 6, 6).kind == "padding"
    assert describe(torch.ones(6, 6, dtype=torch.bool), 6, 6).kind == "none"
    assert describe(torch.eye(6, dtype=torch.bool), 6, 6).kind == "sliding window of 1"
    assert describe(j >= i, 6, 6).kind == "custom"                 # anti-causal
    # two new queries against 6 keys (decoding with a cache of 4): causal is aligned bottom-right
    q2 = torch.arange(2).unsqueeze(1) + 4
    assert describe(j <= q2, 2, 6).kind == "causal" and describe(j <= q2, 2, 6).kept == 5 + 6


def test_float_masks_keep_what_is_not_minus_infinity():
    bias = torch.zeros(4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.equal(keep_mask(bias), torch.ones(4, 4, dtype=torch.bool).tril())
    hf_style = torch.zeros(4, 4, dtype=torch.float16).masked_fill(torch.ones(4, 4).triu(1).bool(),
                                                                  torch.finfo(torch.float16).min)
    assert describe(keep_mask(hf_style), 4, 4).kind == "causal"
    alibi = -torch.arange(4.0).expand(4, 4)            # a bias, not a mask: every score is kept
    assert describe(keep_mask(alibi), 4, 4).kind == "none"


# ---------------------------------------------------------------------------------------------- HF decoders

def _tiny_llama(**kw):
    c = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1000, **kw)
    return transformers.LlamaForCausalLM(c).eval()


@pytest.mark.parametrize("method", ["auto", "runnable"])   # HF runs is_causal eagerly, an explicit mask in export
@pytest.mark.parametrize("t", [16, 100])
def test_hf_llama_attention_counts_the_causal_half(t, method):
    report = shapeprof.analyze(_tiny_llama(), torch.zeros(2, t, dtype=torch.long), method=method)
    # batch 2 x 4 heads x causal pairs x (Q K^T: 16 + P V: 16 multiply-adds) x 2 FLOPs, per layer
    assert _attention_flops(report) == [2 * 2 * 4 * _causal_pairs(t) * (16 + 16)] * 2
    if report.capture.method == "export":
        assert any("causal" in note and "is_causal" in note for note in report.notes)


def test_hf_gpt2_attention_counts_the_causal_half_and_no_mask_bytes():
    c = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=128)
    report = shapeprof.analyze(transformers.GPT2LMHeadModel(c).eval(), torch.zeros(1, 64, dtype=torch.long))
    sdpa = [a for n in report.nodes for a in n.aten if a.op == "aten.scaled_dot_product_attention"]
    assert [a.flops for a in sdpa] == [2 * 4 * _causal_pairs(64) * 32] * 2
    # priced as the is_causal kernel: q, k, v read and the output written (fp32, 1x4x64x16 each), no mask
    assert [a.bytes for a in sdpa] == [4 * (1 * 4 * 64 * 16) * 4] * 2


def test_hf_llama_padding_mask_counts_the_kept_scores():
    t = 12
    ids = torch.zeros(2, t, dtype=torch.long)
    attention_mask = torch.ones(2, t, dtype=torch.long)
    attention_mask[1, :5] = 0                            # the second sequence is left-padded by 5
    report = shapeprof.analyze(_tiny_llama(), ids, attention_mask=attention_mask)
    # sequence 0: the causal pairs; sequence 1: a query i >= 5 keeps keys 5..i, a pad query keeps none
    kept_rows = sum(max(0, i - 5 + 1) for i in range(t))
    assert _attention_flops(report) == [4 * (_causal_pairs(t) + kept_rows) * (16 + 16) * 2] * 2
    assert any("padding" in note for note in report.notes)


def test_hf_mistral_sliding_window_counts_the_window():
    c = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1000, sliding_window=8)
    report = shapeprof.analyze(transformers.MistralForCausalLM(c).eval(), torch.zeros(1, 40, dtype=torch.long))
    kept = sum(min(8, i + 1) for i in range(40))       # query i sees the 8 keys ending at i
    assert _attention_flops(report) == [4 * kept * 32 * 2] * 2
    assert any("sliding window of 8" in note for note in report.notes)


@pytest.mark.parametrize("method", ["auto", "runnable"])
def test_hf_llama_totals_match_two_flops_per_weight_per_token_plus_causal_attention(method):
    c = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=2000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(c)
    t = 512
    report = shapeprof.analyze(model, shapeprof.InputShape((1, t), torch.long), method=method)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "norm" not in n)
    attention = 4 * 2 * 8 * _causal_pairs(t) * (32 + 32)          # layers x QK^T and PV x heads x pairs x dims
    assert report.total.flops == pytest.approx(2 * params * t + attention, rel=0.01)


@pytest.mark.parametrize("method", ["auto", "runnable"])
def test_hf_gpt2_totals_match_two_flops_per_weight_per_token_plus_causal_attention(method):
    c = transformers.GPT2Config(n_layer=4, n_head=8, n_embd=256, vocab_size=2000, n_positions=1024)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(c)
    t = 1024
    report = shapeprof.analyze(model, shapeprof.InputShape((1, t), torch.long), method=method)
    # the projections (Conv1D) and the tied LM head; position and token embeddings and norms do no matmul
    weights = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Conv1D")
    weights += model.lm_head.weight.numel()
    attention = 4 * 2 * 8 * _causal_pairs(t) * (32 + 32)
    assert report.total.flops == pytest.approx(2 * weights * t + attention, rel=0.01)


# ---------------------------------------------------------------------------------------------- hand-written

class ExplicitMask(nn.Module):
    """A causal mask built by hand, either in forward or from a registered tril buffer."""

    def __init__(self, from_buffer: bool):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.from_buffer = from_buffer
        self.register_buffer("tril", torch.ones(64, 64, dtype=torch.bool).tril())

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)     # (B, nh, T, hs) each
        if self.from_buffer:
            mask = self.tril[:t, :t]
        else:
            mask = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("from_buffer", [False, True], ids=["built-in-forward", "tril-buffer"])
def test_hand_built_causal_masks_are_priced_causal(from_buffer):
    report = shapeprof.analyze(ExplicitMask(from_buffer), torch.randn(3, 20, 32))
    assert _attention_flops(report) == [2 * 3 * 2 * _causal_pairs(20) * 32]


def test_a_mask_whose_values_are_unknown_is_counted_in_full_and_said_so():
    with torch.device("meta"):                       # the tril buffer has no values on meta
        model = ExplicitMask(from_buffer=True)
    report = shapeprof.analyze(model, shapeprof.InputShape((3, 20, 32)))
    assert _attention_flops(report) == [2 * 3 * 2 * 20 * 20 * 32]
    assert any("could not be evaluated" in note for note in report.notes)


def test_a_padding_mask_given_by_shape_only_is_counted_in_full_and_said_so():
    report = shapeprof.analyze(_tiny_llama(), torch.zeros(1, 10, dtype=torch.long),
                               attention_mask=shapeprof.InputShape((1, 10), torch.long))
    assert _attention_flops(report) == [2 * 4 * 10 * 10 * 32] * 2
    assert any("could not be evaluated" in note for note in report.notes)
