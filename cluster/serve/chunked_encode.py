"""One long prompt encoded in parallel: the text cut at spaces where the tokenizer always
splits, the pieces encoded as one batch, the ids joined. Same ids as one ``encode``.

Why: an HF fast tokenizer encodes one text on one thread, ~1-2 us a token (SmolLM2's, 1,024
tokens: 1.7 ms on the 2-core box, 2.0-3.1 ms on the H100 hosts), and the ingress pays it
before routing; a batch's items are encoded on the Rust side's thread pool.

Exact for the tokenizers ``chunk_safe`` accepts: no normalizer, a pre-tokenizer made only of
byte-level splitting with the GPT-2, Llama 3 (cl100k) or Qwen2 pattern, ``Digits`` and
``ByteLevel`` without a prefix space, no BPE dropout, added tokens without whitespace or
strip options. Their patterns consume a space only as a match's first character or in an
all-whitespace match, so a single space between two non-whitespace characters always starts
a piece of its own, and a piece never looks past a non-whitespace character: the encoding of
``a + b`` cut at such a space is the encoding of ``a`` then of ``b``. Any other tokenizer
takes the whole-text encode.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import Encoding

# NOTE: the pieces in a batch are encoded on the tokenizer's Rayon pool; a piece of ~512
# characters (~100 tokens) is ~0.1 ms of work, against ~20 us of per-item overhead.
CHUNK_CHARS = 512

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SAFE_PATTERNS = frozenset({GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN})

_SAFE: dict[int, tuple[Any, bool]] = {}  # id(backend) -> (backend, verdict); keeps it alive


def _safe_step(step: dict[str, Any]) -> bool:
    kind = step.get("type")
    if kind == "ByteLevel":
        return not step.get("add_prefix_space", False)
    if kind == "Digits":
        return True
    if kind == "Split":
        pattern = step.get("pattern", {})
        return (pattern.get("Regex") in SAFE_PATTERNS and step.get("behavior") == "Isolated"
                and not step.get("invert", False))
    return False


def _judge(backend: Any) -> bool:
    if backend.normalizer is not None or backend.pre_tokenizer is None:
        return False
    if getattr(backend.model, "dropout", None):
        return False
    pre = json.loads(backend.pre_tokenizer.__getstate__())
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    # NOTE: ByteLevel without its regex splits nothing: some step must cut the words.
    cuts = any(s.get("type") in ("Split", "Digits") or s.get("use_regex", False) for s in steps)
    if not steps or not cuts or not all(_safe_step(s) for s in steps):
        return False
    return all(not (t.lstrip or t.rstrip or t.single_word or any(c.isspace() for c in t.content))
               for t in backend.get_added_tokens_decoder().values())


def chunk_safe(backend: Any) -> bool:
    """Whether ``backend`` (a ``tokenizers.Tokenizer``) encodes a text cut at ``cut``'s spaces
    piece by piece exactly as whole (see the module docstring). Judged once per instance."""
    key = id(backend)
    seen = _SAFE.get(key)
    if seen is None or seen[0] is not backend:
        seen = _SAFE[key] = (backend, _judge(backend))
    return seen[1]


def parallel_enabled() -> bool:
    """False when ``TOKENIZERS_PARALLELISM`` turns the tokenizer's thread pool off."""
    return os.environ.get("TOKENIZERS_PARALLELISM", "").lower() not in ("0", "false", "off", "no")


def cut(text: str, num_pieces: int) -> list[str]:
    """``text`` in at most ``num_pieces`` pieces of about equal length, each cut made just
    before a single space between two non-whitespace characters (none found: fewer pieces).
    ``"".join(cut(text, n)) == text``."""
    n = len(text)
    starts = [0]
    for k in range(1, num_pieces):
        i = max(starts[-1] + 1, n * k // num_pieces)
        while i < n - 1 and not (text[i] == " " and not text[i - 1].isspace()
                                 and not text[i + 1].isspace()):
            i += 1
        if i >= n - 1:
            break
        starts.append(i)
    return [text[a:b] for a, b in zip(starts, [*starts[1:], n], strict=True)]


def pieces(backend: Any, text: str, chunk_chars: int = CHUNK_CHARS,
           max_pieces: int | None = None) -> list[str]:
    """The pieces ``encode_pieces`` encodes: ``[text]`` (encode it whole) for a short text, a
    tokenizer ``chunk_safe`` refuses, the thread pool off, or no cut point."""
    num = min(len(text) // chunk_chars, max_pieces or os.cpu_count() or 1)
    if num < 2 or not parallel_enabled() or not chunk_safe(backend):
        return [text]
    return cut(text, num)


def num_pieces(backend: Any, text: str, chunk_chars: int = CHUNK_CHARS,
               max_pieces: int | None = None) -> int:
    """``len(pieces(...))``: 1 when ``text`` is encoded whole."""
    return len(pieces(backend, text, chunk_chars, max_pieces))


def encode_pieces(backend: Any, text: str, add_special_tokens: bool,
                  chunk_chars: int = CHUNK_CHARS, max_pieces: int | None = None) -> list[int] | None:
    """The ids of ``text`` encoded in pieces of ~``chunk_chars`` as one batch, or None when
    ``pieces`` leaves it whole: the caller then encodes it whole."""
    parts = pieces(backend, text, chunk_chars, max_pieces)
    if len(parts) < 2:
        return None
    encs = backend.encode_batch_fast(parts, add_special_tokens=False)
    if add_special_tokens and backend.post_processor is not None:
        # NOTE: the post-processor (a BOS, a template) acts once, on the joined encoding.
        return list(backend.post_process(Encoding.merge(encs, growing_offsets=True)).ids)
    return [i for e in encs for i in e.ids]
