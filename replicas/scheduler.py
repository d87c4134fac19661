"""Scheduler: continuous batching with a token budget, chunked prefill and prefix reuse.

One ``schedule()`` call decides one engine step::

    budget = max_num_batched_tokens
    1. running requests, oldest first: each gets min(uncomputed tokens, budget) tokens
       (1 for a decoding request, a chunk for one still prefilling). When the pool answers
       None, the YOUNGEST running request not yet scheduled this step is preempted (its
       blocks freed, num_computed_tokens -> 0, back to the head of the queue) and the
       allocation retried; if the victim is the request itself, scheduling stops.
    2. waiting requests, FCFS, while budget, max_num_seqs and the pool allow (not in a step
       that preempted): prefix lookup -> allocate_slots(prefix) -> only the uncached tokens
       are scheduled. The pool's None means "not now": the request stays queued.

Every chunk is committed to the pool when it is scheduled (its full blocks hashed and
cached), not after the forward pass, as vLLM v1's ``KVCacheManager.allocate_slots`` caches up
to computed + new tokens. The attention writes all of a step's K/V before any row reads it
(``replicas.attention``), so a request admitted later in the same step reuses blocks this
step computes: parallel samples or a burst on one cold system prompt compute it once, in one
step. A failed step therefore leaves hashes over unwritten K/V: the async engine aborts
everything and resets the prefix cache (``replicas.engine``).

The returned chunks carry block tables and slot mappings copied out of the pool, so the model
runner never touches the pool. ``update`` advances the requests after the forward pass.

Asynchronous scheduling (``replicas.async_scheduling``): a request's token sampled by the step
still in flight is pending (``Request.num_pending_tokens``); its next chunk is that one token,
marked ``placeholder`` (the runner takes its id from the device). Its block is hashed once the
token is known (``commit_known``), so a hash never covers a token that is later discarded. A
request certain to end by length once its pending token lands is not scheduled again, and a
waiting (preempted) request with a pending token waits until the token is known.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

from kvmanager.manager import KVCacheManager
from replicas.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledChunk:
    """Tokens ``[start, start + num_new_tokens)`` of ``request`` are computed this step.

    ``samples``: the chunk reaches the request's last token, so its logits give the next one.
    ``placeholder``: the chunk's one token is pending (sampled on the device by the step in
    flight); its id is not in ``request.token_ids`` yet. Both are fixed when scheduled (the
    request moves on while the step runs)."""

    request: Request
    start: int
    num_new_tokens: int
    block_table: list[int]
    slot_mapping: list[int]
    samples: bool = True
    placeholder: bool = False

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class Scheduler:
    """Owns the waiting queue and the running list; the pool is shared with nobody else."""

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int | None = None,
    ) -> None:
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        # NOTE: kept sorted by arrival_index, so the tail is always the youngest.
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def finish(self, request: Request, reason: str) -> None:
        """Mark finished, release its blocks (cached ones stay reusable), drop it."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self.kv.free(request.request_id)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.kv.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int, int]] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending_tokens and self._ends_by_length(req):
                i += 1  # NOTE: its pending token is its last: computing past it is waste
                continue
            n = min(req.num_tokens + req.num_pending_tokens - req.num_computed_tokens, budget)
            assert n > 0, f"running request {req.request_id} has nothing to compute"
            while self.kv.allocate_slots(req.request_id, req.token_ids, n) is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.PREEMPTED:
                break
            self._schedule(scheduled, req, n)
            budget -= n
            i += 1
        now = time.monotonic()
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            req = self.waiting[0]
            if req.num_pending_tokens:
                break  # NOTE: preempted in flight: re-admitted once its token is known
            rid = req.request_id
            hit = self.kv.lookup_prefix(req.token_ids)
            n = min(req.num_tokens - hit.num_cached_tokens, budget)
            expected = req.num_prompt_tokens + req.params.max_tokens
            if (
                self.kv.allocate_slots(rid, req.token_ids, n, hit, expected_num_tokens=expected)
                is None
            ):
                break
            self.waiting.popleft()
            # NOTE: the pool re-validates the hit; its own count is the truth.
            req.num_computed_tokens = self.kv.num_computed_tokens(rid)
            if req.num_cached_tokens is None:
                req.num_cached_tokens = req.num_computed_tokens
                req.first_scheduled_time = now
            req.status = RequestStatus.RUNNING
            keys = [r.arrival_index for r in self.running]
            self.running.insert(bisect.bisect(keys, req.arrival_index), req)
            n = min(n, req.num_tokens - req.num_computed_tokens)
            self._schedule(scheduled, req, n)
            budget -= n
        chunks = [
            ScheduledChunk(
                request=req,
                start=start,
                num_new_tokens=n,
                block_table=self.kv.block_table(req.request_id),
                slot_mapping=self.kv.slot_mapping(req.request_id, start, start + n),
                samples=start + n == req.num_tokens + req.num_pending_tokens,
                placeholder=start + n > req.num_tokens,
            )
            for req, start, n in scheduled
        ]
        return SchedulerOutput(chunks=chunks, preempted=preempted)

    def _ends_by_length(self, req: Request) -> bool:
        """True when the request's pending tokens reach max_tokens or max_model_len."""
        total = req.num_tokens + req.num_pending_tokens
        if self.max_model_len is not None and total >= self.max_model_len:
            return True
        return total - req.num_prompt_tokens >= req.params.max_tokens

    def commit_known(self, req: Request) -> None:
        """Hash the blocks that ``req``'s newly known tokens complete (asynchronous
        scheduling: ``schedule`` committed past the pending token; see the module)."""
        if req.status is RequestStatus.RUNNING:
            self.kv.commit(req.request_id, req.token_ids, req.num_computed_tokens)

    def _schedule(self, scheduled: list[tuple[Request, int, int]], req: Request, n: int) -> None:
        """Add ``req``'s next ``n`` tokens to this step and commit them to the pool now (see the
        module docstring: later admissions of this step may hit the blocks they fill)."""
        start = req.num_computed_tokens
        scheduled.append((req, start, n))
        self.kv.commit(req.request_id, req.token_ids, start + n)

    def update(self, output: SchedulerOutput) -> None:
        """After the forward pass: the chunks' tokens now hold K/V (committed in schedule)."""
        for chunk in output.chunks:
            chunk.request.num_computed_tokens = chunk.end
