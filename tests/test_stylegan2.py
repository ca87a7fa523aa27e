"""Tests for the rosinality-compatible StyleGAN2 backbone, its checkpoint I/O and MiniGAN training."""

from __future__ import annotations

import argparse
import json
import pickle
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from generators.minigan import EXPORT_NAME, SIDECAR_NAME, train_minigan
from generators.stylegan2 import Discriminator, Generator, StyleGAN2Config, rosinality_channels
from generators.stylegan2_io import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    infer_generator_config,
    load_generator_safetensors,
    load_rosinality_checkpoint,
    save_generator_safetensors,
    save_rosinality_checkpoint,
)


def _perturb_zero_initialised(module: torch.nn.Module, seed: int) -> None:
    """Make noise strengths and biases non-zero so that a round trip exercises every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("noise.weight", "bias")):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def _small_generator(seed: int = 0, size: int = 16) -> Generator:
    torch.manual_seed(seed)
    g = Generator(size, 32, 2, channels={4: 16, 8: 16, 16: 8, 32: 8})
    _perturb_zero_initialised(g, seed)
    return g.eval()


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny or run once, and a shared CPU makes threads spin-wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def config_f_256() -> Generator:
    torch.manual_seed(0)
    g = Generator(256, 512, 8, channel_multiplier=2)
    _perturb_zero_initialised(g, 0)
    return g.eval()


# --- (a) strict rosinality round trip --------------------------------------------------------------------------


def test_rosinality_config_f_round_trip(config_f_256: Generator, tmp_path: Path) -> None:
    g_ema = config_f_256
    torch.manual_seed(1)
    g = Generator(256, 512, 8, channel_multiplier=2)
    d = Discriminator(256, channel_multiplier=2)
    latent_avg = torch.randn(512)
    path = tmp_path / "stylegan2-config-f-256.pt"
    torch.save(
        {"g_ema": g_ema.state_dict(), "g": g.state_dict(), "d": d.state_dict(), "latent_avg": latent_avg},
        path,
    )

    ckpt = load_rosinality_checkpoint(path)

    assert ckpt.generator_config == StyleGAN2Config(size=256, style_dim=512, n_mlp=8, channel_multiplier=2)
    assert ckpt.discriminator_config is not None and ckpt.discriminator_config.channel_multiplier == 2
    assert ckpt.g is not None and ckpt.d is not None and ckpt.latent_avg is not None
    assert torch.equal(ckpt.latent_avg, latent_avg)
    for original, loaded in ((g_ema, ckpt.g_ema), (g, ckpt.g), (d, ckpt.d)):
        loaded_state = loaded.state_dict()
        assert list(loaded_state) == list(original.state_dict())
        assert all(torch.equal(v, loaded_state[k]) for k, v in original.state_dict().items())

    z = torch.randn(1, 512, generator=torch.Generator().manual_seed(7))
    noise = g_ema.make_noise(torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected, _ = g_ema([z], noise=noise)
        actual, _ = ckpt.g_ema([z], noise=noise)
    assert expected.shape == (1, 3, 256, 256)
    assert torch.equal(expected, actual)


def test_rosinality_names_and_shapes(config_f_256: Generator) -> None:
    params = dict(config_f_256.named_parameters())
    buffers = dict(config_f_256.named_buffers())
    assert params["style.1.weight"].shape == (512, 512)
    assert params["style.8.bias"].shape == (512,)
    assert "style.9.weight" not in params
    assert params["input.input"].shape == (1, 512, 4, 4)
    assert params["conv1.conv.weight"].shape == (1, 512, 512, 3, 3)
    assert params["conv1.conv.modulation.weight"].shape == (512, 512)
    assert params["conv1.noise.weight"].shape == (1,)
    assert params["conv1.activate.bias"].shape == (512,)
    assert params["to_rgb1.conv.weight"].shape == (1, 3, 512, 1, 1)
    assert params["to_rgb1.bias"].shape == (1, 3, 1, 1)
    assert params["convs.0.conv.modulation.weight"].shape == (512, 512)
    assert params["convs.11.conv.weight"].shape == (1, 128, 128, 3, 3)  # 256 px: 64 * channel_multiplier
    assert "convs.12.conv.weight" not in params
    assert params["to_rgbs.0.conv.weight"].shape == (1, 3, 512, 1, 1)
    assert params["to_rgbs.5.conv.weight"].shape == (1, 3, 128, 1, 1)
    assert buffers["convs.0.conv.blur.kernel"].shape == (4, 4)
    assert "convs.1.conv.blur.kernel" not in buffers
    assert buffers["to_rgbs.0.upsample.kernel"].shape == (4, 4)
    assert buffers["noises.noise_0"].shape == (1, 1, 4, 4)
    assert buffers["noises.noise_12"].shape == (1, 1, 256, 256)
    assert len([k for k in buffers if k.startswith("noises.")]) == 13
    assert config_f_256.n_latent == 14
    assert config_f_256.channels == rosinality_channels(2)

    d = Discriminator(32, channel_multiplier=2)
    d_names = {k: v.shape for k, v in d.state_dict().items()}
    assert d_names["convs.0.0.weight"] == (512, 3, 1, 1)
    assert d_names["convs.0.1.bias"] == (512,)
    assert d_names["convs.1.conv1.0.weight"] == (512, 512, 3, 3)
    assert d_names["convs.1.conv2.0.kernel"] == (4, 4)
    assert d_names["convs.1.conv2.1.weight"] == (512, 512, 3, 3)
    assert d_names["convs.1.skip.0.kernel"] == (4, 4)
    assert d_names["convs.1.skip.1.weight"] == (512, 512, 1, 1)
    assert "convs.1.skip.1.bias" not in d_names
    assert d_names["final_conv.0.weight"] == (512, 513, 3, 3)
    assert d_names["final_linear.0.weight"] == (512, 512 * 16)
    assert d_names["final_linear.1.weight"] == (1, 512)


def test_train_py_style_checkpoint_with_args_and_custom_channels(tmp_path: Path) -> None:
    """rosinality train.py stores argparse args and optimiser states; custom widths are inferred."""
    g = _small_generator()
    d = Discriminator(16, channels={4: 16, 8: 16, 16: 8})
    optim = torch.optim.Adam(g.parameters())
    path = tmp_path / "000100.pt"
    torch.save(
        {
            "g": g.state_dict(),
            "d": d.state_dict(),
            "g_ema": g.state_dict(),
            "g_optim": optim.state_dict(),
            "d_optim": optim.state_dict(),
            "args": argparse.Namespace(size=16, latent=32, n_mlp=2, channel_multiplier=2),
            "ada_aug_p": 0.0,
        },
        path,
    )
    ckpt = load_rosinality_checkpoint(path)
    assert ckpt.g is not None and ckpt.g.input.input.data_ptr() != ckpt.g_ema.input.input.data_ptr()
    assert all(p.requires_grad for p in ckpt.g.parameters())
    assert ckpt.generator_config.channels == {4: 16, 8: 16, 16: 8}
    assert (ckpt.generator_config.size, ckpt.generator_config.style_dim, ckpt.generator_config.n_mlp) == (
        16,
        32,
        2,
    )
    assert ckpt.d is not None and ckpt.d.channels == {4: 16, 8: 16, 16: 8}

    # Our writer produces the same layout.
    save_rosinality_checkpoint(tmp_path / "out.pt", g, g=g, d=d, latent_avg=torch.zeros(32))
    again = load_rosinality_checkpoint(tmp_path / "out.pt")
    assert again.generator_config == ckpt.generator_config
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_without_g_ema_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointFormatError, match="g_ema"):
        load_rosinality_checkpoint(path)
    with pytest.raises(CheckpointFormatError):
        infer_generator_config({"style.1.weight": torch.zeros(2, 2)})


# --- (b) malicious pickles are refused ---------------------------------------------------------------------------


class _CreatesFile:
    """Unpickling this object would create a file: a stand-in for arbitrary code execution."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.target), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_checkpoint_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"g_ema": {"style.1.weight": torch.zeros(1)}, "payload": _CreatesFile(target)}, evil)

    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        load_rosinality_checkpoint(evil)
    assert not target.exists()

    raw = tmp_path / "raw_pickle.pt"
    raw.write_bytes(pickle.dumps({"g_ema": _CreatesFile(target)}))
    with pytest.raises(ValueError, match="raw_pickle.pt"):
        load_rosinality_checkpoint(raw)
    assert not target.exists()


# --- (c) truncation, style mixing, noise -------------------------------------------------------------------------


def test_truncation_and_style_mixing() -> None:
    g = _small_generator()
    gen = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(2, 32, generator=gen), torch.randn(2, 32, generator=gen)
    mean = g.mean_latent(256, generator=gen)
    with torch.no_grad():
        a, _ = g([z1], truncation=0.0, truncation_latent=mean, randomize_noise=False)
        b, _ = g([z2], truncation=0.0, truncation_latent=mean, randomize_noise=False)
        c, _ = g([mean.repeat(2, 1)], input_is_latent=True, randomize_noise=False)
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)
        assert torch.allclose(a[0], a[1], atol=1e-6)

        only1, _ = g([z1], randomize_noise=False)
        only2, _ = g([z2], randomize_noise=False)
        assert not torch.allclose(only1, only2)
        mixed, latent = g([z1, z2], inject_index=3, randomize_noise=False, return_latents=True)
        assert latent is not None and latent.shape == (2, g.n_latent, 32)
        w1, w2 = g.get_latent(z1), g.get_latent(z2)
        assert torch.allclose(latent[:, 2], w1) and torch.allclose(latent[:, 3], w2)
        assert not torch.allclose(mixed, only1) and not torch.allclose(mixed, only2)
        all_first, _ = g([z1, z2], inject_index=g.n_latent, randomize_noise=False)
        all_second, _ = g([z1, z2], inject_index=0, randomize_noise=False)
        assert torch.allclose(all_first, only1, atol=1e-6) and torch.allclose(all_second, only2, atol=1e-6)

        # Noise: stored buffers are deterministic, fresh noise differs, explicit lists are honoured.
        again, _ = g([z1], randomize_noise=False)
        fresh, _ = g([z1])
        explicit, _ = g([z1], noise=g.noise_buffers())
        assert torch.equal(only1, again) and torch.equal(only1, explicit)
        assert not torch.allclose(only1, fresh)


def test_generator_safetensors_round_trip(tmp_path: Path) -> None:
    g = _small_generator()
    save_generator_safetensors(g, tmp_path / "g.safetensors")
    save_generator_safetensors(g, tmp_path / "g16.safetensors", dtype=torch.float16)
    loaded = load_generator_safetensors(tmp_path / "g.safetensors")
    loaded16 = load_generator_safetensors(tmp_path / "g16.safetensors")
    assert loaded.config == g.config
    z = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = g([z], randomize_noise=False)
        out, _ = loaded([z], randomize_noise=False)
        out16, _ = loaded16([z], randomize_noise=False)
    assert torch.equal(ref, out)
    assert torch.allclose(ref, out16, atol=0.05)
    assert (tmp_path / "g16.safetensors").stat().st_size < (tmp_path / "g.safetensors").stat().st_size
    assert not list(tmp_path.glob(".*.tmp"))


# --- (d) MiniGAN training resumes bit-identically ----------------------------------------------------------------


def _coloured_squares(n: int, generator: torch.Generator, size: int = 8) -> torch.Tensor:
    """A tiny synthetic dataset: one random-coloured square on a random-coloured background."""
    images = torch.empty(n, 3, size, size)
    for i in range(n):
        background = torch.rand(3, 1, 1, generator=generator) * 2 - 1
        colour = torch.rand(3, 1, 1, generator=generator) * 2 - 1
        side = int(torch.randint(2, size // 2 + 1, (), generator=generator))
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
        images[i] = background
        images[i, :, y : y + side, x : x + side] = colour
    return images


_TINY = {
    "size": 8,
    "batch": 4,
    "device": "cpu",
    "seed": 5,
    "style_dim": 16,
    "n_mlp": 2,
    "channels": 8,
    "d_reg_every": 4,
    "g_reg_every": 2,
    "progress": False,
}


def _checkpoint_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next(out_dir.glob("checkpoint-*.safetensors")))


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _checkpoint_tensors(a), _checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different


def test_minigan_resume_is_bit_identical(tmp_path: Path) -> None:
    steps = 6
    reference = train_minigan(
        _coloured_squares, tmp_path / "uninterrupted", steps=steps, checkpoint_every=100, **_TINY
    )

    calls = {"n": 0}

    def interrupting_sampler(n: int, generator: torch.Generator) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the middle of the third step
            signal.raise_signal(signal.SIGINT)
        return _coloured_squares(n, generator)

    interrupted_dir = tmp_path / "interrupted"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    with pytest.raises(KeyboardInterrupt):
        train_minigan(interrupting_sampler, interrupted_dir, steps=steps, checkpoint_every=100, **_TINY)
    assert signal.getsignal(signal.SIGINT) is before
    assert json.loads((interrupted_dir / SIDECAR_NAME).read_text())["step"] == 3
    assert not (interrupted_dir / EXPORT_NAME).exists()
    resumed = train_minigan(_coloured_squares, interrupted_dir, steps=steps, checkpoint_every=100, **_TINY)

    extended_dir = tmp_path / "extended"
    train_minigan(_coloured_squares, extended_dir, steps=2, checkpoint_every=1, **_TINY)
    train_minigan(_coloured_squares, extended_dir, steps=steps, checkpoint_every=1, **_TINY)

    for ref_value, value in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(ref_value, value)
    _assert_same_checkpoint(tmp_path / "uninterrupted", interrupted_dir)
    _assert_same_checkpoint(tmp_path / "uninterrupted", extended_dir)
    assert len(list(extended_dir.glob("checkpoint-*.safetensors"))) == 1
    exported = load_generator_safetensors(interrupted_dir / EXPORT_NAME)
    assert exported.size == 8 and exported.style_dim == 16

    with pytest.raises(ValueError, match="different config"):
        train_minigan(
            _coloured_squares, extended_dir, steps=steps, checkpoint_every=1, **{**_TINY, "seed": 6}
        )


def test_minigan_default_size_budget() -> None:
    g = Generator(32, 128, 4, channels={4: 128, 8: 128, 16: 128, 32: 128})
    fp16_bytes = 2 * sum(t.numel() for t in g.state_dict().values())
    assert fp16_bytes <= 8 * 1024 * 1024


def test_world_gan_stage_ships_generator_and_discriminator(tmp_path: Path) -> None:
    """`world build --only gan` publishes g_ema and the trained D, both loading strictly into fresh models."""
    from safetensors.torch import load_file

    from generators.minicanvas.train import WorldSettings
    from generators.minicanvas.world import build
    from generators.stylegan2_io import load_generator_safetensors

    settings = WorldSettings(gan_steps=2, gan_batch=4, gan_channels=8, checkpoint_every=1, gan_coverage_weight=0)
    build(only=["gan"], device="cpu", out_dir=tmp_path / "world", work_dir=tmp_path / "work", settings=settings)
    folder = tmp_path / "world" / "gan"
    g = load_generator_safetensors(folder / "generator.safetensors")
    assert g.size == 32 and set(g.channels.values()) == {8}
    d = Discriminator(32, channels=g.channels)
    state = load_file(folder / "discriminator.safetensors")
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    d.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    info = json.loads((tmp_path / "world" / "build_info.json").read_text())
    assert info["stages"]["gan"]["settings"]["gan_channels"] == 8
    sidecar = json.loads((tmp_path / "work" / "gan" / SIDECAR_NAME).read_text())
    assert info["stages"]["gan"]["train_seconds"]["minigan"] == sidecar["train_seconds"] > 0


def test_world_gan_stage_continues_from_the_published_gan(tmp_path: Path) -> None:
    """A fresh checkout (no training folder) continues the published MiniGAN instead of starting from scratch."""
    from safetensors import safe_open

    from generators.minicanvas.train import WorldSettings
    from generators.minicanvas.world import build
    from generators.minigan import published_step
    from generators.stylegan2_io import load_generator_safetensors

    world = tmp_path / "world"
    settings = WorldSettings(gan_steps=2, gan_batch=4, gan_channels=8, checkpoint_every=1, gan_coverage_weight=0)
    build(only=["gan"], device="cpu", out_dir=world, work_dir=tmp_path / "work", settings=settings)
    assert published_step(world / "gan") == 2
    first = load_generator_safetensors(world / "gan" / "generator.safetensors")

    # Asking for no more steps than published is refused before anything is trained or published.
    with pytest.raises(ValueError, match="already at step 2"):
        build(only=["gan"], device="cpu", out_dir=world, work_dir=tmp_path / "fresh0", settings=settings,
              continue_gan=True)

    more = settings.model_copy(update={"gan_steps": 3})
    build(only=["gan"], device="cpu", out_dir=world, work_dir=tmp_path / "fresh", settings=more, continue_gan=True)
    sidecar = json.loads((tmp_path / "fresh" / "gan" / SIDECAR_NAME).read_text())
    assert sidecar["step"] == 3 and sidecar["warm_start_step"] == 2
    with safe_open(str(world / "gan" / "generator.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["step"] == "3" and meta["continued_from_published_step"] == "2"
    # One step of training from the published weights: near them, not equal, far from a fresh initialisation.
    second = load_generator_safetensors(world / "gan" / "generator.safetensors")
    torch.manual_seed(settings.gan_seed)
    fresh = Generator.from_config(first.config)

    def distance(a: Generator, b: Generator) -> float:
        return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters(), strict=True))

    assert 0 < distance(second, first) < distance(fresh, first) / 10
