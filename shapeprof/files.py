"""Files shapeprof writes: whole or not at all (atomic), and folders checked for writing before work starts.

A reader (TensorBoard, a second `shapeprof report`, a trace being interrupted) never sees half a file, and an
unwritable place is found before minutes of analysis, profiling or measuring are spent.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["new_folder", "probe_writable", "write_atomic", "write_json"]


def write_atomic(path: Path, text: str) -> None:
    """`text` at `path` (its folder made if missing), by a rename of a finished temporary file. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
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


@contextlib.contextmanager
def new_folder(parent: str | os.PathLike, name: str) -> Iterator[tuple[Path, Path]]:
    """A new folder `parent`/`name` (`name`-1, -2 ... while taken), written whole: the block writes into a hidden
    staging folder, (staging, target) it is given, which is renamed to the target when the block ends and removed
    if it raises. A reader (TensorBoard) never sees half of it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    target, i = parent / name, 0
    while target.exists():
        i += 1
        target = parent / f"{name}-{i}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        yield staging, target
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
