"""White-box prefix attacks on a text-to-image diffusion model: UnlearnDiffAtk's token attack and AdvUnlearn's
continuous embedding attack.

UnlearnDiffAtk (Zhang et al., ECCV 2024, ``OPTML-Group/Diffusion-MU-Attack``) uses the attacked diffusion model
itself as the classifier: it optimises ``k = 5`` prefix tokens put before the prompt so that the model best
denoises a reference image of the erased concept, with the l2 loss

    ``|| eps - eps_theta(sqrt(abar_t) x0_ref + sqrt(1 - abar_t) eps, t, TextEnc([SOT, adv_1..adv_k, prompt…])) ||^2``.

Two attack spaces:

* :func:`optimize_prefix_tokens` -- UnlearnDiffAtk as its code does it (``src/attackers/text_grad_.py``): each
  prefix slot is a distribution over the vocabulary, kept on the probability simplex; the forward pass uses a
  sampled one-hot token (straight-through, gradient clipped by ``hardtanh``); timesteps are visited in blocks, and
  after each block the argmax tokens -- a prompt anyone could type -- are judged. This is the evaluator's attack.
* :func:`optimize_prefix_embeddings` -- ``k`` free vectors in the continuous token-embedding space, as AdvUnlearn's
  inner attack (Zhang et al., NeurIPS 2024); no typed prompt reaches most of that space, so it is a white-box worst
  case rather than a prompt attack. Timesteps are drawn at random per iteration.

The continuous attack serves AdvUnlearn's inner maximisation: pass ``teacher`` to match the frozen original model's
prediction instead of the true noise, and use :func:`encode_with_prefix` (differentiable in the text encoder's
weights too) for the defender step.

``components`` is anything with ``tokenizer``, ``text_encoder``, ``unet`` and ``scheduler`` attributes (a diffusers
``StableDiffusionPipeline`` works; so does a ``SimpleNamespace`` holding a trainable text-encoder copy).
Gradients are taken with ``torch.autograd.grad`` with respect to the prefix only, so no model parameter's
``.grad`` is touched and no module is switched between train and eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Teacher = Callable[[Tensor, Tensor], Tensor]
"""``teacher(noisy_latents, timesteps) -> target noise prediction`` (e.g. the frozen original UNet on the concept)."""

StopCheck = Callable[[Tensor], bool]
"""``check(prompt_embeds) -> True`` to stop early (e.g. a generation with these embeddings shows the concept)."""


@dataclass(frozen=True)
class PrefixPrompt:
    """Token ids ``[1, L]`` of ``[SOT, slot × k, prompt tokens…, EOT, pad…]``; slots ``start..start+k`` get the
    adversarial embeddings. ``L`` is the tokenizer's ``model_max_length`` (the pipeline's padding length)."""

    input_ids: Tensor
    k: int
    start: int = 1


def build_prefix_prompt(tokenizer: Any, prompt: str, k: int) -> PrefixPrompt:
    """The ids of ``prompt`` as the pipeline tokenises it, with ``k`` prefix slots after the start token.

    The prompt is truncated to ``model_max_length - k`` tokens (keeping its end-of-text token) so the whole
    sequence keeps the pipeline's length.
    """
    length = int(tokenizer.model_max_length)
    if not 0 < k < length - 2:
        raise ValueError(f"k must be in [1, {length - 3}] for a context of {length} tokens, got {k}")
    ids = tokenizer(
        prompt, padding="max_length", max_length=length - k, truncation=True, return_tensors="pt"
    ).input_ids
    slot = torch.full(
        (1, k), int(ids[0, 0]), dtype=ids.dtype
    )  # placeholder ids; their embeddings are replaced
    return PrefixPrompt(torch.cat([ids[:, :1], slot, ids[:, 1:]], dim=1), k)


@contextmanager
def _prefix_injected(text_encoder: Any, prompt: PrefixPrompt, prefix: Tensor) -> Iterator[None]:
    """Replace the token embeddings of the prefix slots by ``prefix`` (``[k, d]`` or ``[b, k, d]``)."""
    embedding = text_encoder.get_input_embeddings()

    def hook(module: torch.nn.Module, inputs: Any, output: Tensor) -> Tensor:
        p = prefix.to(output.dtype)
        p = p.unsqueeze(0).expand(output.shape[0], -1, -1) if p.ndim == 2 else p
        s, e = prompt.start, prompt.start + prompt.k
        return torch.cat([output[:, :s], p, output[:, e:]], dim=1)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_with_prefix(text_encoder: Any, prompt: PrefixPrompt, prefix: Tensor) -> Tensor:
    """Text embeddings ``[b, L, d]`` (last hidden state, as the SD pipeline conditions on) with the prefix in place.

    Differentiable with respect to ``prefix`` and the text encoder's weights.
    """
    device = text_encoder.get_input_embeddings().weight.device
    with _prefix_injected(text_encoder, prompt, prefix):
        return text_encoder(prompt.input_ids.to(device))[0]


def init_prefix(text_encoder: Any, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` embeddings of random vocabulary tokens (the ``random`` initialisation of AdvUnlearn's attack)."""
    weight = text_encoder.get_input_embeddings().weight
    ids = torch.randint(0, weight.shape[0], (k,), generator=generator)
    return weight.detach()[ids.to(weight.device)].float().clone()


def noised(
    scheduler: Any, latents: Tensor, generator: torch.Generator | None = None, timestep: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, t, eps)``: clean latents noised at a random training timestep each (DDPM forward process), or all
    at ``timestep``."""
    n = latents.shape[0]
    alphas = scheduler.alphas_cumprod
    if timestep is None:
        t = torch.randint(0, len(alphas), (n,), generator=generator)
    else:
        t = torch.full((n,), int(timestep), dtype=torch.long)
    eps = torch.randn(latents.shape, generator=generator).to(latents)
    abar = alphas[t].to(latents).view(n, *([1] * (latents.ndim - 1)))
    return abar.sqrt() * latents + (1 - abar).sqrt() * eps, t.to(latents.device), eps


def denoising_loss(
    components: Any,
    prompt: PrefixPrompt,
    prefix: Tensor,
    latents: Tensor,
    generator: torch.Generator | None = None,
    teacher: Teacher | None = None,
) -> Tensor:
    """One sample of the attack loss: MSE between the UNet's noise prediction under the prefixed prompt and the
    true noise (``teacher=None``, UnlearnDiffAtk) or ``teacher(x_t, t)`` (AdvUnlearn)."""
    x_t, t, eps = noised(components.scheduler, latents, generator)
    if teacher is None:
        target = eps
    else:
        with torch.no_grad():
            target = teacher(x_t, t)
    return prefixed_loss(components, prompt, prefix, x_t, t, target)


def prefixed_loss(
    components: Any, prompt: PrefixPrompt, prefix: Tensor, x_t: Tensor, t: Tensor, target: Tensor
) -> Tensor:
    """MSE between the UNet's noise prediction for ``x_t`` at ``t`` under the prefixed prompt and ``target``."""
    unet = components.unet
    cond = encode_with_prefix(components.text_encoder, prompt, prefix)
    cond = cond.expand(x_t.shape[0], -1, -1).to(device=unet.device, dtype=unet.dtype)
    pred = unet(x_t.to(unet.dtype), t, encoder_hidden_states=cond).sample
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def teacher_draws(
    scheduler: Any,
    latents: Tensor,
    steps: int,
    generator: torch.Generator | None,
    teacher: Teacher,
    batch_size: int = 8,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(x_t, t, teacher(x_t, t))`` for ``steps`` attack steps, drawn up front in the order the steps would draw
    them (the same noise from the same generator) and with the teacher run in batches of ``batch_size`` steps: the
    teacher does not depend on the prefix, and one batched forward costs far less than one per step."""
    draws = [noised(scheduler, latents, generator)[:2] for _ in range(steps)]
    targets: list[Tensor] = []
    for start in range(0, steps, batch_size):
        chunk = draws[start : start + batch_size]
        out = teacher(torch.cat([x for x, _ in chunk]), torch.cat([t for _, t in chunk]))
        targets.extend(out.split(latents.shape[0]))
    return [(x_t, t, target) for (x_t, t), target in zip(draws, targets, strict=True)]


@dataclass
class PrefixAttack:
    """Result of :func:`optimize_prefix_embeddings`."""

    prefix: Tensor
    """The adversarial embeddings ``[k, d]`` (float32, on the text encoder's device)."""
    prompt: PrefixPrompt
    prompt_embeds: Tensor
    """``encode_with_prefix(text_encoder, prompt, prefix)``, detached: pass as ``prompt_embeds`` to the pipeline."""
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    stopped_early: bool = False


def optimize_prefix_embeddings(
    components: Any,
    prompt: str,
    target_latents: Tensor,
    *,
    k: int = 5,
    steps: int = 40,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
    teacher: Teacher | None = None,
    check: StopCheck | None = None,
    check_every: int = 0,
) -> PrefixAttack:
    """Optimise ``k`` prefix embeddings before ``prompt`` so the model denoises ``target_latents`` well.

    ``target_latents``: clean latents ``[n, c, h, w]`` of the concept (UnlearnDiffAtk: the VAE-encoded reference
    image, scaled by the VAE's scaling factor; see :func:`encode_images`). Each of the ``steps`` AdamW steps draws
    a fresh timestep and noise per latent. ``init`` warm-starts the prefix (AdvUnlearn's ``latest`` init);
    otherwise random vocabulary embeddings. ``check(prompt_embeds)`` is called every ``check_every`` steps before
    the last (never if 0) and stops the attack when it returns True, as UnlearnDiffAtk stops on the first success;
    judging the final ``prompt_embeds`` is the caller's.
    """
    text_encoder = components.text_encoder
    device = text_encoder.get_input_embeddings().weight.device
    pp = build_prefix_prompt(components.tokenizer, prompt, k)
    start = init if init is not None else init_prefix(text_encoder, k, generator)
    prefix = start.detach().float().to(device).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([prefix], lr=lr, weight_decay=weight_decay)
    latents = target_latents.to(device=components.unet.device, dtype=torch.float32)
    result = PrefixAttack(prefix=prefix, prompt=pp, prompt_embeds=torch.empty(0))
    # With a teacher and no early stop, every step's noise and teacher target are drawn up front (batched).
    drawn = None
    if teacher is not None and check is None:
        drawn = teacher_draws(components.scheduler, latents, steps, generator, teacher)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            if drawn is not None:
                loss = prefixed_loss(components, pp, prefix, *drawn[step - 1])
            else:
                loss = denoising_loss(components, pp, prefix, latents, generator, teacher)
            (grad,) = torch.autograd.grad(loss, [prefix])
            prefix.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(float(loss.detach()))
            result.steps = step
            due = check is not None and check_every and step % check_every == 0 and step < steps
            if due and check(_embeds(text_encoder, pp, prefix)):
                result.stopped_early = True
                break
    result.prefix = prefix.detach()
    result.prompt_embeds = _embeds(text_encoder, pp, result.prefix)
    return result


@torch.no_grad()
def _embeds(text_encoder: Any, prompt: PrefixPrompt, prefix: Tensor) -> Tensor:
    return encode_with_prefix(text_encoder, prompt, prefix.detach()).detach()


# ------------------------------------------------------------------------------------ UnlearnDiffAtk's token attack


_SIMPLEX_FIRST_WIDTH = 1024
"""Entries per row that :func:`project_to_simplex` reads first (then 4x more, until they hold the support)."""


def project_to_simplex(rows: Tensor) -> Tensor:
    """Euclidean projection of each row onto the probability simplex ``{p >= 0, sum(p) = 1}``.

    UnlearnDiffAtk finds the projection's threshold by bisection (``TextGrad.bisection``, tolerance 1e-5); this is
    the exact sort-based solution of the same problem (Duchi et al., ICML 2008). The threshold depends only on the
    row's largest entries (the projection's support), so they are taken with ``topk``, widened until they hold the
    support: the same values and partial sums as a full sort, at a fraction of its cost once the support is small
    (an attacked prefix slot keeps a few hundred of the 49,408 tokens after its first few dozen steps).
    """
    n = rows.shape[-1]
    width = min(n, _SIMPLEX_FIRST_WIDTH)
    while True:
        ordered = rows.topk(width, dim=-1).values if width < n else rows.sort(dim=-1, descending=True).values
        excess = ordered.cumsum(-1) - 1
        rank = torch.arange(1, width + 1, device=rows.device, dtype=rows.dtype)
        kept = (ordered - excess / rank > 0).sum(-1, keepdim=True)  # size of the support, >= 1
        if width == n or bool((kept < width).all()):
            break
        width = min(n, width * 4)
    threshold = excess.gather(-1, kept - 1) / kept
    return (rows - threshold).clamp_min(0)


class _SampledEmbedding(torch.autograd.Function):
    """UnlearnDiffAtk's ``STERandSelect`` followed by the embedding lookup: forward, one token per row drawn from
    the row's distribution, and its embedding (what ``one_hot @ table`` gives, without the product); backward, the
    gradient with respect to that one-hot (``grad @ table.T``) passed straight through to the distribution, clipped
    to [-1, 1] (``hardtanh``)."""

    @staticmethod
    def forward(ctx: Any, probs: Tensor, table: Tensor, generator: torch.Generator | None) -> Tensor:
        ids = torch.multinomial(probs.detach().float().cpu(), 1, generator=generator).squeeze(-1)
        ctx.save_for_backward(table)
        return table[ids.to(table.device)].to(probs.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (table,) = ctx.saved_tensors
        return F.hardtanh(grad @ table.T), None, None


def attack_timesteps(num_train_timesteps: int, blocks: int) -> list[int]:
    """UnlearnDiffAtk's timestep schedule (``ClassifierTask.sampled_t``): ``blocks`` timesteps evenly spaced over
    the training range, ascending, each in the middle of its bucket (``T // n // 2 + i * (T // n)``)."""
    if not 0 < blocks <= num_train_timesteps:
        raise ValueError(f"blocks must be in [1, {num_train_timesteps}], got {blocks}")
    step = num_train_timesteps // blocks
    return list(range(step // 2, num_train_timesteps, step))[:blocks]


@dataclass
class TokenAttack:
    """Result of :func:`optimize_prefix_tokens`."""

    tokens: Tensor
    """The adversarial prefix token ids ``[k]`` (the argmax of the distributions when last judged)."""
    text: str
    """The prefix as text (the tokenizer's decoding of ``tokens``)."""
    prompt_ids: Tensor
    """``[1, L]``: the attacked prompt's ids with ``tokens`` in the prefix slots."""
    prompt_embeds: Tensor
    """The text encoder's embeddings of ``prompt_ids`` (what typing the attacked prompt conditions on)."""
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    blocks: int = 0
    """Timestep blocks run (each ends in a judgement when a check is given)."""
    succeeded: bool = False
    """The check returned True after a block (the attack stops there)."""


BatchStopCheck = Callable[[list[int], Tensor], list[bool]]
"""``check(indices, prompt_embeds) -> successes``: judge the prompts ``indices`` (positions in the attacked batch)
with their embeddings ``[len(indices), L, d]`` at once; the attack of each prompt judged True stops."""


def optimize_prefix_tokens(
    components: Any,
    prompt: str,
    target_latents: Tensor,
    *,
    k: int = 5,
    iterations: int = 40,
    blocks: int = 1,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    generator: torch.Generator | None = None,
    check: StopCheck | None = None,
) -> TokenAttack:
    """UnlearnDiffAtk's attack (``TextGrad``, ``prefix_k``, ``sequential``): ``k`` prefix tokens before ``prompt``
    so that the model denoises ``target_latents`` (see :func:`optimize_prefix_embeddings`) well.

    Each prefix slot holds a distribution over the whole vocabulary, uniform at the start. For each of ``blocks``
    timesteps (:func:`attack_timesteps`), ``iterations`` Adam steps (lr ``lr``, L2 weight decay ``weight_decay``, as
    the code's ``torch.optim.Adam``), each with fresh noise: a token per slot is sampled from its distribution
    (straight-through, :class:`_SampledEmbedding`), the loss is taken with those tokens' embeddings, and after the
    step the distributions are projected back onto the simplex. After each block the argmax tokens make a discrete
    prompt; ``check(prompt_embeds)`` judges it and stops the attack on True. The reference visits up to 50
    timesteps x 40 iterations (its ``n_samples`` and ``iteration``).
    """
    batch_check = None if check is None else (lambda indices, embeds: [check(embeds)])
    return optimize_prefix_tokens_batch(
        components, [prompt], target_latents, k=k, iterations=iterations, blocks=blocks, lr=lr,
        weight_decay=weight_decay, generators=[generator], check=batch_check,
    )[0]


def optimize_prefix_tokens_batch(
    components: Any,
    prompts: Sequence[str],
    target_latents: Tensor,
    *,
    k: int = 5,
    iterations: int = 40,
    blocks: int = 1,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    generators: Sequence[torch.Generator | None] | None = None,
    check: BatchStopCheck | None = None,
    on_finish: Callable[[int, TokenAttack], None] | None = None,
) -> list[TokenAttack]:
    """:func:`optimize_prefix_tokens` for several prompts at once, ``prompts[i]`` towards ``target_latents[i]``.

    Each prompt's attack is the single-prompt attack: its own distributions, Adam state and random stream
    (``generators[i]``: its token draws and noise, in the same order), its own loss (the sum of the prompts' losses
    is differentiated, and no prompt's loss depends on another's prefix) and its own stop. Only the text encoder and
    UNet passes are shared, one batch of the prompts still running per step: on 2 CPU cores MiniSD's forward and
    backward pass cost about 13 ms per prompt at five prompts against 40 ms for one. Results can differ from
    attacking the prompts one by one in the last bits of a batched convolution, never in what is computed.
    ``on_finish(i, result)`` is called as each prompt's attack ends (its success, or the end of the budget).
    """
    if len(target_latents) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(target_latents)} target latents")
    generators = list(generators) if generators is not None else [None] * len(prompts)
    if len(generators) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(generators)} generators")
    text_encoder, unet, scheduler = components.text_encoder, components.unet, components.scheduler
    table = text_encoder.get_input_embeddings().weight.detach().float()  # [vocabulary, d]
    encoded = [build_prefix_prompt(components.tokenizer, p, k) for p in prompts]
    probs = [
        torch.full((k, table.shape[0]), 1.0 / table.shape[0], device=table.device, requires_grad=True)
        for _ in prompts
    ]
    optimizers = [torch.optim.Adam([p], lr=lr, weight_decay=weight_decay) for p in probs]
    latents = target_latents.to(device=unet.device, dtype=torch.float32)
    results = [
        TokenAttack(tokens=torch.empty(0), text="", prompt_ids=pp.input_ids, prompt_embeds=torch.empty(0))
        for pp in encoded
    ]
    running = list(range(len(prompts)))
    num_train = len(scheduler.alphas_cumprod)
    with torch.enable_grad():
        for timestep in attack_timesteps(num_train, blocks):
            if not running:
                break
            batch = PrefixPrompt(torch.cat([encoded[i].input_ids for i in running]), k)
            for _ in range(iterations):
                prefixes, draws = [], []
                for i in running:  # each prompt's stream: its token draw, then its noise
                    prefixes.append(_SampledEmbedding.apply(probs[i], table, generators[i]))
                    draws.append(noised(scheduler, latents[i : i + 1], generators[i], timestep=timestep))
                x_t, t, eps = (torch.cat(parts) for parts in zip(*draws))
                cond = encode_with_prefix(text_encoder, batch, torch.stack(prefixes))
                cond = cond.to(device=unet.device, dtype=unet.dtype)
                pred = unet(x_t.to(unet.dtype), t, encoder_hidden_states=cond).sample
                losses = [F.mse_loss(pred[j : j + 1].float(), eps[j : j + 1].float()) for j in range(len(running))]
                grads = torch.autograd.grad(torch.stack(losses).sum(), [probs[i] for i in running])
                for j, i in enumerate(running):
                    probs[i].grad = grads[j]
                    optimizers[i].step()
                    optimizers[i].zero_grad(set_to_none=True)
                    with torch.no_grad():
                        probs[i].copy_(project_to_simplex(probs[i]))
                    results[i].losses.append(float(losses[j].detach()))
                    results[i].steps += 1
            for i in running:
                results[i].blocks += 1
                _set_tokens(results[i], components, encoded[i], probs[i].detach().argmax(-1))
            if check is not None:
                judged = check(list(running), torch.cat([results[i].prompt_embeds for i in running]))
                for i, success in zip(list(running), judged, strict=True):
                    if success:
                        results[i].succeeded = True
                        running.remove(i)
                        if on_finish is not None:
                            on_finish(i, results[i])
    if on_finish is not None:
        for i in running:
            on_finish(i, results[i])
    return results


@torch.no_grad()
def _set_tokens(result: TokenAttack, components: Any, prompt: PrefixPrompt, tokens: Tensor) -> None:
    ids = prompt.input_ids.clone()
    ids[0, prompt.start : prompt.start + prompt.k] = tokens.cpu()
    device = components.text_encoder.get_input_embeddings().weight.device
    result.tokens = tokens.cpu()
    result.text = components.tokenizer.decode(tokens.tolist())
    result.prompt_ids = ids
    result.prompt_embeds = components.text_encoder(ids.to(device))[0].detach()


@torch.no_grad()
def encode_images(vae: Any, images: Tensor) -> Tensor:
    """Clean latents of images in ``[-1, 1]``: the VAE posterior mean times its scaling factor."""
    x = images.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor
