"""A trace's run directory: a new folder of its own inside the logdir, reserved before the script runs.

    runs/shapeprof/                     the logdir (`--logdir`), shared by every trace; `shapeprof view` takes it
      train-20250102-030405/            one trace, reserved with os.mkdir: two traces never write into one
        trace.json                      what ran; rewritten (atomically) each time a model's reports are saved
        GPT/report.json                 and measured.json (--profile), optimize.json (--optimize)
        GPT-predicted-a100-80gb-sxm/    TensorBoard runs
      train-20250102-030405-2/          the same script started in the same second (a concurrent trace)

Reserving the folder before the script runs is also the check that the logdir can be created and written: an
unwritable logdir stops the command at once instead of after a training run whose reports could not be saved.

Every JSON file of a run directory names its schema and version: trace.json ``shapeprof.trace``, report.json and
measured.json ``shapeprof.report`` (`Report.to_json`), optimize.json ``shapeprof.optimize`` (`optimize_document`).
`saved_files` finds the reports under a folder and `read_saved` reads any of them back, for `shapeprof report`.

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
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .report import SCHEMA as REPORT_SCHEMA
from .report import Report, ReportFormatError, _json_kind, _write_atomic, load_json

__all__ = ["OPTIMIZE_SCHEMA", "OPTIMIZE_SCHEMA_VERSION", "RUN_NAME", "RunDir", "RunDirError", "SAVED_FILES",
           "TRACE_SCHEMA", "TRACE_SCHEMA_VERSION", "optimize_document", "read_saved", "saved_files", "write_json"]

TRACE_SCHEMA = "shapeprof.trace"
TRACE_SCHEMA_VERSION = 2   # 2: trace.json is in a run directory of its own, written as each model is saved,
                           # with a status; the models list holds the models finished so far
OPTIMIZE_SCHEMA = "shapeprof.optimize"
OPTIMIZE_SCHEMA_VERSION = 1

#: The reports a run directory holds for each model, in the order `saved_files` lists them.
SAVED_FILES = ("report.json", "measured.json", "optimize.json")

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
            fd, tmp = tempfile.mkstemp(prefix=".shapeprof-probe-", dir=path)
            os.close(fd)
            os.unlink(tmp)
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


def write_json(path: Path, data: Any) -> Path:
    """`data` as JSON at `path`, atomically: a reader (TensorBoard, a second `shapeprof report`, the trace being
    interrupted) never sees half a file. Raises OSError."""
    _write_atomic(path, json.dumps(data, indent=1) + "\n")
    return path


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


# ---------------------------------------------------------------------------------------------- saved reports

def optimize_document(report: Any) -> dict[str, Any]:
    """An OptimizeReport as optimize.json holds it: its `to_dict()` with a schema and version, and the whole
    device spec rather than its name (a spec file from `calibrate` has no built-in to be found by)."""
    return {"schema": OPTIMIZE_SCHEMA, "version": OPTIMIZE_SCHEMA_VERSION, **report.to_dict(),
            "spec": report.spec.to_dict()}


def saved_files(folder: str | os.PathLike) -> list[Path]:
    """The report.json, measured.json and optimize.json files in `folder` and below: each model's together, in
    that order, the models sorted by path."""
    rank = {name: i for i, name in enumerate(SAVED_FILES)}
    found = (p for name in SAVED_FILES for p in Path(folder).rglob(name) if p.is_file())
    return sorted(found, key=lambda p: (p.parent, rank[p.name]))


def read_saved(path: str | os.PathLike) -> Any:
    """A saved report read back: a `Report` (report.json, measured.json) or an `OptimizeReport` (optimize.json),
    by the schema the file names.

    Raises:
        ReportFormatError: one line: unreadable, not JSON, another or no schema, or a field that is wrong.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ReportFormatError(f"cannot read report {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ReportFormatError(f"not JSON: not UTF-8 text ({e.reason} at byte {e.start})") from e
    data = load_json(text, "file")
    if not isinstance(data, dict):
        raise ReportFormatError(f"not a shapeprof report: the JSON is {_json_kind(data)}, not an object")
    schema = data.get("schema")
    if schema == REPORT_SCHEMA:
        return Report.from_dict(data)
    if schema == OPTIMIZE_SCHEMA:
        if data.get("version") != OPTIMIZE_SCHEMA_VERSION:
            raise ReportFormatError(f"optimize report version {data.get('version')!r} is not supported (this "
                                    f"shapeprof reads version {OPTIMIZE_SCHEMA_VERSION})")
        from .optimize import OptimizeReport
        try:
            return OptimizeReport.from_dict(data)
        except ReportFormatError as e:
            raise ReportFormatError(f"malformed shapeprof optimize report: {e}") from e.__cause__
    if schema == TRACE_SCHEMA:
        raise ReportFormatError("a trace summary, not a report: give `shapeprof report` its folder to see the "
                                "reports it lists")
    if schema is None and path.name == "optimize.json":
        raise ReportFormatError("an optimize.json from an older shapeprof, without a schema: trace again to get "
                                "one that can be shown")
    raise ReportFormatError(f"not a shapeprof report (schema {schema!r})")
