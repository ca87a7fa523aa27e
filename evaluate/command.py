"""``erasure-studio evaluate``: resolve what to evaluate, with which suites, tier, target and protocol, and run it.

SOURCE (or ``--model``) is a backbone (``minicanvas-sd``, ``minicanvas-gan``, a diffusers folder, a StyleGAN2
checkpoint), a finished run folder (its base backbone with its weights applied; its target by default), or a job
config (its backbone, target, suites, tier and device by default; ``--set`` overrides apply to it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasure.errors import ConfigError, UserError

PROTOCOLS = ("minicanvas", "unlearncanvas")


@dataclass
class EvaluateOptions:
    source: str | None = None
    model: str | None = None
    suites: list[str] = field(default_factory=list)
    tier: str | None = None
    target: str | None = None
    device: str | None = None
    protocol: str = "minicanvas"
    overrides: list[str] = field(default_factory=list)
    cache_dir: Path | None = None
    no_cache: bool = False
    style_classifier: Path | None = None
    object_classifier: Path | None = None
    inception_weights: Path | None = None
    real_images: Path | None = None
    clip: Path | None = None


@dataclass
class _Plan:
    model: str
    suites: list[str]
    tier: str
    target: str | None
    device: str
    precision: str | None


def _plan(opts: EvaluateOptions) -> _Plan:
    if (opts.source is None) == (opts.model is None):
        raise ConfigError("name what to evaluate: a SOURCE argument or --model (not both)")
    source = opts.source or opts.model or ""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        from erasure.config import load_job_config

        job = load_job_config(path, opts.overrides)
        return _Plan(job.backbone, opts.suites or list(job.evaluate.suites), opts.tier or job.evaluate.tier,
                     opts.target or job.target.spec, opts.device or job.device, job.precision)
    if opts.overrides:
        raise ConfigError("--set applies to a job config SOURCE (a .yaml file); use --suite/--tier/--target here")
    target, suites = opts.target, list(opts.suites)
    if path.is_dir() and (path / "config.resolved.yaml").is_file():
        from erasure.runs import read_run_config

        config = read_run_config(path)
        target = target or (str(config["target"]) if config.get("target") else None)
        evaluate = config.get("evaluate") if isinstance(config.get("evaluate"), dict) else {}
        suites = suites or list(evaluate.get("suites") or [])
    return _Plan(source, suites, opts.tier or "quick", target, opts.device or "auto", None)


def _target(spec: str | None, protocol: Any) -> Any:
    from erasure.config import Target

    if spec is None:
        raise ConfigError("--target: missing; name the concept the model should no longer show (style:<name> or "
                          "object:<name>)")
    try:
        target = Target.parse(spec)
    except ValueError as err:
        raise ConfigError(f"--target: got {spec!r}; {err}") from None
    if target.kind == "text":
        raise ConfigError(f"--target: got {spec!r}; the suites judge style:<name> or object:<name> targets")
    names = protocol.styles if target.kind == "style" else protocol.objects
    for name in names:
        if name.lower() == target.name.lower():
            return Target.parse(f"{target.kind}:{name}")
    raise ConfigError(f"--target: got {spec!r}; not a {target.kind} of the {protocol.name} protocol; "
                      f"allowed: {', '.join(names)}")


def _protocol(opts: EvaluateOptions, device: Any) -> Any:
    from evaluate.protocols import MiniCanvasProtocol, UnlearnCanvasAssets, UnlearnCanvasProtocol

    if opts.protocol == "minicanvas":
        return MiniCanvasProtocol(device)
    if opts.protocol == "unlearncanvas":
        assets = UnlearnCanvasAssets(opts.style_classifier, opts.object_classifier, opts.inception_weights,
                                     opts.real_images, opts.clip)
        return UnlearnCanvasProtocol(assets, device)
    raise ConfigError(f"--protocol: got {opts.protocol!r}; must be one of {', '.join(PROTOCOLS)}")


def run_evaluate(opts: EvaluateOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate and return the report: ``{"model", "target", "protocol", "tier", "seconds", <suite>: {...}}``."""
    from erasure.devices import check_device, resolve_device
    from evaluate.api import default_cache, make_suites, run_suites
    from evaluate.cache import GenerationCache
    from evaluate.protocols import TIERS
    from evaluate.subject import load_subject

    plan = _plan(opts)
    if not plan.suites:
        raise ConfigError("--suite: name at least one evaluation suite (repeatable), e.g. --suite canvas")
    make_suites(plan.suites)
    if plan.tier not in TIERS:
        raise ConfigError(f"--tier: got {plan.tier!r}; must be one of {', '.join(TIERS)}")
    try:
        check_device(plan.device)
    except ValueError as err:
        raise ConfigError(f"--device: got {plan.device!r}; {err}") from None
    device = resolve_device(plan.device)
    protocol = _protocol(opts, device)
    target = _target(plan.target, protocol)
    cache = None if opts.no_cache else GenerationCache(opts.cache_dir) if opts.cache_dir else default_cache()

    start = time.perf_counter()
    subject = load_subject(plan.model, device, plan.precision)  # type: ignore[arg-type]
    log(f"evaluating {subject.spec} ({subject.kind}) for {target.spec}: {', '.join(plan.suites)} "
        f"({plan.tier} tier, {protocol.name} protocol, {device})")
    report = run_suites(subject, target, plan.suites, plan.tier, device=device, protocol=protocol, cache=cache,
                        log=log)
    seconds = {**report.seconds, "total": round(time.perf_counter() - start, 2)}
    return {"model": subject.spec, "target": target.spec, "protocol": protocol.name, "tier": plan.tier,
            "device": str(device), "seconds": seconds, **report.results}


def check_output_paths(json_file: Path | None, out: Path | None) -> None:
    """Fail before any work if an output location cannot be written."""
    if json_file is not None and json_file.is_dir():
        raise UserError(f"--json {json_file}: is a folder")
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
