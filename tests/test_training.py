"""shapeprof/training.py: a whole training step, against the 6 N T rule and hand counts."""
import json

import pytest
import torch

from examples.llama import LlamaConfig, Transformer
from examples.nanogpt import GPT, GPTConfig
from shapeprof.training import train_step


def matmul_weights(model) -> int:
    """Elements of every Linear's weight (a tied one once): the N of the 6 N T rule."""
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def causal_attention_forward(layers: int, batch: int, heads: int, tokens: int, head_dim: int) -> int:
    # Q K^T and P V, 2 FLOPs per multiply-add, over the T (T + 1) / 2 scores causal attention computes
    return layers * 2 * 2 * batch * heads * (tokens * (tokens + 1) // 2) * head_dim


@pytest.mark.slow
def test_gpt2_small_step_flops_are_6NT_plus_attention_within_1_percent():
    cfg = GPTConfig.gpt2()
    with torch.device("meta"):
        model = GPT(cfg)
    idx = torch.zeros(1, 1024, dtype=torch.long, device="meta")
    step = train_step(model, idx, idx, dtype=torch.bfloat16)          # nanoGPT returns (logits, loss)
    assert step.passes.loss_source == "output[1]"
    n, t = matmul_weights(model), 1024
    assert n == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 768 * 50304
    attention = causal_attention_forward(12, 1, 12, t, 64)
    rule = 6 * n * t + 3 * attention                                  # forward once, backward twice
    assert step.model_flops == pytest.approx(rule, rel=0.01)
    # the fused backward recomputes Q K^T: hardware FLOPs exceed model FLOPs by exactly that half of the forward
    assert step.hardware_flops - step.model_flops == attention // 2


@pytest.mark.slow
def test_llama3_8b_step_flops_are_6NT_plus_attention_within_1_percent():
    cfg = LlamaConfig.llama3_8b()
    with torch.device("meta"):
        model = Transformer(cfg)
    idx = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    step = train_step(model, idx, loss_fn=lambda logits, y: torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), y.flatten()), targets=(idx,), dtype=torch.bfloat16)
    n, t = matmul_weights(model), 2048
    attention = causal_attention_forward(cfg.n_layers, 1, cfg.n_heads, t, cfg.head_dim)
    assert step.model_flops == pytest.approx(6 * n * t + 3 * attention, rel=0.01)
    m = step.memory
    assert m["weights"] == m["gradients"] == 2 * 8_030_261_248          # bf16, every parameter trainable
    # the peak holds at least the weights, gradients and state (the optimizer step), and at least the weights,
    # state and activations (the end of the forward)
    assert m["peak"] > m["weights"] + m["gradients"] + m["optimizer_state"]
    assert m["peak"] > m["weights"] + m["optimizer_state"] + m["activations"]
    assert step.fsdp.gpus is not None and step.ddp.gpus is None        # 8B with AdamW state: shard it


def test_mfu_and_hfu_follow_from_the_steps_own_figures():
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    step = train_step(net, torch.randn(32, 64), loss_fn=torch.nn.functional.cross_entropy,
                      targets=(torch.zeros(32, dtype=torch.long),), dtype=torch.bfloat16)
    phases = step.phases
    assert step.seconds == pytest.approx(sum(p.predicted_seconds for p in phases.values()))
    assert step.mfu == pytest.approx(step.model_flops / step.seconds / 312e12)
    assert step.model_flops == step.hardware_flops == phases["forward"].flops + phases["backward"].flops
    assert phases["optimizer"].bytes == step.optimizer.bytes
    json.dumps(step.to_dict(), allow_nan=False)
    assert "DDP: fits on 1 GPU" in str(step)


def test_analyze_train_prices_the_step_and_keeps_the_forward_nodes():
    import shapeprof
    model = GPT(GPTConfig.tiny())
    x = torch.randint(0, 256, (2, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = shapeprof.analyze(model, x, x, train=True)
    assert list(rep.phases) == ["forward", "backward", "optimizer"]
    assert set(rep.memory) == {"weights", "gradients", "optimizer_state", "activations", "peak"}
    assert rep.training.peak_at.startswith(("forward", "backward", "optimizer"))
    assert rep.training.loss == "output[1]" and rep.training.optimizer.startswith("AdamW")
    plain = shapeprof.analyze(model, x, x)
    assert [(n.name, n.flops) for n in rep.nodes] == [(n.name, n.flops) for n in plain.nodes]
    back = shapeprof.Report.from_json(rep.to_json())
    assert back == rep and back.training.mfu == rep.training.mfu
    text = str(rep)
    assert "Training step:" in text and "optimizer" in text and "FSDP:" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    sgd = shapeprof.analyze(model, x, x, train=shapeprof.Train(optimizer="sgd", optimizer_kwargs={"momentum": 0.9}))
    assert sgd.training.optimizer.startswith("SGD") and sgd.phases["optimizer"].bytes < rep.phases["optimizer"].bytes


def test_analyze_train_refuses_what_is_not_a_training_step():
    import shapeprof
    model = GPT(GPTConfig.tiny())
    x = torch.randint(0, 256, (2, 32))
    with pytest.raises(ValueError, match="a Prefill/Decode phase is an inference step"):
        shapeprof.analyze(model, shapeprof.Decode(batch=1, context=8), train=True)
    with pytest.raises(TypeError, match="train= takes True or a shapeprof.Train"):
        shapeprof.analyze(model, x, x, train="adamw")
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        shapeprof.analyze(model, x, x, train=True)
    frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        shapeprof.analyze(frozen, torch.randn(2, 4), train=True)


def test_a_model_keyword_named_like_a_training_option_reaches_the_model():
    # nanoGPT is called model(idx, targets=y): analyze passes the model's keywords to it, not to the step
    import shapeprof
    model = GPT(GPTConfig.tiny())
    x = torch.randint(0, 256, (2, 32))
    by_keyword = shapeprof.analyze(model, x, targets=x, train=True).training
    by_position = shapeprof.analyze(model, x, x, train=True).training
    assert by_keyword.loss == by_position.loss == "output[1]"
    assert by_keyword.phases == by_position.phases
