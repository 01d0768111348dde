"""Files shapeprof writes: whole or not at all (atomic), and folders checked for writing before work starts.

A reader (TensorBoard, a second `shapeprof report`, a trace being interrupted) never sees half a file, and an
unwritable place is found before minutes of analysis, profiling or measuring are spent.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["probe_writable", "write_atomic", "write_json"]


def write_atomic(path: Path, text: str) -> None:
    """`text` at `path` (its folder made if missing), by a rename of a finished temporary file. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> Path:
    """`data` as JSON at `path`, atomically. Raises OSError."""
    write_atomic(path, json.dumps(data, indent=1) + "\n")
    return path


def probe_writable(folder: Path) -> None:
    """Create and remove a file in `folder` (which must exist): a folder one may enter but not write into (a
    read-only mount, an odd ACL) fails here, with the OSError that says why."""
    fd, tmp = tempfile.mkstemp(prefix=".shapeprof-probe-", dir=folder)
    os.close(fd)
    os.unlink(tmp)
