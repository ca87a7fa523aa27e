"""The real CLIP tokenizer, built offline from the BPE merges that ship inside ``open_clip``.

OpenAI's CLIP vocabulary is fully determined by its merge list: 256 byte-level symbols, the same with an
end-of-word marker, one symbol per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 in all).
We rebuild ``vocab``/``merges`` from ``bpe_simple_vocab_16e6.txt.gz`` and hand them to transformers'
``CLIPTokenizer``; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2  # as in CLIP: the merge list is cut to a 49,408-token vocabulary


def _bpe_path() -> Path:
    """The vocabulary file inside the installed ``open_clip`` (located without importing the package)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("open_clip (package open-clip-torch) is needed for the CLIP BPE vocabulary")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : N_MERGES + 1]  # the first line is a version header
    symbols = list(_bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols]
    symbols += ["".join(m.split()) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, merges


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` with OpenAI CLIP's vocabulary (49,408 tokens)."""
    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges])
    tok.model_max_length = model_max_length
    return tok
