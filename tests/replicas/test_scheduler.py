"""Scheduler decisions against a real pool, without a model: token budget, chunked prefill,
prefix reuse, max_num_seqs, youngest-first preemption by recompute."""

from __future__ import annotations

from kvmanager.config import PoolConfig
from kvmanager.manager import KVCacheManager
from replicas.request import Request, RequestStatus
from replicas.sampling_params import SamplingParams
from replicas.scheduler import Scheduler, SchedulerOutput

_count = iter(range(10_000))


def _req(rid: str, n: int, max_tokens: int = 8, base: int = 0) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=[base + i for i in range(n)],
        params=SamplingParams(max_tokens=max_tokens),
        eos_token_ids=frozenset(),
        arrival_index=next(_count),
    )


def _finish_step(sched: Scheduler, out: SchedulerOutput, token: int = 7) -> None:
    """What the engine does after a forward pass: advance the requests, append a sampled token."""
    sched.update(out)
    for c in out.chunks:
        if c.samples:
            c.request.token_ids.append(token)


def _pool(num_blocks: int, block_size: int = 4, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(
        PoolConfig(num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=caching)
    )


def test_token_budget_and_chunked_prefill() -> None:
    sched = Scheduler(_pool(64), max_num_batched_tokens=10, max_num_seqs=8)
    a, b = _req("a", 13), _req("b", 5, base=100)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [("a", 0, 10)]
    assert not out.chunks[0].samples
    _finish_step(sched, out)
    out = sched.schedule()
    # a finishes its prompt (3 tokens, samples), b gets the remaining 7 of the budget: all 5.
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [
        ("a", 10, 3),
        ("b", 0, 5),
    ]
    assert all(c.samples for c in out.chunks)
    assert out.chunks[0].slot_mapping == sched.kv.slot_mapping("a", 10, 13)
    _finish_step(sched, out)
    out = sched.schedule()
    assert [(c.request.request_id, c.num_new_tokens) for c in out.chunks] == [("a", 1), ("b", 1)]
    sched.kv.check_integrity()


def test_prefix_reuse_schedules_only_uncached_tokens() -> None:
    sched = Scheduler(_pool(64), max_num_batched_tokens=64, max_num_seqs=8)
    first = _req("first", 10)
    sched.add(first)
    out = sched.schedule()
    _finish_step(sched, out)
    sched.finish(first, "stop")
    second = _req("second", 11)  # same first 10 tokens
    sched.add(second)
    out = sched.schedule()
    (chunk,) = out.chunks
    assert second.num_cached_tokens == 8  # two full blocks of 4
    assert (chunk.start, chunk.num_new_tokens) == (8, 3)


def test_max_num_seqs_limits_running() -> None:
    sched = Scheduler(_pool(64), max_num_batched_tokens=100, max_num_seqs=2)
    for i in range(3):
        sched.add(_req(f"r{i}", 4, base=10 * i))
    out = sched.schedule()
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    assert len(sched.waiting) == 1


def test_preemption_takes_youngest_and_recomputes() -> None:
    # 6 blocks of 4 = 24 slots; three requests of 7 tokens take 2 blocks each.
    sched = Scheduler(_pool(6, caching=False), max_num_batched_tokens=100, max_num_seqs=8)
    reqs = [_req(f"r{i}", 7, base=10 * i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    assert len(out.chunks) == 3 and sched.kv.num_free_blocks == 0
    _finish_step(sched, out)  # each now has 8 tokens, 7 computed: the next one fits in place
    out = sched.schedule()
    assert not out.preempted
    _finish_step(sched, out)  # 9 tokens, 8 computed: each needs a third block
    out = sched.schedule()
    youngest = reqs[2]
    assert out.preempted == [youngest]
    assert youngest.status is RequestStatus.PREEMPTED and youngest.num_computed_tokens == 0
    assert sched.waiting[0] is youngest
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1"]
    _finish_step(sched, out)
    sched.finish(reqs[0], "length")
    out = sched.schedule()
    # The preempted request comes back and recomputes prompt + its earlier outputs.
    back = [c for c in out.chunks if c.request is youngest]
    assert back and back[0].start == 0 and back[0].num_new_tokens == youngest.num_tokens
    sched.kv.check_integrity()


def test_pool_none_keeps_request_waiting() -> None:
    sched = Scheduler(_pool(3), max_num_batched_tokens=100, max_num_seqs=8)
    big = _req("big", 10)
    small = _req("small", 3, base=50)
    sched.add(big)
    sched.add(small)
    out = sched.schedule()
    assert [c.request.request_id for c in out.chunks] == ["big"]
    # The pool answered None for the small one: it stays queued, nothing allocated.
    assert list(sched.waiting) == [small]
    assert small.status is RequestStatus.WAITING


def test_a_request_admitted_later_in_the_step_shares_the_blocks_it_computes() -> None:
    sched = Scheduler(_pool(64), max_num_batched_tokens=100, max_num_seqs=8)
    a, b, other = _req("a", 40), _req("b", 40), _req("other", 12, base=500)
    for r in (a, b, other):
        sched.add(r)
    out = sched.schedule()
    # a's 10 full blocks are hashed when scheduled; b, admitted after it in the same step,
    # hits 9 of them (one token is always left to compute) and computes 4 tokens, not 40.
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [
        ("a", 0, 40), ("b", 36, 4), ("other", 0, 12)]
    assert b.num_cached_tokens == 36 and other.num_cached_tokens == 0
    assert out.chunks[1].block_table[:9] == out.chunks[0].block_table[:9]
    assert out.chunks[1].block_table[9] != out.chunks[0].block_table[9]
    # Committed at schedule time: the pool already counts the step's tokens as computed.
    assert sched.kv.num_computed_tokens("a") == 40 and a.num_computed_tokens == 0
    _finish_step(sched, out)
    assert a.num_computed_tokens == b.num_computed_tokens == 40
    sched.kv.check_integrity()


def test_a_chunked_prompt_shares_only_what_this_step_computes() -> None:
    sched = Scheduler(_pool(64), max_num_batched_tokens=24, max_num_seqs=8)
    a, b = _req("a", 40), _req("b", 40)
    sched.add(a)
    out = sched.schedule()  # a's first 24 tokens
    _finish_step(sched, out)
    sched.add(b)
    out = sched.schedule()
    # a computes its last 16 tokens; b finds the 6 blocks computed so far plus the 4 a fills
    # in this step (9 blocks; one token is always left to compute) and computes its last 4.
    assert [(c.request.request_id, c.start, c.num_new_tokens) for c in out.chunks] == [
        ("a", 24, 16), ("b", 36, 4)]
    sched.kv.check_integrity()


def test_pending_tokens_are_scheduled_as_placeholders_and_hashed_once_known() -> None:
    """Asynchronous scheduling: a token still on the device is the next chunk (a
    placeholder); its block is hashed only by commit_known, after the token lands."""
    kv = _pool(64)
    sched = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64)
    a = _req("a", 7, max_tokens=3)
    sched.add(a)
    first = sched.schedule()
    assert [(c.num_new_tokens, c.samples, c.placeholder) for c in first.chunks] == [
        (7, True, False)
    ]
    sched.update(first)
    a.num_pending_tokens = 1  # sampled on the device, not known yet
    second = sched.schedule()
    (chunk,) = second.chunks
    assert (chunk.start, chunk.num_new_tokens, chunk.samples, chunk.placeholder) == (7, 1, True, True)
    assert len(kv.cached_block_hashes()) == 1  # block 1 (tokens 4..7) waits for token 7
    sched.update(second)
    a.num_pending_tokens = 2
    a.token_ids.append(70)  # step 1's token lands
    a.num_pending_tokens -= 1
    sched.commit_known(a)
    assert len(kv.cached_block_hashes()) == 2
    (third,) = sched.schedule().chunks  # position 8: token 2 still pending
    assert (third.start, third.placeholder) == (8, True)
    sched.update(SchedulerOutput([third], []))
    a.num_pending_tokens = 2
    a.token_ids.append(71)
    a.num_pending_tokens -= 1
    # 2 known outputs + 1 pending = max_tokens: nothing left to compute for it.
    assert sched.schedule().chunks == []
    # A request preempted with a token in flight waits for it before re-admission.
    b = _req("b", 5, max_tokens=8, base=100)
    sched.add(b)
    sched.update(sched.schedule())
    b.num_pending_tokens = 1
    sched._preempt(b)
    assert sched.schedule().chunks == [] and b in sched.waiting
    b.token_ids.append(72)
    b.num_pending_tokens = 0
    (again,) = sched.schedule().chunks
    assert (again.request, again.placeholder, again.end) == (b, False, 6)
