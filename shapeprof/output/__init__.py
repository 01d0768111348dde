"""Output formats: how a traced model's results leave shapeprof, behind one small interface with a registry.

A format turns a model's `Results` (its predicted report and, where they were made, the measured one and what
optimize did) into files in a run directory (`write`) and, if it is text, into a string (`render`).
`shapeprof trace` writes every format its ``--output`` names; adding a format is a subclass of `Format` and
`register` (as pyinstrument's renderers are a class each):

    >>> from shapeprof.output import available
    >>> [name for name, _ in available()]
    ['html', 'json', 'markdown', 'tensorboard', 'terminal']
"""
from .base import Format, Results, available, get, register

# the built-in formats register themselves
from . import html, jsonfiles, markdown, tensorboard, terminal  # noqa: E402,F401  isort: skip

__all__ = ["Format", "Results", "available", "get", "register"]
