"""Job configs: YAML → validated pydantic models, with ``--set`` overrides and one-line errors.

Use :func:`load_job_config` (file + overrides → :class:`JobConfig`, or :class:`ConfigError`). Every model forbids
unknown fields; ``method.params`` is validated by the chosen method's own ``Params`` model.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from erasure.base import MethodParams, Precision
from erasure.devices import check_device
from erasure.errors import ConfigError
from erasure.overrides import Override, apply_overrides, parse_override
from erasure.registry import get_method, list_methods, method_choices
from erasure.speed import SpeedConfig
from erasure.yamlfile import MAX_NESTING, dump_yaml, load_mapping, too_deep
from evaluate.registry import list_suites, suite_choices
from generators.registry import Backbone, resolve_backbone

TargetKind = Literal["style", "object", "text"]
Tier = Literal["smoke", "quick", "full"]
TARGET_GRAMMAR = "'style:<name>', 'object:<name>' or 'text:<free text>'"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_SEED = 2**32 - 1
"""The largest seed every RNG the runner seeds accepts (NumPy's legacy seeding stops at 2**32 - 1)."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Target(BaseModel):
    """A concept to erase (or an anchor to map it to), written ``kind:name`` in configs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: TargetKind
    name: str
    prompt: str
    """The text a method conditions on: ``"<name> style"`` for styles, the name for objects and free text."""

    @classmethod
    def parse(cls, spec: str) -> Target:
        kind, sep, name = spec.partition(":")
        name = name.strip()
        if not sep or kind not in get_args(TargetKind) or not name:
            raise ValueError(f"must be {TARGET_GRAMMAR}")
        prompt = f"{name} style" if kind == "style" else name
        return cls.model_construct(kind=kind, name=name, prompt=prompt)

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.name}"

    @model_validator(mode="wrap")
    @classmethod
    def _from_spec(cls, value: Any, handler: Any) -> Target:
        if isinstance(value, Target):
            return value
        if not isinstance(value, str):
            raise PydanticCustomError("target", "must be a string: " + TARGET_GRAMMAR)
        return cls.parse(value)

    @model_serializer
    def _to_spec(self) -> str:
        return self.spec


class MethodConfig(StrictModel):
    name: str
    params: SerializeAsAny[MethodParams] = Field(default_factory=dict, validate_default=True)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in list_methods():
            raise ValueError(f"must be a registered method: {method_choices()}")
        return name

    @field_validator("params", mode="plain")
    @classmethod
    def _method_params(cls, params: Any, info: ValidationInfo) -> Any:
        name = info.data.get("name")
        if name is None:  # the name is invalid and already reported
            return params
        if params is None:
            params = {}
        if not isinstance(params, (dict, MethodParams)):
            raise PydanticCustomError("params", "must be a mapping of {method} parameters", {"method": name})
        return get_method(name).Params.model_validate(params)


class EvaluateConfig(StrictModel):
    suites: list[str] = Field(default_factory=list)
    tier: Tier = "smoke"

    @field_validator("suites")
    @classmethod
    def _registered(cls, suites: list[str]) -> list[str]:
        registered = set(list_suites())
        for index, suite in enumerate(suites):
            if suite not in registered:
                raise _field_error(
                    (index,), f"must be a registered evaluation suite: {suite_choices()}", suite
                )
            if suite in suites[:index]:
                raise _field_error((index,), "is listed twice", suite)
        return suites


class JobConfig(StrictModel):
    """One erasure job. Field order matters: later validators use earlier fields (backbone before method)."""

    name: str
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True)
    device: str = "auto"
    precision: Precision = "fp32"
    backbone: str
    method: MethodConfig
    target: Target
    anchor: Target | None = None
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    checkpoint_every: int = Field(50, ge=1, strict=True)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(
                "must be a folder name of letters, digits, '.', '_' or '-', starting with a letter or digit "
                "(at most 100 characters)"
            )
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return check_device(device)

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, backbone: str) -> str:
        return resolve_backbone(backbone).spec

    @field_validator("method")
    @classmethod
    def _method_fits_backbone(cls, method: MethodConfig, info: ValidationInfo) -> MethodConfig:
        backbone = _backbone_of(info)
        if backbone is None:
            return method
        kind = get_method(method.name).backbone_kind
        if kind != backbone.kind:
            fitting = [name for name in list_methods() if get_method(name).backbone_kind == backbone.kind]
            raise _field_error(
                ("name",),
                f"method {method.name!r} works on {kind} backbones but backbone {backbone.spec!r} is {backbone.kind}; "
                f"methods for {backbone.kind} backbones: {', '.join(fitting) or '(none registered yet)'}",
                method.name,
            )
        return method

    @field_validator("target", "anchor")
    @classmethod
    def _known_concept(cls, target: Target | None, info: ValidationInfo) -> Target | None:
        backbone = _backbone_of(info)
        if target is None or backbone is None or not backbone.minicanvas or target.kind == "text":
            return target
        from generators.minicanvas.concepts import OBJECTS, STYLES

        names = STYLES if target.kind == "style" else OBJECTS
        for candidate in names:
            if candidate.lower() == target.name.lower():
                return Target.parse(f"{target.kind}:{candidate}")
        raise ValueError(
            f"{target.name!r} is not a MiniCanvas {target.kind} (backbone {backbone.spec}); "
            f"allowed: {', '.join(names)}"
        )

    @field_validator("anchor")
    @classmethod
    def _anchor_differs(cls, anchor: Target | None, info: ValidationInfo) -> Target | None:
        if anchor is not None and anchor == info.data.get("target"):
            raise ValueError("must differ from the target")
        return anchor

    def resolved_backbone(self) -> Backbone:
        return resolve_backbone(self.backbone)

    def to_yaml(self) -> str:
        return dump_yaml(self.model_dump(mode="json"))


def _backbone_of(info: ValidationInfo) -> Backbone | None:
    spec = info.data.get("backbone")
    return resolve_backbone(spec) if spec is not None else None


def _field_error(loc: tuple[str | int, ...], message: str, value: Any) -> ValidationError:
    """A ValidationError at ``loc`` below the field being validated (pydantic prefixes the field's own path)."""
    error = PydanticCustomError("value_error", "{reason}", {"reason": message})
    return ValidationError.from_exception_data(
        "JobConfig", [InitErrorDetails(type=error, loc=loc, input=value)]
    )


def load_job_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate a job config; ConfigError with one line naming file, field, value, rule."""
    path = Path(path)
    data = load_mapping(path)
    try:
        parsed = [parse_override(raw) for raw in overrides or []]
        for override in parsed:
            if too_deep([override.value], MAX_NESTING - len(override.path)):
                raise ConfigError(
                    f"--set {override.shown}: the value is nested too deeply or refers to itself"
                )
        data = apply_overrides(data, parsed)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return validate_job(data, source=str(path), overrides=parsed)


def validate_job(data: dict[str, Any], source: str, overrides: list[Override] | None = None) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, data, overrides or [])) from None
    except RecursionError:  # data that did not come through load_mapping's nesting check
        raise ConfigError(f"{source}: nested too deeply or refers to itself") from None


# ---------------------------------------------------------------------------------------------- error messages


def format_validation_error(
    err: ValidationError, source: str, data: dict[str, Any], overrides: list[Override],
    root: type[BaseModel] | None = None,
) -> str:
    """One line for the first problem: ``<source>: <field path>: got <value>; <what is allowed>``.

    ``root`` is the model that was validated (a job config unless said otherwise)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    origin = _override_for(loc, overrides)
    where = f"{source} (--set {origin.shown})" if origin else source
    line = f"{where}: {_dotted(loc) or '(top level)'}: {_describe(first, loc, data, root)}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return line.replace("\r", "\\r").replace("\n", "\\n")  # a value (a path) may hold a line break


def _describe(
    error: Any, loc: tuple[Any, ...], data: dict[str, Any], root: type[BaseModel] | None = None
) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "missing; this field is required"
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1], data, root or JobConfig)
        listing = ", ".join(allowed) if allowed else "(none)"
        return f"unknown field; allowed fields here: {listing}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        rule = f"must be {bounds[kind]} {limit}"
    elif kind == "value_error" and "error" in ctx:
        rule = str(ctx["error"])
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        rule = "must be a mapping"
    elif kind == "literal_error":
        rule = f"must be one of {ctx.get('expected', '')}"
    else:
        rule = re.sub(r"^Input should be", "must be", error["msg"])
    return f"got {_show(error.get('input'))}; {rule}"


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    else:
        text = _SHORT_REPR.repr(value)  # bounded: a YAML alias bomb must not be expanded into the message
    return text if len(text) <= 80 else text[:77] + "..."


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict, _SHORT_REPR.maxstring = 3, 8, 8, 100
_SHORT_REPR.maxother, _SHORT_REPR.maxlong = 100, 100


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _override_for(loc: tuple[Any, ...], overrides: list[Override]) -> Override | None:
    """The last override that set this field or one of its parents or children."""
    for override in reversed(overrides):
        n = min(len(loc), len(override.path))
        if tuple(str(p) for p in loc[:n]) == override.path[:n]:
            return override
    return None


def _allowed_fields(loc: tuple[Any, ...], data: dict[str, Any], root: type[BaseModel]) -> list[str]:
    model: type[BaseModel] | None = root
    node: Any = data
    for key in loc:
        if model is None:
            return []
        if model is MethodConfig and key == "params":
            name = node.get("name") if isinstance(node, dict) else None
            model = get_method(name).Params if isinstance(name, str) and name in list_methods() else None
        else:
            field = model.model_fields.get(str(key))
            model = _model_class(field.annotation) if field is not None else None
        node = node.get(key) if isinstance(node, dict) else None
    return list(model.model_fields) if model is not None else []


def _model_class(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate is not Target:
            return candidate
    return None
