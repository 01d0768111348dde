"""Tests for shapeprof/optimize.py: the drop-in it returns, verification and undo, the report, the examples."""
import copy
import io
import json
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console

import shapeprof
import shapeprof.rewrites as rewrites
from shapeprof.optimize import OptimizeError, OptimizeReport, Tolerance, optimize
from shapeprof.rewrites import Match, Rewrite, RewriteResult
from shapeprof.rewrites.fuse_linear_activation import fused_linear_activation
from examples.mlp import MLP, FunctionalMLP
from examples.nanogpt import GPT, GPTConfig


@pytest.fixture(autouse=True)
def _no_autograd_warning_noise():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


FUSION = ["fuse_linear_activation"]   # tests of the fusion itself; prepack_linear has its own


def fused_count(module: nn.Module, activation: bool = True) -> int:
    """Fused Linear + activation calls (with `activation=False`: prepacked plain Linears) in the rewritten forwards
    of `module` and its submodules."""
    return sum(sum(1 for n in type(m)._shapeprof_graph_module.graph.nodes if n.target is fused_linear_activation
                   and (n.kwargs["activation"] != "none") == activation)
               for m in module.modules() if getattr(type(m), "_shapeprof_graph_module", None) is not None)


def snapshot(model: nn.Module) -> dict:
    """Everything optimize must leave alone: classes, modes, hook registries, tensors and their values."""
    return {
        "classes": [type(m) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "dicts": [sorted(vars(m)) for m in model.modules()],
        "hooks": [(name, id(v), dict(v)) for m in model.modules() for name, v in vars(m).items()
                  if "hooks" in name and isinstance(v, dict)],
        "tensors": [(k, id(t), t.device, t.dtype, t._version, t.detach().clone())
                    for k, t in model.state_dict(keep_vars=True).items()],
    }


def assert_same(before: dict, after: dict):
    for key in ("classes", "training", "dicts", "hooks"):
        assert before[key] == after[key], key
    for (k, i, dev, dt, ver, value), (k2, i2, dev2, dt2, ver2, value2) in zip(before["tensors"], after["tensors"]):
        assert (k, i, dev, dt, ver) == (k2, i2, dev2, dt2, ver2)
        assert torch.equal(value, value2)


# ---------------------------------------------------------------------------------------------- the drop-in

def test_drop_in_is_the_users_class_with_the_same_parameters_and_state_dict():
    torch.manual_seed(0)
    model = MLP(d_in=32, d_hidden=64, d_out=8).eval().requires_grad_(False)   # frozen: prepacking applies
    x = torch.randn(6, 32)
    fast = optimize(model, x)
    assert isinstance(fast, MLP) and type(fast).__name__ == "MLP" and fast is not model
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(p is q for p, q in zip(fast.parameters(), model.parameters()))   # shared, not copied
    assert list(fast.state_dict()) == list(model.state_dict())
    assert fast.training is model.training is False
    assert {p.device for p in fast.parameters()} == {torch.device("cpu")}
    assert not any(isinstance(m, fx.GraphModule) for m in fast.modules())   # the graph is no submodule
    assert fused_count(fast) == 2
    assert fused_count(fast, activation=False) == 1          # the output Linear: prepacked for oneDNN
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
        torch.testing.assert_close(fast(torch.randn(1, 32) * 0 + x[:1]), model(x[:1]))   # another batch size
    # the weights stay in step: an update through either is seen by both
    with torch.no_grad():
        model.blocks[0][0].weight.mul_(0.5)
        torch.testing.assert_close(fast(x), model(x))
    # mode changes on the copy do not reach the original
    fast.train()
    assert model.training is False and not any(m.training for m in model.modules())
    fast.eval()
    # load_state_dict into the drop-in works with the original's keys
    fast.load_state_dict(model.state_dict())
    # deepcopy keeps the rewritten forward; pickling saves the user's class (which cannot hold the rewrites)
    clone = copy.deepcopy(fast)
    assert isinstance(clone, MLP) and type(clone)._shapeprof_graph_module is type(fast)._shapeprof_graph_module
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is MLP
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_original_model_is_untouched_no_hooks_fire():
    torch.manual_seed(0)
    model = MLP(d_in=16, d_hidden=32, d_out=4).eval()
    calls = []
    model.blocks[1].register_forward_hook(lambda m, i, o: calls.append("block1"))
    before = snapshot(model)
    fast = optimize(model, torch.randn(3, 16), measure=True)
    assert_same(before, snapshot(model))
    assert calls == []                 # optimize ran the model many times: user hooks were silenced
    with torch.no_grad():
        fast(torch.randn(3, 16))
    assert calls == ["block1"]         # but the drop-in keeps them (copied registries), and calls them
    assert_same(before, snapshot(model))
    # a whole-model graph would run blocks.1 inline and skip its hook: the blocks are rewritten one by one instead
    report = fast.shapeprof_report
    assert report.not_captured == [
        ("", "the traced graph runs blocks.1 inline, so the hooks registered on it would not run"),
        ("blocks", "the traced graph runs blocks.1 inline, so the hooks registered on it would not run")]
    assert [g.path for g in report.graphs] == ["blocks.0", "blocks.1"]
    # measure=True keeps a fusion only where it measured no slower on this machine
    fusion = next(o for o in report.outcomes if o.name == "fuse_linear_activation")
    assert fusion.status in ("applied", "slower") and len(fusion.result.applied) == 2


def test_whole_mlp_both_styles_every_activation():
    torch.manual_seed(0)
    for cls in (MLP, FunctionalMLP):
        for act in ("relu", "gelu", "silu"):
            model = cls(d_in=24, d_hidden=48, d_out=8, n_blocks=3, activation=act).eval()
            x = torch.randn(7, 24)
            fast = optimize(model, x, rewrites=FUSION)
            report = fast.shapeprof_report
            assert [o.status for o in report.outcomes] == ["applied"], (cls, act, str(report))
            assert len(report.applied) == 3 and report.skipped == []
            assert report.verified and report.graphs[0].path == ""
            assert report.bytes_saved == 3 * 2 * 7 * 48 * 4       # each block's (7, 48) fp32 intermediate, x2
            with torch.no_grad():
                torch.testing.assert_close(fast(x), model(x))


@pytest.mark.parametrize("flash", [True, False])
def test_gpt_mlp_blocks_are_fused_and_generate_gives_the_same_tokens(flash):
    torch.manual_seed(0)
    config = GPTConfig.tiny(flash=flash, n_layer=3)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 8))
    fast = optimize(model, idx, rewrites=FUSION)
    report = fast.shapeprof_report
    # GPT.forward does not trace (assert t <= block_size): its blocks are captured instead
    assert report.not_captured[0][0] == "" and "control flow" in report.not_captured[0][1]
    assert [g.path for g in report.graphs] == [f"transformer.h.{i}" for i in range(3)]
    assert [m.where.split(" (")[0] for m in report.applied] == [
        f"transformer.h.{i}.mlp.c_fc -> transformer.h.{i}.mlp.gelu" for i in range(3)]
    # nn.GELU() is the exact erf GELU: lowered to oneDNN "gelu" with algorithm "none", and it verifies
    assert all(m.what == "Linear + GELU -> mkldnn._linear_pointwise(gelu, none)" for m in report.applied)
    assert report.outcomes[0].status == "applied" and report.outcomes[0].verification.ok
    assert isinstance(fast, GPT) and all(isinstance(b, type(model.transformer.h[0])) for b in fast.transformer.h)
    assert list(fast.state_dict()) == list(model.state_dict())
    assert fast.lm_head.weight is model.transformer.wte.weight   # tied weights stay tied, to the user's tensor
    assert fused_count(fast) == 3
    # generate() calls self(...): it now runs the rewritten blocks, on growing lengths and another batch
    out = fast.generate(idx, max_new_tokens=12, greedy=True)
    assert torch.equal(out, model.generate(idx, max_new_tokens=12, greedy=True))
    one = idx[:1, :3]
    assert torch.equal(fast.generate(one, 6, greedy=True), model.generate(one, 6, greedy=True))
    # a call the trace did not see (targets given) still works: GPT's own forward, the blocks rewritten
    with torch.no_grad():
        logits, loss = fast(idx, targets=idx)
        logits0, loss0 = model(idx, targets=idx)
    torch.testing.assert_close(loss, loss0)


def test_guard_runs_the_original_forward_for_calls_the_trace_did_not_see():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 16)
            self.drop = nn.Dropout(0.5)

        def forward(self, x, scale: float = 1.0, mask=None):
            h = torch.relu(self.fc(x)) * scale
            if self.training:           # specialised away by tracing in eval mode
                h = self.drop(h)
            return h if mask is None else h * mask

    torch.manual_seed(0)
    model = Scaled().eval()
    x = torch.randn(4, 8)
    fast = optimize(model, x)
    assert len(fast.shapeprof_report.applied) == 1
    with torch.no_grad():
        torch.testing.assert_close(fast(x, 3.0), model(x, 3.0))             # another constant
        torch.testing.assert_close(fast(x, scale=1.0), model(x))            # same constant, as a keyword
        mask = torch.rand(4, 16)
        torch.testing.assert_close(fast(x, mask=mask), model(x, mask=mask))   # a tensor where None was
    fast.train()        # training: the class's own forward (with dropout and autograd) runs
    torch.manual_seed(1)
    y = fast(x)
    torch.manual_seed(1)
    model.train()
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    assert model.fc.weight.grad is not None              # the shared parameter got its gradient


def test_model_with_a_tensor_constant_is_captured_whole():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, x):
            return F.relu(self.fc(x)) + torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])

    model = WithConstant().eval()
    x = torch.randn(3, 4)
    fast = optimize(model, x)
    assert fast.shapeprof_report.graphs[0].path == "" and len(fast.shapeprof_report.applied) == 1
    assert list(fast.state_dict()) == list(model.state_dict())   # the constant is a non-persistent buffer
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


class WritesItsState(nn.Module):
    """Linear + ReLU (a fusion matches) in a forward that writes its parameters and buffers in place."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.arange(1.0, 9.0))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x):
        self.scale.data.mul_(2)                 # through .data: the parameter's _version does not move
        self.count.add_(1)
        self.last.copy_(x[0])
        return F.relu(self.fc(x)) * self.scale


def test_parameters_and_buffers_a_forward_writes_hold_their_values_afterwards():
    torch.manual_seed(0)
    model = WritesItsState().eval()
    x = torch.randn(3, 4)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fast = optimize(model, x, rewrites=FUSION, measure=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # each verification run started from the same weights, so the fused graph matched the original's output
    # (and measure=True then kept it only if it timed no slower)
    [outcome] = fast.shapeprof_report.outcomes
    assert outcome.verification.ok and fused_count(fast) == (1 if outcome.status == "applied" else 0)


def test_batch_norm_statistics_in_train_mode_hold_their_values_afterwards():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()).train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimize(model, torch.randn(16, 4), measure=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[1].num_batches_tracked.item() == 0


class Draws(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.relu(self.fc(x)) + torch.rand_like(x)


@pytest.mark.parametrize("kwargs", [{}, {"measure": True}, {"measure": True, "verify": False}])
def test_the_callers_rng_is_as_it_was(kwargs):
    model = Draws().eval()
    x = torch.ones(2, 8)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    expected_next = torch.rand(8)               # what the caller draws next without optimize in between
    torch.set_rng_state(state)
    optimize(model, x, rewrites=FUSION, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(8), expected_next)


# ---------------------------------------------------------------------------------------------- skips, refusals

def test_training_mode_is_skipped_with_the_reason():
    model = MLP(d_in=8, d_hidden=16, d_out=4)   # training mode
    fast = optimize(model, torch.randn(2, 8), rewrites=FUSION)
    report = fast.shapeprof_report
    assert [o.status for o in report.outcomes] == ["no match"]
    assert len(report.skipped) == 2 and all("training mode" in s.reason for s in report.skipped)
    assert fast.training and fused_count(fast) == 0


def test_inputs_requiring_grad_are_skipped():
    model = MLP(d_in=8, d_hidden=16, d_out=4).eval()
    report = optimize(model, torch.randn(2, 8, requires_grad=True), rewrites=FUSION).shapeprof_report
    assert report.applied == [] and all("requires grad" in s.reason for s in report.skipped)


def test_meta_model_or_inputs_are_refused_unless_verify_is_off():
    with torch.device("meta"):
        model = MLP(d_in=8, d_hidden=16, d_out=4).eval()
    with pytest.raises(OptimizeError, match="parameter 'blocks.0.0.weight' has no data.*verify=False"):
        optimize(model, torch.randn(2, 8), rewrites=FUSION)
    real = MLP(d_in=8, d_hidden=16, d_out=4).eval()
    with pytest.raises(OptimizeError, match="input .* has no data"):
        optimize(real, torch.empty(2, 8, device="meta"), rewrites=FUSION)
    with pytest.raises(OptimizeError, match="InputShape"):
        optimize(real, shapeprof.InputShape((2, 8)))
    fast = optimize(model, torch.empty(2, 8, device="meta"), verify=False, rewrites=FUSION)
    report = fast.shapeprof_report
    assert not report.verify and not report.verified
    assert report.skipped and all("no fused Linear + activation kernel on meta" in s.reason for s in report.skipped)
    assert "NOT VERIFIED" in str(report)


def test_verify_false_is_said_loudly():
    model = MLP(d_in=8, d_hidden=16, d_out=4).eval()
    report = optimize(model, torch.randn(2, 8), verify=False, rewrites=FUSION).shapeprof_report
    assert [o.status for o in report.outcomes] == ["unverified"] and len(report.applied) == 2
    assert not report.verified
    assert "NOT VERIFIED" in str(report)


def test_unknown_rewrite_name_is_an_error():
    with pytest.raises(OptimizeError, match="no rewrite named 'fuse_everything'"):
        optimize(MLP(8, 16, 4).eval(), torch.randn(2, 8), rewrites=["fuse_everything"])


# ---------------------------------------------------------------------------------------------- verification

class SwapGeluForTanh(Rewrite):
    """Deliberately wrong: replaces the exact GELU with its tanh approximation (a different function)."""

    name, description = "test_swap_gelu_for_tanh", "deliberately wrong"

    def run(self, gm, ctx):
        result = RewriteResult(self.name)
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.GELU:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(F.gelu, node.args, {"approximate": "tanh"})
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                result.applied.append(Match(ctx.where(node), "GELU -> GELU(tanh)"))
        return result


class Raises(Rewrite):
    name, description = "test_raises", "raises half way"

    def run(self, gm, ctx):
        raise ValueError("boom")


@pytest.fixture
def wrong_rewrites():
    rewrites.register(SwapGeluForTanh)
    rewrites.register(Raises)
    try:
        yield
    finally:
        rewrites.unregister("test_swap_gelu_for_tanh")
        rewrites.unregister("test_raises")


def test_a_rewrite_that_fails_verification_is_undone_and_reported(wrong_rewrites):
    assert "test_swap_gelu_for_tanh" in dict(rewrites.available())
    torch.manual_seed(0)
    model = MLP(d_in=16, d_hidden=64, d_out=8, activation="gelu").eval()
    x = torch.randn(32, 16) * 4       # pre-activations where erf and tanh GELU differ by ~1e-4
    fast = optimize(model, x, rewrites=["test_swap_gelu_for_tanh", "test_raises", "fuse_linear_activation"])
    report = fast.shapeprof_report
    wrong, raised, fused = report.outcomes
    assert (wrong.status, raised.status, fused.status) == ("rejected", "failed", "applied")
    assert len(wrong.result.applied) == 2 and not wrong.kept
    check = wrong.verification.checks[0]
    # fp32's rtol, atol the default or rtol x the largest output: erf vs tanh GELU misses it 10-fold
    with torch.no_grad():
        assert Tolerance.for_output(model(x)) == Tolerance(check.rtol, check.atol) == Tolerance(1.3e-6, 1e-5)
    assert (check.output, check.ok) == ("out", False)
    assert not wrong.verification.ok and wrong.verification.max_abs_diff > 10 * check.atol
    assert "Mismatched elements" in check.message
    assert raised.error == "ValueError: boom"
    # undone: the fusion ran on the original graph and found the exact GELUs; what is returned matches
    assert [m.what for m in report.applied] == ["Linear + GELU -> mkldnn._linear_pointwise(gelu, none)"] * 2
    assert "approximate = 'tanh'" not in report.code[""]
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    text = str(report)
    assert "rejected" in text and "undone" in text and "FAIL" in text


def test_tolerance_can_be_chosen():
    torch.manual_seed(0)
    model = MLP(d_in=16, d_hidden=64, d_out=8, activation="gelu").eval()
    x = torch.randn(32, 16) * 4
    rewrites.register(SwapGeluForTanh)
    try:
        report = optimize(model, x, rewrites=["test_swap_gelu_for_tanh"],
                          verify=Tolerance(rtol=1e-2, atol=1e-2)).shapeprof_report
    finally:
        rewrites.unregister("test_swap_gelu_for_tanh")
    assert report.outcomes[0].status == "applied"   # within a loose tolerance the approximation passes
    assert report.tolerance == Tolerance(1e-2, 1e-2)
    assert report.outcomes[0].verification.checks[0].atol == 1e-2


def test_default_tolerance_is_torch_testings_per_dtype_scaled_to_the_output():
    assert Tolerance.for_dtype(torch.float32) == Tolerance(1.3e-6, 1e-5)
    assert Tolerance.for_dtype(torch.bfloat16) == Tolerance(1.6e-2, 1e-5)
    assert Tolerance.for_dtype(torch.int64) == Tolerance(0.0, 0.0)
    assert Tolerance.for_output(torch.tensor([0.5, -2.0])) == Tolerance(1.3e-6, 1e-5)     # small: the default
    assert Tolerance.for_output(torch.tensor([0.5, -200.0])) == Tolerance(1.3e-6, 2.6e-4)  # rtol x max |out|
    big = torch.tensor([3.0, 1000.0], dtype=torch.bfloat16)
    assert Tolerance.for_output(big) == Tolerance(1.6e-2, 16.0)
    assert Tolerance.for_output(torch.tensor([float("inf"), 4.0])) == Tolerance(1.3e-6, 1e-5)
    assert Tolerance.for_output(torch.tensor([1, 2])) == Tolerance(0.0, 0.0)   # integers: exact


# ---------------------------------------------------------------------------------------------- the report

def test_report_renders_in_a_fixed_width_console_and_prices_on_the_spec():
    torch.manual_seed(0)
    model = MLP(d_in=32, d_hidden=128, d_out=8).eval()
    x = torch.randn(16, 32)
    fast = optimize(model, x, spec="h100-sxm", dtype=torch.bfloat16)
    report = fast.shapeprof_report
    assert isinstance(report, OptimizeReport) and report.spec.name == "h100-sxm" and report.dtype == "bfloat16"
    assert report.bytes_saved == 2 * (2 * 16 * 128 * 2)   # two blocks' (16, 128) intermediates, priced in bf16
    assert 0 < report.seconds_saved < report.predicted_seconds
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(report)
    text = console.file.getvalue()
    for expected in ("shapeprof optimize MLP", "fuse_linear_activation: applied", "blocks.0.0 -> blocks.0.1",
                     "mkldnn._linear_pointwise(relu)", "Verification", "on NVIDIA H100 80GB HBM3",
                     "runs only while the model is as it was optimized", "do not require grad"):
        assert expected in " ".join(text.split()), expected
    assert "blocks_0_0_weight" in report.code[""]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["spec"] == "h100-sxm" and data["verified"] and data["bytes_saved"] == report.bytes_saved
    assert data["outcomes"][0]["applied"][0]["where"].startswith("blocks.0.0 -> blocks.0.1")


def test_analyze_of_the_drop_in_sees_the_fused_kernels():
    torch.manual_seed(0)
    model = MLP(d_in=64, d_hidden=256, d_out=16).eval()
    x = torch.randn(32, 64)
    fast = optimize(model, x, rewrites=FUSION)
    before, after = shapeprof.analyze(model, x), shapeprof.analyze(fast, x)
    assert after.capture.method == "symbolic_trace" and after.coverage.complete
    assert [n.op for n in after.nodes].count("fused_linear_activation") == 2
    # the analysis of the result agrees with what optimize predicted, op for op through the same registry
    assert before.total.bytes - after.total.bytes == fast.shapeprof_report.bytes_saved
    assert abs((before.total.predicted_seconds - after.total.predicted_seconds)
               - fast.shapeprof_report.seconds_saved) < 1e-12


def test_optimizing_the_drop_in_again_finds_nothing_new():
    model = MLP(d_in=8, d_hidden=16, d_out=4).eval()
    x = torch.randn(2, 8)
    fast = optimize(model, x)
    again = optimize(fast, x)
    assert isinstance(again, MLP) and again.shapeprof_report.outcomes[0].status == "no match"
    assert all(p is q for p, q in zip(again.parameters(), model.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


# ---------------------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


@cuda
@pytest.mark.parametrize("activation, approximate, lowered", [
    ("relu", None, "aten._addmm_activation(relu) [cuBLASLt epilogue]"),
    ("gelu", "tanh", "aten._addmm_activation(use_gelu) [cuBLASLt epilogue]"),
])
def test_cuda_bf16_lowers_to_the_cublaslt_epilogue_and_verifies(activation, approximate, lowered):
    torch.manual_seed(0)
    model = MLP(d_in=256, d_hidden=1024, d_out=256, activation=activation).eval()
    if approximate:
        for block in model.blocks:
            block[1] = nn.GELU(approximate=approximate)
    model = model.to("cuda", torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    fast = optimize(model, x)   # (the default bf16 atol would fail 1-ulp differences of near-zero outputs)
    report = fast.shapeprof_report
    assert report.outcomes[0].status == "applied", str(report)
    assert [m.what.split(" -> ")[1] for m in report.applied] == [lowered] * 2
    assert report.spec.name in ("h100-sxm", "h200", "a100-80gb-sxm")   # the GPU it runs on when known
    with torch.no_grad():
        expected = model(x)
        tol = Tolerance.for_output(expected)
        torch.testing.assert_close(fast(x), expected, rtol=tol.rtol, atol=tol.atol)
        w, b = model.blocks[0][0].weight, model.blocks[0][0].bias
        act = "relu" if activation == "relu" else "gelu_tanh"
        names = _kernels(lambda: fused_linear_activation(x, w, b, act, "cublaslt"))
    # one GEMM kernel with the activation in its epilogue ('..._relubias_...'), no second kernel for it
    assert len(names) == 1 and not any(k in names[0].lower() for k in ("elementwise", "clamp")), names


@cuda
def test_cuda_skips_what_the_epilogue_cannot_do():
    torch.manual_seed(0)
    config = GPTConfig.tiny()
    model = GPT(config).to("cuda").eval()
    idx = torch.randint(0, config.vocab_size, (2, 8), device="cuda")
    fast = optimize(model, idx)
    report = fast.shapeprof_report
    assert report.applied == [] and report.skipped and all("tanh approximation" in s.reason for s in report.skipped)
    assert torch.equal(fast.generate(idx, 5, greedy=True), model.generate(idx, 5, greedy=True))
    mlp = MLP(d_in=32, d_hidden=64, d_out=8, activation="silu").to("cuda").eval()
    skipped = optimize(mlp, torch.randn(4, 32, device="cuda")).shapeprof_report.skipped
    assert skipped and all("SiLU" in s.reason for s in skipped)
    gelu_tanh = MLP(d_in=32, d_hidden=64, d_out=8).to("cuda").eval()
    for block in gelu_tanh.blocks:
        block[1] = nn.GELU(approximate="tanh")
    fp32 = optimize(gelu_tanh, torch.randn(8, 32, device="cuda")).shapeprof_report
    assert fp32.applied == [] and all("separate kernel" in s.reason for s in fp32.skipped)


@cuda
def test_a_moved_drop_in_fails_clearly():
    model = MLP(d_in=32, d_hidden=64, d_out=8).eval()
    x = torch.randn(4, 32)
    fast = optimize(model, x)                       # fused for the CPU (oneDNN)
    moved = optimize(model, x).cuda()
    with torch.no_grad(), pytest.raises(RuntimeError, match="fused for cpu .* now runs on cuda"):
        moved(x.cuda())
    assert fast is not moved


def test_prepacked_linears_follow_their_parameters():
    torch.manual_seed(0)
    model = MLP(d_in=32, d_hidden=64, d_out=8, n_blocks=1).eval().requires_grad_(False)
    x = torch.randn(16, 32)
    fast = optimize(model, x)
    report = fast.shapeprof_report
    assert [o.result.name for o in report.outcomes if o.status == "applied"] == ["fuse_linear_activation",
                                                                                 "prepack_linear"]
    assert fused_count(fast) == 1 and fused_count(fast, activation=False) == 1
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
        model.out.weight.mul_(2)                           # in place: the packed copy must be refreshed
        model.blocks[0][0].weight.add_(1)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
        model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
        for rows in (1, 3, 100):                           # one row runs the plain Linear; any count works
            y = torch.randn(rows, 32)
            torch.testing.assert_close(fast(y), model(y), rtol=1e-5, atol=1e-5)


def test_one_row_examples_are_not_prepacked():
    model = MLP(d_in=32, d_hidden=64, d_out=8, n_blocks=1).eval().requires_grad_(False)
    report = optimize(model, torch.randn(1, 32), rewrites=["prepack_linear"]).shapeprof_report
    assert report.applied == []
    assert {s.reason for s in report.skipped} == {"one row: MKL's matrix-vector path beats oneDNN's linear there"}


def test_gpt_generate_is_unchanged_with_every_rewrite():
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny()).eval().requires_grad_(False)
    idx = torch.randint(0, 256, (2, 12))
    fast = optimize(model, idx)
    assert fused_count(fast) == 2 and fused_count(fast, activation=False) >= 4
    assert next(o for o in fast.shapeprof_report.outcomes if o.name == "kv_cache").kept
    torch.testing.assert_close(fast.generate(idx, 10, greedy=True), model.generate(idx, 10, greedy=True))


def test_trainable_linears_are_not_prepacked_and_the_report_says_how():
    model = MLP(d_in=32, d_hidden=64, d_out=8, n_blocks=1).eval()
    report = optimize(model, torch.randn(16, 32), rewrites=["prepack_linear"]).shapeprof_report
    assert report.applied == []
    assert all("requires_grad_(False)" in s.reason for s in report.skipped) and report.skipped
