"""The README's snippets, run as they stand in README.md (read from it, not copied): a snippet that breaks fails.

The Python blocks run in a fresh interpreter from a scratch folder with the repository on its path; every line of a
bash block that is a `shapeprof` command runs there too (`shapeprof view`, a server, until it says it serves);
the set-up lines (venv, pip, .ci/run) are what CI itself runs.
"""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "COLUMNS": "120"}


def _scratch(tmp_path: Path) -> Path:
    (tmp_path / "examples").symlink_to(ROOT / "examples")   # the commands name examples/...
    return tmp_path


def test_the_readme_has_the_blocks_this_test_runs():
    kinds = [kind for kind, _ in BLOCKS]
    assert kinds.count("python") >= 1 and kinds.count("bash") >= 3


@pytest.mark.parametrize("index", [i for i, (kind, _) in enumerate(BLOCKS) if kind == "python"])
def test_python_blocks_run_as_they_stand(index, tmp_path):
    script = _scratch(tmp_path) / "snippet.py"
    script.write_text(BLOCKS[index][1])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _shapeprof_commands() -> list[str]:
    commands = []
    for kind, text in BLOCKS:
        if kind != "bash":
            continue
        for line in text.splitlines():
            for part in line.split("&&"):
                command = part.split("  #")[0].strip()
                if command.startswith("shapeprof "):
                    commands.append(command)
    return commands


def test_the_first_commands_are_the_set_up_ci_runs():
    first = next(text for kind, text in BLOCKS if kind == "bash")
    assert "pip install torch==2.13.0" in first and "pip install -e ." in first
    assert "shapeprof trace examples/" in first
    assert any(text.strip() == "bash .ci/run" for kind, text in BLOCKS if kind == "bash")


@pytest.mark.parametrize("command", _shapeprof_commands())
def test_shell_commands_run_as_they_stand(command, tmp_path):
    import shlex
    argv = [sys.executable, "-m", "shapeprof", *shlex.split(command)[1:]]
    cwd = _scratch(tmp_path)
    if argv[3:4] == ["view"]:   # a server: it must start serving, then stops on SIGTERM
        (cwd / "runs").mkdir()
        proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            line = proc.stdout.readline()
            assert "TensorBoard on http://127.0.0.1" in line, line
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        return
    if argv[3:4] == ["report"]:   # it reads what a trace saved: make one first
        subprocess.run([sys.executable, "-m", "shapeprof", "trace", "--no-tensorboard", "examples/cnn_inference.py"],
                       cwd=cwd, env=_env(), capture_output=True, timeout=600, check=True)
    done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
