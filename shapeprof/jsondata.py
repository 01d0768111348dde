"""Reading JSON back into typed dataclasses: every field checked against its annotation, every error one line.

What `dataclasses.asdict` wrote (a report, an optimize report) comes back through `from_plain`, so that what
renders a file someone else wrote never meets a wrong type; `load_json` parses with the same one-line errors.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .hardware import DeviceSpec, SpecError

__all__ = ["ReportFormatError", "from_plain", "json_kind", "load_json", "read_json_file"]


class ReportFormatError(ValueError):
    """A report file that is not a shapeprof report of a version this code reads."""


def read_json_file(path: Path) -> Any:
    """The JSON in the file at `path`; every failure (unreadable, not UTF-8, not JSON) a one-line
    `ReportFormatError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ReportFormatError(f"cannot read report {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ReportFormatError(f"{path} is not JSON: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return load_json(text, path)


def load_json(text: str, source: Any = "report") -> Any:
    """`json.loads`, every failure a one-line `ReportFormatError` naming `source`."""
    name = source if len(str(source)) < 200 else "report"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportFormatError(f"{name} is not JSON: {e}") from e
    except RecursionError as e:   # arrays nested thousands deep: json gives up, the file is still just bad input
        raise ReportFormatError(f"{name} is not JSON this reader can parse: nested too deeply") from e


def from_plain(cls: type, data: Any, where: str = "") -> Any:
    """An instance of the dataclass `cls` built from JSON data, every field checked against its annotation.

    Reads what `dataclasses.asdict` wrote: an object per dataclass (a missing key takes the field's default, an
    unknown key is an error, a key naming a property of the class is skipped), a list per tuple or list, an
    object per dict (JSON keys are strings), numbers for int and float (a bool is neither, and an
    integer must fit in 64 bits, as every count here does), strings, null only where the type allows None.
    Fields with ``compare=False`` are not data and are not read. Any other mismatch is a `ReportFormatError`
    naming the field by its path, so what renders a report later never meets a wrong type.

        >>> from shapeprof.report import AtenOp
        >>> from_plain(AtenOp, {"op": "aten.mm", "flops": "12", "bytes": 8, "seconds": 0.1, "covered": True})
        Traceback (most recent call last):
        ...
        shapeprof.jsondata.ReportFormatError: flops: expected an integer, got a string
    """
    if not isinstance(data, dict):
        raise ReportFormatError(_at(where, f"expected an object, got {json_kind(data)}"))
    hints = _type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init and f.compare}
    for key in data:
        # a key naming a property is derived data a to_dict() adds for readers (a speedup): recomputed, not read
        if key not in known and not isinstance(getattr(cls, str(key), None), property):
            raise ReportFormatError(_at(where, f"unknown key {str(key)!r}"))
    values = {}
    for name, f in known.items():   # in the order of the fields: the first wrong one is the one named
        path = f"{where}.{name}" if where else name
        if name in data:
            values[name] = _typed(hints[name], data[name], path)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ReportFormatError(_at(where, f"missing key {name!r}"))
    try:
        return cls(**values)
    except (SpecError, ValueError, TypeError) as e:   # a class's own checks (__post_init__)
        raise ReportFormatError(_at(where, str(e))) from e


def _at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


_INT_RANGE = 2 ** 63


def _typed(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return _typed(arms[0], value, where)
        for arm in arms:   # no such field today; tried in order, the last one's complaint is the message
            try:
                return _typed(arm, value, where)
            except ReportFormatError:
                if arm is arms[-1]:
                    raise
    if tp is DeviceSpec:
        if not isinstance(value, dict):
            raise ReportFormatError(f"{where}: expected an object, got {json_kind(value)}")
        try:
            return DeviceSpec.from_dict(value)
        except SpecError as e:
            raise ReportFormatError(f"{where}: {e}") from e
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ReportFormatError(f"{where}: expected a list, got {json_kind(value)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):   # a fixed-length tuple
            if len(value) != len(args):
                raise ReportFormatError(f"{where}: expected a list of {len(args)}, got {len(value)} items")
            return tuple(_typed(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_typed(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ReportFormatError(f"{where}: expected an object, got {json_kind(value)}")
        key, item = args if args else (Any, Any)
        return {_typed(key, k, where): _typed(item, v, f"{where}[{k!r}]") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ReportFormatError(f"{where}: expected true or false, got {json_kind(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ReportFormatError(f"{where}: expected an integer, got {json_kind(value)}")
        if not -_INT_RANGE <= value < _INT_RANGE:
            raise ReportFormatError(f"{where}: integer out of range")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ReportFormatError(f"{where}: expected a number, got {json_kind(value)}")
        if isinstance(value, int) and not -_INT_RANGE <= value < _INT_RANGE:
            raise ReportFormatError(f"{where}: number out of range")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ReportFormatError(f"{where}: expected a string, got {json_kind(value)}")
        return value
    raise TypeError(f"from_plain cannot read a field of type {tp!r} ({where})")   # a programming error


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def json_kind(value: Any) -> str:
    """What a JSON value is, in the words a message uses: 'null', 'a string', 'a list' ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)
