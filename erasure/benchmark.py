"""Benchmark configs: backbones × methods (each with a parameter grid) × targets × seeds → one job per cell.

A benchmark config is YAML validated by :class:`BenchmarkConfig` (unknown fields are errors, like job configs)::

    name: minicanvas-smoke
    backbones: [minicanvas-sd]
    methods:
      - name: esd
        params: {iterations: 20}          # fixed parameters of every cell of this method
        grid: {lr: [1.0e-4, 2.0e-4]}      # cartesian product of these values, merged over params
    targets: [style:Ember]
    seeds: [0]
    evaluate: {suites: [canvas], tier: smoke}

:func:`load_benchmark` expands it into :class:`Cell` objects. Each cell is an ordinary, fully validated
:class:`~erasure.config.JobConfig` whose ``name`` (its run folder) is ``<method>-<target>-s<seed>-<hash8>``, where
``hash8`` hashes the resolved job config (every default filled in) without the fields that do not change what
the job computes (``name``, ``device``, ``checkpoint_every``). Cells whose method is for another kind of
backbone (a GAN method on an SD backbone) are left out; a method that fits none of the backbones is an error.
Every cell is validated before any work starts, and a problem is reported on one line with its place in the
benchmark file (``methods[1].grid.lr``, ``targets[2]``…), exit code 2.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from erasure.base import Precision
from erasure.config import (  # _describe: the job configs' wording
    MAX_SEED,
    EvaluateConfig,
    JobConfig,
    Target,
    _describe,
)
from erasure.devices import check_device
from erasure.errors import ConfigError
from erasure.overrides import Override, apply_overrides, parse_override
from erasure.registry import get_method, list_methods, method_choices
from erasure.yamlfile import dump_yaml, load_mapping
from generators.registry import resolve_backbone

HASH_EXCLUDED_FIELDS = frozenset({"name", "device", "checkpoint_every"})
"""Job fields left out of a cell's hash: they do not change what the job computes."""

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class _ItemError(ValueError):
    """A problem with item ``index`` of a list field (pydantic reports validator errors at the list itself)."""

    def __init__(self, index: int, message: str, value: Any) -> None:
        super().__init__(message)
        self.index = index
        self.value = value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodEntry(_Strict):
    """One method of a benchmark: fixed ``params`` and a ``grid`` of values to sweep (cartesian product)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in list_methods():
            raise ValueError(f"must be a registered method: {method_choices()}")
        return name

    @field_validator("params", mode="before")
    @classmethod
    def _params_mapping(cls, params: Any) -> Any:
        return {} if params is None else params

    @field_validator("grid")
    @classmethod
    def _non_empty_lists(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} is an empty list; give at least one value")
        return grid

    def grid_points(self) -> list[dict[str, Any]]:
        """The merged params of every grid point, in the order the grid lists them (one point if no grid)."""
        keys = list(self.grid)
        return [
            {**self.params, **dict(zip(keys, values, strict=True))}
            for values in itertools.product(*(self.grid[key] for key in keys))
        ]


class BenchmarkConfig(_Strict):
    """A whole benchmark; see the module docstring. Field order matters for error messages only."""

    name: str
    backbones: list[str] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    targets: list[str] = Field(min_length=1)
    anchor: str | None = None
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]] = Field(
        default_factory=lambda: [0], min_length=1
    )
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    device: str = "auto"
    precision: Precision = "fp32"
    checkpoint_every: int = Field(50, ge=1, strict=True)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError("must be letters, digits, '.', '_' or '-', starting with a letter or digit")
        return name

    @field_validator("backbones")
    @classmethod
    def _resolvable(cls, backbones: list[str]) -> list[str]:
        for index, spec in enumerate(backbones):
            try:
                resolve_backbone(spec)
            except ValueError as err:
                raise _ItemError(index, str(err), spec) from None
            if spec in backbones[:index]:
                raise _ItemError(index, "is listed twice", spec)
        return backbones

    @field_validator("targets")
    @classmethod
    def _parsable(cls, targets: list[str]) -> list[str]:
        for index, spec in enumerate(targets):
            try:
                Target.parse(spec)
            except ValueError as err:
                raise _ItemError(index, str(err), spec) from None
            if spec in targets[:index]:
                raise _ItemError(index, "is listed twice", spec)
        return targets

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        for index, seed in enumerate(seeds):
            if seed in seeds[:index]:
                raise _ItemError(index, "is listed twice", seed)
        return seeds

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return check_device(device)


@dataclass(frozen=True)
class Cell:
    """One job of a benchmark; ``job.name`` is its run folder name."""

    job: JobConfig
    key: str
    """sha256 of the resolved job config without :data:`HASH_EXCLUDED_FIELDS`."""

    @property
    def name(self) -> str:
        return self.job.name


@dataclass(frozen=True)
class Benchmark:
    config: BenchmarkConfig
    cells: list[Cell]
    source: str

    def to_yaml(self) -> str:
        return dump_yaml(self.config.model_dump(mode="json"))


# ----------------------------------------------------------------------------------------------- loading


def load_benchmark(path: str | Path, overrides: list[str] | None = None) -> Benchmark:
    """Read, override, validate and expand a benchmark config; ConfigError (one line, exit 2) on any problem."""
    path = Path(path)
    data = load_mapping(path)
    try:
        parsed = [parse_override(raw) for raw in overrides or []]
        data = apply_overrides(data, parsed)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    try:
        config = BenchmarkConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_benchmark_error(err, str(path), parsed)) from None
    return Benchmark(config=config, cells=expand_cells(config, str(path), parsed), source=str(path))


def expand_cells(config: BenchmarkConfig, source: str, overrides: list[Override] | None = None) -> list[Cell]:
    """Every cell of the benchmark (backbone-major order), each validated as a job config."""
    _check_every_entry_fits_a_backbone(config, source)
    cells: list[Cell] = []
    seen: dict[str, tuple[int, ...]] = {}
    for b_index, backbone in enumerate(config.backbones):
        kind = resolve_backbone(backbone).kind
        suites = suites_for_kind(config.evaluate.suites, kind)
        for m_index, entry in enumerate(config.methods):
            if get_method(entry.name).backbone_kind != kind:
                continue
            for params in entry.grid_points():
                for t_index, target in enumerate(config.targets):
                    for s_index, seed in enumerate(config.seeds):
                        where = (b_index, m_index, t_index, s_index)
                        job_data = _job_data(config, backbone, entry.name, params, target, seed, suites)
                        cell = _make_cell(job_data, where, config, source, overrides or [])
                        if cell.name in seen:
                            raise ConfigError(
                                f"{source}: methods[{m_index}]: two cells resolve to the same job "
                                f"{cell.name} (a grid or params value that the method normalises to the same "
                                "setting?); remove the duplicate"
                            )
                        seen[cell.name] = where
                        cells.append(cell)
    return cells


def suites_for_kind(suites: list[str], kind: str) -> list[str]:
    """The evaluation suites that run on backbones of ``kind`` (a suite without ``backbone_kinds`` runs on all)."""
    from evaluate.registry import get_suite

    return [suite for suite in suites if kind in getattr(get_suite(suite), "backbone_kinds", (kind,))]


def _check_every_entry_fits_a_backbone(config: BenchmarkConfig, source: str) -> None:
    """ConfigError for a method or an evaluation suite that runs on none of the benchmark's backbones."""
    kinds = {resolve_backbone(backbone).kind for backbone in config.backbones}
    listing = ", ".join(config.backbones)
    for index, entry in enumerate(config.methods):
        kind = get_method(entry.name).backbone_kind
        if kind not in kinds:
            raise ConfigError(
                f"{source}: methods[{index}].name: got {entry.name!r}; it works on {kind} backbones and none "
                f"of the backbones ({listing}) is one"
            )
    for index, suite in enumerate(config.evaluate.suites):
        if not any(suites_for_kind([suite], kind) for kind in kinds):
            raise ConfigError(
                f"{source}: evaluate.suites[{index}]: got {suite!r}; it runs on none of the backbones ({listing})"
            )


def _job_data(
    config: BenchmarkConfig,
    backbone: str,
    method: str,
    params: dict[str, Any],
    target: str,
    seed: int,
    suites: list[str],
) -> dict[str, Any]:
    return {
        "name": "cell",  # replaced by the hashed name below
        "seed": seed,
        "device": config.device,
        "precision": config.precision,
        "backbone": backbone,
        "method": {"name": method, "params": params},
        "target": target,
        "anchor": config.anchor,
        "evaluate": {"suites": suites, "tier": config.evaluate.tier},
        "checkpoint_every": config.checkpoint_every,
    }


def _make_cell(
    job_data: dict[str, Any],
    where: tuple[int, int, int, int],
    config: BenchmarkConfig,
    source: str,
    overrides: list[Override],
) -> Cell:
    try:
        job = JobConfig.model_validate(job_data)
    except ValidationError as err:
        raise ConfigError(_format_cell_error(err, job_data, where, config, source, overrides)) from None
    if job.evaluate.suites:
        from evaluate.api import check_suites

        try:
            check_suites(job.evaluate.suites, job.resolved_backbone(), job.target)
        except ConfigError as err:
            where_ = _where(source, ("evaluate", "suites"), overrides)
            raise ConfigError(f"{where_}: {err} ({_cell_label(where, config)})") from None
    key = cell_key(job)
    name = cell_name(job, key)
    return Cell(job=job.model_copy(update={"name": name}), key=key)


def cell_key(job: JobConfig) -> str:
    """sha256 (hex) of the job's resolved config, without the fields in :data:`HASH_EXCLUDED_FIELDS`."""
    resolved = job.model_dump(mode="json", exclude=set(HASH_EXCLUDED_FIELDS))
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode("utf-8")).hexdigest()


def cell_name(job: JobConfig, key: str) -> str:
    """``<method>-<target name>-s<seed>-<first 8 hex digits of the key>``, a safe folder name."""
    target = _SLUG_UNSAFE.sub("_", job.target.name).strip("_.-")[:40] or job.target.kind
    return f"{job.method.name}-{target}-s{job.seed}-{key[:8]}"


# -------------------------------------------------------------------------------------------- error messages


def _format_benchmark_error(err: ValidationError, source: str, overrides: list[Override]) -> str:
    first = err.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _ItemError):
        loc = (*loc, cause.index)
        detail = f"got {_show(cause.value)}; {cause}"
    elif first["type"] == "extra_forbidden":
        detail = f"unknown field; allowed fields here: {', '.join(_benchmark_fields(loc[:-1]))}"
    else:
        detail = _describe(first, loc, {})
    more = len(err.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{_where(source, loc, overrides)}: {_dotted(loc) or '(top level)'}: {detail}{suffix}"


def _format_cell_error(
    err: ValidationError,
    job_data: dict[str, Any],
    where: tuple[int, int, int, int],
    config: BenchmarkConfig,
    source: str,
    overrides: list[Override],
) -> str:
    """The first problem of one cell's job config, placed at the benchmark field it comes from."""
    first = err.errors(include_url=False)[0]
    job_loc = tuple(first["loc"])
    loc = _benchmark_loc(job_loc, where, config)
    detail = _describe(first, job_loc, job_data)
    return f"{_where(source, loc, overrides)}: {_dotted(loc)}: {detail} ({_cell_label(where, config)})"


def _cell_label(where: tuple[int, int, int, int], config: BenchmarkConfig) -> str:
    b_index, m_index, t_index, s_index = where
    return (
        f"cell {config.methods[m_index].name} × {config.targets[t_index]} × seed {config.seeds[s_index]}"
        f" on {config.backbones[b_index]}"
    )


def _benchmark_loc(
    job_loc: tuple[Any, ...], where: tuple[int, int, int, int], config: BenchmarkConfig
) -> tuple[Any, ...]:
    """Map a job-config field path to the benchmark-config field it was made from."""
    b_index, m_index, t_index, s_index = where
    head, rest = (job_loc[0], job_loc[1:]) if job_loc else ("", ())
    if head == "method":
        if rest[:1] == ("params",) and len(rest) > 1:
            part = "grid" if rest[1] in config.methods[m_index].grid else "params"
            return ("methods", m_index, part, *rest[1:])
        return ("methods", m_index, *(rest[:1] or ("name",)))
    mapping: dict[str, tuple[Any, ...]] = {
        "backbone": ("backbones", b_index),
        "target": ("targets", t_index),
        "seed": ("seeds", s_index),
    }
    return mapping.get(head, job_loc)


def _benchmark_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = BenchmarkConfig
    for key in loc:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(str(key))
        annotation = field.annotation if field is not None else None
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _where(source: str, loc: tuple[Any, ...], overrides: list[Override]) -> str:
    """``source``, plus the ``--set`` that wrote the field (or one of its parents or children), if any."""
    for override in reversed(overrides):
        n = min(len(loc), len(override.path))
        if tuple(str(part) for part in loc[:n]) == override.path[:n]:
            return f"{source} (--set {override.shown})"
    return source


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
