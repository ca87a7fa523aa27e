"""YAML reading and writing for configs: safe loading, YAML-1.2-style floats (``1e-5``), one-line errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from erasure.errors import ConfigError


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` and ``3E+2`` as floats (PyYAML's YAML 1.1 reads them as strings)."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)  # ConfigLoader is a SafeLoader


def load_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping; ConfigError (one line, naming the file) otherwise."""
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}{_yaml_position(err)}: invalid YAML: {_yaml_problem(err)}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping of job fields")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of job fields, got a {_yaml_type(data)}")
    bad_keys = [key for key in data if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError(f"{path}: field names must be strings, got {bad_keys[0]!r}")
    return data


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _yaml_position(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    if problem:
        return f"{problem} ({context})" if context else str(problem)
    return " ".join(str(err).split())


def _yaml_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__
    )
