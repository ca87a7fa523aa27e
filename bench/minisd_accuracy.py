"""MiniSD's style and object accuracy on more samples than `world verify`, per object, for comparing UNets.

Usage::

    python bench/minisd_accuracy.py                                # the shipped world, 8 seeds per pair
    python bench/minisd_accuracy.py --world /path/to/world --seeds-per-pair 8 --threads 2

`world verify`'s full tier judges 2 seeds per (style, object) pair (240 samples), so one object's accuracy rests on
24 samples and two UNets within a few points of each other cannot be told apart by it. This samples
``--seeds-per-pair`` seeds per pair with the UnlearnCanvas template prompt (seeds 0, 1, ...: the full tier's 240
are the first of them) and half as many per pair with the held-out paraphrase templates (seeds 10,000 + k), with
MiniSD's sampler defaults (DDIM, ``SD_STEPS`` steps, guidance ``SD_GUIDANCE``), judged by the world's classifier.
Every UNet compared this way sees the same seeds and prompts. Prints one JSON object. About 270 s at 8 seeds per
pair on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=None, help="world folder (default: the shipped world)")
    parser.add_argument("--seeds-per-pair", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from generators.minicanvas import concepts
    from generators.minicanvas.concepts import OBJECTS, STYLES
    from generators.minicanvas.dataset import grid_labels
    from generators.minicanvas.world import (
        SD_GUIDANCE,
        SD_STEPS,
        accuracy_by_label,
        classify,
        load_classifier,
        load_minisd,
        top_confusions,
    )
    from generators.sd import sample_sd

    started = time.time()
    classifier = load_classifier("cpu", args.world)
    pipe = load_minisd("cpu", args.world)

    s_idx, o_idx = grid_labels(args.seeds_per_pair)
    prompts = [concepts.template_prompt(STYLES[s], OBJECTS[o]) for s, o in zip(s_idx, o_idx)]
    images = sample_sd(
        pipe, prompts, list(range(len(prompts))), num_inference_steps=SD_STEPS, guidance_scale=SD_GUIDANCE
    )
    style_probs, object_probs = classify(classifier, images)

    s_p, o_p = grid_labels(max(1, args.seeds_per_pair // 2))
    paraphrases = [
        concepts.HELDOUT_PARAPHRASES[k % 2].format(style=STYLES[s], object=OBJECTS[o])
        for k, (s, o) in enumerate(zip(s_p, o_p))
    ]
    images_p = sample_sd(
        pipe,
        paraphrases,
        [10_000 + k for k in range(len(paraphrases))],
        num_inference_steps=SD_STEPS,
        guidance_scale=SD_GUIDANCE,
    )
    style_probs_p, object_probs_p = classify(classifier, images_p)

    predicted_objects = object_probs.argmax(1)
    print(
        json.dumps(
            {
                "world": str(args.world or "shipped"),
                "samples": len(images),
                "style_acc": float((style_probs.argmax(1) == s_idx).float().mean()),
                "object_acc": float((predicted_objects == o_idx).float().mean()),
                "object_acc_by_object": accuracy_by_label(predicted_objects, o_idx, OBJECTS),
                "object_confusions": top_confusions(predicted_objects, o_idx, OBJECTS),
                "paraphrase_samples": len(images_p),
                "paraphrase_style_acc": float((style_probs_p.argmax(1) == s_p).float().mean()),
                "paraphrase_object_acc": float((object_probs_p.argmax(1) == o_p).float().mean()),
                "seconds": round(time.time() - started, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
