"""Resumable training state in safetensors: modules, optimisers, RNG states and the step counter.

Everything the studio trains (world models, erasure jobs) checkpoints through this module, so a job killed at
any point resumes from its last complete checkpoint and, on CPU, ends bit-identical to an uninterrupted run.
No pickle is involved: tensors go to one ``.safetensors`` file, the rest (step, optimiser hyper-parameters,
non-tensor state) to its JSON metadata. The file is written to a temporary name and renamed into place, so a
crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_training_state(
    path: str | Path,
    *,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write one checkpoint. ``generators`` are explicit RNGs; the global torch RNG is always saved too."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"step": step, "optimizers": {}, "extra": extra or {}}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = value.detach().contiguous().cpu()
    for name, opt in (optimizers or {}).items():
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{name}.{pid}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(pid), {})[key] = value
        meta["optimizers"][name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    tensors["rng.torch"] = torch.get_rng_state()
    for name, gen in (generators or {}).items():
        tensors[f"rng.gen.{name}"] = gen.get_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    _atomic_save(tensors, Path(path), {"training_state": json.dumps(meta)})


def load_training_state(
    path: str | Path,
    *,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_training_state`; returns its metadata (``step``, ``extra``)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["training_state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    for name, module in modules.items():
        prefix = f"module.{name}."
        sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sd, strict=True)
    for name, opt in (optimizers or {}).items():
        info = meta["optimizers"][name]
        state: dict[int, dict[str, Any]] = {}
        prefix = f"optim.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                pid, _, field = key[len(prefix) :].partition(".")
                state.setdefault(int(pid), {})[field] = value
        for pid, scalars in info["scalars"].items():
            state.setdefault(int(pid), {}).update(scalars)
        opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    for name, gen in (generators or {}).items():
        gen.set_state(tensors[f"rng.gen.{name}"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    return meta
