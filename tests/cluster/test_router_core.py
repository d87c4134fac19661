"""TinyServe router core without Ray: settings, request extraction, hashing, ranking."""

from __future__ import annotations

import random

import pytest

from cluster.selector.core_types import Selection
from cluster.selector.types import Ranked, ScoreTerms
from cluster.serve.router_core import (
    PromptHasher,
    RouterSettings,
    prompt_info,
    ranks_from_selection,
)
from kvmanager.config import PoolConfig
from kvmanager.events import BlockStored
from kvmanager.manager import KVCacheManager
from replicas.deployment import GenerateRequest
from replicas.sampling_params import SamplingParams


def test_settings_reject_unknown_and_bad_values() -> None:
    assert RouterSettings.from_kwargs({}).select_timeout_s == 0.05
    with pytest.raises(ValueError, match="unknown TinyServeRouter kwargs"):
        RouterSettings.from_kwargs({"select_timeout": 1})
    with pytest.raises(ValueError, match="select_timeout_s"):
        RouterSettings.from_kwargs({"select_timeout_s": 0})
    with pytest.raises(ValueError, match="block_size"):
        RouterSettings.from_kwargs({"block_size": 0})
    with pytest.raises(ValueError, match="hash mode"):
        RouterSettings.from_kwargs({"hash_mode": "md5"})


def test_standalone_fast_lanes_pair_with_the_addresses() -> None:
    kw = {"selector_address": "a:1, b:2", "selector_fast_lanes": "a:11,b:22"}
    assert RouterSettings.from_kwargs(kw).fast_lanes() == {"a:1": "a:11", "b:2": "b:22"}
    assert RouterSettings.from_kwargs({"selector_address": "a:1"}).fast_lanes() == {}
    with pytest.raises(ValueError, match="2 selector_address entries"):
        RouterSettings.from_kwargs({**kw, "selector_fast_lanes": "a:11"})
    with pytest.raises(ValueError, match="needs selector_address"):
        RouterSettings.from_kwargs({"selector_fast_lanes": "a:11"})
    with pytest.raises(ValueError, match="plaintext"):
        RouterSettings.from_kwargs({**kw, "tls_ca_file": "/ca.pem"})


def test_prompt_info_reads_the_generate_request_among_args() -> None:
    req = GenerateRequest("r1", [1, 2, 3], SamplingParams(max_tokens=7), session_id="s")
    info = prompt_info(["not a request", req])
    assert info is not None
    assert (info.request_id, list(info.prompt_token_ids), info.max_tokens, info.session_id) == (
        "r1", [1, 2, 3], 7, "s"
    )
    assert info.policy == ""
    assert prompt_info(["text", 3]) is None
    assert prompt_info([]) is None


def test_prompt_info_carries_the_requests_own_routing_policy() -> None:
    req = GenerateRequest("r2", [1], SamplingParams(), routing_policy="sglang_cache_aware")
    info = prompt_info([req])
    assert info is not None and info.policy == "sglang_cache_aware"


@pytest.mark.parametrize("hash_mode", ["fast", "vllm"])
def test_router_hashes_equal_the_pool_block_stored_hashes(hash_mode: str) -> None:
    rng = random.Random(0)
    tokens = [rng.randrange(50_000) for _ in range(16 * 5 + 7)]
    pool = KVCacheManager(PoolConfig(num_blocks=32, block_size=16, hash_mode=hash_mode))
    assert pool.allocate_slots("r", tokens, len(tokens)) is not None
    pool.commit("r", tokens, len(tokens))
    stored = [h for ev in pool.take_events() if isinstance(ev, BlockStored)
              for h in ev.block_hashes]
    assert len(stored) == 5
    assert PromptHasher(16, hash_mode)(tokens) == stored
    # A different prefix diverges from the first block on.
    other = PromptHasher(16, hash_mode)([tokens[0] + 1, *tokens[1:]])
    assert all(a != b for a, b in zip(other, stored, strict=True))


def _selection(*ids: str) -> Selection:
    return Selection("tinyserve", [Ranked(i, 1.0 - k / 10, ScoreTerms()) for k, i in enumerate(ids)],
                     num_prompt_blocks=3)


def test_ranks_follow_the_service_order_and_skip_unknown_replicas() -> None:
    replicas = {"a": "A", "b": "B", "c": "C"}
    assert ranks_from_selection(_selection("c", "gone", "a", "b"), replicas) == [["C"], ["A"], ["B"]]
    assert ranks_from_selection(_selection("c", "a", "b"), replicas, max_ranked=2) == [["C"], ["A"]]
    assert ranks_from_selection(_selection("gone"), replicas) == []
