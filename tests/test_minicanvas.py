"""MiniCanvas: the procedural dataset, the real CLIP tokenizer, resumable training, the shipped world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from generators.minicanvas import concepts
from generators.minicanvas.concepts import OBJECTS, STYLES
from generators.minicanvas.dataset import grid_labels, render, sample_batch
from generators.minicanvas.paths import WORLD_DIR
from generators.minicanvas.tokenizer import build_clip_tokenizer
from generators.minicanvas.train import LOOP_SECONDS, StageSettings, WorldSettings, train_classifier

REPO = Path(__file__).resolve().parents[1]


def test_world_shape_is_unlearncanvas_like():
    assert len(STYLES) >= 12 and len(OBJECTS) >= 10
    assert concepts.template_prompt("Ember", "circle") == "A circle image in Ember style."
    assert len(concepts.TRAIN_PARAPHRASES) >= 4 and len(concepts.HELDOUT_PARAPHRASES) >= 2
    trained = {p for s in STYLES for o in OBJECTS for p in concepts.training_prompts(s, o)}
    held = {p for s in STYLES for o in OBJECTS for p in concepts.heldout_prompts(s, o)}
    assert not trained & held
    # Part of the second-language names never appear in training captions.
    for style in concepts.HELDOUT_STYLES_ES:
        assert not any(concepts.STYLES_ES[style] in p for p in trained)


def test_render_is_deterministic_and_varied():
    s, o = grid_labels(1)
    a = render(s, o, torch.Generator().manual_seed(7))
    b = render(s, o, torch.Generator().manual_seed(7))
    c = render(s, o, torch.Generator().manual_seed(8))
    assert a.shape == (len(STYLES) * len(OBJECTS), 3, 32, 32)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05  # another seed: other positions, colours, phases
    assert a.min() >= -1 and a.max() <= 1


def test_near_neighbour_styles_are_closer_than_others():
    g = torch.Generator().manual_seed(0)
    n = 64
    means = {}
    for name in ("Ember", "Cinder", "Lagoon", "Meadow"):
        idx = torch.full((n,), STYLES.index(name))
        means[name] = render(idx, torch.randint(0, len(OBJECTS), (n,), generator=g), g).mean(dim=(0, 2, 3))
    near = (means["Ember"] - means["Cinder"]).norm()
    assert near < (means["Ember"] - means["Lagoon"]).norm()
    assert near < (means["Ember"] - means["Meadow"]).norm()


def test_clip_tokenizer_is_openai_vocabulary():
    tok = build_clip_tokenizer(32)
    assert len(tok) == 49408
    ids = tok("a photo of a cat").input_ids
    # OpenAI CLIP ids: <|startoftext|>=49406, "a"=320, "photo"=1125, "of"=539, "cat"=2368, <|endoftext|>=49407
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_training_resumes_bit_identically(tmp_path):
    settings = WorldSettings(classifier=StageSettings(steps=4, batch=8, lr=1e-3, warmup=1, seed=3),
                             checkpoint_every=2)
    straight = train_classifier(tmp_path / "a", settings, "cpu")
    # Interrupted after the first checkpoint (step 2), then resumed by the same call.
    short = settings.model_copy(update={"classifier": settings.classifier.model_copy(update={"steps": 2})})
    train_classifier(tmp_path / "b", short, "cpu")
    state = tmp_path / "b" / "classifier.state.safetensors"
    assert state.exists()
    with safe_open(str(state), framework="pt") as f:
        meta = json.loads(f.metadata()["training_state"])
    assert meta["extra"]["seconds"] > 0
    # Pretend the first process trained for 1000 s: the resumed loop must add its own time to that.
    meta["extra"]["seconds"] = 1000.0
    save_file(load_file(state), state, metadata={"training_state": json.dumps(meta)})
    resumed = train_classifier(tmp_path / "b", settings, "cpu")
    for (k, v1), v2 in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v1, v2), k
    # The training time is carried across the resume: the loop reports both processes' time, not only its own.
    assert 1000.0 < LOOP_SECONDS["classifier"] < 1300.0


def test_concept_tokens_point_at_each_captions_concept_words():
    """MiniCLIP's token-level phase supervises the hidden state at the style and object words' last tokens: the
    recorded positions must hold exactly those words, in every template and in Spanish captions."""
    from generators.minicanvas import concepts
    from generators.minicanvas.train import ConceptTokens, PromptTable

    tok = build_clip_tokenizer(32)
    table = PromptTable(tok, "cpu")
    tokens = ConceptTokens.from_table(table, tok, "cpu")
    assert len(tokens.style_pos) == len(table.prompts) - 1  # every caption but the empty one
    checked_spanish = 0
    for i, prompt in enumerate(table.prompts[:-1]):
        style, obj = STYLES[int(tokens.style_label[i])], OBJECTS[int(tokens.object_label[i])]
        spanish = prompt == concepts.spanish_prompt(style, obj)
        checked_spanish += spanish
        sw = concepts.STYLES_ES[style] if spanish else style
        ow = concepts.OBJECTS_ES[obj] if spanish else obj
        assert sw in prompt and ow in prompt
        last_style = tok(sw, add_special_tokens=False).input_ids[-1]
        last_object = tok(ow, add_special_tokens=False).input_ids[-1]
        assert int(table.input_ids[i, tokens.style_pos[i]]) == last_style, prompt
        assert int(table.input_ids[i, tokens.object_pos[i]]) == last_object, prompt
    assert checked_spanish > 0
    for k, style in enumerate(STYLES):
        assert int(tokens.short_ids[k, tokens.short_pos[k]]) == tok(style, add_special_tokens=False).input_ids[-1]


def _tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    from generators.minicanvas.models import TEXT_MAX_LENGTH

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=TEXT_MAX_LENGTH,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()


def test_augmented_captions_keep_every_original_token_in_order():
    """Stage sd_text aligns each token of a caption with the same token in its augmented copy; concept words are
    never replaced, random words never come from a concept name or a held-out template's words."""
    from generators.minicanvas.models import TEXT_MAX_LENGTH
    from generators.minicanvas.text_robustness import (
        Caption,
        augment,
        concept_words,
        heldout_words,
        random_word_pool,
    )

    tok = build_clip_tokenizer(TEXT_MAX_LENGTH)
    pool = random_word_pool(tok)
    banned = {i for w in concept_words() | heldout_words() for i in tok(w, add_special_tokens=False).input_ids}
    assert not banned & set(pool.tolist()) and len(pool) > 10_000
    assert {"here", "depicted", "showing"} <= heldout_words()
    g = torch.Generator().manual_seed(0)
    names = concept_words()
    texts = [concepts.template_prompt("Cocoa", "crescent"), concepts.spanish_prompt("Ember", "crescent"),
             "{object} drawn in the {style} style".format(object="heart", style="Ink")]
    for text in texts:
        caption = Caption.parse(text, tok, names)
        base = tok(text, padding="max_length", max_length=TEXT_MAX_LENGTH).input_ids
        named = [i for w, n in zip(caption.words, caption.names_concept) if n for i in w]
        assert named, text
        for _ in range(20):
            pair = augment(caption, pool, g, bos=tok.bos_token_id, eos=tok.eos_token_id, length=TEXT_MAX_LENGTH,
                           max_inserted=3, substitute_prob=0.5)
            assert pair.caption == base
            assert all(pair.augmented[t] == pair.caption[s] for s, t in zip(pair.source, pair.target))
            assert sorted(pair.target) == pair.target and sorted(pair.source) == pair.source
            kept = [pair.caption[s] for s in pair.source]
            assert all(kept.count(i) >= named.count(i) for i in named), text  # concept tokens are never replaced
            new = [t for k, t in enumerate(pair.augmented) if k not in set(pair.target)]
            assert 1 <= len(new) <= 4 and set(new) <= set(pool.tolist())


def test_text_robustness_stage_reads_past_new_words_and_resumes(tmp_path, monkeypatch):
    """A few steps of stage sd_text on a tiny tower: augmented captions' aligned states move towards the original
    captions' states while the captions' own states stay close; an interrupted run resumes bit-identically."""
    import random

    from generators.minicanvas.models import TEXT_MAX_LENGTH
    from generators.minicanvas.text_robustness import (
        Caption,
        augment,
        concept_words,
        random_word_pool,
        robustness_losses,
        tune_text_robustness,
    )

    tok = build_clip_tokenizer(TEXT_MAX_LENGTH)
    original = _tiny_text_encoder()
    fast = StageSettings(steps=150, batch=32, lr=1e-2, warmup=1, seed=1)
    # Keep weight 1, not the default 10: a one-layer, 16-wide tower has too little room to hold the captions' states
    # that tightly and still move much in 150 steps.
    settings = WorldSettings(sd_text=fast, sd_text_keep_weight=1.0, checkpoint_every=75)
    tuned = tune_text_robustness(original, tmp_path / "a", tok, settings, "cpu")

    names, pool, g = concept_words(), random_word_pool(tok), torch.Generator().manual_seed(123)
    texts = random.Random(0).sample([p for s in STYLES for o in OBJECTS for p in concepts.training_prompts(s, o)], 48)
    pairs = [augment(Caption.parse(t, tok, names), pool, g, bos=tok.bos_token_id, eos=tok.eos_token_id,
                     length=TEXT_MAX_LENGTH, max_inserted=3, substitute_prob=0.5) for t in texts]
    with torch.no_grad():
        _, robust_before = robustness_losses(original, original, pairs)
        keep_after, robust_after = robustness_losses(tuned, original, pairs)
    assert robust_after < 0.6 * robust_before
    assert keep_after < 0.25 * robust_before
    assert all(torch.equal(a, b) for a, b in zip(original.parameters(), _tiny_text_encoder().parameters()))

    from generators.minicanvas.train import Loop

    save = Loop._save

    def save_then_stop(self, step):  # Ctrl-C right after the first checkpoint
        save(self, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(Loop, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        tune_text_robustness(_tiny_text_encoder(), tmp_path / "b", tok, settings, "cpu")
    monkeypatch.setattr(Loop, "_save", save)
    resumed = tune_text_robustness(_tiny_text_encoder(), tmp_path / "b", tok, settings, "cpu")
    for (k, v1), v2 in zip(tuned.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_sample_batch_labels_match_render():
    g = torch.Generator().manual_seed(1)
    x, s, o = sample_batch(16, g)
    assert x.shape == (16, 3, 32, 32) and s.shape == o.shape == (16,)
    assert int(s.max()) < len(STYLES) and int(o.max()) < len(OBJECTS)


SHIPPED = (WORLD_DIR / "sd" / "model_index.json").exists()


@pytest.mark.slow
def test_shipped_minisd_opens_with_plain_diffusers_offline(tmp_path):
    """The shipped MiniSD is an ordinary diffusers folder: no project code is needed to open and sample it."""
    assert SHIPPED, "the MiniCanvas world is not built: run `erasure-studio world build`"
    code = f"""
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(WORLD_DIR / 'sd')!r})
assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
out = pipe("A star image in Lagoon style.", num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
           generator=torch.Generator().manual_seed(0), output_type="np").images
assert out.shape == (1, 32, 32, 3), out.shape
print("ok", float(out.std()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path)}  # no project code on the path
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok") and float(res.stdout.split()[1]) > 0.01


@pytest.mark.slow
def test_world_build_and_verify_end_to_end(tmp_path):
    """A tiny-budget build from scratch writes every stage atomically and verify reports every key."""
    from generators.minicanvas import world

    tiny = StageSettings(steps=2, batch=8, lr=1e-3, warmup=1)
    settings = WorldSettings(classifier=tiny, clip=tiny, clip_text=tiny, clip_vision=tiny, vae=tiny, unet=tiny, unet_refine=tiny,
                             sd_text=tiny, checkpoint_every=1)
    info = world.build(only=["classifier", "clip", "sd", "sd_text"], out_dir=tmp_path / "w",
                       work_dir=tmp_path / "work", settings=settings)
    assert set(info["stages"]) == {"classifier", "clip", "sd", "sd_text"}
    # sd_text republished MiniSD whole, with a text encoder tuned away from MiniCLIP's tower.
    from transformers import CLIPModel, CLIPTextModel

    def final_norm(model):
        return next(v for k, v in model.state_dict().items() if k.endswith("final_layer_norm.weight"))

    published = CLIPTextModel.from_pretrained(str(tmp_path / "w" / "sd" / "text_encoder"))
    tower = CLIPModel.from_pretrained(str(tmp_path / "w" / "clip"))
    assert (tmp_path / "w" / "sd" / "unet").is_dir() and (tmp_path / "w" / "sd" / "model_index.json").is_file()
    assert not torch.equal(final_norm(published), final_norm(tower))
    assert not list((tmp_path / "w").glob(".*partial"))
    build_info = json.loads((tmp_path / "w" / "build_info.json").read_text())
    assert build_info["stages"]["sd"]["settings"]["unet"]["steps"] == 2
    # The stage times say which processor they were measured on (build times differ between 2-core machines).
    assert build_info["stages"]["classifier"]["cpu"]["torch_threads"] == torch.get_num_threads()
    assert build_info["stages"]["classifier"]["cpu"]["model"]
    report = world.verify(tier="smoke", root=tmp_path / "w")
    for key in ("classifier_style_acc", "classifier_object_acc", "clip_top1", "sd_style_acc", "sd_object_acc",
                "sd_paraphrase_style_acc", "sd_paraphrase_object_acc", "sd_fid", "sd_random_fid"):
        assert 0 <= report[key] < float("inf"), key
    # Two training steps cannot make a judge: the verify numbers must say so (no hard-coded figures).
    assert report["classifier_style_acc"] < 0.5
