"""analyze(): costs and rooflines of real models, against hand arithmetic and FlopCounterMode."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import shapeprof
from examples.cnn import SmallCNN
from examples.llama import LlamaConfig, Transformer
from examples.mlp import MLP, FunctionalMLP
from examples.nanogpt import GPT, GPTConfig
from shapeprof.analysis import UncoveredOpError

BF16 = 2


def test_seed_example_linear_is_compute_bound_at_batch_512_and_memory_bound_at_batch_1():
    layer = nn.Linear(1024, 4096)
    big = shapeprof.analyze(layer, torch.randn(512, 1024), dtype=torch.bfloat16)
    (node,) = big.nodes
    assert node.flops == 2 * 512 * 1024 * 4096                        # M*K*N multiply-adds, 2 FLOPs each
    assert node.bytes_read == BF16 * (512 * 1024 + 1024 * 4096 + 4096)  # x, weight, bias
    assert node.bytes_written == BF16 * 512 * 4096                      # y
    assert 310 < node.intensity < 320 and node.bound == "compute"
    assert node.ridge == pytest.approx(312e12 / 2.039e12)
    assert node.predicted_seconds == pytest.approx(node.flops / 312e12)

    small = shapeprof.analyze(layer, torch.randn(1, 1024), dtype=torch.bfloat16)
    (node,) = small.nodes
    assert node.flops == 2 * 1024 * 4096
    assert node.bytes == BF16 * (1024 + 1024 * 4096 + 4096 + 4096)
    assert 0.99 < node.intensity < 1.01 and node.bound == "memory"
    assert node.predicted_seconds == pytest.approx(node.bytes / 2.039e12)
    assert small.findings and "rows per call it would reach the ridge" in small.findings[0].suggestion


def test_suggested_batch_reaches_the_ridge():
    layer = nn.Linear(1024, 4096, bias=False)
    finding = shapeprof.analyze(layer, torch.randn(8, 1024), dtype=torch.bfloat16).findings[0]
    rows = int(finding.suggestion.split("at about ")[1].split(" rows")[0])
    at = shapeprof.analyze(layer, torch.randn(rows, 1024), dtype=torch.bfloat16).nodes[0]
    below = shapeprof.analyze(layer, torch.randn(rows - 2, 1024), dtype=torch.bfloat16).nodes[0]
    assert at.bound == "compute" and below.bound == "memory"


MATMUL_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution", "aten.linear"}


def _matmul_flops(report):
    return sum(a.flops for n in report.nodes for a in n.aten if a.op in MATMUL_OPS)


@pytest.mark.parametrize("build, make_input", [
    (lambda: MLP(64, 256, 64), lambda: torch.randn(8, 64)),
    (lambda: FunctionalMLP(64, 256, 64, activation="gelu"), lambda: torch.randn(8, 64)),
    (lambda: SmallCNN().eval(), lambda: torch.randn(2, 3, 32, 32)),
    (lambda: Transformer(LlamaConfig.tiny()).eval(), lambda: torch.zeros(2, 16, dtype=torch.long)),
])
def test_flops_equal_flop_counter_mode_where_it_counts(build, make_input):
    model, x = build(), make_input()
    with FlopCounterMode(display=False) as counter:
        model(x)
    report = shapeprof.analyze(model, x)
    # FlopCounterMode counts matmuls and convolutions only (and on CPU gives the fused SDPA kernel 0, so the
    # Llama's attention is left out of both sides); we count those ops to the same integer
    assert _matmul_flops(report) == counter.get_total_flops()
    assert report.coverage.complete


def test_gpt_total_matches_the_analytic_count():
    # nanoGPT GPT-2 (124M) on meta, 1024 tokens, full logits (with targets)
    c = GPTConfig.gpt2()
    with torch.device("meta"):
        model = GPT(c)
    T, L, d, V = 1024, c.n_layer, c.n_embd, c.vocab_size
    idx = torch.zeros(1, T, dtype=torch.long, device="meta")
    report = shapeprof.analyze(model, idx, idx)
    weights = L * 12 * d * d + d * V          # per layer c_attn 3d^2 + c_proj d^2 + MLP 8d^2; lm_head d*V
    attention = L * 2 * 2 * d * (T * (T + 1) // 2)   # QK^T and PV over the causal half, all heads together
    analytic = 2 * weights * T + attention
    assert report.total.flops == pytest.approx(analytic, rel=0.01)
    assert report.capture.method == "dispatch"      # assert t <= block_size: symbolic_trace cannot


def test_llama_8b_and_405b_on_meta():
    for cfg, layers in ((LlamaConfig.llama3_8b(), 32), (LlamaConfig.llama3_405b(), 126)):
        with torch.device("meta"):
            model = Transformer(cfg)
        T = 2048
        report = shapeprof.analyze(model, shapeprof.InputShape((1, T), torch.long), dtype=torch.bfloat16)
        d, hd, H, KV, F = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim
        weights = layers * (d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * F) + d * cfg.vocab_size
        attention = layers * 2 * 2 * H * hd * (T * (T + 1) // 2)
        assert report.total.flops == pytest.approx(2 * weights * T + attention, rel=0.01)
        assert report.capture.method == "symbolic_trace"
        assert report.capture.reused_nodes > (layers - 2) * 40
        assert report.parameter_bytes == BF16 * sum(p.numel() for p in model.parameters())
        wq = [n for n in report.nodes if n.module_path == f"layers.{layers - 1}.attention.wq"]
        assert len(wq) == 1 and wq[0].bound == "compute"
        assert report.coverage.complete


def test_dtype_changes_bytes_and_peaks_but_not_flops():
    model = MLP(256, 1024, 256)
    x = torch.randn(4, 256)
    f32 = shapeprof.analyze(model, x)
    bf16 = shapeprof.analyze(model, x, dtype=torch.bfloat16)
    assert f32.total.flops == bf16.total.flops
    assert bf16.total.bytes * 2 == f32.total.bytes
    assert bf16.dtype == "bfloat16" and f32.dtype is None
    assert bf16.nodes[0].ridge > f32.nodes[0].ridge   # tensor cores for bf16, vector units for fp32


def test_spec_by_name_file_and_object(tmp_path):
    model, x = nn.Linear(64, 64), torch.randn(4, 64)
    h100 = shapeprof.analyze(model, x, spec="h100-sxm")
    assert h100.spec.name == "h100-sxm"
    path = shapeprof.get_spec("h200").save(tmp_path / "mine.toml")
    assert shapeprof.analyze(model, x, spec=path).spec == shapeprof.get_spec("h200")
    with pytest.raises(shapeprof.SpecError, match="a100-80gb-sxm"):
        shapeprof.analyze(model, x, spec="a100x")


class Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(33, 8)

    def forward(self, x):
        return self.proj(torch.fft.rfft(x).abs())


def test_uncovered_ops_are_listed_with_their_bytes_and_strict_raises():
    report = shapeprof.analyze(Spectral(), torch.randn(4, 64))
    (op,) = report.coverage.ops
    assert op.op == "aten._fft_r2c" and op.count == 1 and op.bytes > 0
    assert 0 < op.share_of_bytes < 1
    node = next(n for n in report.nodes if n.uncovered)
    assert node.uncovered == ("aten._fft_r2c",)
    with pytest.raises(UncoveredOpError, match=r"aten\._fft_r2c \(1x, first at node"):
        shapeprof.analyze(Spectral(), torch.randn(4, 64), strict=True)


def test_node_meta_holds_the_node_stats():
    report = shapeprof.analyze(MLP(32, 64, 32), torch.randn(2, 32))
    gm = report.graph_module
    stats = [n.meta[shapeprof.META_KEY] for n in gm.graph.nodes if shapeprof.META_KEY in n.meta]
    assert stats == report.nodes


def test_rollups_add_up_to_the_total():
    report = shapeprof.analyze(Transformer(LlamaConfig.tiny(n_layers=3)), torch.zeros(1, 8, dtype=torch.long))
    for rows in (report.by_module(), report.by_module(1), report.by_module(2, repeats=True), report.by_op(),
                 report.by_pattern()):
        assert sum(r.flops for r in rows) == report.total.flops
        assert sum(r.predicted_seconds for r in rows) == pytest.approx(report.total.predicted_seconds)
        assert sum(r.share for r in rows) == pytest.approx(1.0)
    groups = report.repeat_groups()
    assert sum(len(g) for g in groups) == len(report.nodes)
    # the pattern is the report's (it depends on the node's sibling layers), not the node's own
    wq = next(g for g in groups if report.pattern_of(g[0]) == "layers.*.attention.wq")
    assert [n.module_path for n in wq] == [f"layers.{i}.attention.wq" for i in range(3)]
    layers = {r.key: r for r in report.by_module(1)}
    assert layers["layers"].nodes == sum(1 for n in report.nodes if n.module_path.startswith("layers."))


def test_kwargs_reach_the_model_and_model_outputs_can_be_anything():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x, *, extra=None):
            h = self.a(x)
            return {"logits": self.b(h), "aux": (h, None if extra is None else self.b(extra))}

    model = Head()
    one = shapeprof.analyze(model, torch.randn(3, 8))
    two = shapeprof.analyze(model, torch.randn(3, 8), extra=torch.randn(3, 8))
    assert len(two.nodes) == len(one.nodes) + 1


def test_user_model_is_unchanged_by_analysis():
    model = GPT(GPTConfig.tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapeprof.analyze(model, torch.zeros(1, 8, dtype=torch.long), dtype=torch.bfloat16)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)


def test_multihead_attention_is_priced_as_the_fused_kernel_and_the_report_says_so():
    class Block(nn.Module):        # as torchvision's ViT encoder block calls it
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(64)
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x):
            y = self.ln(x)
            return x + self.attn(y, y, y, need_weights=False)[0]

    report = shapeprof.analyze(Block().eval(), torch.randn(2, 17, 64), dtype=torch.float16)
    ops = [a.op for n in report.nodes for a in n.aten]
    assert "aten.scaled_dot_product_attention" in ops
    assert not {"aten.bmm", "aten._safe_softmax", "aten._softmax", "aten._to_copy"} & set(ops)   # no decomposition
    sdpa = next(a for n in report.nodes for a in n.aten if a.op == "aten.scaled_dot_product_attention")
    # q, k, v read and the output written once, fp16 (2 x 4 heads x 17 x 16): no score matrix
    assert sdpa.bytes == 4 * (2 * 4 * 17 * 16) * 2
    assert sdpa.flops == 2 * 2 * 4 * 17 * 17 * (16 + 16)
    assert any("fused kernel" in note for note in report.notes)
