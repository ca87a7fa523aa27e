"""A tiny random StableDiffusionPipeline built offline (no downloads), for export and runner tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The CLIP BPE test vocabulary of transformers' tokenizer tests.
_VOCAB = [
    "l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
    "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>",
]  # fmt: skip
_MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]


def build_tiny_tokenizer(token_dir: Path, model_max_length: int = 77):
    """A CLIPTokenizer over the tiny test vocabulary (ids 21/22 are start/end of text); files go to ``token_dir``."""
    from transformers import CLIPTokenizer

    token_dir.mkdir(parents=True, exist_ok=True)
    (token_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(_VOCAB)}))
    (token_dir / "merges.txt").write_text("\n".join(_MERGES) + "\n")
    return CLIPTokenizer(
        vocab=str(token_dir / "vocab.json"),
        merges=str(token_dir / "merges.txt"),
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def build_tiny_pipeline(folder: Path) -> Path:
    """Save a tiny random SD pipeline to ``folder`` (which must not exist) and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=21,
            eos_token_id=22,
            pad_token_id=22,
            hidden_size=8,
            intermediate_size=16,
            layer_norm_eps=1e-5,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(_VOCAB),
        )
    )
    tokenizer = build_tiny_tokenizer(folder.parent / f"{folder.name}-tokenizer-files")
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def empty_states(pipe) -> torch.Tensor:
    """The pipeline's empty-prompt token states ``[L, D]`` (the unconditional branch of classifier-free guidance)."""
    from erasure.text_embeddings import PromptEmbeddings

    return PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, ["x"]).empty


def unconditional_output(unet, empty: torch.Tensor) -> torch.Tensor:
    """``unet``'s output for the empty prompt on two fixed latents at t = 500."""
    from erasure.trajectory import predict

    size = unet.config.sample_size
    shape = (2, unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return predict(unet, latents, torch.tensor(500), empty.expand(2, -1, -1))
