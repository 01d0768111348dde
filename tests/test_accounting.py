"""shapeprof.accounting: the eager and the fused accounting of one analysed forward."""
import json

import pytest
import torch
import torch.nn as nn

import shapeprof
from shapeprof.accounting import accountings
from shapeprof.report import Report

from examples.nanogpt import GPT, GPTConfig


def _checked(report):
    """accountings(report), with what must hold on every model: eager is the report, fused runs the same ops."""
    acc = accountings(report)
    eager, fused, t = acc["eager"], acc["fused"], report.total
    assert (eager.flops, eager.bytes_read, eager.bytes_written, eager.predicted_seconds) == \
        (t.flops, t.bytes_read, t.bytes_written, t.predicted_seconds)
    # eager launches one kernel per costed ATen op, each call of a folded loop node counted
    assert eager.kernels == sum(len(n.aten) * n.repeats for n in report.nodes)
    assert sum(k.bytes for k in eager.kernels_detail) == t.bytes
    assert fused.flops == eager.flops                 # fusion moves less, computes the same
    assert fused.bytes <= eager.bytes and fused.kernels <= eager.kernels
    for a in acc.values():
        d = json.loads(json.dumps(a.to_dict()))
        assert (d["name"], d["flops"], d["kernels"], len(d["kernels_detail"])) == \
            (a.name, a.flops, a.kernels, len(a.kernels_detail))
    return acc


def _roofline(kernel, spec, dtype, matmul):
    return max(kernel.flops / spec.peak_for(dtype, matmul=matmul), kernel.bytes / spec.memory_bandwidth)


def test_linear_gelu_linear_fuses_the_gelu_into_the_first_gemm():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    report = shapeprof.analyze(mlp, torch.randn(4, 16))
    assert report.capture.method == "symbolic_trace"
    acc = _checked(report)
    eager, fused = acc["eager"], acc["fused"]
    # fp32. Linear 1: reads x 4*16*4 = 256, W 16*32*4 = 2048, b 32*4 = 128, writes 4*32*4 = 512 -> 2944;
    # GELU reads 512, writes 512 -> 1024; Linear 2: reads 512 + 32*8*4 = 1024 + 8*4 = 32, writes 4*8*4 = 128 -> 1696
    assert eager.bytes == 2944 + 1024 + 1696 == 5664
    assert eager.kernels == 3
    # fused: the GELU's read of Linear 1's output and Linear 1's write of it both disappear
    assert fused.bytes == 5664 - 512 - 512 == 4640
    assert [k.kind for k in fused.kernels_detail] == ["matmul + epilogue", "matmul"]
    assert fused.kernels == 2
    first = fused.kernels_detail[0]
    assert first.nodes == ("_0", "_1") and first.ops == ("aten.addmm", "aten.gelu")
    # 2*4*16*32 = 4096 + the GELU's 4*32 = 128; reads x, W, b = 2432, writes the GELU's output 512
    assert (first.flops, first.bytes_read, first.bytes_written) == (4224, 2432, 512)
    assert first.seconds == _roofline(first, report.spec, torch.float32, matmul=True)
    assert fused.predicted_seconds < eager.predicted_seconds


def test_conv_batchnorm_relu_in_inference_is_one_kernel():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1)).eval()
    acc = _checked(shapeprof.analyze(model, torch.randn(2, 3, 16, 16)))
    assert [(k.kind, k.ops) for k in acc["fused"].kernels_detail] == [
        ("matmul + epilogue", ("aten.convolution", "aten.native_batch_norm", "aten.relu")),
        ("matmul", ("aten.convolution",))]
    # fp32, the activation (2, 8, 16, 16) = 16384 bytes: gone are the conv's write of it, the batch norm's read of
    # it and its write (y 16384 + its two saved 8-channel statistics 64), and the ReLU's read
    assert acc["fused"].bytes == acc["eager"].bytes - 16384 - 16384 - (16384 + 64) - 16384


class RMSNorm(nn.Module):
    """As transformers' LlamaRMSNorm writes it."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm spelled out in elementwise ops and reductions."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        var = (xc * xc).mean(-1, keepdim=True)
        return xc * torch.rsqrt(var + self.eps) * self.weight + self.bias


def test_hf_rmsnorm_is_one_kernel_reading_x_and_the_weight_and_writing_y():
    report = shapeprof.analyze(RMSNorm(64), torch.randn(2, 8, 64), dtype=torch.bfloat16)
    assert report.capture.method == "symbolic_trace"
    acc = _checked(report)
    # eager, x (2, 8, 64) = 1024 elements: to fp32 reads 2048 writes 4096; pow 4096 + 4096; mean 4096 + 16*4;
    # add eps 64 + 64; rsqrt 64 + 64; mul 4096 + 64 + 4096; to bf16 4096 + 2048; * weight 128 + 2048 + 2048
    assert acc["eager"].bytes == 6144 + 8192 + 4160 + 128 + 128 + 8256 + 6144 + 4224 == 37376
    assert acc["eager"].kernels == 8
    (kernel,) = acc["fused"].kernels_detail
    assert kernel.kind == "fused elementwise" and len(kernel.ops) == 8
    assert kernel.bytes_read == 1024 * 2 + 64 * 2 == 2176     # x and the weight, bf16
    assert kernel.bytes_written == 1024 * 2 == 2048           # y
    # pow 1024 + mean 1024 + add 16 + rsqrt 16 + mul 1024 + * weight 1024 (casts: 0)
    assert kernel.flops == 4128
    # the kernel computes in fp32 (the upcast): priced at the fp32 vector peak
    assert kernel.seconds == _roofline(kernel, report.spec, torch.float32, matmul=False)


def test_layernorm_spelled_out_is_one_kernel_reading_x_weight_bias_once():
    report = shapeprof.analyze(LayerNorm(64), torch.randn(2, 8, 64))
    acc = _checked(report)
    (kernel,) = acc["fused"].kernels_detail
    # mean, sub, mul, mean, add, rsqrt, mul, mul, add; x is read by the first mean and by the sub: once
    assert len(kernel.ops) == 9 and acc["eager"].kernels == 9
    assert kernel.bytes_read == 1024 * 4 + 64 * 4 + 64 * 4 == 4608   # x, weight, bias (fp32)
    assert kernel.bytes_written == 1024 * 4 == 4096                    # y


@pytest.fixture(scope="module")
def llamas():
    transformers = pytest.importorskip("transformers")
    reports = {}
    for impl in ("eager", "sdpa"):
        # head_dim 64 / 4 = 16; GQA: 2 k/v heads
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                       attn_implementation=impl)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        reports[impl] = shapeprof.analyze(model, shapeprof.InputShape((1, 16), torch.long), dtype=torch.bfloat16)
    return reports


def test_llama_manual_attention_is_one_flash_kernel_that_never_moves_the_scores(llamas):
    report = llamas["eager"]
    assert report.capture.method == "dispatch"
    fused = _checked(report)["fused"]
    attention = [k for k in fused.kernels_detail if k.kind.startswith("attention")]
    assert len(attention) == 2                    # one per layer
    for k in attention:
        assert k.ops.count("aten.bmm") == 2 and "aten._softmax" in k.ops
        # bf16, B=1, T=16: q 4 heads x 16 x 16 x 2 B = 2048; k, v 2 heads: 1024 each (repeat_kv's copies are
        # absorbed); the causal mask (1, 1, 16, 16) = 512, built by a kernel of its own
        assert k.bytes_read == 2048 + 1024 + 1024 + 512
        assert k.bytes_written == 2048            # the output, already in (B, T, H, D): the scores never are
    # no softmax, and so no score matrix, is left outside the attention kernels
    assert not [k for k in fused.kernels_detail if "aten._softmax" in k.ops and k not in attention]


def test_llama_manual_attention_moves_what_sdpa_moves_plus_its_mask(llamas):
    eager_attn = _checked(llamas["eager"])["fused"]
    sdpa = _checked(llamas["sdpa"])["fused"]
    manual = [k for k in eager_attn.kernels_detail if k.kind.startswith("attention")]
    flash = [k for k in sdpa.kernels_detail if k.kind.startswith("attention")]
    assert len(flash) == 2 and all(k.ops[0] == "aten.scaled_dot_product_attention" for k in flash)
    for m, f in zip(manual, flash):
        # the registry's flash-attention formula reads q, k, v (4096) and writes the output (2048): the manual
        # kernel reads the same and the explicit mask (512)
        assert (f.bytes_read, f.bytes_written) == (4096, 2048)
        assert (m.bytes_read, m.bytes_written) == (f.bytes_read + 512, f.bytes_written)
        assert m.flops > f.flops      # the eager count: full 16x16 scores plus softmax, not SDPA's causal half


def test_llama_norms_residuals_and_swiglu(llamas):
    fused = _checked(llamas["sdpa"])["fused"]
    norms = [k for k in fused.kernels_detail if "aten.rsqrt" in k.ops]
    assert len(norms) == 5                        # 2 per layer + the final norm
    # layer 0's input norm: reads the embeddings (1, 16, 64) bf16 = 2048 and the weight 128, writes y 2048
    assert (norms[0].bytes_read, norms[0].bytes_written) == (2048 + 128, 2048)
    # the others take the residual add before them (vLLM's fused_add_rms_norm): read the stream and the block's
    # output (2048 each) and the weight, write the new stream and y; the final norm's stream is read by nothing
    for k in norms[1:4]:
        assert k.ops[0] == "aten.add" and (k.bytes_read, k.bytes_written) == (2048 + 2048 + 128, 2048 + 2048)
    assert (norms[4].bytes_read, norms[4].bytes_written) == (2048 + 2048 + 128, 2048)
    # SwiGLU: gate's GEMM computes silu(gate) * up, reading up's output (1, 16, 128) bf16 = 4096 from memory
    (swiglu, _) = [k for k in fused.kernels_detail if k.kind == "matmul + epilogue"]
    assert swiglu.ops == ("aten.mm", "aten.silu", "aten.mul")
    # x 16 x 64 x 2 = 2048, gate's weight 64 x 128 x 2 = 16384, up's output 4096; writes (16, 128) bf16
    assert (swiglu.bytes_read, swiglu.bytes_written) == (2048 + 16384 + 4096, 4096)


def test_llama_totals_fused_below_eager(llamas):
    for report in llamas.values():
        acc = _checked(report)
        assert acc["fused"].bytes < acc["eager"].bytes
        assert acc["fused"].kernels < acc["eager"].kernels
        assert acc["fused"].predicted_seconds < acc["eager"].predicted_seconds


@pytest.mark.parametrize("flash", [False, True], ids=["manual", "sdpa"])
def test_nanogpt_attention_reads_q_k_v_and_writes_the_output(flash):
    report = shapeprof.analyze(GPT(GPTConfig.tiny(flash=flash)), torch.zeros(1, 16, dtype=torch.long),
                               dtype=torch.bfloat16)
    fused = _checked(report)["fused"]
    attention = [k for k in fused.kernels_detail if k.kind.startswith("attention")]
    assert len(attention) == 2
    # bf16, B=1, T=16, 4 heads of 16: q, k, v and the output 1 x 4 x 16 x 16 x 2 = 2048 bytes each; the manual path
    # also reads its mask: `bias[:, :, :T, :T] == 0`, a (1, 1, 16, 16) bool made by its own kernel (256)
    mask = 0 if flash else 256
    for k in attention:
        assert (k.bytes_read, k.bytes_written) == (3 * 2048 + mask, 2048)


def test_folded_loop_steps_fuse_per_call():
    class Loop(nn.Module):
        def forward(self, x):
            for _ in range(6):
                x = torch.tanh(x) * 0.5
            return x

    report = shapeprof.analyze(Loop(), torch.randn(4, 8), method="dispatch")
    assert report.capture.folded_calls == 8      # steps 3..6 fold into step 2: 4 x (tanh, mul)
    acc = _checked(report)
    # eager: 12 ops, each reads and writes (4, 8) fp32 = 128 bytes
    assert (acc["eager"].kernels, acc["eager"].bytes) == (12, 12 * 256)
    # fused: each step's tanh * 0.5 is one kernel (6 launches: step 1, and step 2 standing for 5 calls)
    assert [(k.nodes, k.calls) for k in acc["fused"].kernels_detail] == \
        [(("tanh_default", "mul_tensor"), 1), (("tanh_default_1", "mul_tensor_1"), 5)]
    assert (acc["fused"].kernels, acc["fused"].bytes) == (6, 6 * 256)


@pytest.mark.parametrize("dtype", ["tf32", "int8"])
def test_eager_reproduces_reports_priced_in_tf32_and_w8a8(dtype):
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    report = shapeprof.analyze(mlp, torch.randn(4, 16), dtype=dtype)
    acc = _checked(report)
    if dtype == "int8":
        # W8A8 as precision.quantise prices a GEMM: x, W and the bias all in 8 bits, 4*16 + 16*32 + 32 bytes; the
        # epilogue's GELU output is bf16, 4*32*2 = 256 bytes
        first = acc["fused"].kernels_detail[0]
        assert (first.bytes_read, first.bytes_written) == (64 + 512 + 32, 256)


def test_a_report_read_back_from_json_has_no_graph_to_fuse():
    report = shapeprof.analyze(nn.Linear(4, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="graph"):
        accountings(Report.from_json(report.to_json()))


def test_gpt2_in_training_mode_fuses_its_dropout_into_the_attention_kernel():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=4, n_embd=64, vocab_size=1000, n_positions=128,
                                  attn_implementation="eager")
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)     # training mode: dropout 0.1 everywhere
    report = shapeprof.analyze(model, shapeprof.InputShape((2, 16), torch.long), dtype=torch.bfloat16)
    fused = _checked(report)["fused"]
    (attention,) = [k for k in fused.kernels_detail if k.kind.startswith("attention")]
    # dropout on the probabilities: bernoulli_ into a fresh tensor, div_, mul; all inside the flash kernel
    assert {"aten.bernoulli_", "aten.div_", "aten._softmax"} <= set(attention.ops)
    # bf16, B=2, T=16, 4 heads of 16: q, k, v 2*4*16*16*2 = 4096 each, the causal mask (2, 1, 16, 16) 1024;
    # writes the output 4096
    assert (attention.bytes_read, attention.bytes_written) == (3 * 4096 + 1024, 4096)
    # no in-place op stays a kernel of its own: every one wrote into a tensor the graph made
    assert not [k for k in fused.kernels_detail if k.kind == "copy" and k.ops[0].endswith("_")]


def test_a_dynamic_cache_append_is_a_write_of_the_new_positions_when_fused():
    transformers = pytest.importorskip("transformers")
    import warnings
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        report = shapeprof.analyze(model, shapeprof.Decode(batch=3, context=50), dtype=torch.bfloat16)
    acc = _checked(report)
    eager = [k for k in acc["eager"].kernels_detail if k.ops == ("aten.cat",) and k.bytes_written > 10_000]
    writes = [k for k in acc["fused"].kernels_detail if k.kind == "cache write"]
    # eager: each layer's keys and values are copied whole, 50 old + 1 new positions: (3, 2 heads, 51, 32) bf16
    assert len(eager) == 4 and all(k.bytes_written == 3 * 2 * 51 * 32 * 2 for k in eager)
    # fused: the new position only, read once and written once: (3, 2, 1, 32) bf16
    assert len(writes) == 4 and all(k.bytes_read == k.bytes_written == 3 * 2 * 1 * 32 * 2 for k in writes)
    assert acc["fused"].bytes < acc["eager"].bytes - sum(k.bytes_written for k in eager) + 4 * 384 * 2
