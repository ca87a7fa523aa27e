"""``erasure-studio erase``: run one validated job into a run folder (see :mod:`erasure.runs`)."""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasure.base import ErasureResult, RunContext
from erasure.config import JobConfig
from erasure.devices import resolve_device
from erasure.envinfo import collect_env
from erasure.errors import UserError
from erasure.registry import get_method
from erasure.runs import RunWriter, check_destination, checkpoint_dir_for
from erasure.speed import apply_to_backbone, autocast
from evaluate.api import check_suites, evaluate_erasure
from evaluate.efficiency import Efficiency, folder_mb, measure_erasure
from generators.loading import backbone_components, check_available, load_backbone

Echo = Callable[[str], None]
ProgressHook = Callable[[int, int, dict[str, float]], None]
"""``hook(step, total, scalars)``: called on every progress report of the method (e.g. to show live progress)."""


class JobCancelled(UserError):
    """The job's ``cancel`` event was set; the run's partial folder and checkpoints were removed."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_erase(
    job: JobConfig,
    dest: Path,
    *,
    overwrite: bool = False,
    echo: Echo = print,
    on_progress: ProgressHook | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Erase ``job.target`` with ``job.method`` and write the run to ``dest``; returns the finished folder.

    Everything that can be checked is checked first, loading the backbone included, so a job that cannot run
    (bad config, missing or unloadable model, occupied destination) creates no folder at all. ``cancel`` (set
    from another thread) stops the job at its next progress report (or phase boundary) with
    :class:`JobCancelled`, leaving neither a partial run folder nor checkpoints.
    """
    try:
        return _run_erase(job, dest, overwrite, echo, on_progress, cancel)
    except JobCancelled:
        shutil.rmtree(checkpoint_dir_for(dest), ignore_errors=True)
        raise


def _run_erase(
    job: JobConfig,
    dest: Path,
    overwrite: bool,
    echo: Echo,
    on_progress: ProgressHook | None,
    cancel: threading.Event | None,
) -> Path:
    method_cls = get_method(job.method.name)
    backbone = job.resolved_backbone()
    check_available(backbone)
    if job.evaluate.suites:
        check_suites(job.evaluate.suites, backbone, job.target)
    check_destination(dest, overwrite)
    device = resolve_device(job.device)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    seed_everything(job.seed)
    _check_cancel(cancel)
    with _timed(timings, "load"):
        model = load_backbone(backbone, device, job.precision)
        apply_to_backbone(model, job.speed)
    _check_cancel(cancel)

    with RunWriter.open(dest, overwrite) as run:
        run.write_config(job)
        run.log(f"job {job.name}: {job.method.name} erases {job.target.spec} from {job.backbone} on {device}")
        ctx = RunContext(
            seed=job.seed,
            device=device,
            precision=job.precision,
            checkpoint_dir=run.checkpoint_dir,
            checkpoint_every=job.checkpoint_every,
            progress=ProgressReporter(run.log, echo, hook=on_progress, cancel=cancel),
            log=run.log,
            anchor=job.anchor,
            speed=job.speed,
            backbone_path=backbone.path,
        )
        efficiency = Efficiency()
        with _timed(timings, "erase"), measure_erasure(device, efficiency), autocast(job.speed, device):
            result = method_cls().erase(model, job.target, job.method.params, ctx)
        _check_cancel(cancel)
        components = backbone_components(model)
        _check_result(job.method.name, result, components)
        for component, tensors in result.changed.items():
            full = set(tensors) == set(components[component].state_dict())
            run.save_weights(component, tensors, full=full)
        run.log(
            f"saved {sum(len(t) for t in result.changed.values())} changed tensors in {list(result.changed)}"
        )
        efficiency.storage_mb = folder_mb(run.weights_dir)
        method_metrics, own = method_sections(job.method.name, result.metrics, reserved=job.evaluate.suites)
        metrics: dict[str, Any] = {"method": method_metrics, **own, "efficiency": efficiency.as_dict()}
        if job.evaluate.suites:
            del model, components  # the suites evaluate a fresh copy with the saved tensors applied
            with _timed(timings, "evaluate"):
                report = evaluate_erasure(
                    backbone,
                    result.changed,
                    job.target,
                    job.evaluate.suites,
                    job.evaluate.tier,
                    device=device,
                    precision=job.precision,
                    log=_echo_and_log(run.log, echo),
                    seed=job.seed,
                )
            metrics.update(report.results)
            timings.update({f"evaluate.{name}": seconds for name, seconds in report.seconds.items()})
        timings["total"] = time.perf_counter() - started
        run.write_env(collect_env(device, job.seed, timings))
        finished = run.commit(metrics)
    echo(f"finished run: {finished}")
    return finished


def method_sections(
    method: str, values: dict[str, float], reserved: Sequence[str] = ()
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Split a method's metrics into those kept under ``"method"`` and its own metrics.json section.

    Keys a method reports under its own name (``soup.removed_ua``, ``soup.before_acc.shard_0``) go to a top-level
    section named after the method, nested at every dot (``{"soup": {"removed_ua": ...}}``), so they read as
    ``soup.removed_ua`` in flattened views; every other key stays under ``"method"``. A method whose name is a
    section the runner writes itself (``method``, ``efficiency``, an evaluation suite) keeps everything there.
    """
    prefix = f"{method}."
    if method in ("method", "efficiency", *reserved) or not any(k.startswith(prefix) for k in values):
        return dict(values), {}
    kept: dict[str, float] = {}
    section: dict[str, Any] = {}
    for key, value in values.items():
        if not key.startswith(prefix):
            kept[key] = value
            continue
        node = section
        *parents, leaf = key[len(prefix) :].split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"method {method!r} reports both {key!r} and a metric at its parent key")
            node = child
        if isinstance(node.get(leaf), dict):
            raise UserError(f"method {method!r} reports both {key!r} and metrics below it")
        node[leaf] = value
    return kept, {method: section}


def _check_result(method: str, result: Any, components: dict[str, torch.nn.Module]) -> None:
    """Fail loudly if a method returns tensors that could not be loaded back into the backbone."""
    if not isinstance(result, ErasureResult):
        raise TypeError(f"method {method!r} returned {type(result).__name__}, not an ErasureResult")
    for component, tensors in result.changed.items():
        if component not in components:
            raise UserError(
                f"method {method!r} changed unknown component {component!r}; has {sorted(components)}"
            )
        state = components[component].state_dict()
        for key, tensor in tensors.items():
            if key not in state:
                raise UserError(
                    f"method {method!r} changed {component}.{key}, which the backbone does not have"
                )
            if tuple(tensor.shape) != tuple(state[key].shape):
                raise UserError(
                    f"method {method!r} changed {component}.{key} to shape {tuple(tensor.shape)}; "
                    f"the backbone's is {tuple(state[key].shape)}"
                )


def _echo_and_log(log: Echo, echo: Echo) -> Echo:
    def both(line: str) -> None:
        log(line)
        echo(line)

    return both


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - start


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise JobCancelled("the job was cancelled")


class ProgressReporter:
    """The ``ctx.progress`` of a run: every report goes to log.txt, about every 5 s (and the last) to ``echo``.

    ``hook`` (if given) sees every report; a set ``cancel`` event raises :class:`JobCancelled` at the next report.
    """

    def __init__(
        self,
        log: Echo,
        echo: Echo,
        every_s: float = 5.0,
        *,
        hook: ProgressHook | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self._log = log
        self._echo = echo
        self._every_s = every_s
        self._last_echo = float("-inf")
        self._hook = hook
        self._cancel = cancel

    def __call__(self, step: int, total: int, **scalars: float) -> None:
        values = " ".join(f"{key}={value:.4g}" for key, value in scalars.items())
        line = f"step {step}/{total} {values}".rstrip()
        self._log(line)
        now = time.monotonic()
        if step >= total or now - self._last_echo >= self._every_s:
            self._last_echo = now
            self._echo(line)
        if self._hook is not None:
            self._hook(step, total, dict(scalars))
        _check_cancel(self._cancel)
