"""UnlearnDiffAtk's token attack: prompts one after another vs side by side (the hub suite's way).

Usage::

    python bench/attack_speed.py                         # MiniSD, 5 MiniCanvas prompts, 80 steps each
    python bench/attack_speed.py --prompts 10 --steps 40 --model PATH/TO/PIPELINE --device cuda

Both runs attack the same prompts with the same per-prompt random streams for ``--steps`` steps (blocks of 40,
no judging, so every prompt runs the whole budget): first :func:`erasure.attacks.optimize_prefix_tokens` once per
prompt, then :func:`erasure.attacks.optimize_prefix_tokens_batch` on all of them. Prints wall seconds per
prompt-step of each, the speed-up, and whether both found the same prefix tokens (they should: only the last bits of
the batched UNet's arithmetic differ).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from erasure.attacks import optimize_prefix_tokens, optimize_prefix_tokens_batch
    from generators.minicanvas import concepts as C
    from generators.minicanvas.paths import sd_pipeline_dir
    from generators.sd import load_sd_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a diffusers pipeline folder (default: MiniSD)")
    parser.add_argument("--prompts", type=int, default=5, help="prompts attacked (the quick tier: 5, full: 10)")
    parser.add_argument("--steps", type=int, default=80, help="attack steps per prompt (a multiple of 40)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.steps % 40:
        parser.error("--steps must be a multiple of 40 (the attack's block)")

    pipe = load_sd_pipeline(args.model or sd_pipeline_dir(), device=args.device)
    pairs = [(s, o) for s in C.STYLES for o in C.OBJECTS][:: max(1, len(C.STYLES) * len(C.OBJECTS) // args.prompts)]
    prompts = [C.TEMPLATE.format(style=s, object=o) for s, o in pairs[: args.prompts]]
    size = pipe.unet.config.sample_size
    channels = pipe.unet.config.in_channels
    latents = torch.randn(len(prompts), channels, size, size, generator=torch.Generator().manual_seed(0))
    latents = latents.to(args.device)
    budget = {"k": 5, "iterations": 40, "blocks": args.steps // 40}

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    alone = [
        optimize_prefix_tokens(pipe, p, latents[i : i + 1], generator=torch.Generator().manual_seed(i), **budget)
        for i, p in enumerate(prompts)
    ]
    sync()
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    together = optimize_prefix_tokens_batch(
        pipe, prompts, latents, generators=[torch.Generator().manual_seed(i) for i in range(len(prompts))], **budget
    )
    sync()
    together_s = time.perf_counter() - start

    prompt_steps = len(prompts) * args.steps
    same = sum(a.tokens.tolist() == b.tokens.tolist() for a, b in zip(alone, together))
    print(f"{len(prompts)} prompts x {args.steps} steps on {args.device} ({torch.get_num_threads()} threads)")
    print(f"one after another: {alone_s:7.1f} s  {1000 * alone_s / prompt_steps:6.1f} ms per prompt-step")
    print(f"side by side:      {together_s:7.1f} s  {1000 * together_s / prompt_steps:6.1f} ms per prompt-step")
    print(f"speed-up {alone_s / together_s:.2f}x; the same prefix tokens for {same} of {len(prompts)} prompts")


if __name__ == "__main__":
    main()
