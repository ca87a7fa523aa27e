"""One-step (SFD) vs multi-step sampling time on MiniSD (or any pipeline / SFD run).

Usage::

    python bench/one_step_speed.py                      # MiniSD: its default 25 guided DDIM steps vs one step
    python bench/one_step_speed.py --model runs/sfd     # an SFD run: its one-step generator vs its base pipeline
    python bench/one_step_speed.py --images 64 --repeats 3 --steps 25 --guidance 5

Both modes generate the same MiniCanvas answer-set prompts and seeds through :func:`generators.sd.sample_sd`
(VAE decoding and text encoding included, as the evaluator samples). Without ``--model RUN`` the one-step
timing uses the base pipeline's UNet marked as a one-step generator: the cost of a call does not depend on the
weights. Prints wall-clock and process CPU seconds per image (on a shared machine the CPU time is the steadier
number), the UNet calls per batch, and the speed-up.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def _timed(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _count_calls(unet: torch.nn.Module, fn) -> int:
    calls = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


def main() -> None:
    from evaluate.subject import load_subject
    from generators import one_step
    from generators.minicanvas.concepts import OBJECTS, STYLES, TEMPLATE
    from generators.minicanvas.world import SD_GUIDANCE, SD_STEPS
    from generators.sd import sample_sd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minicanvas-sd", help="backbone name/path, or an SFD run folder")
    parser.add_argument("--images", type=int, default=32, help="images per timing (one batch)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per mode (median reported)")
    parser.add_argument(
        "--steps", type=int, default=SD_STEPS, help="multi-step sampler steps (MiniSD default)"
    )
    parser.add_argument("--guidance", type=float, default=SD_GUIDANCE, help="multi-step CFG scale")
    parser.add_argument("--t-init", type=int, default=625, help="t_init when marking a plain pipeline")
    args = parser.parse_args()

    torch.manual_seed(0)
    subject = load_subject(args.model, torch.device("cpu"))
    if one_step.one_step_timestep(subject.model) is not None:
        fast, slow, what = subject.model, subject.original(), f"the run's one-step generator ({args.model})"
    else:
        slow = subject.model
        fast = copy.copy(slow)  # shares the modules; only the marker differs
        fast.__dict__.pop("_erasure_one_step", None)
        one_step.mark(fast, args.t_init)
        what = (
            f"{args.model}'s UNet marked one-step (t_init {args.t_init}; timing does not depend on weights)"
        )
    pairs = [(s, o) for s in STYLES for o in OBJECTS]
    prompts = [
        TEMPLATE.format(style=s, object=o)
        for s, o in (pairs * (args.images // len(pairs) + 1))[: args.images]
    ]
    seeds = list(range(len(prompts)))

    def multi() -> torch.Tensor:
        return sample_sd(slow, prompts, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance)

    def single() -> torch.Tensor:
        return sample_sd(fast, prompts, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance)

    with torch.no_grad():
        calls_multi, calls_single = (
            _count_calls(slow.unet, multi),
            _count_calls(fast.unet, single),
        )  # warm-up too
        wall_multi, cpu_multi = _timed(multi, args.repeats)
        wall_single, cpu_single = _timed(single, args.repeats)
    n = len(prompts)
    print(f"model: {what}")
    print(f"{n} images per batch, {torch.get_num_threads()} torch threads, median of {args.repeats}")
    print(f"multi-step ({args.steps} steps, CFG {args.guidance}): {calls_multi} UNet calls per batch, "
          f"{1000 * wall_multi / n:.2f} ms/image wall, {1000 * cpu_multi / n:.2f} ms/image CPU")  # fmt: skip
    print(f"one-step: {calls_single} UNet call per batch, {1000 * wall_single / n:.2f} ms/image wall, "
          f"{1000 * cpu_single / n:.2f} ms/image CPU")  # fmt: skip
    print(f"speed-up: {wall_multi / wall_single:.1f}x wall, {cpu_multi / cpu_single:.1f}x CPU")


if __name__ == "__main__":
    main()
