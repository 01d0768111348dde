"""The output-format interface: `Format`, the `Results` it writes, and the registry of formats."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..registry import Registry
from ..report import Report

__all__ = ["Format", "Results", "available", "get", "register"]


@dataclass
class Results:
    """What was found out about one model: the input of every format.

    Attributes:
        name: the model's name in its run ('GPT', or 'GPT-2' for a second GPT): the folder its files go in.
        report: the analysis on the chosen spec (predicted).
        measured: `shapeprof.profile`'s measured report on this machine, or None.
        measured_trace: the profiler's Kineto trace (a dict), or None.
        optimized: `shapeprof.optimize`'s OptimizeReport, or None.
        note: how the measurement was made (`ProfileResult.note`).
    """

    name: str
    report: Report
    measured: Report | None = None
    measured_trace: dict | None = None
    optimized: Any = None
    note: str = ""


class Format(abc.ABC):
    """One output format. `write` is the interface; `render` is there for the formats that are text."""

    name: ClassVar[str]
    description: ClassVar[str]

    @abc.abstractmethod
    def write(self, results: Results, run_dir: Path) -> dict[str, Path]:
        """Write `results` into the run directory; returns what was written, by kind ('report', 'measured',
        'optimize', a TensorBoard run's name ...) -> path. Raises OSError (or the format's own error) naming the
        path when it cannot."""

    def render(self, results: Results, width: int | None = None) -> str:
        """`results` as text, laid out for `width` columns where that matters."""
        raise NotImplementedError(f"the {self.name} format writes files, not text")


_FORMATS: Registry[Format] = Registry("output format", article="an")


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: make a format available by its name. A name taken twice is an error."""
    _FORMATS.add(cls.name, cls())
    return cls


def get(name: str) -> Format:
    """The format registered under `name`.

    Raises:
        KeyError: an unknown name; the message lists the known ones.
    """
    return _FORMATS.get(name)


def available() -> list[tuple[str, str]]:
    """(name, description) of every registered format, sorted by name."""
    return sorted((name, f.description) for name, f in _FORMATS)
