"""How shapeprof writes numbers and names: units, one-line errors, slugs, and strings made safe for a terminal.

One home for what every renderer, finding and message writes the same way, so that a FLOP count, an intensity or
an error reads alike wherever it is printed.

    >>> fmt_flops(2.5e12), fmt_bytes(16.1e9), fmt_seconds(7.48e-3), fmt_intensity(9.5637)
    ('2.5 TFLOP', '16.1 GB', '7.48 ms', '9.56')
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

__all__ = ["fmt_bytes", "fmt_flops", "fmt_intensity", "fmt_seconds", "one_line", "printable", "slug",
           "without_control"]


def fmt_flops(n: float, unit: bool = True) -> str:
    suffix = "FLOP" if unit else ""
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {prefix}{suffix}"
    return f"{n:.0f} {suffix}".strip()


def fmt_bytes(n: float) -> str:
    for prefix, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {prefix}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.3g} µs"
    return f"{s * 1e9:.3g} ns"


def fmt_intensity(x: float) -> str:
    """An intensity or a ridge point as every renderer and finding writes it: 3 significant figures.

    One format for both, so that a node at 9.6 FLOP/B is never shown against "a ridge of 10" (9.56).

        >>> fmt_intensity(312e12 / 2.039e12), fmt_intensity(19.5e12 / 2.039e12), fmt_intensity(0.125)
        ('153', '9.56', '0.125')
    """
    return "inf" if x == float("inf") else f"{x:.3g}"


def one_line(e: BaseException) -> str:
    """'ValueError: the first line of the message': how every error shapeprof passes on is written."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def slug(text: str, empty: str = "run") -> str:
    """A file- and folder-safe name: 'NVIDIA A100-SXM4-80GB' -> 'NVIDIA-A100-SXM4-80GB'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or empty


# ECMA-48 sequences, whole: CSI (ESC [ or C1 0x9b) with its parameter, intermediate and final bytes; the string
# commands OSC, DCS, SOS, PM, APC (ESC ] P X ^ _, or C1 0x9d 0x90 0x98 0x9e 0x9f) up to BEL or ST (ESC \ or 0x9c),
# or to the end of the text when unterminated; any other ESC with its intermediates and final byte. Taking the
# sequence whole matters: stripping only the ESC of '\x1b]0;title\x07' would still print '0;title'.
_ESCAPE = re.compile(r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
                     r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
                     r"|\x1b[\x20-\x2f]*[\x30-\x7e]?")
# what is left of C0 (newline and tab are text), DEL and C1
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    r"""`text` without terminal control: escape sequences (whole), C0 controls but newline and tab, DEL and C1.

        >>> printable("Net\x1b]0;owned\x07\x1b[2J.head\r\x9b31m")
        'Net.head'
    """
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub("", _ESCAPE.sub("", text))


def without_control(value: Any) -> Any:
    """`value` with `printable` applied to every string in it: in dataclass fields (those compared, which are
    the data; `Report.graph_capture` is not), tuples, lists and dicts. What needs no change is returned as it is, so a
    clean report costs one scan and no copy.
    """
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):   # a namedtuple is left whole
        items = [without_control(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if isinstance(value, dict):
        items = {without_control(k): without_control(v) for k, v in value.items()}
        same = len(items) == len(value) and all(a is b and items[a] is v for (a, v), b in zip(value.items(), items))
        return value if same else items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in dataclasses.fields(value):
            if f.init and f.compare:
                old = getattr(value, f.name)
                new = without_control(old)
                if new is not old:
                    changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value
