"""Tests for shapeprof/profiling.py: the captured graph run under torch.profiler, measured next to predicted.

No test asserts a wall time: measured times are checked to exist, to be positive and to relate sanely to the
step time that contains them.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn as nn

import shapeprof
from examples.llama import LlamaConfig, Transformer
from examples.mlp import MLP
from examples.nanogpt import GPT, GPTConfig
from shapeprof.calibration import calibrate
from shapeprof.profiling import ProfileError, ProfileResult, profile

STEPS = 3


def _mlp():
    return MLP(d_in=64, d_hidden=128, d_out=32).eval(), (torch.randn(16, 64),)


def _llama():
    return Transformer(LlamaConfig.tiny()).eval(), (torch.randint(0, 256, (2, 16)),)


def _gpt():
    return GPT(GPTConfig.tiny()).eval(), (torch.randint(0, 256, (2, 16)),)


EXAMPLES = {"mlp": (_mlp, "symbolic_trace"), "llama": (_llama, "symbolic_trace"), "nanogpt": (_gpt, "export")}


def _snapshot(model: nn.Module) -> dict:
    """Everything profiling must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "modes": [m.training for m in model.modules()],
        "devices": {p.device for p in model.parameters()},
        "attrs": [sorted(vars(m)) for m in model.modules()],
        "hooks": [sum(len(v) for k, v in vars(m).items() if "hooks" in k and isinstance(v, dict))
                  for m in model.modules()],
    }


def _assert_untouched(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["ids"] == before["ids"]
    assert after["modes"] == before["modes"]
    assert after["devices"] == before["devices"]
    assert after["attrs"] == before["attrs"]
    assert after["hooks"] == before["hooks"]


@pytest.fixture(scope="module")
def cpu_spec():
    return calibrate("cpu")   # measured once per process (test_calibration may already have)


@pytest.fixture(scope="module", params=list(EXAMPLES))
def profiled(request, cpu_spec):
    torch.manual_seed(0)
    make, method = EXAMPLES[request.param]
    model, args = make()
    before = _snapshot(model)
    result = profile(model, *args, steps=STEPS, warmup=1)
    return request.param, method, model, args, before, result


def test_profile_uses_the_expected_capture(profiled):
    _, method, _, _, _, result = profiled
    assert isinstance(result, ProfileResult)
    assert result.measured.capture.method == result.predicted.capture.method == method
    assert result.node_level and result.steps == STEPS and result.logdir is None and result.runs == {}
    assert "one profiler range per node" in result.note


def test_every_node_is_measured_and_has_an_efficiency(profiled, cpu_spec):
    *_, result = profiled
    report = result.measured
    assert report.spec == result.machine_spec == cpu_spec          # held against the machine it ran on
    assert report.nodes
    for n in report.nodes:
        assert n.measured_seconds is not None and n.measured_seconds > 0, n.name
        assert n.efficiency is not None and n.efficiency > 0 and math.isfinite(n.efficiency), n.name
    assert report.total.measured_seconds > 0 and report.total.efficiency > 0
    assert len(result.step_seconds) == STEPS


def test_node_times_fit_inside_the_step_time(profiled):
    *_, result = profiled
    steps = sorted((e for e in result.trace["traceEvents"]
                    if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")),
                   key=lambda e: e["ts"])
    names = {n.name for n in result.measured.nodes}
    for step in steps:   # each step's node ranges lie inside it, so they add up to no more than the step
        inside = [e for e in result.trace["traceEvents"] if e.get("cat") == "user_annotation"
                  and e["name"] in names and step["ts"] <= e["ts"] <= step["ts"] + step["dur"]]
        assert len(inside) == len(names)
        assert sum(e["dur"] for e in inside) <= step["dur"] * 1.001 + 1
    # per node the median over 3 steps is at most the sum of its two largest times, so the medians add up to
    # at most the sum of all the steps' times divided by 2 (ceil(3 / 2))
    measured = sum(n.measured_seconds for n in result.measured.nodes)
    assert measured <= sum(result.step_seconds) / math.ceil(STEPS / 2) * 1.001
    assert result.measured.total.measured_seconds == sorted(result.step_seconds)[STEPS // 2]


def test_trace_has_one_range_per_node_per_step(profiled):
    *_, result = profiled
    events = result.trace["traceEvents"]
    annotations = Counter(e["name"] for e in events if e.get("cat") == "user_annotation")
    assert sum(1 for name in annotations if name.startswith("ProfilerStep#")) == STEPS
    graph = result.measured.graph_capture.graph
    calls = [n.name for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    for name in calls:
        assert annotations[name] == STEPS, name
    assert {n.name for n in result.measured.nodes} <= set(calls)
    assert any(e.get("cat") == "cpu_op" and e["name"].startswith("aten::") for e in events)


def test_user_model_is_untouched_and_outputs_match(profiled):
    name, _, model, args, before, result = profiled
    _assert_untouched(model, before)
    with torch.no_grad():
        expected = model(*args)
    torch.testing.assert_close(result.output, expected)


def test_target_is_the_prediction_on_the_requested_gpu(profiled):
    *_, result = profiled
    assert result.predicted.spec.name == "a100-80gb-sxm"
    assert all(n.measured_seconds is None for n in result.predicted.nodes)
    assert [n.name for n in result.predicted.nodes] == [n.name for n in result.measured.nodes]


def test_measured_report_round_trips_through_json(profiled):
    *_, result = profiled
    again = shapeprof.Report.from_json(result.measured.to_json())
    assert again == result.measured
    assert [n.measured_seconds for n in again.nodes] == [n.measured_seconds for n in result.measured.nodes]


def test_dtype_changes_the_target_only(cpu_spec):
    model, args = _mlp()
    result = profile(model, *args, steps=1, warmup=0, dtype=torch.bfloat16, spec="h100-sxm")
    assert result.predicted.dtype == "bfloat16" and result.measured.dtype is None
    assert result.predicted.spec.name == "h100-sxm"
    assert result.output.dtype == torch.float32       # the model ran as it is
    # bf16 moves half the bytes of fp32
    assert result.predicted.total.bytes * 2 == result.measured.total.bytes


def test_export_graph_takes_keyword_inputs_and_returns_the_model_outputs(cpu_spec):
    torch.manual_seed(0)
    model, (idx,) = _gpt()
    targets = torch.randint(0, 256, (2, 16))
    before = _snapshot(model)
    result = profile(model, idx, targets=targets, steps=1, warmup=0)
    assert result.measured.capture.method == "export"
    logits, loss = result.output          # (logits, loss) as GPT.forward returns them
    expected_logits, expected_loss = model(idx, targets=targets)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(loss, expected_loss)
    assert all(n.measured_seconds > 0 for n in result.measured.nodes)
    _assert_untouched(model, before)


def test_dispatch_capture_measures_only_the_total(cpu_spec):
    model, args = _mlp()
    result = profile(model, *args, steps=2, warmup=0, method="dispatch")
    assert result.measured.capture.method == "dispatch" and not result.node_level
    assert "only its total time was measured" in result.note
    assert all(n.measured_seconds is None and n.efficiency is None for n in result.measured.nodes)
    assert result.measured.total.measured_seconds > 0
    torch.testing.assert_close(result.output, model(*args))


def test_buffers_a_forward_updates_are_restored(cpu_spec):
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()).train()
    before = _snapshot(model)
    result = profile(model, torch.randn(32, 8), steps=2, warmup=1)
    assert result.measured.total.measured_seconds > 0
    _assert_untouched(model, before)          # running_mean/var and num_batches_tracked as they were
    assert model[1].num_batches_tracked.item() == 0


class _Cholesky(nn.Module):
    """Traces and analyses on meta tensors (no data); fails on real data that is not positive definite."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x):
        self.seen.add_(1)      # the failed run must not leave this changed
        return torch.linalg.cholesky(x * 2)


def test_a_node_failing_in_the_measured_run_is_named(cpu_spec, tmp_path):
    model = _Cholesky()
    before = _snapshot(model)
    x = -torch.eye(4).expand(2, 4, 4).contiguous()
    logdir = tmp_path / "runs"
    with pytest.raises(ProfileError, match=r"node 'linalg_cholesky' \(call_function linalg_cholesky\) at "
                                           r".*test_profiling\.py:\d+ failed while profiling: _LinAlgError: ") as info:
        profile(model, x, steps=2, logdir=logdir)
    assert isinstance(info.value.__cause__, Exception)
    assert not logdir.exists()                # nothing half-written
    _assert_untouched(model, before)


def test_a_failing_eager_run_is_a_clear_error(cpu_spec):
    with pytest.raises(ProfileError, match="_Cholesky failed while profiling .*eagerly"):
        profile(_Cholesky(), -torch.eye(4).expand(2, 4, 4).contiguous(), steps=1, method="dispatch")


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=-2), "steps must be an integer >= 1"),
    (dict(steps=1.5), "steps must be an integer >= 1"),
    (dict(warmup=-1), "warmup must be an integer >= 0"),
])
def test_bad_step_counts(kwargs, match):
    model, args = _mlp()
    with pytest.raises(ValueError, match=match):
        profile(model, *args, **kwargs)


def test_inputs_without_data_are_refused():
    model, _ = _mlp()
    with pytest.raises(ValueError, match="not InputShape"):
        profile(model, shapeprof.InputShape((16, 64)))
    with pytest.raises(ValueError, match="meta device"):
        profile(model, torch.empty(16, 64, device="meta"))


def test_an_unwritable_logdir_fails_before_running(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model, args = _mlp()
    with pytest.raises(ProfileError, match="it is a file"):
        profile(model, *args, logdir=blocker)


# ------------------------------------------------------------------------------- nothing passed in changes

class _AddsAConstant(nn.Module):
    def forward(self, x):
        return x + torch.tensor([1.0, 2.0, 3.0, 4.0])     # traced as get_attr _tensor_constant0


def test_a_tensor_constant_made_in_forward_is_found_without_touching_the_model(cpu_spec):
    model, x = _AddsAConstant(), torch.randn(2, 4)
    before = _snapshot(model)
    result = profile(model, x, steps=2, warmup=0)
    assert result.measured.capture.method == "symbolic_trace"
    assert all(n.measured_seconds > 0 for n in result.measured.nodes)
    torch.testing.assert_close(result.output, x + torch.tensor([1.0, 2.0, 3.0, 4.0]))
    _assert_untouched(model, before)           # no _tensor_constant0 set on it
    assert not hasattr(model, "_tensor_constant0")


class _WritesItsInput(nn.Module):
    def forward(self, x):
        x.add_(1)
        return x * 2


@pytest.mark.parametrize("method", ["symbolic_trace", "export", "dispatch"])
def test_every_step_runs_on_fresh_copies_of_the_inputs(cpu_spec, method):
    x = torch.ones(3, 4)
    version = x._version
    result = profile(_WritesItsInput(), x, steps=3, warmup=2, method=method)
    assert result.measured.capture.method == method
    assert torch.equal(x, torch.ones(3, 4)) and x._version == version      # the caller's tensor as it was
    # the last of 1 watched + 2 warmup + 3 measured steps saw x == 1 too: (1 + 1) * 2, not (1 + 6) * 2
    torch.testing.assert_close(result.output, torch.full((3, 4), 4.0))


class _Draws(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(x) + torch.rand_like(x)


@pytest.mark.parametrize("method", ["symbolic_trace", "export", "dispatch"])
def test_the_callers_rng_is_as_it_was(cpu_spec, method):
    model = _Draws().train()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    expected_next = torch.rand(8)               # what the caller draws next without profiling in between
    torch.set_rng_state(state)
    result = profile(model, torch.ones(16), steps=2, warmup=1, method=method)
    assert result.measured.total.measured_seconds > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(8), expected_next)


class _WritesItsState(nn.Module):
    """A forward that writes its parameters and buffers in place, every way a user's forward does."""

    def __init__(self, augmented: bool = False):
        super().__init__()
        self.augmented = augmented
        self.w = nn.Parameter(torch.arange(1.0, 5.0))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(4))
        self.norm = nn.BatchNorm1d(4)           # train mode: running statistics updated

    def forward(self, x):
        self.w.data.mul_(2)                     # through .data: the parameter's _version does not move
        if self.augmented:
            self.count += 1                     # Tensor.__iadd__, in place (eager only: see the test)
        else:
            self.count.add_(1)
        self.running.copy_(x.mean(0))
        return self.norm(x * self.w)


@pytest.mark.parametrize("method, augmented", [("symbolic_trace", False), ("dispatch", False), ("dispatch", True)])
def test_parameters_and_buffers_a_forward_writes_hold_their_values_afterwards(cpu_spec, method, augmented):
    # `self.count += 1` is run eagerly only: symbolic tracing turns it into an add whose result is rebound on
    # the capture's shadow (a capture matter, not profile's)
    model = _WritesItsState(augmented).train()
    x = torch.randn(8, 4)
    before = _snapshot(model)
    result = profile(model, x, steps=2, warmup=1, method=method)
    assert result.measured.total.measured_seconds > 0
    if method != "dispatch":
        assert all(n.measured_seconds > 0 for n in result.measured.nodes)
    _assert_untouched(model, before)
    assert torch.equal(model.w.detach(), torch.arange(1.0, 5.0)) and model.count.item() == 0


class _WritesLater(nn.Module):
    """Writes `late` only once it has been called before: the watched first run cannot see that write."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.register_buffer("late", torch.zeros(4))

    def forward(self, x):
        if self.calls > 0:
            self.late.add_(1)
        self.calls += 1
        return x + 1


def test_a_write_the_watched_run_could_not_see_is_an_error_not_a_silent_change(cpu_spec):
    model = _WritesLater()
    with pytest.raises(ProfileError, match=r"a measured step wrote late, which the first run of the forward did "
                                           r"not write"):
        profile(model, torch.ones(4), steps=2, warmup=0, method="dispatch")
    assert model.calls == 0                    # the attribute the forward rebound is put back


def test_an_input_object_the_forward_fills_is_a_fresh_copy_every_step(cpu_spec):
    class Cache:                       # like a HF DynamicCache: an object pytree does not see into
        def __init__(self):
            self.keys = [torch.zeros(1, 4)]

    class Appends(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x, cache):
            cache.keys.append(self.proj(x))
            return torch.cat(cache.keys).sum(0)

    cache = Cache()
    profile(Appends(), torch.randn(1, 4), cache, steps=2, warmup=1, machine_spec=cpu_spec)
    assert len(cache.keys) == 1


def test_a_float64_intermediate_on_a_spec_without_fp64_profiles_with_a_note(cpu_spec):
    class Doubles(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x).double().exp().sum()

    spec = cpu_spec if "fp64" not in cpu_spec.peak_flops else \
        type(cpu_spec)(**{**cpu_spec.to_dict(), "peak_flops": {k: v for k, v in cpu_spec.peak_flops.items()
                                                                 if not k.startswith("fp64")}})
    result = profile(Doubles(), torch.randn(4, 8), steps=2, warmup=1, machine_spec=spec)
    assert any("no float64 peak" in note for note in result.measured.notes)
