"""The json format: a model's reports as the JSON files `shapeprof report` reads back.

    <run dir>/<model>/report.json     the predicted report (`Report.to_json`, schema ``shapeprof.report``)
    <run dir>/<model>/measured.json   the measured one, when the model was profiled
    <run dir>/<model>/optimize.json   what optimize did (`optimize_document`, schema ``shapeprof.optimize``)

`saved_files` finds them under a folder and `read_saved` reads any of them back, by the schema it names.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..files import write_json
from ..jsondata import ReportFormatError, json_kind, read_json_file
from ..report import SCHEMA as REPORT_SCHEMA
from ..report import Report
from ..rundir import TRACE_SCHEMA
from .base import Format, Results, register

__all__ = ["OPTIMIZE_SCHEMA", "OPTIMIZE_SCHEMA_VERSION", "SAVED_FILES", "SAVED_KINDS", "JsonFormat",
           "optimize_document", "read_saved", "saved_files", "saved_label"]

OPTIMIZE_SCHEMA = "shapeprof.optimize"
OPTIMIZE_SCHEMA_VERSION = 1

#: The reports a run directory holds for each model, in the order `saved_files` lists them, and what each is.
SAVED_FILES = ("report.json", "measured.json", "optimize.json")
SAVED_KINDS = {"report.json": "predicted", "measured.json": "measured", "optimize.json": "optimize"}


@register
class JsonFormat(Format):
    name = "json"
    description = "report.json (predicted), measured.json and optimize.json of each model, for `shapeprof report`"

    def write(self, results: Results, run_dir: Path) -> dict[str, Path]:
        # each is written whole, one after the other: what was written is listed even if a later one fails
        folder, written = Path(run_dir) / results.name, {}
        results.report.to_json(folder / "report.json")
        written["report"] = folder / "report.json"
        if results.measured is not None:
            results.measured.to_json(folder / "measured.json")
            written["measured"] = folder / "measured.json"
        if results.optimized is not None:
            written["optimize"] = write_json(folder / "optimize.json", optimize_document(results.optimized))
        return written

    def render(self, results: Results, width: int | None = None) -> str:
        return json.dumps({"report": results.report.to_dict(),
                           "measured": results.measured.to_dict() if results.measured is not None else None,
                           "optimize": optimize_document(results.optimized) if results.optimized is not None
                           else None}, indent=1)


def optimize_document(report: Any) -> dict[str, Any]:
    """An OptimizeReport as optimize.json holds it: its `to_dict()` with a schema and version, and the whole
    device spec rather than its name (a spec file from `calibrate` has no built-in to be found by)."""
    return {"schema": OPTIMIZE_SCHEMA, "version": OPTIMIZE_SCHEMA_VERSION, **report.to_dict(),
            "spec": report.spec.to_dict()}


def saved_label(path: Path, root: Path, root_name: str) -> str:
    """How a saved report is named in a list of them: its folder under `root` (`root_name` for `root` itself) and
    what it is, 'mlp-20250101-000000/MLP · measured'."""
    folder = path.parent.relative_to(root).as_posix()
    return f"{folder if folder != '.' else root_name} · {SAVED_KINDS.get(path.name, path.stem)}"


def saved_files(folder: str | os.PathLike) -> list[Path]:
    """The report.json, measured.json and optimize.json files in `folder` and below: each model's together, in
    that order, the models sorted by path.

    Hidden folders are skipped (a TensorBoard run being staged: `export_tensorboard`), and so is a copy: a
    TensorBoard run holds the report it was written from (what the SHAPEPROF tab reads when no trace is around
    it), and inside a trace's run directory that is the model's report.json again, byte for byte; the one
    outside the TensorBoard run is listed.
    """
    folder = Path(folder)
    rank = {name: i for i, name in enumerate(SAVED_FILES)}
    found = sorted((p for name in SAVED_FILES for p in folder.rglob(name) if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1])),
                   key=lambda p: (p.parent, rank[p.name]))

    in_run = {p: any(p.parent.glob("events.out.tfevents.*")) for p in found}
    outside = [p for p in found if not in_run[p]]
    sizes = {_size(p) for p in outside}
    # only a run's file of the size of one outside can be a copy: hash just those (the SHAPEPROF tab lists often)
    suspects = [p for p in found if in_run[p] and _size(p) in sizes - {None}]
    suspect_sizes = {_size(p) for p in suspects}
    saved = {_digest(p) for p in outside if _size(p) in suspect_sizes} - {None}
    return [p for p in found if not (p in suspects and _digest(p) in saved)]


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None     # listed all the same: reading it says why it cannot be read


_DIGESTS: dict[tuple[Path, int, int], bytes] = {}


def _digest(path: Path) -> bytes | None:
    """sha256 of the file's bytes, remembered while its size and modification time stay the same."""
    try:
        st = path.stat()
        key = (path, st.st_mtime_ns, st.st_size)
        if key not in _DIGESTS:
            if len(_DIGESTS) > 4096:
                _DIGESTS.clear()
            _DIGESTS[key] = hashlib.sha256(path.read_bytes()).digest()
        return _DIGESTS[key]
    except OSError:
        return None


def read_saved(path: str | os.PathLike) -> Any:
    """A saved report read back: a `Report` (report.json, measured.json) or an `OptimizeReport` (optimize.json),
    by the schema the file names.

    Raises:
        ReportFormatError: one line: unreadable, not JSON, another or no schema, or a field that is wrong.
    """
    path = Path(path)
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ReportFormatError(f"not a shapeprof report: the JSON is {json_kind(data)}, not an object")
    schema = data.get("schema")
    if schema == REPORT_SCHEMA:
        return Report.from_dict(data)
    if schema == OPTIMIZE_SCHEMA:
        if data.get("version") != OPTIMIZE_SCHEMA_VERSION:
            raise ReportFormatError(f"optimize report version {data.get('version')!r} is not supported (this "
                                    f"shapeprof reads version {OPTIMIZE_SCHEMA_VERSION})")
        from ..optimize import OptimizeReport
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
