"""``--set dotted.path=value`` overrides of config fields.

Values are read as YAML scalars or flow collections: ``seed=3`` is an int, ``method.params.lr=1e-5`` a float,
``evaluate.suites=[canvas,hub]`` a list, ``anchor=null`` null, ``target=style:Ember`` a string. A value that is
not a flow collection and does not read as a YAML scalar (``target=text:a cat: sitting``) is taken as the
plain string it is. Lists are replaced as a whole; missing intermediate mappings are created.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml

from erasure.errors import ConfigError
from erasure.yamlfile import parse_yaml

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Override:
    path: tuple[str, ...]
    value: Any
    raw: str

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def shown(self) -> str:
        return shown(self.raw)


def shown(raw: str, limit: int = 120) -> str:
    """An override as error messages quote it: on one line (control characters escaped), at most ``limit`` long."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_override(raw: str) -> Override:
    """Parse one ``dotted.path=value``; ConfigError for a missing ``=``, a bad path or a bad flow collection."""
    key, sep, text = raw.partition("=")
    if not sep:
        raise ConfigError(f"--set {shown(raw)}: expected dotted.path=value (e.g. --set seed=3)")
    path = tuple(key.strip().split("."))
    bad = [part for part in path if not _KEY.fullmatch(part)]
    if bad:
        raise ConfigError(
            f"--set {shown(raw)}: bad field path {shown(repr(key.strip()))}; use dot-separated field names like "
            "method.params.lr"
        )
    return Override(path=path, value=_parse_value(raw, text.strip()), raw=raw)


def _parse_value(raw: str, text: str) -> Any:
    is_flow = text.startswith(("[", "{"))
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as err:
        if is_flow:
            problem = getattr(err, "problem", None) or " ".join(str(err).split())
            raise ConfigError(f"--set {shown(raw)}: invalid YAML value: {shown(problem, 300)}") from None
        return text
    if isinstance(value, (dict, list)) and not is_flow:
        return text
    return value


def apply_overrides(data: dict[str, Any], overrides: list[Override]) -> dict[str, Any]:
    """A deep copy of ``data`` with the overrides applied in order.

    Changing ``method.name`` to another method drops the params written for the old method (they belong to
    it); ``method.params.*`` overrides still apply, whatever their order.
    """
    result = copy.deepcopy(data)
    if _changes_method(result, overrides):
        method = result.get("method")
        if isinstance(method, dict):
            method.pop("params", None)
    for override in overrides:
        _set(result, override)
    return result


def _changes_method(data: dict[str, Any], overrides: list[Override]) -> bool:
    method = data.get("method")
    current = method.get("name") if isinstance(method, dict) else None
    return any(o.path == ("method", "name") and o.value != current for o in overrides)


def _set(data: dict[str, Any], override: Override) -> None:
    node: Any = data
    for depth, key in enumerate(override.path[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            parent = ".".join(override.path[: depth + 1])
            raise ConfigError(
                f"--set {override.shown}: cannot set {shown(override.dotted)}: {shown(parent)} is "
                f"{shown(repr(child), 80)}, not a mapping"
            )
        node = child
    node[override.path[-1]] = copy.deepcopy(override.value)
