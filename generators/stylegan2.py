"""StyleGAN2 generator and discriminator in pure PyTorch, loadable from rosinality checkpoints.

This is a re-implementation of the StyleGAN2 architecture of Karras et al., *Analyzing and Improving the Image
Quality of StyleGAN*, CVPR 2020 ("the paper" below), written to be state-dict compatible with
`rosinality/stylegan2-pytorch` (commit ``bef283a``): every parameter and buffer has the same name and shape, so the
``g_ema``, ``g`` and ``d`` entries of a rosinality ``.pt`` checkpoint load with ``strict=True``.

No custom CUDA kernels are used. The two fused ops of the original code are written in native torch:

* :func:`upfirdn2d` -- zero-insertion upsampling, padding (negative values crop), FIR filtering, downsampling;
* :func:`fused_leaky_relu` -- ``leaky_relu(x + bias, 0.2) * sqrt(2)``.

Architecture summary (paper, Fig. 2 and Sec. 2.2 / Appendix B):

* mapping network ``style``: PixelNorm followed by ``n_mlp`` equalised-lr linear layers with lr multiplier 0.01;
* synthesis network: learned 4x4 constant, modulated 3x3 convolutions with weight demodulation (grouped conv,
  one group per sample), per-pixel noise injection, transposed-conv upsampling followed by a [1, 3, 3, 1] blur,
  and a "skip" output: the image is the sum of upsampled per-resolution ToRGB outputs;
* discriminator: residual blocks with blurred downsampling, a minibatch standard-deviation feature and an
  equalised-lr linear head.

Deviation from rosinality: when two latents are mixed and ``inject_index`` is not given, the crossover point is
drawn with ``torch.randint`` (the torch RNG) instead of Python's ``random`` so that runs are reproducible from the
torch seed alone. The distribution is the same (uniform on ``[1, n_latent - 1]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "DEFAULT_BLUR_KERNEL",
    "Blur",
    "ConstantInput",
    "ConvLayer",
    "Discriminator",
    "DiscriminatorConfig",
    "Downsample",
    "EqualConv2d",
    "EqualLinear",
    "FusedLeakyReLU",
    "Generator",
    "ModulatedConv2d",
    "NoiseInjection",
    "PixelNorm",
    "ResBlock",
    "StyleGAN2Config",
    "StyledConv",
    "ToRGB",
    "Upsample",
    "fused_leaky_relu",
    "make_blur_kernel",
    "rosinality_channels",
    "upfirdn2d",
]

DEFAULT_BLUR_KERNEL: tuple[int, ...] = (1, 3, 3, 1)
"""Binomial filter used for all resampling in StyleGAN2 (paper, Appendix B)."""

_LRELU_SLOPE = 0.2
_LRELU_GAIN = math.sqrt(2.0)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def rosinality_channels(channel_multiplier: int = 2) -> dict[int, int]:
    """Return rosinality's resolution -> channels table (config-f uses ``channel_multiplier=2``)."""
    return {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256 * channel_multiplier,
        128: 128 * channel_multiplier,
        256: 64 * channel_multiplier,
        512: 32 * channel_multiplier,
        1024: 16 * channel_multiplier,
    }


def _log2_size(size: int) -> int:
    log_size = int(math.log2(size))
    if size < 4 or 2**log_size != size:
        raise ValueError(f"size must be a power of two >= 4, got {size}")
    return log_size


def _resolve_channels(
    size: int, channel_multiplier: int, channels: Mapping[int, int] | None
) -> dict[int, int]:
    """Channel table for every resolution 4..size: the explicit override, or rosinality's default table."""
    table = dict(channels) if channels is not None else rosinality_channels(channel_multiplier)
    table = {int(res): int(ch) for res, ch in table.items()}
    needed = [2**i for i in range(2, _log2_size(size) + 1)]
    missing = [res for res in needed if res not in table]
    if missing:
        raise ValueError(f"channels has no entry for resolutions {missing} (needed: {needed})")
    return table


def _channels_to_json(channels: Mapping[int, int] | None) -> dict[str, int] | None:
    return None if channels is None else {str(res): int(ch) for res, ch in channels.items()}


def _channels_from_json(channels: Mapping[str, int] | None) -> dict[int, int] | None:
    return None if channels is None else {int(res): int(ch) for res, ch in channels.items()}


@dataclass(frozen=True)
class StyleGAN2Config:
    """Everything needed to build a :class:`Generator` (JSON-serialisable through :meth:`to_dict`).

    ``channels`` overrides the per-resolution widths; ``None`` means rosinality's table for
    ``channel_multiplier``. ``lr_mlp`` is a run-time scale (not stored in weights); 0.01 everywhere in the paper.
    """

    size: int
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    channels: dict[int, int] | None = None
    lr_mlp: float = 0.01
    blur_kernel: tuple[int, ...] = field(default=DEFAULT_BLUR_KERNEL)

    def resolved_channels(self) -> dict[int, int]:
        """The channel table actually used (override or rosinality default)."""
        return _resolve_channels(self.size, self.channel_multiplier, self.channels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "style_dim": self.style_dim,
            "n_mlp": self.n_mlp,
            "channel_multiplier": self.channel_multiplier,
            "channels": _channels_to_json(self.channels),
            "lr_mlp": self.lr_mlp,
            "blur_kernel": list(self.blur_kernel),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StyleGAN2Config:
        return cls(
            size=int(data["size"]),
            style_dim=int(data["style_dim"]),
            n_mlp=int(data["n_mlp"]),
            channel_multiplier=int(data.get("channel_multiplier", 2)),
            channels=_channels_from_json(data.get("channels")),
            lr_mlp=float(data.get("lr_mlp", 0.01)),
            blur_kernel=tuple(int(k) for k in data.get("blur_kernel", DEFAULT_BLUR_KERNEL)),
        )


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Everything needed to build a :class:`Discriminator`; ``channels`` as in :class:`StyleGAN2Config`."""

    size: int
    channel_multiplier: int = 2
    channels: dict[int, int] | None = None
    blur_kernel: tuple[int, ...] = field(default=DEFAULT_BLUR_KERNEL)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "channel_multiplier": self.channel_multiplier,
            "channels": _channels_to_json(self.channels),
            "blur_kernel": list(self.blur_kernel),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiscriminatorConfig:
        return cls(
            size=int(data["size"]),
            channel_multiplier=int(data.get("channel_multiplier", 2)),
            channels=_channels_from_json(data.get("channels")),
            blur_kernel=tuple(int(k) for k in data.get("blur_kernel", DEFAULT_BLUR_KERNEL)),
        )


# ---------------------------------------------------------------------------------------------------------------
# Native replacements for rosinality's CUDA ops
# ---------------------------------------------------------------------------------------------------------------


def make_blur_kernel(taps: Sequence[float]) -> Tensor:
    """2-D FIR kernel from 1-D taps (outer product), normalised to sum to one."""
    kernel = torch.tensor(list(taps), dtype=torch.float32)
    if kernel.ndim == 1:
        kernel = kernel[None, :] * kernel[:, None]
    return kernel / kernel.sum()


def upfirdn2d(
    x: Tensor,
    kernel: Tensor,
    up: int = 1,
    down: int = 1,
    pad: tuple[int, int] = (0, 0),
) -> Tensor:
    """Upsample by zero insertion, pad, filter with ``kernel`` (true convolution), then downsample.

    Same semantics as rosinality's ``upfirdn2d`` / ``upfirdn2d_native``: ``pad=(pad0, pad1)`` is applied to the
    start/end of both spatial axes after upsampling; negative values crop. Output size per axis is
    ``(in * up + pad0 + pad1 - k + down) // down``.
    """
    batch, channels, height, width = x.shape
    pad0, pad1 = pad

    if up > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)

    x = F.pad(x, [pad0, pad1, pad0, pad1])

    kernel_h, kernel_w = kernel.shape
    weight = torch.flip(kernel, [0, 1]).to(dtype=x.dtype, device=x.device)
    weight = weight.view(1, 1, kernel_h, kernel_w).repeat(channels, 1, 1, 1)
    # Strided filtering equals filtering followed by keeping every ``down``-th sample.
    return F.conv2d(x, weight, stride=down, groups=channels)


def fused_leaky_relu(
    x: Tensor,
    bias: Tensor | None = None,
    negative_slope: float = _LRELU_SLOPE,
    scale: float = _LRELU_GAIN,
) -> Tensor:
    """``leaky_relu(x + bias) * scale``; the sqrt(2) gain keeps activations' magnitude (paper, Appendix B)."""
    if bias is not None:
        rest = [1] * (x.ndim - 2)
        x = x + bias.view(1, bias.shape[0], *rest)
    return F.leaky_relu(x, negative_slope=negative_slope) * scale


# ---------------------------------------------------------------------------------------------------------------
# Basic layers
# ---------------------------------------------------------------------------------------------------------------


class PixelNorm(nn.Module):
    """Normalise each latent vector to unit RMS over the feature dimension."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class FusedLeakyReLU(nn.Module):
    """Bias add + leaky ReLU + sqrt(2) gain, with the bias stored as parameter ``bias`` of shape (channels,)."""

    def __init__(
        self,
        channel: int,
        bias: bool = True,
        negative_slope: float = _LRELU_SLOPE,
        scale: float = _LRELU_GAIN,
    ) -> None:
        super().__init__()
        self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (Karras et al., ProGAN) and an lr multiplier.

    Weights are stored as N(0, 1) / lr_mul and scaled at run time by ``lr_mul / sqrt(in_dim)``; the bias is stored
    unscaled and multiplied by ``lr_mul``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1.0 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            out = F.linear(x, self.weight * self.scale)
            return fused_leaky_relu(out, bias)
        return F.linear(x, self.weight * self.scale, bias=bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul}, activation={self.activation}"


class EqualConv2d(nn.Module):
    """2-D convolution with equalised learning rate (weight scaled by ``1 / sqrt(in * k * k)`` at run time)."""

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_channel * kernel_size**2)
        self.stride = stride
        self.padding = padding
        self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        out_c, in_c, k, _ = self.weight.shape
        return f"{in_c}, {out_c}, {k}, stride={self.stride}, padding={self.padding}"


class Upsample(nn.Module):
    """2x upsampling with the blur kernel (used on the RGB skip path); buffer ``kernel``."""

    def __init__(self, kernel: Sequence[int], factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_blur_kernel(kernel) * (factor**2))
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, down=1, pad=self.pad)


class Downsample(nn.Module):
    """2x downsampling with the blur kernel; buffer ``kernel`` (kept for completeness, unused by G and D)."""

    def __init__(self, kernel: Sequence[int], factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_blur_kernel(kernel))
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2, p // 2)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=1, down=self.factor, pad=self.pad)


class Blur(nn.Module):
    """FIR low-pass filter applied after transposed-conv upsampling / before strided downsampling."""

    def __init__(self, kernel: Sequence[int], pad: tuple[int, int], upsample_factor: int = 1) -> None:
        super().__init__()
        blur = make_blur_kernel(kernel)
        if upsample_factor > 1:
            blur = blur * (upsample_factor**2)
        self.register_buffer("kernel", blur)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


# ---------------------------------------------------------------------------------------------------------------
# Generator layers
# ---------------------------------------------------------------------------------------------------------------


class ModulatedConv2d(nn.Module):
    """Convolution whose weights are modulated per sample by a style and (optionally) demodulated.

    Paper, Sec. 2.2, Eq. 1 and 3: ``w'_ijk = s_i * w_ijk`` and ``w''_ijk = w'_ijk / sqrt(sum_ik w'_ijk^2 + eps)``.
    The batch is folded into the channel axis and executed as one grouped convolution (one group per sample).
    ``weight`` has shape (1, out, in, k, k); ``modulation`` maps the style to ``in`` scales (bias initialised to 1).
    Upsampling uses a stride-2 transposed convolution followed by a blur (paper, Appendix B).
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        downsample: bool = False,
        blur_kernel: Sequence[int] = DEFAULT_BLUR_KERNEL,
    ) -> None:
        super().__init__()
        if upsample and downsample:
            raise ValueError("ModulatedConv2d cannot both upsample and downsample")
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        self.downsample = downsample

        factor = 2
        if upsample:
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        if downsample:
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2, p // 2))

        self.scale = 1.0 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)
        self.demodulate = demodulate

    def extra_repr(self) -> str:
        return (
            f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, "
            f"upsample={self.upsample}, downsample={self.downsample}, demodulate={self.demodulate}"
        )

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        batch, in_channel, height, width = x.shape
        k = self.kernel_size

        style = self.modulation(style).view(batch, 1, in_channel, 1, 1)
        weight = self.scale * self.weight * style  # (batch, out, in, k, k)
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)
            weight = weight * demod.view(batch, self.out_channel, 1, 1, 1)

        if self.upsample:
            x = x.view(1, batch * in_channel, height, width)
            # conv_transpose2d expects (in, out / groups, k, k) per group.
            weight = weight.transpose(1, 2).reshape(batch * in_channel, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            out = out.view(batch, self.out_channel, out.shape[2], out.shape[3])
            return self.blur(out)

        weight = weight.view(batch * self.out_channel, in_channel, k, k)
        if self.downsample:
            x = self.blur(x)
            x = x.reshape(1, batch * in_channel, x.shape[2], x.shape[3])
            out = F.conv2d(x, weight, padding=0, stride=2, groups=batch)
        else:
            x = x.reshape(1, batch * in_channel, height, width)
            out = F.conv2d(x, weight, padding=self.padding, groups=batch)
        return out.view(batch, self.out_channel, out.shape[2], out.shape[3])


class NoiseInjection(nn.Module):
    """Add per-pixel Gaussian noise scaled by a learned scalar ``weight`` (initialised to 0; paper, Fig. 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        return image + self.weight * noise


class ConstantInput(nn.Module):
    """The learned 4x4 constant that starts the synthesis network; parameter ``input`` (1, C, 4, 4)."""

    def __init__(self, channel: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, latent: Tensor) -> Tensor:
        return self.input.repeat(latent.shape[0], 1, 1, 1)


class StyledConv(nn.Module):
    """Modulated conv -> noise injection -> bias + leaky ReLU (``activate.bias``)."""

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        upsample: bool = False,
        blur_kernel: Sequence[int] = DEFAULT_BLUR_KERNEL,
        demodulate: bool = True,
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channel,
            out_channel,
            kernel_size,
            style_dim,
            upsample=upsample,
            blur_kernel=blur_kernel,
            demodulate=demodulate,
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: Tensor, style: Tensor, noise: Tensor | None = None) -> Tensor:
        out = self.conv(x, style)
        out = self.noise(out, noise=noise)
        return self.activate(out)


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to RGB plus bias, added to the upsampled previous RGB (skip output)."""

    def __init__(
        self,
        in_channel: int,
        style_dim: int,
        upsample: bool = True,
        blur_kernel: Sequence[int] = DEFAULT_BLUR_KERNEL,
    ) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, style: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """StyleGAN2 generator (config-e/f "skip" generator of the paper), rosinality-compatible.

    Module names: ``style`` (mapping network), ``input``, ``conv1``, ``to_rgb1``, ``convs`` (pairs of upsampling
    and plain :class:`StyledConv` per resolution 8..size), ``to_rgbs`` and the ``noises.noise_{i}`` buffers.

    Args:
        size: output resolution (power of two).
        style_dim: dimension of z and w.
        n_mlp: number of mapping layers.
        channel_multiplier: selects rosinality's channel table (2 = config-f) when ``channels`` is ``None``.
        blur_kernel: 1-D taps of the resampling filter.
        lr_mlp: learning-rate multiplier of the mapping network.
        channels: optional resolution -> channels override, e.g. ``{4: 128, 8: 128, 16: 128, 32: 128}``.
    """

    def __init__(
        self,
        size: int,
        style_dim: int,
        n_mlp: int,
        channel_multiplier: int = 2,
        blur_kernel: Sequence[int] = DEFAULT_BLUR_KERNEL,
        lr_mlp: float = 0.01,
        *,
        channels: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.config = StyleGAN2Config(
            size=size,
            style_dim=style_dim,
            n_mlp=n_mlp,
            channel_multiplier=channel_multiplier,
            channels=None if channels is None else {int(r): int(c) for r, c in channels.items()},
            lr_mlp=lr_mlp,
            blur_kernel=tuple(blur_kernel),
        )
        self.size = size
        self.style_dim = style_dim
        self.log_size = _log2_size(size)
        self.channels = _resolve_channels(size, channel_multiplier, channels)

        layers: list[nn.Module] = [PixelNorm()]
        for _ in range(n_mlp):
            layers.append(EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu"))
        self.style = nn.Sequential(*layers)

        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)

        self.num_layers = (self.log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()

        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2**res, 2**res))

        in_channel = self.channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2**i]
            self.convs.append(
                StyledConv(in_channel, out_channel, 3, style_dim, upsample=True, blur_kernel=blur_kernel)
            )
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim))
            in_channel = out_channel

        self.n_latent = self.log_size * 2 - 2

    @classmethod
    def from_config(cls, config: StyleGAN2Config) -> Generator:
        return cls(
            config.size,
            config.style_dim,
            config.n_mlp,
            channel_multiplier=config.channel_multiplier,
            blur_kernel=config.blur_kernel,
            lr_mlp=config.lr_mlp,
            channels=config.channels,
        )

    @property
    def device(self) -> torch.device:
        return self.input.input.device

    def make_noise(self, generator: torch.Generator | None = None) -> list[Tensor]:
        """Fresh noise maps, one per layer, shaped like the ``noises`` buffers (batch dimension 1)."""
        return [
            torch.randn(buf.shape, device=self.device, generator=generator) for buf in self.noise_buffers()
        ]

    def noise_buffers(self) -> list[Tensor]:
        """The stored ``noises.noise_{i}`` buffers in layer order (used when ``randomize_noise=False``)."""
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    @torch.no_grad()
    def mean_latent(self, n_latent: int, generator: torch.Generator | None = None) -> Tensor:
        """Mean of ``style(z)`` over ``n_latent`` random z: the w-space centre used by the truncation trick."""
        z = torch.randn(n_latent, self.style_dim, device=self.device, generator=generator)
        return self.style(z).mean(0, keepdim=True)

    def get_latent(self, z: Tensor) -> Tensor:
        """Map z to w through the mapping network."""
        return self.style(z)

    def forward(
        self,
        styles: Sequence[Tensor],
        return_latents: bool = False,
        inject_index: int | None = None,
        truncation: float = 1.0,
        truncation_latent: Tensor | None = None,
        input_is_latent: bool = False,
        noise: Sequence[Tensor | None] | None = None,
        randomize_noise: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Synthesize images; same calling convention as rosinality.

        Args:
            styles: a list of one or two z (or w if ``input_is_latent``) tensors of shape (B, style_dim); a single
                w+ tensor of shape (B, n_latent, style_dim) is accepted with ``input_is_latent=True``.
            return_latents: also return the broadcast w+ latent (B, n_latent, style_dim).
            inject_index: style-mixing crossover (paper, Sec. 2 of StyleGAN): layers ``< inject_index`` use the
                first latent, the rest the second. Drawn uniformly from [1, n_latent - 1] when two latents are given
                and it is ``None``.
            truncation: psi of the truncation trick, ``w' = w_avg + psi * (w - w_avg)``; 1 disables it.
            truncation_latent: w_avg, e.g. from :meth:`mean_latent` or a checkpoint's ``latent_avg``.
            input_is_latent: ``styles`` are already w vectors (skip the mapping network).
            noise: explicit per-layer noise maps (``num_layers`` entries; ``None`` entries draw fresh noise).
            randomize_noise: when ``noise`` is ``None``: draw fresh noise (True) or use the stored buffers (False).

        Returns:
            ``(image, latent)`` with image in roughly [-1, 1], shape (B, 3, size, size); latent is ``None`` unless
            ``return_latents``.
        """
        if isinstance(styles, Tensor):
            raise TypeError("styles must be a list of tensors, e.g. g([z]); got a bare tensor")
        if not input_is_latent:
            styles = [self.style(s) for s in styles]

        if noise is None:
            noise = [None] * self.num_layers if randomize_noise else self.noise_buffers()
        if len(noise) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} noise maps, got {len(noise)}")

        if truncation < 1:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent (e.g. g.mean_latent(4096))")
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]

        if len(styles) < 2:
            if styles[0].ndim < 3:
                latent = styles[0].unsqueeze(1).repeat(1, self.n_latent, 1)
            else:
                latent = styles[0]
        else:
            if inject_index is None:
                inject_index = int(torch.randint(1, self.n_latent, ()).item())
            if not 0 <= inject_index <= self.n_latent:
                raise ValueError(f"inject_index must be in [0, {self.n_latent}], got {inject_index}")
            latent = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
            latent2 = styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)
            latent = torch.cat([latent, latent2], 1)

        out = self.input(latent)
        out = self.conv1(out, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])

        # Latent index i feeds the up-conv, i + 1 the conv and i + 2 the ToRGB of each resolution.
        i = 1
        for up_conv, conv, noise1, noise2, to_rgb in zip(
            self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs
        ):
            out = up_conv(out, latent[:, i], noise=noise1)
            out = conv(out, latent[:, i + 1], noise=noise2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2

        image = skip
        return (image, latent) if return_latents else (image, None)


# ---------------------------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------------------------


class ConvLayer(nn.Sequential):
    """[Blur] -> EqualConv2d -> [FusedLeakyReLU], an ``nn.Sequential`` so names are ``0``, ``1``, ``2``."""

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        downsample: bool = False,
        blur_kernel: Sequence[int] = DEFAULT_BLUR_KERNEL,
        bias: bool = True,
        activate: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2

        layers.append(
            EqualConv2d(
                in_channel,
                out_channel,
                kernel_size,
                padding=padding,
                stride=stride,
                bias=bias and not activate,
            )
        )
        if activate:
            layers.append(FusedLeakyReLU(out_channel, bias=bias))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Residual discriminator block (paper, Fig. 7c): two 3x3 convs (second downsamples) + 1x1 blurred skip."""

    def __init__(
        self, in_channel: int, out_channel: int, blur_kernel: Sequence[int] = DEFAULT_BLUR_KERNEL
    ) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(
            in_channel, out_channel, 1, downsample=True, activate=False, bias=False, blur_kernel=blur_kernel
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        return (out + self.skip(x)) / math.sqrt(2)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator with minibatch standard deviation, rosinality-compatible.

    Names: ``convs`` (FromRGB ``ConvLayer`` then one :class:`ResBlock` per resolution size..8), ``final_conv``
    and ``final_linear``. The minibatch-stddev layer groups the batch in groups of ``min(batch, 4)``; the batch
    size must be divisible by that group size (as in the reference implementation).
    """

    def __init__(
        self,
        size: int,
        channel_multiplier: int = 2,
        blur_kernel: Sequence[int] = DEFAULT_BLUR_KERNEL,
        *,
        channels: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.config = DiscriminatorConfig(
            size=size,
            channel_multiplier=channel_multiplier,
            channels=None if channels is None else {int(r): int(c) for r, c in channels.items()},
            blur_kernel=tuple(blur_kernel),
        )
        self.size = size
        table = _resolve_channels(size, channel_multiplier, channels)
        self.channels = table
        log_size = _log2_size(size)

        convs: list[nn.Module] = [ConvLayer(3, table[size], 1)]
        in_channel = table[size]
        for i in range(log_size, 2, -1):
            out_channel = table[2 ** (i - 1)]
            convs.append(ResBlock(in_channel, out_channel, blur_kernel))
            in_channel = out_channel
        self.convs = nn.Sequential(*convs)

        self.stddev_group = 4
        self.stddev_feat = 1

        self.final_conv = ConvLayer(in_channel + 1, table[4], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(table[4] * 4 * 4, table[4], activation="fused_lrelu"),
            EqualLinear(table[4], 1),
        )

    @classmethod
    def from_config(cls, config: DiscriminatorConfig) -> Discriminator:
        return cls(
            config.size,
            channel_multiplier=config.channel_multiplier,
            blur_kernel=config.blur_kernel,
            channels=config.channels,
        )

    def minibatch_stddev(self, out: Tensor) -> Tensor:
        """Append the mean over features of the per-group standard deviation as one extra channel."""
        batch, channel, height, width = out.shape
        group = min(batch, self.stddev_group)
        if batch % group != 0:
            raise ValueError(f"batch size {batch} must be divisible by the stddev group size {group}")
        stddev = out.view(group, -1, self.stddev_feat, channel // self.stddev_feat, height, width)
        stddev = torch.sqrt(stddev.var(0, unbiased=False) + 1e-8)
        stddev = stddev.mean([2, 3, 4], keepdim=True).squeeze(2)
        stddev = stddev.repeat(group, 1, height, width)
        return torch.cat([out, stddev], 1)

    def forward(self, x: Tensor) -> Tensor:
        """Realness logits of shape (B, 1) for images in [-1, 1] of shape (B, 3, size, size)."""
        out = self.convs(x)
        out = self.minibatch_stddev(out)
        out = self.final_conv(out)
        return self.final_linear(out.view(out.shape[0], -1))
