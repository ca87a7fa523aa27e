"""Seconds per MiniSD UNet training step of `world build`, and what ways of running it would save.

Usage::

    python bench/world_step_speed.py                  # 2 threads: eager, compiled, bf16, channels_last; then 1 thread
    python bench/world_step_speed.py --rounds 8 --steps 4 --threads 2

The UNet's two phases (`unet`, `unet_refine`) are about two thirds of the world build's time on a 2-core CPU
(`generators/minicanvas/world/build_info.json`). Each variant runs the build's own step function
(:meth:`generators.minicanvas.train.UNetTrainer.step_fn`: fresh images, frozen VAE encoding, caption lookup,
epsilon-MSE, AdamW, EMA) on a freshly initialised UNet with the shipped world's VAE and text tower.

A shared 2-core machine drifts: the same eager step measured 0.57 s and, minutes later, 0.65 s. So the variants run
*interleaved*, ``--steps`` steps each per round over ``--rounds`` rounds, and each is reported by its median step
with the lowest and highest of its per-round medians; only differences larger than that spread mean something. The
first step (where ``torch.compile`` compiles) is printed apart and left out. The one-thread figure is measured after
the others, on its own. Run it on an otherwise quiet machine.
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
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch intra-op thread counts")
    args = parser.parse_args()

    settings = WorldSettings()
    phase_steps = settings.unet.steps + settings.unet_refine.steps
    vae = load_minisd("cpu").vae
    clip, _ = load_clip("cpu")
    tokenizer = build_clip_tokenizer(TEXT_MAX_LENGTH)

    def make_step(compiled: bool, channels_last: bool):
        torch.manual_seed(settings.unet.seed)
        unet = UNet2DConditionModel(**unet_config())
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        trainer = UNetTrainer(unet, vae, text_encoder_from_clip(clip), tokenizer, settings, "cpu")
        if compiled:  # after the trainer's EMA copy, as a compiled build would do it
            unet.compile()
        opt = torch.optim.AdamW(unet.parameters(), lr=settings.unet.lr, weight_decay=0.01)
        return trainer.step_fn(settings.unet, opt, torch.Generator().manual_seed(settings.unet.seed))

    # (name, compiled, bf16 autocast, channels_last)
    all_variants = [
        ("fp32 eager (the build's)", False, False, False),
        ("fp32 torch.compile", True, False, False),
        ("bf16 autocast", False, True, False),
        ("fp32 channels_last", False, False, True),
    ]
    header = f"{'threads':>7}  {'variant':<26} {'s/step':>7}  {'round medians':>13}  {'first step s':>12}"
    print(f"{header}  {'projected unet + unet_refine s':>30}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        variants = all_variants if threads == max(args.threads) else all_variants[:1]
        runs = []
        for name, compiled, bf16, channels_last in variants:
            step = make_step(compiled, channels_last)
            autocast = (
                (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
            )
            start = time.perf_counter()
            with autocast():
                step(0)
            first = time.perf_counter() - start
            with autocast():
                step(1)
            runs.append((name, step, autocast, first, []))
        counter = 2
        for _ in range(args.rounds):
            for _name, step, autocast, _first, rounds in runs:
                times = []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    with autocast():
                        step(counter)
                    times.append(time.perf_counter() - start)
                    counter += 1
                rounds.append(times)
        for name, _step, _autocast, first, rounds in runs:
            per_step = statistics.median(t for times in rounds for t in times)
            medians = [statistics.median(times) for times in rounds]
            spread = f"{min(medians):.3f}-{max(medians):.3f}"
            print(
                f"{threads:>7}  {name:<26} {per_step:>7.3f}  {spread:>13}  {first:>12.1f}  {per_step * phase_steps:>30.0f}"
            )


if __name__ == "__main__":
    main()
