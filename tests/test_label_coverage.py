"""CatGAN's label-coverage term with a frozen zero-shot CLIP labeller, as MiniGAN training can use it."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from generators.label_coverage import ZeroShotLabels, coverage_loss
from generators.minigan import read_checkpoint_sidecar, train_minigan


def _tiny_clip(image_size: int = 8) -> CLIPModel:
    torch.manual_seed(0)
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": image_size // 4}
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    return CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)).eval()


def _labeller(clip: CLIPModel | None = None) -> ZeroShotLabels:
    """3 styles x 2 objects: six captions with random text embeddings."""
    clip = clip or _tiny_clip()
    text = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    labels = {"style": torch.tensor([0, 0, 1, 1, 2, 2]), "object": torch.tensor([0, 1, 0, 1, 0, 1])}
    return ZeroShotLabels(clip.vision_model, clip.visual_projection, text, labels, 10.0, [0.5] * 3, [0.5] * 3)


def test_coverage_loss_prefers_confident_samples_spread_over_every_label() -> None:
    eye = torch.eye(4)
    spread = {"style": eye[torch.arange(8) % 4]}  # each sample certain, the batch uniform
    collapsed = {"style": eye[torch.zeros(8, dtype=torch.long)]}  # each sample certain, always the same label
    blurry = {"style": torch.full((8, 4), 0.25)}  # no sample decided
    assert coverage_loss(spread).item() == pytest.approx(-math.log(4), abs=1e-5)
    assert coverage_loss(collapsed).item() == pytest.approx(0.0, abs=1e-5)
    assert coverage_loss(blurry).item() == pytest.approx(0.0, abs=1e-5)
    # Axes add up: style (4 labels) spread plus object (2 labels) spread.
    both = {**spread, "object": torch.eye(2)[torch.arange(8) % 2]}
    assert coverage_loss(both).item() == pytest.approx(-math.log(4) - math.log(2), abs=1e-5)
    # In a batch mostly drawn as label 0, its gradient moves the undecided samples towards the missing labels.
    logits = torch.zeros(8, 4)
    logits[:6, 0] = 5.0
    logits.requires_grad_(True)
    coverage_loss({"style": logits.softmax(-1)}).backward()
    undecided = logits.grad[6:]
    assert (undecided[:, 0] > 0).all() and (undecided[:, 1:] < 0).all()  # descent lowers label 0, raises the rest


def test_uniform_kl_marginal_pulls_hard_towards_a_label_no_sample_draws() -> None:
    eye = torch.eye(4)
    spread = {"style": eye[torch.arange(8) % 4]}
    assert coverage_loss(spread, "uniform_kl").item() == pytest.approx(0.0, abs=1e-5)
    # Label 3 nearly absent from every sample: CatGAN's entropy barely notices, KL(U || p̄) pulls towards it.
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.arange(8) % 3] = 4.0
    logits[:, 3] = -8.0
    pulls = {}
    for marginal in ("entropy", "uniform_kl"):
        x = logits.clone().requires_grad_(True)
        coverage_loss({"style": x.softmax(-1)}, marginal).backward()
        pulls[marginal] = -x.grad[:, 3].sum().item()  # how much descent raises label 3's logits
    assert pulls["uniform_kl"] > 100 * max(pulls["entropy"], 1e-12) and pulls["uniform_kl"] > 0.01
    assert coverage_loss({"style": logits.softmax(-1)}, "uniform_kl") > coverage_loss(spread, "uniform_kl") + 1
    with pytest.raises(ValueError, match="uniform_kl"):
        coverage_loss(spread, "kl")


def test_zero_shot_labels_marginalise_caption_probabilities_onto_each_axis() -> None:
    labeller = _labeller()
    images = (torch.rand(5, 3, 16, 16) * 2 - 1).requires_grad_(True)  # resized to the tower's 8 px
    probs = labeller(images)
    assert probs["style"].shape == (5, 3) and probs["object"].shape == (5, 2)
    for p in probs.values():
        assert torch.allclose(p.sum(-1), torch.ones(5), atol=1e-5)
    # The same as summing CLIP's caption softmax by hand.
    x = torch.nn.functional.interpolate(images.detach(), size=(8, 8), mode="bilinear", antialias=True)
    with torch.no_grad():
        emb = labeller.visual_projection(labeller.vision_model(pixel_values=x).pooler_output)
        captions = (10.0 * torch.nn.functional.normalize(emb, dim=-1) @ labeller.text_embeds.T).softmax(-1)
    assert torch.allclose(probs["style"], captions.view(5, 3, 2).sum(2), atol=1e-5)
    assert torch.allclose(probs["object"], captions.view(5, 3, 2).sum(1), atol=1e-5)
    # Gradients reach the images, never the frozen encoder.
    coverage_loss(probs).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in labeller.parameters())
    with pytest.raises(ValueError, match="caption_labels"):
        ZeroShotLabels(labeller.vision_model, labeller.visual_projection, torch.randn(6, 8),
                       {"style": torch.zeros(5, dtype=torch.long)}, 10.0, [0.5] * 3, [0.5] * 3)


def _squares(n: int, generator: torch.Generator) -> torch.Tensor:
    images = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, 8, 8).clone() * 2 - 1
    images[:, :, 2:6, 2:6] = torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1
    return images


_TINY = {"size": 8, "batch": 4, "device": "cpu", "seed": 3, "style_dim": 16, "n_mlp": 2, "channels": 8,
         "d_reg_every": 4, "g_reg_every": 2, "progress": False, "r1": 0.01, "path_regularize": 0.0, "mixing": 0.0,
         "checkpoint_every": 100}


def test_minigan_coverage_term_reaches_g_and_belongs_to_the_run_config(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    train_minigan(_squares, tmp_path / "cov", steps=3, labels=_labeller(), coverage_weight=2.0, log_every=1,
                  **_TINY)
    train_minigan(_squares, tmp_path / "plain", steps=3, **_TINY)
    sidecar = read_checkpoint_sidecar(tmp_path / "cov")
    assert sidecar["config"]["coverage_weight"] == 2.0 and "coverage" in sidecar["logs"]
    assert -math.log(3) - math.log(2) <= sidecar["logs"]["coverage"] <= math.log(3) + math.log(2)
    cov = load_file(next((tmp_path / "cov").glob("checkpoint-*.safetensors")))
    plain = load_file(next((tmp_path / "plain").glob("checkpoint-*.safetensors")))
    assert cov.keys() == plain.keys()  # a frozen labeller adds nothing to the checkpoint
    assert not torch.equal(cov["g.to_rgb1.conv.weight"], plain["g.to_rgb1.conv.weight"])

    # The term switches on at coverage_from_step: before it the run is plain StyleGAN2, bit for bit.
    train_minigan(_squares, tmp_path / "late", steps=3, labels=_labeller(), coverage_weight=2.0,
                  coverage_from_step=3, **_TINY)
    late = load_file(next((tmp_path / "late").glob("checkpoint-*.safetensors")))
    assert all(torch.equal(late[k], plain[k]) for k in plain)
    assert read_checkpoint_sidecar(tmp_path / "late")["config"]["coverage_from_step"] == 3
    with pytest.raises(ValueError, match="coverage_marginal"):
        train_minigan(_squares, tmp_path / "bad", steps=1, labels=_labeller(), coverage_weight=1.0,
                      coverage_marginal="kl", **_TINY)

    with pytest.raises(ValueError, match="label-coverage"):
        train_minigan(_squares, tmp_path / "a", steps=1, coverage_weight=1.0, **_TINY)
    with pytest.raises(ValueError, match="label-coverage"):
        train_minigan(_squares, tmp_path / "b", steps=1, labels=_labeller(), **_TINY)
    with pytest.raises(ValueError, match="different config"):  # a plain run cannot be resumed with the term
        train_minigan(_squares, tmp_path / "plain", steps=4, labels=_labeller(), coverage_weight=1.0, **_TINY)


def test_world_gan_stage_builds_the_labeller_from_miniclip(tmp_path: Path, monkeypatch) -> None:
    """`gan_coverage_weight > 0` labels with MiniCLIP's template captions of every (style, object) pair."""
    from generators.minicanvas import world as world_module
    from generators.minicanvas.concepts import OBJECTS, STYLES
    from generators.minicanvas.models import TEXT_MAX_LENGTH
    from generators.minicanvas.tokenizer import build_clip_tokenizer
    from generators.minicanvas.train import WorldSettings

    settings = WorldSettings(gan_steps=2, gan_batch=4, gan_channels=8, checkpoint_every=1, gan_coverage_weight=0.5,
                             gan_coverage_from_step=0, gan_coverage_marginal="uniform_kl")
    root = tmp_path / "world"
    with pytest.raises(FileNotFoundError, match="--only clip"):
        world_module.build(only=["gan"], device="cpu", out_dir=root, work_dir=tmp_path / "work", settings=settings)

    (root / "clip").mkdir(parents=True)
    clip = _tiny_clip(image_size=32)
    processor = SimpleNamespace(tokenizer=build_clip_tokenizer(TEXT_MAX_LENGTH),
                                image_processor=SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.5] * 3))
    monkeypatch.setattr(world_module, "load_clip", lambda device, root: (clip, processor))
    labeller = world_module._zero_shot_labels(root)
    probs = labeller(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert probs["style"].shape == (2, len(STYLES)) and probs["object"].shape == (2, len(OBJECTS))
    world_module.build(only=["gan"], device="cpu", out_dir=root, work_dir=tmp_path / "work", settings=settings)
    sidecar = read_checkpoint_sidecar(tmp_path / "work" / "gan")
    assert sidecar["config"]["coverage_weight"] == 0.5 and sidecar["step"] == 2 and "coverage" in sidecar["logs"]
    assert sidecar["config"]["coverage_marginal"] == "uniform_kl"


def _labelled_squares(n: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same images as `_squares`, labelled by the image's brightest colour channel on average."""
    images = _squares(n, generator)
    return images, {"colour": images.mean((2, 3)).argmax(1)}


def test_label_classifier_learns_real_labels_and_stays_undecided_on_fakes() -> None:
    from generators.label_coverage import LabelClassifier, classifier_d_loss

    torch.manual_seed(0)
    classifier = LabelClassifier({"colour": 3}, size=8, width=8)
    optim = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(0)
    fakes = torch.rand(64, 3, 8, 8, generator=data) * 2 - 1  # noise: nothing a real label describes
    first = None
    for _ in range(150):
        real, labels = _labelled_squares(64, data)
        loss, logs = classifier_d_loss(classifier, real, labels, fakes)
        first = first or {k: float(v) for k, v in logs.items()}
        optim.zero_grad()
        loss.backward()
        optim.step()
    real, labels = _labelled_squares(256, data)
    with torch.no_grad():
        accuracy = (classifier(real)["colour"].argmax(1) == labels["colour"]).float().mean().item()
        fake_entropy = -(classifier(fakes)["colour"] * classifier(fakes)["colour"].log()).sum(-1).mean().item()
    assert accuracy > 0.9 and logs["cls_real_ce"] < 0.5 * first["cls_real_ce"]
    assert fake_entropy > 0.9 * math.log(3)  # near-uniform on the fakes it was trained against
    with pytest.raises(ValueError, match="colour"):
        classifier_d_loss(classifier, real, {"style": labels["colour"]}, fakes)


def test_minigan_adversarial_classifier_is_trained_checkpointed_and_resumed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from generators.label_coverage import LabelClassifier

    def classifier() -> LabelClassifier:
        torch.manual_seed(5)
        return LabelClassifier({"colour": 3}, size=8, width=8)

    kwargs = {**_TINY, "coverage_weight": 1.0, "sample_labelled": _labelled_squares, "log_every": 1}
    straight = classifier()
    untrained = {k: v.clone() for k, v in straight.state_dict().items()}
    train_minigan(_squares, tmp_path / "straight", steps=4, classifier=straight, **kwargs)
    train_minigan(_squares, tmp_path / "resumed", steps=2, classifier=classifier(), **kwargs)
    resumed = classifier()  # a fresh module: the checkpoint restores it
    train_minigan(_squares, tmp_path / "resumed", steps=4, classifier=resumed, **kwargs)

    sidecar = read_checkpoint_sidecar(tmp_path / "straight")
    assert sidecar["config"]["coverage_labeller"] == "adversarial"
    assert {"coverage", "cls_real_ce", "cls_fake_entropy"} <= sidecar["logs"].keys()
    assert not torch.equal(straight.trunk[0].weight, untrained["trunk.0.weight"])  # the game trained it
    a = load_file(next((tmp_path / "straight").glob("checkpoint-*.safetensors")))
    b = load_file(next((tmp_path / "resumed").glob("checkpoint-*.safetensors")))
    assert "classifier.trunk.0.weight" in a and any(k.startswith("classifier_optim.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    assert torch.equal(straight.trunk[0].weight, resumed.trunk[0].weight)

    with pytest.raises(ValueError, match="not both"):
        train_minigan(_squares, tmp_path / "x", steps=1, labels=_labeller(), classifier=classifier(), **kwargs)
    with pytest.raises(ValueError, match="sample_labelled"):
        train_minigan(_squares, tmp_path / "y", steps=1, classifier=classifier(), coverage_weight=1.0, **_TINY)
    with pytest.raises(ValueError, match="different config"):  # a frozen-labeller run is a different run
        train_minigan(_squares, tmp_path / "straight", steps=5, labels=_labeller(), coverage_weight=1.0, **_TINY)


def test_world_gan_stage_trains_an_adversarial_classifier_on_minicanvas_labels(tmp_path: Path) -> None:
    """`gan_coverage_labeller: adversarial` needs no MiniCLIP: CatGAN's classifier learns the dataset's labels."""
    from safetensors.torch import load_file

    from generators.minicanvas import world as world_module
    from generators.minicanvas.concepts import OBJECTS, STYLES
    from generators.minicanvas.train import WorldSettings

    settings = WorldSettings(gan_steps=2, gan_batch=4, gan_channels=8, checkpoint_every=1, gan_coverage_weight=1.0,
                             gan_coverage_from_step=1, gan_coverage_labeller="adversarial", gan_classifier_width=8,
                             gan_classifier_pretrain_steps=2)
    world_module.build(only=["gan"], device="cpu", out_dir=tmp_path / "world", work_dir=tmp_path / "work",
                       settings=settings)
    sidecar = read_checkpoint_sidecar(tmp_path / "work" / "gan")
    assert sidecar["config"]["coverage_labeller"] == "adversarial" and "cls_real_ce" in sidecar["logs"]
    tensors = load_file(tmp_path / "work" / "gan" / sidecar["tensors"])
    assert tensors["classifier.heads.style.weight"].shape[0] == len(STYLES)
    assert tensors["classifier.heads.object.weight"].shape[0] == len(OBJECTS)
    assert (tmp_path / "world" / "gan" / "generator.safetensors").is_file()
    assert not any("classifier" in k for k in load_file(tmp_path / "world" / "gan" / "discriminator.safetensors"))


def test_pretrain_classifier_learns_the_labels_on_its_own_data_stream() -> None:
    from generators.label_coverage import LabelClassifier, pretrain_classifier

    def trained(seed: int) -> LabelClassifier:
        torch.manual_seed(0)
        classifier = LabelClassifier({"colour": 3}, size=8, width=8)
        pretrain_classifier(classifier, _labelled_squares, steps=150, batch=64, lr=3e-3, seed=seed, progress=False)
        return classifier

    classifier = trained(0)
    real, labels = _labelled_squares(256, torch.Generator().manual_seed(123))
    with torch.no_grad():
        accuracy = (classifier(real)["colour"].argmax(1) == labels["colour"]).float().mean().item()
    assert accuracy > 0.9
    assert not any(p.requires_grad for p in classifier.parameters())  # handed back frozen, as training expects
    assert torch.equal(trained(0).heads["colour"].weight, classifier.heads["colour"].weight)  # deterministic
    assert not torch.equal(trained(1).heads["colour"].weight, classifier.heads["colour"].weight)
