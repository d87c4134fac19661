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
from select_twins import core_state, random_select_request, twin_cores, twin_run, unfused

from cluster.selector import wire_select
from cluster.selector.convert import MAX_CANDIDATES
from cluster.selector.core import SelectorCore
from cluster.selector.objective import ObjectiveConfig
from cluster.selector.wire import MalformedMessage
from protos import cache_selection_pb2 as pb


@pytest.mark.parametrize(("seed", "num_replicas"), [(1, 5), (2, 40), (3, 130)])
def test_fused_answers_and_state_match_the_three_steps(seed: int, num_replicas: int) -> None:
    fused, plain, base, rng, clock, probes = twin_run(seed, num_replicas)
    for step in range(300):
        raw = random_select_request(rng, base, num_replicas)
        assert fused.select_wire(raw) == unfused(plain, raw), step
        if step % 50 == 0:
            assert core_state(fused, probes) == core_state(plain, probes), step
        if step % 7 == 0:
            clock.advance(0.2)  # NOTE: pending marks expire inside later Selects
        if step == 150:  # NOTE: membership changes: the ids' bytes are rebuilt
            for core in (fused, plain):
                core.leave("r1")
                core.join("late", node_id="n9", num_blocks=4096)
    assert core_state(fused, probes) == core_state(plain, probes)
    # NOTE: every one of them took the compiled path (none needed Python), through the
    # overload's entry point (``wire_select._entry_point``) once a binding had been typed
    assert int(fused._wire.tally.counts[0]) == 300
    assert int(plain._wire.tally.counts[0]) == 0
    assert fused._wire._entry is not None


def test_through_numba_dispatch_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the entry point every call goes through numba's dispatcher: same answers."""
    monkeypatch.setattr(wire_select, "_entry_point", lambda args: None)
    fused, plain, base, rng, clock, probes = twin_run(4, 20)
    for step in range(60):
        raw = random_select_request(rng, base, 20)
        assert fused.select_wire(raw) == unfused(plain, raw), step
        if step % 7 == 0:
            clock.advance(0.2)
    assert core_state(fused, probes) == core_state(plain, probes)
    assert fused._wire._entry is None and int(fused._wire.tally.counts[0]) == 60


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
    (fused, plain), base = twin_cores(4, 12)
    rng = np.random.default_rng(5)
    for step in range(120):
        raw = random_select_request(rng, base, 12)
        fused.select_wire(raw)
        unfused(plain, raw)
        if step in (30, 31, 90):  # NOTE: scrapes in between fold only what is new
            _scrape(fused)
    a, b = _scrape(fused), _scrape(plain)
    assert a['tinyserve_selector_decisions_total{policy="tinyserve"}'] == 120
    assert a['tinyserve_selector_select_latency_seconds_count{policy="tinyserve"}'] == 120
    assert (
        a['tinyserve_selector_select_latency_seconds_bucket{le="+Inf",policy="tinyserve"}'] == 120
    )
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
        candidate_replica_ids=["r0"] * (MAX_CANDIDATES + 1)
    ).SerializeToString(),
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
    (fused, plain), _ = twin_cores(6, 4, max_prompt_blocks=32)
    raw = _BAD[case]
    got, want = _error(lambda: fused.select_wire(raw)), _error(lambda: unfused(plain, raw))
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
    (fused, plain), base = twin_cores(7, 6, **cfg)
    if variant == "slow path":
        fused.fast_path = plain.fast_path = False
    for core in (fused, plain):
        core.join("réplica-ü", node_id="nœud", num_blocks=4096)
    rng = np.random.default_rng(8)
    for _ in range(30):
        msg = pb.SelectRequest.FromString(random_select_request(rng, base, 6))
        if variant == "unicode ids":
            msg.candidate_replica_ids.extend(["réplica-ü", "r0"])
            msg.origin_node_id = "nœud"
        if variant == "other default":
            msg.policy = ""  # NOTE: the default's; a named tinyserve is fused (below)
        raw = msg.SerializeToString()
        assert fused.select_wire(raw) == unfused(plain, raw)
    assert int(fused._wire.tally.counts[0]) == 0
    assert fused.counters == plain.counters


def test_named_tinyserve_is_fused_under_another_default() -> None:
    (fused, plain), base = twin_cores(9, 6, default_policy="round_robin")
    rng = np.random.default_rng(10)
    for _ in range(20):
        msg = pb.SelectRequest.FromString(random_select_request(rng, base, 6))
        msg.policy = "tinyserve"
        raw = msg.SerializeToString()
        assert fused.select_wire(raw) == unfused(plain, raw)
    assert int(fused._wire.tally.counts[0]) == 20


def test_many_candidates_grow_the_buffers() -> None:
    """More named candidates (duplicates) than replicas: the kernel asks for room, once."""
    (fused, plain), base = twin_cores(11, 3)
    msg = pb.SelectRequest(block_hashes=base[:50], num_prompt_tokens=800, request_id="big",
                           candidate_replica_ids=["r0", "r1", "r2", "zz"] * 600)  # fmt: skip
    raw = msg.SerializeToString()
    assert fused.select_wire(raw) == unfused(plain, raw)
    assert int(fused._wire.tally.counts[0]) == 1
