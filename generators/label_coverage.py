"""A label-coverage term for unconditional GAN training: every concept drawn, each drawn clearly.

CatGAN (Springenberg, "Unsupervised and Semi-supervised Learning with Categorical Generative Adversarial
Networks", ICLR 2016) trains an unconditional generator so that a classifier's prediction is *confident* on each
sample (low conditional entropy ``E_x H[p(y|x)]``) while the predictions over a batch are *spread* over the classes
(high marginal entropy ``H[E_x p(y|x)]``). Here the classifier is a frozen zero-shot CLIP: ``p(y|x)`` comes from the
image's similarity to one caption per combination of labels, marginalised onto each label axis (style, object). The
generator stays unconditional; the term only adds gradients towards concepts it under-draws and away from blurred,
in-between images. A frozen encoder also leaves no state to checkpoint.

A frozen labeller can be fooled: the generator may find images it accepts as a concept that no other judge would.
CatGAN's own classifier sits on the discriminator's side and is trained *adversarially* with the GAN
(:class:`LabelClassifier`, :func:`classifier_d_loss`): decided on real images (here with their labels, CatGAN's
semi-supervised form, as a cross-entropy) and undecided on fakes (maximum conditional entropy), so that the
generator's coverage term has to be earned against a moving opponent.

Why MiniGAN wants it: trained with StyleGAN2's losses alone, it dropped five of MiniCanvas' twelve styles almost
entirely and drew soft object shapes (docs/gan_erasure.md). The judge that ``world verify`` uses (the MiniCanvas
classifier) is a different network, never seen by training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from generators.feature_discriminator import clip_pixel_values

__all__ = [
    "MARGINALS",
    "LabelClassifier",
    "ZeroShotLabels",
    "classifier_d_loss",
    "coverage_loss",
    "pretrain_classifier",
]


class ZeroShotLabels(nn.Module):
    """Frozen CLIP zero-shot labeller: images in [-1, 1] -> per-axis label probabilities.

    Args:
        vision_model: the CLIP vision tower (a transformers ``CLIPVisionTransformer``/``CLIPVisionModel``).
        visual_projection: CLIP's image projection (``CLIPModel.visual_projection``).
        text_embeds: (n_captions, d) projected caption embeddings, one caption per label combination.
        caption_labels: axis name -> (n_captions,) integer label of each caption on that axis.
        logit_scale: CLIP's temperature (``CLIPModel.logit_scale.exp()``).
        image_mean, image_std: the image processor's normalisation (images are mapped to [0, 1] first).
    """

    def __init__(
        self,
        vision_model: nn.Module,
        visual_projection: nn.Module,
        text_embeds: Tensor,
        caption_labels: Mapping[str, Tensor],
        logit_scale: float,
        image_mean: Sequence[float],
        image_std: Sequence[float],
    ) -> None:
        super().__init__()
        self.vision_model = vision_model.eval()
        self.visual_projection = visual_projection.eval()
        self.vision_model.requires_grad_(False)
        self.visual_projection.requires_grad_(False)
        self.image_size = int(vision_model.config.image_size)
        self.logit_scale = float(logit_scale)
        n = text_embeds.shape[0]
        self.axes = tuple(caption_labels)
        for axis, labels in caption_labels.items():
            if labels.shape != (n,):
                raise ValueError(f"caption_labels[{axis!r}] must have shape ({n},), got {tuple(labels.shape)}")
            # (n_captions, n_labels) one-hot: sums caption probabilities onto the axis' labels.
            self.register_buffer(f"_onehot_{axis}", F.one_hot(labels.long()).float(), persistent=False)
        self.register_buffer("text_embeds", F.normalize(text_embeds.detach().float(), dim=-1), persistent=False)
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ZeroShotLabels:
        super().train(mode)
        self.vision_model.eval()
        self.visual_projection.eval()
        return self

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = clip_pixel_values(images, self.mean, self.std, self.image_size)
        pooled = self.vision_model(pixel_values=x).pooler_output
        image_embeds = F.normalize(self.visual_projection(pooled), dim=-1)
        captions = (self.logit_scale * image_embeds @ self.text_embeds.T).softmax(dim=-1)
        return {axis: captions @ getattr(self, f"_onehot_{axis}") for axis in self.axes}


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


MARGINALS = ("entropy", "uniform_kl")


def coverage_loss(probs: Mapping[str, Tensor], marginal: str = "entropy") -> Tensor:
    """The coverage term, summed over axes: conditional entropy ``E_x H[p(y|x)]`` plus a batch-marginal term.

    ``marginal="entropy"``: CatGAN's ``-H[p̄]`` with ``p̄ = E_x p(y|x)`` over the batch; each axis' term then lies in
    ``[-log n, log n]`` and is minimal (``-log n``) when every sample is labelled with certainty and the batch
    covers the n labels uniformly. Its gradient towards a label that no sample comes near vanishes (``∂H/∂p̄_k =
    -log p̄_k - 1`` is multiplied by the samples' tiny ``p_k``), so a dropped mode stays dropped.

    ``marginal="uniform_kl"``: ``KL(U ‖ p̄) = -log n - mean_k log p̄_k`` instead (our choice, not CatGAN's), whose
    gradient ``-1/(n p̄_k)`` grows as a label's batch share shrinks: the samples nearest to a missing label are
    pulled towards it. Minimal (0) at the same point; the term lies in ``[0, log n + ∞)``.
    """
    if marginal not in MARGINALS:
        raise ValueError(f"unknown marginal term {marginal!r}; allowed: {', '.join(MARGINALS)}")
    total = torch.zeros(())
    for p in probs.values():
        mean = p.mean(0)
        if marginal == "entropy":
            spread = -_entropy(mean)
        else:
            spread = -math.log(mean.numel()) - mean.clamp_min(1e-12).log().mean()
        total = total + _entropy(p).mean() + spread
    return total


class LabelClassifier(nn.Module):
    """CatGAN's discriminator-side classifier: a small convolutional network with one softmax head per label axis.

    A 3x3 convolution and leaky ReLU per resolution, each followed by 2x average pooling, from ``size`` down to
    4 px (widths ``width``, ``2 width``, ``4 width``, then ``4 width``), and a linear head per axis on the
    flattened 4 x 4 map (positions kept: objects are shapes). Convolving at the full resolution only with the
    narrow first layer keeps it cheap next to the GAN it trains beside. Trained with :func:`classifier_d_loss`;
    the generator reads its probabilities through :func:`coverage_loss`. Images in [-1, 1], (B, 3, size, size).
    """

    def __init__(self, n_labels: Mapping[str, int], size: int = 32, width: int = 32) -> None:
        super().__init__()
        if size < 8 or size & (size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {size}")
        self.axes = tuple(n_labels)
        layers: list[nn.Module] = []
        channels, resolution, out = 3, size, width
        while resolution > 4:
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.LeakyReLU(0.2), nn.AvgPool2d(2)]
            channels, resolution, out = out, resolution // 2, min(out * 2, width * 4)
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.heads = nn.ModuleDict({axis: nn.Linear(channels * 16, int(n)) for axis, n in n_labels.items()})

    def logits(self, images: Tensor) -> dict[str, Tensor]:
        features = self.trunk(images)
        return {axis: head(features) for axis, head in self.heads.items()}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return {axis: logits.softmax(-1) for axis, logits in self.logits(images).items()}


def _cross_entropies(
    classifier: LabelClassifier, images: Tensor, labels: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    logits = classifier.logits(images)
    return {a: F.cross_entropy(logits[a], labels[a].long()) for a in classifier.axes}


def classifier_d_loss(
    classifier: LabelClassifier, real: Tensor, real_labels: Mapping[str, Tensor], fake: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """The classifier's side of the game, summed over axes: ``CE(real, labels) - E_fake H[p(y|fake)]``.

    CatGAN's discriminator objective with labelled real data: the classifier is decided and right on real images
    and undecided on the generator's (its ``E H[p(y|x)]`` on fakes is maximised). Returns the loss and, detached,
    the real cross-entropy and the mean entropy on fakes.
    """
    missing = [axis for axis in classifier.axes if axis not in real_labels]
    if missing:
        raise ValueError(f"real_labels lacks the classifier's axes {missing}")
    cross_entropy = sum(_cross_entropies(classifier, real, real_labels).values())
    fake_probs = classifier(fake)
    fake_entropy = sum(_entropy(fake_probs[a]).mean() for a in classifier.axes)
    logs = {"cls_real_ce": cross_entropy.detach(), "cls_fake_entropy": fake_entropy.detach()}
    return cross_entropy - fake_entropy, logs


def pretrain_classifier(
    classifier: LabelClassifier,
    sample_labelled: Callable[[int, torch.Generator], tuple[Tensor, Mapping[str, Tensor]]],
    steps: int,
    batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``classifier`` on labelled real images alone (summed cross-entropy over axes, Adam), in place.

    A head start before the adversarial game: from scratch the classifier reads MiniCanvas objects at chance for
    hundreds of steps, during which its probabilities give the generator nothing to follow. Deterministic for a
    given ``seed`` (its own data stream). Returns the last step's per-axis cross-entropies.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    classifier.requires_grad_(True)
    last: dict[str, float] = {}
    for _ in tqdm(range(steps), desc="coverage classifier", disable=not progress):
        images, labels = sample_labelled(batch, generator)
        losses = _cross_entropies(classifier, images, labels)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        last = {a: float(v.detach()) for a, v in losses.items()}
    classifier.requires_grad_(False)
    return last
