"""A tiny *untrained* MiniCanvas world for evaluator tests: the real interfaces and file layout, tiny random models.

``build_tiny_world(folder)`` writes ``classifier/``, ``clip/``, ``sd/`` and ``gan/`` the way ``world.build`` does
(MiniClassifier, a transformers CLIPModel with MiniCanvas' CLIP tokenizer and image processor, a diffusers
StableDiffusionPipeline whose text encoder is the CLIP text tower, a StyleGAN2 generator), but with random weights
and widths of a few channels, in seconds. Numbers measured on it are meaningless; the machinery is real.
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_world(folder: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
    )

    from generators.minicanvas.models import TEXT_MAX_LENGTH, MiniClassifier
    from generators.minicanvas.tokenizer import build_clip_tokenizer
    from generators.minicanvas.train import sd_noise_schedule
    from generators.minicanvas.world import image_processor
    from generators.stylegan2 import Generator
    from generators.stylegan2_io import save_generator_safetensors

    torch.manual_seed(0)
    MiniClassifier(width=4, feature_dim=16).save(folder / "classifier")

    text = CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=16,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    tokenizer = build_clip_tokenizer(TEXT_MAX_LENGTH)
    clip.save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(folder / "clip")

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    scheduler = DDIMScheduler(**sd_noise_schedule(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")

    generator = Generator(size=32, style_dim=8, n_mlp=1, channels={4: 4, 8: 4, 16: 4, 32: 4})
    (folder / "gan").mkdir(parents=True)
    save_generator_safetensors(generator, folder / "gan" / "generator.safetensors")
    return folder
