"""Tests for rewrites/ (shapeprof.rewrites): the registry, the pass protocol, and fuse_linear_activation on every
way users write Linear + activation. Each test: build the model, rewrite its captured graph, graph.lint(), compare
outputs with the original (assert_close), count what matched and what was skipped."""
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import shapeprof.rewrites as rewrites
from shapeprof.capture import capture
from shapeprof.costs import cost_of
from shapeprof.hardware import get_spec
from shapeprof.optimize import _graph_module
from shapeprof.records import OpRecord, TensorMeta
from shapeprof.rewrites import CAPTURE_KEY, Match, Rewrite, RewriteContext, RewriteResult, Skip
from shapeprof.rewrites.fuse_linear_activation import FuseLinearActivation
from shapeprof.rewrites.linear_kernels import choose_kernel, fused_linear_activation, reference

FUSE = rewrites.get("fuse_linear_activation")
FUSED = fused_linear_activation


def fuse(model: nn.Module, *args, ctx: RewriteContext | None = None, **ctx_args):
    """Capture `model`, run the fusion on its graph; (GraphModule, RewriteResult)."""
    cap = capture(model, *args, method="symbolic_trace")
    gm = _graph_module(model, cap)
    ctx = ctx or RewriteContext(path="", device=torch.device("cpu"), training=model.training, **ctx_args)
    result = FUSE(gm, ctx)
    gm.graph.lint()
    return gm, result


def fused_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is FUSED]


def check_outputs(gm, model, *args):
    with torch.no_grad():
        expected = model(*[a.clone() for a in args])
        actual = gm(*[a.clone() for a in args])
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------- registry

def test_available_lists_the_fusion_with_a_description():
    names = dict(rewrites.available())
    assert "fuse_linear_activation" in names
    assert "ReLU/GELU/SiLU" in names["fuse_linear_activation"]
    assert isinstance(rewrites.get("fuse_linear_activation"), FuseLinearActivation)


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        rewrites.register(FuseLinearActivation())
    with pytest.raises(KeyError, match="no rewrite named 'nope'.*fuse_linear_activation"):
        rewrites.get("nope")
    with pytest.raises(TypeError):
        rewrites.register(object())


def test_register_as_class_decorator_and_unregister():
    @rewrites.register
    class Identity(Rewrite):
        name, description = "test_identity", "does nothing"

        def run(self, gm, ctx):
            return RewriteResult(self.name)
    try:
        assert ("test_identity", "does nothing") in rewrites.available()
        gm = fx.symbolic_trace(nn.Linear(2, 2))
        assert rewrites.get("test_identity")(gm).applied == []
    finally:
        rewrites.unregister("test_identity")
    assert "test_identity" not in dict(rewrites.available())


def test_a_pass_must_return_a_result_and_gets_linted():
    class Bad(Rewrite):
        name, description = "bad", "returns nothing"

        def run(self, gm, ctx):
            return None
    with pytest.raises(TypeError, match="RewriteResult"):
        Bad()(fx.symbolic_trace(nn.Linear(2, 2)))

    class Breaks(Rewrite):
        name, description = "breaks", "leaves a dangling get_attr"

        def run(self, gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                gm.graph.get_attr("no_such_attribute")
            return RewriteResult(self.name)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no_such_attribute"):
        Breaks()(fx.symbolic_trace(nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------------------- every form

class ModuleReLU(nn.Module):
    def __init__(self, inplace=False, bias=True):
        super().__init__()
        self.fc = nn.Linear(8, 16, bias=bias)
        self.act = nn.ReLU(inplace=inplace)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


class Functional(nn.Module):
    """F.linear with the weight as a parameter, then `act` (a function of the linear output)."""

    def __init__(self, act, bias=True):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8) / 3)
        self.b = nn.Parameter(torch.randn(16)) if bias else None
        self.act = act

    def forward(self, x):
        return self.act(F.linear(x, self.w, self.b)) * 2


class TensorReluInPlace(nn.Module):
    """`h.relu_()` whose result is unused: later code reads `h`, which the in-place op changed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        h = self.fc(x)
        h.relu_()
        return h * 3 + h.sum()


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8), nn.GELU())})
        self.head = nn.Sequential(nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(inplace=True)))

    def forward(self, x):
        return self.head(self.inner["mlp"](x))


FORMS = {
    # name: (model, number of matches, the activation fused, what the match says)
    "nn.ReLU": (lambda: ModuleReLU(), 1, "relu", "Linear + ReLU"),
    "nn.ReLU(inplace)": (lambda: ModuleReLU(inplace=True), 1, "relu", "Linear + ReLU"),
    "nn.Linear(bias=False)": (lambda: ModuleReLU(bias=False), 1, "relu", "Linear + ReLU"),
    "F.relu": (lambda: Functional(F.relu), 1, "relu", "F.linear + F.relu"),
    "F.relu(inplace)": (lambda: Functional(lambda y: F.relu(y, inplace=True)), 1, "relu", "F.linear + F.relu"),
    "torch.relu": (lambda: Functional(torch.relu), 1, "relu", "F.linear + torch.relu"),
    "torch.relu_": (lambda: Functional(torch.relu_), 1, "relu", "F.linear + torch.relu_"),
    "F.relu_": (lambda: Functional(F.relu_), 1, "relu", "F.linear + torch.relu_"),
    "Tensor.relu": (lambda: Functional(lambda y: y.relu()), 1, "relu", "F.linear + Tensor.relu"),
    "Tensor.relu_ (result unused)": (lambda: TensorReluInPlace(), 1, "relu", "Linear + Tensor.relu_"),
    "F.linear no bias": (lambda: Functional(F.relu, bias=False), 1, "relu", "F.linear + F.relu"),
    "F.gelu": (lambda: Functional(F.gelu), 1, "gelu", "F.linear + F.gelu"),
    "F.gelu(tanh)": (lambda: Functional(lambda y: F.gelu(y, approximate="tanh")), 1, "gelu_tanh",
                     "F.linear + F.gelu(tanh)"),
    "F.silu": (lambda: Functional(F.silu), 1, "silu", "F.linear + F.silu"),
    "F.silu(inplace)": (lambda: Functional(lambda y: F.silu(y, inplace=True)), 1, "silu", "F.linear + F.silu"),
    "nn.Sequential(Linear, GELU(tanh))": (lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(approximate="tanh")),
                                          1, "gelu_tanh", "Linear + GELU(tanh)"),
    "nested": (lambda: Nested(), 3, None, None),
}


@pytest.mark.parametrize("form", FORMS)
def test_each_form_is_matched_and_outputs_match(form):
    make, count, kind, what = FORMS[form]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(5, 8)
    gm, result = fuse(model, x)
    assert len(result.applied) == count, result
    assert result.skipped == []
    assert len(fused_nodes(gm)) == count
    if kind is not None:
        assert fused_nodes(gm)[0].kwargs == {"activation": kind, "kernel": "mkldnn", "pack": "frozen"}
        assert result.applied[0].what.startswith(what + " -> mkldnn._linear_pointwise")
    check_outputs(gm, model, x)


def test_nested_modules_name_their_paths():
    torch.manual_seed(0)
    gm, result = fuse(Nested().eval(), torch.randn(3, 8))
    wheres = [m.where.split(" (")[0] for m in result.applied]
    assert wheres == ["inner.mlp.0 -> inner.mlp.1", "inner.mlp.2 -> inner.mlp.3", "head.0.0 -> head.0.1"]
    assert [m.what.split(" -> ")[1] for m in result.applied] == [
        "mkldnn._linear_pointwise(swish)", "mkldnn._linear_pointwise(gelu, none)",
        "mkldnn._linear_pointwise(relu)"]


def test_where_carries_the_module_path_prefix_and_source_line():
    model = ModuleReLU().eval()
    cap = capture(model, torch.randn(2, 8), method="symbolic_trace")
    gm = _graph_module(model, cap)
    result = FUSE(gm, RewriteContext(path="blocks.3", device=torch.device("cpu")))
    assert result.applied[0].where.startswith("blocks.3.fc -> blocks.3.act (test_rewrites.py:")


def test_three_dimensional_input_and_a_whole_mlp():
    from examples.mlp import MLP, FunctionalMLP
    torch.manual_seed(0)
    for cls in (MLP, FunctionalMLP):
        for act in ("relu", "gelu", "silu"):
            model = cls(d_in=16, d_hidden=32, d_out=8, n_blocks=3, activation=act).eval()
            x = torch.randn(2, 5, 16)   # (B, T, C): the fused kernel takes any leading dims
            gm, result = fuse(model, x)
            assert len(result.applied) == 3, (cls.__name__, act)   # every block; the output Linear has no act
            check_outputs(gm, model, x)


def test_exact_gelu_is_erf_and_tanh_is_not_confused_with_it():
    # mkldnn's "gelu" with algorithm "none" is exactly F.gelu (erf); "tanh" is the approximation.
    torch.manual_seed(0)
    x, w, b = torch.randn(64, 32) * 3, torch.randn(128, 32) / 4, torch.randn(128)
    with torch.no_grad():
        exact = FUSED(x, w, b, "gelu", "mkldnn")
        tanh = FUSED(x, w, b, "gelu_tanh", "mkldnn")
    torch.testing.assert_close(exact, F.gelu(F.linear(x, w, b)))
    torch.testing.assert_close(tanh, F.gelu(F.linear(x, w, b), approximate="tanh"))
    assert (exact - tanh).abs().max() > 1e-4   # two different functions


# ---------------------------------------------------------------------------------------------- skips

class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        h = self.fc(x)
        return F.relu(h) + h   # the pre-activation is read again


class ReadBeforeInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        h = self.fc(x)
        s = h.sum()            # reads the pre-activation ...
        h.relu_()              # ... before the in-place relu changes it
        return h + s


def test_linear_output_used_twice_is_not_fused():
    model = UsedTwice().eval()
    x = torch.randn(4, 8)
    gm, result = fuse(model, x)
    assert result.applied == [] and fused_nodes(gm) == []
    assert len(result.skipped) == 1
    assert result.skipped[0].where.startswith("fc -> relu")
    assert "also used by add" in result.skipped[0].reason
    check_outputs(gm, model, x)


def test_in_place_activation_read_before_is_not_fused():
    gm, result = fuse(ReadBeforeInPlace().eval(), torch.randn(4, 8))
    assert result.applied == []
    assert "read by sum_1 before the in-place Tensor.relu_ changes it" in result.skipped[0].reason


def test_training_mode_and_inputs_requiring_grad_are_skipped():
    model = ModuleReLU()   # training mode
    gm, result = fuse(model, torch.randn(4, 8))
    assert result.applied == [] and "training mode" in result.skipped[0].reason
    model.eval()
    gm, result = fuse(model, torch.randn(4, 8), inputs_require_grad=True)
    assert result.applied == [] and "requires grad" in result.skipped[0].reason


def test_hooked_modules_are_skipped():
    model = ModuleReLU().eval()
    model.fc.register_forward_hook(lambda m, i, o: None)
    gm, result = fuse(model, torch.randn(4, 8))
    assert result.applied == [] and "hooks" in result.skipped[0].reason


def test_unsupported_dtype_and_device_are_skipped_with_the_reason():
    model = ModuleReLU().eval().double()
    gm, result = fuse(model, torch.randn(4, 8, dtype=torch.float64))
    assert result.applied == [] and "not float64" in result.skipped[0].reason
    x = TensorMeta((4, 8), torch.float32, (8, 1))
    w = TensorMeta((16, 8), torch.float32, (8, 1))
    assert "no fused Linear + activation kernel on xpu" in choose_kernel(torch.device("xpu"), x, w, None, "relu")


@pytest.mark.parametrize("kind, bias, dtype, why", [
    ("gelu", True, torch.bfloat16, "tanh approximation"),
    ("silu", True, torch.bfloat16, "no SiLU epilogue"),
    ("relu", False, torch.bfloat16, "needs a bias"),
    ("gelu_tanh", True, torch.float32, "separate kernel"),
    ("relu", True, torch.float64, "no cuBLASLt epilogue for float64"),
])
def test_cuda_lowering_preconditions(kind, bias, dtype, why, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    x = TensorMeta((4, 8), dtype, (8, 1))
    w = TensorMeta((16, 8), dtype, (8, 1))
    b = TensorMeta((16,), dtype, (1,)) if bias else None
    assert why in choose_kernel(torch.device("cuda"), x, w, b, kind)


@pytest.mark.parametrize("kind, dtype", [("relu", torch.bfloat16), ("gelu_tanh", torch.float16),
                                         ("relu", torch.float32)])
def test_cuda_lowering_what_the_epilogue_fuses(kind, dtype, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    for rows in (1, 64):   # measured: one GEMM kernel with the epilogue from 1 row up (torch 2.11, H200)
        x, w, b = (TensorMeta((rows, 8), dtype, (8, 1)), TensorMeta((16, 8), dtype, (8, 1)),
                   TensorMeta((16,), dtype, (1,)))
        assert choose_kernel(torch.device("cuda"), x, w, b, kind) == "cublaslt"


def test_a_linear_bound_by_its_weights_is_not_worth_fusing():
    # batch 1 through Linear(768, 3072): reading the 9.4 MB weight is the time; the 12 kB output saves 0.3%
    model = nn.Sequential(nn.Linear(768, 3072), nn.ReLU()).eval()
    gm, result = fuse(model, torch.randn(1, 768))
    assert result.applied == [] and fused_nodes(gm) == []
    (skip,) = result.skipped
    assert skip.reason == ("the roofline predicts 0.3% of the pair's time saved on NVIDIA A100-SXM4-80GB "
                           "(under 1%): the Linear is bound by reading its weights (9.44 MB), not by its output")
    gm, result = fuse(model, torch.randn(64, 768))   # 64 rows: the output is 1.6 MB of traffic each way
    assert len(result.applied) == 1


def test_activation_after_something_else_is_left_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU()).eval()
    gm, result = fuse(model, torch.randn(2, 8))
    assert result.applied == [] and result.skipped == []   # not a candidate: nothing to report


# ---------------------------------------------------------------------------------------------- costs

def test_each_match_reports_the_intermediate_bytes_and_roofline_time_saved():
    model = ModuleReLU().eval()
    x = torch.randn(512, 8)
    spec = get_spec("a100-80gb-sxm")
    cap = capture(model, x, method="symbolic_trace")
    unfused = [r for cn in cap.nodes if cn.module_path in ("fc", "act") for r in cn.records]
    assert [r.name for r in unfused] == ["aten.t", "aten.addmm", "aten.relu"]
    ctx = RewriteContext(spec=spec, device=torch.device("cpu"))
    gm, result = fuse(model, x, ctx=ctx)
    (m,) = result.applied
    assert m.bytes_saved == 2 * 512 * 16 * 4   # fc's (512, 16) fp32 output, no longer written and read back
    (fused,) = fused_nodes(gm)
    # the roofline, from the cost registry: t + addmm + relu before, one mkldnn._linear_pointwise after
    assert math.isclose(m.seconds_saved, ctx.seconds(unfused) - ctx.seconds(fused.meta[CAPTURE_KEY].records))
    assert m.seconds_saved > 0
    # priced in bf16 on the spec, the intermediate is half the bytes
    gm, result = fuse(model, x, ctx=RewriteContext(spec=spec, dtype=torch.bfloat16, device=torch.device("cpu")))
    assert result.applied[0].bytes_saved == 2 * 512 * 16 * 2


def test_fused_node_carries_the_fused_op_record_for_later_passes():
    gm, _ = fuse(ModuleReLU().eval(), torch.randn(4, 8))
    (node,) = fused_nodes(gm)
    cn = node.meta[CAPTURE_KEY]
    assert [r.name for r in cn.records] == ["mkldnn._linear_pointwise"]
    assert cn.output.shape == (4, 16) and cn.module_path == "fc"
    assert cost_of(cn.records[0]).flops == 2 * 4 * 8 * 16 + 4 * 16   # matmul + the relu per output element


def test_rewrite_context_seconds_and_bytes_follow_the_cost_registry():
    x, w, out = (TensorMeta((64, 32), torch.float32, (32, 1)), TensorMeta((128, 32), torch.float32, (32, 1)),
                 TensorMeta((64, 128), torch.float32, (128, 1)))
    rec = OpRecord(torch.ops.mkldnn._linear_pointwise.default, (x, w, None, "relu", [], ""), {}, (out,))
    ctx = RewriteContext(spec=get_spec("h100-sxm"))
    assert ctx.bytes([rec]) == (64 * 32 + 128 * 32 + 64 * 128) * 4
    assert ctx.seconds([rec]) > 0


# ---------------------------------------------------------------------------------------------- run time

def test_fused_call_refuses_a_moved_model_clearly():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="fused for cuda .* now runs on cpu.*optimize\\(\\) again"):
        FUSED(x, w, None, "relu", "cublaslt")


def test_fused_call_with_autograd_recording_runs_unfused_and_warns_once():
    from shapeprof.rewrites import linear_kernels as mod
    mod._warned.clear()
    x = torch.randn(3, 4, requires_grad=True)
    w, b = torch.randn(5, 4), torch.randn(5)
    with pytest.warns(RuntimeWarning, match="no backward"):
        y = FUSED(x, w, b, "silu", "mkldnn")
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    reference(x2, w, b, "silu").sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)   # gradients are right, not silently missing
    with torch.no_grad():
        torch.testing.assert_close(FUSED(x, w, b, "silu", "mkldnn"), F.silu(F.linear(x, w, b)))


def test_fused_call_traces_as_one_node_and_runs_on_meta():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            return FUSED(x, self.w, None, "relu", "mkldnn")
    gm = fx.symbolic_trace(M())
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [FUSED]
    out = FUSED(torch.empty(2, 4, device="meta"), torch.empty(6, 4, device="meta"), None, "gelu", "mkldnn")
    assert out.shape == (2, 6) and out.is_meta


def test_result_types_add_up():
    r = RewriteResult("x", [Match("a", "b", 10, 1e-6), Match("c", "d", 5, 2e-6)], [Skip("e", "f")])
    assert r.changed and r.bytes_saved == 15 and math.isclose(r.seconds_saved, 3e-6)
    merged = r.merged(RewriteResult("x", [Match("g", "h", 1, 0.0)]))
    assert len(merged.applied) == 3 and len(merged.skipped) == 1


# ---------------------------------------------------------------------------------------------- ATen level

def test_aten_level_graph_from_export_is_matched_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU()).eval()
    x = torch.randn(3, 8)
    cap = capture(model, x, method="export")
    graph = fx.Graph()
    env = {}
    graph.output(graph.graph_copy(cap.graph, env))
    for cn in cap.nodes:
        if cn.node in env:   # graph_copy leaves the output node out
            env[cn.node].meta[CAPTURE_KEY] = cn
    gm = fx.GraphModule(nn.Module(), graph)
    result = FUSE(gm, RewriteContext(device=torch.device("cpu")))
    assert [m.what for m in result.applied] == [
        "aten.linear + aten.gelu -> mkldnn._linear_pointwise(gelu, none)",
        "aten.linear + aten.relu -> mkldnn._linear_pointwise(relu)"]
    # feed the lifted parameters by the program's signature, then the input
    from torch.export.graph_signature import InputKind
    state = dict(model.named_parameters())
    inputs = [state[s.target] if s.kind == InputKind.PARAMETER else x
              for s in cap.exported.graph_signature.input_specs]
    with torch.no_grad():
        (out,) = gm(*inputs)
        torch.testing.assert_close(out, model(x))
