"""Mixed precision (autocast bf16 with fp32 master weights), priced on meta, against real autocast runs on the CPU
and hand counts."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shapeprof
from examples.nanogpt import GPT, GPTConfig
from shapeprof.backward import capture_backward
from shapeprof.records import OpRecorder
from shapeprof.training import train_step


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))


def real_autocast_run(model, x, y):
    """What a real CPU step under torch.autocast(bf16) saves for backward (unique storages, weights left out) and
    the dtypes of the ops it runs. (CPU autocast and CUDA autocast agree on these ops: linear in bf16, the
    cross-entropy in fp32; they differ on others, layer_norm among them, so the comparison is on an MLP.)"""
    weights = {t.untyped_storage()._cdata for t in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in weights:
            saved.setdefault(s._cdata, s.nbytes())
        return t

    with OpRecorder() as rec:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()), [(r.name, tuple(m.dtype for m in r.outputs)) for r in rec.records
                                 if r.name in ("aten.addmm", "aten.mm", "aten._to_copy", "aten._log_softmax")]


def test_autocast_saves_and_runs_what_a_real_autocast_step_does():
    model, x, y = mlp(), torch.randn(64, 512), torch.zeros(64, dtype=torch.long)
    ours = capture_backward(model, x, loss_fn=F.cross_entropy, targets=(y,), autocast="bf16")
    saved, ops = real_autocast_run(model, x, y)
    assert ours.saved_activation_bytes == saved
    counts = {(o.op, o.phase): o.count for o in ours.ops}
    real_forward = [op for op in ops[:ops.index(("aten._log_softmax", (torch.float32,))) + 1]]
    assert counts[("aten._to_copy", "forward")] == sum(1 for op, _ in real_forward if op == "aten._to_copy") == 6
    assert counts[("aten._to_copy", "backward")] == sum(1 for op, _ in ops if op == "aten._to_copy") - 6
    # the forward's casts by hand: x, both weights and both biases down to bf16, the logits up to fp32 for the
    # cross-entropy; each reads one dtype and writes the other: 4 + 2 bytes per element
    elements = 64 * 512 + 2048 * 512 + 2048 + 512 * 2048 + 512 + 64 * 512
    cast_bytes = next(o.bytes for o in ours.ops if (o.op, o.phase) == ("aten._to_copy", "forward"))
    assert cast_bytes == 6 * elements


def test_autocast_step_keeps_fp32_master_weights_and_prices_bf16_matmuls():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64, dropout=0.0))
    idx = torch.randint(0, 256, (2, 64))
    n = sum(p.numel() for p in model.parameters())
    mixed = train_step(model, idx, idx, autocast="bf16")
    fp32 = train_step(model, idx, idx)
    bf16 = train_step(model, idx, idx, dtype="bf16")
    assert mixed.memory["weights"] == mixed.memory["gradients"] == 4 * n          # fp32 master weights and grads
    assert mixed.memory["optimizer_state"] == fp32.memory["optimizer_state"] == 2 * 4 * n + 4 * len(
        list(model.parameters()))                                                  # exp_avg, exp_avg_sq, step
    assert mixed.optimizer.bytes == fp32.optimizer.bytes                           # the same fp32 update
    assert mixed.peak_flops == bf16.peak_flops == 312e12 != fp32.peak_flops
    assert mixed.model_flops == fp32.model_flops
    # the matmuls run in bf16: the forward's addmm are bf16 ops, priced at the bf16 roof like the bf16 step's
    addmm = {o.phase: o for o in mixed.passes.ops if o.op == "aten.addmm"}
    assert addmm["forward"].seconds == pytest.approx(
        next(o for o in bf16.passes.ops if o.op == "aten.addmm" and o.phase == "forward").seconds)
    casts = [o for o in mixed.passes.ops if o.op == "aten._to_copy"]
    assert {o.phase for o in casts} == {"forward", "backward"}
    # activations: the bf16 copies of the inputs the matmuls save sit between the bf16 and fp32 steps' figures
    assert bf16.memory["activations"] < mixed.memory["activations"] < fp32.memory["activations"] + 4 * n


def test_analyze_and_profile_take_autocast():
    model, x, y = mlp(), torch.randn(16, 512), torch.zeros(16, dtype=torch.long)
    train = shapeprof.Train(loss_fn=F.cross_entropy, targets=(y,), autocast="bf16")
    rep = shapeprof.analyze(model, x, train=train)
    assert rep.training.peak_flops == 312e12
    assert rep.memory["weights"] == 4 * sum(p.numel() for p in model.parameters())
    result = shapeprof.profile(model, x, train=train, steps=2, warmup=1)
    assert result.training.dtype == "bfloat16" and all(s > 0 for s in result.training.phases.values())


def test_autocast_errors_are_one_line():
    model, x = mlp(), torch.randn(4, 512)
    with pytest.raises(ValueError, match="fp32 master weights"):
        capture_backward(model, x, dtype="bf16", autocast="bf16")
    with pytest.raises(ValueError, match="bf16 or fp16"):
        capture_backward(model, x, autocast="fp32")
