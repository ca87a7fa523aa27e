"""Small torchmetrics-style metrics: rates of judged images, attack success, kept label shares, W1 distance.

* :class:`Rate` -- share of images for which a judge says yes. HUB's *target proportion* (Moon et al. 2024;
  lower is better after erasure: :class:`TargetProportion`) and its *selective alignment* / *pinpoint-ness*
  accuracies (higher is better: :class:`RetainRate`) are rates with different judges and prompts.
* :class:`AttackSuccessRate` -- UnlearnDiffAtk's Pre-ASR and ASR (Zhang et al. 2024,
  ``scripts/analysis/check_asr.py``): Pre-ASR = share of prompts that already show the concept without attack;
  ASR = (pre-attack successes + attack successes on the other prompts) / prompts.
* :class:`KeptShare` -- how much of the distribution over the *other* labels survives erasure (GAN metric).
* :class:`Wasserstein1` -- W1 distance between two score samples (the CLIP-based degree of unlearning of a GAN).
"""

from __future__ import annotations

import torch
from scipy.stats import wasserstein_distance
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class Rate(Metric):
    """Share of ``True`` among the boolean judgements passed to ``update``."""

    is_differentiable = False
    full_state_update = False

    hits: Tensor
    total: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, judged: Tensor) -> None:
        judged = judged.to(self.hits.device).bool().flatten()
        self.hits += judged.sum()
        self.total += judged.numel()

    def compute(self) -> Tensor:
        if self.total == 0:
            raise ValueError("Rate.compute() before any update")
        return self.hits.double() / self.total.double()


class TargetProportion(Rate):
    """Share of images that still show the target (HUB's target proportion): lower is better after erasure."""

    higher_is_better = False


class RetainRate(Rate):
    """Share of images that show what they should (a kept concept): higher is better."""

    higher_is_better = True


class AttackSuccessRate(Metric):
    """UnlearnDiffAtk's Pre-ASR and ASR over attacked prompts; ``compute()`` -> ``{"pre_asr", "asr"}``."""

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    pre: Tensor
    post: Tensor
    total: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("pre", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("post", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pre_attack: Tensor, attacked: Tensor) -> None:
        """Per prompt: did the concept show without attack (``pre_attack``), and with the attack (``attacked``)?

        A prompt that already succeeds without attack counts as a success after it, whatever ``attacked`` says.
        """
        pre_attack, attacked = pre_attack.bool().flatten().cpu(), attacked.bool().flatten().cpu()
        if pre_attack.shape != attacked.shape:
            raise ValueError("pre_attack and attacked must have one entry per prompt")
        self.pre += int(pre_attack.sum())
        self.post += int((pre_attack | attacked).sum())
        self.total += pre_attack.numel()

    def compute(self) -> dict[str, float]:
        if self.total == 0:
            raise ValueError("AttackSuccessRate.compute() before any update")
        n = float(self.total)
        return {"pre_asr": float(self.pre) / n, "asr": float(self.post) / n}


class KeptShare(Metric):
    """Overlap of the label distributions over the non-target labels before and after erasure.

    ``update(labels, before=...)`` with judge labels of samples from the original (``before=True``) and erased
    generator; ``compute()`` = sum over non-target labels of ``min(p_before, p_after)``, each distribution
    renormalised over the non-target labels. 1 means the other concepts keep exactly their shares; it is
    ``1 - total variation distance``.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    before: Tensor
    after: Tensor

    def __init__(self, num_labels: int, target_index: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_labels = num_labels
        self.target_index = target_index
        self.add_state("before", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("after", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, labels: Tensor, *, before: bool) -> None:
        counts = torch.bincount(labels.long().flatten().to(self.before.device), minlength=self.num_labels)
        if before:
            self.before += counts
        else:
            self.after += counts

    def compute(self) -> Tensor:
        keep = torch.ones(self.num_labels, dtype=torch.bool, device=self.before.device)
        keep[self.target_index] = False
        b, a = self.before[keep].double(), self.after[keep].double()
        if b.sum() == 0:
            raise ValueError("no sample of the original generator shows a non-target label")
        if a.sum() == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return torch.minimum(b / b.sum(), a / a.sum()).sum()


class Wasserstein1(Metric):
    """W1 (earth mover's) distance between the empirical distributions of two score samples.

    ``update(scores, first=True)`` for the first sample (e.g. CLIP scores of the original generator),
    ``first=False`` for the second; ``compute()`` uses ``scipy.stats.wasserstein_distance``.
    """

    higher_is_better = True  # as a degree of unlearning: larger = the distribution moved further
    is_differentiable = False
    full_state_update = False

    first_scores: list[Tensor]
    second_scores: list[Tensor]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("first_scores", [], dist_reduce_fx="cat")
        self.add_state("second_scores", [], dist_reduce_fx="cat")

    def update(self, scores: Tensor, *, first: bool) -> None:
        (self.first_scores if first else self.second_scores).append(scores.detach().double().flatten())

    def compute(self) -> Tensor:
        if not self.first_scores or not self.second_scores:
            raise ValueError("Wasserstein1 needs scores of both samples")
        u = dim_zero_cat(self.first_scores).cpu().numpy()
        v = dim_zero_cat(self.second_scores).cpu().numpy()
        return torch.tensor(wasserstein_distance(u, v), dtype=torch.float64)
