"""shapeprof/rundir.py: each trace's own folder in the logdir, reserved before the script runs; its saved reports
read back."""
import json
import threading
from datetime import datetime

import pytest
import torch

import shapeprof
from shapeprof.report import ReportFormatError
from shapeprof.rundir import RunDir, RunDirError, optimize_document, read_saved, saved_files

NOW = datetime(2025, 1, 2, 3, 4, 5)


def test_each_run_gets_a_new_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = RunDir.create("runs/shapeprof", "train", now=NOW)
    assert first.path == tmp_path / "runs" / "shapeprof" / "train-20250102-030405" and first.path.is_dir()
    assert first.logdir == tmp_path / "runs" / "shapeprof"
    assert first.created == (tmp_path / "runs" / "shapeprof", tmp_path / "runs")
    second = RunDir.create("runs/shapeprof", "train", now=NOW)
    assert second.path.name == "train-20250102-030405-2" and second.created == ()
    assert list(first.path.iterdir()) == []            # the write probe is gone


def test_runs_started_together_never_share_a_folder(tmp_path):
    paths, barrier = [], threading.Barrier(8)

    def create():
        barrier.wait()
        paths.append(RunDir.create(tmp_path, "train", now=NOW).path)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 8
    assert sorted(p.name for p in paths) == sorted(["train-20250102-030405"] +
                                                   [f"train-20250102-030405-{k}" for k in range(2, 9)])


def test_a_file_in_the_way_is_one_line_naming_it(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(RunDirError, match=r"cannot create logdir '.*afile/sub': '.*afile' is a file, not a "
                                          r"directory"):
        RunDir.create(tmp_path / "afile" / "sub", "train")
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        RunDir.create(tmp_path / "afile", "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_discard_removes_what_it_made_while_empty(tmp_path):
    run = RunDir.create(tmp_path / "a" / "b", "train", now=NOW)
    run.discard()
    assert list(tmp_path.iterdir()) == []
    kept = RunDir.create(tmp_path / "a", "train", now=NOW)
    other = RunDir.create(tmp_path / "a", "other", now=NOW)
    kept.discard()                                     # 'a' holds another trace's folder: it stays
    assert [p.name for p in (tmp_path / "a").iterdir()] == [other.path.name]


def test_write_json_is_atomic(tmp_path):
    run = RunDir.create(tmp_path, "train", now=NOW)
    path = run.write_json("trace.json", {"models": []})
    assert path.read_text() == '{\n "models": []\n}\n'
    assert [p.name for p in run.path.iterdir()] == ["trace.json"]   # no temp file left


# ---------------------------------------------------------------------------------------------- saved reports

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


def test_no_damaged_optimize_report_gets_past_as_anything_but_a_format_error(optimized):
    from shapeprof.optimize import OptimizeReport
    good = json.loads(json.dumps(optimize_document(optimized)))

    def paths(data, path=()):
        yield path
        if isinstance(data, dict):
            for k, v in data.items():
                yield from paths(v, (*path, k))
        elif isinstance(data, list) and data:
            yield from paths(data[0], (*path, 0))

    refused = rendered = 0
    for path in list(paths(good))[1:]:
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
