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
from shapeprof.output.terminal import render, to_text


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
    (lambda d: d.pop("nodes"), "malformed shapeprof report: missing key 'nodes'"),
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


# ---------------------------------------------------------------------------------------------- repeats

def test_an_index_is_starred_only_where_the_layers_really_repeat():
    # examples/cnn.py: twelve different modules in one nn.Sequential (three conv-bn-relu stages of growing width,
    # two max pools, an average pool), then a Linear: nothing repeats, so every node keeps its own path
    from examples.cnn import SmallCNN
    report = shapeprof.analyze(SmallCNN().eval(), torch.randn(8, 3, 32, 32))
    paths = [f"features.{i}" for i in range(12)] + ["classifier"]
    assert sorted(report.patterns.values()) == sorted(paths)
    groups = report.repeat_groups()
    assert [len(g) for g in groups] == [1] * 13
    assert sorted(report.pattern_of(g[0]) for g in groups) == sorted(paths)
    modules = report.by_module(2, repeats=True)
    assert sorted((m.key, m.nodes) for m in modules) == sorted((p, 1) for p in paths)
    text = _text(report, top=13)
    assert ".*" not in text and "features.8" in text and "layers summed" not in text
    # read back from JSON it groups and renders the same
    assert _text(shapeprof.Report.from_json(report.to_json()), top=13) == text


def test_repeats_among_other_layers_and_two_sets_of_repeats():
    # 0: Linear(8, 16); 2 and 4: Linear(16, 16), repeats; 1, 3, 5: ReLU on 16 features, repeats; 6: Linear(16, 4)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    report = shapeprof.analyze(model, torch.randn(4, 8))
    assert report.patterns == {"0": "0", "1": "{1,3,5}", "2": "{2,4}", "3": "{1,3,5}", "4": "{2,4}",
                               "5": "{1,3,5}", "6": "6"}
    by_pattern = {report.pattern_of(g[0]): [n.module_path for n in g] for g in report.repeat_groups()}
    assert by_pattern == {"0": ["0"], "{1,3,5}": ["1", "3", "5"], "{2,4}": ["2", "4"], "6": ["6"]}
    assert sorted((m.key, m.nodes) for m in report.by_module(1, repeats=True)) == [
        ("0", 1), ("6", 1), ("{1,3,5}", 3), ("{2,4}", 2)]


def test_identical_blocks_are_starred_and_their_insides_told_apart():
    # MLP(d_in=32, d_hidden=32): blocks.0 and blocks.1 are both Linear(32, 32) + ReLU: repeats; inside a block
    # the Linear and the ReLU differ, so only the block index is starred; the output Linear(32, 8) stays 'out'
    from examples.mlp import MLP
    report = shapeprof.analyze(MLP(d_in=32, d_hidden=32, d_out=8), torch.randn(4, 32))
    assert report.patterns == {"blocks.0.0": "blocks.*.0", "blocks.0.1": "blocks.*.1", "blocks.1.0": "blocks.*.0",
                               "blocks.1.1": "blocks.*.1", "out": "out"}
    assert sorted((report.pattern_of(g[0]), len(g)) for g in report.repeat_groups()) == [
        ("blocks.*.0", 2), ("blocks.*.1", 2), ("out", 1)]
    assert report.module_depth() == 3


# ---------------------------------------------------------------------------------------------- damaged files

_BAD_VALUES = (None, "x", "", -1, 0, 2 ** 70, 1.5, float("nan"), float("inf"), True, [], ["x"], [[1, 2]], {},
               {"a": 1})



def _mutated(data, path, value):
    """A deep copy of `data` with the value at `path` replaced (or, for value `...`, the key removed)."""
    data = json.loads(json.dumps(data))
    if not path:
        return value
    *parent, last = path
    target = data
    for p in parent:
        target = target[p]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return data


def test_no_damaged_report_gets_past_from_dict_as_anything_but_a_format_error(json_paths):
    # every value of a small, complete report (a finding, a covered node, an uncovered op, a capture attempt)
    # replaced by each of a set of wrong values, and each key removed: from_dict either refuses it with a one-line
    # ReportFormatError, or the report it gives renders (no TypeError or ZeroDivisionError from the renderer)
    r = shapeprof.analyze(MLP(16, 32, 16), torch.randn(1, 16))
    good = json.loads(r.to_json())
    good["coverage"]["ops"] = [{"op": "aten.foo", "count": 1, "bytes": 8, "share_of_bytes": 0.1,
                                "first_node": "x"}]
    good["capture"]["attempts"] = [["export", "it failed"]]
    shapeprof.Report.from_dict(good)
    refused = rendered = 0
    for path in list(json_paths(good)):
        for value in (*_BAD_VALUES, ...) if path else _BAD_VALUES:
            data = _mutated(good, path, value)
            try:
                report = shapeprof.Report.from_dict(data)
            except shapeprof.ReportFormatError as e:
                assert "\n" not in str(e), (path, value)
                refused += 1
                continue
            to_text(report, width=100, color=False)
            rendered += 1
    assert refused and rendered   # both happen: the check is neither vacuous nor a blanket refusal


@pytest.mark.parametrize("data, message", [
    ([1, 2], "not a shapeprof report: the JSON is a list, not an object"),
    ("report", "not a shapeprof report: the JSON is a string, not an object"),
    (None, "not a shapeprof report: the JSON is null, not an object"),
])
def test_a_json_document_that_is_not_an_object_is_refused(data, message):
    with pytest.raises(shapeprof.ReportFormatError, match=message):
        shapeprof.Report.from_dict(data)


def test_format_errors_name_the_field(report):
    data = json.loads(report.to_json())
    data["nodes"][3]["flops"] = "12"
    with pytest.raises(shapeprof.ReportFormatError, match=r"nodes\[3\]\.flops: expected an integer, got a string"):
        shapeprof.Report.from_dict(data)
    data = json.loads(report.to_json())
    data["spec"]["memory_bandwidth"] = None
    with pytest.raises(shapeprof.ReportFormatError, match="spec: memory_bandwidth must be a number"):
        shapeprof.Report.from_dict(data)
    data = json.loads(report.to_json())
    data["total"]["predicted_seconds"] = None
    with pytest.raises(shapeprof.ReportFormatError, match="total.predicted_seconds: expected a number, got null"):
        shapeprof.Report.from_dict(data)


def test_a_file_nested_too_deep_or_not_utf8_is_a_format_error(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(shapeprof.ReportFormatError, match="nested too deeply"):
        shapeprof.Report.from_json(deep)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{")
    with pytest.raises(shapeprof.ReportFormatError, match="not UTF-8"):
        shapeprof.Report.from_json(binary)
