"""The trace session (shapeprof.session): recorded models analysed and written out; the CLI's defaults."""
import pytest
import torch
import torch.nn as nn

import shapeprof
from shapeprof.scripts import ModelRecorder
from shapeprof.session import TraceConfig, analyse_all, analyse_model


def test_analyse_model_refuses_inputs_named_like_analyze_options():
    class TakesDtype(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, dtype=None):
            return self.lin(x)

    with ModelRecorder() as rec:
        TakesDtype()(torch.randn(1, 2), dtype=torch.float32)
    with pytest.raises(ValueError, match="'dtype'"):
        analyse_model(rec.models[0], TraceConfig())


def test_the_config_dataclasses_are_where_the_cli_defaults_come_from():
    from shapeprof.cli import CalibrateConfig, ViewConfig, build_parser
    parser = build_parser()
    ns = parser.parse_args(["trace", "x.py"])
    config = TraceConfig()
    for option, name in (("spec", "spec"), ("dtype", "dtype"), ("top", "top"), ("logdir", "logdir"),
                         ("output", "outputs"), ("json", "json"), ("profile", "profile"),
                         ("steps", "profile_steps"), ("optimize", "optimize"), ("all_modules", "all_modules"),
                         ("method", "method"), ("strict", "strict")):
        assert getattr(ns, option) == getattr(config, name), name
    assert ns.target == "x.py" and ns.script_args == [] and not ns.is_module
    assert parser.parse_args(["report", "r.json"]).top == config.top
    assert parser.parse_args(["view", "runs"]).port == ViewConfig().port
    cal = parser.parse_args(["calibrate"])
    assert (cal.output, cal.device, cal.budget) == (CalibrateConfig().output, CalibrateConfig().device,
                                                   CalibrateConfig().budget_seconds)




def test_each_output_format_named_writes_its_files_and_no_other(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with ModelRecorder() as rec:
        model(torch.randn(2, 8))
    spec = shapeprof.get_spec()
    config = TraceConfig(outputs=("json", "markdown", "terminal"))
    [result] = list(analyse_all(rec.models, config, spec, tmp_path))
    assert result.error is None and result.warnings == []
    assert sorted(result.outputs) == ["json", "markdown", "terminal"]
    folder = tmp_path / "Sequential"
    assert sorted(p.name for p in folder.iterdir()) == ["report.json", "report.md", "report.txt"]
    assert shapeprof.Report.from_json(folder / "report.json") == result.results.report
    assert "| " in (folder / "report.md").read_text() and "Sequential" in (folder / "report.txt").read_text()


def test_a_format_that_cannot_write_costs_only_its_own_files(tmp_path):
    from shapeprof import output

    class Broken(output.Format):
        name, description = "broken-test-format", "always fails"

        def write(self, results, run_dir):
            raise OSError("disk full")

    output.register(Broken)
    try:
        with ModelRecorder() as rec:
            nn.Linear(4, 4)(torch.randn(1, 4))
        config = TraceConfig(outputs=("broken-test-format", "json"))
        [result] = list(analyse_all(rec.models, config, shapeprof.get_spec(), tmp_path))
        assert result.warnings == ["the broken-test-format output could not be written: OSError: disk full"]
        assert (tmp_path / "Linear" / "report.json").exists()
    finally:
        output.base._FORMATS.remove("broken-test-format")


def test_registering_a_name_twice_is_an_error():
    from shapeprof import output
    with pytest.raises(ValueError, match="an output format named 'json' is already registered"):
        output.register(type(output.get("json")))
    with pytest.raises(KeyError, match="registered: html, json, markdown, tensorboard, terminal"):
        output.get("pdf")


# ---------------------------------------------------------------------------------------------- training steps

def _trained_linear(optimizer=torch.optim.SGD, **kwargs):
    model = nn.Linear(8, 4)
    opt = optimizer(model.parameters(), lr=0.1, **kwargs)
    with ModelRecorder() as rec:
        for _ in range(2):
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
    return model, rec.models[0]


def test_a_model_that_trained_gets_its_step_and_the_forward_only_note_only_without_one():
    from shapeprof.optimizer_step import optimizer_step
    from shapeprof.session import FORWARD_ONLY, with_trace_notes
    model, traced = _trained_linear(momentum=0.9)
    report = analyse_model(traced, TraceConfig(spec="h100-sxm"))
    assert report.training.optimizer == "SGD (foreach)" and report.spec.name == "h100-sxm"
    # 8*4 + 4 = 36 parameters: as optimizer_step's own doctest prices SGD(momentum=0.9) on a Linear(8, 4)
    oracle = optimizer_step("sgd", model, momentum=0.9, spec="h100-sxm")
    assert report.training.phases["optimizer"].bytes == oracle.bytes == 720 + 432
    # no model .loss, no loss module: the output's sum, as capture_backward says
    assert report.training.loss == "output.sum()" and FORWARD_ONLY not in report.notes
    forward = shapeprof.analyze(traced.target(), *traced.args)
    assert with_trace_notes(forward, traced).notes == (FORWARD_ONLY,)
    assert with_trace_notes(report, traced) is report       # nothing missing: the same report


def test_profile_keeps_the_predicted_training_step(tmp_path, monkeypatch):
    import types
    from shapeprof import session
    _, traced = _trained_linear(torch.optim.AdamW, foreach=False)
    forward = shapeprof.analyze(traced.target(), *traced.args)
    # the measured run is a forward pass: stand in for profile() (which calibrates and measures) with forward reports
    monkeypatch.setattr(session, "_profile", lambda *a: types.SimpleNamespace(
        predicted=forward, measured=forward, trace=None, note="measured"))
    [result] = list(analyse_all([traced], TraceConfig(profile=True, outputs=("json",)), shapeprof.get_spec(),
                                tmp_path))
    assert result.error is None and result.warnings == []
    assert result.results.report.training.optimizer == "AdamW (for-loop)"
    assert session.FORWARD_ONLY not in result.results.report.notes
    assert any(n.startswith("the optimizer is the script's AdamW(foreach=False)") for n in result.results.report.notes)
    assert result.results.measured.training is None and session.FORWARD_ONLY in result.results.measured.notes
    saved = shapeprof.Report.from_json(tmp_path / "Linear" / "report.json")
    assert saved.training == result.results.report.training
