"""A generation cache: an image is stored once per (model content, prompt, seed, sampler settings).

Before/after comparisons and repeated evaluations of the same model ask for the same images again (the original
model's answer set, say, for every run erased from it). Because sampling is seeded per image
(``generators.sd.sample_sd``), an image depends only on the model's weights, its prompt, its seed and the sampler
settings, so those are the key:

* the model is identified by :func:`model_fingerprint`, a BLAKE2b hash over the bytes of every tensor of its
  components (``unet``, ``text_encoder``, ``vae``… or a GAN generator), the tokenizer's vocabulary and the
  scheduler's class and config; it is computed once per model object and memoised (pass ``refresh=True`` after
  changing weights in place);
* the request (prompt, seed, settings, sampler device type) is hashed as canonical JSON.

Files are safetensors (``image`` tensor, float32, ``[3, H, W]`` in ``[-1, 1]``; the request is in the metadata)
under ``<root>/<model fingerprint>/<key[:2]>/<key>.safetensors``, written atomically (temp file + rename), so
concurrent evaluations never read a half-written image. The default root is
``~/.cache/erasure-studio/generations``; ``$ERASURE_STUDIO_CACHE`` or the ``root`` argument override it.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from erasure.io import load_tensors, save_tensors

CACHE_ENV_VAR = "ERASURE_STUDIO_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/erasure-studio/generations")

_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()


def _hash_module(h: Any, name: str, module: torch.nn.Module) -> None:
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: Any, *, refresh: bool = False) -> str:
    """Content hash of a diffusers pipeline or a torch module (hex, 32 characters); memoised per object."""
    if not refresh:
        try:
            cached = _FINGERPRINTS.get(model)
        except TypeError:  # not weak-referenceable
            cached = None
        if cached is not None:
            return cached
    h = hashlib.blake2b(digest_size=16)
    if isinstance(model, torch.nn.Module):
        h.update(type(model).__name__.encode())
        _hash_module(h, "model", model)
    else:
        for name, part in sorted(model.components.items()):
            if isinstance(part, torch.nn.Module):
                _hash_module(h, name, part)
            elif name == "tokenizer" and part is not None:
                vocab = json.dumps(sorted(part.get_vocab().items()), ensure_ascii=False)
                h.update(f"tokenizer:{type(part).__name__}:{part.model_max_length}:".encode() + vocab.encode())
            elif name == "scheduler" and part is not None:
                config = json.dumps(dict(part.config), sort_keys=True, default=str)
                h.update(f"scheduler:{type(part).__name__}:{config}".encode())
    digest = h.hexdigest()
    try:
        _FINGERPRINTS[model] = digest
    except TypeError:
        pass
    return digest


def request_key(fingerprint: str, request: Mapping[str, Any]) -> str:
    """Key of one image: hash of the model fingerprint and the canonical JSON of the request."""
    text = json.dumps({"model": fingerprint, **request}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


class GenerationCache:
    """Images on disk by (model fingerprint, request); see the module docstring."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def path(self, fingerprint: str, key: str) -> Path:
        return self.root / fingerprint / key[:2] / f"{key}.safetensors"

    def get(self, fingerprint: str, request: Mapping[str, Any]) -> Tensor | None:
        path = self.path(fingerprint, request_key(fingerprint, request))
        if not path.is_file():
            return None
        try:
            return load_tensors(path)[0]["image"]
        except (OSError, KeyError, ValueError, SafetensorError):  # a damaged or foreign file is a miss, rewritten
            return None

    def put(self, fingerprint: str, request: Mapping[str, Any], image: Tensor) -> None:
        key = request_key(fingerprint, request)
        meta = {"request": json.dumps(dict(request), sort_keys=True, ensure_ascii=False, default=str)}
        save_tensors(self.path(fingerprint, key), {"image": image.float()}, metadata=meta)

    def fetch(
        self,
        fingerprint: str,
        requests: Sequence[Mapping[str, Any]],
        generate: Callable[[list[int]], Tensor],
    ) -> Tensor:
        """Images for ``requests``: cached ones are read, the rest come from ``generate(indices)`` and are stored."""
        found: list[Tensor | None] = [self.get(fingerprint, r) for r in requests]
        missing = [i for i, image in enumerate(found) if image is None]
        self.hits += len(requests) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = generate(missing)
            for i, image in zip(missing, fresh):
                self.put(fingerprint, requests[i], image)
                found[i] = image.float()
        return torch.stack([image for image in found if image is not None]) if found else torch.zeros(0)
