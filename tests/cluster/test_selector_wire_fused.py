"""The compiled wire Select (``SelectorCore.select_wire``: ``wire_select_kernel``) against the
three-step path it replaces (``wire.decode_select`` -> ``SelectorCore.select`` ->
``wire.encode_select``) on twin cores: the same answer bytes, the same index state after
(pending marks, access counts, load columns, routed requests), the same counters and metric
totals, and the same errors for the requests it hands back."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest
from selector_helpers import FakeClock

from cluster.selector.convert import MAX_CANDIDATES
from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.objective import ObjectiveConfig
from cluster.selector.types import LoadSnapshot
from cluster.selector.wire import MalformedMessage, decode_select, encode_select
from kvmanager.events import MEDIUM_CPU, BlockStored
from protos import cache_selection_pb2 as pb


def _unfused(core: SelectorCore, raw: bytes) -> bytes:
    req, cands, policy, k, spec = decode_select(raw, core.config.max_prompt_blocks)
    return encode_select(core.select(req, cands, policy, k, spec))


def _twins(seed: int, num_replicas: int, **cfg: Any) -> tuple[list[SelectorCore], list[int]]:
    """Two cores with the same replicas, blocks (device and host tier) and loads."""
    rng = np.random.default_rng(seed)
    clock = FakeClock()
    base = rng.integers(1, 1 << 64, 3000, dtype=np.uint64).tolist()
    cores = [SelectorCore(CoreConfig(stale_after_s=1e9, pending_ttl_s=0.5, **cfg), clock=clock)
             for _ in range(2)]  # fmt: skip
    for i in range(num_replicas):
        start, n = int(rng.integers(0, 2800)), int(rng.integers(1, 200))
        host = base[int(rng.integers(0, 2900)) :][:40]
        load = LoadSnapshot(num_blocks=4096, num_free_blocks=int(rng.integers(0, 4096)),
                            num_waiting_tokens=int(rng.integers(0, 5000)),
                            ttft_ewma_s=float(rng.random()), f_total=float(rng.random()),
                            prefill_tokens_per_s=float(rng.integers(0, 20000)))  # fmt: skip
        for core in cores:
            core.join(f"r{i}", node_id=f"n{i % 3}", num_blocks=4096)
            core.apply_events(f"r{i}", 0, [BlockStored(base[start : start + n], None, [], 16)])
            if i % 4 == 0:
                core.apply_events(f"r{i}", 1, [BlockStored(host, None, [], 16,
                                                           medium=MEDIUM_CPU)])  # fmt: skip
            core.update_load(f"r{i}", load)
    return cores, base


def _random_request(rng: np.random.Generator, base: list[int], num_replicas: int) -> bytes:
    start = int(rng.integers(0, 2900))
    n = int(rng.integers(0, 100)) if rng.random() < 0.9 else 0
    hashes = base[start : start + n] + rng.integers(1, 1 << 64, int(rng.integers(0, 8)),
                                                   dtype=np.uint64).tolist()  # fmt: skip
    msg = pb.SelectRequest(block_hashes=hashes, num_prompt_tokens=16 * len(hashes),
                           max_results=int(rng.integers(0, 6)))  # fmt: skip
    if rng.random() < 0.7:
        msg.request_id = f"q{int(rng.integers(1 << 30))}"
    if rng.random() < 0.4:
        ids = rng.integers(0, num_replicas + 3, int(rng.integers(1, 12))).tolist()
        msg.candidate_replica_ids.extend(f"r{i}" for i in ids)  # NOTE: >= num: unknown
    if rng.random() < 0.3:
        msg.no_speculative_insert = True
    if rng.random() < 0.5:
        msg.origin_node_id = ["n0", "n1", "n2", "elsewhere"][int(rng.integers(0, 4))]
    if rng.random() < 0.3:
        msg.num_output_tokens = int(rng.integers(1, 500))
    if rng.random() < 0.2:
        msg.policy = "tinyserve"
    if rng.random() < 0.1:
        msg.session_id = "s1"
    return msg.SerializeToString()


def _state(core: SelectorCore, probes: list[list[int]]) -> Any:
    """What a Select can change, read through the owners' own APIs."""
    t = core._table
    out: list[Any] = [t.ints.tolist(), t.floats.tolist(), dict(core.counters),
                      dict(core.stats().decisions), list(core._routed.items()),
                      sorted((r.replica_id, r.num_inflight_tokens) for r in t.records.values()),
                      [(r.replica_id, r.num_pending_blocks) for r in core.list_replicas()]]  # fmt: skip
    for h in probes:
        m = core._index.match(h, t.live_mask)
        matched, _, _ = m.arrays(t.capacity)
        out += [m.resident, m.pending, m.host,
                core._access.hotness(h, matched, m.lengths()).tolist()]  # fmt: skip
    return out


@pytest.mark.parametrize(("seed", "num_replicas"), [(1, 5), (2, 40), (3, 130)])
def test_fused_answers_and_state_match_the_three_steps(seed: int, num_replicas: int) -> None:
    (fused, plain), base = _twins(seed, num_replicas)
    rng = np.random.default_rng(seed + 100)
    clock = fused.clock
    assert isinstance(clock, FakeClock)
    probes = [base[s : s + 60] for s in range(0, 2900, 97)]
    for step in range(300):
        raw = _random_request(rng, base, num_replicas)
        assert fused.select_wire(raw) == _unfused(plain, raw), step
        if step % 50 == 0:
            assert _state(fused, probes) == _state(plain, probes), step
        if step % 7 == 0:
            clock.advance(0.2)  # NOTE: pending marks expire inside later Selects
        if step == 150:  # NOTE: membership changes: the ids' bytes are rebuilt
            for core in (fused, plain):
                core.leave("r1")
                core.join("late", node_id="n9", num_blocks=4096)
    assert _state(fused, probes) == _state(plain, probes)
    # NOTE: every one of them took the compiled path (none needed Python)
    assert int(fused._wire.tally.counts[0]) == 300
    assert int(plain._wire.tally.counts[0]) == 0


def _scrape(core: SelectorCore) -> dict[str, float]:
    text = generate_latest(core.metrics.registry).decode()
    keep = ("tinyserve_selector_decisions_total", "tinyserve_selector_errors_total",
            "tinyserve_selector_select_latency_seconds_count",
            "tinyserve_selector_select_latency_seconds_bucket")  # fmt: skip
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\w+)(\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) in keep:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_metrics_totals_match_after_scrapes() -> None:
    (fused, plain), base = _twins(4, 12)
    rng = np.random.default_rng(5)
    for step in range(120):
        raw = _random_request(rng, base, 12)
        fused.select_wire(raw)
        _unfused(plain, raw)
        if step in (30, 31, 90):  # NOTE: scrapes in between fold only what is new
            _scrape(fused)
    a, b = _scrape(fused), _scrape(plain)
    assert a['tinyserve_selector_decisions_total{policy="tinyserve"}'] == 120
    assert a['tinyserve_selector_select_latency_seconds_count{policy="tinyserve"}'] == 120
    assert a['tinyserve_selector_select_latency_seconds_bucket{le="+Inf",policy="tinyserve"}'] == 120
    unknown = 'tinyserve_selector_errors_total{kind="unknown_replica"}'
    assert a[unknown] == b[unknown] > 0
    # NOTE: the buckets' split depends on timing; the totals may not
    assert {k: v for k, v in a.items() if "_bucket" not in k} == {
        k: v for k, v in b.items() if "_bucket" not in k
    }
    assert fused.counters == plain.counters
    assert fused.stats().decisions == plain.stats().decisions == {"tinyserve": 120}


def _error(fn: Any) -> tuple[type, str] | None:
    try:
        fn()
    except ValueError as exc:  # NOTE: MalformedMessage is one
        return type(exc), str(exc)
    return None


_BAD: dict[str, bytes] = {
    "truncated": pb.SelectRequest(block_hashes=[1, 2, 3]).SerializeToString()[:-1],
    "mismatched group": b"\x0b\x14",  # NOTE: a well-formed group (0b 0c) is skipped
    "field 0": b"\x02\x00",
    "oversized prompt": pb.SelectRequest(block_hashes=list(range(1, 40))).SerializeToString(),
    "too many candidates": pb.SelectRequest(
        candidate_replica_ids=["r0"] * (MAX_CANDIDATES + 1)).SerializeToString(),
    "request id not UTF-8": b"\x0a\x02\xff\xfe",
    "candidate not UTF-8": b"\x32\x01\xff",
    "empty candidate id": pb.SelectRequest(candidate_replica_ids=["r0", ""]).SerializeToString(),
    "id too long": pb.SelectRequest(request_id="x" * 257).SerializeToString(),
    "candidate too long": pb.SelectRequest(candidate_replica_ids=["r" * 300]).SerializeToString(),
    "unknown policy": pb.SelectRequest(policy="nope").SerializeToString(),
    "origin too long": pb.SelectRequest(origin_node_id="n" * 300).SerializeToString(),
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_errors_are_the_three_steps_errors(case: str) -> None:
    (fused, plain), _ = _twins(6, 4, max_prompt_blocks=32)
    raw = _BAD[case]
    got, want = _error(lambda: fused.select_wire(raw)), _error(lambda: _unfused(plain, raw))
    assert want is not None and got == want
    if case in ("truncated", "mismatched group", "field 0", "request id not UTF-8"):
        assert got[0] is MalformedMessage
    assert int(fused._wire.tally.counts[0]) == 0 and fused.counters == plain.counters


@pytest.mark.parametrize("variant", ["learn", "slow path", "other default", "unicode ids"])
def test_what_the_kernel_hands_back_answers_the_same(variant: str) -> None:
    """Requests and cores the compiled call does not cover still get the same answers."""
    cfg: dict[str, Any] = {}
    if variant == "learn":
        cfg["objective"] = ObjectiveConfig(learn=True)
    if variant == "other default":
        cfg["default_policy"] = "round_robin"
    (fused, plain), base = _twins(7, 6, **cfg)
    if variant == "slow path":
        fused.fast_path = plain.fast_path = False
    for core in (fused, plain):
        core.join("réplica-ü", node_id="nœud", num_blocks=4096)
    rng = np.random.default_rng(8)
    for _ in range(30):
        msg = pb.SelectRequest.FromString(_random_request(rng, base, 6))
        if variant == "unicode ids":
            msg.candidate_replica_ids.extend(["réplica-ü", "r0"])
            msg.origin_node_id = "nœud"
        if variant == "other default":
            msg.policy = ""  # NOTE: the default's; a named tinyserve is fused (below)
        raw = msg.SerializeToString()
        assert fused.select_wire(raw) == _unfused(plain, raw)
    assert int(fused._wire.tally.counts[0]) == 0
    assert fused.counters == plain.counters


def test_named_tinyserve_is_fused_under_another_default() -> None:
    (fused, plain), base = _twins(9, 6, default_policy="round_robin")
    rng = np.random.default_rng(10)
    for _ in range(20):
        msg = pb.SelectRequest.FromString(_random_request(rng, base, 6))
        msg.policy = "tinyserve"
        raw = msg.SerializeToString()
        assert fused.select_wire(raw) == _unfused(plain, raw)
    assert int(fused._wire.tally.counts[0]) == 20


def test_many_candidates_grow_the_buffers() -> None:
    """More named candidates (duplicates) than replicas: the kernel asks for room, once."""
    (fused, plain), base = _twins(11, 3)
    msg = pb.SelectRequest(block_hashes=base[:50], num_prompt_tokens=800, request_id="big",
                           candidate_replica_ids=["r0", "r1", "r2", "zz"] * 600)  # fmt: skip
    raw = msg.SerializeToString()
    assert fused.select_wire(raw) == _unfused(plain, raw)
    assert int(fused._wire.tally.counts[0]) == 1
