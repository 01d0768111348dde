"""The command line, run as a user runs it: `python -m shapeprof ...` and the `shapeprof` console script, in a
subprocess, on scripts written to tmp_path. Independent commands run side by side to keep the file quick."""
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import shapeprof
from shapeprof import cli

REPO = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).with_name("shapeprof")


def _cmd(args, console=False):
    return [str(CONSOLE_SCRIPT)] + args if console else [sys.executable, "-m", "shapeprof"] + args


def _env():
    env = dict(os.environ)
    env.pop("SHAPEPROF_DEBUG", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(args, cwd, console=False, timeout=120):
    return subprocess.run(_cmd(args, console), cwd=cwd, capture_output=True, text=True, env=_env(), timeout=timeout)


def run_many(jobs, timeout=180):
    """Run several (args, cwd) commands at once; their CompletedProcess-like results, in order."""
    procs = [subprocess.Popen(_cmd(args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for args, cwd in jobs]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def no_shapeprof_traceback(stderr):
    assert "Traceback" not in stderr, stderr


def run_dir(logdir):
    """The one run directory (<script>-<time>) that a trace made in `logdir`."""
    (path,) = [p for p in Path(logdir).iterdir() if p.is_dir()]
    return path


# ---------------------------------------------------------------------------------------------- one full trace

MODELS = """
    import torch
    import torch.nn as nn


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            return torch.relu(self.lin(x))


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()      # called only inside Net.forward: part of Net, not a model of its own
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.block(x))


    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(10, 6)

        def forward(self, x, scale=1.0):
            return self.proj(x) * scale


    class DataDependent(nn.Module):
        # its Python depends on tensor values: no capture method can follow it on shapes alone

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            for _ in range(int(x.abs().sum().item()) % 3 + 1):
                x = self.lin(x)
            return x
"""

MAIN = """
    import sys
    import torch
    import torch.nn as nn
    from sibling_models import DataDependent, Net, Other   # beside the script: its directory is on sys.path

    print("ARGV=" + repr(sys.argv))
    print("NAME=" + __name__)
    net, other = Net(), Other()
    for _ in range(5):
        net(torch.randn(8, 16))
    other(torch.randn(2, 3, 10), scale=torch.tensor(2.0))
    DataDependent()(torch.randn(2, 4))
    nn.MSELoss()(torch.randn(3), torch.randn(3))   # no parameters: listed, not analysed
    sys.exit(3)
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """`python -m shapeprof trace` on a script with two models, run once for the tests below."""
    root = tmp_path_factory.mktemp("trace")
    proj = root / "proj"
    write(proj / "sibling_models.py", MODELS)
    write(proj / "main.py", MAIN)
    spec_file = root / "my-l4.toml"
    shapeprof.get_spec("l4").save(spec_file)
    logdir = root / "logs"
    result = run(["trace", "--no-tensorboard", "--logdir", str(logdir), "--spec", str(spec_file), "--top", "4",
                  "main.py", "--", "--epochs", "1", "--lr", "3e-4"], cwd=proj)
    return result, run_dir(logdir), root


def test_trace_runs_the_script_as_python_would(traced):
    result, _, _ = traced
    assert result.returncode == 3, result.stderr       # sys.exit(3) passes through (after the reports)
    assert "ARGV=['main.py', '--epochs', '1', '--lr', '3e-4']" in result.stdout
    assert "NAME=__main__" in result.stdout
    no_shapeprof_traceback(result.stderr)


def test_trace_reports_each_top_level_model_once_with_its_call_count(traced):
    result, logdir, _ = traced
    out = result.stdout
    assert "model 1 of 3: Net" in out and "model 2 of 3: Other" in out and "model 3 of 3: DataDependent" in out
    assert "Net: called 5x at top level, analysed once" in out
    assert "Other: called 1x at top level" in out
    assert "MSELoss (1x)" in out                          # listed as not analysed
    assert "NVIDIA L4" in out                             # --spec FILE was used
    assert out.index("ARGV=") < out.index("model 1 of 3")  # the script's output first, then the reports
    # one model that cannot be analysed costs the others nothing, and does not change the script's exit status
    assert "shapeprof: could not analyse DataDependent: CaptureError" in result.stderr
    assert "shapeprof: 1 of 3 models could not be analysed" in result.stderr
    summary = json.loads((logdir / "trace.json").read_text())
    assert [(m["name"], m["calls"]) for m in summary["models"]] == [("Net", 5), ("Other", 1), ("DataDependent", 1)]
    assert summary["exit_code"] == 3 and summary["skipped"][0]["type"] == "MSELoss" and summary["failed"] == 1
    assert summary["models"][2]["error"].startswith("CaptureError") and summary["models"][2]["report_path"] is None
    net = shapeprof.Report.from_json(logdir / "Net" / "report.json")
    assert net.model == "Net" and net.spec.name == "l4" and net.inputs == ("f32[8, 16]",)
    # the Block called inside Net's forward is part of Net's report, not a model of its own
    assert {n.module_path for n in net.nodes} >= {"block.lin", "head"}
    other = shapeprof.Report.from_json(logdir / "Other" / "report.json")
    assert other.inputs == ("f32[2, 3, 10]", "f32[]")     # keyword inputs of the first call too


def test_no_tensorboard_writes_no_event_files(traced):
    _, logdir, _ = traced
    files = [p for p in logdir.rglob("*") if p.is_file()]
    assert sorted(p.relative_to(logdir).as_posix() for p in files) == [
        "Net/report.json", "Other/report.json", "trace.json"]


def test_report_prints_saved_reports_again(traced):
    _, logdir, _ = traced
    path = logdir / "Net" / "report.json"
    text, as_json, whole_dir = run_many([(["report", str(path), "--top", "2"], logdir),
                                         (["report", str(path), "--json"], logdir),
                                         (["report", str(logdir)], logdir)])
    assert text.returncode == 0 and "shapeprof Net" in text.stdout and "Top 2 nodes" in text.stdout
    assert as_json.returncode == 0
    assert shapeprof.Report.from_dict(json.loads(as_json.stdout)) == shapeprof.Report.from_json(path)
    assert whole_dir.returncode == 0 and "shapeprof Net" in whole_dir.stdout and "shapeprof Other" in whole_dir.stdout


def test_report_html_writes_every_report_under_a_folder_into_one_page(traced, tmp_path):
    _, logdir, _ = traced
    out = tmp_path / "all.html"
    done = run(["report", str(logdir), "--html", str(out)], logdir)
    assert done.returncode == 0 and "2 reports" in done.stdout, done.stderr
    page = out.read_text(encoding="utf-8")
    views = json.loads(re.search(r'id="shapeprof-views">(.*?)</script>', page).group(1))
    assert [v["name"] for v in views] == ["Net · predicted", "Other · predicted"]
    assert views[0]["view"]["report"]["nodes"][0]["flops"] == shapeprof.Report.from_json(
        logdir / "Net" / "report.json").nodes[0].flops
    for args, message in ((["--html", str(tmp_path)], "is a folder: give the file to write"),
                          (["--html", str(tmp_path / "f.html")], "no such file or directory")):
        target = str(logdir) if "folder" in message else str(tmp_path / "missing.json")
        failed = run(["report", target, *args], logdir)
        assert failed.returncode == 2 and message in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "f.html").exists()


def test_trace_output_html_writes_the_page_of_each_model(tmp_path):
    script = write(tmp_path / "one.py", """
        import torch
        torch.nn.Linear(8, 4)(torch.randn(2, 8))
    """)
    done = run(["trace", "--output", "html", "--logdir", str(tmp_path / "runs"), str(script)], tmp_path)
    assert done.returncode == 0, done.stderr
    [page] = (tmp_path / "runs").rglob("report.html")
    views = json.loads(re.search(r'id="shapeprof-views">(.*?)</script>', page.read_text(encoding="utf-8")).group(1))
    assert page.parent.name == "Linear" and [v["name"] for v in views] == ["Linear · predicted"]


# ---------------------------------------------------------------------------------------------- how scripts end

def test_a_script_that_raises_gets_its_reports_then_its_traceback(tmp_path):
    write(tmp_path / "fails.py", """
        import torch
        import torch.nn as nn
        nn.Linear(4, 4)(torch.randn(2, 4))
        def fail():
            raise RuntimeError("the user's error")
        fail()
    """)
    result = run(["trace", "fails.py"], cwd=tmp_path, console=True)   # the console script; default logdir
    assert result.returncode == 1
    assert "model 1 of 1: Linear" in result.stdout
    err = result.stderr
    tb = err[err.index("Traceback (most recent call last):"):]
    assert 'fails.py", line 7, in <module>' in tb and 'fails.py", line 6, in fail' in tb
    assert tb.rstrip().endswith("RuntimeError: the user's error")
    assert "shapeprof" not in tb and "runpy" not in tb
    (logdir,) = (tmp_path / "runs" / "shapeprof").iterdir()          # runs/shapeprof/<script>-<time>
    assert logdir.name.startswith("fails-") and (logdir / "Linear" / "report.json").is_file()
    assert list(logdir.rglob("events.out.tfevents.*"))
    assert "shapeprof view" in result.stdout


def test_json_output_and_module_mode(tmp_path):
    write(tmp_path / "mypkg" / "__init__.py", "")
    write(tmp_path / "mypkg" / "serve.py", """
        import sys
        import torch
        import torch.nn as nn
        print("hello from serve", sys.argv[1:])
        model = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        for n in (1, 2):
            model(torch.randn(n, 8))
    """)
    result = run(["trace", "--json", "--no-tensorboard", "--dtype", "bf16", "--logdir", "out",
                  "-m", "mypkg.serve", "--port", "80"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)                     # stdout is nothing but the JSON
    assert "hello from serve ['--port', '80']" in result.stderr   # the module's own stdout went to stderr
    assert doc["schema"] == "shapeprof.trace" and doc["is_module"] and doc["argv"][1:] == ["--port", "80"]
    (model,) = doc["models"]
    assert model["name"] == "Sequential" and model["calls"] == 2 and model["distinct_inputs"] == 2
    report = shapeprof.Report.from_dict(model["report"])
    assert report.dtype == "bfloat16" and report.inputs == ("bf16[1, 8]",)
    assert Path(doc["run_dir"]).parent == tmp_path / "out" and Path(doc["run_dir"]).name.startswith("mypkg.serve-")
    assert Path(model["report_path"]) == Path(doc["run_dir"]) / "Sequential" / "report.json"


def test_a_script_without_a_model(tmp_path):
    write(tmp_path / "plain.py", "print('just python')\n")
    result = run(["trace", "plain.py"], cwd=tmp_path)
    assert result.returncode == 0
    assert "just python" in result.stdout and "ran no nn.Module" in result.stdout
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_input_is_one_line_and_exit_2(tmp_path):
    marker = tmp_path / "ran"
    write(tmp_path / "ok.py", f"open({str(marker)!r}, 'w').close()\n")
    write(tmp_path / "broken.toml", "name = 'x'\npeak_flops = [1,\n")
    write(tmp_path / "notjson.json", "{ nope")
    jobs = {
        "missing script": ["trace", "missing.py"],
        "missing spec": ["trace", "--spec", "a100x", "ok.py"],
        "malformed spec": ["trace", "--spec", "broken.toml", "ok.py"],
        "malformed report": ["report", "notjson.json"],
        "missing logdir": ["view", "no-such-dir"],
        "specs": ["specs"],
    }
    results = dict(zip(jobs, run_many([(args, tmp_path) for args in jobs.values()])))
    for what in ("missing script", "missing spec", "malformed spec", "malformed report", "missing logdir"):
        r = results[what]
        assert r.returncode == 2, (what, r.stderr)
        assert r.stdout == "" and r.stderr.startswith("shapeprof: error: "), (what, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (what, r.stderr)
    assert "can't open file 'missing.py'" in results["missing script"].stderr
    assert "a100-80gb-sxm" in results["missing spec"].stderr and "closest" in results["missing spec"].stderr
    assert "broken.toml" in results["malformed spec"].stderr and "invalid TOML" in results["malformed spec"].stderr
    assert "notjson.json" in results["malformed report"].stderr
    assert "no-such-dir" in results["missing logdir"].stderr
    assert not marker.exists()                       # a bad option never runs the script
    specs = results["specs"]
    assert specs.returncode == 0
    assert "a100-80gb-sxm (default)" in specs.stdout and "153 FLOP/B" in specs.stdout and "h100-sxm" in specs.stdout


def test_report_on_a_damaged_file_is_one_line_naming_it(tmp_path):
    good = json.loads(shapeprof.analyze(torch.nn.Linear(4, 4), torch.randn(2, 4)).to_json())

    def damaged(change):
        data = json.loads(json.dumps(good))
        change(data)
        return data

    files = {
        "list.json": ([good], "the JSON is a list, not an object"),
        "string.json": ("report", "the JSON is a string, not an object"),
        "spec.json": (damaged(lambda d: d.update(spec="a100")), "spec: expected an object, got a string"),
        "peaks.json": (damaged(lambda d: d["spec"].update(peak_flops={"fp32": "fast"})),
                       "spec: peak_flops.fp32 must be a number"),
        "null.json": (damaged(lambda d: d["total"].update(flops=None)), "total.flops: expected an integer, got null"),
        "text.json": (damaged(lambda d: d["nodes"][0].update(bytes_read="144")),
                      "nodes[0].bytes_read: expected an integer, got a string"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    results = run_many([(["report", name], tmp_path) for name in files])
    for (name, (_, message)), r in zip(files.items(), results):
        assert r.returncode == 2 and r.stdout == "", (name, r.stderr)
        no_shapeprof_traceback(r.stderr)
        assert r.stderr.startswith(f"shapeprof: error: {name}: ") and len(r.stderr.splitlines()) == 1, r.stderr
        assert message in r.stderr, (name, r.stderr)


def test_more_bad_input_in_process(tmp_path, monkeypatch, capsys):
    """The same checks as above, for more cases, without a process each."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "ok.py", "raise SystemExit('must not run')\n")
    for args, expected in ((["report", "nothere.json"], "nothere.json: no such file or directory"),
                           (["trace", "-m", "no_such_module_here"], "no module named 'no_such_module_here'"),
                           (["calibrate", "-o", "spec.txt"], "use a .toml or .json suffix"),
                           (["trace", "--logdir", "ok.py", "ok.py"], "exists and is not a directory")):
        assert cli.main(args) == 2, args
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("shapeprof: error: ") and expected in captured.err
        assert len(captured.err.splitlines()) == 1 and "must not run" not in captured.err
    # what argparse checks gets argparse's usual message and status
    for args, expected in ((["trace", "--dtype", "bf17", "ok.py"], "argument --dtype: unknown dtype 'bf17'"),
                           (["frobnicate"], "invalid choice: 'frobnicate'"),
                           (["trace"], "required: SCRIPT"),
                           (["trace", "--top", "0", "ok.py"], "argument --top: must be at least 1")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(args)
        assert exit_.value.code == 2 and expected in capsys.readouterr().err


def test_an_unwritable_logdir_stops_before_the_script_runs(tmp_path):
    marker = tmp_path / "ran"
    write(tmp_path / "ok.py", f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "afile").write_text("")
    under_a_file, a_file = run_many([(["trace", "--logdir", "afile/sub", "ok.py"], tmp_path),
                                     (["trace", "--logdir", "afile", "ok.py"], tmp_path)])
    for r in (under_a_file, a_file):
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.startswith("shapeprof: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "'afile/sub'" in under_a_file.stderr and "is a file, not a directory" in under_a_file.stderr
    assert "'afile' exists and is not a directory" in a_file.stderr
    assert not marker.exists()                       # the script never ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ok.py"]


# Two scripts whose reports tell them apart: a.py's Linear has as many outputs as its argument says
TRACE_A = """
    import sys
    import torch
    import torch.nn as nn
    nn.Linear(8, int(sys.argv[1]))(torch.randn(2, 8))
"""
TRACE_B = """
    import torch
    import torch.nn as nn
    nn.Sequential(nn.Linear(4, 4), nn.ReLU())(torch.randn(3, 4))
"""


def _check_runs_kept_apart(logdir, results, jobs):
    """Each trace has a run directory of its own, which it printed; its trace.json names its script and argv, and
    every report it lists is inside it and is that script's model."""
    dirs = sorted(p for p in logdir.iterdir() if p.is_dir())
    assert len(dirs) == len(jobs), [p.name for p in dirs]
    seen = set()
    for result, (script, argv) in zip(results, jobs):
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if line.startswith("reports saved in "))
        where = logdir.parent / line.removeprefix("reports saved in ").split(";")[0]
        assert where.parent == logdir and where.name.startswith(script[:-3] + "-") and where not in seen
        seen.add(where)
        trace = json.loads((where / "trace.json").read_text())
        assert trace["target"] == script and trace["argv"] == [script, *argv] and trace["status"] == "complete"
        (model,) = trace["models"]
        assert Path(model["report_path"]).parent.parent == where
        report = shapeprof.Report.from_json(model["report_path"])
        if script == "a.py":
            assert report.model == "Linear" and report.nodes[0].output == f"f32[2, {argv[0]}]"
        else:
            assert report.model == "Sequential" and report.inputs == ("f32[3, 4]",)
    assert seen == set(dirs)


def test_traces_one_after_another_into_one_logdir_each_keep_their_own(tmp_path):
    write(tmp_path / "a.py", TRACE_A)
    write(tmp_path / "b.py", TRACE_B)
    jobs = [("a.py", ["3"]), ("b.py", []), ("a.py", ["5"])]
    results = [run(["trace", "--no-tensorboard", "--logdir", "logs", script, *argv], cwd=tmp_path)
               for script, argv in jobs]
    _check_runs_kept_apart(tmp_path / "logs", results, jobs)


def test_traces_started_together_into_one_logdir_never_mix(tmp_path):
    write(tmp_path / "a.py", TRACE_A)
    write(tmp_path / "b.py", TRACE_B)
    # the same script twice (most likely in the same second: the same run name, so one of them gets '-2')
    jobs = [("a.py", ["3"]), ("a.py", ["5"]), ("b.py", [])]
    results = run_many([(["trace", "--no-tensorboard", "--logdir", "logs", script, *argv], tmp_path)
                        for script, argv in jobs])
    _check_runs_kept_apart(tmp_path / "logs", results, jobs)


# Analysed after a plain Linear: its forward, when shapeprof's analysis runs it after the script has ended, says
# so in a file and waits to be interrupted, which makes "during the analysis" a moment the test can wait for
INTERRUPTED = """
    import sys
    import time
    import torch
    import torch.nn as nn


    class Slow(nn.Module):
        marker = None   # set when the script ends (the analysis runs with shapeprof's own sys.argv)

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if type(self).marker:
                open(type(self).marker, "w").close()
                while True:
                    time.sleep(0.05)
            return self.lin(x)


    nn.Linear(4, 4)(torch.randn(2, 4))
    Slow()(torch.randn(2, 4))
    Slow.marker = sys.argv[1]
"""


def test_ctrl_c_during_the_analysis_leaves_a_trace_json_of_what_was_finished(tmp_path):
    write(tmp_path / "slow.py", INTERRUPTED)
    marker = tmp_path / "analysing-slow"
    proc = subprocess.Popen(_cmd(["trace", "--no-tensorboard", "--logdir", "logs", "slow.py", str(marker)]),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the analysis of Slow never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 130, err
    no_shapeprof_traceback(err)
    assert "interrupted while analysing Slow" in err and "lists the 1 of 2 models finished" in err
    where = run_dir(tmp_path / "logs")
    trace = json.loads((where / "trace.json").read_text())
    assert trace["status"] == "interrupted" and trace["not_analysed"] == ["Slow"]
    (linear,) = trace["models"]
    assert linear["name"] == "Linear" and linear["error"] is None
    assert shapeprof.Report.from_json(linear["report_path"]).model == "Linear"
    assert sorted(p.name for p in where.iterdir()) == ["Linear", "trace.json"]   # no temp file left


def test_the_view_hint_can_be_pasted_into_a_shell(tmp_path):
    write(tmp_path / "s.py", "import torch\ntorch.nn.Linear(4, 4)(torch.randn(2, 4))\n")
    result = run(["trace", "--logdir", "my logs", "s.py"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "see them in TensorBoard: " in line)
    command = shlex.split(line.split("see them in TensorBoard: ")[1])
    assert command[:2] == ["shapeprof", "view"] and len(command) == 3, command
    assert (tmp_path / command[2]) == run_dir(tmp_path / "my logs")


def test_calibrate_checks_where_it_writes_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "taken.toml").mkdir()

    def measure(*args, **kwargs):
        raise AssertionError("calibrate measured before finding that it cannot save the result")

    monkeypatch.setattr(cli, "calibrate", measure)
    for output, expected in (("afile/x.toml", "into 'afile': 'afile' is a file, not a directory"),
                             ("missing/x.toml", "into 'missing': no such directory"),
                             ("taken.toml", "'taken.toml': it is a directory")):
        assert cli.main(["calibrate", "-o", output]) == 2, output
        err = capsys.readouterr().err
        assert err.startswith("shapeprof: error: ") and expected in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "taken.toml"]   # no probe file left


SMALL = """
    import torch
    import torch.nn as nn
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)).eval()
    x = torch.randn(16, 64)
    with torch.no_grad():
        for _ in range(3):
            model(x)
    x.zero_()   # the script changes its input afterwards: profile and optimize use a copy of the first call's
"""


def test_profile_measures_each_model_beside_its_prediction(tmp_path):
    write(tmp_path / "small.py", SMALL)
    result = run(["trace", "--profile", "--steps", "2", "--json", "--logdir", "logs", "small.py"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (model,) = json.loads(result.stdout)["models"]
    assert model["error"] is None and model["warnings"] == [], model
    assert model["measured_seconds"] > 0 and model["measured_on"].startswith("cpu")
    measured = shapeprof.Report.from_json(run_dir(tmp_path / "logs") / "Sequential" / "measured.json")
    assert all(n.measured_seconds is not None for n in measured.nodes)
    predicted = shapeprof.Report.from_dict(model["report"])
    assert predicted.spec.name == "a100-80gb-sxm" and predicted.total.measured_seconds is None
    assert sorted(r.split("-")[1] for r in model["tensorboard_runs"]) == ["measured", "predicted"]


def test_optimize_shows_the_verified_rewrites_before_and_after(tmp_path):
    write(tmp_path / "small.py", SMALL)
    text, as_json = run_many([(["trace", "--optimize", "--no-tensorboard", "--logdir", "a", "small.py"], tmp_path),
                              (["trace", "--optimize", "--json", "--logdir", "b", "small.py"], tmp_path)])
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    assert "Sequential --optimize: before and after" in text.stdout and "fuse_linear_activation" in text.stdout
    (model,) = json.loads(as_json.stdout)["models"]
    opt = model["optimize"]   # what optimize.json holds: one shape for both
    applied = [a["what"].split(" ->")[0] for o in opt["outcomes"] for a in o["applied"]]
    # the second Linear's weight requires grad (the script does not freeze it): it is not prepacked
    assert opt["verified"] and applied == ["Linear + ReLU"]
    assert 0 < opt["seconds_saved"] < opt["predicted_seconds"]
    assert opt["measurement"] is None                   # measured before/after only with --profile
    saved = json.loads((run_dir(tmp_path / "b") / "Sequential" / "optimize.json").read_text())
    assert (saved["schema"], saved["version"]) == ("shapeprof.optimize", 1)
    assert saved == opt


def test_optimize_of_the_generate_example_shows_the_kv_cache(tmp_path):
    """The decoder of examples/generate_gpt.py has no cache: trace --optimize inserts one and says what it holds;
    optimize.json keeps it, and `shapeprof report` prints it again."""
    script = str(REPO / "examples" / "generate_gpt.py")
    trace = run(["trace", "--optimize", "--no-tensorboard", "--logdir", "logs", script, "--max-new-tokens", "2",
                 "--n-layer", "2", "--n-embd", "64"], tmp_path, timeout=300)
    assert trace.returncode == 0, trace.stderr
    out = " ".join(trace.stdout.split())       # rich wraps lines
    assert "kv_cache: applied (2 matched" in out and "cached decoding: GPT's whole forward" in out
    assert "KV cache: 4 tensors (keys and values of 2 attentions), 1.02 kB per position per sequence" in out
    assert "one more token" in out and "back to" in out     # verified over decode steps and a rewind
    saved = run_dir(tmp_path / "logs") / "GPT" / "optimize.json"
    (kv,) = [o for o in json.loads(saved.read_text())["outcomes"] if o["name"] == "kv_cache"]
    assert kv["status"] == "applied" and any(n.startswith("KV cache: 4 tensors") for n in kv["notes"])
    again = run(["report", str(saved)], tmp_path)
    assert again.returncode == 0 and "KV cache: 4 tensors" in " ".join(again.stdout.split()), again.stderr


def test_trace_of_a_script_running_generate_batch_writes_its_steps_for_tensorboard(tmp_path):
    script = str(REPO / "examples" / "serve_gpt.py")
    trace = run(["trace", "--no-tensorboard", "--logdir", "logs", script, "--requests", "4", "--max-new-tokens",
                 "4"], tmp_path, timeout=300)
    assert trace.returncode == 0, trace.stderr
    assert "4 requests, 16 tokens" in trace.stdout            # the script's own line
    (line,) = [x for x in trace.stdout.splitlines() if x.startswith("generate_batch:")]
    assert "3 decode steps" in line and "per-step scalars in" in line
    (events,) = (run_dir(tmp_path / "logs") / "generate_batch").glob("events.out.tfevents.*")
    assert events.stat().st_size > 0


def test_report_shows_every_saved_report_of_a_run_directory(tmp_path):
    write(tmp_path / "small.py", SMALL)
    trace = run(["trace", "--optimize", "--profile", "--steps", "2", "--no-tensorboard", "--logdir", "logs",
                 "small.py"], cwd=tmp_path)
    assert trace.returncode == 0, trace.stderr
    where = run_dir(tmp_path / "logs")
    model = where / "Sequential"
    whole, optimize_only, as_json = run_many([(["report", str(where)], tmp_path),
                                              (["report", str(model / "optimize.json")], tmp_path),
                                              (["report", "--json", str(where)], tmp_path)])
    for r in (whole, optimize_only, as_json):
        assert r.returncode == 0, r.stderr
    # the three, each model's together: predicted, measured, optimize
    out = whole.stdout
    positions = [out.index(str(model / name)) for name in ("report.json", "measured.json", "optimize.json")]
    assert positions == sorted(positions)
    assert "on NVIDIA A100-SXM4-80GB" in out and "shapeprof optimize Sequential" in out
    # --profile measures the rewrites: on this loaded 2-core machine a fusion of so small a model may time
    # slower and be undone, which the report says either way
    assert any(f"fuse_linear_activation: {s}" in optimize_only.stdout for s in ("applied", "slower"))
    # read back, optimize.json renders as the trace printed it
    printed = trace.stdout.split("Sequential --optimize: before and after")[1].split("reports saved in")[0]
    assert optimize_only.stdout.strip() in printed and optimize_only.stdout.strip().startswith("shapeprof optimize")
    docs = json.loads(as_json.stdout)
    assert [Path(d["path"]).name for d in docs] == ["report.json", "measured.json", "optimize.json"]
    assert docs[2]["report"] == json.loads((model / "optimize.json").read_text())


# ---------------------------------------------------------------------------------------------- width

CNN = """
    import torch
    import torch.nn as nn
    # conv-bn-relu-pool twice, then a classifier: every layer different
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16))
"""

_TABLE_BORDER = set(" ─━┏┓┗┛┡┩└┘┳┻╇┴┬┃│")


def _table_rows(lines, title):
    """The header and rows of the first table after the line starting with `title`."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith(("By module", "Memory-bound", "Coverage")):
            break
        if not set(line) <= _TABLE_BORDER:
            rows.append(line)
    return rows[0], rows[1:]


def test_trace_lays_its_reports_out_for_columns(tmp_path):
    write(tmp_path / "cnn.py", CNN)
    procs = {columns: subprocess.Popen(_cmd(["trace", "--no-tensorboard", "--logdir", f"w{columns}", "cnn.py"]),
                                       cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env={**_env(), "COLUMNS": str(columns)})
             for columns in (80, 200)}
    for columns, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= columns
        report = shapeprof.Report.from_json(run_dir(tmp_path / f"w{columns}") / "Sequential" / "report.json")
        header, rows = _table_rows(lines, "Top ")
        # one line per node (9: the Flatten is a view, it does no work), no row wrapped into a second line
        assert len(rows) == len(report.nodes) == 9
        by_path = {n.module_path: n for n in report.nodes}
        for row in rows:
            path = row.strip("│ ").split()[0]
            n = by_path[path]                               # the whole module path, first
            assert row.rstrip(" │").endswith(f"{n.share:.1%}"), row
        assert ("node" in header.split()) == (columns == 200)   # the node names go first when space is short


def test_profile_shows_measured_and_efficiency_whole_at_120_columns(tmp_path):
    write(tmp_path / "cnn.py", CNN)
    result = subprocess.run(_cmd(["trace", "--profile", "--steps", "2", "--no-tensorboard", "--logdir", "logs",
                                  "cnn.py"]), cwd=tmp_path, capture_output=True, text=True,
                            env={**_env(), "COLUMNS": "120"}, timeout=180)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    measured = shapeprof.Report.from_json(run_dir(tmp_path / "logs") / "Sequential" / "measured.json")
    header, rows = _measured_rows(lines)
    assert "measured" in header.split() and "eff." in header.split()
    assert len(rows) == len(measured.nodes)
    by_path = {n.module_path: n for n in measured.nodes}
    for row in rows:
        n = by_path[row.strip("│ ").split()[0]]
        # the efficiency is predicted / measured, whole, at the end of its row
        assert row.rstrip(" │").endswith(f"{n.predicted_seconds / n.measured_seconds:.0%}"), row


def _measured_rows(lines):
    after = next(i for i, line in enumerate(lines) if "measured on this machine" in line)
    return _table_rows(lines[after:], "Top ")


# ---------------------------------------------------------------------------------------------- training scripts

TRAIN = """
    import torch
    import torch.nn as nn


    def main():
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(8, 16), torch.randn(8, 4)
        for _ in range(3):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


    main()
"""

ONE_STEP = """
    import torch
    import torch.nn as nn
    model = nn.Linear(16, 4)   # one step, and the script ends right after its backward
    model(torch.randn(8, 16)).sum().backward()
"""

INFER = """
    import torch
    import torch.nn as nn
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    for _ in range(3):
        model(torch.randn(8, 16))   # gradients recorded, never used: still inference
"""

ADAGRAD = """
    import torch
    import torch.nn as nn
    model = nn.Linear(16, 4)
    opt = torch.optim.Adagrad(model.parameters())
    for _ in range(2):
        model(torch.randn(8, 16)).sum().backward()
        opt.step()
"""


def test_a_training_script_gets_its_training_step(tmp_path):
    from shapeprof.session import FORWARD_ONLY, NO_OPTIMIZER_STEP
    scripts = {"train.py": TRAIN, "one_step.py": ONE_STEP, "infer.py": INFER, "adagrad.py": ADAGRAD}
    for name, text in scripts.items():
        write(tmp_path / name, text)
    results = run_many([(["trace", "--no-tensorboard", "--logdir", name[:-3], name], tmp_path) for name in scripts])
    # the optimizer each report names: the script's, AdamW assumed, none (inference), none (cannot be priced)
    expected = {"train": "SGD (foreach)", "one_step": "AdamW (foreach)", "infer": None, "adagrad": None}
    for (name, optimizer), result in zip(expected.items(), results):
        assert result.returncode == 0, result.stderr
        no_shapeprof_traceback(result.stderr)
        (model,) = json.loads((run_dir(tmp_path / name) / "trace.json").read_text())["models"]
        report = shapeprof.Report.from_json(model["report_path"])
        assert (report.training.optimizer if report.training else None) == optimizer, (name, report.notes)
        assert model["notes"] == list(report.notes), name
        assert model["ran_backward"] == (name != "infer") and model["loss"] is None, name
        if optimizer is not None:   # (the terminal wraps the table's title and the notes: compare words)
            assert f"({optimizer}, loss from" in " ".join(result.stdout.split()), name
            assert FORWARD_ONLY not in report.notes, name
            assert list(report.training.phases) == ["forward", "backward", "optimizer"]
    assert NO_OPTIMIZER_STEP in shapeprof.Report.from_json(
        json.loads((run_dir(tmp_path / "one_step") / "trace.json").read_text())["models"][0]["report_path"]).notes
    assert "Training step" not in results[2].stdout and "note:" not in results[2].stdout
    assert f"note: {FORWARD_ONLY}" in results[3].stdout and "torch.optim.Adagrad" in results[3].stdout
    optimizers = [json.loads((run_dir(tmp_path / name[:-3]) / "trace.json").read_text())["models"][0]["optimizer"]
                  for name in scripts]
    assert optimizers == ["SGD()", None, None, "Adagrad()"]


def test_trace_of_the_train_gpt_example_shows_its_step_phase_by_phase(tmp_path):
    result = run(["trace", "--no-tensorboard", "--logdir", str(tmp_path), "examples/train_gpt.py", "--",
                  "--steps", "2"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    no_shapeprof_traceback(result.stderr)
    out = result.stdout
    words = " ".join(out.split())   # the terminal wraps the table's title and the notes
    assert "step 0: loss" in out and "step 1: loss" in out and "step 2: loss" not in out   # --steps reached it
    assert "Training step:" in out and "MFU" in out and "(AdamW (foreach), loss from output[1])" in words
    for phase in ("forward", "backward", "optimizer"):
        assert re.search(rf"^\s+{phase}\s+\S+ [kMGT]?FLOP", out, flags=re.M), (phase, out)
    assert "memory: weights" in out and "optimizer state" in out
    assert "the optimizer is the script's AdamW(weight_decay=0.1, foreach=True, fused=False)" in words
    report = shapeprof.Report.from_json(run_dir(tmp_path) / "GPT" / "report.json")
    assert report.training.optimizer == "AdamW (foreach)" and report.training.loss == "output[1]"


# ---------------------------------------------------------------------------------------------- the examples

def test_the_examples_run_under_trace(tmp_path):
    names = {"train_mlp.py": "MLP", "generate_gpt.py": "GPT", "cnn_inference.py": "SmallCNN"}
    # run by `shapeprof trace` as scripts, exactly as `python examples/X.py` runs them
    results = run_many([(["trace", "--no-tensorboard", "--logdir", str(tmp_path / name), f"examples/{name}"], REPO)
                        for name in names])
    for (name, model), r in zip(names.items(), results):
        assert r.returncode == 0, (name, r.stderr)
        assert f"model 1 of 1: {model}" in r.stdout, (name, r.stdout)
        assert (run_dir(tmp_path / name) / model / "report.json").is_file()
        no_shapeprof_traceback(r.stderr)
    assert "GPT: called 16x at top level" in results[1].stdout        # one call per generated token
    assert "CrossEntropyLoss (5x)" in results[0].stdout                 # the loss: no parameters, listed


def test_the_examples_import_as_a_package_too():
    from examples import cnn_inference, generate_gpt, train_gpt, train_mlp
    assert train_mlp.main(["--steps", "1", "--batch", "4"]).out.out_features == 10
    assert train_gpt.main(["--steps", "1", "--batch", "2", "--block-size", "8"]).config.block_size == 8
    assert generate_gpt.main(["--max-new-tokens", "2", "--n-layer", "1", "--prompt", "ab"]).shape == (1, 4)
    assert cnn_inference.main(["--batch", "2", "--batches", "1"]).shape == (2,)


# ---------------------------------------------------------------------------------------------- calibrate, view

def test_calibrate_writes_a_spec_that_trace_accepts(tmp_path):
    result = run(["calibrate", "--device", "cpu", "--budget", "0.5", "-o", "cpu.json"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    spec = shapeprof.load_spec(tmp_path / "cpu.json")
    assert spec.peak_flops["fp32"] > 0 and spec.memory_bandwidth > 0
    assert "--spec cpu.json" in result.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_view_serves_the_logdir_on_localhost_until_ctrl_c(traced):
    _, logdir, _ = traced
    port = _free_port()
    proc = subprocess.Popen(_cmd(["view", str(logdir), "--port", str(port)]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/logdir", timeout=2) as response:
                    status, body = response.status, json.loads(response.read())
                    break
            except OSError:
                time.sleep(0.3)
        assert status == 200, proc.stderr.read() if proc.poll() is not None else "no answer"
        assert Path(body["logdir"]).resolve() == logdir.resolve()
    finally:
        os.killpg(proc.pid, signal.SIGINT)          # Ctrl-C in the terminal: the whole foreground group
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/data/logdir", timeout=2)


def test_view_stops_its_tensorboard_on_sigterm(traced):
    import psutil
    _, logdir, _ = traced
    port = _free_port()
    proc = subprocess.Popen(_cmd(["view", str(logdir), "--port", str(port)]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    started = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/logdir", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "TensorBoard never answered"
                time.sleep(0.3)
        started = psutil.Process(proc.pid).children(recursive=True)   # TensorBoard (and what it started)
        assert started
        proc.send_signal(signal.SIGTERM)                # to view alone, as `kill` or a supervisor sends it
        proc.wait(timeout=30)   # not communicate(): an orphaned TensorBoard would hold the pipes open
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"left running: {alive}"
        deadline = time.monotonic() + 30
        while True:                                     # nothing listens on the port any more
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    break
            assert time.monotonic() < deadline, f"port {port} still open"
            time.sleep(0.3)
        assert proc.returncode == 128 + signal.SIGTERM   # as a shell reports a process ended by SIGTERM
    finally:   # whatever happened, leave nothing running
        for p in started:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
