"""Registry of erasure methods (timm-style): ``@register_method`` on a class, ``list_methods()``, ``get_method()``.

Methods live one per file in ``erasure/methods/<name>.py``. Every module of that package is imported the first
time the registry is queried, so adding a method means writing one file that declares its ``Params`` model and
decorates its class with ``@register_method``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Generic, TypeVar

from erasure.base import BACKBONE_KINDS, ErasureMethod, MethodParams

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Lookup of a name that is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def describe_choices(names: Iterable[str], kind: str) -> str:
    names = sorted(names)
    return ", ".join(names) if names else f"(no {kind}s are registered yet)"


class Registry(Generic[T]):
    """A name → entry mapping whose modules are discovered lazily by importing a package's submodules."""

    def __init__(self, kind: str, discover_package: str | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._discover_package = discover_package
        self._discovered = False

    def add(self, name: str, entry: T) -> None:
        existing = self._entries.get(name)
        if existing is not None and existing is not entry and _qualname(existing) != _qualname(entry):
            raise ValueError(f"{self.kind} {name!r} is already registered by {_qualname(existing)}")
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        self._discover()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; available: {describe_choices(self._entries, self.kind)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def _discover(self) -> None:
        if self._discovered or self._discover_package is None:
            return
        self._discovered = True
        package = importlib.import_module(self._discover_package)
        for info in pkgutil.iter_modules(package.__path__, prefix=f"{package.__name__}."):
            importlib.import_module(info.name)


def _qualname(entry: object) -> str:
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', repr(entry))}"


_METHODS: Registry[type[ErasureMethod]] = Registry("method", discover_package="erasure.methods")

M = TypeVar("M", bound=type[ErasureMethod])


def register_method(cls: M) -> M:
    """Class decorator: check the method's declared contract and register it under ``cls.name``."""
    for attr in ("name", "backbone_kind", "description", "Params"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__qualname__}: erasure methods must define the class attribute {attr!r}")
    if not isinstance(cls.name, str) or not cls.name.isidentifier() or cls.name != cls.name.lower():
        raise TypeError(f"{cls.__qualname__}: name must be a lowercase identifier, got {cls.name!r}")
    if cls.backbone_kind not in BACKBONE_KINDS:
        raise TypeError(
            f"{cls.__qualname__}: backbone_kind must be one of {BACKBONE_KINDS}, got {cls.backbone_kind!r}"
        )
    if not isinstance(cls.description, str) or not cls.description.strip() or "\n" in cls.description.strip():
        raise TypeError(f"{cls.__qualname__}: description must be one non-empty line")
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, MethodParams)):
        raise TypeError(f"{cls.__qualname__}: Params must subclass erasure.base.MethodParams")
    if cls.Params.model_config.get("extra") != "forbid":
        raise TypeError(f"{cls.__qualname__}: Params must keep model_config extra='forbid'")
    _METHODS.add(cls.name, cls)
    return cls


def unregister_method(name: str) -> None:
    """Remove a method (for tests and plugins that register temporary methods)."""
    _METHODS.remove(name)


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return _METHODS.names()


def get_method(name: str) -> type[ErasureMethod]:
    """The method class registered under ``name``; UnknownNameError (listing available names) otherwise."""
    return _METHODS.get(name)


def method_choices() -> str:
    return describe_choices(list_methods(), "method")
