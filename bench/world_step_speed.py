"""Seconds per MiniSD UNet training step of `world build`, and what ways of running it would save.

Usage::

    python bench/world_step_speed.py                 # 2 and 1 threads; fp32, bf16 autocast, channels_last
    python bench/world_step_speed.py --steps 10 --threads 2

The UNet's two phases (`unet`, `unet_refine`) are about two thirds of the world build's time on a 2-core CPU
(`generators/minicanvas/world/build_info.json`). Each variant runs the build's own step function
(:meth:`generators.minicanvas.train.UNetTrainer.step_fn`: fresh images, frozen VAE encoding, caption lookup,
epsilon-MSE, AdamW, EMA) on a freshly initialised UNet with the shipped world's VAE and text tower, and prints the
median seconds per step and that time projected over the default budget of both phases
(:class:`~generators.minicanvas.train.WorldSettings`). Run it on a quiet machine: another job on the same cores
changes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main() -> None:
    from diffusers import UNet2DConditionModel

    from generators.minicanvas.models import TEXT_MAX_LENGTH, unet_config
    from generators.minicanvas.tokenizer import build_clip_tokenizer
    from generators.minicanvas.train import UNetTrainer, WorldSettings, text_encoder_from_clip
    from generators.minicanvas.world import load_clip, load_minisd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=6, help="timed steps per variant (after 2 warm-up steps)"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch intra-op thread counts")
    args = parser.parse_args()

    settings = WorldSettings()
    phase_steps = settings.unet.steps + settings.unet_refine.steps
    vae = load_minisd("cpu").vae
    clip, _ = load_clip("cpu")
    tokenizer = build_clip_tokenizer(TEXT_MAX_LENGTH)
    variants = [("fp32", False, False), ("bf16 autocast", True, False), ("fp32 channels_last", False, True)]
    print(f"{'threads':>7}  {'variant':<20} {'s/step':>7}  {'projected unet + unet_refine s':>30}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, bf16, channels_last in variants if threads == max(args.threads) else variants[:1]:
            torch.manual_seed(settings.unet.seed)
            unet = UNet2DConditionModel(**unet_config())
            if channels_last:
                unet = unet.to(memory_format=torch.channels_last)
            trainer = UNetTrainer(unet, vae, text_encoder_from_clip(clip), tokenizer, settings, "cpu")
            opt = torch.optim.AdamW(unet.parameters(), lr=settings.unet.lr, weight_decay=0.01)
            step = trainer.step_fn(settings.unet, opt, torch.Generator().manual_seed(settings.unet.seed))
            times = []
            for i in range(args.steps + 2):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                    step(i)
                times.append(time.perf_counter() - start)
            per_step = statistics.median(times[2:])
            print(f"{threads:>7}  {name:<20} {per_step:>7.3f}  {per_step * phase_steps:>30.0f}")


if __name__ == "__main__":
    main()
