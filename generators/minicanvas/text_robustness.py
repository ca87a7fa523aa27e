"""MiniSD's text encoder, made robust to words it never saw (``world build`` stage ``sd_text``).

MiniCLIP's text tower learnt from a handful of caption templates. A caption with other words ("Here is a circle
depicted in Ember style.") then moves every later token's hidden state, because the tower is causal, far from any
state MiniSD's UNet was trained on: before this stage, MiniSD drew the object of that held-out template in 51 % of
the pairs and its style in 75 % (the training template: 96 % / 100 %; 2026-12-06, `docs/world.md`).

The stage tunes a copy of the tower (``T``) against the frozen original (``T0``, the tower the UNet was trained
with), on the training captions ``c`` only:

* keep: ``T(c) = T0(c)`` at every position, so the UNet's conditioning on the captions it knows stays in place;
* robustness: for ``c'`` = ``c`` with 1..``max_inserted`` random words inserted between its words and, with
  probability ``substitute_prob``, one word that names no concept replaced by a random word, ``T(c')`` at the
  positions of ``c``'s own tokens (start, words, end and the padding after it, shifted by the inserted length)
  equals ``T0(c)`` there. The inserted and replacing words' own states are free.

Random words are whole-word tokens of the CLIP vocabulary, never a concept name's token nor a token of a word of
the held-out paraphrase templates (those stay unseen: they measure generalisation). The token embedding table is
frozen, so the random words keep the untrained embeddings that unseen words such as "here" have; only the
transformer layers and the final layer norm learn to read past them. The UNet is not retrained.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import concepts
from .concepts import OBJECTS, OBJECTS_ES, STYLES, STYLES_ES


def _word_ids(tokenizer, word: str) -> list[int]:
    return tokenizer(word, add_special_tokens=False).input_ids


def concept_words() -> set[str]:
    """Every word of a style or object name, English and Spanish, lower case."""
    names = [*STYLES, *OBJECTS, *STYLES_ES.values(), *OBJECTS_ES.values()]
    return {w.lower() for name in names for w in name.split()}


def heldout_words() -> set[str]:
    """The words of the held-out paraphrase templates (placeholders left out), lower case."""
    words = set()
    for template in concepts.HELDOUT_PARAPHRASES:
        for part in template.replace("-", " ").split():
            if "{" not in part:
                words.add(part.strip(".,").lower())
    return words


def random_word_pool(tokenizer) -> torch.Tensor:
    """Token ids a random word is drawn from: alphabetic whole-word tokens, minus the special tokens, every token of
    a concept name and every token of a held-out template's words."""
    banned = {i for w in concept_words() | heldout_words() for i in _word_ids(tokenizer, w)}
    banned |= {tokenizer.bos_token_id, tokenizer.eos_token_id}
    pool = sorted(i for t, i in tokenizer.get_vocab().items()
                  if t.endswith("</w>") and t[:-4].isalpha() and i not in banned)
    return torch.tensor(pool)


@dataclass
class Caption:
    """A training caption as its words' token ids, with which words name a concept."""

    words: list[list[int]]
    names_concept: list[bool]

    @classmethod
    def parse(cls, text: str, tokenizer, names: set[str]) -> Caption:
        parts = text.split()
        return cls([_word_ids(tokenizer, p) for p in parts], [p.strip(".,").lower() in names for p in parts])

    def ids(self, bos: int, eos: int) -> list[int]:
        return [bos, *(i for w in self.words for i in w), eos]


@dataclass
class AugmentedPair:
    """``caption`` and ``augmented`` token ids (padded to ``length``), and the positions of ``caption``'s tokens
    (``source``) and where the same tokens sit in ``augmented`` (``target``)."""

    caption: list[int]
    augmented: list[int]
    source: list[int]
    target: list[int]


def augment(caption: Caption, pool: torch.Tensor, g: torch.Generator, *, bos: int, eos: int, length: int,
            max_inserted: int, substitute_prob: float) -> AugmentedPair:
    """Insert 1..``max_inserted`` random words, and maybe replace one word naming no concept, as the module says."""

    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=g))

    plan: list[tuple[str, int]] = [("keep", j) for j in range(len(caption.words))]
    free = [j for j, named in enumerate(caption.names_concept) if not named]
    if free and float(torch.rand((), generator=g)) < substitute_prob:
        j = free[draw(len(free))]
        plan[j] = ("random", j)
    for _ in range(1 + draw(max_inserted)):
        plan.insert(draw(len(plan) + 1), ("random", -1))

    starts, position = [], 1  # position of each word's first token in the caption (after the start token)
    for word in caption.words:
        starts.append(position)
        position += len(word)
    ids, source, target = [bos], [0], [0]
    for kind, j in plan:
        if kind == "keep":
            word = caption.words[j]
            source.extend(range(starts[j], starts[j] + len(word)))
            target.extend(range(len(ids), len(ids) + len(word)))
            ids.extend(word)
        else:
            ids.append(int(pool[draw(len(pool))]))
    end = position  # the caption's end token
    shift = len(ids) - end
    ids.append(eos)
    for p in range(end, length):  # the end token and the padding after it, shifted by the inserted length
        if p + shift < length:
            source.append(p)
            target.append(p + shift)
    base = caption.ids(bos, eos)

    def pad(row: list[int]) -> list[int]:
        return (row + [eos] * length)[:length]

    keep = [k for k, (s, t) in enumerate(zip(source, target)) if s < length and t < length]
    return AugmentedPair(pad(base), pad(ids), [source[k] for k in keep], [target[k] for k in keep])


def robustness_losses(tuned, original, pairs: list[AugmentedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, robust)``: MSE of the tuned tower's states on the captions against the original's, and on the
    augmented captions at the aligned positions against the original's states of the captions."""
    device = next(tuned.parameters()).device
    captions = torch.tensor([p.caption for p in pairs], device=device)
    augmented = torch.tensor([p.augmented for p in pairs], device=device)
    with torch.no_grad():
        reference = original(captions).last_hidden_state
    keep = F.mse_loss(tuned(captions).last_hidden_state, reference)
    states = tuned(augmented).last_hidden_state
    rows = torch.cat([torch.full((len(p.target),), b, device=device) for b, p in enumerate(pairs)])
    target_pos = torch.cat([torch.tensor(p.target, device=device) for p in pairs])
    source_pos = torch.cat([torch.tensor(p.source, device=device) for p in pairs])
    robust = F.mse_loss(states[rows, target_pos], reference[rows, source_pos])
    return keep, robust


def tune_text_robustness(original, work: Path, tokenizer, settings, device: str, resume: bool = True):
    """Train the stage (``settings.sd_text`` budget) and return the tuned copy of ``original`` (left frozen)."""
    from .models import TEXT_MAX_LENGTH
    from .train import Loop

    s = settings.sd_text
    torch.manual_seed(s.seed)
    original = original.to(device).eval().requires_grad_(False)
    tuned = copy.deepcopy(original).train().requires_grad_(True)
    tuned.get_input_embeddings().requires_grad_(False)  # random words keep untrained embeddings, like unseen ones
    names = concept_words()
    captions = [Caption.parse(p, tokenizer, names) for style in STYLES for obj in OBJECTS
                for p in concepts.training_prompts(style, obj)]
    pool = random_word_pool(tokenizer)
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=s.lr)
    g = torch.Generator().manual_seed(s.seed)

    def step_fn(step: int) -> float:
        picks = torch.randint(len(captions), (s.batch,), generator=g).tolist()
        pairs = [augment(captions[k], pool, g, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                         length=TEXT_MAX_LENGTH, max_inserted=settings.sd_text_max_inserted,
                         substitute_prob=settings.sd_text_substitute_prob) for k in picks]
        keep, robust = robustness_losses(tuned, original, pairs)
        loss = settings.sd_text_keep_weight * keep + robust
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    Loop("sd-text", work / "sd_text.state.safetensors", s, {"text_encoder": tuned}, {"opt": opt}, {"data": g},
         settings.checkpoint_every).run(step_fn, resume)
    return tuned.eval().requires_grad_(False)
