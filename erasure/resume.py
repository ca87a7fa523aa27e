"""Kill-safe training loops for methods: resume from ``ctx.checkpoint_dir``, checkpoint every
``ctx.checkpoint_every`` steps (via :mod:`erasure.training_state`).

A checkpoint records a fingerprint of the job (method, params, target, anchor, seed); one written by a
different job is ignored, so a changed config never resumes from stale weights. On CPU a resumed job ends
bit-identical to an uninterrupted one as long as every random draw of the loop comes from the generators (and
the global torch RNG) that are checkpointed, and everything built before the loop (trajectories, masks, data) is
rebuilt deterministically from the seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from erasure.base import MethodParams, RunContext
from erasure.training_state import load_training_state, save_training_state

if TYPE_CHECKING:
    from erasure.config import Target

CHECKPOINT_FILE = "training_state.safetensors"


def job_fingerprint(method: str, params: MethodParams, target: Target, ctx: RunContext) -> str:
    anchor = ctx.anchor.spec if ctx.anchor is not None else None
    return json.dumps(
        {
            "method": method,
            "params": params.model_dump(mode="json"),
            "target": target.spec,
            "anchor": anchor,
            "seed": ctx.seed,
        },
        sort_keys=True,
    )


class TrainingCheckpoints:
    """Restore (:meth:`resume`) and write (:meth:`step_done`) the state of one training loop.

    ``history`` maps names to the lists a loop appends its per-step scalars to; they are checkpointed with the
    model and refilled on resume.
    """

    def __init__(
        self,
        ctx: RunContext,
        fingerprint: str,
        *,
        modules: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        generators: dict[str, torch.Generator] | None = None,
        history: dict[str, list[float]] | None = None,
    ) -> None:
        self.ctx = ctx
        self.fingerprint = fingerprint
        self.modules = dict(modules)
        self.optimizers = dict(optimizers or {})
        self.generators = dict(generators or {})
        # Per-step scalars (losses) the method reports at the end: saved with each checkpoint and restored in
        # place on resume, so a resumed job's final metrics cover the whole run, not only the steps after it.
        self.history = history if history is not None else {}
        self.path = ctx.checkpoint_dir / CHECKPOINT_FILE

    def resume(self) -> int:
        """Load the last checkpoint of this job if there is one; return the number of steps already done."""
        if not self.path.is_file():
            return 0
        if _fingerprint_of(self.path) != self.fingerprint:
            self.ctx.log(f"ignoring checkpoint {self.path}: it was written by a different job")
            return 0
        meta = load_training_state(
            self.path, modules=self.modules, optimizers=self.optimizers, generators=self.generators
        )
        step = int(meta["step"])
        saved = meta.get("extra", {}).get("history", {})
        for key, values in self.history.items():
            values[:] = [float(v) for v in saved.get(key, [])]
        self.ctx.log(f"resumed from checkpoint at step {step}")
        return step

    def step_done(self, step: int, total: int) -> None:
        """Call after step ``step`` (1-based) of ``total``: checkpoint every ``ctx.checkpoint_every`` steps."""
        if step % self.ctx.checkpoint_every == 0 and step < total:
            save_training_state(
                self.path,
                step=step,
                modules=self.modules,
                optimizers=self.optimizers,
                generators=self.generators,
                extra={"fingerprint": self.fingerprint, "history": self.history},
            )


def _fingerprint_of(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("training_state", "{}"))
    except (OSError, ValueError, KeyError, json.JSONDecodeError):  # unreadable or foreign: not ours
        return None
    return meta.get("extra", {}).get("fingerprint")
