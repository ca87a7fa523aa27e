"""The interface every erasure method implements, and what a method receives and returns.

A method is one class in one file of ``erasure/methods/``::

    class Params(MethodParams):
        lr: float = Field(1e-5, gt=0)

    @register_method
    class MyMethod(ErasureMethod):
        name = "mine"
        backbone_kind = "sd"
        description = "One line shown by `erasure-studio methods`."
        Params = Params

        def erase(self, backbone, target, params, ctx):
            ...
            return ErasureResult(changed={"unet": {"down_blocks.0.attentions.0...weight": tensor}})
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict

from erasure.speed import SpeedConfig

if TYPE_CHECKING:
    from erasure.config import Target

BackboneKind = Literal["sd", "gan"]
BACKBONE_KINDS: tuple[str, ...] = get_args(BackboneKind)

Precision = Literal["fp32", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class MethodParams(BaseModel):
    """Base of every method's ``Params`` model: unknown parameters are errors, never silently ignored, and float
    parameters must be finite (``.inf``/``.nan`` in a config would otherwise pass ``gt=0`` or skip the bounds)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def yaml_off(value: Any) -> Any:
    """For a switch field whose choices include "off": YAML reads a bare ``off`` as false, which means "off".

    Use as ``_off = field_validator("name", mode="before")(yaml_off)`` in a ``Params`` model."""
    return "off" if value is False else value


ProgressFn = Callable[..., None]
"""``progress(step, total, **scalars)``: report that ``step`` of ``total`` steps are done, with e.g. ``loss=0.1``."""


@dataclass(frozen=True)
class RunContext:
    """What the runner gives a method besides the backbone, target and params."""

    seed: int
    device: torch.device
    precision: Precision
    checkpoint_dir: Path
    """Folder for resumable checkpoints (e.g. via ``erasure.training_state``); kept if the run fails."""
    checkpoint_every: int
    """Write a checkpoint every this many steps."""
    progress: ProgressFn
    log: Callable[[str], None] = print
    """Append one line to the run's log.txt."""
    anchor: Target | None = None
    """The job's optional anchor concept: what methods that map the target onto another concept map it to."""
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """The job's speed switches (:mod:`erasure.speed`); methods with frozen-model caches honour ``speed.reuse``."""
    backbone_path: Path | None = None
    """The resolved backbone's files (a pipeline folder or a generator checkpoint), when known: lets GAN methods
    read what the loaded generator does not carry (a rosinality checkpoint's ``d``, ``g`` and optimiser states)."""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


@dataclass
class ErasureResult:
    """What a method returns: the tensors it changed, per component, and its own metrics.

    ``changed`` maps a component name (``"unet"``, ``"text_encoder"``, ``"generator"``…) to ``{parameter or
    buffer name: new tensor}`` under the component's own ``state_dict()`` names. A method that rewrites a whole
    component passes all of its tensors, most simply with :meth:`from_components`.
    """

    changed: dict[str, dict[str, torch.Tensor]]
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.changed:
            raise ValueError("ErasureResult.changed is empty: a method must change at least one tensor")
        for component, tensors in self.changed.items():
            if not component.isidentifier():
                raise ValueError(f"ErasureResult: component name {component!r} is not an identifier")
            if not tensors:
                raise ValueError(f"ErasureResult: component {component!r} has no changed tensors")
            for key, value in tensors.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(
                        f"ErasureResult: {component}.{key} is {type(value).__name__}, not a tensor"
                    )
        for key, value in self.metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"ErasureResult: metric {key!r} must be a number, got {value!r}")

    @classmethod
    def from_components(
        cls, components: dict[str, torch.nn.Module], metrics: dict[str, float] | None = None
    ) -> ErasureResult:
        """A result that replaces whole components (all their tensors)."""
        changed = {name: dict(module.state_dict()) for name, module in components.items()}
        return cls(changed=changed, metrics=dict(metrics or {}))


class ErasureMethod(ABC):
    """Base class of erasure methods; subclasses are registered with ``erasure.registry.register_method``."""

    name: ClassVar[str]
    backbone_kind: ClassVar[BackboneKind]
    description: ClassVar[str]
    Params: ClassVar[type[MethodParams]]

    @abstractmethod
    def erase(self, backbone: Any, target: Target, params: MethodParams, ctx: RunContext) -> ErasureResult:
        """Erase ``target`` from ``backbone`` and return the changed tensors.

        ``backbone`` is a diffusers ``StableDiffusionPipeline`` for ``backbone_kind == "sd"``; ``params`` is an
        instance of ``self.Params``. Methods may modify ``backbone`` in place, but what is saved is only what
        they return.
        """
