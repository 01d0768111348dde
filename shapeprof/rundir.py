"""A trace's run directory: a new folder of its own inside the logdir, reserved before the script runs.

    runs/shapeprof/                     the logdir (`--logdir`), shared by every trace; `shapeprof view` takes it
      train-20250102-030405/            one trace, reserved with os.mkdir: two traces never write into one
        trace.json                      what ran; rewritten (atomically) each time a model's reports are saved
        GPT/report.json                 and measured.json (--profile), optimize.json (--optimize)
        GPT-predicted-a100-80gb-sxm/    TensorBoard runs
      train-20250102-030405-2/          the same script started in the same second (a concurrent trace)

Reserving the folder before the script runs is also the check that the logdir can be created and written: an
unwritable logdir stops the command at once instead of after a training run whose reports could not be saved.

Every JSON file of a run directory names its schema and version: trace.json ``shapeprof.trace``; the reports of
each model are written by the output formats (`shapeprof.output`: report.json, measured.json and optimize.json by
the json format, which also finds and reads them back for `shapeprof report`).

    >>> import tempfile
    >>> from datetime import datetime
    >>> logdir = Path(tempfile.mkdtemp())
    >>> first = RunDir.create(logdir, "train", now=datetime(2025, 1, 2, 3, 4, 5))
    >>> second = RunDir.create(logdir, "train", now=datetime(2025, 1, 2, 3, 4, 5))
    >>> first.path.name, second.path.name
    ('train-20250102-030405', 'train-20250102-030405-2')
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .files import probe_writable, write_json

__all__ = ["RUN_NAME", "RunDir", "RunDirError", "TRACE_SCHEMA", "TRACE_SCHEMA_VERSION"]

TRACE_SCHEMA = "shapeprof.trace"
TRACE_SCHEMA_VERSION = 2   # 2: trace.json is in a run directory of its own, written as each model is saved,
                           # with a status; the models list holds the models finished so far
#: A run directory's name: ``{script}`` the script's (or module's) name, ``{time}`` the trace's start time.
RUN_NAME = "{script}-{time}"

_MAX_SUFFIX = 10_000   # '-2' ... : a filesystem that says "exists" this often is broken, not busy


class RunDirError(OSError):
    """The logdir cannot be created or written; the message is one line naming the folder and why."""


@dataclass(frozen=True)
class RunDir:
    """A run directory made by `create`: where one trace writes, and the logdir it is in."""

    path: Path
    logdir: Path
    created: tuple[Path, ...] = ()   # folders above `path` that `create` made (innermost first)

    @classmethod
    def create(cls, logdir: str | os.PathLike, script: str, *, now: datetime | None = None,
               name: str = RUN_NAME) -> "RunDir":
        """Make a new folder ``<logdir>/<name>`` (``-2``, ``-3`` ... while the name is taken) and check that files
        can be written in it. Atomic: of two traces that start together, each gets a folder of its own.

        Args:
            logdir: the folder the run directory goes in; made (with its parents) if missing. Made absolute,
                since the script may change the working directory.
            script: fills ``{script}`` in `name`.
            now: fills ``{time}`` in `name` (default: now).

        Raises:
            RunDirError: the logdir is a file, is under one, or cannot be created or written.
        """
        given = str(logdir)
        logdir = Path(os.path.abspath(logdir))
        missing = []
        probe = logdir
        while not _exists(probe):
            missing.append(probe)
            probe = probe.parent
        if not probe.is_dir():
            raise RunDirError(f"logdir '{given}' exists and is not a directory" if probe == logdir else
                              f"cannot create logdir '{given}': '{probe}' is a file, not a directory")
        stem = name.format(script=script, time=(now or datetime.now()).strftime("%Y%m%d-%H%M%S"))
        k = 1
        while True:
            path = logdir / (stem if k == 1 else f"{stem}-{k}")
            try:
                logdir.mkdir(parents=True, exist_ok=True)   # again each time: a trace that found nothing to
                os.mkdir(path)                              # analyse may have removed a logdir it had made
                break
            except FileExistsError:
                if not logdir.is_dir():
                    raise RunDirError(f"logdir '{given}' exists and is not a directory") from None
                k += 1
                if k > _MAX_SUFFIX:
                    raise RunDirError(f"cannot create a run directory in logdir '{given}': "
                                      f"'{stem}' and {_MAX_SUFFIX - 1} suffixes are all taken") from None
            except OSError as e:
                _remove_empty(missing)
                raise RunDirError(f"cannot create logdir '{given}': {_why(e)}") from None
        run = cls(path, logdir, tuple(missing))
        try:   # a folder one may create but not write into (a read-only bind mount, an odd ACL)
            probe_writable(path)
        except OSError as e:
            run.discard()
            raise RunDirError(f"cannot write in logdir '{given}': {_why(e)}") from None
        return run

    def write_json(self, name: str, data: Any) -> Path:
        """`data` as JSON in ``<path>/<name>``, atomically (see `write_json`). Raises OSError."""
        return write_json(self.path / name, data)

    def discard(self) -> None:
        """Remove the run directory, and the folders above it that `create` made, where they are still empty
        (nothing was saved; another trace may have written into a parent since)."""
        _remove_empty([self.path, *self.created])


def _remove_empty(folders: list[Path]) -> None:
    """rmdir each, innermost first, up to the first that is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:   # not empty (stop there), or gone already
            if _exists(folder):
                return


def _exists(path: Path) -> bool:
    try:
        path.lstat()
    except OSError:   # ENOENT, ENOTDIR (a file on the way), EACCES: not a folder this trace can use as it is
        return False
    return True


def _why(e: OSError) -> str:
    if e.errno == errno.ENOTDIR:
        return f"'{e.filename}' is under a file, not a directory" if e.filename else "a file is in the way"
    return e.strerror or str(e)
