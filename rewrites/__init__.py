"""Graph rewrites (installed as ``shapeprof.rewrites``): the registry of the passes `shapeprof.optimize` runs.

    >>> import shapeprof.rewrites as rewrites
    >>> [name for name, _ in rewrites.available()]
    ['fuse_linear_activation', 'prepack_linear']
    >>> rewrites.get("fuse_linear_activation").capture
    'symbolic_trace'

A rewrite is a `Rewrite`: a pass over a GraphModule returning a `RewriteResult` (see `shapeprof.rewrites.base`).
`register` adds one (an instance, or a class, which is instantiated; usable as a class decorator); a second
rewrite with the same name raises.
"""
from __future__ import annotations

from shapeprof.registry import Registry

from .base import CAPTURE_KEY, Match, Rewrite, RewriteContext, RewriteResult, Skip

__all__ = ["CAPTURE_KEY", "Match", "Rewrite", "RewriteContext", "RewriteResult", "Skip", "available", "get",
           "register", "unregister"]

_REGISTRY: Registry[Rewrite] = Registry("rewrite")


def register(rewrite):
    """Add a rewrite to the registry; returns what it was given, so it works as a class decorator.

    Raises:
        ValueError: a rewrite of that name is already registered, or the rewrite has no name.
        TypeError: not a Rewrite.
    """
    instance = rewrite() if isinstance(rewrite, type) else rewrite
    if not isinstance(instance, Rewrite):
        raise TypeError(f"register takes a shapeprof.rewrites.Rewrite, got {type(instance).__name__}")
    if not instance.name:
        raise ValueError(f"{type(instance).__name__} has no name")
    _REGISTRY.add(instance.name, instance)
    return rewrite


def unregister(name: str) -> Rewrite:
    """Remove a rewrite from the registry and return it (KeyError if there is none of that name)."""
    return _REGISTRY.remove(name)


def get(name: str) -> Rewrite:
    """The registered rewrite called `name`.

    Raises:
        KeyError: no such rewrite; the message lists the registered ones.
    """
    return _REGISTRY.get(name)


def available() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered rewrite, in the order `optimize` runs them."""
    return [(r.name, r.description) for _, r in _REGISTRY]


# registration order is the order optimize runs them: fusion first, then packing what fusion left
from . import fuse_linear_activation as _fuse_linear_activation  # noqa: E402  (registers itself)
from . import prepack_linear as _prepack_linear  # noqa: E402  (registers itself)
