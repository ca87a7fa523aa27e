"""Running evaluation suites on a subject: the one entry point the CLI, the runner and the UI share.

``run_suites`` checks every suite first (so a suite that cannot run fails before any generation), then runs them
in order and returns ``{suite: {key: value}}`` plus wall times. ``flatten`` turns that into dotted keys
(``canvas.ua``), the form the issue tracker and leaderboards quote.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from erasure.base import Precision
from erasure.errors import ConfigError
from evaluate.cache import GenerationCache
from evaluate.protocols import CanvasProtocol, MiniCanvasProtocol
from evaluate.registry import get_suite, list_suites, suite_choices
from evaluate.subject import EvalSubject
from evaluate.suite import EvalContext, Suite

if TYPE_CHECKING:
    from erasure.config import Target
    from generators.registry import Backbone


@dataclass
class EvalReport:
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def make_suites(names: Sequence[str]) -> list[Suite]:
    suites = []
    known = set(list_suites())
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown evaluation suite {name!r}; available: {suite_choices()}")
        suites.append(get_suite(name)())
    return suites


def run_suites(
    subject: EvalSubject,
    target: Target,
    suites: Sequence[str],
    tier: str = "quick",
    *,
    device: torch.device | str = "cpu",
    protocol: CanvasProtocol | None = None,
    cache: GenerationCache | None = None,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> EvalReport:
    """Run ``suites`` on ``subject`` for ``target``; ``protocol`` defaults to MiniCanvas on ``device``."""
    device = torch.device(device)
    ctx = EvalContext(
        subject=subject,
        target=target,
        tier=tier,
        device=device,
        protocol=protocol or MiniCanvasProtocol(device),
        cache=cache,
        log=log,
        seed=seed,
    )
    ctx.protocol.tier(tier)  # unknown tier -> error before any work
    instances = make_suites(suites)
    for suite in instances:
        suite.check(ctx)
    report = EvalReport()
    for suite in instances:
        start = time.perf_counter()
        values = suite.run(ctx)
        missing = [key for key in suite.keys if key not in values]
        if missing:
            raise RuntimeError(f"suite {suite.name!r} did not produce {', '.join(missing)}")
        report.results[suite.name] = {key: float(values[key]) for key in suite.keys}
        report.seconds[suite.name] = round(time.perf_counter() - start, 2)
        log(f"{suite.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in report.results[suite.name].items())
            + f" ({report.seconds[suite.name]:.1f} s)")
    if cache is not None:
        log(f"generation cache {cache.root}: {cache.hits} hits, {cache.misses} generated")
    return report


def flatten(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``{"canvas": {"ua": 1.0}}`` -> ``{"canvas.ua": 1.0}`` (nested mappings only; other values kept)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            for sub, inner in flatten(value).items():
                out[f"{key}.{sub}"] = inner
        else:
            out[key] = value
    return out


def check_suites(suites: Sequence[str], backbone: Backbone, target: Target) -> None:
    """Before an erase job starts: can ``suites`` run after it? ConfigError naming ``evaluate.suites`` if not.

    After erasure the suites run with the MiniCanvas protocol, so they need a MiniCanvas backbone and a
    ``style:``/``object:`` target; real models are evaluated with ``erasure-studio evaluate --protocol ...``.
    """
    for suite in make_suites(suites):
        where = f"evaluate.suites: {suite.name}"
        if backbone.kind not in suite.backbone_kinds:
            raise ConfigError(f"{where} runs on {'/'.join(suite.backbone_kinds)} backbones; {backbone.spec} is "
                              f"{backbone.kind}")
        if not backbone.minicanvas:
            raise ConfigError(f"{where} after erasure needs a MiniCanvas backbone (minicanvas-sd or minicanvas-gan); "
                              f"evaluate other models with `erasure-studio evaluate --protocol unlearncanvas`")
        if target.kind not in ("style", "object"):
            raise ConfigError(f"{where} needs a style:<name> or object:<name> target, got {target.spec}")


def evaluate_erasure(
    backbone: Backbone,
    changed: Mapping[str, Mapping[str, torch.Tensor]],
    target: Target,
    suites: Sequence[str],
    tier: str,
    *,
    device: torch.device,
    precision: Precision = "fp32",
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> EvalReport:
    """Evaluate a fresh copy of ``backbone`` with the erasure's ``changed`` tensors applied (what the run saved)."""
    from evaluate.subject import subject_from_weights

    subject = subject_from_weights(backbone, changed, device, precision, spec=backbone.spec)
    return run_suites(subject, target, suites, tier, device=device, cache=default_cache(), log=log, seed=seed)


def default_cache() -> GenerationCache | None:
    """The generation cache at ``$ERASURE_STUDIO_CACHE`` (``off`` disables it) or the default folder."""
    import os

    from evaluate.cache import CACHE_ENV_VAR

    if os.environ.get(CACHE_ENV_VAR, "").strip().lower() in ("off", "none", "0", "false"):
        return None
    return GenerationCache()
