"""``erasure-studio erase``: run one validated job into a run folder (see :mod:`erasure.runs`)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasure.base import ErasureResult, RunContext
from erasure.config import JobConfig
from erasure.devices import resolve_device
from erasure.envinfo import collect_env
from erasure.errors import NotAvailableError, UserError
from erasure.registry import get_method
from erasure.runs import RunWriter, check_destination
from generators.loading import backbone_components, check_available, load_backbone

Echo = Callable[[str], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_erase(job: JobConfig, dest: Path, *, overwrite: bool = False, echo: Echo = print) -> Path:
    """Erase ``job.target`` with ``job.method`` and write the run to ``dest``; returns the finished folder.

    Everything that can be checked without loading the model is checked first, so a job that cannot run
    creates no folder at all.
    """
    method_cls = get_method(job.method.name)
    backbone = job.resolved_backbone()
    check_available(backbone)
    if job.evaluate.suites:
        raise NotAvailableError("running evaluation suites after erasure", "set evaluate.suites=[]")
    check_destination(dest, overwrite)
    device = resolve_device(job.device)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    with RunWriter.open(dest, overwrite) as run:
        run.write_config(job)
        run.log(f"job {job.name}: {job.method.name} erases {job.target.spec} from {job.backbone} on {device}")
        seed_everything(job.seed)
        with _timed(timings, "load"):
            model = load_backbone(backbone, device, job.precision)
        ctx = RunContext(
            seed=job.seed,
            device=device,
            precision=job.precision,
            checkpoint_dir=run.checkpoint_dir,
            checkpoint_every=job.checkpoint_every,
            progress=ProgressReporter(run.log, echo),
            log=run.log,
        )
        with _timed(timings, "erase"):
            result = method_cls().erase(model, job.target, job.method.params, ctx)
        components = backbone_components(model)
        _check_result(job.method.name, result, components)
        for component, tensors in result.changed.items():
            full = set(tensors) == set(components[component].state_dict())
            run.save_weights(component, tensors, full=full)
        run.log(
            f"saved {sum(len(t) for t in result.changed.values())} changed tensors in {list(result.changed)}"
        )
        timings["total"] = time.perf_counter() - started
        run.write_env(collect_env(device, job.seed, timings))
        finished = run.commit({"method": result.metrics, "suites": {}})
    echo(f"finished run: {finished}")
    return finished


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


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - start


class ProgressReporter:
    """The ``ctx.progress`` of a run: every report goes to log.txt, about every 5 s (and the last) to ``echo``."""

    def __init__(self, log: Echo, echo: Echo, every_s: float = 5.0) -> None:
        self._log = log
        self._echo = echo
        self._every_s = every_s
        self._last_echo = float("-inf")

    def __call__(self, step: int, total: int, **scalars: float) -> None:
        values = " ".join(f"{key}={value:.4g}" for key, value in scalars.items())
        line = f"step {step}/{total} {values}".rstrip()
        self._log(line)
        now = time.monotonic()
        if step >= total or now - self._last_echo >= self._every_s:
            self._last_echo = now
            self._echo(line)
