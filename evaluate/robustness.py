"""Attack robustness as UnlearnDiffAtk measures it (Zhang et al., ECCV 2024): Pre-ASR and ASR.

For each attacked prompt (with its seed): the model's own generation is judged first; a prompt that already shows
the concept is a pre-attack success and is not attacked. Otherwise :func:`erasure.attacks.optimize_prefix_embeddings`
optimises ``k`` prefix embeddings so the model denoises the *reference* image (the original model's generation of
the concept, encoded by the evaluated model's VAE), checking every ``check_every`` steps whether a generation with
the prefix (same seed) shows the concept and stopping at the first success, then judging the final prefix.
Pre-ASR = pre-attack successes / prompts; ASR = (pre-attack successes + attack successes) / prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from erasure.attacks import encode_images, optimize_prefix_embeddings
from evaluate.judges import ConceptLike, Judge
from evaluate.sampling import SamplerSettings, SDSampler


@dataclass(frozen=True)
class AttackSettings:
    """UnlearnDiffAtk's defaults: k = 5 prefix tokens, AdamW lr 0.01, weight decay 0.1; the budget per tier."""

    steps: int = 40
    k: int = 5
    lr: float = 0.01
    weight_decay: float = 0.1
    check_every: int = 10
    seed: int = 0


@dataclass
class AttackOutcome:
    pre_attack: Tensor
    """Bool per prompt: the unattacked generation shows the concept."""
    attacked: Tensor
    """Bool per prompt: the generation with the adversarial prefix shows the concept (True where pre_attack)."""
    losses: list[list[float]] = field(default_factory=list)
    """Attack loss per step, per attacked prompt."""

    def rates(self) -> dict[str, float]:
        from evaluate.rates import AttackSuccessRate

        metric = AttackSuccessRate()
        metric.update(self.pre_attack, self.attacked)
        return metric.compute()


def attack_prompts(
    sampler: SDSampler,
    judge: Judge,
    concept: ConceptLike,
    prompts: Sequence[str],
    seeds: Sequence[int],
    references: Tensor,
    sampling: SamplerSettings,
    attack: AttackSettings,
    log: Callable[[str], None] = lambda line: None,
) -> AttackOutcome:
    """Attack ``prompts`` on ``sampler``'s model towards ``references[i]`` (images in [-1, 1], one per prompt)."""
    if not (len(prompts) == len(seeds) == len(references)):
        raise ValueError("prompts, seeds and references must have the same length")
    pipe = sampler.pipe
    pre = judge.shows(sampler.images(prompts, seeds, sampling), concept).cpu()
    attacked = pre.clone()
    outcome = AttackOutcome(pre_attack=pre, attacked=attacked)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        if pre[i]:
            continue
        latents = encode_images(pipe.vae, references[i : i + 1])

        def shows(embeds: Tensor, seed: int = seed) -> bool:
            image = sampler.images_from_embeddings(embeds, [seed], sampling)
            return bool(judge.shows(image, concept)[0])

        result = optimize_prefix_embeddings(
            pipe, prompt, latents, k=attack.k, steps=attack.steps, lr=attack.lr, weight_decay=attack.weight_decay,
            generator=torch.Generator().manual_seed(attack.seed + i), check=shows, check_every=attack.check_every,
        )
        attacked[i] = True if result.stopped_early else shows(result.prompt_embeds)
        outcome.losses.append(result.losses)
        log(f"attack {i + 1}/{len(prompts)}: {result.steps} steps, loss {result.losses[0]:.4f} -> "
            f"{result.losses[-1]:.4f}, success={bool(attacked[i])}")
    return outcome
