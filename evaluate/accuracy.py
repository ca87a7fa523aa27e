"""UnlearnCanvas' accuracies: UA, IRA and CRA from per-label judge predictions.

Definitions (UnlearnCanvas, Zhang et al. 2024, ``machine_unlearning/evaluation/quantitative/accuracy.py`` and
the averaging scripts): ``acc_style[s]`` is the share of answer-set images prompted with style ``s`` that the
style judge labels ``s``; ``acc_object[o]`` likewise for objects. For a style target ``t``:

* UA (unlearning accuracy) = 1 - acc_style[t];
* IRA (in-domain retain accuracy) = mean of acc_style over the other styles;
* CRA (cross-domain retain accuracy) = mean of acc_object over all objects.

For an object target the roles of styles and objects are swapped. All three are "higher is better". Means run
over the labels that occur in the answer set, less ``ignored_styles``: UnlearnCanvas samples its 51st style label
``Seed_Images`` (the photographs) too, and counts those images in the object accuracies, but leaves the label out
of every style mean (SAeUron's ``avg_accuracy_style.py``: IRA over the other 49 styles; CRA over the 50 styles).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

Axis = Literal["style", "object"]


class PerLabelAccuracy(Metric):
    """Accuracy of predictions per true label: ``compute()`` -> ``[num_labels]`` (NaN for labels never seen)."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_labels: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_labels = num_labels
        self.add_state("correct", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """``preds``: predicted labels ``[n]`` or scores ``[n, num_labels]``; ``target``: true labels ``[n]``."""
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        preds, target = preds.to(self.total.device).long(), target.to(self.total.device).long()
        self.total += torch.bincount(target, minlength=self.num_labels)
        self.correct += torch.bincount(target[preds == target], minlength=self.num_labels)

    def compute(self) -> Tensor:
        acc = self.correct.double() / self.total.double()
        return torch.where(self.total > 0, acc, torch.full_like(acc, float("nan")))


def unlearncanvas_scores(
    acc_style: Tensor,
    acc_object: Tensor,
    target_kind: Axis,
    target_index: int,
    ignored_styles: Sequence[int] = (),
) -> dict[str, float]:
    """UA/IRA/CRA from per-label accuracies (NaN entries, i.e. labels absent from the answer set, are skipped)."""
    if target_kind not in ("style", "object"):
        raise ValueError(f"UnlearnCanvas accuracies need a style or object target, got {target_kind!r}")
    if target_kind == "style" and target_index in ignored_styles:
        raise ValueError(f"style label {target_index} is ignored in style means and cannot be a target")
    acc_style = acc_style.clone().double()
    acc_style[list(ignored_styles)] = float("nan")
    same, cross = (acc_style, acc_object) if target_kind == "style" else (acc_object, acc_style)
    if torch.isnan(same[target_index]):
        raise ValueError(f"the answer set has no image of the target {target_kind} (label {target_index})")
    others = torch.cat([same[:target_index], same[target_index + 1 :]])
    return {
        "ua": float(1 - same[target_index]),
        "ira": _nanmean(others),
        "cra": _nanmean(cross),
    }


def _nanmean(values: Tensor) -> float:
    kept = values[~torch.isnan(values)]
    if kept.numel() == 0:
        raise ValueError("no retained label occurs in the answer set")
    return float(kept.mean())


class UnlearnCanvasAccuracy(Metric):
    """UA, IRA and CRA of one unlearned model for one target (UnlearnCanvas, Zhang et al. 2024).

    ``update(style_preds, object_preds, style_labels, object_labels)`` with the judge's predictions (labels or
    scores) and the prompted labels of each answer-set image; ``compute()`` -> ``{"ua", "ira", "cra"}``.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        num_styles: int,
        num_objects: int,
        target_kind: Axis,
        target_index: int,
        ignored_styles: Sequence[int] = (),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.ignored_styles = tuple(ignored_styles)
        if target_kind not in ("style", "object"):
            raise ValueError(f"UnlearnCanvas accuracies need a style or object target, got {target_kind!r}")
        self.target_kind: Axis = target_kind
        self.target_index = target_index
        self.style_acc = PerLabelAccuracy(num_styles)
        self.object_acc = PerLabelAccuracy(num_objects)

    def update(self, style_preds: Tensor, object_preds: Tensor, style_labels: Tensor, object_labels: Tensor) -> None:
        self.style_acc.update(style_preds, style_labels)
        self.object_acc.update(object_preds, object_labels)

    def compute(self) -> dict[str, float]:
        return unlearncanvas_scores(
            self.style_acc.compute(), self.object_acc.compute(), self.target_kind, self.target_index,
            self.ignored_styles,
        )

    def reset(self) -> None:
        super().reset()
        self.style_acc.reset()
        self.object_acc.reset()
