"""Erasure speed and memory: each SD method's faithful reference path against the studio's optimised path.

Usage::

    python bench/erasure_speed.py --device cpu --size mini --json bench-mini.json
    python bench/erasure_speed.py --device cuda --size sd15 --json bench-sd15.json --methods esd,uce

For every registered SD method (or ``--methods``) and each path — ``reference`` (:meth:`SpeedConfig.reference`:
fp32, plain attention, frozen-model work recomputed every step) and ``optimised`` (the job default, plus bf16
autocast on a GPU) — the method runs in this process with its *default* parameters on a fresh copy of the
pipeline and is stopped after ``--steps`` training steps. Reported per path:

* ``setup_s``: from the call to the first step (forget data, trajectory banks, masks — real per-concept cost);
* ``s_per_iter``: median time of the steps after the first;
* ``projected_s_per_concept``: ``setup_s + total_steps x s_per_iter`` at the method's default budget;
* ``peak_mem_mb``: peak CUDA memory allocated (GPU), or peak resident-set growth over the call (CPU, sampled).

``speedup_vs_reference`` is the ratio of the projected times. Closed-form methods (UCE) run to the end and report
their whole time. ``--size mini`` uses the shipped MiniSD; ``--size sd15`` builds SD-1.5's UNet, text encoder and
VAE from their published configs with random weights (no download; the compute is the real model's).
Figures are printed as a table and, with ``--json``, written as ``{"methods": {name: {...}}}``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from erasure.base import RunContext
from erasure.config import Target
from erasure.registry import get_method, list_methods
from erasure.speed import SpeedConfig, apply_to_backbone, autocast

# SD-1.5's component configs (runwayml/stable-diffusion-v1-5: unet/, text_encoder/, vae/ config.json).
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}  # fmt: skip
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}  # fmt: skip
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}  # fmt: skip

TARGETS = {"mini": ("style:Ember", "style:Lagoon"), "sd15": ("style:Van Gogh", "style:Monet")}


class Stop(Exception):
    """Raised from the progress callback once enough steps were timed."""


def build_sd15(device: torch.device):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from generators.minicanvas.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=build_clip_tokenizer(),
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device)


def load_pipeline(size: str, device: torch.device):
    if size == "sd15":
        return build_sd15(device)
    from generators.loading import load_backbone
    from generators.registry import resolve_backbone

    return load_backbone(resolve_backbone("minicanvas-sd"), device, "fp32")


class PeakMemory:
    """Peak CUDA memory allocated, or peak RSS growth (sampled every 5 ms) on the CPU, over a ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            import psutil

            self._proc = psutil.Process(os.getpid())
            self._base = self._peak = self._proc.memory_info().rss
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._done.set()
            self._thread.join()
            self.peak_mb = (max(self._peak, self._proc.memory_info().rss) - self._base) / 2**20


def time_method(name: str, pipe, speed: SpeedConfig, device: torch.device, size: str, steps: int, work: Path):
    """Run ``name`` with default params on a copy of ``pipe`` under ``speed``; stop after ``steps`` steps."""
    pipe = copy.deepcopy(pipe)
    apply_to_backbone(pipe, speed)
    stamps: list[float] = []
    totals: list[int] = []

    def progress(step: int, total: int, **scalars: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        totals.append(total)
        if len(stamps) > steps:
            raise Stop

    target, anchor = (Target.parse(spec) for spec in TARGETS[size])
    ctx = RunContext(
        seed=0, device=device, precision="fp32", checkpoint_dir=work / f"{name}-{os.getpid()}-{time.time_ns()}",
        checkpoint_every=10**9, progress=progress, log=lambda line: None, anchor=anchor, speed=speed,
    )  # fmt: skip
    cls = get_method(name)
    finished = True
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        try:
            with autocast(speed, device):
                cls().erase(pipe, target, cls.Params(), ctx)
        except Stop:
            finished = False
        end = time.perf_counter()
    if finished and len(stamps) <= 1:  # closed form (or a single step): its whole time is the figure
        return {"setup_s": end - start, "s_per_iter": None, "total_steps": totals[-1] if totals else 0,
                "projected_s_per_concept": end - start, "peak_mem_mb": memory.peak_mb}  # fmt: skip
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    per_iter = statistics.median(gaps)
    setup = stamps[0] - start - per_iter
    total = totals[-1]
    return {
        "setup_s": setup,
        "s_per_iter": per_iter,
        "total_steps": total,
        "projected_s_per_concept": setup + total * per_iter,
        "peak_mem_mb": memory.peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", default="mini", choices=["mini", "sd15"])
    parser.add_argument(
        "--methods", default=None, help="comma-separated SD methods (default: all registered)"
    )
    parser.add_argument(
        "--steps", type=int, default=6, help="training steps timed per path (after the first)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--work", type=Path, default=Path("/tmp/erasure-speed"), help="scratch folder")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    device = torch.device(args.device)
    names = args.methods.split(",") if args.methods else [
        n for n in list_methods() if get_method(n).backbone_kind == "sd" and n != "soup"
    ]  # fmt: skip
    pipe = load_pipeline(args.size, device)
    paths = {"reference": SpeedConfig.reference(), "optimised": SpeedConfig()}
    if device.type == "cuda":
        paths["optimised"] = SpeedConfig(autocast="bf16")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "size": args.size,
        "torch": torch.__version__,
        "steps_timed": args.steps,
        "paths": {k: v.model_dump() for k, v in paths.items()},
        "methods": {},
    }
    print(f"{'method':<12}{'path':<11}{'setup s':>9}{'s/iter':>9}{'steps':>7}{'s/concept':>11}{'peak MB':>9}")
    for name in names:
        row: dict[str, Any] = {}
        for label, speed in paths.items():
            try:
                row[label] = time_method(name, pipe, speed, device, args.size, args.steps, args.work)
            except Exception as err:  # noqa: BLE001 - a method that cannot run here is reported, not hidden
                row[label] = {"error": f"{type(err).__name__}: {err}"}
                print(f"{name:<12}{label:<11}error: {row[label]['error'][:200]}")
                continue
            r = row[label]
            s_iter = f"{r['s_per_iter']:.3f}" if r["s_per_iter"] is not None else "-"
            print(f"{name:<12}{label:<11}{r['setup_s']:>9.2f}{s_iter:>9}{r['total_steps']:>7}"
                  f"{r['projected_s_per_concept']:>11.1f}{r['peak_mem_mb']:>9.0f}")  # fmt: skip
        if "error" not in row["reference"] and "error" not in row["optimised"]:
            ref, opt = row["reference"], row["optimised"]
            row["speedup_vs_reference"] = ref["projected_s_per_concept"] / opt["projected_s_per_concept"]
            if ref["s_per_iter"] and opt["s_per_iter"]:
                row["speedup_per_iter"] = ref["s_per_iter"] / opt["s_per_iter"]
            row["peak_mem_mb"] = opt["peak_mem_mb"]
            print(f"{name:<12}speed-up {row['speedup_vs_reference']:.2f}x per concept")
        report["methods"][name] = row
        sys.stdout.flush()
        if args.json:  # after every method, so a run cut short still leaves its figures
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
