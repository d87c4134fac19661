from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmanager.hashing import FastHasher, VllmHasher, make_hasher

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "vllm_hash_vectors.json").read_text())


def test_fixture_records_vllm_version() -> None:
    assert FIXTURE["vllm_version"] == "0.33.0"
    assert FIXTURE["scheme"] == "sha256_cbor"


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda c: f"bs{c['block_size']}")
def test_vllm_mode_matches_recorded_vllm_vectors(case: dict) -> None:
    hasher = VllmHasher(seed=case["seed"] if case["seed"] is not None else "vllm-none-hash")
    extra = tuple(case["extra_keys"]) if case["extra_keys"] else None
    got = hasher.external_hashes(case["token_ids"], case["block_size"], extra)
    assert got == [int(h) for h in case["block_hashes"]]


def test_vllm_mode_matches_live_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    kcu = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    from vllm.utils.hashing import sha256_cbor

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    kcu.init_none_hash(sha256_cbor)
    tokens = list(range(1000, 1070))
    parent, expected = None, []
    for i in range(4):
        parent = kcu.hash_block_tokens(sha256_cbor, parent, tokens[i * 16 : (i + 1) * 16], None)
        expected.append(kcu.maybe_convert_block_hash(parent))
    assert make_hasher("vllm").external_hashes(tokens, 16) == expected


def test_vllm_seed_follows_pythonhashseed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    a = VllmHasher().external_hashes(list(range(32)), 16)
    monkeypatch.delenv("PYTHONHASHSEED")
    b = VllmHasher().external_hashes(list(range(32)), 16)
    assert a != b


@pytest.mark.parametrize("mode", ["fast", "vllm"])
def test_chain_properties(mode: str) -> None:
    h = make_hasher(mode)
    base = list(range(64))
    hashes = h.external_hashes(base, 16)
    assert len(hashes) == 4 and len(set(hashes)) == 4
    # a trailing partial block is not hashed
    assert h.external_hashes([*base, 1, 2, 3], 16) == hashes
    # changing a token changes that block and every later one, not earlier ones
    changed = list(base)
    changed[20] = 999
    h2 = h.external_hashes(changed, 16)
    assert h2[0] == hashes[0] and all(a != b for a, b in zip(h2[1:], hashes[1:], strict=True))
    # extra keys (e.g. a cache salt or LoRA id) separate otherwise equal chains
    assert h.external_hashes(base, 16, ("salt",)) != hashes
    assert all(0 <= x < 2**64 for x in hashes)


def test_fast_hasher_is_deterministic_across_instances() -> None:
    assert FastHasher().external_hashes(list(range(48)), 16) == FastHasher().external_hashes(
        list(range(48)), 16
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="hash mode"):
        make_hasher("md5")
    with pytest.raises(ValueError, match="block_size"):
        make_hasher().external_hashes([1, 2], 0)
