"""UCE: Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzyńska, Bau; "Unified Concept Editing in
Diffusion Models", WACV 2024; code ``rohitgandikota/unified-concept-editing``, ``train-scripts/train_erase.py``).

A closed-form edit of every cross-attention key and value projection ``W`` (``attn2.to_k``, ``attn2.to_v``): with
the text-encoder outputs ``c_i`` of the erased prompts' tokens, their targets ``v_i* = W_old c_i*`` (``c_i*`` the
same positions of the guide prompt), and preserved token outputs ``c_j`` with ``v_j = W_old c_j``,

    W = (lambda W_old + s_e sum_i v_i* c_i^T + s_p sum_j v_j c_j^T) (lambda I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T)^-1

the ridge-regression solution of ``lambda |W - W_old|^2 + s_e sum |W c_i - v_i*|^2 + s_p sum |W c_j - v_j|^2``.
So the erased tokens now produce (approximately) the guide's keys and values while preserved tokens keep theirs.

As in the reference: erased tokens are the concept's last token and every position after it (end-of-text and
padding), aligned with the guide prompt's positions from *its* last concept token (or from the start token for
the unconditional guide " "), both cut to the same length; preserved prompts contribute every position. The guide
is the job's ``anchor`` (in the same template) or, without one, the empty prompt (reference default: " ").
Technique ``replace`` uses the guide's values; ``tensor`` removes from them their component along the erased
prompt's (Frobenius-normalised) values. Ours: the empty prompt is always among the preserved prompts (it is the
unconditional branch of classifier-free guidance), the solve is done in float64, and projection biases (SD has
none) are left as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext
from erasure.forget_data import (
    COCO_RETAIN_PROMPTS,
    PromptSource,
    concept_prompts,
    fill,
    resolve_prompt_source,
)
from erasure.registry import register_method
from erasure.text_embeddings import encode_prompts, tokenize

if TYPE_CHECKING:
    from erasure.config import Target


class UCEParams(MethodParams):
    """UCE settings. Defaults are for MiniCanvas; "reference" is ``train_erase.py``."""

    erase_scale: float = Field(1.0, ge=0, description="s_e, weight of the erased tokens. Reference: 1.")
    preserve_scale: float = Field(
        0.1, ge=0, description="s_p, weight of the preserved tokens. Reference: 0.1."
    )
    lamb: float = Field(
        0.5,
        gt=0,
        description="lambda, pull towards the old weights. Reference: 0.5 (as the script calls "
        "edit_model; the function's default is 0.1).",
    )
    edit_keys: bool = Field(
        True,
        description="Edit to_k as well as to_v. Reference: true (edit_model's with_to_k default, used by the script).",
    )
    technique: Literal["replace", "tensor"] = Field("replace", description="Reference: replace.")
    preserve_prompts: list[str] = Field(
        default_factory=lambda: list(COCO_RETAIN_PROMPTS),
        description="Preserved prompts for prompts='target' (those naming the target are dropped). Reference: "
        "for art, 1734 other artist names; ours: COCO object prompts.",
    )
    prompts: PromptSource = Field(
        "auto",
        description="'target' = the target's prompt; 'minicanvas' = caption templates over all "
        "objects/styles, the other concepts' captions preserved; 'auto' = minicanvas on the MiniCanvas world.",
    )


def cross_attention_projections(unet: nn.Module, edit_keys: bool) -> dict[str, nn.Linear]:
    """``{parameter name prefix: Linear}`` of every ``attn2.to_v`` (and ``to_k``) in the UNet."""
    layers = {}
    for name, module in unet.named_modules():
        if name.split(".")[-1] == "attn2":
            layers[f"{name}.to_v"] = module.to_v
            if edit_keys:
                layers[f"{name}.to_k"] = module.to_k
    if not layers:
        raise ValueError("the UNet has no cross-attention (attn2) layers")
    return layers


def concept_end(tokenizer, template: str, concept: str) -> int:
    """Position (start token = 0) of the last token of ``concept`` in ``fill(template, concept)``."""
    ids = tokenize(tokenizer, [fill(template, concept)])[0].tolist()
    concept_ids = tokenizer(concept, add_special_tokens=False).input_ids
    if not concept_ids:  # the unconditional guide " ": the reference aligns it from the start token
        return 0
    n = len(concept_ids)
    for start in range(1, len(ids) - n + 1):
        if ids[start : start + n] == concept_ids:
            return start + n - 1
    raise ValueError(
        f"{concept!r} is not found (or is truncated) in the tokenised {fill(template, concept)!r}"
    )


def aligned(
    old: torch.Tensor, new: torch.Tensor, i_old: int, i_new: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's alignment of two ``[L, D]`` embeddings from their last concept tokens to the end."""
    far = max(i_old, i_new)
    length = old.shape[0]
    return old[i_old : length - max(0, far - i_old)], new[i_new : length - max(0, far - i_new)]


def closed_form_edit(
    weight: torch.Tensor,
    erase_inputs: torch.Tensor,
    erase_targets: torch.Tensor,
    preserve_inputs: torch.Tensor,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
) -> torch.Tensor:
    """UCE's ridge solution for one projection ``weight`` ``[out, in]``.

    ``erase_inputs`` ``[n, in]`` must map to ``erase_targets`` ``[n, out]``; ``preserve_inputs`` ``[m, in]`` keep
    ``weight @ c``. Computed in float64, returned in ``weight``'s dtype.
    """
    w = weight.double()
    c_e, v_e, c_p = erase_inputs.double(), erase_targets.double(), preserve_inputs.double()
    v_p = c_p @ w.T
    lhs = lamb * w + erase_scale * v_e.T @ c_e + preserve_scale * v_p.T @ c_p
    rhs = lamb * torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + erase_scale * c_e.T @ c_e
    rhs = rhs + preserve_scale * c_p.T @ c_p
    # lhs @ rhs^-1, via a solve of the symmetric system rhs^T X^T = lhs^T
    return torch.linalg.solve(rhs, lhs.T).T.to(weight.dtype)


@register_method
class UCE(ErasureMethod):
    """Unified Concept Editing (Gandikota et al., WACV 2024): closed-form cross-attention edit."""

    name = "uce"
    backbone_kind = "sd"
    description = "UCE (Gandikota et al. 2024): closed-form edit of cross-attention keys/values, in seconds."
    Params = UCEParams

    @torch.no_grad()
    def erase(self, backbone, target: Target, params: UCEParams, ctx: RunContext) -> ErasureResult:
        pipe = backbone
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
        source = resolve_prompt_source(params.prompts, pipe, target)
        sets = concept_prompts(target, ctx.anchor, source, retain_prompts=params.preserve_prompts)
        guide = sets.anchor if sets.anchor is not None else ""
        ctx.log(
            f"uce: {len(sets.templates)} erased prompts from '{source}' towards {guide or 'the empty prompt'!r}, "
            f"{len(sets.retain)} preserved prompts"
        )
        erased_prompts = sets.forget
        guide_prompts = [fill(t, guide) for t in sets.templates] if guide else [""] * len(sets.templates)
        erased_emb = encode_prompts(tokenizer, text_encoder, erased_prompts)
        guide_emb = encode_prompts(tokenizer, text_encoder, guide_prompts)
        preserved = encode_prompts(tokenizer, text_encoder, [*sets.retain, ""])
        pairs = []
        for i, template in enumerate(sets.templates):
            i_old = concept_end(tokenizer, template, sets.target)
            i_new = concept_end(tokenizer, template, guide) if guide else 0
            pairs.append(aligned(erased_emb[i], guide_emb[i], i_old, i_new))

        changed: dict[str, torch.Tensor] = {}
        projections = cross_attention_projections(pipe.unet, params.edit_keys)
        for done, (name, layer) in enumerate(projections.items(), start=1):
            weight = layer.weight
            inputs, targets = [], []
            for old, new in pairs:
                old, new = old.to(weight), new.to(weight)
                values = new @ weight.T
                if params.technique == "tensor":
                    direction = old @ weight.T
                    direction = direction / direction.norm()
                    values = values - (direction * values).sum() * direction
                inputs.append(old)
                targets.append(values)
            new_weight = closed_form_edit(
                weight,
                torch.cat(inputs),
                torch.cat(targets),
                preserved.flatten(0, 1).to(weight),
                params.erase_scale,
                params.preserve_scale,
                params.lamb,
            )
            layer.weight.copy_(new_weight)
            changed[f"{name}.weight"] = new_weight.detach().cpu().contiguous()
            ctx.progress(done, len(projections))
        return ErasureResult(changed={"unet": changed}, metrics={"edited_projections": float(len(changed))})
