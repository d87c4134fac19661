"""One compiled call from a Select's block hashes to its ranked rows (the core's fast path).

    (first: up to N due pending marks expire                         pending_queue.expire)
    hashes ──walk──> per-slot prefix (resident / +pending / host)   walk_kernel.walk
           ──hot───> per-candidate decayed access count              access.hot_of
           ──score──> out[OUT_ROWS, N]                               objective_kernel.score
           ──top k──> result[k, RESULT_COLS], top[k]                 (stable: ties keep
                                                                     candidate order)
    (then: the winner's pending marks, its queued mark, its access bump: ``rank_and_route``)

NOTE: before, a Select made ~6 compiled calls with numpy and Python glue between them (~35 us
of the ~80 us p50 at 256 replicas: zeroed outputs, the hash list converted twice, a dict walk
for the hotness, a full argsort, the answer assembled with numpy concatenations). Here the
glue is gone: the caller's buffers are reused and the answer comes out as rows in
``ScoreTerms`` field order, so building it is one ``tolist()``.

Adding a per-replica term to the score is a row in the replica table's ``floats`` and a line
in ``objective_kernel.score``; nothing here changes (the cached machine code of
this file embeds those kernels: ``kernel_cache`` rebuilds it when any source here changes).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np

from cluster.selector import objective_kernel as ok
from cluster.selector.access import bump_kernel, hot_of
from cluster.selector.index_kernels import _jit
from cluster.selector.pending_deadlines import _upsert as set_deadlines
from cluster.selector.pending_queue import _push as push
from cluster.selector.pending_queue import expire
from cluster.selector.pending_rows import mark
from cluster.selector.replica_table import _INT_COLS
from cluster.selector.types import ScoreTerms
from cluster.selector.walk_kernel import walk

# result columns: ScoreTerms fields in declaration order, then the score
RESULT_COLS = (*(f.name for f in fields(ScoreTerms)), "score")
assert RESULT_COLS[:11] == (
    "utility", "cost", "reward", "size_cost", "load_cost", "latency_cost",
    "fragmentation_cost", "complexity", "frequency", "similarity", "locality",
) and RESULT_COLS[11:13] == ("num_matched_blocks", "num_pending_blocks")  # fmt: skip
# NOTE: for each OUT_ROWS row but the score, its RESULT_COLS column (a global tuple: numba
# freezes it into the kernel, one argument fewer to check per call)
_OUT_MAP = tuple(RESULT_COLS.index(name) for name in ok.OUT_ROWS[:-1])


@_jit
def _top(score: Any, k: int, top: Any) -> int:
    """Indices of the ``k`` best scores into ``top`` (all when k <= 0 or k >= n), best first,
    ties in index order (the same order as a stable argsort of ``-score``).
    NOTE: one pass keeping the k best so far (insertion into ``top[:k]``): n comparisons
    where k selection passes made k n (256 candidates, k = 4: 0.52 -> 0.23 us). A NaN
    score takes the passes (``_top_passes``), whose order for it is its own."""
    n = score.shape[0]
    if k <= 0 or k >= n:
        top[:n] = np.argsort(-score, kind="mergesort")
        return int(n)
    m = 0
    for j in range(n):
        x = score[j]
        if x != x:
            return _top_passes(score, k, top)
        # NOTE: -x < -y, not x > y: the comparison of the passes and the argsort
        if m == k and not -x < -score[top[k - 1]]:
            continue
        p = min(m, k - 1)
        while p > 0 and -x < -score[top[p - 1]]:
            top[p] = top[p - 1]
            p -= 1
        top[p] = j
        m = min(m + 1, k)
    return k


@_jit
def _top_passes(score: Any, k: int, top: Any) -> int:
    """``_top`` for 0 < k < n by k selection passes (any scores, NaN too)."""
    n = score.shape[0]
    taken = np.zeros(n, np.bool_)
    for r in range(k):
        best = -1
        for j in range(n):
            # NOTE: -x < -y, not x > y: the same comparison the argsort makes (NaN last)
            if not taken[j] and (best < 0 or -score[j] < -score[best]):
                best = j
        taken[best] = True
        top[r] = best
    return k


@_jit
def rank(
    hashes: Any, gpu: Any, gover: Any, gbits: int, cpu: Any, cover: Any, cbits: int,
    use_cpu: bool, pend: Any, pover: Any,
    pbits: int, use_pending: bool, dl_keys: Any, dl_slots: Any, dl_dl: Any, dl_bits: int,
    cand: Any, match: Any,
    acc_keys: Any, acc_slots: Any, acc_vt: Any, acc_bits: int, now: float, rate: float,
    slots: Any, tab_ints: Any, tab_floats: Any, node_of_slot: Any, origin: int,
    cfg: Any, req: Any, q: float, k: int, result: Any, top: Any, sink: Any,
) -> int:  # fmt: skip
    """Rank the candidates at ``slots`` (their bits set in ``cand``) for one request.

    Mutates only the scratch ``match`` [3, >= 64·words] (per-slot resident / both / host
    prefix lengths) and the outputs: ``top[:r]`` = candidate indices best first and
    ``result[:r]`` = their ``RESULT_COLS``. Returns r (``k``, or every candidate when
    ``k <= 0``). ``origin`` is the request's node code (-1: none given); a candidate is on the
    same node when ``node_of_slot[slot] == origin``. ``sink``: see ``index_kernels.touch``.
    ``dl_*``: the pending marks' deadlines (a mark due by ``now`` does not count, see
    ``walk_kernel.walk``)."""
    n = slots.shape[0]
    match[:] = 0
    walk(hashes, gpu, gover, gbits, cpu, cover, cbits, use_cpu, pend, pover, pbits, use_pending,
         dl_keys, dl_slots, dl_dl, dl_bits, now, cand, match[0], match[1], match[2],
         sink)  # fmt: skip
    hot = np.empty(n)
    same = np.zeros(n)
    for j in range(n):
        s = slots[j]
        m = match[0, s]
        # NOTE: the call only where something matched: passing its four arrays costs ~45 ns
        # (reference counts), 12 us over 256 candidates of which ~2 match.
        hot[j] = 0.0
        if m > 0:
            hot[j] = hot_of(acc_keys, acc_slots, acc_vt, acc_bits, hashes, m, s, now, rate)
        if origin >= 0 and node_of_slot[s] == origin:
            same[j] = 1.0
    out = np.empty((len(ok.OUT_ROWS), n))
    ok.score(slots, match[0], match[1], match[2], hot, same, tab_ints, tab_floats, cfg, req, q,
             out)  # fmt: skip
    r = _top(out[10], k, top)
    for i in range(r):
        j = top[i]
        s = slots[j]
        for c in range(len(_OUT_MAP)):
            result[i, _OUT_MAP[c]] = out[c, j]
        result[i, 2] = tab_floats[3, s]  # reward
        result[i, 11] = match[0, s]  # num_matched_blocks
        result[i, 12] = match[1, s] - match[0, s]  # num_pending_blocks
        result[i, 13] = out[10, j]  # score
    return r


# stats written by ``rank_and_route`` (ROUTE_STATS entries)
ROUTE_STATS = ("deadlines_created", "pending_rows_created", "access_created", "access_reused",
               "expired_pairs", "expired_rows")  # fmt: skip


@_jit
def rank_and_route(
    hashes: Any, gpu: Any, gover: Any, gbits: int, cpu: Any, cover: Any, cbits: int,
    use_cpu: bool, pend: Any, pover: Any, postate: Any,
    pbits: int, use_pending: bool, cand: Any, match: Any,
    acc_keys: Any, acc_slots: Any, acc_vt: Any, acc_bits: int, now: float, rate: float,
    slots: Any, tab_ints: Any, tab_floats: Any, node_of_slot: Any, origin: int,
    cfg: Any, req: Any, q: float, k: int, result: Any, top: Any, sink: Any,
    speculative: bool, deadline: float, dl_keys: Any, dl_slots: Any, dl_dl: Any, dl_bits: int,
    q_dl: Any, q_meta: Any, q_ring: Any, q_state: Any, num_pending: Any, max_expire: int,
    stats: Any, defer: bool,
) -> int:  # fmt: skip
    """The core's whole fast-path Select in one call: the bounded expiry of due pending marks
    (at most ``max_expire`` marks, as ``pending_queue.expire``; 0: none), ``rank``, then the
    winner's speculative insert (the core's ``_route`` minus its Python-side book-keeping):
    with ``speculative`` (and r > 0), the winner's unmatched blocks ``hashes[matched:]`` get
    pending marks due at ``deadline`` (skipped when ``deadline`` is NaN: a zero TTL), counted
    in ``num_pending`` and queued (``q_*``, ``pending_queue``), and an access at every
    checkpoint of ``hashes`` (``route``; with ``defer`` left to the caller, which makes that
    call later: see ``SelectorCore.select_wire``).

    The caller must have reserved room for ``len(hashes)`` new pending rows (and free
    overflow rows), deadlines and queued hashes (one more queued mark) and for
    ``bit_length(len(hashes))`` access entries (no table grows here). Writes ``stats``
    (``ROUTE_STATS``) so the caller updates its counts; returns r as ``rank``.
    NOTE: one call instead of three (expiry, ranking, queueing the mark): each Python-side
    step cost 1-3 us of argument checking and numpy scalar arithmetic."""
    stats[:] = 0
    if max_expire != 0:
        stats[4], stats[5] = expire(q_dl, q_meta, q_ring, q_state, now, max_expire, dl_keys,
                                    dl_slots, dl_dl, dl_bits, pend, pover, postate, pbits,
                                    num_pending, sink)  # fmt: skip
    r = rank(hashes, gpu, gover, gbits, cpu, cover, cbits, use_cpu, pend, pover, pbits,
             use_pending, dl_keys, dl_slots, dl_dl, dl_bits, cand, match,
             acc_keys, acc_slots, acc_vt, acc_bits, now, rate, slots, tab_ints, tab_floats,
             node_of_slot, origin, cfg, req, q, k, result, top, sink)  # fmt: skip
    if not speculative or r == 0 or defer:
        return r
    route(hashes, slots[top[0]], int(result[0, 11]), now, deadline, 0, pend, pover, postate,
          pbits, acc_keys, acc_slots, acc_vt, acc_bits, rate, dl_keys, dl_slots, dl_dl, dl_bits,
          q_dl, q_meta, q_ring, q_state, num_pending, stats, sink)  # fmt: skip
    return r


@_jit
def route(
    hashes: Any, s: int, matched: int, now: float, deadline: float, max_expire: int, pend: Any,
    pover: Any, postate: Any, pbits: int,
    acc_keys: Any, acc_slots: Any, acc_vt: Any, acc_bits: int, rate: float,
    dl_keys: Any, dl_slots: Any, dl_dl: Any, dl_bits: int,
    q_dl: Any, q_meta: Any, q_ring: Any, q_state: Any, num_pending: Any, stats: Any, sink: Any,
) -> None:  # fmt: skip
    """A winner's speculative insert: first the bounded expiry of marks due by ``now`` (at
    most ``max_expire``, as ``rank_and_route``'s; 0: none, ``stats[4:6]`` untouched), then
    slot ``s``'s pending marks on ``hashes[matched:]`` due at ``deadline`` (none when NaN),
    counted in ``num_pending`` and queued, and an access at every checkpoint of ``hashes``;
    ``stats[:4]`` = its ``ROUTE_STATS`` (the caller reserved room, as for
    ``rank_and_route``)."""
    if max_expire != 0:
        stats[4], stats[5] = expire(q_dl, q_meta, q_ring, q_state, now, max_expire, dl_keys,
                                    dl_slots, dl_dl, dl_bits, pend, pover, postate, pbits,
                                    num_pending, sink)  # fmt: skip
    tail = hashes[matched:]
    if tail.shape[0] and deadline == deadline:
        stats[0] = set_deadlines(dl_keys, dl_slots, dl_dl, dl_bits, tail, s, deadline, sink)
        _, stats[1] = mark(pend, pbits, pover, postate, tail, s, sink)
        num_pending[s] += stats[0]
        push(q_dl, q_meta, q_ring, q_state, deadline, s, tail)
    stats[2], stats[3] = bump_kernel(acc_keys, acc_slots, acc_vt, acc_bits, hashes, s, now, rate)


_QUEUED_TOKENS = _INT_COLS.index("num_queued_tokens")
_WAITING_REQS = _INT_COLS.index("num_waiting_reqs")
# NOTE: the arrays ``select_bound`` takes after its per-call arguments, in order: what
# ``Ranker`` binds once per ``generation.Generation`` (see ``BOUND_ARGS`` users).
BOUND_ARGS = ("gpu", "gover", "gbits", "cpu", "cover", "cbits", "pend", "pover", "postate",
              "pbits",
              "acc_keys", "acc_slots", "acc_vt", "acc_bits", "rate",
              "tab_ints", "tab_floats", "node_of_slot",
              "dl_keys", "dl_slots", "dl_dl", "dl_bits", "q_dl", "q_meta", "q_ring", "q_state",
              "num_pending", "match", "result", "top", "stats", "sink")  # fmt: skip


@_jit
def select_bound(
    hashes: Any, cand: Any, slots: Any, origin: int, num_prompt_tokens: int,
    num_output_tokens: int, q: float, k: int, now: float, deadline: float, use_cpu: bool,
    use_pending: bool, speculative: bool, defer: bool, max_expire: int, cfg: Any,
    gpu: Any, gover: Any, gbits: int, cpu: Any, cover: Any, cbits: int, pend: Any, pover: Any,
    postate: Any, pbits: int,
    acc_keys: Any, acc_slots: Any, acc_vt: Any, acc_bits: int, rate: float,
    tab_ints: Any, tab_floats: Any, node_of_slot: Any,
    dl_keys: Any, dl_slots: Any, dl_dl: Any, dl_bits: int,
    q_dl: Any, q_meta: Any, q_ring: Any, q_state: Any, num_pending: Any,
    match: Any, result: Any, top: Any, stats: Any, sink: Any,
) -> tuple[int, int, int, int, int, int, int]:  # fmt: skip
    """``rank_and_route`` with the per-call values first and the bound arrays after them
    (``BOUND_ARGS``), so the caller passes one cached tuple for the rest. The request's row
    (``objective_kernel``'s ``req``) is built here from ``len(hashes)``, the token counts and
    ``origin`` (-1: no origin node given). ``result`` has one column more than
    ``RESULT_COLS``: row i's candidate index (``top[i]``), so the answer is one ``tolist()``.
    With ``speculative`` it also adds the request's tokens and one waiting request to the
    winner's ``tab_ints`` columns (the caller then uses ``ReplicaTable.add_inflight_record``).
    Returns (r, *ROUTE_STATS) instead of leaving the stats for the caller to read."""
    req = np.empty(4)
    req[0] = hashes.shape[0]
    req[1] = num_prompt_tokens
    req[2] = num_output_tokens
    req[3] = 1.0 if origin != -1 else 0.0
    r = rank_and_route(
        hashes, gpu, gover, gbits, cpu, cover, cbits, use_cpu, pend, pover, postate, pbits,
        use_pending, cand, match, acc_keys, acc_slots, acc_vt, acc_bits, now, rate, slots,
        tab_ints, tab_floats, node_of_slot, origin, cfg, req, q, k, result, top, sink,
        speculative, deadline, dl_keys, dl_slots, dl_dl, dl_bits, q_dl, q_meta, q_ring, q_state,
        num_pending, max_expire, stats, defer,
    )  # fmt: skip
    last = len(RESULT_COLS)
    for i in range(r):
        result[i, last] = top[i]
    if speculative and r > 0:
        # NOTE: the winner's in-flight load (``ReplicaTable.add_inflight``'s columns)
        s = slots[top[0]]
        tab_ints[_QUEUED_TOKENS, s] += num_prompt_tokens + num_output_tokens
        tab_ints[_WAITING_REQS, s] += 1
    return (r, stats[0], stats[1], stats[2], stats[3], stats[4], stats[5])


_warm = False


def warm_up() -> None:
    """Compile (or load from numba's cache) ``rank`` once per process; idempotent."""
    global _warm
    if _warm:
        return
    from cluster.selector.holder_table import HolderTable

    tab = np.zeros((16, 2), np.uint64)
    over = np.zeros((1, 1), np.uint64)
    pend = HolderTable(bits=4)
    pend.reserve_overflow(4)
    h = np.arange(1, 4, dtype=np.uint64)
    slots = np.arange(2, dtype=np.int64)
    result = np.zeros((2, len(RESULT_COLS)))
    top = np.zeros(2, np.int64)
    for k in (0, 1):
        rank(h, tab, over, 4, tab, over, 4, True, tab, over, 4, True, np.zeros(16, np.uint64),
             np.zeros(16, np.int64), np.zeros(16), 4, np.ones(1, np.uint64),
             np.zeros((3, 64), np.int64), np.zeros(8, np.uint64), np.zeros(8, np.int64),
             np.zeros((2, 8)), 3, 0.0, 0.01, slots, np.ones((7, 2), np.int64), np.ones((5, 2)),
             np.zeros(2, np.int64), -1, np.ones(ok.CFG_LEN), np.ones(4), 0.5, k, result, top,
             np.zeros(1, np.uint64))  # fmt: skip
        for spec in (False, True):
            rank_and_route(
                h, tab, over, 4, tab, over, 4, True, pend.tab, pend.over, pend.ostate, 4, True,
                np.ones(1, np.uint64),
                np.zeros((3, 64), np.int64), np.zeros(8, np.uint64), np.zeros(8, np.int64),
                np.zeros((2, 8)), 3, 0.0, 0.01, slots, np.ones((7, 2), np.int64),
                np.ones((5, 2)), np.zeros(2, np.int64), -1, np.ones(ok.CFG_LEN), np.ones(4), 0.5,
                k, result, top, np.zeros(1, np.uint64), spec, 1.0, np.zeros(8, np.uint64),
                np.zeros(8, np.int64), np.zeros(8), 3, np.zeros(4), np.zeros((4, 3), np.int64),
                np.zeros(16, np.uint64), np.zeros(4, np.int64), np.zeros(2, np.int64), 8,
                np.zeros(len(ROUTE_STATS), np.int64), False,
            )  # fmt: skip
        for spec in (False, True):
            select_bound(
                h, np.ones(1, np.uint64), slots, -1, 48, 0, 0.5, k, 0.0, 1.0, True, True, spec,
                False, 8, np.ones(ok.CFG_LEN), tab, over, 4, tab, over, 4, pend.tab, pend.over,
                pend.ostate, 4,
                np.zeros(8, np.uint64), np.zeros(8, np.int64), np.zeros((2, 8)), 3, 0.01,
                np.ones((7, 2), np.int64), np.ones((5, 2)), np.zeros(2, np.int64),
                np.zeros(8, np.uint64), np.zeros(8, np.int64), np.zeros(8), 3, np.zeros(4),
                np.zeros((4, 3), np.int64), np.zeros(16, np.uint64), np.zeros(4, np.int64),
                np.zeros(2, np.int64), np.zeros((3, 64), np.int64),
                np.zeros((2, len(RESULT_COLS) + 1)), top, np.zeros(len(ROUTE_STATS), np.int64),
                np.zeros(1, np.uint64),
            )  # fmt: skip
    _warm = True
