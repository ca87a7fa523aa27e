"""Procedural MiniCanvas images: deterministic for a seed, unlimited, vectorised in torch.

A style is a visual family: a background pattern with its palette, and the way the object is painted
(fill colour, solid or outlined). An object is a shape with random position, scale and rotation. Colours,
pattern frequency, phase and angle are jittered per image, so memorising is impossible: a classifier or a
generator has to learn the concept.

Images are rendered at ``2 * size`` and average-pooled to ``size`` (anti-aliasing), values in ``[-1, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .concepts import OBJECTS, STYLES

IMAGE_SIZE = 32
# Object pose, drawn per image: centre offset in [-OFFSET, OFFSET] (image half-widths), scale (circumradius in image
# half-widths) in [SCALE_MIN, SCALE_MIN + SCALE_SPAN], rotation in [-ROTATION_DEG, ROTATION_DEG] degrees.
# The rotation range is small on purpose: with +-25 degrees a square (90-degree symmetry) has no canonical pose, and
# MiniSD learnt a rotation-averaged, rounded template for it (measured: square accuracy of MiniSD samples 0.29 at
# +-25 degrees against 0.77 at +-8 degrees, same warm start and recipe).
OFFSET = 0.28
SCALE_MIN, SCALE_SPAN = 0.45, 0.22
ROTATION_DEG = 8.0
# Shape details that must stay resolvable at 32 px (an object spans roughly 14-21 px): the diamond's half-width
# (half-height 1), and the ring's hole radius (outer radius 0.95). Outlined styles draw the ring's inner edge too,
# so that a hollow ring (two concentric outlines) never renders like a hollow circle (one outline).
DIAMOND_HALF_WIDTH = 0.62
RING_HOLE = 0.42
OUTLINE_SHRINK = 1.3  # the outline band is the shape minus its copy shrunk by this factor (the ring: both edges)


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    h = hex_colour.lstrip("#")
    return tuple(int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


@dataclass(frozen=True)
class StyleSpec:
    pattern: str  # background pattern family
    colours: tuple[str, ...]  # background palette (2 colours, 4 for mosaic)
    fill: str  # object colour
    outline: str | None = None  # outline colour (None: solid object)
    hollow: bool = False  # only the outline is painted
    freq: float = 4.0  # pattern frequency (cycles across the image)
    angle: float = 0.0  # pattern angle in degrees


STYLE_SPECS: dict[str, StyleSpec] = {
    "Ember": StyleSpec("stripes", ("#7a1010", "#f07a1a"), "#ffe14d", freq=4.0, angle=45.0),
    "Cinder": StyleSpec("stripes", ("#2a2a2e", "#f07a1a"), "#ffe14d", freq=4.0, angle=45.0),
    "Lagoon": StyleSpec("waves", ("#0b2a6b", "#19b3b0"), "#f4f4f4", freq=3.0),
    "Meadow": StyleSpec("dots", ("#2f7d32", "#a5e07a"), "#e0459b", freq=5.0),
    "Dusk": StyleSpec("gradient", ("#3b1a6e", "#ff9a4a"), "#111111"),
    "Frost": StyleSpec("speckle", ("#e8f4ff", "#9cc9f0"), "#12306e", outline="#12306e", hollow=True),
    "Neon": StyleSpec("grid", ("#06060c", "#19e6ff"), "#ff2fd6", outline="#ff2fd6", hollow=True, freq=4.0),
    "Candy": StyleSpec("checker", ("#f7b6d2", "#a9d4f5"), "#fff27a", freq=2.0),
    "Cocoa": StyleSpec("rings", ("#4a2c17", "#c89b6d"), "#2a160a", freq=3.0),
    "Mosaic": StyleSpec("mosaic", ("#d1495b", "#edae49", "#00798c", "#30638e"), "#ffffff", outline="#000000",
                        freq=6.0),
    "Ink": StyleSpec("paper", ("#f3ecd9", "#d8cfb6"), "#101010"),
    "Comic": StyleSpec("halftone", ("#ffd60a", "#e63946"), "#1d4ed8", outline="#000000", freq=6.0),
}
assert list(STYLE_SPECS) == STYLES


def _jitter(colour: str, n: int, g: torch.Generator, amount: float, device) -> torch.Tensor:
    base = torch.tensor(_rgb(colour), device=device).view(1, 3, 1, 1)
    noise = (torch.rand(n, 3, 1, 1, generator=g, device=device) * 2 - 1) * amount
    return (base + noise).clamp(0, 1)


def _object_mask(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Soft-free boolean mask of an object in its local frame (unit circumradius), as float."""
    r = torch.sqrt(x * x + y * y)
    theta = torch.atan2(y, x)
    if name == "circle":
        m = r < 0.95
    elif name in ("triangle", "square"):
        n = {"triangle": 3, "square": 4}[name]
        offset = {"triangle": math.pi / 2, "square": math.pi / 4}[name]
        # Regular n-gon of circumradius 1: inside when every edge's half-plane holds.
        apothem = math.cos(math.pi / n)
        m = torch.ones_like(x, dtype=torch.bool)
        for k in range(n):
            a = offset + (2 * k + 1) * math.pi / n
            m &= (x * math.cos(a) + y * math.sin(a)) < apothem
    elif name == "diamond":
        m = x.abs() / DIAMOND_HALF_WIDTH + y.abs() < 1
    elif name == "star":
        m = r < 0.42 + 0.58 * ((1 + torch.cos(5 * (theta - math.pi / 2))) / 2) ** 2
    elif name == "heart":
        hx, hy = x * 1.15, -y * 1.15 + 0.15
        m = (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy**3 < 0
    elif name == "cross":
        m = ((x.abs() < 0.3) & (y.abs() < 0.95)) | ((y.abs() < 0.3) & (x.abs() < 0.95))
    elif name == "crescent":
        m = (r < 0.95) & (((x - 0.42) ** 2 + y * y) > 0.72**2)
    elif name == "ring":
        m = (r < 0.95) & (r > RING_HOLE)
    elif name == "arrow":
        shaft = (y.abs() < 0.2) & (x > -0.95) & (x < 0.15)
        head = (x >= 0.05) & (x < 0.95) & (y.abs() < 0.95 * (0.95 - x))
        m = shaft | head
    else:
        raise ValueError(f"unknown object {name!r}; allowed: {', '.join(OBJECTS)}")
    return m.float()


def _object_interior(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The object's interior without its outline band (filled by outlined styles, left open by hollow ones)."""
    if name == "ring":
        r = torch.sqrt(x * x + y * y)
        return ((r < 0.95 / OUTLINE_SHRINK) & (r > RING_HOLE * OUTLINE_SHRINK)).float()
    return _object_mask(name, x * OUTLINE_SHRINK, y * OUTLINE_SHRINK)


def _background(spec: StyleSpec, u, v, n: int, g: torch.Generator, device) -> torch.Tensor:
    """Background of shape [n, 3, H, W] for one style (u, v: coordinates in [-1, 1], shape [1, 1, H, W])."""
    rand = lambda *shape: torch.rand(*shape, generator=g, device=device)
    c = [_jitter(col, n, g, 0.06, device) for col in spec.colours]
    freq = spec.freq * (0.85 + 0.3 * rand(n, 1, 1, 1))
    phase = rand(n, 1, 1, 1) * 2 * math.pi
    angle = torch.deg2rad(spec.angle + (rand(n, 1, 1, 1) * 2 - 1) * 10)
    p = spec.pattern
    if p == "stripes":
        t = (u * torch.cos(angle) + v * torch.sin(angle)) * freq * math.pi + phase
        w = (torch.sin(t) > 0).float()
    elif p == "waves":
        t = (v + 0.15 * torch.sin(u * 3 * math.pi + phase)) * freq * math.pi
        w = (torch.sin(t) > 0).float()
    elif p in ("dots", "halftone"):
        fu, fv = (u + 1) * freq / 2 + phase, (v + 1) * freq / 2 + phase
        du, dv = fu - torch.floor(fu) - 0.5, fv - torch.floor(fv) - 0.5
        radius = 0.25 if p == "dots" else 0.22 + 0.18 * (u + 1) / 2
        w = ((du * du + dv * dv) < radius**2).float()
    elif p == "gradient":
        w = ((v + 1) / 2 + 0.1 * (rand(n, 1, 1, 1) - 0.5)).clamp(0, 1)
    elif p == "speckle":
        low = rand(n, 1, 8, 8)
        w = F.interpolate(low, size=u.shape[-2:], mode="bilinear", align_corners=False)
        w = (w > 0.5).float() * 0.8
    elif p == "grid":
        fu, fv = (u + 1) * freq / 2 + phase, (v + 1) * freq / 2 + phase
        du, dv = (fu - torch.floor(fu) - 0.5).abs(), (fv - torch.floor(fv) - 0.5).abs()
        w = ((du > 0.4) | (dv > 0.4)).float()
    elif p == "checker":
        fu, fv = (u + 1) * freq / 2 + phase, (v + 1) * freq / 2 + phase
        w = ((torch.floor(fu) + torch.floor(fv)) % 2).float()
    elif p == "rings":
        r = torch.sqrt(u * u + v * v)
        w = (torch.sin(r * freq * 2 * math.pi + phase) > 0).float()
    elif p == "paper":
        low = rand(n, 1, 16, 16)
        w = F.interpolate(low, size=u.shape[-2:], mode="bilinear", align_corners=False) * 0.5
    elif p == "mosaic":
        cells = int(spec.freq)
        idx = torch.randint(0, len(c), (n, 1, cells, cells), generator=g, device=device)
        idx = F.interpolate(idx.float(), size=u.shape[-2:], mode="nearest").long()
        palette = torch.stack([ci.view(n, 3) for ci in c], dim=1)  # [n, k, 3]
        out = torch.gather(palette, 1, idx.view(n, -1, 1).expand(-1, -1, 3))  # [n, HW, 3]
        out = out.view(n, *u.shape[-2:], 3).permute(0, 3, 1, 2)
        grout = _grid_lines(u, v, cells)
        return out * (1 - grout) + 0.15 * grout
    else:
        raise ValueError(p)
    return c[0] * (1 - w) + c[1] * w


def _grid_lines(u, v, cells: int) -> torch.Tensor:
    fu, fv = (u + 1) * cells / 2, (v + 1) * cells / 2
    du, dv = (fu - torch.floor(fu) - 0.5).abs(), (fv - torch.floor(fv) - 0.5).abs()
    return ((du > 0.44) | (dv > 0.44)).float()


def render(
    style_idx: torch.Tensor,
    object_idx: torch.Tensor,
    generator: torch.Generator,
    size: int = IMAGE_SIZE,
) -> torch.Tensor:
    """Render images of the given (style, object) index pairs, shape ``[n, 3, size, size]`` in ``[-1, 1]``.

    Deterministic for the state of ``generator``; the images land on ``generator.device``.
    """
    device = generator.device
    n = style_idx.numel()
    hi = 2 * size
    coords = (torch.arange(hi, device=device, dtype=torch.float32) + 0.5) / hi * 2 - 1
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    u, v = u.view(1, 1, hi, hi), v.view(1, 1, hi, hi)
    out = torch.empty(n, 3, hi, hi, device=device)

    # Per-image object placement, drawn for every image in one go (deterministic order).
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)
    cx, cy = (rand(n, 1, 1, 1) * 2 - 1) * OFFSET, (rand(n, 1, 1, 1) * 2 - 1) * OFFSET
    scale = SCALE_MIN + SCALE_SPAN * rand(n, 1, 1, 1)
    rot = torch.deg2rad((rand(n, 1, 1, 1) * 2 - 1) * ROTATION_DEG)
    x0, y0 = (u - cx) / scale, (v - cy) / scale
    lx = x0 * torch.cos(rot) + y0 * torch.sin(rot)
    ly = -x0 * torch.sin(rot) + y0 * torch.cos(rot)

    # Object masks, one vectorised pass per object kind; ``inner`` is the interior without the outline band.
    masks = torch.zeros(n, 1, hi, hi, device=device)
    inner = torch.zeros_like(masks)
    for o, name in enumerate(OBJECTS):
        sel = (object_idx == o).nonzero().flatten()
        if sel.numel():
            masks[sel] = _object_mask(name, lx[sel], ly[sel])
            inner[sel] = _object_interior(name, lx[sel], ly[sel])

    for s, style in enumerate(STYLES):
        sel = (style_idx == s).nonzero().flatten()
        if sel.numel() == 0:
            continue
        spec = STYLE_SPECS[style]
        k = sel.numel()
        img = _background(spec, u, v, k, generator, device)
        fill = _jitter(spec.fill, k, generator, 0.05, device)
        m, m_in = masks[sel], inner[sel]
        if spec.outline is None:
            img = img * (1 - m) + fill * m
        elif spec.hollow:
            band = m * (1 - m_in)
            img = img * (1 - band) + fill * band
        else:
            outline = _jitter(spec.outline, k, generator, 0.03, device)
            img = img * (1 - m) + outline * m
            img = img * (1 - m_in) + fill * m_in
        out[sel] = img
    out = F.avg_pool2d(out, 2)
    return out * 2 - 1


def sample_labels(
    n: int, generator: torch.Generator, styles: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random (style, object) indices; ``styles`` (indices into ``STYLES``) restricts the styles drawn.

    Without ``styles`` the draws are exactly those of every earlier version (same generator calls, same values).
    """
    device = generator.device
    if styles is None:
        s = torch.randint(0, len(STYLES), (n,), generator=generator, device=device)
    else:
        allowed = torch.as_tensor(list(styles), dtype=torch.long, device=device)
        if allowed.numel() == 0 or allowed.min() < 0 or allowed.max() >= len(STYLES):
            raise ValueError(f"styles must be a non-empty list of style indices in 0..{len(STYLES) - 1}")
        s = allowed[torch.randint(0, allowed.numel(), (n,), generator=generator, device=device)]
    o = torch.randint(0, len(OBJECTS), (n,), generator=generator, device=device)
    return s, o


def sample_batch(n: int, generator: torch.Generator, size: int = IMAGE_SIZE):
    """``(images, style_idx, object_idx)`` with uniformly random labels."""
    s, o = sample_labels(n, generator)
    return render(s, o, generator, size), s, o


def sample_images(n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """Images only (the real-data sampler of GAN training); ``device`` must match the generator's."""
    return sample_batch(n, generator)[0]


def grid_labels(repeats: int = 1, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Every (style, object) pair ``repeats`` times, style-major."""
    s = torch.arange(len(STYLES), device=device).repeat_interleave(len(OBJECTS))
    o = torch.arange(len(OBJECTS), device=device).repeat(len(STYLES))
    return s.repeat(repeats), o.repeat(repeats)
