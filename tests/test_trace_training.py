"""`shapeprof trace` of a training script (shapeprof.scripts + shapeprof.session): the optimizer and loss the script
really used are recorded, and its step is priced phase by phase. Scripts are written to tmp_path and run in process,
once plainly (runpy, as python runs them) and once under run_script, to show the script runs the same."""
import runpy
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.optim.optimizer as optimizer_module

import shapeprof
from shapeprof.optimizer_step import optimizer_step
from shapeprof.scripts import run_script
from shapeprof.session import FORWARD_ONLY, NO_OPTIMIZER_STEP, TraceConfig, analyse_model, training_step_of

SPEC = shapeprof.get_spec()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# The script's head: a model, its loss module, one fixed batch. Each test adds its optimizer and loop. The script
# hands its model and optimizer to the test through a sibling module, `probe`.
HEAD = """
    import sys
    import torch
    import torch.nn as nn
    import probe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    criterion = nn.CrossEntropyLoss()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
"""

LOOP = """
    for step in range(3):
        loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.6f}")
    probe.RUNS.append((model, opt))
"""


def _optimizer_hooks() -> int:
    return len(optimizer_module._global_optimizer_post_hooks)


@pytest.fixture
def traced(tmp_path, monkeypatch, capsys):
    """trace(*parts) -> (run, its first model, the script's model and optimizer under shapeprof): the script written
    to tmp_path and run twice, plainly then under run_script; asserts both printed the same and ended the same,
    and that the trained weights are identical (shapeprof changed nothing the script computes)."""
    (tmp_path / "probe.py").write_text("RUNS = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def trace(*parts: str, exit_code: int = 0):
        script = tmp_path / "train.py"
        script.write_text("".join(textwrap.dedent(part) for part in (HEAD, *parts)))
        import probe
        probe.RUNS.clear()
        with pytest.raises(SystemExit) if exit_code else _nothing():
            runpy.run_path(str(script), run_name="__main__")
        plain = capsys.readouterr().out
        hooks = _optimizer_hooks()
        run = run_script(str(script))
        out = capsys.readouterr().out
        assert _optimizer_hooks() == hooks                # the global step hook is gone again
        assert out == plain and run.exit_code == exit_code and run.exception is None, (out, run.exception)
        assert run.recorder_errors == []
        (plain_model, _), (model, opt) = probe.RUNS
        for a, b in zip(plain_model.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)                      # trained exactly as without shapeprof
        assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
        assert not opt._optimizer_step_post_hooks and not any(p.is_meta for p in model.parameters())
        return run, run.models[0], model, opt

    yield trace
    sys.modules.pop("probe", None)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _phases(report):
    assert report.training is not None, report.notes
    return report.training.phases


def test_sgd_with_momentum_is_priced_as_the_script_ran_it(traced):
    run, model, script_model, _ = traced("""
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    """, LOOP, """
        sys.exit(4)
    """, exit_code=4)
    seen = model.optimizer
    assert seen.cls is torch.optim.SGD and seen.kwargs["momentum"] == 0.9 and seen.kwargs["foreach"] is None
    assert seen.kwargs["nesterov"] is False and "params" not in seen.kwargs
    assert seen.state_dtypes == {"momentum_buffer": torch.float32}
    assert (seen.parameters, seen.trainable, seen.groups) == (4, 4, 1)
    assert model.ran_backward and model.loss.module.type_name == "CrossEntropyLoss" and model.loss.by_identity
    report = analyse_model(model, TraceConfig())
    phases = _phases(report)
    assert list(phases) == ["forward", "backward", "optimizer"]
    assert report.training.optimizer == "SGD (foreach)" and report.training.loss == "loss_fn"
    oracle = optimizer_step(torch.optim.SGD, script_model, momentum=0.9, spec=SPEC)
    assert (phases["optimizer"].bytes_read, phases["optimizer"].bytes_written, phases["optimizer"].flops) == \
        (oracle.bytes_read, oracle.bytes_written, oracle.flops)
    # 16*32 + 32 + 32*4 + 4 = 676 fp32 parameters. Foreach SGD with momentum, steady state: buf.mul_(0.9) reads
    # and writes buf, buf.add_(grad) reads buf and grad and writes buf, param.add_(buf, alpha=-lr) reads param and
    # buf and writes param: 5 reads and 3 writes of 4 bytes per parameter
    assert (oracle.bytes_read, oracle.bytes_written) == (676 * 20, 676 * 12)
    assert FORWARD_ONLY not in report.notes
    assert any(n.startswith("the optimizer is the script's SGD(momentum=0.9)") for n in report.notes)
    assert any("CrossEntropyLoss" in n for n in report.notes)
    # the loss is the script's: cross entropy's backward runs, not that of output.sum()
    assert not any("no loss given or returned" in n for n in report.training.notes)
    # --dtype bf16 prices the script's optimizer in bf16 too
    bf16 = _phases(analyse_model(model, TraceConfig(dtype="bf16")))["optimizer"]
    oracle = optimizer_step(torch.optim.SGD, script_model, momentum=0.9, spec=SPEC, param_dtype=torch.bfloat16)
    assert (bf16.bytes_read, bf16.bytes_written) == (oracle.bytes_read, oracle.bytes_written)


def test_adamw_for_loop_and_a_loss_on_a_view_of_the_output(traced):
    run, model, script_model, _ = traced("""
        lm = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
        model = lm
        tokens = torch.randint(0, 16, (2, 5))
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-3, weight_decay=0.0, foreach=False)
        for step in range(2):
            logits = lm(tokens)                                             # (2, 5, 16)
            loss = criterion(logits.view(-1, 16), tokens.view(-1))          # (10, 16), (10,)
            opt.zero_grad()
            loss.backward()
            opt.step()
            print(f"step {step}: loss {loss.item():.6f}")
        probe.RUNS.append((lm, opt))
    """)
    seen = model.optimizer
    assert model.name == "Sequential" and tuple(model.args[0].shape) == (2, 5)
    assert seen.cls is torch.optim.AdamW and seen.kwargs["foreach"] is False and seen.kwargs["weight_decay"] == 0.0
    assert seen.state_dtypes == {"step": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}
    assert model.loss.shape == (10, 16) and model.loss.by_identity   # a view of the output, of the same size
    report = analyse_model(model, TraceConfig())
    phases = _phases(report)
    assert report.training.optimizer == "AdamW (for-loop)" and report.training.loss == "loss_fn"
    oracle = optimizer_step("adamw", script_model, weight_decay=0.0, foreach=False, spec=SPEC)
    assert (phases["optimizer"].bytes, phases["optimizer"].flops) == (oracle.bytes, oracle.flops)
    # the loss's backward (log_softmax's) ran on the viewed logits
    assert report.training.phases["backward"].flops > 0 and FORWARD_ONLY not in report.notes


def test_fused_adamw_runs_on_this_cpu_build_and_is_priced_fused(traced):
    run, model, script_model, _ = traced("""
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    """, LOOP)
    assert model.optimizer.kwargs["fused"] is True and model.optimizer.kwargs["foreach"] is None
    report = analyse_model(model, TraceConfig())
    phases = _phases(report)
    assert report.training.optimizer == "AdamW (fused)"
    oracle = optimizer_step(torch.optim.AdamW, script_model, fused=True, spec=SPEC)
    assert (phases["optimizer"].bytes_read, phases["optimizer"].bytes_written) == \
        (oracle.bytes_read, oracle.bytes_written)
    # fused AdamW fp32: one pass, reading param, grad, exp_avg, exp_avg_sq (16 B) and writing three (12 B) per
    # parameter; each tensor's 4-byte step counter is incremented (read and written) before the kernel reads it
    # again: 676 parameters in 4 tensors
    assert (oracle.bytes_read, oracle.bytes_written) == (676 * 16 + 4 * 8, 676 * 12 + 4 * 4)


def test_param_groups_that_differ_are_told_of(traced):
    run, model, _, _ = traced("""
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-3, foreach=True)
    """, LOOP)
    seen = model.optimizer
    assert seen.groups == 2 and seen.differing == ("weight_decay",) and seen.kwargs["weight_decay"] == 0.1
    report = analyse_model(model, TraceConfig())
    assert report.training.optimizer == "AdamW (foreach)"
    assert any("2 param groups set weight_decay differently" in n for n in report.notes)


def test_a_forward_only_script_gets_no_training_step(traced):
    run, model, _, _ = traced("""
        opt = torch.optim.SGD(model.parameters(), lr=0.1)   # made, never stepped
        with torch.no_grad():
            for _ in range(3):
                print(model(x).argmax(-1).tolist())
        probe.RUNS.append((model, opt))
    """)
    assert not model.ran_backward and model.optimizer is None and model.loss is None
    assert training_step_of(model) == (None, [])
    report = analyse_model(model, TraceConfig())
    assert report.training is None and report.notes == ()


def test_backward_without_an_optimizer_step_is_priced_with_adamw_and_says_so(traced):
    run, model, script_model, _ = traced("""
        opt = torch.optim.SGD(model.parameters(), lr=0.1)    # never stepped: the script updates by hand
        for step in range(2):
            loss = criterion(model(x), y)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            print(f"step {step}: loss {loss.item():.6f}")
        probe.RUNS.append((model, opt))
    """)
    assert model.ran_backward and model.optimizer is None
    report = analyse_model(model, TraceConfig())
    phases = _phases(report)
    assert report.training.optimizer == "AdamW (foreach)" and NO_OPTIMIZER_STEP in report.notes
    oracle = optimizer_step("adamw", script_model, spec=SPEC)
    assert (phases["optimizer"].bytes, phases["optimizer"].flops) == (oracle.bytes, oracle.flops)
    assert FORWARD_ONLY not in report.notes


def test_an_optimizer_shapeprof_cannot_price_leaves_the_forward_and_names_it(traced):
    run, model, _, _ = traced("""
        opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    """, LOOP)
    assert model.optimizer.cls is torch.optim.Adagrad and model.optimizer.state_dtypes["sum"] == torch.float32
    report = analyse_model(model, TraceConfig())
    assert report.training is None and report.total.flops > 0
    assert FORWARD_ONLY in report.notes
    assert any("torch.optim.Adagrad" in n and "cannot price" in n for n in report.notes), report.notes


def test_a_step_that_cannot_be_priced_keeps_the_forward_with_the_reason(traced):
    # the loss reads a value (.item()), which a meta tensor has not: the step cannot run on meta
    run, model, _, _ = traced("""
        class PeakLoss(nn.Module):
            def forward(self, out, target):
                return nn.functional.cross_entropy(out, target) * (1.0 + 0.0 * out.detach().abs().max().item())

        criterion = PeakLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    """, LOOP)
    assert model.loss.module.type_name == "PeakLoss"
    report = analyse_model(model, TraceConfig())
    assert report.training is None and report.total.flops > 0 and FORWARD_ONLY in report.notes
    (why,) = [n for n in report.notes if n.startswith("the training step could not be priced: ")]
    assert "\n" not in why


def test_a_phase_is_an_inference_step_even_for_a_training_script(traced):
    run, model, _, _ = traced("""
        sys.path.insert(0, EXAMPLES)
        from nanogpt import GPT, GPTConfig
        model = GPT(GPTConfig.tiny(n_layer=1))
        idx = torch.randint(0, 256, (2, 8))
        opt = torch.optim.AdamW(model.parameters(), foreach=True)
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        probe.RUNS.append((model, opt))
    """.replace("EXAMPLES", repr(str(EXAMPLES))))
    assert model.optimizer is not None and model.loss is None   # nanoGPT returns its own loss
    report = analyse_model(model, TraceConfig(phase="prefill", tokens=8))
    assert report.training is None and report.phase is not None
    trained = analyse_model(model, TraceConfig())
    assert trained.training.loss == "output[1]" and trained.training.optimizer == "AdamW (foreach)"


def test_two_models_with_their_own_optimizers(traced):
    run, model, _, _ = traced("""
        critic = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3, amsgrad=True)
        for step in range(2):
            score = critic(model(x)).mean()
            opt.zero_grad(); critic_opt.zero_grad()
            score.backward()
            opt.step(); critic_opt.step()
            print(f"step {step}: {score.item():.6f}")
        probe.RUNS.append((model, opt))
    """)
    first, second = run.models[:2]
    assert (first.optimizer.name, first.optimizer.kwargs["momentum"]) == ("SGD", 0.5)
    assert (second.name, second.optimizer.name, second.optimizer.kwargs["amsgrad"]) == ("Linear", "Adam", True)
    assert "max_exp_avg_sq" in second.optimizer.state_dtypes
    report = analyse_model(second, TraceConfig())
    assert report.training.optimizer == "Adam (foreach)"


def test_targets_given_by_keyword_as_nanogpt_scripts_often_do(traced):
    run, model, _, _ = traced("""
        sys.path.insert(0, EXAMPLES)
        from nanogpt import GPT, GPTConfig
        model = GPT(GPTConfig.tiny(n_layer=1))
        idx = torch.randint(0, 256, (2, 8))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _, loss = model(idx, targets=idx)   # `targets` is also train_step's own keyword: passed by position
        loss.backward()
        opt.step()
        print(f"loss {loss.item():.6f}")
        probe.RUNS.append((model, opt))
    """.replace("EXAMPLES", repr(str(EXAMPLES))))
    assert set(model.kwargs) == {"targets"}
    report = analyse_model(model, TraceConfig())
    assert report.training.loss == "output[1]" and report.training.optimizer == "SGD (foreach)"
    assert report.inputs == ("i64[2, 8]", "i64[2, 8]")
