"""A registry of named things (rewrites, output formats): one name each, errors that list what is there.

    >>> formats = Registry("output format")
    >>> formats.add("json", object())
    >>> formats.get("pdf")
    Traceback (most recent call last):
    ...
    KeyError: "no output format named 'pdf'; registered: json"
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named items in the order they were added."""

    def __init__(self, kind: str, article: str = "a"):
        self.kind, self.article = kind, article
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> None:
        """Raises ValueError when `name` is taken (naming what holds it)."""
        if name in self._items:
            raise ValueError(f"{self.article} {self.kind} named {name!r} is already registered "
                             f"({type(self._items[name]).__qualname__})")
        self._items[name] = item

    def get(self, name: str) -> T:
        """Raises KeyError listing the registered names."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"no {self.kind} named {name!r}; registered: {', '.join(sorted(self._items)) or 'none'}") \
                from None

    def remove(self, name: str) -> T:
        item = self.get(name)
        del self._items[name]
        return item

    def __iter__(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._items.items()))

    def __contains__(self, name: str) -> bool:
        return name in self._items
