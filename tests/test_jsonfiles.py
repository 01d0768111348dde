"""shapeprof/output/jsonfiles.py: a model's reports as JSON files, found and read back by their schema."""
import json

import pytest
import torch

import shapeprof
from shapeprof.jsondata import ReportFormatError
from shapeprof.output.jsonfiles import optimize_document, read_saved, saved_files


@pytest.fixture(scope="module")
def optimized():
    from examples.mlp import MLP
    from shapeprof.optimize import optimize
    model = MLP(d_in=32, d_hidden=64, d_out=8).eval()
    return optimize(model, torch.randn(4, 32), spec=shapeprof.get_spec("l4")).shapeprof_report


def test_an_optimize_report_reads_back_as_it_rendered(optimized, tmp_path):
    from shapeprof.optimize import OptimizeReport
    path = tmp_path / "optimize.json"
    path.write_text(json.dumps(optimize_document(optimized)))
    back = read_saved(path)
    assert isinstance(back, OptimizeReport)
    assert str(back) == str(optimized)                 # the renderer's own text: the oracle
    assert optimize_document(back) == optimize_document(optimized)
    assert back.spec == optimized.spec and back.verified and len(back.applied) == len(optimized.applied) > 0


def test_no_damaged_optimize_report_gets_past_as_anything_but_a_format_error(optimized, json_paths):
    from shapeprof.optimize import OptimizeReport
    good = json.loads(json.dumps(optimize_document(optimized)))
    refused = rendered = 0
    for path in list(json_paths(good))[1:]:
        for value in (None, "x", -1, 2 ** 70, 1.5, True, [], ["x"], {}, ...):
            data = json.loads(json.dumps(good))
            *parent, last = path
            target = data
            for p in parent:
                target = target[p]
            if value is ...:
                del target[last]
            else:
                target[last] = value
            try:
                report = OptimizeReport.from_dict(data)
            except ReportFormatError as e:
                assert "\n" not in str(e), (path, value)
                refused += 1
                continue
            str(report)
            rendered += 1
    assert refused and rendered


def test_read_saved_names_what_a_file_is_not(tmp_path, optimized):
    cases = {"list.json": [1], "trace.json": {"schema": "shapeprof.trace", "version": 2},
             "optimize.json": {"model": "old, no schema"}, "other.json": {"schema": "something"},
             "new.json": {**optimize_document(optimized), "version": 99}}
    expected = {"list.json": "the JSON is a list", "trace.json": "a trace summary, not a report",
                "optimize.json": "from an older shapeprof", "other.json": "schema 'something'",
                "new.json": "optimize report version 99 is not supported"}
    for name, data in cases.items():
        (tmp_path / name).write_text(json.dumps(data))
        with pytest.raises(ReportFormatError, match=expected[name]):
            read_saved(tmp_path / name)


def test_saved_files_lists_each_models_reports_together(tmp_path):
    for model in ("B", "A"):
        for name in ("optimize.json", "report.json", "measured.json", "trace.json"):
            (tmp_path / "run" / model).mkdir(parents=True, exist_ok=True)
            (tmp_path / "run" / model / name).write_text("{}")
    listed = [p.relative_to(tmp_path).as_posix() for p in saved_files(tmp_path)]
    assert listed == [f"run/{m}/{n}" for m in "AB" for n in ("report.json", "measured.json", "optimize.json")]
