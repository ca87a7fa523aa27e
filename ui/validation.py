"""Server-side checks of request values: every handler passes its inputs through these, whatever the widgets allow.

Each check returns the value in its proper type or raises :class:`RequestError` with one line naming the input,
the value received and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from erasure.errors import UserError


class RequestError(UserError):
    """An input a request may not use."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bounded_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name}: got {_show(value)}; must be a whole number from {low} to {high}")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise RequestError(f"{name}: got {_show(value)}; must be a whole number from {low} to {high}")
    number = int(value)
    if not low <= number <= high:
        raise RequestError(f"{name}: got {number}; must be from {low} to {high}")
    return number


def bounded_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name}: got {_show(value)}; must be a number from {low:g} to {high:g}")
    number = float(value)
    if not low <= number <= high:
        raise RequestError(f"{name}: got {number:g}; must be from {low:g} to {high:g}")
    return number


def bounded_text(name: str, value: Any, max_chars: int, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RequestError(f"{name}: got {_show(value)}; must be text")
    if len(value) > max_chars:
        raise RequestError(f"{name}: {len(value)} characters; at most {max_chars} allowed")
    if "\x00" in value:
        raise RequestError(f"{name}: must not contain NUL characters")
    text = value.strip()
    if required and not text:
        raise RequestError(f"{name}: must not be empty")
    return text


def bounded_lines(name: str, value: Any, max_lines: int, max_chars: int) -> list[str]:
    """Non-empty lines of a text input: at most ``max_lines``, each at most ``max_chars`` characters."""
    text = bounded_text(name, value, max_lines * (max_chars + 1), required=False)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > max_lines:
        raise RequestError(f"{name}: {len(lines)} lines; at most {max_lines} allowed")
    for line in lines:
        if len(line) > max_chars:
            raise RequestError(f"{name}: a line has {len(line)} characters; at most {max_chars} allowed")
    return lines


def choices(name: str, value: Any, allowed: list[str], max_count: int) -> list[str]:
    """A multi-select value: a list of distinct allowed names, at most ``max_count``."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RequestError(f"{name}: got {_show(value)}; must be a list of names")
    if len(value) > max_count:
        raise RequestError(f"{name}: {len(value)} chosen; at most {max_count} allowed")
    for item in value:
        if item not in allowed:
            raise RequestError(f"{name}: got {_show(item)}; allowed: {', '.join(allowed)}")
    return list(dict.fromkeys(value))
