"""The tinyserve Select from request bytes to answer bytes in one compiled call.

    raw SelectRequest ──scan──> fields, hashes                      wire._scan
        ──check──> the cases Python must handle -> FALLBACK, nothing mutated
        ──resolve──> candidate slots, origin node code              wire_ids.find
        ──rank + route──> ranked rows, pending marks, access bump   select_kernel.select_bound
        ──encode──> SelectResponse bytes in ``out``                 (ids copied per slot)

It answers exactly what ``wire.decode_select`` -> ``SelectorCore.select`` ->
``wire.encode_select`` answers for the tinyserve policy's fast path, byte for byte
(tests/cluster/test_selector_wire_fused.py). What it does not cover it refuses before
changing anything (``FALLBACK``), and the caller runs that path instead, which then gives the
same answer or raises the same error as always: malformed bytes, a prompt or candidate list
over its limit, any id or name that is empty where required, longer than ``MAX_ID_CHARS`` or
not ASCII (NOTE: ASCII only, so the UTF-8 checks and the character counts of
``convert.check_id`` need no code here), a policy other than the fused one.
``NEED_ROOM``: the caller's buffers are too small for this request (nothing mutated either):
grow them and call again.

NOTE: why: the sixth pass (benchmarks/README.md) measured ~80 us of cold Python per Select
around ~95 us of kernel (decode, the glue around the kernel, ``core.select``'s book-keeping,
the route, Prometheus, encode); this leaves the caller a lock, a few counts and a copy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba.core import types
from numba.experimental import structref

from cluster.selector.convert import MAX_ID_CHARS
from cluster.selector.index_kernels import _jit
from cluster.selector.select_kernel import BOUND_ARGS, RESULT_COLS, select_bound
from cluster.selector.wire import _OK as _SCAN_OK
from cluster.selector.wire import _scan
from cluster.selector.wire_ids import find

# statuses
OK, FALLBACK, NEED_ROOM = 0, 1, 2
# info[] entries the kernel writes for the caller
INFO = ("status", "r", "winner_slot", "matched", "unknown", "out_len", "deadlines_created",
        "pending_rows_created", "access_created", "access_reused", "expired_pairs",
        "expired_rows", "request_id_at", "request_id_len", "num_prompt_tokens", "speculative",
        "num_candidates", "num_output_tokens", "num_hashes")  # fmt: skip
# tally[] entries (cumulative, the caller folds them into counters and metrics)
TALLY = ("selects", "unknown_replica")
# NOTE: per answered row beyond the id field: tags and lengths (<= 8), score (9), terms
# (11 x 9 + two varint fields <= 22)
ROW_BYTES = 140
_LAST = len(RESULT_COLS)  # result column of the candidate index


@_jit
def _ascii(buf: Any, off: int, ln: int) -> bool:
    """``convert.check_id``'s length limit and plain ASCII (so UTF-8 and short enough)."""
    if ln > MAX_ID_CHARS:
        return False
    for i in range(off, off + ln):  # noqa: SIM110 (NOTE: see wire_ids._same)
        if buf[i] >= 0x80:
            return False
    return True


@_jit
def _put_varint(out: Any, pos: int, v: int) -> int:
    while v >= 0x80:
        out[pos] = (v & 0x7F) | 0x80
        v >>= 7
        pos += 1
    out[pos] = v
    return pos + 1


@_jit
def _put_tagged(out: Any, pos: int, tag: int, v: int) -> int:
    """A one-byte field tag and a varint (a varint field's value or a length prefix)."""
    out[pos] = tag
    return _put_varint(out, pos + 1, v)


@_jit
def _varint_len(v: int) -> int:
    n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


@_jit
def _put_double(out: Any, pos: int, tag: int, x: float, dbl: Any, dbl_bits: Any) -> int:
    """A one-byte field tag and ``x`` as fixed64 (``dbl_bits``: ``dbl`` viewed as uint64).
    NOTE: byte by byte: a slice assignment of 8 bytes cost ~20 ns, 48 of them an answer."""
    out[pos] = tag
    dbl[0] = x
    v = dbl_bits[0]
    for b in range(8):
        out[pos + 1 + b] = (v >> np.uint64(8 * b)) & np.uint64(0xFF)
    return pos + 9


@_jit
def _encode(out: Any, policy: Any, result: Any, r: int, slots: Any, id_flat: Any, id_at: Any,
            num_blocks: int, unknown: int) -> int:  # fmt: skip
    """``wire.encode_select`` of the ranked rows ``result[:r]`` into ``out``; returns the
    length. Replica ids come pre-encoded per slot (``wire_ids``)."""
    dbl = np.empty(1, np.float64)
    dbl_bits = dbl.view(np.uint64)
    pos = 0
    if policy.shape[0]:
        pos = _put_tagged(out, 0, 0x0A, policy.shape[0])
        out[pos : pos + policy.shape[0]] = policy
        pos += policy.shape[0]
    for i in range(r):
        s = slots[int(result[i, _LAST])]
        m, p = int(result[i, 11]), int(result[i, 12])
        terms = 99
        if m:
            terms += 1 + _varint_len(m)
        if p:
            terms += 1 + _varint_len(p)
        field, head = id_at[s, 0], id_at[s, 1] + id_at[s, 2]
        inner = head + 9 + 1 + _varint_len(terms) + terms
        pos = _put_tagged(out, pos, 0x12, inner)
        out[pos : pos + head] = id_flat[field : field + head]
        pos = _put_double(out, pos + head, 0x11, result[i, 13], dbl, dbl_bits)
        pos = _put_tagged(out, pos, 0x1A, terms)
        for c in range(11):
            pos = _put_double(out, pos, ((c + 1) << 3) | 1, result[i, c], dbl, dbl_bits)
        if m:
            pos = _put_tagged(out, pos, 0x60, m)
        if p:
            pos = _put_tagged(out, pos, 0x68, p)
    if num_blocks:
        pos = _put_tagged(out, pos, 0x18, num_blocks)
    if unknown:
        pos = _put_tagged(out, pos, 0x20, unknown)
    return pos


@_jit
def select_wire(
    raw: Any, now: float, ttl_s: float, use_cpu: bool, use_pending: bool, max_expire: int,
    max_prompt_blocks: int, cfg: Any, policy: Any, default_policy: bool, defer: bool,
    fields: Any, cands: Any, live_slots: Any, live_words: Any, id_flat: Any, id_at: Any,
    id_tab: Any, node_flat: Any, node_at: Any, node_tab: Any, max_field: int, out: Any,
    info: Any, tally: Any, deferred: Any,
    gpu: Any, gover: Any, gbits: int, cpu: Any, cover: Any, cbits: int, pend: Any, pover: Any,
    postate: Any, pbits: int,
    acc_keys: Any, acc_slots: Any, acc_vt: Any, acc_bits: int, rate: float,
    tab_ints: Any, tab_floats: Any, node_of_slot: Any,
    dl_keys: Any, dl_slots: Any, dl_dl: Any, dl_bits: int,
    q_dl: Any, q_meta: Any, q_ring: Any, q_state: Any, num_pending: Any,
    match: Any, result: Any, top: Any, stats: Any, sink: Any,
) -> int:  # fmt: skip
    """One Select on ``raw`` (module docstring); returns the status, also in ``info[0]``.

    ``policy``: the fused policy's name as bytes; ``default_policy``: an empty policy field
    means it. ``live_slots`` / ``live_words``: the candidates when none are named
    (``ReplicaTable.live``, its mask as walk words). ``fields`` / ``cands``: ``wire._scan``'s
    scratch. The arrays after ``deferred`` are ``select_kernel.BOUND_ARGS``; the caller has
    reserved room for a speculative mark of up to min(len(raw), max_prompt_blocks) hashes.
    With ``defer`` the winner's mark and access bump are not made: its hashes are copied to
    ``deferred`` (room for min(len(raw), max_prompt_blocks)) for ``select_kernel.route``.
    On OK: ``out[:info[5]]`` is the answer, ``info`` the rest of ``INFO`` for the caller's
    book-keeping (``ROUTE_STATS``, the winner, the request id's span in ``raw``), ``tally``
    counted. Otherwise nothing but ``fields``, ``cands`` and ``info`` was written."""
    info[:] = 0
    info[0] = FALLBACK
    status, n, hashes = _scan(raw, fields, cands)
    if status != _SCAN_OK or n > max_prompt_blocks:
        return FALLBACK
    nc = fields[12]
    if 2 * nc > cands.shape[0]:
        return FALLBACK
    for f in (1, 5, 7, 10):
        if not _ascii(raw, fields[2 * f], fields[2 * f + 1]):
            return FALLBACK
    pl = fields[15]
    if pl == 0:
        if not default_policy:
            return FALLBACK
    elif pl != policy.shape[0]:
        return FALLBACK
    else:
        for i in range(pl):
            if raw[fields[14] + i] != policy[i]:
                return FALLBACK
    for c in range(nc):
        off, ln = cands[2 * c], cands[2 * c + 1]
        if ln == 0 or not _ascii(raw, off, ln):
            return FALLBACK
    # resolve (read only)
    unknown = 0
    if nc == 0:
        slots = live_slots
        words = live_words
    else:
        found = np.empty(nc, np.int64)
        words = np.zeros(live_words.shape[0], np.uint64)
        n_known = 0
        for c in range(nc):
            s = find(id_tab, id_flat, id_at, 1, raw, cands[2 * c], cands[2 * c + 1])
            if s < 0:
                unknown += 1
            else:
                found[n_known] = s
                n_known += 1
                words[s >> 6] |= np.uint64(1) << np.uint64(s & 63)
        slots = found[:n_known]
    origin = -1
    if fields[21]:
        origin = find(node_tab, node_flat, node_at, 0, raw, fields[20], fields[21])
        if origin < 0:
            origin = -2  # NOTE: ``ReplicaTable.node_code``: a node no replica is on
    k = int(fields[16])
    rows = slots.shape[0] if k <= 0 or k >= slots.shape[0] else k
    if (slots.shape[0] > top.shape[0]
            or 32 + policy.shape[0] + rows * (max_field + ROW_BYTES) > out.shape[0]):  # fmt: skip
        info[0] = NEED_ROOM
        info[16] = slots.shape[0]
        return NEED_ROOM
    # rank and route (mutates the index, the access table and the load columns)
    npt, nout, speculative = int(fields[6]), int(fields[8]), fields[18] == 0
    q = 1.0 - math.exp(-npt / cfg[3])  # NOTE: objective_kernel.complexity; cfg[3] = q_scale
    deadline = now + ttl_s if ttl_s > 0 else math.nan
    ret = select_bound(
        hashes[:n], words, slots, origin, npt, nout, q, k, now, deadline, use_cpu, use_pending,
        speculative, defer, max_expire, cfg, gpu, gover, gbits, cpu, cover, cbits, pend, pover,
        postate, pbits, acc_keys, acc_slots, acc_vt, acc_bits, rate, tab_ints, tab_floats,
        node_of_slot, dl_keys, dl_slots, dl_dl, dl_bits, q_dl, q_meta, q_ring, q_state, num_pending,
        match, result, top, stats, sink,
    )  # fmt: skip
    r = ret[0]
    if defer and speculative and r > 0:
        deferred[:n] = hashes[:n]
    info[0], info[1], info[4] = OK, r, unknown
    if r > 0:
        info[2], info[3] = slots[top[0]], int(result[0, 11])
    for i in range(6):
        info[6 + i] = ret[1 + i]
    info[12], info[13] = fields[2], fields[3]
    info[14], info[15], info[16], info[17] = npt, 1 if speculative else 0, slots.shape[0], nout
    info[18] = n
    info[5] = _encode(out, policy, result, r, slots, id_flat, id_at, n, unknown)
    tally[0] += 1
    tally[1] += unknown
    return OK


@structref.register
class _BindingType(types.StructRef):
    def preprocess_fields(self, fields: Any) -> Any:
        return tuple((name, types.unliteral(t)) for name, t in fields)  # type: ignore[no-untyped-call]


class Binding(structref.StructRefProxy):
    """``select_wire``'s arguments after ``defer`` (``BINDING``) as one value.
    NOTE: numba checks each argument's type on every call: ~5 us for the 48 of them
    (benchmarks/README.md, "Ninth pass"), ~1 us for this one."""


BINDING = ("fields", "cands", "live_slots", "live_words", "id_flat", "id_at", "id_tab",
           "node_flat", "node_at", "node_tab", "max_field", "out", "info", "tally", "deferred",
           *BOUND_ARGS)  # fmt: skip
structref.define_proxy(Binding, _BindingType, list(BINDING))  # type: ignore[no-untyped-call]


@_jit
def select_wire_bound(
    raw: Any, now: float, ttl_s: float, use_cpu: bool, use_pending: bool, max_expire: int,
    max_prompt_blocks: int, cfg: Any, policy: Any, default_policy: bool, defer: bool, b: Any,
) -> int:  # fmt: skip
    """``select_wire`` with its bound arguments in ``b`` (a ``Binding``)."""
    return select_wire(
        raw, now, ttl_s, use_cpu, use_pending, max_expire, max_prompt_blocks, cfg, policy,
        default_policy, defer, b.fields, b.cands, b.live_slots, b.live_words, b.id_flat, b.id_at,
        b.id_tab, b.node_flat, b.node_at, b.node_tab, b.max_field, b.out, b.info, b.tally,
        b.deferred, b.gpu, b.gover, b.gbits, b.cpu, b.cover, b.cbits, b.pend, b.pover, b.postate,
        b.pbits,
        b.acc_keys, b.acc_slots, b.acc_vt, b.acc_bits, b.rate, b.tab_ints, b.tab_floats,
        b.node_of_slot, b.dl_keys, b.dl_slots, b.dl_dl, b.dl_bits, b.q_dl, b.q_meta, b.q_ring,
        b.q_state, b.num_pending, b.match, b.result, b.top, b.stats, b.sink,
    )  # fmt: skip
