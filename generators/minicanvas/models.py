"""Architectures of the MiniCanvas world: the judge (style/object classifier) and the configs of the
genuine library models (transformers ``CLIPModel``; diffusers ``AutoencoderKL``, ``UNet2DConditionModel``).

Sizes are chosen so that everything trains on a 2-core CPU within the world-build budget and all shipped
weights fit in the 60 MB budget; the UNet keeps SD's block structure (down/mid/up with cross-attention),
so every erasure method sees the same parameter names it sees on SD-1.5 (``attn2.to_k`` etc.).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .concepts import OBJECTS, STYLES

TEXT_MAX_LENGTH = 32  # prompts are short; CLIP's 77 would only cost compute


def projected(output) -> torch.Tensor:
    """CLIP's projected embedding from ``get_text_features``/``get_image_features`` (a tensor in
    transformers 4, an output object whose ``pooler_output`` holds it in transformers 5)."""
    return output if torch.is_tensor(output) else output.pooler_output


def clip_config():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        projection_dim=64,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=64,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)


def vae_config() -> dict:
    """AutoencoderKL with one down-sampling (32 px images -> 4 x 16 x 16 latents)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def unet_config() -> dict:
    """SD-shaped UNet on 16 x 16 latents: a convolution-only block at 16 px (keeps a CPU training step
    cheap), cross-attention at 8 and 4 px and in the mid block."""
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(48, 96, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


class MiniClassifier(nn.Module):
    """UnlearnCanvas' judge in miniature: a small residual CNN with a style head and an object head.

    ``features(x)`` returns the penultimate embedding, which MiniCanvas FID uses in place of Inception's.
    Inputs are images in ``[-1, 1]``, shape ``[n, 3, 32, 32]``.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, n_styles: int = len(STYLES),
                 n_objects: int = len(OBJECTS)):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim, n_styles=n_styles, n_objects=n_objects)
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
            )

        self.stem = block(3, w, 1)  # 32
        self.stage2 = block(w, 2 * w, 2)  # 16
        self.stage3 = block(2 * w, 4 * w, 2)  # 8
        self.stage4 = block(4 * w, 4 * w, 2)  # 4
        self.proj = nn.Linear(8 * w, feature_dim)
        self.style_head = nn.Linear(feature_dim, n_styles)
        self.object_head = nn.Linear(feature_dim, n_objects)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage4(self.stage3(self.stage2(self.stem(x))))
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return F.silu(self.proj(pooled))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.style_head(f), self.object_head(f)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  folder / "model.safetensors")

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> MiniClassifier:
        folder = Path(folder)
        model = cls(**json.loads((folder / "config.json").read_text()))
        sd = {k: v.float() if v.is_floating_point() else v for k, v in
              load_file(folder / "model.safetensors").items()}
        model.load_state_dict(sd)
        return model.to(device).eval()
