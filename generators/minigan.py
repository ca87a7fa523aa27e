"""MiniGAN: a small unconditional StyleGAN2 trained on procedurally generated 32 px images.

The training recipe follows StyleGAN2 (Karras et al., CVPR 2020) as implemented by rosinality's ``train.py``:

* non-saturating logistic loss for G and D (Goodfellow et al. 2014);
* lazy regularisation (paper, Sec. 3.1): R1 on real images every ``d_reg_every`` D steps and path-length
  regularisation (paper, Sec. 3.2) every ``g_reg_every`` G steps, each weighted by its interval, with Adam's
  learning rate and betas rescaled by ``interval / (interval + 1)``;
* Adam with betas (0, 0.99), style mixing with probability ``mixing``, and an exponential moving average of G
  (``g_ema``) whose half-life is given in thousands of images.

Optionally (``features`` + ``feature_d_weight``), a second discriminator in the style of vision-aided GAN training
(Kumari et al., CVPR 2022): a small head on a frozen pretrained encoder's features
(:mod:`generators.feature_discriminator`), trained with the same logistic loss beside D; G's loss adds its
non-saturating term. The StyleGAN2 D is trained exactly as without it and is the only discriminator exported.

Optionally (``labels`` or ``classifier`` + ``coverage_weight``), G's loss adds CatGAN's label-coverage term
(:mod:`generators.label_coverage`) under a frozen labeller, or under a classifier trained adversarially beside D
(decided and right on labelled real images, undecided on fakes).

Training is resumable and deterministic on CPU for a given seed. Every ``checkpoint_every`` steps the weights of
G, D and g_ema, both optimiser states, the path-length running mean and all RNG states (torch CPU, CUDA when used,
and the data-sampling ``torch.Generator``) are written as one safetensors file; a small JSON sidecar
(``checkpoint.json``) names that file, the step and the training config and is replaced last, so it always points
to a complete checkpoint. Calling :func:`train_minigan` again with the same ``out_dir`` resumes from it.

Ctrl-C (SIGINT, when training runs in the main thread) is deferred to the end of the current step: the state is
saved and ``KeyboardInterrupt`` is re-raised. A second Ctrl-C interrupts immediately, leaving the previous
checkpoint in place.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, autograd, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from generators.feature_discriminator import FeatureDiscriminator
from generators.label_coverage import MARGINALS, classifier_d_loss, coverage_loss
from generators.stylegan2 import Discriminator, Generator
from generators.stylegan2_io import atomic_path, load_generator_safetensors, save_generator_safetensors

__all__ = [
    "EXPORT_NAME",
    "PUBLISHED_DISCRIMINATOR",
    "PUBLISHED_GENERATOR",
    "SIDECAR_NAME",
    "MiniGANConfig",
    "SampleReal",
    "accumulate",
    "build_minigan",
    "d_logistic_loss",
    "d_r1_loss",
    "g_nonsaturating_loss",
    "g_path_regularize",
    "load_training_checkpoint_discriminator_state",
    "load_training_checkpoint_generator",
    "published_step",
    "read_checkpoint_sidecar",
    "train_minigan",
    "uniform_channels",
]

SampleReal = Callable[[int, torch.Generator], Tensor]
"""``sample_real(n, generator)`` -> n real images in [-1, 1], shape (n, 3, size, size), on the training device."""
SampleLabelled = Callable[[int, torch.Generator], tuple[Tensor, Mapping[str, Tensor]]]
"""``sample_labelled(n, generator)`` -> (n real images as ``sample_real`` draws them, {axis: (n,) labels})."""

SIDECAR_NAME = "checkpoint.json"
EXPORT_NAME = "g_ema.safetensors"
PUBLISHED_GENERATOR = "generator.safetensors"
PUBLISHED_DISCRIMINATOR = "discriminator.safetensors"
"""File names of a published MiniGAN (the world's ``gan/`` folder); the generator's metadata carries ``step``."""
_CHECKPOINT_FORMAT = "erasure-studio/minigan-checkpoint/v1"


def uniform_channels(width: int, size: int) -> dict[int, int]:
    """The same channel width at every resolution 4..size."""
    return {2**i: width for i in range(2, int(math.log2(size)) + 1)}


@dataclass(frozen=True)
class MiniGANConfig:
    """Architecture and optimisation hyper-parameters of a MiniGAN run (everything that must match on resume).

    Defaults: 32 px, style_dim 128, 4 mapping layers, 128 channels at every resolution for G and D. The
    generator then has about 1.3 M parameters (about 2.6 MB as fp16).
    """

    size: int = 32
    style_dim: int = 128
    n_mlp: int = 4
    channels: dict[int, int] = field(default_factory=lambda: uniform_channels(128, 32))
    d_channels: dict[int, int] = field(default_factory=lambda: uniform_channels(128, 32))
    lr_mlp: float = 0.01
    batch: int = 32
    lr: float = 0.002
    r1: float = 10.0
    path_regularize: float = 2.0
    path_batch_shrink: int = 2
    path_decay: float = 0.01
    d_reg_every: int = 16
    g_reg_every: int = 4
    mixing: float = 0.9
    ema_half_life_kimg: float = 10.0
    seed: int = 0
    feature_d_weight: float = 0.0
    """Weight of the frozen-feature discriminator's loss in G's objective (0: plain StyleGAN2 training)."""
    feature_d_layers: tuple[int, ...] = ()
    feature_d_width: int = 64
    coverage_weight: float = 0.0
    """Weight of the label-coverage term (:mod:`generators.label_coverage`) in G's objective (0: off)."""
    coverage_from_step: int = 0
    """The label-coverage term is on from this step (counted from 0) onwards."""
    coverage_marginal: str = "entropy"
    """Its batch-marginal term (:data:`generators.label_coverage.MARGINALS`)."""
    coverage_labeller: str = "frozen"
    """Who labels the fakes: a ``frozen`` module, or an ``adversarial`` classifier trained beside D (CatGAN)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = {str(k): v for k, v in self.channels.items()}
        data["d_channels"] = {str(k): v for k, v in self.d_channels.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MiniGANConfig:
        values = dict(data)
        values["channels"] = {int(k): int(v) for k, v in values["channels"].items()}
        values["d_channels"] = {int(k): int(v) for k, v in values["d_channels"].items()}
        if "feature_d_layers" in values:
            values["feature_d_layers"] = tuple(int(i) for i in values["feature_d_layers"])
        return cls(**values)


def build_minigan(config: MiniGANConfig) -> tuple[Generator, Discriminator]:
    """Freshly initialised generator and discriminator for ``config`` (uses the current torch RNG)."""
    g = Generator(config.size, config.style_dim, config.n_mlp, lr_mlp=config.lr_mlp, channels=config.channels)
    d = Discriminator(config.size, channels=config.d_channels)
    return g, d


# ---------------------------------------------------------------------------------------------------------------
# Losses (paper, Sec. 3.1-3.2; rosinality train.py)
# ---------------------------------------------------------------------------------------------------------------


def d_logistic_loss(real_pred: Tensor, fake_pred: Tensor) -> Tensor:
    """Discriminator logistic loss: softplus(-D(x)) + softplus(D(G(z)))."""
    return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()


def d_r1_loss(real_pred: Tensor, real_img: Tensor) -> Tensor:
    """R1 penalty (Mescheder et al. 2018): mean squared gradient norm of D at real images."""
    (grad_real,) = autograd.grad(outputs=real_pred.sum(), inputs=real_img, create_graph=True)
    return grad_real.pow(2).reshape(grad_real.shape[0], -1).sum(1).mean()


def g_nonsaturating_loss(fake_pred: Tensor) -> Tensor:
    """Non-saturating generator loss: softplus(-D(G(z)))."""
    return F.softplus(-fake_pred).mean()


def g_path_regularize(
    fake_img: Tensor, latents: Tensor, mean_path_length: Tensor, decay: float = 0.01
) -> tuple[Tensor, Tensor, Tensor]:
    """Path-length penalty (paper, Eq. 4): (||J_w^T y||_2 - a)^2 with y ~ N(0, I) / sqrt(H W).

    ``a`` is an exponential moving average of the path lengths. Returns (penalty, new mean, path lengths).
    """
    noise = torch.randn_like(fake_img) / math.sqrt(fake_img.shape[2] * fake_img.shape[3])
    (grad,) = autograd.grad(outputs=(fake_img * noise).sum(), inputs=latents, create_graph=True)
    path_lengths = torch.sqrt(grad.pow(2).sum(2).mean(1))
    path_mean = mean_path_length + decay * (path_lengths.mean() - mean_path_length)
    path_penalty = (path_lengths - path_mean).pow(2).mean()
    return path_penalty, path_mean.detach(), path_lengths


@torch.no_grad()
def accumulate(target: nn.Module, source: nn.Module, decay: float) -> None:
    """EMA of parameters: target = decay * target + (1 - decay) * source (buffers are not averaged)."""
    source_params = dict(source.named_parameters())
    for name, param in target.named_parameters():
        param.mul_(decay).add_(source_params[name].detach(), alpha=1.0 - decay)


def _requires_grad(module: nn.Module, flag: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(flag)


def _mixing_latents(batch: int, style_dim: int, prob: float, device: torch.device) -> list[Tensor]:
    """One z, or two z for style mixing with probability ``prob`` (torch RNG only, for reproducibility)."""
    if prob > 0 and torch.rand(()).item() < prob:
        return list(torch.randn(2, batch, style_dim, device=device).unbind(0))
    return [torch.randn(batch, style_dim, device=device)]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _TrainState:
    """Everything that changes during training."""

    g: Generator
    d: Discriminator
    g_ema: Generator
    g_optim: torch.optim.Adam
    d_optim: torch.optim.Adam
    data_generator: torch.Generator
    mean_path_length: Tensor
    features: nn.Module | None = None
    """Frozen feature extractor of the feature discriminator (``None``: plain StyleGAN2 training)."""
    feature_d: nn.Module | None = None
    feature_d_optim: torch.optim.Adam | None = None
    labels: nn.Module | None = None
    """Labeller of the label-coverage term: frozen, or the adversarial classifier (``None``: no such term)."""
    classifier_optim: torch.optim.Adam | None = None
    """Optimiser of the adversarial classifier (``None``: the labeller is frozen)."""
    step: int = 0
    warm_start_step: int | None = None
    """Set when training continued from a published MiniGAN at this step (fresh optimiser moments)."""
    train_seconds: float = 0.0
    """Training wall time over every process that worked on this run, up to the last checkpoint."""


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for index, param_state in optimizer.state_dict()["state"].items():
        for name, value in param_state.items():
            tensors[f"{prefix}.{index}.{name}"] = torch.as_tensor(value)
    return tensors


def _load_optimizer_tensors(
    prefix: str, optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor]
) -> None:
    """Restore per-parameter state; hyper-parameters come from the freshly built optimiser (config is checked)."""
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def _module_tensors(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _load_module_tensors(prefix: str, module: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(own, strict=True)


def _save_checkpoint(
    out_dir: Path, state: _TrainState, config: MiniGANConfig, logs: Mapping[str, float]
) -> None:
    """Write ``checkpoint-{step}.safetensors`` then the sidecar that points to it (both atomically)."""
    device = state.g.device
    tensors: dict[str, Tensor] = {}
    tensors.update(_module_tensors("g", state.g))
    tensors.update(_module_tensors("d", state.d))
    tensors.update(_module_tensors("g_ema", state.g_ema))
    tensors.update(_optimizer_tensors("g_optim", state.g_optim))
    tensors.update(_optimizer_tensors("d_optim", state.d_optim))
    if state.feature_d is not None:
        tensors.update(_module_tensors("feature_d", state.feature_d))
        tensors.update(_optimizer_tensors("feature_d_optim", state.feature_d_optim))
    if state.classifier_optim is not None:
        tensors.update(_module_tensors("classifier", state.labels))
        tensors.update(_optimizer_tensors("classifier_optim", state.classifier_optim))
    tensors["mean_path_length"] = state.mean_path_length.reshape(())
    tensors["rng.cpu"] = torch.get_rng_state()
    tensors["rng.data"] = state.data_generator.get_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    tensor_name = f"checkpoint-{state.step:08d}.safetensors"
    with atomic_path(out_dir / tensor_name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": _CHECKPOINT_FORMAT})
    sidecar = {
        "format": _CHECKPOINT_FORMAT,
        "step": state.step,
        "tensors": tensor_name,
        "config": config.to_dict(),
        "logs": dict(logs),
        "train_seconds": round(state.train_seconds, 1),
    }
    if state.warm_start_step is not None:
        sidecar["warm_start_step"] = state.warm_start_step
    with atomic_path(out_dir / SIDECAR_NAME) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2))
    for old in out_dir.glob("checkpoint-*.safetensors"):
        if old.name != tensor_name:
            old.unlink()


def read_checkpoint_sidecar(out_dir: Path) -> dict[str, Any] | None:
    """The training folder's ``checkpoint.json`` (step, tensors file, config, logs), or None when there is none."""
    path = Path(out_dir) / SIDECAR_NAME
    if not path.exists():
        return None
    sidecar = json.loads(path.read_text())
    if sidecar.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a MiniGAN checkpoint sidecar (format={sidecar.get('format')!r})")
    return sidecar


def _read_tensors(path: Path) -> dict[str, Tensor]:
    return load_file(str(path), device="cpu")


def _restore_checkpoint(out_dir: Path, sidecar: Mapping[str, Any], state: _TrainState) -> None:
    tensors = _read_tensors(out_dir / sidecar["tensors"])
    device = state.g.device
    _load_module_tensors("g", state.g, tensors)
    _load_module_tensors("d", state.d, tensors)
    _load_module_tensors("g_ema", state.g_ema, tensors)
    _load_optimizer_tensors("g_optim", state.g_optim, tensors)
    _load_optimizer_tensors("d_optim", state.d_optim, tensors)
    if state.feature_d is not None:
        _load_module_tensors("feature_d", state.feature_d, tensors)
        _load_optimizer_tensors("feature_d_optim", state.feature_d_optim, tensors)
    if state.classifier_optim is not None:
        _load_module_tensors("classifier", state.labels, tensors)
        _load_optimizer_tensors("classifier_optim", state.classifier_optim, tensors)
    state.mean_path_length = tensors["mean_path_length"].to(device)
    torch.set_rng_state(tensors["rng.cpu"])
    state.data_generator.set_state(tensors["rng.data"])
    if device.type == "cuda":
        if "rng.cuda" not in tensors:
            raise ValueError("checkpoint was written on CPU; resuming it on CUDA would not be reproducible")
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    state.step = int(sidecar["step"])
    state.warm_start_step = sidecar.get("warm_start_step")
    state.train_seconds = float(sidecar.get("train_seconds", 0.0))


def published_step(folder: str | Path) -> int:
    """The training step recorded in a published MiniGAN's generator file."""
    from safetensors import safe_open

    path = Path(folder) / PUBLISHED_GENERATOR
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        step = (handle.metadata() or {}).get("step")
    if step is None:
        raise ValueError(f"{path} records no training step; it cannot be continued")
    return int(step)


def _warm_start(folder: Path, state: _TrainState, seed: int) -> None:
    """Continue from a published MiniGAN: its generator becomes ``g`` and ``g_ema``, its discriminator ``d``.

    Unlike resuming a checkpoint this is not bit-identical to uninterrupted training: a published MiniGAN keeps
    only ``g_ema`` and ``d`` (half precision), so ``g`` restarts from the average, the Adam moments restart from
    zero (with bias correction; beta1 is 0, so only the second moment is re-estimated) and the random streams are
    reseeded from ``seed`` and the step.
    """
    missing = [name for name in (PUBLISHED_GENERATOR, PUBLISHED_DISCRIMINATOR) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot continue from {folder}: missing {', '.join(missing)}")
    step = published_step(folder)
    shipped = load_generator_safetensors(folder / PUBLISHED_GENERATOR)
    if shipped.config != state.g.config:
        raise ValueError(
            f"{folder / PUBLISHED_GENERATOR} has a different generator config than requested: "
            f"{shipped.config.to_dict()} vs {state.g.config.to_dict()}"
        )
    state.g.load_state_dict(shipped.state_dict())
    state.g_ema.load_state_dict(shipped.state_dict())
    d_state = load_file(str(folder / PUBLISHED_DISCRIMINATOR), device="cpu")
    try:
        state.d.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in d_state.items()})
    except RuntimeError as err:
        raise ValueError(f"{folder / PUBLISHED_DISCRIMINATOR} does not fit the requested discriminator: {err}") from None
    torch.manual_seed(seed + step)
    state.data_generator.manual_seed(seed + step)
    state.step = state.warm_start_step = step


def load_training_checkpoint_generator(
    out_dir: str | Path, *, device: str | torch.device = "cpu"
) -> Generator:
    """The ``g_ema`` of the latest training checkpoint in ``out_dir`` (eval mode)."""
    out_dir = Path(out_dir)
    sidecar = read_checkpoint_sidecar(out_dir)
    if sidecar is None:
        raise FileNotFoundError(f"no {SIDECAR_NAME} in {out_dir}")
    config = MiniGANConfig.from_dict(sidecar["config"])
    g_ema, _ = build_minigan(config)
    _load_module_tensors("g_ema", g_ema, _read_tensors(out_dir / sidecar["tensors"]))
    return g_ema.to(device).eval()


def load_training_checkpoint_discriminator_state(out_dir: str | Path) -> dict[str, Tensor]:
    """The discriminator's state dict (rosinality names) from the latest training checkpoint in ``out_dir``:
    shipped next to the generator so that adversarial fine-tuning (Adapt-then-Unlearn) starts from a trained D."""
    out_dir = Path(out_dir)
    sidecar = read_checkpoint_sidecar(out_dir)
    if sidecar is None:
        raise FileNotFoundError(f"no {SIDECAR_NAME} in {out_dir}")
    tensors = _read_tensors(out_dir / sidecar["tensors"])
    return {k[len("d.") :]: v for k, v in tensors.items() if k.startswith("d.")}


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


class _StopRequest:
    requested: bool = False


@contextlib.contextmanager
def _deferred_sigint(stop: _StopRequest) -> Iterator[None]:
    """Turn the first SIGINT into a stop request handled at the end of the step (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    restore = previous if previous is not None else signal.default_int_handler

    def handler(signum: int, frame: Any) -> None:
        stop.requested = True
        signal.signal(signal.SIGINT, restore)  # a second Ctrl-C interrupts at once

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, restore)


def _make_optimizers(g: Generator, d: Discriminator, config: MiniGANConfig) -> tuple[torch.optim.Adam, ...]:
    """Adam(0, 0.99) with lr and betas rescaled for lazy regularisation (paper, Sec. 3.1)."""
    g_ratio = config.g_reg_every / (config.g_reg_every + 1)
    d_ratio = config.d_reg_every / (config.d_reg_every + 1)
    g_optim = torch.optim.Adam(g.parameters(), lr=config.lr * g_ratio, betas=(0.0**g_ratio, 0.99**g_ratio))
    d_optim = torch.optim.Adam(d.parameters(), lr=config.lr * d_ratio, betas=(0.0**d_ratio, 0.99**d_ratio))
    return g_optim, d_optim


def _train_step(
    state: _TrainState,
    config: MiniGANConfig,
    sample_real: SampleReal,
    ema_decay: float,
    sample_labelled: SampleLabelled | None = None,
) -> dict[str, Tensor]:
    """One StyleGAN2 iteration: D step (+ lazy R1), G step (+ lazy path length), EMA update."""
    g, d, device, i = state.g, state.d, state.g.device, state.step
    if state.classifier_optim is not None:
        real, real_labels = sample_labelled(config.batch, state.data_generator)
        real, real_labels = real.to(device), {k: v.to(device) for k, v in real_labels.items()}
    else:
        real = sample_real(config.batch, state.data_generator).to(device)
    expected = (config.batch, 3, config.size, config.size)
    if tuple(real.shape) != expected:
        raise ValueError(f"sample_real returned shape {tuple(real.shape)}, expected {expected}")
    logs: dict[str, Tensor] = {}

    # Discriminator.
    _requires_grad(g, False)
    _requires_grad(d, True)
    fake, _ = g(_mixing_latents(config.batch, config.style_dim, config.mixing, device))
    fake_pred = d(fake)
    real_pred = d(real)
    d_loss = d_logistic_loss(real_pred, fake_pred)
    d.zero_grad(set_to_none=True)
    d_loss.backward()
    state.d_optim.step()
    logs["d"] = d_loss.detach()
    logs["real_score"] = real_pred.detach().mean()
    logs["fake_score"] = fake_pred.detach().mean()

    if state.feature_d is not None:  # the frozen-feature discriminator's head, on the same real and fake batch
        _requires_grad(state.feature_d, True)
        with torch.no_grad():
            real_features, fake_features = state.features(real), state.features(fake)
        feature_d_loss = d_logistic_loss(state.feature_d(real_features), state.feature_d(fake_features))
        state.feature_d.zero_grad(set_to_none=True)
        feature_d_loss.backward()
        state.feature_d_optim.step()
        logs["feature_d"] = feature_d_loss.detach()

    if state.classifier_optim is not None:  # CatGAN's classifier: right on labelled reals, undecided on fakes
        _requires_grad(state.labels, True)
        classifier_loss, classifier_logs = classifier_d_loss(state.labels, real, real_labels, fake.detach())
        state.labels.zero_grad(set_to_none=True)
        classifier_loss.backward()
        state.classifier_optim.step()
        _requires_grad(state.labels, False)
        logs.update(classifier_logs)

    if i % config.d_reg_every == 0:
        real = real.detach().requires_grad_(True)
        real_pred = d(real)
        r1_loss = d_r1_loss(real_pred, real)
        d.zero_grad(set_to_none=True)
        (config.r1 / 2 * r1_loss * config.d_reg_every + 0 * real_pred[0]).sum().backward()
        state.d_optim.step()
        logs["r1"] = r1_loss.detach()

    # Generator.
    _requires_grad(g, True)
    _requires_grad(d, False)
    fake, _ = g(_mixing_latents(config.batch, config.style_dim, config.mixing, device))
    g_loss = g_nonsaturating_loss(d(fake))
    if state.feature_d is not None:
        _requires_grad(state.feature_d, False)
        feature_g_loss = g_nonsaturating_loss(state.feature_d(state.features(fake)))
        logs["feature_g"] = feature_g_loss.detach()
        g_loss = g_loss + config.feature_d_weight * feature_g_loss
    if state.labels is not None and i >= config.coverage_from_step:
        coverage = coverage_loss(state.labels(fake), config.coverage_marginal)
        logs["coverage"] = coverage.detach()
        g_loss = g_loss + config.coverage_weight * coverage
    g.zero_grad(set_to_none=True)
    g_loss.backward()
    state.g_optim.step()
    logs["g"] = g_loss.detach()

    if config.path_regularize > 0 and i % config.g_reg_every == 0:  # weight 0: the pass would be wasted work
        path_batch = max(1, config.batch // config.path_batch_shrink)
        fake, latents = g(
            _mixing_latents(path_batch, config.style_dim, config.mixing, device), return_latents=True
        )
        path_loss, state.mean_path_length, path_lengths = g_path_regularize(
            fake, latents, state.mean_path_length, decay=config.path_decay
        )
        g.zero_grad(set_to_none=True)
        (config.path_regularize * config.g_reg_every * path_loss + 0 * fake[0, 0, 0, 0]).backward()
        state.g_optim.step()
        logs["path"] = path_loss.detach()
        logs["path_length"] = path_lengths.detach().mean()

    accumulate(state.g_ema, g, ema_decay)
    state.step += 1
    return logs


def train_minigan(
    sample_real: SampleReal,
    out_dir: str | Path,
    *,
    size: int = 32,
    steps: int = 10_000,
    batch: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    checkpoint_every: int = 500,
    style_dim: int = 128,
    n_mlp: int = 4,
    channels: int | Mapping[int, int] = 128,
    d_channels: int | Mapping[int, int] | None = None,
    lr_mlp: float = 0.01,
    lr: float = 0.002,
    r1: float = 10.0,
    path_regularize: float = 2.0,
    path_batch_shrink: int = 2,
    d_reg_every: int = 16,
    g_reg_every: int = 4,
    mixing: float = 0.9,
    ema_half_life_kimg: float = 10.0,
    data_generator_device: str | torch.device = "cpu",
    export_dtype: torch.dtype | None = torch.float16,
    progress: bool = True,
    log_every: int = 50,
    continue_from: str | Path | None = None,
    features: nn.Module | None = None,
    feature_d_weight: float = 0.0,
    feature_d_width: int = 64,
    labels: nn.Module | None = None,
    coverage_weight: float = 0.0,
    coverage_from_step: int = 0,
    coverage_marginal: str = "entropy",
    classifier: nn.Module | None = None,
    sample_labelled: SampleLabelled | None = None,
) -> Generator:
    """Train (or resume training) a MiniGAN and return its ``g_ema`` in eval mode.

    Args:
        sample_real: ``sample_real(n, generator)`` returns n real images in [-1, 1], shape (n, 3, size, size),
            drawing all randomness from ``generator`` (a ``torch.Generator`` on ``data_generator_device``).
        out_dir: checkpoint directory; an existing checkpoint there is resumed (its config must match).
        size: image resolution (power of two).
        steps: total number of iterations (a resumed run continues up to this number).
        batch: batch size (a multiple of 4 when >= 4, for the minibatch-stddev layer).
        device: training device.
        seed: seeds the torch RNGs (weights, latents, noise) and the data generator.
        checkpoint_every: checkpoint interval in steps (a final checkpoint is always written).
        style_dim, n_mlp, lr_mlp: mapping network.
        channels: G width at every resolution (int) or a resolution -> channels dict.
        d_channels: the same for D (defaults to ``channels``).
        lr, r1, path_regularize, path_batch_shrink, d_reg_every, g_reg_every, mixing: as in rosinality train.py.
        ema_half_life_kimg: half-life of the g_ema average, in thousands of images.
        data_generator_device: device of the ``torch.Generator`` passed to ``sample_real``.
        export_dtype: dtype of the final ``g_ema.safetensors`` export (``None`` keeps fp32).
        progress: show a tqdm progress bar.
        log_every: how often (steps) to read the losses back for the progress bar / sidecar.
        continue_from: a published MiniGAN folder (``generator.safetensors`` with its ``step``,
            ``discriminator.safetensors``) to continue from when ``out_dir`` holds no checkpoint, e.g. in a fresh
            checkout whose training folder is gone (see :func:`_warm_start`; a checkpoint in ``out_dir`` wins).
        features: a frozen feature extractor (e.g. :class:`generators.feature_discriminator.CLIPPatchFeatures`)
            mapping images to a list of (B, C, h, w) maps, with attributes ``layers`` and ``hidden_size``. When
            given, a :class:`~generators.feature_discriminator.FeatureDiscriminator` head is trained on its
            features next to D, and G's loss adds ``feature_d_weight`` times the head's non-saturating loss
            (vision-aided training, Kumari et al. 2022). The head and its optimiser are checkpointed; only G, g_ema
            and D are exported.
        feature_d_weight: weight of that term (must be > 0 exactly when ``features`` is given).
        feature_d_width: hidden channels of each head.
        labels: a frozen labeller mapping images to ``{axis: (B, n_labels) probabilities}``, e.g.
            :class:`generators.label_coverage.ZeroShotLabels`. When given, G's loss adds ``coverage_weight`` times
            CatGAN's coverage term (:func:`generators.label_coverage.coverage_loss`) on its fakes.
        coverage_weight: weight of that term (must be > 0 exactly when ``labels`` is given).
        coverage_from_step: the term is on from this step onwards (a recipe may train plain StyleGAN2 first).
        coverage_marginal: the term's batch-marginal part, ``entropy`` (CatGAN) or ``uniform_kl``
            (see :func:`generators.label_coverage.coverage_loss`).
        classifier: instead of a frozen ``labels``, a trainable labeller (e.g.
            :class:`generators.label_coverage.LabelClassifier`) trained adversarially beside D from the first step
            with :func:`generators.label_coverage.classifier_d_loss` (CatGAN's discriminator-side classifier); its
            weights and optimiser are checkpointed, not exported. It is trained before ``coverage_from_step`` too,
            so a late start gives it a head start on G.
        sample_labelled: the real-data sampler when ``classifier`` is given (used instead of ``sample_real``):
            ``sample_labelled(n, generator)`` -> (images, {axis: labels}) for the classifier's axes.

    Returns:
        The trained ``g_ema`` (also exported to ``out_dir / "g_ema.safetensors"``).

    Raises:
        KeyboardInterrupt: after saving a checkpoint, when interrupted with Ctrl-C.
        ValueError: an existing checkpoint in ``out_dir`` has a different configuration.
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    g_table = uniform_channels(channels, size) if isinstance(channels, int) else dict(channels)
    if d_channels is None:
        d_table = dict(g_table)
    else:
        d_table = uniform_channels(d_channels, size) if isinstance(d_channels, int) else dict(d_channels)
    if labels is not None and classifier is not None:
        raise ValueError("give a frozen `labels` or an adversarial `classifier` for the label-coverage term, not both")
    if (classifier is None) != (sample_labelled is None):
        raise ValueError("an adversarial `classifier` needs `sample_labelled` (labelled real images), and vice versa")
    labeller = labels if labels is not None else classifier
    config = MiniGANConfig(
        size=size,
        style_dim=style_dim,
        n_mlp=n_mlp,
        channels={int(k): int(v) for k, v in g_table.items()},
        d_channels={int(k): int(v) for k, v in d_table.items()},
        lr_mlp=lr_mlp,
        batch=batch,
        lr=lr,
        r1=r1,
        path_regularize=path_regularize,
        path_batch_shrink=path_batch_shrink,
        d_reg_every=d_reg_every,
        g_reg_every=g_reg_every,
        mixing=mixing,
        ema_half_life_kimg=ema_half_life_kimg,
        seed=seed,
        feature_d_weight=feature_d_weight,
        feature_d_layers=tuple(int(i) for i in features.layers) if features is not None else (),
        feature_d_width=feature_d_width,
        coverage_weight=coverage_weight,
        coverage_from_step=coverage_from_step if labeller is not None else 0,
        coverage_marginal=coverage_marginal if labeller is not None else "entropy",
        coverage_labeller="adversarial" if classifier is not None else "frozen",
    )
    if coverage_marginal not in MARGINALS:
        raise ValueError(f"unknown coverage_marginal {coverage_marginal!r}; allowed: {', '.join(MARGINALS)}")
    if (labeller is None) != (coverage_weight == 0):
        raise ValueError(
            "a label-coverage term needs both a labeller (`labels` or `classifier`) and coverage_weight > 0 "
            "(or neither)"
        )
    if (features is None) != (feature_d_weight == 0):
        raise ValueError("a feature discriminator needs both `features` and feature_d_weight > 0 (or neither)")
    if batch >= 4 and batch % 4 != 0:
        raise ValueError(f"batch must be a multiple of 4 (minibatch stddev groups), got {batch}")
    if checkpoint_every < 1:
        raise ValueError("checkpoint_every must be >= 1")

    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
        torch.manual_seed(seed)
        g, d = build_minigan(config)
        g, d = g.to(device), d.to(device)
        g_ema = copy.deepcopy(g).eval()
        _requires_grad(g_ema, False)
        g_optim, d_optim = _make_optimizers(g, d, config)
        data_generator = torch.Generator(device=data_generator_device).manual_seed(seed)
        state = _TrainState(
            g=g,
            d=d,
            g_ema=g_ema,
            g_optim=g_optim,
            d_optim=d_optim,
            data_generator=data_generator,
            mean_path_length=torch.zeros((), device=device),
        )
        if features is not None:
            state.features = features.to(device)
            state.feature_d = FeatureDiscriminator(features.hidden_size, len(features.layers), feature_d_width)
            state.feature_d = state.feature_d.to(device)
            state.feature_d_optim = torch.optim.Adam(state.feature_d.parameters(), lr=lr, betas=(0.0, 0.99))
        if labeller is not None:
            state.labels = labeller.to(device)
            _requires_grad(state.labels, False)  # only its own step (adversarial classifier) trains it
        if classifier is not None:
            state.classifier_optim = torch.optim.Adam(classifier.parameters(), lr=lr, betas=(0.0, 0.99))

        sidecar = read_checkpoint_sidecar(out_dir)
        if sidecar is not None:
            saved = MiniGANConfig.from_dict(sidecar["config"])
            if saved != config:
                diff = {
                    k: (v, config.to_dict()[k])
                    for k, v in saved.to_dict().items()
                    if config.to_dict()[k] != v
                }
                raise ValueError(f"checkpoint in {out_dir} has a different config (saved, requested): {diff}")
            _restore_checkpoint(out_dir, sidecar, state)
        elif continue_from is not None:
            _warm_start(Path(continue_from), state, seed)
            if state.step >= steps:
                raise ValueError(f"{continue_from} is already at step {state.step}; ask for more than {steps} steps")

        ema_decay = 0.5 ** (batch / (ema_half_life_kimg * 1000.0))
        stop = _StopRequest()
        logs: dict[str, float] = dict(sidecar["logs"]) if sidecar else {}
        bar = tqdm(
            total=steps, initial=min(state.step, steps), disable=not progress, desc="MiniGAN", smoothing=0.05
        )
        clock = time.monotonic()
        try:
            with _deferred_sigint(stop):
                while state.step < steps:
                    step_logs = _train_step(state, config, sample_real, ema_decay, sample_labelled)
                    now = time.monotonic()
                    state.train_seconds += now - clock
                    clock = now
                    bar.update(1)
                    if state.step % log_every == 0 or state.step == steps:
                        logs.update({k: float(v) for k, v in step_logs.items()})
                        bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()}, refresh=False)
                    if state.step % checkpoint_every == 0 or state.step == steps or stop.requested:
                        _save_checkpoint(out_dir, state, config, logs)
                    if stop.requested:
                        raise KeyboardInterrupt(
                            f"MiniGAN training interrupted at step {state.step}; checkpoint saved in {out_dir}"
                        )
        finally:
            bar.close()

        save_generator_safetensors(
            g_ema, out_dir / EXPORT_NAME, dtype=export_dtype, extra_metadata={"step": str(state.step)}
        )
    return g_ema.eval()
