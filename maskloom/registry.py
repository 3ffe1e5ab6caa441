"""Typed registries with a decorator that refuses duplicate names.

A registry maps a name to one value (a class, a config, a function). Registering the same name
twice is an error, never a silent overwrite: a value is defined once (STYLE.md principle 3).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name in a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A name -> value mapping filled by a decorator.

    >>> shapes = Registry[type]("shape")
    >>> @shapes.register("square")
    ... class Square: ...
    >>> shapes.get("square") is Square
    True
    """

    def __init__(
        self,
        kind: str,
        *,
        loader: Callable[[Registry[T]], None] | None = None,
        lazy: dict[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader  # called once, lazily, to load plug-ins (entry points)
        self._loaded = loader is None
        # name -> module that registers it when imported: built-ins are imported on first use only,
        # so a Ray worker tokenizing images never imports torch for the audio tokenizer.
        self._lazy = dict(lazy or {})

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated value under ``name``; a duplicate name raises."""

        def deco(value: T) -> T:
            self.add(name, value)
            return value

        return deco

    def add(self, name: str, value: T) -> None:
        if not name or not isinstance(name, str):
            raise RegistryError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items and self._items[name] is not value:
            raise RegistryError(f"{self.kind} {name!r} is already registered (by {self._items[name]!r})")
        self._items[name] = value

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            assert self._loader is not None
            self._loader(self)

    def get(self, name: str) -> T:
        if name not in self._items and name in self._lazy:
            importlib.import_module(self._lazy[name])
        if name not in self._items:
            self._ensure_loaded()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        if name in self._items or name in self._lazy:
            return True
        self._ensure_loaded()
        return name in self._items

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(set(self._items) | set(self._lazy))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
