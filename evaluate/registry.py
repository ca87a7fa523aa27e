"""Registry of evaluation suites (``canvas``, ``hub``, ``gan``… as they are written).

A suite is a class with the class attributes ``name`` (lowercase identifier) and ``description`` (one line),
registered with ``@register_suite`` in its own module under ``evaluate/suites/``. Job configs accept only
registered suite names in ``evaluate.suites``.
"""

from __future__ import annotations

from typing import TypeVar

from erasure.registry import Registry, describe_choices

S = TypeVar("S", bound=type)

_SUITES: Registry[type] = Registry("evaluation suite", discover_package="evaluate.suites")


def register_suite(cls: S) -> S:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise TypeError(f"{cls.__qualname__}: suites need a lowercase identifier `name`, got {name!r}")
    description = getattr(cls, "description", None)
    if not isinstance(description, str) or not description.strip():
        raise TypeError(f"{cls.__qualname__}: suites need a one-line `description`")
    _SUITES.add(name, cls)
    return cls


def unregister_suite(name: str) -> None:
    _SUITES.remove(name)


def list_suites() -> list[str]:
    return _SUITES.names()


def get_suite(name: str) -> type:
    return _SUITES.get(name)


def suite_choices() -> str:
    return describe_choices(list_suites(), "evaluation suite")
