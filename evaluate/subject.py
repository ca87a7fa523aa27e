"""What is evaluated: a backbone (``minicanvas-sd``, a pipeline folder, a StyleGAN2 checkpoint) or a finished run.

A run is its base backbone (``backbone`` in ``config.resolved.yaml``) with the run's ``weights/*.safetensors``
applied on top. Suites that compare before and after (HUB's quality against the original model, the attack's
reference images, the GAN metrics) also need the original: for a run that is its base backbone, loaded only when a
suite asks for it; for a bare backbone it is the model itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erasure.base import Precision
from erasure.errors import UserError
from generators.loading import backbone_components, check_available, load_backbone
from generators.registry import Backbone, resolve_backbone


@dataclass
class EvalSubject:
    """A loaded model under evaluation, with lazy access to the model before erasure."""

    spec: str
    """What the user named: a backbone name, a path, or a run folder."""
    backbone: Backbone
    model: Any
    load_original: Callable[[], Any] | None = None
    """Loads the model before erasure; ``None`` when ``model`` is itself the original."""
    run_config: dict[str, Any] | None = None
    """The run's config.resolved.yaml, for a run."""
    _original: Any = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return self.backbone.kind

    @property
    def is_erased(self) -> bool:
        return self.load_original is not None

    def original(self) -> Any:
        if self.load_original is None:
            return self.model
        if self._original is None:
            self._original = self.load_original()
        return self._original


def apply_weights(model: Any, weights: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> None:
    """Load ``{component: {tensor: value}}`` into ``model``'s components (strict about names)."""
    components = backbone_components(model)
    for component, tensors in weights.items():
        if component not in components:
            raise UserError(f"{source}: weights for {component!r}, which the backbone lacks ({sorted(components)})")
        result = components[component].load_state_dict(dict(tensors), strict=False)
        if result.unexpected_keys:
            raise UserError(
                f"{source}: {component} weights the backbone lacks: {', '.join(result.unexpected_keys[:5])}"
            )


def subject_from_weights(
    backbone: Backbone,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    device: torch.device,
    precision: Precision = "fp32",
    spec: str | None = None,
    run_config: dict[str, Any] | None = None,
) -> EvalSubject:
    """A fresh copy of ``backbone`` with ``weights`` applied; the original is loaded from disk when needed."""
    model = load_backbone(backbone, device, precision)
    apply_weights(model, weights, spec or backbone.spec)
    return EvalSubject(
        spec=spec or backbone.spec,
        backbone=backbone,
        model=model,
        load_original=lambda: load_backbone(backbone, device, precision),
        run_config=run_config,
    )


def load_subject(source: str, device: torch.device, precision: Precision | None = None) -> EvalSubject:
    """``source`` is a registered backbone name, a backbone path, or a finished run folder."""
    from erasure.runs import is_finished_run, read_run_config, read_run_weights

    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.resolved.yaml").is_file():
        if not is_finished_run(path):
            raise UserError(f"{source}: not a finished run (no metrics.json)")
        config = read_run_config(path)
        spec = config.get("backbone")
        if not isinstance(spec, str):
            raise UserError(f"{source}: config.resolved.yaml has no backbone")
        try:
            backbone = resolve_backbone(spec)
        except ValueError as err:
            raise UserError(f"{source}: base backbone {spec!r} is not available: {err}") from None
        check_available(backbone)
        run_precision = precision or config.get("precision") or "fp32"
        return subject_from_weights(backbone, read_run_weights(path), device, run_precision, str(path), config)
    try:
        backbone = resolve_backbone(source)
    except ValueError as err:
        raise UserError(f"--model {source}: {err}, or a finished run folder") from None
    check_available(backbone)
    return EvalSubject(spec=backbone.spec, backbone=backbone, model=load_backbone(backbone, device, precision or "fp32"))
