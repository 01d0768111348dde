"""Report: JSON round trip, rendering, errors."""
import io
import json

import pytest
import torch
from rich.console import Console

import shapeprof
from examples.llama import LlamaConfig, Transformer
from examples.mlp import MLP
from shapeprof.report import SCHEMA_VERSION
from shapeprof.terminal import render, to_text


@pytest.fixture(scope="module")
def report():
    return shapeprof.analyze(Transformer(LlamaConfig.tiny(n_layers=3)), torch.zeros(2, 16, dtype=torch.long),
                             dtype=torch.bfloat16)


def test_json_round_trip_is_exact(report, tmp_path):
    path = tmp_path / "deep" / "report.json"
    report.to_json(path)
    back = shapeprof.Report.from_json(path)
    assert back == report
    assert back.nodes[3].aten == report.nodes[3].aten and isinstance(back.nodes[3].aten, tuple)
    assert back.spec == report.spec and back.capture == report.capture
    assert back.graph_module is None                      # graphs are not saved
    assert shapeprof.Report.from_json(report.to_json()) == report   # from the text itself too
    data = json.loads(path.read_text())
    assert data["schema"] == "shapeprof.report" and data["version"] == SCHEMA_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]   # no temp files left


def test_measurements_survive_the_round_trip(report):
    measured = report.with_measurements({n.name: 1e-3 for n in report.nodes[:2]}, total_seconds=5e-3)
    assert measured.nodes[0].measured_seconds == 1e-3 and measured.nodes[2].measured_seconds is None
    assert measured.nodes[0].efficiency == pytest.approx(measured.nodes[0].predicted_seconds / 1e-3)
    assert measured.total.measured_seconds == 5e-3
    assert shapeprof.Report.from_json(measured.to_json()) == measured


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema="other"), "not a shapeprof report"),
    (lambda d: d.update(version=99), "report version 99 is not supported"),
    (lambda d: d.pop("nodes"), "malformed shapeprof report: KeyError"),
])
def test_bad_report_files_are_one_line_errors(report, tmp_path, change, message):
    data = json.loads(report.to_json())
    change(data)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(shapeprof.ReportFormatError, match=message) as err:
        shapeprof.Report.from_json(path)
    assert "\n" not in str(err.value)


def test_missing_and_non_json_files(tmp_path):
    with pytest.raises(shapeprof.ReportFormatError, match="cannot read report"):
        shapeprof.Report.from_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(shapeprof.ReportFormatError, match="is not JSON"):
        shapeprof.Report.from_json(bad)


def _text(r, **options):
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(render(r, **options))
    return console.file.getvalue()


def test_terminal_rendering(report):
    text = _text(report, top=5)
    lines = text.splitlines()
    assert lines[0].startswith("shapeprof Transformer  on NVIDIA A100-SXM4-80GB as bfloat16  inputs i64[2, 16]")
    assert "captured by symbolic_trace" in lines[1] and "costed once for their identical twins" in text
    assert "Top 5 nodes by predicted time" in text
    assert "layers.*.feed_forward.w1" in text and "x3" in text      # twins on one row
    assert "memory" in text and "By module" in text
    assert "Coverage: every op has a cost formula." in text
    assert all(len(line) <= 100 for line in lines)


def test_print_gives_the_rendering_without_colour_when_not_a_terminal(capsys):
    report = shapeprof.analyze(MLP(16, 32, 16), torch.randn(1, 16))
    print(report)
    out = capsys.readouterr().out
    assert "shapeprof MLP" in out and "\x1b[" not in out
    assert "Memory-bound hot spots" in out   # batch 1: every Linear waits on memory


def test_colour_marks_the_bound():
    report = shapeprof.analyze(MLP(16, 32, 16), torch.randn(1, 16))
    text = to_text(report, width=120, color=True)
    assert "\x1b[1;31mmemory" in text   # bold red
