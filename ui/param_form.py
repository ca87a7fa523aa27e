"""Widgets for a method's parameters, derived from its ``Params`` pydantic model, and their server-side checks.

Scalar fields become widgets: ``int``/``float`` a number with the model's bounds, ``bool`` a checkbox, a
``Literal`` or ``Enum`` a dropdown, ``str`` a textbox. Other fields (lists, nested models) keep their defaults
unless given in the "extra parameters" JSON. One integer field is the job's *budget* (its training steps):
the first of :data:`BUDGET_FIELDS` the model has.

:func:`build_params` is what every request goes through: it applies the budget, holds integer fields to the
playground's limits and validates the result with the method's own model.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from erasure.base import MethodParams
from ui.settings import Limits

BUDGET_FIELDS: tuple[str, ...] = ("iterations", "steps", "epochs", "max_steps", "num_steps")

FieldKind = Literal["int", "float", "bool", "choice", "text"]


class ParamsError(ValueError):
    """Method parameters a request may not use; the message names the field and what is allowed."""


@dataclass(frozen=True)
class FieldSpec:
    """One widget of a method's parameter form."""

    name: str
    kind: FieldKind
    default: Any
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[Any, ...] = ()


def budget_field(params_cls: type[MethodParams]) -> str | None:
    """The integer field that holds a method's number of training steps, if it has one."""
    for name in BUDGET_FIELDS:
        field = params_cls.model_fields.get(name)
        if field is not None and field.annotation is int:
            return name
    return None


def form_fields(params_cls: type[MethodParams], limits: Limits) -> list[FieldSpec]:
    """Widget specs for the scalar fields of ``params_cls`` (the budget field excluded), in declaration order."""
    budget = budget_field(params_cls)
    specs = []
    for name, field in params_cls.model_fields.items():
        if name == budget or field.is_required():
            continue
        spec = _field_spec(name, field, limits)
        if spec is not None:
            specs.append(spec)
    return specs


def default_budget(params_cls: type[MethodParams], limits: Limits) -> int | None:
    name = budget_field(params_cls)
    if name is None:
        return None
    default = params_cls.model_fields[name].get_default(call_default_factory=True)
    return min(int(default), limits.max_steps)


def build_params(
    params_cls: type[MethodParams],
    values: dict[str, Any],
    budget: int | None,
    limits: Limits,
) -> MethodParams:
    """Validated parameters from form/JSON ``values`` and the ``budget``; ParamsError naming the first problem."""
    values = dict(values)
    budget_name = budget_field(params_cls)
    if budget_name is not None and budget is not None:
        if budget_name in values and values[budget_name] != budget:
            raise ParamsError(f"{budget_name}: set it with the budget, not in the parameters")
        values[budget_name] = budget
    unknown = sorted(set(values) - set(params_cls.model_fields))
    if unknown:
        raise ParamsError(
            f"{unknown[0]}: unknown parameter; allowed: {', '.join(params_cls.model_fields) or '(none)'}"
        )
    for name, value in values.items():
        values[name] = _coerce(name, params_cls.model_fields[name], value)
    try:
        params = params_cls.model_validate(values)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "parameters"
        raise ParamsError(f"{where}: got {_show(first.get('input'))}; {first['msg']}") from None
    _check_limits(params_cls, params, budget_name, limits)
    return params


def parse_params_json(text: str, limits: Limits) -> dict[str, Any]:
    """The parameters of a request, a JSON object (empty text means none)."""
    if not isinstance(text, str):
        raise ParamsError("parameters: must be a JSON object as text")
    if len(text) > limits.max_params_chars:
        raise ParamsError(f"parameters: {len(text)} characters; at most {limits.max_params_chars} allowed")
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ParamsError(
            f"parameters: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except RecursionError:
        raise ParamsError("parameters: nested too deeply") from None
    if not isinstance(data, dict):
        raise ParamsError(f"parameters: must be a JSON object, got {type(data).__name__}")
    return data


def int_cap(field: FieldInfo, limits: Limits) -> int | None:
    """The playground's upper bound of an integer field without its own: ``int_param_factor`` × its default."""
    if _bounds(field)[1] is not None:
        return None
    default = field.get_default(call_default_factory=True)
    if not isinstance(default, int) or isinstance(default, bool):
        return None
    return max(abs(default) * limits.int_param_factor, limits.int_param_factor)


# ------------------------------------------------------------------------------------------------- internals


def _field_spec(name: str, field: FieldInfo, limits: Limits) -> FieldSpec | None:
    annotation = field.annotation
    default = field.get_default(call_default_factory=True)
    description = field.description or ""
    if get_origin(annotation) is Literal:
        return FieldSpec(name, "choice", default, description, choices=get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = tuple(member.value for member in annotation)
        shown = default.value if isinstance(default, enum.Enum) else default
        return FieldSpec(name, "choice", shown, description, choices=values)
    if annotation is bool:
        return FieldSpec(name, "bool", bool(default), description)
    if annotation in (int, float):
        low, high, low_open, high_open = _bounds(field)
        if annotation is int and high is None:
            high = int_cap(field, limits)
        return FieldSpec(
            name,
            "int" if annotation is int else "float",
            default,
            description,
            minimum=low,
            maximum=high,
            exclusive_minimum=low_open,
            exclusive_maximum=high_open,
        )
    if annotation is str:
        return FieldSpec(name, "text", default, description)
    return None


def _bounds(field: FieldInfo) -> tuple[float | None, float | None, bool, bool]:
    low: float | None = None
    high: float | None = None
    low_open = high_open = False
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = float(item.ge)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Gt):
            low, low_open = float(item.gt), True  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Le):
            high = float(item.le)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Lt):
            high, high_open = float(item.lt), True  # type: ignore[arg-type]
    return low, high, low_open, high_open


def _coerce(name: str, field: FieldInfo, value: Any) -> Any:
    """Numbers from widgets arrive as floats: ``3.0`` for an int field becomes ``3``; NaN/inf are refused."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"{name}: got {value}; must be a finite number")
    if field.annotation is int and isinstance(value, float):
        if not value.is_integer():
            raise ParamsError(f"{name}: got {value}; must be a whole number")
        return int(value)
    return value


def _check_limits(
    params_cls: type[MethodParams], params: MethodParams, budget_name: str | None, limits: Limits
) -> None:
    for name, field in params_cls.model_fields.items():
        value = getattr(params, name)
        if name == budget_name:
            if value > limits.max_steps:
                raise ParamsError(f"budget: got {value}; must be at most {limits.max_steps} steps here")
            continue
        if field.annotation is not int:
            continue
        cap = int_cap(field, limits)
        if cap is not None and value > cap:
            raise ParamsError(f"{name}: got {value}; must be at most {cap} in the playground")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
