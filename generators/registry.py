"""Registry of named backbones, and resolution of a config's ``backbone`` value to a kind and a path.

A backbone value is either a registered name (``minicanvas-sd``, ``minicanvas-gan``) or a local path:
a folder with ``model_index.json`` is a diffusers pipeline (kind ``sd``); a ``.pt``/``.pth``/``.safetensors``
file is a StyleGAN2 generator checkpoint (kind ``gan``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from erasure.base import BackboneKind
from erasure.registry import Registry, describe_choices
from generators.minicanvas import paths

CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class NamedBackbone:
    """A backbone known by name; ``locate()`` returns where its files are (they may not be built yet)."""

    name: str
    kind: BackboneKind
    locate: Callable[[], Path]
    description: str
    minicanvas: bool = False
    """Targets must then be MiniCanvas concepts (``generators.minicanvas.concepts``)."""


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone: ``spec`` is the config value (a registered name, or an absolute path)."""

    spec: str
    kind: BackboneKind
    path: Path
    named: NamedBackbone | None = None

    @property
    def minicanvas(self) -> bool:
        return self.named is not None and self.named.minicanvas


_BACKBONES: Registry[NamedBackbone] = Registry("backbone")


def register_backbone(backbone: NamedBackbone) -> NamedBackbone:
    _BACKBONES.add(backbone.name, backbone)
    return backbone


def list_backbones() -> list[str]:
    return _BACKBONES.names()


def get_backbone(name: str) -> NamedBackbone:
    return _BACKBONES.get(name)


def path_kind(path: Path) -> BackboneKind:
    """Kind of a local backbone path; ValueError saying why if it is neither a pipeline folder nor a checkpoint."""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "sd"
        raise ValueError(f"folder {path} has no model_index.json, so it is not a diffusers pipeline folder")
    if path.is_file():
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            return "gan"
        raise ValueError(f"file {path} is not a StyleGAN2 checkpoint ({'/'.join(CHECKPOINT_SUFFIXES)})")
    raise ValueError(f"{path} does not exist")


def backbone_choices() -> str:
    names = describe_choices(list_backbones(), "backbone")
    return (
        f"{names}, or a path to a diffusers pipeline folder (with model_index.json) "
        f"or a StyleGAN2 checkpoint ({'/'.join(CHECKPOINT_SUFFIXES)})"
    )


def resolve_backbone(value: str) -> Backbone:
    """Resolve a config ``backbone`` value; ValueError naming what is allowed if it is neither name nor path."""
    if value in _BACKBONES:
        named = get_backbone(value)
        return Backbone(spec=value, kind=named.kind, path=named.locate(), named=named)
    try:
        path = Path(value).expanduser()
        if not path.exists() and not _looks_like_path(value):
            raise ValueError(f"must be {backbone_choices()}")
        try:
            kind = path_kind(path)
        except ValueError as err:
            raise ValueError(f"{err}; must be {backbone_choices()}") from None
        return Backbone(spec=str(path.resolve()), kind=kind, path=path.resolve())
    except (OSError, RuntimeError) as err:  # a name too long for the filesystem, ``~nosuchuser``...
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"cannot be used as a path ({reason}); must be {backbone_choices()}") from None


def _looks_like_path(value: str) -> bool:
    return (
        "/" in value or "\\" in value or value.startswith((".", "~")) or value.endswith(CHECKPOINT_SUFFIXES)
    )


register_backbone(
    NamedBackbone(
        name="minicanvas-sd",
        kind="sd",
        locate=paths.sd_pipeline_dir,
        description="The built-in MiniCanvas text-to-image diffusion pipeline (SD-shaped, CPU-sized).",
        minicanvas=True,
    )
)
register_backbone(
    NamedBackbone(
        name="minicanvas-gan",
        kind="gan",
        locate=paths.gan_checkpoint_path,
        description="The built-in MiniCanvas StyleGAN2 generator.",
        minicanvas=True,
    )
)
