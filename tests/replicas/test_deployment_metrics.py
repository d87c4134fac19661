"""The replica's block-state gauge partitions a real pool (no Ray: recording gauges stand in
for Ray's, which only work inside a Serve replica; the real scrape is checked in
tests/cluster/test_app_e2e.py)."""

from __future__ import annotations

from kvmanager.config import PoolConfig
from kvmanager.manager import KVCacheManager
from replicas.deployment_metrics import ReplicaMetrics


class _Gauge:
    def __init__(self) -> None:
        self.values: dict[str | None, float] = {}

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        key = None if tags is None else ",".join(f"{k}={v}" for k, v in sorted(tags.items()))
        self.values[key] = value


class _Counter:
    def __init__(self) -> None:
        self.total = 0.0

    def inc(self, value: float = 1.0) -> None:
        self.total += value


def _metrics() -> ReplicaMetrics:
    m = object.__new__(ReplicaMetrics)  # NOTE: no Ray here; only the gauges are exercised
    for name in ("num_requests_inflight", "num_blocks", "cached_blocks", "kv_usage",
                 "kv_utilization", "fragmentation"):
        setattr(m, name, _Gauge())
    m.compactions, m.compacted_blocks = _Counter(), _Counter()  # type: ignore[assignment]
    m._compaction_seen = (0, 0)
    return m


def test_block_states_sum_to_the_pool_with_cached_blocks_in_use_and_evictable() -> None:
    mgr = KVCacheManager(PoolConfig(num_blocks=64, block_size=4))
    shared = list(range(1, 17))  # 4 full blocks
    for rid, tail in (("a", [90, 91]), ("b", [92, 93, 94])):
        ids = shared + tail
        hit = mgr.lookup_prefix(ids)
        assert mgr.allocate_slots(rid, ids, len(ids) - hit.num_cached_tokens, hit,
                                  expected_num_tokens=len(ids) + 8) is not None
        mgr.commit(rid, ids, len(ids))
    mgr.free("a")
    lone = [200 + i for i in range(12)]
    hit = mgr.lookup_prefix(lone)
    assert mgr.allocate_slots("c", lone, len(lone), hit, expected_num_tokens=12) is not None
    mgr.commit("c", lone, len(lone))
    mgr.free("c")  # its 3 full blocks stay cached, unreferenced: evictable
    st = mgr.stats()
    assert st.num_evictable_blocks > 0 and st.num_used_blocks > 0
    assert st.num_cached_blocks > st.num_evictable_blocks  # cached overlaps used and evictable
    m = _metrics()
    m.on_pool(st, num_inflight=1)
    states = m.num_blocks.values  # type: ignore[attr-defined]
    assert set(states) == {"state=empty", "state=evictable", "state=used"}
    assert sum(states.values()) == 64
    assert m.cached_blocks.values == {None: st.num_cached_blocks}  # type: ignore[attr-defined]
    mgr.check_integrity()
