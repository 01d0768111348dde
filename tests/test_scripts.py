"""Script-side model capture (shapeprof.scripts), in process: which calls are top level, what is kept of them."""
import gc
import sys
import textwrap
import weakref

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from shapeprof import scripts
from shapeprof.scripts import ModelRecorder, ScriptNotFound, check_target, run_script, script_name
from shapeprof.session import TraceConfig, analyse_model


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.head = nn.Linear(8, 2)

    def forward(self, x, scale=1.0):
        return self.head(self.inner(x)) * scale


class SelfCaller(nn.Module):
    """Like nanoGPT: generate() calls self(...) outside any forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)

    def generate(self, x, steps):
        for _ in range(steps):
            x = torch.cat([x, self(x[:, -1:])], dim=1)   # (B, T + 1, 4)
        return x


def _global_hooks():
    m = torch.nn.modules.module
    return (len(m._global_forward_pre_hooks), len(m._global_forward_hooks),
            len(m._global_forward_hooks_always_called), len(m._global_forward_hooks_with_kwargs))


def test_only_top_level_calls_count_and_each_model_once():
    outer, other = Outer(), nn.Linear(3, 3)
    with ModelRecorder() as rec:
        for _ in range(5):
            outer(torch.randn(4, 8))
        other(torch.randn(2, 3))
    assert [(m.name, m.calls) for m in rec.models] == [("Outer", 5), ("Linear", 1)]
    # Inner and the Linears inside Outer ran 5 times each, but inside Outer's forward: not models of their own
    assert rec.errors == []


def test_a_module_called_at_top_level_and_inside_another_counts_only_its_top_level_calls():
    outer = Outer()
    with ModelRecorder() as rec:
        outer(torch.randn(1, 8))
        outer.inner(torch.randn(3, 8))   # the script may call a submodule directly too
        outer(torch.randn(1, 8))
    assert [(m.name, m.calls) for m in rec.models] == [("Outer", 2), ("Inner", 1)]


def test_self_calls_from_a_non_forward_method_are_top_level():
    model = SelfCaller()
    with ModelRecorder() as rec:
        out = model.generate(torch.randn(1, 2, 4), steps=6)
    assert out.shape == (1, 8, 4)
    (traced,) = rec.models
    assert traced.calls == 6 and tuple(traced.args[0].shape) == (1, 1, 4)


def test_first_call_inputs_become_metadata_at_once():
    model = Outer()
    x = torch.randn(4, 8)
    with ModelRecorder() as rec:
        model(x, scale=torch.ones(1, dtype=torch.float64))
        model(torch.randn(7, 8), scale=2.0)
    x.resize_(100, 3)   # the script changes its tensor afterwards: what was recorded does not change
    (traced,) = rec.models
    (arg,) = traced.args
    assert arg.device.type == "meta" and tuple(arg.shape) == (4, 8) and arg.dtype == torch.float32
    scale = traced.kwargs["scale"]
    assert scale.device.type == "meta" and scale.dtype == torch.float64   # the first call's kwargs, not the 2nd
    assert traced.calls == 2 and traced.distinct_inputs == 2


def test_kwargs_are_recorded_after_the_call_if_torch_hides_them(monkeypatch):
    monkeypatch.setattr(scripts, "_CALL_IMPL_INNER", None)   # as if torch moved the frame that holds them
    with ModelRecorder() as rec:
        Outer()(torch.randn(2, 8), scale=torch.ones(()))
    assert rec.models[0].kwargs["scale"].device.type == "meta"


def test_non_tensor_inputs_are_kept_as_values():
    class Takes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, xs, mode="a", n=1):
            return self.lin(xs["x"]) * n

    with ModelRecorder() as rec:
        Takes()({"x": torch.randn(3, 2)}, "b", n=4)
    traced = rec.models[0]
    assert traced.args[0]["x"].is_meta and traced.args[1] == "b" and traced.kwargs == {"n": 4}


def test_recorder_keeps_a_meta_shadow_not_the_model():
    model = Outer()
    with ModelRecorder() as rec:
        model(torch.randn(2, 8))
    traced = rec.models[0]
    assert traced.shadow is not model and all(p.is_meta for p in traced.shadow.parameters())
    assert not any(p.is_meta for p in model.parameters())        # the user's model untouched
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None                                          # no reference kept to the script's model
    report = analyse_model(traced, TraceConfig(dtype="bf16"))     # analysed from the shadow
    assert report.model == "Outer" and report.dtype == "bfloat16" and report.inputs == ("bf16[2, 8]",)


def test_keep_real_keeps_the_module_and_a_copy_of_its_real_inputs():
    model, x = Outer(), torch.randn(2, 8)
    with ModelRecorder(keep_real=True) as rec:
        model(x)
    x.add_(1)
    module, args, kwargs = rec.models[0].real
    assert module is model and not args[0].is_meta and args[0] is not x
    torch.testing.assert_close(args[0] + 1, x)


def test_lazy_modules_are_copied_after_their_first_call_materialises_them():
    model = nn.Sequential(nn.LazyLinear(5), nn.ReLU())
    with ModelRecorder() as rec:
        model(torch.randn(3, 7))
    assert rec.models[0].shadow[0].weight.shape == (5, 7)
    assert analyse_model(rec.models[0], TraceConfig()).total.flops > 0


def test_modules_without_parameters_are_marked():
    with ModelRecorder() as rec:
        nn.MSELoss()(torch.randn(3), torch.randn(3))
        nn.BatchNorm1d(3).eval()(torch.randn(2, 3))   # buffers only count as state too
    assert [(m.name, m.has_state) for m in rec.models] == [("MSELoss", False), ("BatchNorm1d", True)]


def test_two_objects_of_one_class_are_two_models_with_distinct_names():
    a, b = Inner(), Inner()
    with ModelRecorder() as rec:
        a(torch.randn(1, 8))
        b(torch.randn(1, 8))
        a(torch.randn(1, 8))
    assert [(m.name, m.type_name, m.calls) for m in rec.models] == [("Inner", "Inner", 2), ("Inner-2", "Inner", 1)]


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recompute_in_backward_is_not_a_model(reentrant):
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Inner()

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=reentrant)

    model = Checkpointed()
    with ModelRecorder() as rec:
        for _ in range(2):
            model(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert [(m.name, m.calls) for m in rec.models] == [("Checkpointed", 2)]


def test_hooks_are_removed_and_depth_recovers_when_forward_raises():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            self.inner(x)
            raise RuntimeError("boom")

    before = _global_hooks()
    model, fails = Inner(), Fails()
    with pytest.raises(RuntimeError, match="boom"):
        with ModelRecorder() as rec:
            with pytest.raises(RuntimeError):
                fails(torch.randn(1, 8))
            model(torch.randn(1, 8))    # still top level: the failed call's depth was unwound
            raise RuntimeError("boom")
    assert _global_hooks() == before
    assert [(m.name, m.calls, m.first_call_raised) for m in rec.models] == [("Fails", 1, True), ("Inner", 1, False)]
    assert rec.models[0].shadow is not None   # a model whose call failed can still be analysed


def test_recorder_never_raises_into_the_script(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("internal")

    monkeypatch.setattr(scripts, "_to_meta", broken)
    with ModelRecorder() as rec:
        y = Inner()(torch.randn(1, 8))
    assert y.shape == (1, 8) and rec.errors and "internal" in rec.errors[0]


# ---------------------------------------------------------------------------------------------- run_script

def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_run_script_as_python_would_and_restores_sys(tmp_path):
    _write(tmp_path / "tracing_sibling_mod.py", "import torch.nn as nn\nMODEL = nn.Linear(3, 2)\n")
    script = _write(tmp_path / "main.py", """
        import sys, torch
        from tracing_sibling_mod import MODEL
        assert __name__ == "__main__"
        SEEN = (list(sys.argv), sys.path[0])
        for _ in range(3):
            MODEL(torch.randn(4, 3))
        sys.argv.append("changed"); sys.path.insert(0, "junk")
        sys.exit(3)
    """)
    argv, path = sys.argv, list(sys.path)
    try:
        run = run_script(str(script), ["--a", "1"])
    finally:
        sys.modules.pop("tracing_sibling_mod", None)
    assert sys.argv is argv and sys.path == path
    assert run.exit_code == 3 and run.exception is None
    assert [(m.name, m.calls) for m in run.models] == [("Linear", 3)]
    assert run.name == "main" and run.argv == [str(script), "--a", "1"]


def test_run_script_exception_keeps_models_and_the_users_traceback(tmp_path):
    script = _write(tmp_path / "fails.py", """
        import torch, torch.nn as nn
        nn.Linear(2, 2)(torch.randn(1, 2))
        def helper():
            raise KeyError("missing")
        helper()
    """)
    run = run_script(str(script))
    assert run.exit_code == 1 and isinstance(run.exception, KeyError)
    assert len(run.models) == 1
    frames = [tb.tb_frame.f_code.co_filename for tb in _walk(run.exception.__traceback__)]
    assert frames == [str(script), str(script)]     # <module>, helper: no runpy, no shapeprof frames


def _walk(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


@pytest.mark.parametrize("code, expected", [(None, (0, None)), (0, (0, None)), (5, (5, None)),
                                            (True, (1, None)), ("bad input", (1, "bad input"))])
def test_exit_status_is_pythons(code, expected):
    assert scripts._exit_status(code) == expected


def test_run_module_like_python_m(tmp_path, monkeypatch):
    pkg = tmp_path / "tracing_pkg_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write(pkg / "serve.py", """
        import sys, torch, torch.nn as nn
        RESULT = sys.argv[1:]
        nn.Linear(2, 2)(torch.randn(1, 2))
        if __name__ != "__main__":
            raise SystemExit(9)
    """)
    monkeypatch.chdir(tmp_path)
    try:
        check_target("tracing_pkg_demo.serve", True)
        run = run_script("tracing_pkg_demo.serve", ["x"], is_module=True)
        assert run.exit_code == 0 and [m.name for m in run.models] == ["Linear"]
        assert run.name == "tracing_pkg_demo.serve"
        with pytest.raises(ScriptNotFound, match="no __main__"):
            check_target("tracing_pkg_demo", True)
        with pytest.raises(ScriptNotFound, match="no module named"):
            check_target("tracing_pkg_nope", True)
    finally:
        for name in [n for n in sys.modules if n.startswith("tracing_pkg_demo")]:
            del sys.modules[name]


def test_check_target_for_files(tmp_path):
    with pytest.raises(ScriptNotFound, match="no such file"):
        check_target(str(tmp_path / "nope.py"), False)
    with pytest.raises(ScriptNotFound, match="__main__.py"):
        check_target(str(tmp_path), False)


def test_stdout_to_stderr_moves_the_scripts_output(tmp_path, capfd):
    script = _write(tmp_path / "talks.py", """
        import os, sys
        print("from python")
        sys.stdout.flush()
        os.write(1, b"from the fd\\n")
    """)
    run_script(str(script), stdout_to_stderr=True)
    print("after")
    out, err = capfd.readouterr()
    assert "from python" in err and "from the fd" in err
    assert "from" not in out and "after" in out


# ---------------------------------------------------------------------------------------------- config helpers

def test_script_name(tmp_path):
    assert script_name("examples/train_mlp.py") == "train_mlp"
    assert script_name("pkg.serve", True) == "pkg.serve"
    assert script_name(str(tmp_path)) == tmp_path.name


def test_everything_after_the_script_is_the_scripts():
    from shapeprof.cli import build_parser
    parse = build_parser().parse_args
    ns = parse(["trace", "--top", "3", "train.py", "--top", "9", "--json"])
    assert (ns.top, ns.json, ns.target, ns.script_args) == (3, False, "train.py", ["--top", "9", "--json"])
    ns = parse(["trace", "train.py", "--", "--epochs", "1"])
    assert ns.script_args == ["--epochs", "1"]
    ns = parse(["trace", "-m", "pkg.serve", "--port", "80"])
    assert (ns.is_module, ns.target, ns.script_args) == (True, "pkg.serve", ["--port", "80"])


# ---------------------------------------------------------------------------------------------- optimizer, loss

def _optimizer_hooks():
    import torch.optim.optimizer as optimizer_module
    return len(optimizer_module._global_optimizer_post_hooks)


def test_the_optimizer_step_is_recorded_once_without_keeping_the_model_or_the_optimizer():
    before = _optimizer_hooks()
    model, other = Outer(), Inner()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(RuntimeError, match="boom"):
        with ModelRecorder() as rec:
            assert _optimizer_hooks() == before + 1
            for step in range(3):
                other(torch.randn(2, 8))                  # called, never stepped: no optimizer
                model(torch.randn(2, 8)).sum().backward()
                opt.step()
                if step == 0:
                    opt.param_groups[0]["momentum"] = 0.5   # changed after the first step: not seen
            raise RuntimeError("boom")
    assert _optimizer_hooks() == before                  # removed in finally, the script's exception passes
    inner, outer = rec.models
    seen = outer.optimizer
    assert (seen.name, seen.kwargs["momentum"], seen.kwargs["nesterov"]) == ("SGD", 0.9, True)
    assert seen.describe() == "SGD(momentum=0.9, nesterov=True)"
    assert seen.state_dtypes == {"momentum_buffer": torch.float32} and seen.others == []
    assert outer.ran_backward and inner.optimizer is None and not inner.ran_backward
    refs = weakref.ref(model), weakref.ref(opt), weakref.ref(model.head.weight)
    del model, opt
    gc.collect()
    assert [r() for r in refs] == [None, None, None]    # the recorder holds neither weights nor the optimizer


def test_a_step_counts_as_backward_even_when_grads_are_cleared_before_the_next_call():
    model = Inner()
    opt = torch.optim.Adam(model.parameters(), foreach=False)
    with ModelRecorder() as rec:
        for _ in range(2):
            opt.zero_grad(set_to_none=True)               # before the call: .grad is None at each call
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
        opt.zero_grad(set_to_none=True)                   # and at the end
    (traced,) = rec.models
    assert traced.ran_backward and traced.optimizer.kwargs["foreach"] is False
    assert set(traced.optimizer.state_dtypes) == {"step", "exp_avg", "exp_avg_sq"}


def test_an_optimizer_subclass_keeps_its_bases_settings_and_a_tensor_lr_becomes_a_number():
    class Tuned(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)

    model = Inner()
    opt = Tuned(model.parameters(), lr=torch.tensor(0.01), amsgrad=True)
    opt.param_groups[0]["initial_lr"] = 0.01              # what an LR scheduler adds: no constructor argument
    with ModelRecorder() as rec:
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
    seen = rec.models[0].optimizer
    assert seen.cls is Tuned and seen.kwargs["amsgrad"] is True and seen.kwargs["lr"] == pytest.approx(0.01)
    assert "initial_lr" not in seen.kwargs and "decoupled_weight_decay" not in seen.kwargs


def test_an_optimizer_over_part_of_a_model_and_a_second_one_are_told():
    model = Outer()
    head = torch.optim.SGD(model.head.parameters(), lr=0.1)
    body = torch.optim.Adam(model.inner.parameters())
    with ModelRecorder() as rec:
        model(torch.randn(2, 8)).sum().backward()
        head.step()
        body.step()
    seen = rec.models[0].optimizer
    assert (seen.name, seen.parameters, seen.trainable, seen.others) == ("SGD", 2, 4, ["Adam"])


def test_a_loss_module_called_on_the_output_is_the_models_loss():
    model, criterion = Outer(), nn.CrossEntropyLoss(label_smoothing=0.1)
    with ModelRecorder() as rec:
        for _ in range(2):
            criterion(model(torch.randn(4, 8)), torch.randint(0, 2, (4,))).backward()
    outer, loss_module = rec.models
    loss = outer.loss
    assert loss.module is loss_module and (loss.output, loss.shape, loss.by_identity) == (0, (4, 2), True)
    assert loss.targets[0].is_meta and loss.targets[0].dtype == torch.long
    assert loss_module.loss is None and outer._outputs == []   # no weak references kept after the run


def test_a_loss_by_shape_and_dtype_and_what_is_not_a_loss():
    model = SelfCaller()
    with ModelRecorder() as rec:
        out = model(torch.randn(3, 4))
        nn.MSELoss()(out.clone(), torch.randn(3, 4)).backward()   # a copy: same shape and dtype, not the tensor
    assert rec.models[0].loss.by_identity is False and rec.models[0].loss.module.type_name == "MSELoss"

    model = Outer()
    with ModelRecorder() as rec:
        with torch.no_grad():
            nn.Softmax(dim=-1)(model(torch.randn(4, 8)))        # nothing to differentiate: not a loss
        nn.L1Loss()(torch.randn(5), torch.randn(5))               # not the model's output
    assert rec.models[0].loss is None
