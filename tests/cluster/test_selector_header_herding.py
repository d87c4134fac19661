"""A short prefix every request shares (the chat template's opening) must not herd requests
onto the replica that holds it (gpu_ab b2b_saas imbalance, benchmarks/results/gpu_ab/README.md
"b2b_saas imbalance"): A_frequency and L_locality enter the utility scaled by the matched
fraction S, so a 3-block header of a 450-block prompt is worth ~1% of a full match, and the
in-flight load decides."""

from __future__ import annotations

import numpy as np
from selector_helpers import FakeClock, cands

from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.objective import ObjectiveConfig, TinyServeObjective
from cluster.selector.types import CandidateRow, LoadSnapshot, SelectionRequest
from kvmanager.events import BlockStored

HEADER = [1, 2, 3]  # the template's opening, shared by every request
CONTEXT_BLOCKS = 450  # b2b_saas: 6,000-token tenant context + 1,200-token query
RATE = 150_000.0  # tokens/s, a 1B model's prefill on an H100


def _tenant_request(tenant: int) -> SelectionRequest:
    hashes = HEADER + [10_000 * (tenant + 1) + i for i in range(CONTEXT_BLOCKS)]
    return SelectionRequest(f"t{tenant}", hashes, len(hashes) * 16, 128)


def _row(rid: str, **kw: object) -> CandidateRow:
    base: dict[str, object] = {"num_blocks": 20_000, "num_free_blocks": 20_000,
                               "block_size": 16, "prefill_tokens_per_s": RATE}
    base.update(kw)
    return CandidateRow(rid, **base)  # type: ignore[arg-type]


def test_header_match_is_worth_its_share_of_the_prompt() -> None:
    """A hot, device-resident header covering 3 of 453 blocks: frequency and locality are
    scaled by S (<1%), not full-strength."""
    p = TinyServeObjective()
    r = p.select(_tenant_request(0), cands(_row("a", num_matched_blocks=3, hotness=40.0),
                                           _row("b")))
    s = r.terms["similarity"][0]
    assert 0 < s < 0.01
    np.testing.assert_allclose(r.terms["locality"][0], s)
    assert r.terms["frequency"][0] <= s
    assert r.terms["utility"][1] > 0.9  # the cold replica keeps almost all of U (0.95)


def test_full_match_keeps_frequency_and_locality() -> None:
    """Whole-prompt matches (S = 1) see the features unscaled."""
    p = TinyServeObjective()
    q = _tenant_request(0)
    n = q.num_prompt_blocks
    r = p.select(q, cands(_row("a", num_matched_blocks=n, hotness=40.0), _row("b")))
    assert r.terms["similarity"][0] == 1.0 and r.terms["locality"][0] == 1.0
    np.testing.assert_allclose(r.terms["frequency"][0], -np.expm1(-40.0 / 4.0))


def test_small_inflight_load_outweighs_a_header_match() -> None:
    """Same hits beyond the header (none), 0.1 s of in-flight prefill on the header's holder:
    the next request goes to the other replica. Unscaled (the old objective) it stayed."""
    c = cands(_row("a", num_matched_blocks=3, hotness=40.0, num_queued_tokens=15_000),
              _row("b"))
    q = _tenant_request(1)
    assert TinyServeObjective().select(q, c).top(c, 1)[0].replica_id == "b"
    old = TinyServeObjective(ObjectiveConfig(match_scaled_features=False))
    assert old.select(q, c).top(c, 1)[0].replica_id == "a"


def _core(clock: FakeClock, **objective: object) -> SelectorCore:
    core = SelectorCore(CoreConfig(objective=ObjectiveConfig(**objective)),  # type: ignore[arg-type]
                        clock=clock)
    for i in range(2):
        core.join(f"r{i}", block_size=16, num_blocks=20_000)
        core.update_load(f"r{i}", LoadSnapshot(num_blocks=20_000, num_free_blocks=20_000,
                                               prefill_tokens_per_s=RATE))
    core.apply_events("r0", 0, [BlockStored(HEADER, None, [], 16)])  # r0 served the first one
    return core


def _routed(core: SelectorCore, n: int, clock: FakeClock) -> list[str]:
    out = []
    for t in range(n):
        out.append(core.select(_tenant_request(t)).ranked[0].replica_id)
        clock.advance(0.01)
    return out


def test_new_tenants_spread_by_inflight_load(clock: FakeClock) -> None:
    """Eight new tenants in 80 ms, no KV report in between (their prefills are in flight): the
    routed-since-report load on r0 sends the next ones to r1, although only r0 holds the
    shared header. The unscaled objective sent 6 of 8 to r0."""
    routed = _routed(_core(clock), 8, clock)
    assert 3 <= routed.count("r1") <= 5, routed
    old = _routed(_core(FakeClock(), match_scaled_features=False), 8, FakeClock())
    assert old.count("r0") >= 6, old
