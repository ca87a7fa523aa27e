"""The suite interface and what a suite receives: the subject, the target, the tier, and shared instruments.

A suite is a :class:`Suite` subclass in its own module under ``evaluate/suites/``, registered with
``@register_suite``; ``run(ctx)`` returns ``{key: number}`` (keys without the suite prefix, e.g. ``"ua"``), which
the caller stores under the suite's name (``canvas.ua``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from erasure.errors import UserError
from evaluate.cache import GenerationCache
from evaluate.protocols import CanvasProtocol
from evaluate.sampling import GANSampler, SDSampler
from evaluate.subject import EvalSubject

if TYPE_CHECKING:
    from erasure.config import Target


@dataclass
class EvalContext:
    """Everything a suite needs; samplers are made once per model so content hashes are computed once."""

    subject: EvalSubject
    target: Target
    tier: str
    device: torch.device
    protocol: CanvasProtocol
    cache: GenerationCache | None = None
    log: Callable[[str], None] = print
    seed: int = 0
    _samplers: dict[str, Any] = field(default_factory=dict, repr=False)

    def sampler(self, original: bool = False) -> SDSampler:
        """Sampler of the evaluated model, or of the model before erasure (``original=True``)."""
        self._require("sd")
        key = "original" if original and self.subject.is_erased else "model"
        if key not in self._samplers:
            model = self.subject.original() if key == "original" else self.subject.model
            self._samplers[key] = SDSampler(model, self.cache)
        return self._samplers[key]

    def gan_sampler(self, original: bool = False) -> GANSampler:
        self._require("gan")
        key = "gan-original" if original and self.subject.is_erased else "gan-model"
        if key not in self._samplers:
            model = self.subject.original() if key == "gan-original" else self.subject.model
            self._samplers[key] = GANSampler(model, self.cache)
        return self._samplers[key]

    def _require(self, kind: str) -> None:
        if self.subject.kind != kind:
            raise UserError(f"{self.subject.spec} is a {self.subject.kind} backbone; this needs a {kind} backbone")


class Suite(ABC):
    """An evaluation suite: ``name``, one-line ``description``, the backbone kinds it runs on, its output keys."""

    name: ClassVar[str]
    description: ClassVar[str]
    backbone_kinds: ClassVar[tuple[str, ...]]
    keys: ClassVar[tuple[str, ...]]

    def check(self, ctx: EvalContext) -> None:
        """Raise a UserError before any work if the suite cannot run on this subject/target/protocol."""
        if ctx.subject.kind not in self.backbone_kinds:
            raise UserError(
                f"suite {self.name!r} runs on {'/'.join(self.backbone_kinds)} backbones; "
                f"{ctx.subject.spec} is {ctx.subject.kind}"
            )
        if ctx.target.kind not in ("style", "object"):
            raise UserError(f"suite {self.name!r} needs a style:<name> or object:<name> target, got {ctx.target.spec}")
        names = ctx.protocol.styles if ctx.target.kind == "style" else ctx.protocol.objects
        if ctx.target.name not in names:
            raise UserError(
                f"{ctx.target.spec} is not a {ctx.target.kind} of the {ctx.protocol.name} protocol; "
                f"allowed: {', '.join(names)}"
            )

    @abstractmethod
    def run(self, ctx: EvalContext) -> dict[str, float]:
        """The suite's metrics, keyed without the suite prefix."""
