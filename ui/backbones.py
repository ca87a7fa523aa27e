"""The backbones a playground user may pick: the registered named ones and what lies in the models directory.

A choice is a label, never a path: ``minicanvas-sd``, ``minicanvas-gan``, or ``models/<relative name>`` for a
diffusers pipeline folder (``model_index.json``) or a StyleGAN2 checkpoint (``.pt``/``.pth``/``.safetensors``)
found under the configured models directory (its children, and their children). A request naming anything else
(a path, ``..``, a symlink leading out of the directory) is refused by :func:`resolve_choice`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from erasure.base import BackboneKind
from generators.registry import CHECKPOINT_SUFFIXES, get_backbone, list_backbones

MODELS_PREFIX = "models/"
_SCAN_DEPTH = 2


class BackboneChoiceError(ValueError):
    """A requested backbone that is not one of the offered choices."""


@dataclass(frozen=True)
class BackboneChoice:
    label: str
    """What the user picks and what requests carry."""
    kind: BackboneKind
    spec: str
    """The job config's ``backbone`` value: a registered name or an absolute path inside the models directory."""
    path: Path
    minicanvas: bool
    available: bool
    """Its files exist (a named MiniCanvas backbone is listed even before the world is built)."""


def list_choices(models_dir: Path | None) -> list[BackboneChoice]:
    """Named backbones first, then the models directory's pipeline folders and checkpoints, sorted by label."""
    choices = []
    for name in list_backbones():
        named = get_backbone(name)
        path = named.locate()
        choices.append(
            BackboneChoice(
                label=name,
                kind=named.kind,
                spec=name,
                path=path,
                minicanvas=named.minicanvas,
                available=path.exists(),
            )
        )
    if models_dir is not None and models_dir.is_dir():
        choices.extend(sorted(_scan_models_dir(models_dir), key=lambda choice: choice.label))
    return choices


def resolve_choice(label: object, models_dir: Path | None) -> BackboneChoice:
    """The offered choice named ``label``; BackboneChoiceError (listing the choices) for anything else."""
    choices = list_choices(models_dir)
    if isinstance(label, str):
        for choice in choices:
            if choice.label == label:
                return _checked(choice, models_dir)
    shown = repr(label) if len(repr(label)) <= 80 else repr(label)[:77] + "..."
    listing = ", ".join(choice.label for choice in choices) or "(none)"
    raise BackboneChoiceError(f"backbone: got {shown}; must be one of the offered backbones: {listing}")


def _checked(choice: BackboneChoice, models_dir: Path | None) -> BackboneChoice:
    if not choice.label.startswith(MODELS_PREFIX):
        return choice
    # Re-check containment at use time: the directory may have changed since it was listed.
    if models_dir is None or not _inside(choice.path, models_dir):
        raise BackboneChoiceError(f"backbone: {choice.label!r} is not inside the models directory")
    return choice


def _scan_models_dir(root: Path) -> list[BackboneChoice]:
    found: list[BackboneChoice] = []
    pending: list[tuple[Path, int]] = [(root, 1)]
    while pending:
        folder, depth = pending.pop()
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or not _inside(entry, root):
                continue
            choice = _as_choice(entry, root)
            if choice is not None:
                found.append(choice)
            elif entry.is_dir() and depth < _SCAN_DEPTH:
                pending.append((entry, depth + 1))
    return found


def _as_choice(entry: Path, root: Path) -> BackboneChoice | None:
    kind: BackboneKind
    if entry.is_dir() and (entry / "model_index.json").is_file():
        kind = "sd"
    elif entry.is_file() and entry.suffix.lower() in CHECKPOINT_SUFFIXES:
        kind = "gan"
    else:
        return None
    resolved = entry.resolve()
    label = MODELS_PREFIX + entry.relative_to(root).as_posix()
    return BackboneChoice(
        label=label, kind=kind, spec=str(resolved), path=resolved, minicanvas=False, available=True
    )


def _inside(path: Path, root: Path) -> bool:
    """``path`` (symlinks followed) lies inside ``root``."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False
