"""Tests for shapeprof/findings.py: which memory-bound groups are reported, why, and advice that fits the op."""
import pytest
import torch
import torch.nn as nn

import shapeprof
from examples.cnn import SmallCNN
from examples.mlp import MLP
from shapeprof.output.markdown import markdown_sections
from shapeprof.output.terminal import to_text


def test_the_ridge_is_written_as_the_intensities_are():
    # fp32 on an A100: the ridge is 19.5 TFLOP/s / 2.039 TB/s = 9.5635 FLOP/B: "9.56", 3 significant figures like
    # every intensity (rounded to "10" a node at 9.6 would look compute-bound). The ReLU does 1 FLOP per element
    # and moves 4 bytes in and 4 out: 0.125 FLOP/B.
    report = shapeprof.analyze(nn.Sequential(nn.Linear(64, 256), nn.ReLU()).eval(), torch.randn(512, 64))
    (relu,) = [f for f in report.findings if f.op == "ReLU"]
    assert relu.why.startswith("0.125 FLOP/byte against a ridge of 9.56 on NVIDIA A100-SXM4-80GB: ")
    assert relu.ridge == pytest.approx(19.5e12 / 2.039e12)
    assert "against a ridge of 9.56 on" in to_text(report, width=200, color=False)
    assert "against a ridge of 9.56 on" in markdown_sections(report)["4-findings"]


@pytest.fixture(scope="module")
def cnn():
    return shapeprof.analyze(SmallCNN().eval(), torch.randn(8, 3, 32, 32))


def test_conv_net_advice_fits_each_op(cnn):
    # examples/cnn.py in eval mode: the memory-bound layers are its 3 BatchNorms, 3 ReLUs (each after a
    # BatchNorm after a conv) and 2 MaxPools; none repeats another, so each is a finding of one node
    by_path = {f.pattern: f for f in cnn.findings}
    assert sorted(by_path) == sorted(f"features.{i}" for i in (1, 2, 3, 5, 6, 7, 9, 10))
    assert all(f.nodes == 1 for f in cnn.findings)
    for conv, bn in (("features.0", "features.1"), ("features.4", "features.5"), ("features.8", "features.9")):
        fix = by_path[bn].suggestion
        assert fix.startswith("in eval mode a BatchNorm is a fixed per-channel scale and shift")
        assert "fold it into the weights of the op before it" in fix and "here a conv" in fix
        assert "torch.fx.experimental.optimization.fuse(model)" in fix
        assert f'torch.ao.quantization.fuse_modules(model, [["{conv}", "{bn}"]])' in fix
        assert "torch.compile" in fix and "torch._inductor.config.freezing = True" in fix
    for relu in ("features.2", "features.6", "features.10"):
        fix = by_path[relu].suggestion
        assert "fold the BatchNorm before it into the conv" in fix and "epilogue" in fix
    for pool in ("features.3", "features.7"):
        fix = by_path[pool].suggestion
        assert fix.startswith("pooling is a windowed reduction") and "strided convolution" in fix
        assert "elementwise" not in fix


def test_conv_net_advice_never_points_at_optimize_which_rewrites_none_of_it(cnn):
    assert not [f.pattern for f in cnn.findings if "shapeprof.optimize" in f.suggestion]
    rendered = to_text(cnn, width=120, color=False) + markdown_sections(cnn)["4-findings"]
    assert "shapeprof.optimize" not in rendered
    # the oracle: optimize itself finds nothing to fuse in it
    fast = shapeprof.optimize(SmallCNN().eval(), torch.randn(8, 3, 32, 32), rewrites=["fuse_linear_activation"])
    assert fast.shapeprof_report.applied == [] and fast.shapeprof_report.skipped == []


def test_an_activation_straight_after_a_linear_points_at_optimize_which_fuses_it():
    # MLP(64 -> 256 -> 256 -> 32) on 64 rows, fp32: the Linears are compute-bound, their ReLUs are not
    model, x = MLP(d_in=64, d_hidden=256, d_out=32).eval(), torch.randn(64, 64)
    report = shapeprof.analyze(model, x)
    advised = sorted(f.pattern for f in report.findings if "shapeprof.optimize" in f.suggestion)
    assert advised == ["blocks.0.1", "blocks.1.1"]
    relus = [f for f in report.findings if f.op == "ReLU"]
    assert relus and all("comes straight from a Linear" in f.suggestion for f in relus)
    # the oracle: optimize fuses exactly those activations ("blocks.0.0 -> blocks.0.1 (mlp.py:42)")
    fast = shapeprof.optimize(model, x, rewrites=["fuse_linear_activation"])
    fused = sorted(m.where.split(" -> ")[1].split(" (")[0] for m in fast.shapeprof_report.applied)
    assert fused == advised


class _MatmulRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 256))

    def forward(self, x):
        return torch.relu(torch.mm(x, self.w))   # a matmul, but no Linear: the fusing rewrite does not match it


@pytest.mark.parametrize("model, shape, op, expected", [
    (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()), (8, 3, 16, 16), "ReLU",
     "fuse it into the convolution before it as an epilogue"),
    (nn.Sequential(nn.Linear(64, 256), nn.Sigmoid()), (512, 64), "Sigmoid",
     "fuse it into the matmul before it as an epilogue"),
    (_MatmulRelu(), (512, 64), "relu", "fuse it into the matmul before it as an epilogue"),
], ids=["conv-relu", "linear-sigmoid", "mm-relu"])
def test_activations_optimize_cannot_fuse_get_other_advice(model, shape, op, expected):
    report = shapeprof.analyze(model.eval(), torch.randn(*shape))
    (finding,) = [f for f in report.findings if f.op == op]
    assert expected in finding.suggestion and "shapeprof.optimize" not in finding.suggestion


def test_batch_norm_in_training_is_not_folded():
    report = shapeprof.analyze(SmallCNN().train(), torch.randn(8, 3, 32, 32))
    bns = [f for f in report.findings if f.op == "BatchNorm2d"]
    assert len(bns) == 3
    for f in bns:
        assert f.suggestion.startswith("in training a BatchNorm computes batch statistics")
        assert "fold it" not in f.suggestion and "shapeprof.optimize" not in f.suggestion


def _attention_advice(report):
    return [f.suggestion for f in report.findings if f.op == "scaled_dot_product_attention"]


CACHE_WORDS = ("cache", "decod", "speculative")


def test_encoder_attention_advice_says_nothing_of_caches_or_decoding():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=128, vocab_size=1000)).eval()
    swin = transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2],
                                                          num_heads=[2], window_size=4)).eval()
    bert_report = shapeprof.analyze(bert, torch.zeros(2, 16, dtype=torch.long))
    advice = _attention_advice(bert_report)
    assert advice and all("packing" in a for a in advice)        # 16 tokens per head: a memory-bound attention
    for report in (bert_report, shapeprof.analyze(swin, torch.randn(1, 3, 32, 32))):
        text = " ".join(f.suggestion + f.why for f in report.findings).lower()
        assert report.findings and not any(word in text for word in CACHE_WORDS)


def test_decoder_reading_a_cache_is_told_about_caches():
    transformers = pytest.importorskip("transformers")
    c = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1000)
    model = transformers.LlamaForCausalLM(c).eval()
    with torch.no_grad():
        cache = model(torch.zeros(1, 200, dtype=torch.long)).past_key_values
    report = shapeprof.analyze(model, torch.zeros(1, 1, dtype=torch.long), past_key_values=cache)
    advice = _attention_advice(report)
    assert advice and all("KV cache" in a and "201 cached keys" in a for a in advice)
