"""Trust tests of the evaluator's metrics: FID against a scipy reference, UnlearnCanvas' arithmetic by hand,
UnlearnDiffAtk's ASR definition, CLIP score through torchmetrics, local-file feature networks and judges."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from erasure.errors import UserError
from evaluate.accuracy import PerLabelAccuracy, UnlearnCanvasAccuracy, unlearncanvas_scores
from evaluate.fid import InceptionFeatures, compute_fid, fid_metric
from evaluate.rates import AttackSuccessRate, KeptShare, RetainRate, TargetProportion, Wasserstein1


class Identity(torch.nn.Module):
    """Feature network that returns its input: FID then runs on the given feature vectors."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The classic reference (pytorch-fid / UnlearnCanvas fid.py): scipy.linalg.sqrtm of the covariance product."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_fid_equals_the_scipy_sqrtm_reference() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 12, generator=g, dtype=torch.float64)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64) * 0.3 + torch.eye(12, dtype=torch.float64)
    fake = torch.randn(250, 12, generator=g, dtype=torch.float64) @ mix + 0.4
    metric = fid_metric(Identity(12))
    for chunk in real.split(64):
        metric.update(chunk, real=True)
    for chunk in fake.split(64):
        metric.update(chunk, real=False)
    ours = float(metric.compute())
    reference = scipy_fid(real.numpy(), fake.numpy())
    assert reference > 1.0
    assert abs(ours - reference) < 1e-3


def test_fid_of_a_set_with_itself_is_zero() -> None:
    images = torch.rand(40, 5, dtype=torch.float64) * 2 - 1
    assert abs(compute_fid(Identity(5), images, images)) < 1e-6


# ------------------------------------------------------------------------------------- UnlearnCanvas UA/IRA/CRA

# 3 styles x 2 objects x 2 seeds = 12 answer-set images; predictions written out by hand.
STYLE_TRUE = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
OBJECT_TRUE = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
STYLE_PRED = torch.tensor([0, 2, 1, 1, 1, 1, 1, 0, 2, 2, 0, 2])  # per style: 1/4, 3/4, 3/4 right
OBJECT_PRED = torch.tensor([0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0, 1])  # per object: 5/6 and 5/6 right


def test_unlearncanvas_accuracies_equal_hand_computed_values() -> None:
    style = UnlearnCanvasAccuracy(3, 2, "style", 0)
    style.update(STYLE_PRED, OBJECT_PRED, STYLE_TRUE, OBJECT_TRUE)
    got = style.compute()
    assert got["ua"] == pytest.approx(1 - 1 / 4)
    assert got["ira"] == pytest.approx((3 / 4 + 3 / 4) / 2)
    assert got["cra"] == pytest.approx((5 / 6 + 5 / 6) / 2)

    obj = UnlearnCanvasAccuracy(3, 2, "object", 1)
    obj.update(STYLE_PRED, OBJECT_PRED, STYLE_TRUE, OBJECT_TRUE)
    got = obj.compute()
    assert got["ua"] == pytest.approx(1 - 5 / 6)
    assert got["ira"] == pytest.approx(5 / 6)
    assert got["cra"] == pytest.approx((1 / 4 + 3 / 4 + 3 / 4) / 3)


def test_ignored_styles_leave_every_style_mean_but_count_for_objects() -> None:
    acc_style = torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64)  # style 2 plays UnlearnCanvas' Seed_Images
    acc_object = torch.tensor([0.5, 0.7], dtype=torch.float64)
    got = unlearncanvas_scores(acc_style, acc_object, "style", 0, ignored_styles=[2])
    assert got == pytest.approx({"ua": 0.8, "ira": 0.6, "cra": 0.6})
    got = unlearncanvas_scores(acc_style, acc_object, "object", 0, ignored_styles=[2])
    assert got == pytest.approx({"ua": 0.5, "ira": 0.7, "cra": 0.4})
    with pytest.raises(ValueError, match="cannot be a target"):
        unlearncanvas_scores(acc_style, acc_object, "style", 2, ignored_styles=[2])


def test_per_label_accuracy_accepts_scores_and_marks_unseen_labels() -> None:
    metric = PerLabelAccuracy(3)
    metric.update(torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]]), torch.tensor([0, 0]))
    acc = metric.compute()
    assert acc[0] == 0.5 and torch.isnan(acc[1:]).all()
    assert metric.higher_is_better is True


# ------------------------------------------------------------------------------------------- rates and distances


def test_attack_success_rate_follows_unlearndiffatk() -> None:
    metric = AttackSuccessRate()
    # 5 prompts: 1 succeeds before the attack; the attack wins 2 of the other 4. A pre-success stays a success.
    metric.update(torch.tensor([1, 0, 0, 0, 0]), torch.tensor([0, 1, 1, 0, 0]))
    assert metric.compute() == pytest.approx({"pre_asr": 0.2, "asr": 0.6})
    assert AttackSuccessRate.higher_is_better is False


def test_rate_kept_share_and_wasserstein() -> None:
    rate = TargetProportion()
    rate.update(torch.tensor([True, False, False, True]))
    assert float(rate.compute()) == 0.5
    assert TargetProportion.higher_is_better is False and RetainRate.higher_is_better is True

    kept = KeptShare(num_labels=3, target_index=0)
    kept.update(torch.tensor([0, 0, 1, 2]), before=True)  # others: 1 and 2 at 1/2 each
    kept.update(torch.tensor([1, 1, 1, 2]), before=False)  # others: 3/4 and 1/4
    assert float(kept.compute()) == pytest.approx(0.5 + 0.25)

    w1 = Wasserstein1()
    w1.update(torch.tensor([0.0, 1.0]), first=True)
    w1.update(torch.tensor([1.0, 2.0]), first=False)
    assert float(w1.compute()) == pytest.approx(1.0)


# --------------------------------------------------------------------------------- feature networks from files


def test_inception_features_load_a_local_torchvision_state_dict(tmp_path: Path) -> None:
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    assert inspect.signature(InceptionFeatures).parameters["input_size"].default == 299  # UnlearnCanvas' size
    features = InceptionFeatures(path, input_size=75)  # Inception's smallest input keeps the test cheap
    assert features(torch.rand(2, 3, 40, 40)).shape == (2, 2048)

    with pytest.raises(UserError, match="never downloaded.*--inception-weights"):
        InceptionFeatures(None)
    with pytest.raises(UserError, match="does not exist"):
        InceptionFeatures(tmp_path / "missing.pth")
    torch.save({"model_state_dict": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a torchvision inception_v3 state dict"):
        InceptionFeatures(tmp_path / "other.pth")


def test_vit_judge_loads_unlearncanvas_style_checkpoints(tmp_path: Path) -> None:
    """A tiny random timm ViT saved as {"model_state_dict": ...} stands in for UnlearnCanvas' ViT-Large judges."""
    import timm

    from evaluate.judges import ViTJudge
    from evaluate.protocols import UNLEARNCANVAS_OBJECTS, UNLEARNCANVAS_STYLES

    kwargs = {"img_size": 32, "patch_size": 16, "embed_dim": 16, "depth": 1, "num_heads": 2}
    paths = {}
    models = {}
    for axis, names in (("style", UNLEARNCANVAS_STYLES), ("object", UNLEARNCANVAS_OBJECTS)):
        torch.manual_seed(len(names))
        models[axis] = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(names),
                                         **kwargs).eval()
        paths[axis] = tmp_path / f"{axis}.pth"
        torch.save({"model_state_dict": models[axis].state_dict(), "epoch": 3}, paths[axis])
    labels = {"style": UNLEARNCANVAS_STYLES, "object": UNLEARNCANVAS_OBJECTS}
    judge = ViTJudge.from_checkpoints(paths, labels, arch="vit_tiny_patch16_224", model_kwargs=kwargs)
    assert len(judge.labels["style"]) == 51 and judge.labels["style"][38] == "Seed_Images"
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    predicted = judge.predict(images)
    resized = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
    with torch.no_grad():
        assert torch.equal(predicted["style"], models["style"](resized).argmax(1))
    concept = type("C", (), {"kind": "object", "name": UNLEARNCANVAS_OBJECTS[int(predicted["object"][0])]})()
    assert bool(judge.shows(images, concept)[0])

    with pytest.raises(UserError, match="does not fit timm"):
        ViTJudge.from_checkpoints({"style": paths["object"]}, {"style": UNLEARNCANVAS_STYLES},
                                  arch="vit_tiny_patch16_224", model_kwargs=kwargs)
