"""shapeprof/shapes.py: GEMM shapes against tensor-core alignment and wave quantization."""
import io
import json
from collections import Counter

import pytest
import torch
import torch.nn as nn
from rich.console import Console

import shapeprof
from examples.nanogpt import GPT, GPTConfig
from shapeprof.costs import _REGISTRY, cost_of
from shapeprof.shapes import GEMM_OPS, Dim, alignment, gemms, padded, shape_advice

BF16 = torch.bfloat16
A100_BF16, A100_FP32, A100_TF32 = 312e12, 19.5e12, 156e12   # dense tensor-core / vector peaks, A100 datasheet


def _gpt(vocab, n_layer=2, n_embd=768, n_head=12, block_size=1024, **kw):
    with torch.device("meta"):
        return GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                             block_size=block_size, **kw))


def _tokens(b, t):
    return shapeprof.InputShape((b, t), torch.long)


def _only(items, **match):
    found = [x for x in items if all(getattr(x, k) == v for k, v in match.items())]
    assert len(found) == 1, found
    return found[0]


def _check_flops_against_registry(report, listed):
    """Every Gemm's 2 x batch x M x N x K equals the cost registry's FLOPs for the records it stands for."""
    by_name = {cn.node.name: cn for cn in report.graph_capture.nodes}
    for g in listed:
        for name in g.nodes:
            rec = next(r for r in by_name[name].records if r.name == g.op)
            assert cost_of(rec).flops == g.flops == 2 * g.batch * g.M * g.N * g.K


def test_every_gemm_op_is_matmul_class_in_the_cost_registry():
    for name in GEMM_OPS:
        packet = getattr(torch.ops.aten, name.removeprefix("aten."))
        assert _REGISTRY[packet].matmul, name


def test_alignment_is_16_bytes_and_padding_is_to_64():
    assert [alignment(d) for d in (torch.float16, BF16, torch.float32, torch.int8, torch.float8_e4m3fn)] == \
        [8, 8, 4, 16, 16]   # 16 bytes / 2, 2, 4, 1, 1 bytes per element
    assert padded(50257) == 50304 == 786 * 64   # nanoGPT's padded GPT-2 vocabulary
    assert (padded(768), padded(1), padded(1000)) == (768, 64, 1024)


def test_gpt2_vocab_lm_head_is_flagged_and_the_padded_vocab_is_not():
    report = shapeprof.analyze(_gpt(50257), _tokens(1, 64), dtype=BF16)
    advice = shape_advice(report)
    head = _only(advice.gemms, where="lm_head")
    # inference: only the last position's logits, x[:, [-1], :] (1, 1, 768) @ W^T (768, 50257)
    assert (head.op, head.batch, head.M, head.N, head.K, head.count) == ("aten.mm", 1, 1, 50257, 768, 1)
    assert head.flops == 77194752        # 2 * 1 * 50257 * 768
    _check_flops_against_registry(report, advice.gemms)
    finding = _only(advice.alignment, gemm=head)
    assert finding.dims == (Dim("N", 50257, 50304, "weight", True),)   # K = 768 = 96 x 8 is aligned; M = 1 a gemv
    assert [f.gemm.where for f in advice.alignment] == ["lm_head"]      # 768, 2304, 3072 are all multiples of 8

    aligned = shape_advice(shapeprof.analyze(_gpt(50304), _tokens(1, 64), dtype=BF16))
    assert aligned.alignment == ()
    assert _only(aligned.gemms, where="lm_head").N == 50304


def test_padding_gains_when_compute_bound_and_not_when_memory_bound():
    # memory-bound (decode-like, M = 1): both times are bytes / bandwidth, and padding adds bytes
    decode = shape_advice(shapeprof.analyze(_gpt(50257), _tokens(1, 64), dtype=BF16)).alignment[0]
    # read (1*768 + 768*50257) * 2 B = 77,196,288, written 50257 * 2 = 100,514: 77,296,802 B; at the vector peak
    # the 77.2 MFLOP take 3.96 us against 37.9 us of bytes: memory-bound
    assert (decode.unaligned_bound, decode.padded_bound) == ("memory", "memory")
    # padding N by 47 adds 768*47*2 = 72,192 B read and 47*2 = 94 B written
    assert decode.padded_bytes == 77369088 and decode.padded_flops == 77266944   # 2 * 768 * 50304
    assert decode.gain == pytest.approx(77296802 / 77369088, rel=1e-12)
    assert 0.99 < decode.gain < 1

    # compute-bound (training: logits for all 8 x 1024 tokens): M = 8192
    report = shapeprof.analyze(_gpt(50257), _tokens(8, 1024), _tokens(8, 1024), dtype=BF16)
    train = _only(shape_advice(report).alignment, dims=(Dim("N", 50257, 50304, "weight", True),))
    assert (train.gemm.M, train.gemm.flops) == (8192, 632379408384)     # 2 * 8192 * 50257 * 768
    assert train.padded_flops == 632970805248                          # 2 * 8192 * 50304 * 768
    assert (train.unaligned_bound, train.padded_bound) == ("compute", "compute")
    assert train.unaligned_seconds == pytest.approx(632379408384 / A100_FP32, rel=1e-12)   # 32.4 ms
    assert train.padded_seconds == pytest.approx(632970805248 / A100_BF16, rel=1e-12)      # 2.03 ms
    # (F / 19.5T) / (F * 50304/50257 / 312T) = 16 x 50257 / 50304: the upper bound of the model
    assert train.gain == pytest.approx(16 * 50257 / 50304, rel=1e-12)
    assert train.saved_seconds == pytest.approx(train.unaligned_seconds - train.padded_seconds, rel=1e-12)


def test_8_bit_gemms_need_16_elements_and_fp32_needs_tf32_to_gain():
    fc = nn.Linear(1000, 4096, device="meta")
    x = shapeprof.InputShape((4096, 1000))
    assert shape_advice(shapeprof.analyze(fc, x, dtype=BF16)).alignment == ()   # 1000 = 125 x 8
    w8a8 = shape_advice(shapeprof.analyze(fc, x, dtype="int8"))
    assert (w8a8.gemms[0].dtype, w8a8.gemms[0].alignment) == ("int8", 16)
    assert w8a8.alignment[0].dims == (Dim("K", 1000, 1024, "weight", True),)  # 1000 = 62 x 16 + 8

    head = nn.Linear(768, 1001, device="meta")
    x = shapeprof.InputShape((4096, 768))
    # fp32 without TF32 never runs on tensor cores: both sides at the 19.5 TFLOP/s vector peak, and padding
    # 1001 -> 1024 only adds FLOPs (compute-bound: 6.3 GFLOP take 323 us against 15.7 us of bytes)
    plain = shape_advice(shapeprof.analyze(head, x, dtype=torch.float32)).alignment[0]
    assert plain.gemm.alignment == 4 and plain.gain == pytest.approx(1001 / 1024, rel=1e-12)
    tf32 = shape_advice(shapeprof.analyze(head, x, dtype="tf32"), tf32=True).alignment[0]
    assert tf32.gain == pytest.approx(A100_TF32 / A100_FP32 * 1001 / 1024, rel=1e-12)   # 8 x 1001 / 1024


def _linear_waves(m, spec="a100-80gb-sxm"):
    fc = nn.Linear(1024, 4096, device="meta")
    return shape_advice(shapeprof.analyze(fc, shapeprof.InputShape((m, 1024)), dtype=BF16, spec=spec))


def test_wave_quantization_of_a_linear_on_a100():
    # M = 512: ceil(512/128) x ceil(4096/128) = 4 x 32 = 128 tiles on 108 SMs -> 2 waves, 128 / 216 busy
    w = _linear_waves(512).waves[0]
    assert (w.gemm.M, w.gemm.N, w.tiles, w.waves) == (512, 4096, 128, 2)
    assert w.efficiency == 128 / 216 and w.tile_efficiency == 1.0
    # whole waves need 32 x rows = 108 x n: rows a multiple of 108 / gcd(108, 32) = 27 -> M = 27 x 128 = 3456
    assert w.fill_m == 3456 and w.fill_batch is None
    assert w.ideal_seconds == pytest.approx(4294967296 / A100_BF16, rel=1e-12)            # 2*512*1024*4096
    assert w.quantized_seconds == pytest.approx(2 * 2 * 128 * 128 * 1024 * 108 / A100_BF16, rel=1e-12)
    assert w.lost_seconds == pytest.approx(w.quantized_seconds - w.ideal_seconds, rel=1e-12)

    # M = 432 still has ceil(432/128) = 4 tile rows: the same 128 tiles, now with 432/512 of them useful
    w = _linear_waves(432).waves[0]
    assert (w.tiles, w.waves, w.efficiency, w.tile_efficiency) == (128, 2, 128 / 216, 432 / 512)
    # M = 384: 3 x 32 = 96 tiles, one wave with 12 SMs idle: 96 / 108 = 0.889 < 0.9
    w = _linear_waves(384).waves[0]
    assert (w.tiles, w.waves, w.efficiency, w.fill_m) == (96, 1, 96 / 108, 3456)
    # M = 3456: 27 x 32 = 864 = 8 x 108 tiles: whole waves, nothing flagged
    assert _linear_waves(3456).waves == ()
    # M = 1 leaves 76 of 108 SMs idle (32 tiles), but it is memory-bound (intensity ~1 FLOP/B): not flagged
    assert _linear_waves(1).waves == () and _linear_waves(1).gemms[0].bound == "memory"
    # H100 SXM has 132 SMs: 128 tiles are one wave, 128 / 132 = 0.97 busy
    assert _linear_waves(512, spec="h100-sxm").waves == ()


class _Products(nn.Module):
    """Each GEMM op the dispatcher records for these calls: mm, addmm, bmm, baddbmm, addbmm."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(256, 96))
        self.bias = nn.Parameter(torch.empty(96))

    def forward(self, x, p, q):
        a = torch.mm(x, self.w)                  # (40, 256) @ (256, 96)
        b = torch.addmm(self.bias, x, self.w)    # the same product with a bias
        c = torch.bmm(p, q)                      # (2, 1024, 1024) @ (2, 1024, 1024)
        d = torch.baddbmm(c, p, q)
        e = torch.addbmm(a[:1, :1], p[:, :40, :16], q[:, :16, :96])   # sums 2 products (40, 16) @ (16, 96)
        return a, b, c, d, e


def test_each_gemm_op_gives_its_dims_and_the_registrys_flops():
    x = shapeprof.InputShape((40, 256))
    pq = shapeprof.InputShape((2, 1024, 1024))
    report = shapeprof.analyze(_Products().to("meta"), x, pq, pq, dtype=BF16, method="dispatch")
    advice = shape_advice(report)
    assert Counter((g.op, g.batch, g.M, g.N, g.K) for g in advice.gemms) == Counter({
        ("aten.mm", 1, 40, 96, 256): 1, ("aten.addmm", 1, 40, 96, 256): 1,
        ("aten.bmm", 2, 1024, 1024, 1024): 1, ("aten.baddbmm", 2, 1024, 1024, 1024): 1,
        ("aten.addbmm", 1, 40, 96, 32): 1,      # K = 2 batches x 16
    })
    _check_flops_against_registry(report, advice.gemms)
    # a compute-bound bmm: 2 x 8 x 8 = 128 tiles, 2 waves; whole waves need batch x 64 tiles = 108 x n, a batch
    # multiple of 108 / gcd(108, 64) = 27; or 2 x 8 x rows = 108 x n, rows a multiple of 27 -> M = 3456
    w = _only(advice.waves, gemm=_only(advice.gemms, op="aten.bmm"))
    assert (w.tiles, w.waves, w.fill_batch, w.fill_m) == (128, 2, 27, 3456)


def test_repeated_layers_list_each_gemm_once_with_its_calls():
    report = shapeprof.analyze(_gpt(256, n_layer=8, n_embd=64, n_head=4, block_size=64), _tokens(2, 16), dtype=BF16)
    assert report.capture.reused_nodes > 0       # layers 1-7 took layer 0's records
    listed = gemms(report)
    # 2 x 16 = 32 tokens through c_attn 64 -> 192, c_proj 64 -> 64, c_fc 64 -> 256, mlp.c_proj 256 -> 64 in each of
    # 8 layers; lm_head sees the last token of each sequence: M = 2
    assert {(g.where, g.M, g.N, g.K): g.count for g in listed} == {
        ("transformer.h.*.attn.c_attn", 32, 192, 64): 8, ("transformer.h.*.attn.c_proj", 32, 64, 64): 8,
        ("transformer.h.*.mlp.c_fc", 32, 256, 64): 8, ("transformer.h.*.mlp.c_proj", 32, 64, 256): 8,
        ("lm_head", 2, 256, 64): 1,
    }
    fc = _only(listed, where="transformer.h.*.mlp.c_fc")
    assert fc.module_paths == ("transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc")
    assert fc.flops == 1048576                   # 2 * 32 * 256 * 64 per call
    _check_flops_against_registry(report, listed)
    # the listed times are the report's: every call of every GEMM node adds up to the same total
    assert sum(g.count for g in listed) == sum(cn.repeats for cn in report.graph_capture.nodes
                                               for r in cn.records if r.name in GEMM_OPS) == 33


def test_one_gemm_in_two_modules_is_listed_once_naming_both():
    class Attention(nn.Module):                  # wq and wo: the same 64 x 64 product, as in a Llama
        def __init__(self):
            super().__init__()
            self.wq, self.wo = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.wo(torch.relu(self.wq(x)))

    [g] = gemms(shapeprof.analyze(Attention(), torch.randn(16, 64), dtype=BF16))
    assert (g.M, g.N, g.K, g.count, g.where, g.module_paths) == (16, 64, 64, 2, "wq (+1 more)", ("wq", "wo"))


def test_folded_loop_steps_count_as_calls():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(64, 64))

        def forward(self, x):
            for _ in range(6):
                x = x @ self.w                   # (16, 64) @ (64, 64), six times
            return x

    report = shapeprof.analyze(Loop().to("meta"), shapeprof.InputShape((16, 64)), dtype=BF16, method="dispatch")
    assert max(cn.repeats for cn in report.graph_capture.nodes) > 1      # the loop folded into a node
    [g] = gemms(report)
    assert (g.op, g.M, g.N, g.K, g.count) == ("aten.mm", 16, 64, 64, 6)


def test_export_and_dispatch_captures_list_the_same_gemms():
    # export keeps aten.linear and aten.matmul; dispatch records addmm/mm and bmm: the same products
    model = GPT(GPTConfig.tiny(flash=False))     # attention spelt out: q @ k^T and att @ v
    x = _tokens(2, 16)

    def listed(method):
        report = shapeprof.analyze(model, x, dtype=BF16, method=method)
        assert report.capture.method == method
        found = gemms(report)
        _check_flops_against_registry(report, found)
        return Counter({(g.where, g.batch, g.M, g.N, g.K, g.flops): g.count for g in found})

    exported, dispatched = listed("export"), listed("dispatch")
    assert exported == dispatched
    # per layer, 2 x 4 heads of (16, 16) @ (16, 16) twice (scores, then values): 2 layers -> 4 calls
    assert exported[("transformer.h.*.attn", 8, 16, 16, 16, 65536)] == 4   # 2 * 8 * 16 * 16 * 16


def test_to_dict_is_plain_json_and_the_text_shows_the_padding():
    report = shapeprof.analyze(_gpt(50257), _tokens(8, 1024), _tokens(8, 1024), dtype=BF16)
    advice = shape_advice(report)
    d = advice.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["alignment"][0]["dims"] == [{"name": "N", "size": 50257, "padded": 50304, "set_by": "weight",
                                          "priced": True}]
    assert d["tile"] == [128, 128] and d["sm_count"] == 108 and "vector" in d["gain_model"]

    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(advice)
    text = console.file.getvalue()
    assert "N 50257->50304" in text and "50257*" in text and "Wave quantization" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "N 50257->50304" in str(advice)


def test_a_report_read_back_from_json_has_no_graph_to_advise_on():
    report = shapeprof.analyze(nn.Linear(8, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="graph_capture"):
        shape_advice(shapeprof.Report.from_json(report.to_json()))
