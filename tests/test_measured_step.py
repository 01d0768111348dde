"""shapeprof/measured_step.py: a real training step timed phase by phase, through `profile(train=...)`.

No test asserts a wall time: measured times are checked to exist, to be positive and to add up to the step that
holds them. The FLOPs, peak, MFU and optimizer state are checked against the spec, the prediction and torch.optim.
"""
from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shapeprof
from examples.nanogpt import GPT, GPTConfig
from shapeprof.calibration import calibrate
from shapeprof.measured_step import PHASES, MeasuredStep, measure_step
from shapeprof.training import train_step

STEPS = 3


@pytest.fixture(scope="module")
def cpu_spec():
    return calibrate("cpu")   # measured once per process (test_profiling may already have)


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    x, y = torch.randn(16, 32), torch.randint(0, 8, (16,))
    return model, (x,), shapeprof.Train(loss_fn=F.cross_entropy, targets=(y,)), "loss_fn"


def _gpt():
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (2, 32))
    return GPT(GPTConfig.tiny()), (idx, idx), True, "output[1]"    # nanoGPT returns (logits, loss)


EXAMPLES = {"mlp": _mlp, "nanogpt": _gpt}


@pytest.fixture(scope="module", params=list(EXAMPLES))
def profiled(request, cpu_spec):
    model, args, train, loss = EXAMPLES[request.param]()
    result = shapeprof.profile(model, *args, train=train, steps=STEPS, warmup=1, machine_spec=cpu_spec)
    return request.param, model, loss, result


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def test_every_phase_is_measured_and_adds_up_to_the_step(profiled):
    _, _, _, result = profiled
    m = result.training
    assert isinstance(m, MeasuredStep)
    assert list(m.phases) == list(m.phase_seconds) == ["forward", "backward", "optimizer"]
    assert m.steps == STEPS and len(m.step_seconds) == STEPS
    for name in PHASES:
        assert len(m.phase_seconds[name]) == STEPS
        assert all(s > 0 for s in m.phase_seconds[name])
        assert m.phases[name] == statistics.median(m.phase_seconds[name])
    for i, step in enumerate(m.step_seconds):   # forward start to optimizer end: the three phases back to back
        assert step == pytest.approx(sum(m.phase_seconds[name][i] for name in PHASES), rel=1e-9)
    assert m.peak_memory_bytes is None                             # CPU: no device allocator to ask


def test_mfu_and_hfu_are_the_flops_over_the_median_step_over_the_machines_peak(profiled, cpu_spec):
    name, _, _, result = profiled
    m = result.training
    assert m.spec == cpu_spec.name and m.dtype == "float32"
    assert m.peak_flops == cpu_spec.peak_for(torch.float32, matmul=True)   # the machine's roof, not the A100's
    median = statistics.median(m.step_seconds)
    assert m.mfu == pytest.approx(m.model_flops / median / m.peak_flops, rel=1e-12)
    assert m.hfu == pytest.approx(m.hardware_flops / median / m.peak_flops, rel=1e-12)
    assert 0 < m.mfu <= m.hfu
    if name == "nanogpt":   # the fused attention backward recomputes Q K^T: hardware FLOPs are more
        assert m.hfu > m.mfu


def test_flops_loss_and_predicted_phases_are_the_predictions(profiled):
    _, model, loss, result = profiled
    m, here, target = result.training, result.measured.training, result.predicted.training
    assert here is not None and target is not None                 # both Reports price the step
    assert m.model_flops == target.model_flops == here.model_flops
    assert m.hardware_flops == target.hardware_flops == here.hardware_flops
    assert m.loss == loss == target.loss
    assert m.predicted == {k: p.predicted_seconds for k, p in here.phases.items()}   # on this machine's roofline
    assert result.predicted.spec.name == "a100-80gb-sxm"


def test_the_optimizer_state_is_what_adamw_keeps_and_what_was_predicted(profiled):
    _, model, _, result = profiled
    m = result.training
    assert m.optimizer == "AdamW (for-loop)"    # torch's choice for CPU parameters with foreach and fused unset
    assert any("prediction prices AdamW (foreach)" in n for n in m.notes)
    # exp_avg and exp_avg_sq per parameter, plus one fp32 step counter (4 B) per parameter tensor
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    assert m.optimizer_state_bytes == 2 * _param_bytes(model) + 4 * tensors
    assert m.optimizer_state_bytes == result.measured.training.memory["optimizer_state"]


def test_to_dict_is_json_and_str_shows_each_phase(profiled):
    _, _, _, result = profiled
    m = result.training
    d = json.loads(json.dumps(m.to_dict()))
    assert d["mfu"] == m.mfu and d["hfu"] == m.hfu and d["seconds"] == m.seconds
    assert d["phases"] == m.phases and d["step_seconds"] == list(m.step_seconds)
    text = str(m)
    assert text.startswith(f"measured training step of {m.model} on {m.spec}")
    assert f"MFU {m.mfu:.1%}" in text
    for name in PHASES:
        assert f"  {name} " in text


# ---------------------------------------------------------------------------------------------- nothing changes

class _DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_the_users_model_grads_optimizer_and_rng_are_as_they_were(cpu_spec):
    torch.manual_seed(0)
    model = _DropoutMLP().train()             # dropout draws from the RNG in every measured step
    x = torch.randn(8, 16)
    users = torch.optim.Adam(model.parameters(), lr=0.1)
    F.mse_loss(model(x), torch.zeros(8, 4)).backward()
    users.step()                               # the user's optimizer has state
    users.zero_grad(set_to_none=True)
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 3.0)   # one grad kept, the others None
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    opt_state = copy.deepcopy(users.state_dict())
    x_before = x.clone()
    rng = torch.get_rng_state()
    expected_next = torch.rand(8)
    torch.set_rng_state(rng)

    result = shapeprof.profile(model, x, train=True, steps=2, warmup=1, machine_spec=cpu_spec)

    assert result.training.optimizer_state_bytes > 0   # the copy's AdamW did step
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(torch.rand(8), expected_next)
    for k, p in model.named_parameters():
        assert torch.equal(p, params[k]), k
        if grads[k] is None:
            assert p.grad is None, k
        else:
            assert torch.equal(p.grad, grads[k]), k
    after = users.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    assert after["state"].keys() == opt_state["state"].keys()
    for i, state in opt_state["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][i][key], value), (i, key)
    assert torch.equal(x, x_before)
    assert model.training and all(m.training for m in model.modules())


def test_measure_step_alone_keeps_the_rng_and_the_model(cpu_spec):
    model = _DropoutMLP().train()
    x = torch.randn(8, 16)
    params = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    m = measure_step(model, x, spec=cpu_spec, steps=2, warmup=1)
    assert m.optimizer_state_bytes > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is None for p in model.parameters())


def test_sgd_with_momentum_is_what_runs(cpu_spec):
    model, args, _, _ = _mlp()
    train = shapeprof.Train(optimizer="sgd", optimizer_kwargs={"momentum": 0.9}, loss_fn=F.cross_entropy,
                            targets=(torch.randint(0, 8, (16,)),))
    result = shapeprof.profile(model, *args, train=train, steps=2, warmup=1, machine_spec=cpu_spec)
    m = result.training
    assert m.optimizer == "SGD (for-loop)"
    assert result.predicted.training.optimizer == "SGD (foreach)"
    assert m.optimizer_state_bytes == _param_bytes(model)          # one momentum buffer per parameter
    plain = measure_step(model, *args, train=shapeprof.Train(optimizer=torch.optim.SGD), spec=cpu_spec, steps=1,
                         warmup=0)
    assert plain.optimizer == "SGD (for-loop)" and plain.optimizer_state_bytes == 0   # no momentum, no state
    assert plain.loss == "output.sum()" and any("no loss given" in n for n in plain.notes)


def test_an_explicit_implementation_is_the_one_run(cpu_spec):
    model, args, train, _ = _mlp()
    from dataclasses import replace
    m = measure_step(model, *args, train=replace(train, optimizer="adam", optimizer_kwargs={"foreach": True}),
                     spec=cpu_spec, steps=1, warmup=0)
    assert m.optimizer == "Adam (foreach)"
    assert not any("prediction prices" in n for n in m.notes)   # the prediction priced foreach too


def test_measure_step_alone_takes_its_flops_from_train_step(cpu_spec):
    model, args, train, _ = _mlp()
    m = measure_step(model, *args, train=train, spec=cpu_spec, steps=2, warmup=0)
    step = train_step(model, *args, loss_fn=train.loss_fn, targets=train.targets, spec=cpu_spec)
    assert (m.model_flops, m.hardware_flops) == (step.model_flops, step.hardware_flops)
    assert m.predicted == {k: p.predicted_seconds for k, p in step.phases.items()}


def test_checkpointed_blocks_run_again_in_the_measured_backward(cpu_spec):
    model, args, _, _ = _gpt()
    calls = []
    hook = model.transformer.h[0].attn.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:   # the copy keeps the hook: it counts how often the block's attention runs in one step
        for checkpoint, runs in ((None, 1), ("blocks", 2)):   # checkpointed: forward, then again in backward
            train = shapeprof.Train(checkpoint=checkpoint)
            step = train_step(model, *args, checkpoint=checkpoint, spec=cpu_spec).summary()
            calls.clear()
            m = measure_step(model, *args, train=train, spec=cpu_spec, steps=1, warmup=0)   # predicts it too
            assert len(calls) == runs, checkpoint
            assert (m.model_flops, m.hardware_flops) == (step.model_flops, step.hardware_flops)
            assert m.checkpointed == step.checkpointed == (() if checkpoint is None else
                                                           ("transformer.h.0", "transformer.h.1"))
    finally:
        hook.remove()
    assert "forward" not in vars(model.transformer.h[0])   # the user's blocks are not wrapped


# ---------------------------------------------------------------------------------------------- refusals

def test_refusals_come_before_any_calibration_or_capture(monkeypatch):
    def no(*a, **k):
        raise AssertionError("calibrated before refusing")
    monkeypatch.setattr(shapeprof.profiling, "calibrate", no)
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no trainable parameters") as e:
        shapeprof.profile(frozen, torch.randn(2, 4), train=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no trainable parameters"):
        measure_step(frozen, torch.randn(2, 4), spec="a100-80gb-sxm")
    with pytest.raises(TypeError, match="train= takes True or a shapeprof.Train"):
        shapeprof.profile(nn.Linear(4, 4), torch.randn(2, 4), train="adam")
    with pytest.raises(ValueError, match="Prefill/Decode phase is an inference step"):
        shapeprof.profile(nn.Linear(4, 4), shapeprof.Decode(1, 8), train=True)


def test_analyze_gives_the_same_refusals():
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no trainable parameters"):
        shapeprof.analyze(frozen, torch.randn(2, 4), train=True)
    with pytest.raises(TypeError, match="train= takes True or a shapeprof.Train"):
        shapeprof.analyze(nn.Linear(4, 4), torch.randn(2, 4), train="adam")


def test_without_train_there_is_no_training_step(cpu_spec):
    model, args, _, _ = _mlp()
    result = shapeprof.profile(model, *args, steps=1, warmup=0, machine_spec=cpu_spec)
    assert result.training is None and result.predicted.training is None and result.measured.training is None
