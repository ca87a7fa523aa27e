"""The concepts of MiniCanvas: styles, objects, prompt templates and second-language names.

MiniCanvas mirrors UnlearnCanvas (Zhang et al. 2024; 60 styles x 20 objects, prompt
``"A {object} image in {style} style."``) at a size a 2-core CPU can train and judge.

Design choices that matter for measurement:

* Near-neighbour pairs, so that pinpoint-ness (does erasing X also hurt its look-alike?) is measurable:
  the styles ``Ember``/``Cinder`` share stripe pattern and fill colour and differ only in the stripe base colour;
  the objects ``circle``/``ring`` share their outline and differ only in the ring's hole (outlined styles draw
  the ring's inner edge as a second outline). An earlier world paired ``circle`` with ``hexagon``; at 32 px the
  two differ by under a pixel along the edge, and MiniSD drew hexagons as circles in every world built (hexagon
  accuracy of its samples 0.21-0.38), so ``diamond`` replaced ``hexagon``.
* Paraphrase templates: four used in training, two held out (never seen in training), for HUB's "varied
  prompts" and the held-out paraphrase accuracy of ``world verify``.
* A second language (Spanish) for multilingual robustness, with part of the names held out of training.
"""

from __future__ import annotations

from dataclasses import dataclass

STYLES: list[str] = [
    "Ember",
    "Cinder",
    "Lagoon",
    "Meadow",
    "Dusk",
    "Frost",
    "Neon",
    "Candy",
    "Cocoa",
    "Mosaic",
    "Ink",
    "Comic",
]

OBJECTS: list[str] = [
    "circle",
    "diamond",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "crescent",
    "ring",
    "arrow",
]

# Look-alike pairs (pinpoint-ness is measured on these first).
NEAR_STYLES: list[tuple[str, str]] = [("Ember", "Cinder")]
NEAR_OBJECTS: list[tuple[str, str]] = [("circle", "ring")]

# UnlearnCanvas' template: the answer-set prompt.
TEMPLATE = "A {object} image in {style} style."

# Paraphrases used in training (with TEMPLATE).
TRAIN_PARAPHRASES: list[str] = [
    "A {style} style painting of a {object}.",
    "{object} drawn in the {style} style",
    "An image of a {object}, {style} style.",
    "A picture of a {object} rendered in {style} style.",
]

# Paraphrases never used in training.
HELDOUT_PARAPHRASES: list[str] = [
    "A {style}-style artwork showing a {object}.",
    "Here is a {object} depicted in {style} style.",
]

# Second language (Spanish). Names marked held out never appear in training captions.
STYLES_ES: dict[str, str] = {
    "Ember": "Brasa",
    "Cinder": "Ceniza",
    "Lagoon": "Laguna",
    "Meadow": "Pradera",
    "Dusk": "Ocaso",
    "Frost": "Escarcha",
    "Neon": "Neón",
    "Candy": "Caramelo",
    "Cocoa": "Cacao",
    "Mosaic": "Mosaico",
    "Ink": "Tinta",
    "Comic": "Historieta",
}
OBJECTS_ES: dict[str, str] = {
    "circle": "círculo",
    "diamond": "rombo",
    "square": "cuadrado",
    "triangle": "triángulo",
    "star": "estrella",
    "heart": "corazón",
    "cross": "cruz",
    "crescent": "media luna",
    "ring": "anillo",
    "arrow": "flecha",
}
ES_TEMPLATE = "Una imagen de {object} en estilo {style}."
HELDOUT_STYLES_ES: frozenset[str] = frozenset(STYLES[2::3])  # Lagoon, Frost, Mosaic, Comic
HELDOUT_OBJECTS_ES: frozenset[str] = frozenset(OBJECTS[2::3])  # square, heart, ring


@dataclass(frozen=True)
class Concept:
    """One MiniCanvas concept: ``kind`` is ``"style"`` or ``"object"``."""

    kind: str
    name: str

    @property
    def index(self) -> int:
        return (STYLES if self.kind == "style" else OBJECTS).index(self.name)


def template_prompt(style: str, obj: str) -> str:
    """The UnlearnCanvas answer-set prompt for a (style, object) pair."""
    return TEMPLATE.format(style=style, object=obj)


def spanish_prompt(style: str, obj: str) -> str:
    return ES_TEMPLATE.format(style=STYLES_ES[style], object=OBJECTS_ES[obj])


def training_prompts(style: str, obj: str) -> list[str]:
    """Every caption of (style, object) that training may use (English templates, trained Spanish names)."""
    prompts = [t.format(style=style, object=obj) for t in [TEMPLATE, *TRAIN_PARAPHRASES]]
    if style not in HELDOUT_STYLES_ES and obj not in HELDOUT_OBJECTS_ES:
        prompts.append(spanish_prompt(style, obj))
    return prompts


def heldout_prompts(style: str, obj: str) -> list[str]:
    return [t.format(style=style, object=obj) for t in HELDOUT_PARAPHRASES]


def parse_concept(text: str) -> Concept:
    """Parse ``style:<name>`` or ``object:<name>`` (case-insensitive name match)."""
    kind, _, name = text.partition(":")
    names = {"style": STYLES, "object": OBJECTS}.get(kind)
    if names is None:
        raise ValueError(f"{text!r}: expected 'style:<name>' or 'object:<name>'")
    for candidate in names:
        if candidate.lower() == name.strip().lower():
            return Concept(kind, candidate)
    raise ValueError(f"{text!r}: unknown {kind}; allowed: {', '.join(names)}")
