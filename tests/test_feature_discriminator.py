"""The frozen-feature ("vision-aided") discriminator that MiniGAN training can add next to StyleGAN2's D."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from generators.feature_discriminator import CLIPPatchFeatures, FeatureDiscriminator
from generators.minigan import read_checkpoint_sidecar, train_minigan


def _tiny_clip_features(layers: tuple[int, ...] = (1, 2)) -> CLIPPatchFeatures:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=8, patch_size=2, projection_dim=8)
    return CLIPPatchFeatures(CLIPVisionModel(config), [0.5] * 3, [0.5] * 3, layers)


def _squares(n: int, generator: torch.Generator) -> torch.Tensor:
    images = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, 8, 8).clone() * 2 - 1
    images[:, :, 2:6, 2:6] = torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1
    return images


_TINY = {"size": 8, "batch": 4, "device": "cpu", "seed": 3, "style_dim": 16, "n_mlp": 2, "channels": 8,
         "d_reg_every": 4, "g_reg_every": 2, "progress": False, "r1": 0.01, "path_regularize": 0.0, "mixing": 0.0}


def test_patch_features_are_frozen_maps_that_pass_gradients_to_the_image() -> None:
    features = _tiny_clip_features()
    images = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_(True)  # resized to the encoder's 8 px
    maps = features(images)
    assert [tuple(m.shape) for m in maps] == [(3, 16, 4, 4), (3, 16, 4, 4)]
    head = FeatureDiscriminator(16, 2, width=8)
    logits = head(maps)
    assert logits.shape == (3, 2 * 2 * 2)  # two heads, each a 2x2 logit map after the stride-2 conv
    logits.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in features.parameters())
    # Normalisation uses the processor's mean/std: a mid-grey image is the encoder's zero input.
    grey = torch.zeros(1, 3, 8, 8)
    direct = features.vision_model(pixel_values=grey, output_hidden_states=True).hidden_states[1][:, 1:]
    assert torch.allclose(features(grey)[0].flatten(2).transpose(1, 2), direct)
    with pytest.raises(ValueError, match="layers"):
        _tiny_clip_features(layers=(3,))


def test_feature_head_trains_and_resumes_bit_identically(tmp_path: Path) -> None:
    def run(folder: Path, steps: int) -> None:
        train_minigan(_squares, folder, steps=steps, checkpoint_every=100, features=_tiny_clip_features(),
                      feature_d_weight=1.0, feature_d_width=8, **_TINY)

    run(tmp_path / "straight", 4)
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4)
    from safetensors.torch import load_file

    a = load_file(next((tmp_path / "straight").glob("checkpoint-*.safetensors")))
    b = load_file(next((tmp_path / "split").glob("checkpoint-*.safetensors")))
    assert any(k.startswith("feature_d.") for k in a) and any(k.startswith("feature_d_optim.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sidecar = read_checkpoint_sidecar(tmp_path / "straight")
    assert sidecar["config"]["feature_d_weight"] == 1.0 and sidecar["config"]["feature_d_layers"] == [1, 2]
    assert "feature_d" in sidecar["logs"] and "feature_g" in sidecar["logs"]

    # The head's loss reaches G: the same seed without it trains a different generator.
    train_minigan(_squares, tmp_path / "plain", steps=4, checkpoint_every=100, **_TINY)
    plain = load_file(next((tmp_path / "plain").glob("checkpoint-*.safetensors")))
    assert not any(k.startswith("feature_d") for k in plain)
    assert not torch.equal(plain["g.to_rgb1.conv.weight"], a["g.to_rgb1.conv.weight"])


def test_feature_discriminator_settings_must_agree(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="feature discriminator"):
        train_minigan(_squares, tmp_path / "a", steps=1, features=_tiny_clip_features(), feature_d_weight=0.0,
                      **_TINY)
    with pytest.raises(ValueError, match="feature discriminator"):
        train_minigan(_squares, tmp_path / "b", steps=1, feature_d_weight=1.0, **_TINY)
    train_minigan(_squares, tmp_path / "c", steps=1, **_TINY)
    with pytest.raises(ValueError, match="different config"):  # a plain run cannot be resumed with the head
        train_minigan(_squares, tmp_path / "c", steps=2, features=_tiny_clip_features(), feature_d_weight=1.0,
                      **_TINY)


def test_world_gan_stage_trains_with_the_feature_discriminator(tmp_path: Path, monkeypatch) -> None:
    """`gan_feature_d_weight > 0` reads MiniCLIP from the world; only G and the StyleGAN2 D are published."""
    import json
    from types import SimpleNamespace

    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    from generators.minicanvas import world as world_module
    from generators.minicanvas.train import WorldSettings
    from generators.stylegan2 import Discriminator

    settings = WorldSettings(gan_steps=2, gan_batch=4, gan_channels=8, checkpoint_every=1, gan_feature_d_weight=0.5,
                             gan_coverage_weight=0)
    root = tmp_path / "world"
    with pytest.raises(FileNotFoundError, match="--only clip"):
        world_module.build(only=["gan"], device="cpu", out_dir=root, work_dir=tmp_path / "work", settings=settings)

    (root / "clip").mkdir(parents=True)
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8))
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.5] * 3))
    monkeypatch.setattr(world_module, "load_clip", lambda device, root: (clip, processor))
    world_module.build(only=["gan"], device="cpu", out_dir=root, work_dir=tmp_path / "work", settings=settings)

    sidecar = json.loads((tmp_path / "work" / "gan" / "checkpoint.json").read_text())
    assert sidecar["config"]["feature_d_weight"] == 0.5
    assert sidecar["config"]["feature_d_layers"] == list(world_module.GAN_FEATURE_LAYERS)
    state = load_file(root / "gan" / "discriminator.safetensors")
    assert not any("feature" in k for k in state)
    Discriminator(32, channels={4: 8, 8: 8, 16: 8, 32: 8}).load_state_dict(
        {k: v.float() for k, v in state.items()}, strict=True
    )
