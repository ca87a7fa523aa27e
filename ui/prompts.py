"""Which prompts and seeds a before/after comparison uses.

For a MiniCanvas style target ``S``, image ``i`` of a concept is ``"A {object} image in {S} style."`` with object
``OBJECTS[i % 10]`` and seed ``seed + i``; each retained style gets the same objects and seeds, so rows line up.
Object targets cycle through the styles instead. A free-text target is its prompt with seeds ``seed + i``, and the
retained concepts are prompts given by the user. GAN backbones have no prompts: items are latent seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

from generators.minicanvas.concepts import NEAR_OBJECTS, NEAR_STYLES, OBJECTS, STYLES, template_prompt


@dataclass(frozen=True)
class Item:
    """One image to generate twice (original, erased)."""

    concept: str
    """``style:Ember``, ``object:circle``, ``text:…``, or ``latent`` (GAN)."""
    prompt: str
    seed: int

    @property
    def caption(self) -> str:
        text = self.prompt if self.prompt else self.concept
        return f"{text} (seed {self.seed})"


def minicanvas_items(kind: str, name: str, count: int, seed: int) -> list[Item]:
    """``count`` images of MiniCanvas concept ``kind:name`` (kind ``style`` or ``object``)."""
    items = []
    for i in range(count):
        if kind == "style":
            prompt = template_prompt(name, OBJECTS[i % len(OBJECTS)])
        else:
            prompt = template_prompt(STYLES[i % len(STYLES)], name)
        items.append(Item(concept=f"{kind}:{name}", prompt=prompt, seed=seed + i))
    return items


def text_items(concept: str, prompt: str, count: int, seed: int) -> list[Item]:
    return [Item(concept=concept, prompt=prompt, seed=seed + i) for i in range(count)]


def latent_items(count: int, seed: int) -> list[Item]:
    return [Item(concept="latent", prompt="", seed=seed + i) for i in range(count)]


def default_retained(kind: str, name: str, how_many: int = 2) -> list[str]:
    """Retained concepts to show by default: the target's look-alike first, then the next names in the list."""
    names = STYLES if kind == "style" else OBJECTS
    pairs = NEAR_STYLES if kind == "style" else NEAR_OBJECTS
    chosen: list[str] = []
    for a, b in pairs:
        if name in (a, b):
            chosen.append(b if name == a else a)
    start = names.index(name) if name in names else 0
    for offset in range(1, len(names)):
        candidate = names[(start + offset) % len(names)]
        if candidate not in chosen and candidate != name:
            chosen.append(candidate)
    return chosen[:how_many]


def retained_choices(kind: str, name: str) -> list[str]:
    names = STYLES if kind == "style" else OBJECTS
    return [candidate for candidate in names if candidate != name]
