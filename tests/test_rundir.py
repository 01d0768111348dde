"""shapeprof/rundir.py: each trace's own folder in the logdir, reserved before the script runs."""
import threading
from datetime import datetime

import pytest

from shapeprof.rundir import RunDir, RunDirError

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
