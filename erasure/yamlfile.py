"""YAML reading and writing for configs: safe loading, YAML-1.2-style floats (``1e-5``), one-line errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from erasure.errors import ConfigError


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` and ``3E+2`` as floats (PyYAML's YAML 1.1 reads them as strings) and
    refuses a mapping that repeats a key (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` may be overridden, by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]


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


MAX_NESTING = 32
"""Deepest nesting of mappings and lists a config may have (real ones have 4 or 5 levels)."""


def parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=ConfigLoader)  # ConfigLoader is a SafeLoader
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        raise yaml.YAMLError(
            f"nested too deeply (at most {MAX_NESTING} levels of mappings and lists)"
        ) from None


def too_deep(data: Any, limit: int = MAX_NESTING) -> bool:
    """Whether mappings/lists in ``data`` nest more than ``limit`` levels, or contain themselves (a YAML alias
    cycle such as ``a: &x [*x]``). Iterative, and linear in the number of distinct containers, so neither deep
    nesting nor an alias bomb (shared sub-lists, exponentially many paths) can exhaust the stack or the CPU."""
    depth_of: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = [
            c for c in (node.values() if isinstance(node, dict) else node) if isinstance(c, (dict, list))
        ]
        if finished:
            on_path.discard(key)
            depth_of[key] = 1 + max((depth_of[id(c)] for c in children), default=0)
            if depth_of[key] > limit:
                return True
            continue
        if key in depth_of:
            continue
        if key in on_path:
            return True
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in depth_of)
    return False


def load_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping; ConfigError (one line, naming the file) otherwise."""
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as err:  # e.g. a name longer than the filesystem allows
        raise ConfigError(f"{_short(path)}: cannot read: {err.strerror or err}") from None
    if not exists:
        raise ConfigError(f"{path}: no such file")
    if not is_file:
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
    if too_deep(data):
        raise ConfigError(
            f"{path}: nested too deeply or refers to itself (more than {MAX_NESTING} levels of mappings and lists)"
        )
    bad_keys = [key for key in data if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError(f"{path}: field names must be strings, got {bad_keys[0]!r}")
    return data


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 120 else text[:117] + "..."


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
