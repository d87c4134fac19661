"""Random allocate / append / hit / free / evict / compact sequences; ``check_integrity`` and a
shadow model of every live request's token contents after every step."""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmanager.config import PoolConfig
from kvmanager.manager import KVCacheManager

BS = 4
NUM_BLOCKS = 24
PREFIXES = [list(range(p * 100, p * 100 + 12)) for p in range(3)]  # shared system prompts


class PoolMachine(RuleBasedStateMachine):
    @initialize(
        allocator=st.sampled_from(["best_fit", "first_free"]),
        eviction=st.sampled_from(["lru", "adaptive"]),
    )
    def setup(self, allocator: str, eviction: str) -> None:
        self.m = KVCacheManager(
            PoolConfig(num_blocks=NUM_BLOCKS, block_size=BS, allocator=allocator, eviction=eviction)
        )
        # one fake K cache row per slot holding the token id written there: compaction must move it
        self.cache = torch.full((NUM_BLOCKS, BS), -1, dtype=torch.long)
        self.tokens: dict[str, list[int]] = {}
        self.next_id = 0

    def _write(self, rid: str, start: int, end: int) -> None:
        for pos, slot in zip(range(start, end), self.m.slot_mapping(rid, start, end), strict=True):
            self.cache.view(-1)[slot] = self.tokens[rid][pos]

    @rule(prefix=st.integers(0, 2), suffix=st.lists(st.integers(0, 50), min_size=1, max_size=10))
    def admit(self, prefix: int, suffix: list[int]) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        toks = PREFIXES[prefix] + suffix
        hit = self.m.lookup_prefix(toks)
        before = self.m.stats()
        new = self.m.allocate_slots(rid, toks, len(toks) - hit.num_cached_tokens, hit)
        if new is None:
            assert not self.m.has_request(rid) and self.m.stats() == before
            return
        # hit blocks really hold the prefix tokens
        for i, b in enumerate(hit.block_ids):
            assert self.cache[b].tolist() == toks[i * BS : (i + 1) * BS]
        self.tokens[rid] = toks
        self._write(rid, hit.num_cached_tokens, len(toks))
        self.m.commit(rid, toks, len(toks))

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data(), n=st.integers(1, 6))
    def append(self, data: st.DataObject, n: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        toks = self.tokens[rid]
        start = len(toks)
        grown = toks + [data.draw(st.integers(0, 50)) for _ in range(n)]
        if self.m.allocate_slots(rid, grown, n) is None:
            return
        self.tokens[rid] = grown
        self._write(rid, start, len(grown))
        self.m.commit(rid, grown, len(grown))

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.m.free(rid)
        del self.tokens[rid]

    @rule()
    def compact(self) -> None:
        self.m.apply_compaction(self.m.plan_compaction(), [self.cache])
        s = self.m.stats()
        assert s.num_free_runs <= 1

    @rule(full_layout_after=st.integers(0, 2), keep_free=st.integers(0, 3))
    def compact_contiguous(self, full_layout_after: int, keep_free: int) -> None:
        self.m.take_events()
        hashes = sorted(self.m.cached_block_hashes())
        plan = self.m.plan_contiguous_compaction(keep_free, full_layout_after)
        self.m.apply_compaction(plan, [self.cache])
        # a move keeps every hash resident: no KV event, same cached set (contents: invariant)
        assert self.m.take_events() == [] and sorted(self.m.cached_block_hashes()) == hashes

    @rule()
    def reset(self) -> None:
        assert self.m.reset_prefix_cache() == (not self.tokens)

    @invariant()
    def integrity(self) -> None:
        if not hasattr(self, "m"):
            return
        self.m.check_integrity()
        for rid, toks in self.tokens.items():
            n = self.m.num_computed_tokens(rid)
            slots = self.m.slot_mapping(rid, 0, n)
            assert self.cache.view(-1)[slots].tolist() == toks[:n]


TestPoolStateMachine = PoolMachine.TestCase
TestPoolStateMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
