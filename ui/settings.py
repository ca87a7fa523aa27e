"""Settings of one playground server: where models and runs live, and the bounds every request is held to.

The bounds are enforced in the request handlers (server side), not only by the widgets: a client that calls the
API directly gets the same limits and the same one-line errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one request may ask for."""

    max_steps: int = 2000
    """Budget: training steps of one erasure job (the method's iterations/steps field)."""
    int_param_factor: int = 10
    """Integer method parameters without their own upper bound may be at most this many times their default."""
    max_params_chars: int = 10_000
    """Length of the method parameters as JSON."""
    max_prompt_chars: int = 200
    """Length of a free-text target or prompt."""
    max_prompts: int = 8
    """Retained prompts (free-text backbones) per comparison."""
    max_images_per_concept: int = 8
    max_retained_concepts: int = 4
    max_sample_steps: int = 50
    max_guidance: float = 20.0
    max_seed: int = 2**31 - 1
    max_job_seconds: float = 3600.0
    """Wall-clock limit of one erasure job; a job running longer is cancelled (no run is kept)."""
    max_running_jobs: int = 1
    """Erasure jobs that may run at once; further requests wait in the queue."""
    queue_size: int = 16
    """Requests that may wait in the queue; more are refused with "queue full"."""
    concurrency: int = 2
    """Default number of requests of one kind (event) that run at once."""


@dataclass(frozen=True)
class UISettings:
    """Everything a playground server needs to know; built by ``erasure-studio ui`` from its options."""

    runs_dir: Path = Path("runs")
    models_dir: Path | None = None
    """Extra backbones: pipeline folders and GAN checkpoints found here (never a path typed by a user)."""
    device: str = "auto"
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs_dir", Path(self.runs_dir).expanduser().resolve())
        if self.models_dir is not None:
            object.__setattr__(self, "models_dir", Path(self.models_dir).expanduser().resolve())
