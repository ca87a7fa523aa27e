"""An "Erase" request → a validated :class:`~erasure.config.JobConfig` and the run folder it will write.

Everything is checked here, on the server, before a job starts: the backbone is one of the offered choices, the
method is registered and fits it, the parameters pass the method's own model and the playground's limits, the
target is a concept the backbone knows (or bounded free text), and budget and seed are in range. The job is the
same kind a YAML config describes, so the run folder is an ordinary one.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from erasure.config import JobConfig, Target, validate_job
from erasure.errors import ConfigError
from erasure.registry import get_method, list_methods
from ui.backbones import BackboneChoiceError, resolve_choice
from ui.param_form import ParamsError, budget_field, build_params, parse_params_json
from ui.settings import UISettings
from ui.validation import RequestError, bounded_int, bounded_text


@dataclass(frozen=True)
class JobRequest:
    job: JobConfig
    dest: Path


def build_job_request(
    settings: UISettings,
    backbone: object,
    method: object,
    params_json: object,
    target: object,
    budget: object,
    seed: object,
) -> JobRequest:
    """The job an Erase request asks for; RequestError naming the first input that is not allowed."""
    limits = settings.limits
    try:
        choice = resolve_choice(backbone, settings.models_dir)
    except BackboneChoiceError as err:
        raise RequestError(str(err)) from None
    if not choice.available:
        raise RequestError(
            f"backbone {choice.label}: its files are not built yet ({choice.path}); "
            "run `erasure-studio world build` first"
        )
    method_name = _method(method, choice.kind)
    params_cls = get_method(method_name).Params
    if budget_field(params_cls) is not None:
        steps: int | None = bounded_int("budget", budget, 1, limits.max_steps)
    else:
        steps = None  # closed-form methods have no training steps: the budget does not apply
    try:
        values = parse_params_json(params_json, limits)
        params = build_params(params_cls, values, steps, limits)
    except ParamsError as err:
        raise RequestError(f"method.params.{err}") from None
    target_spec = bounded_text("target", target, limits.max_prompt_chars + len("style:"))
    try:
        parsed = Target.parse(target_spec)
    except ValueError as err:
        raise RequestError(f"target: got {target_spec!r}; {err}") from None
    seed_value = bounded_int("seed", seed, 0, limits.max_seed)
    name = run_name(method_name, parsed)
    data = {
        "name": name,
        "seed": seed_value,
        "device": settings.device,
        "backbone": choice.spec,
        "method": {"name": method_name, "params": params.model_dump(mode="json")},
        "target": parsed.spec,
    }
    try:
        job = validate_job(data, source="request")
    except ConfigError as err:
        raise RequestError(str(err).removeprefix("request: ")) from None
    return JobRequest(job=job, dest=settings.runs_dir / name)


def methods_for(kind: str) -> list[str]:
    """Registered methods that work on backbones of ``kind`` (``sd`` or ``gan``)."""
    return [name for name in list_methods() if get_method(name).backbone_kind == kind]


def run_name(method: str, target: Target) -> str:
    """A fresh run folder name: ``<method>-<kind>-<name>-<date>-<time>-<random>`` (letters, digits, - and _)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", target.name).strip("-")[:32] or "concept"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{method}-{target.kind}-{slug}-{stamp}-{secrets.token_hex(3)}"


def _method(method: object, kind: str) -> str:
    fitting = methods_for(kind)
    if not isinstance(method, str) or method not in list_methods():
        raise RequestError(
            f"method: got {method!r}; must be one of {', '.join(fitting) or '(none registered)'}"
        )
    if method not in fitting:
        raise RequestError(
            f"method: {method!r} works on {get_method(method).backbone_kind} backbones, this backbone is {kind}; "
            f"choose one of {', '.join(fitting) or '(none registered)'}"
        )
    return method
