"""PNG files for the images a comparison shows: one folder per request, so concurrent requests never share a file.

Gradio serves a returned PIL image by writing it to a cache path named by a hash of its bytes, in place. Two
requests that show the same image (two users comparing one run with the same seed, or a before and an after that
are equal) then write one file at the same time, and a browser or API client fetching it meanwhile is sent a
truncated copy (the server declared the full length). A returned *file* is copied into the cache under a temporary
name and renamed into place instead, so the handlers return files written here.

The folders live under the system temp directory (which gradio serves from); a folder is removed once it is older
than ``max_age_s`` (gradio has copied its files by the time the request's response is sent), and all of them when
the server shuts down.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

DEFAULT_MAX_AGE_S = 3600.0


class ImageFiles:
    def __init__(self, max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.max_age_s = max_age_s
        self.root: Path | None = None
        """The folder of all request folders: made at the first request (a studio that compares nothing makes none)."""
        self._lock = threading.Lock()

    def new_folder(self) -> Path:
        """A fresh folder for one request's images (old folders are removed first)."""
        with self._lock:
            if self.root is None or not self.root.is_dir():
                self.root = Path(tempfile.mkdtemp(prefix="erasure-studio-images-"))
            self._prune(self.root)
            return Path(tempfile.mkdtemp(dir=self.root))

    def _prune(self, root: Path) -> None:
        oldest = time.time() - self.max_age_s
        for folder in root.iterdir():
            try:
                if folder.stat().st_mtime < oldest:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        with self._lock:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)


def save_png(image: torch.Tensor, path: Path) -> str:
    """Write a ``[3, H, W]`` image in ``[-1, 1]`` to ``path`` as a lossless PNG; returns the path as a string."""
    to_pil(image).save(path, format="PNG")
    return str(path)


def to_pil(image: torch.Tensor):
    """A ``[3, H, W]`` image in ``[-1, 1]`` as an RGB PIL image (lossless when saved as PNG)."""
    from PIL import Image

    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)
