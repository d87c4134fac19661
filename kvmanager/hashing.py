"""Chained block hashes for prefix reuse.

A block's hash covers its own tokens AND every token before it, through the parent hash:

    h_0 = H(seed,  tokens[0:B],  extra_keys)
    h_i = H(h_i-1, tokens[iB:(i+1)B], extra_keys)

Only FULL blocks are hashed. Two modes share one interface:

- ``fast`` (default): xxh3-64 over the raw bytes (parent || int64 tokens || repr(extra_keys)).
- ``vllm``: vLLM's ``sha256_cbor`` scheme, bit-identical to
  ``vllm.v1.core.kv_cache_utils.hash_block_tokens`` with its seed handling: the root parent is
  ``NONE_HASH = sha256_cbor(PYTHONHASHSEED or "vllm-none-hash")``.

Every hash also has an *external* form: a 64-bit unsigned int. For ``vllm`` mode it is exactly
what vLLM publishes in its KV events (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, the default:
the low 64 bits of the big-endian digest). The pool, its events and the selection service all
key blocks by the external form, so one index serves our pools and vLLM engines alike.
"""

from __future__ import annotations

import hashlib
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

# NOTE: the native hash is int (fast) or bytes (vllm); callers treat it as opaque.
NativeHash = int | bytes
MASK64 = (1 << 64) - 1
VLLM_DEFAULT_SEED = "vllm-none-hash"


class BlockHasher(ABC):
    """Computes chained block hashes; stateless apart from its seed."""

    name: str

    @abstractmethod
    def hash_block(
        self,
        parent: NativeHash | None,
        token_ids: Sequence[int],
        extra_keys: tuple[Any, ...] | None = None,
    ) -> NativeHash:
        """Hash of one full block given its parent's native hash (None for the first block)."""

    @abstractmethod
    def external(self, h: NativeHash) -> int:
        """The 64-bit form used in events, the service index and the wire protocol."""

    def hash_blocks(
        self,
        token_ids: Sequence[int],
        block_size: int,
        parent: NativeHash | None = None,
        extra_keys: tuple[Any, ...] | None = None,
    ) -> list[NativeHash]:
        """Native hashes of every full block of ``token_ids`` (a trailing partial block is
        skipped), chained from ``parent``."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        out: list[NativeHash] = []
        for start in range(0, len(token_ids) - block_size + 1, block_size):
            parent = self.hash_block(parent, token_ids[start : start + block_size], extra_keys)
            out.append(parent)
        return out

    def external_hashes(
        self,
        token_ids: Sequence[int],
        block_size: int,
        extra_keys: tuple[Any, ...] | None = None,
    ) -> list[int]:
        """External (64-bit) hashes of every full block: what a router sends to the service."""
        return [self.external(h) for h in self.hash_blocks(token_ids, block_size, None, extra_keys)]


class FastHasher(BlockHasher):
    """xxh3-64 chained hash; the external form is the hash itself."""

    name = "fast"

    def __init__(self, seed: int = 0) -> None:
        import xxhash

        self._xxh = xxhash.xxh3_64_intdigest
        self._seed = seed & MASK64

    def hash_block(
        self,
        parent: NativeHash | None,
        token_ids: Sequence[int],
        extra_keys: tuple[Any, ...] | None = None,
    ) -> int:
        parent_int = self._seed if parent is None else int.from_bytes(parent, "big") if isinstance(
            parent, bytes
        ) else parent
        data = struct.pack(f"<Q{len(token_ids)}q", parent_int, *token_ids)
        if extra_keys:
            data += repr(extra_keys).encode()
        return int(self._xxh(data))

    def external(self, h: NativeHash) -> int:
        return h if isinstance(h, int) else int.from_bytes(h, "big") & MASK64


class VllmHasher(BlockHasher):
    """vLLM's ``sha256_cbor`` chained hash (same digest as vLLM for the same seed)."""

    name = "vllm"

    def __init__(self, seed: str | None = None) -> None:
        import cbor2

        self._dumps = cbor2.dumps
        # NOTE: vLLM resolves the seed as PYTHONHASHSEED if set, else a fixed default for sha256.
        self.seed = seed if seed is not None else os.getenv("PYTHONHASHSEED", VLLM_DEFAULT_SEED)
        self.none_hash: bytes = self._sha256_cbor(self.seed)

    def _sha256_cbor(self, obj: Any) -> bytes:
        return hashlib.sha256(self._dumps(obj, canonical=True)).digest()

    def hash_block(
        self,
        parent: NativeHash | None,
        token_ids: Sequence[int],
        extra_keys: tuple[Any, ...] | None = None,
    ) -> bytes:
        parent_b = self.none_hash if parent is None else parent
        return self._sha256_cbor((parent_b, tuple(int(t) for t in token_ids), extra_keys))

    def external(self, h: NativeHash) -> int:
        return int.from_bytes(h, "big") & MASK64 if isinstance(h, bytes) else h & MASK64


def make_hasher(mode: str = "fast", seed: str | None = None) -> BlockHasher:
    """Hasher by mode name: ``fast`` (xxh3-64) or ``vllm`` (sha256_cbor)."""
    if mode == "fast":
        return FastHasher(0 if seed is None else int(hashlib.sha256(seed.encode()).hexdigest()[:16], 16))
    if mode == "vllm":
        return VllmHasher(seed)
    raise ValueError(f"unknown hash mode {mode!r}; expected 'fast' or 'vllm'")
