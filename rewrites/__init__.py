"""Graph rewrites (installed as ``shapeprof.rewrites``): the registry of the passes `shapeprof.optimize` runs.

    >>> import shapeprof.rewrites as rewrites
    >>> [name for name, _ in rewrites.available()]
    ['fuse_linear_activation', 'prepack_linear', 'kv_cache', 'paged_kv_cache']
    >>> rewrites.get("fuse_linear_activation").capture
    'symbolic_trace'

A rewrite is a `Rewrite`: a pass over a GraphModule returning a `RewriteResult` (see `shapeprof.rewrites.base`).
`register` adds one (an instance, or a class, which is instantiated; usable as a class decorator); a second
rewrite with the same name raises.
"""
from __future__ import annotations

from .base import (CAPTURE_KEY, Match, Rewrite, RewriteContext, RewriteResult, Skip, available, get, register,
                   unregister)

__all__ = ["CAPTURE_KEY", "Match", "Rewrite", "RewriteContext", "RewriteResult", "Skip", "available", "get",
           "register", "unregister"]

# registration order is the order optimize runs them: fusion first, then packing what fusion left, then the
# cache (whose graph gets the two before it too), then its paged variant
from . import fuse_linear_activation as _fuse_linear_activation  # noqa: E402  (registers itself)
from . import prepack_linear as _prepack_linear  # noqa: E402  (registers itself)
from . import kv_cache as _kv_cache  # noqa: E402  (registers itself)
from . import paged_kv_cache as _paged_kv_cache  # noqa: E402  (registers itself)
