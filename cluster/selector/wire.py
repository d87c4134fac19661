"""The Select RPC's wire codec: ``SelectRequest`` bytes -> (request, candidates, options) and
``Selection`` -> ``SelectResponse`` bytes, without protobuf message objects.

NOTE: why hand-rolled for this one method: it is the service's hot RPC and its request is
mostly one packed field (~128 varint block hashes). Parsed by protobuf, the hashes come out
as a container of Python ints that numpy then converts one by one; py-spy put request
decoding at ~19% of the Select handler in the serving process, the answer's proto objects at
~8%. Here one compiled scan decodes the varints straight into a uint64 array and the answer
is packed with ``struct``. Every other method keeps protobuf objects.

Protobuf parse semantics kept (tests/cluster/test_selector_wire.py compares with protobuf on
random messages, truncations and random bytes): fields in any order, last one wins for
singular fields, repeated fields accumulate, ``block_hashes`` packed or not (or both),
uint32 varints truncated to 32 bits, unknown fields and known fields of an unexpected wire
type skipped, strings must be UTF-8. One difference: a group (wire types 3 and 4, deprecated
since proto2, never produced for this message) is refused as malformed instead of skipped.
Answers are equal as messages, not byte for byte (zero-valued terms are written out).
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import numpy as np

from cluster.selector.convert import MAX_CANDIDATES, check_id
from cluster.selector.core_types import Selection
from cluster.selector.index_kernels import _jit
from cluster.selector.types import SelectionRequest

# status codes of _scan
_OK, _MALFORMED = 0, -1
_MAX_FIELD = (1 << 29) - 1  # protobuf's largest field number
# fields[] layout: for string field f (1, 5, 7, 10): [2f] offset, [2f + 1] length;
# for varint field f (3, 4, 8, 9): [2f] value; [12] number of candidate ids.
_NUM_FIELDS = 22
_MAX_GROUP_DEPTH = 100  # NOTE: protobuf's default recursion limit


class MalformedMessage(ValueError):
    """The bytes are not a SelectRequest (the servicer answers INVALID_ARGUMENT, counted as
    ``errors_total{kind="malformed"}``)."""


@_jit
def _varint(buf: Any, pos: int, end: int) -> tuple[Any, int]:
    """(value, next position); next position -1 when truncated or longer than 10 bytes."""
    out = np.uint64(0)
    shift = np.uint64(0)
    for _ in range(10):
        if pos >= end:
            return out, -1
        b = buf[pos]
        pos += 1
        out |= np.uint64(b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += np.uint64(7)
    return out, -1


@_jit
def _skip_group(buf: Any, pos: int, end: int, field: int) -> int:
    """The position after the end-group key of group ``field``, whose start-group key ends at
    ``pos`` (nested groups included); -1 when malformed or truncated. NOTE: no SelectRequest
    field is a group, but protobuf skips a well-formed group on any field number as an unknown
    field (``0b 0c`` parses as an empty message), so the scan must too."""
    stack = np.empty(_MAX_GROUP_DEPTH, np.int64)
    stack[0] = field
    depth = 1
    while pos < end:
        key, pos = _varint(buf, pos, end)
        if pos < 0 or key >> np.uint64(3) == 0 or key >> np.uint64(3) > np.uint64(_MAX_FIELD):
            return -1
        f, wt = int(key >> np.uint64(3)), int(key & np.uint64(7))
        if wt == 0:
            _, pos = _varint(buf, pos, end)
            if pos < 0:
                return -1
        elif wt == 1:
            pos += 8
        elif wt == 5:
            pos += 4
        elif wt == 2:
            ln, pos = _varint(buf, pos, end)
            if pos < 0 or ln > np.uint64(end - pos):
                return -1
            pos += int(ln)
        elif wt == 3:
            if depth == _MAX_GROUP_DEPTH:
                return -1
            stack[depth] = f
            depth += 1
        elif wt == 4:
            depth -= 1
            if stack[depth] != f:
                return -1
            if depth == 0:
                return pos
        else:
            return -1
        if pos > end:
            return -1
    return -1


@_jit
def _scan(buf: Any, fields: Any, cands: Any) -> tuple[int, int, Any]:
    """Walk a SelectRequest (``bytes``, read in place): the other fields into ``fields``
    (layout above), candidate id (offset, length) pairs into ``cands`` (up to its size / 2;
    all are counted). Returns (status, number of hashes, the block hashes: a fresh uint64
    array of len(buf) entries, the first n of them set). Zeroes ``fields`` first (the caller
    reuses it). NOTE: bytes in, the array out: no numpy call around the scan."""
    fields[:] = 0
    n = 0
    pos, end = 0, len(buf)
    hashes = np.empty(end, np.uint64)
    while pos < end:
        key, pos = _varint(buf, pos, end)
        if pos < 0:
            return _MALFORMED, n, hashes
        if key >> np.uint64(3) == 0 or key >> np.uint64(3) > np.uint64(_MAX_FIELD):
            return _MALFORMED, n, hashes
        f, wt = int(key >> np.uint64(3)), int(key & np.uint64(7))
        if wt == 0:
            v, pos = _varint(buf, pos, end)
            if pos < 0:
                return _MALFORMED, n, hashes
            if f == 2:
                hashes[n] = v
                n += 1
            elif f == 3 or f == 4 or f == 8:
                fields[2 * f] = np.int64(v & np.uint64(0xFFFFFFFF))
            elif f == 9:
                fields[2 * f] = 1 if v != 0 else 0
        elif wt == 2:
            ln, pos = _varint(buf, pos, end)
            if pos < 0 or ln > np.uint64(end - pos):
                return _MALFORMED, n, hashes
            stop = pos + int(ln)
            if f == 2:
                while pos < stop:
                    v, pos = _varint(buf, pos, stop)
                    if pos < 0:
                        return _MALFORMED, n, hashes
                    hashes[n] = v
                    n += 1
            else:
                if f == 1 or f == 5 or f == 7 or f == 10:
                    fields[2 * f], fields[2 * f + 1] = pos, stop - pos
                elif f == 6:
                    c = fields[12]
                    if 2 * c + 1 < cands.shape[0]:
                        cands[2 * c], cands[2 * c + 1] = pos, stop - pos
                    fields[12] = c + 1
                pos = stop
        elif wt == 1:
            pos += 8
        elif wt == 5:
            pos += 4
        elif wt == 3:
            pos = _skip_group(buf, pos, end, f)
            if pos < 0:
                return _MALFORMED, n, hashes
        else:
            return _MALFORMED, n, hashes
        if pos > end:
            return _MALFORMED, n, hashes
    return _OK, n, hashes


def _text(raw: bytes, fields: list[int], f: int) -> str:
    off, ln = fields[2 * f], fields[2 * f + 1]
    try:
        return raw[off : off + ln].decode() if ln else ""
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"field {f} is not UTF-8: {exc}") from exc


# NOTE: per thread (the scan releases the GIL): fields and candidate spans, reused across
# calls instead of two allocations per Select
_scratch = threading.local()


def _buffers() -> tuple[Any, Any]:
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = (np.zeros(_NUM_FIELDS, np.int64),
                                np.empty(2 * MAX_CANDIDATES, np.int64))  # fmt: skip
    return bufs


def decode_select(
    raw: bytes, max_prompt_blocks: int
) -> tuple[SelectionRequest, list[str], str, int, bool]:
    """(request, candidate ids, policy, max_results, speculative) of SelectRequest ``raw``.
    MalformedMessage for bytes that do not parse; ValueError (as ``convert``'s
    ``select_request_from_proto``) for an oversized prompt, candidate list or id."""
    fields_arr, cands_arr = _buffers()
    status, n, hashes = _scan(raw, fields_arr, cands_arr)
    if status != _OK:
        raise MalformedMessage("not a SelectRequest (truncated or invalid wire format)")
    if n > max_prompt_blocks:
        raise ValueError(f"{n} block hashes exceed the limit of {max_prompt_blocks}")
    fields = fields_arr.tolist()
    num_cands = fields[12]
    if num_cands > MAX_CANDIDATES:
        raise ValueError(f"{num_cands} candidates exceed the limit of {MAX_CANDIDATES}")
    # NOTE: most are empty: no call for those
    texts = [_text(raw, fields, f) if fields[2 * f + 1] else "" for f in (1, 5, 7, 10)]
    candidates: list[str] = []
    if num_cands:
        spans = cands_arr[: 2 * num_cands].tolist()
        try:
            pairs = zip(spans[::2], spans[1::2], strict=True)
            candidates = [raw[o : o + ln].decode() for o, ln in pairs]
        except UnicodeDecodeError as exc:
            raise MalformedMessage(f"a candidate id is not UTF-8: {exc}") from exc
    request_id, session_id, policy, origin = texts
    check_id(request_id, "request_id", required=False)
    check_id(session_id, "session_id", required=False)
    check_id(policy, "policy", required=False)
    for c in candidates:
        check_id(c, "candidate replica_id")
    request = SelectionRequest(
        request_id=request_id,
        block_hashes=hashes[:n],
        num_prompt_tokens=fields[6],
        num_output_tokens=fields[8],
        session_id=session_id,
        origin_node_id=check_id(origin, "origin_node_id", required=False),
    )
    return request, candidates, policy, fields[16], not fields[18]


# ---------------------------------------------------------------------------------- encoding
# ScoreTerms fields 1-11 (doubles, each tag byte + 8 bytes), in declaration order
_TERMS = struct.Struct("<" + "Bd" * 11)
_TERM_TAGS = tuple((f << 3) | 1 for f in range(1, 12))
_SCORE = struct.Struct("<Bd")


def varint_bytes(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


_SMALL = tuple(varint_bytes(i) for i in range(1024))


def _vb(v: int) -> bytes:
    return _SMALL[v] if v < 1024 else varint_bytes(v)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _vb(len(payload)) + payload


def encode_select(sel: Selection) -> bytes:
    """SelectResponse bytes of ``sel`` (the same message ``convert.selection_to_proto``
    builds)."""
    out = [_field(0x0A, sel.policy.encode())] if sel.policy else []
    g = _TERM_TAGS
    for r in sel.ranked:
        t = r.terms
        terms = _TERMS.pack(
            g[0], t.utility, g[1], t.cost, g[2], t.reward, g[3], t.size_cost, g[4], t.load_cost,
            g[5], t.latency_cost, g[6], t.fragmentation_cost, g[7], t.complexity,
            g[8], t.frequency, g[9], t.similarity, g[10], t.locality,
        )  # fmt: skip
        if t.num_matched_blocks:
            terms += b"\x60" + _vb(t.num_matched_blocks)
        if t.num_pending_blocks:
            terms += b"\x68" + _vb(t.num_pending_blocks)
        inner = _field(0x0A, r.replica_id.encode()) + _SCORE.pack(0x11, r.score)
        out.append(_field(0x12, inner + _field(0x1A, terms)))
    if sel.num_prompt_blocks:
        out.append(b"\x18" + _vb(sel.num_prompt_blocks))
    if sel.num_unknown_replicas:
        out.append(b"\x20" + _vb(sel.num_unknown_replicas))
    return b"".join(out)


def warm_up() -> None:
    """Compile (or load from numba's cache) the scan once per process; idempotent."""
    decode_select(b"\x12\x02\x05\x06\x10\x07", 16)
