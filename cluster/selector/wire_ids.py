"""Replica and node ids as bytes for the compiled wire Select (``wire_select_kernel``).

The fused Select reads candidate ids and the origin node id straight from the request's
bytes and writes each ranked replica's id into the answer's bytes, with no Python string in
between. For that it needs, per replica slot, the id's protobuf field bytes, and two lookups
from id bytes to a slot / a node code. ``WireIds.build`` makes them from a ``ReplicaTable``;
the caller rebuilds them whenever ``generation.Generation`` moved (``ReplicaTable`` bumps it
on every join, leave and node change).

Layout (slot s, node code c):

    id_flat   uint8 [total]   per slot: 0x0A, varint(len(id)), id's UTF-8   (SelectResponse
                              Ranked.replica_id field, ready to copy)
    id_at     int64 [cap, 3]  (offset of the field in id_flat, header length, id length);
                              -1 offset for a free slot
    id_tab    int64 [2^b]     open addressing on fnv1a(id bytes): slot + 1, 0 = empty
    node_flat uint8 [total]   node ids' UTF-8, node_at int64 [codes, 2] (offset, length),
    node_tab  int64 [2^b]     code + 1 by fnv1a(node id bytes)

Contract: a ``WireIds`` is a snapshot; it holds no reference to the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster.selector.index_kernels import _jit
from cluster.selector.replica_table import ReplicaTable
from cluster.selector.wire import varint_bytes

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@_jit
def fnv1a(buf: Any, off: int, ln: int) -> Any:
    """64-bit FNV-1a of ``buf[off : off + ln]``."""
    h = _FNV_OFFSET
    for i in range(off, off + ln):
        h = (h ^ np.uint64(buf[i])) * _FNV_PRIME
    return h


@_jit
def _same(a: Any, a_off: int, b: Any, b_off: int, ln: int) -> bool:
    for i in range(ln):  # noqa: SIM110 (NOTE: a loop, not all(<generator>): compiled)
        if a[a_off + i] != b[b_off + i]:
            return False
    return True


@_jit
def find(tab: Any, flat: Any, at: Any, skip: int, buf: Any, off: int, ln: int) -> int:
    """The key (slot or code) whose bytes equal ``buf[off : off + ln]``, -1 when none.
    ``at[key]`` = (offset in ``flat``, ..., length in the last column); the key's bytes start
    ``skip`` columns' worth of header later: ``at[key, 0] + at[key, 1]`` when ``skip`` is 1,
    ``at[key, 0]`` when it is 0."""
    mask = tab.shape[0] - 1
    i = np.int64(fnv1a(buf, off, ln) & np.uint64(mask))
    last = at.shape[1] - 1
    while tab[i] != 0:
        key = tab[i] - 1
        start = at[key, 0] + (at[key, 1] if skip else 0)
        if at[key, last] == ln and _same(flat, start, buf, off, ln):
            return int(key)
        i = (i + 1) & mask
    return -1


@_jit
def _fill(tab: Any, flat: Any, at: Any, skip: int) -> None:
    """Insert every key with an offset >= 0 into the empty ``tab``."""
    mask = tab.shape[0] - 1
    last = at.shape[1] - 1
    for key in range(at.shape[0]):
        if at[key, 0] < 0:
            continue
        start = at[key, 0] + (at[key, 1] if skip else 0)
        i = np.int64(fnv1a(flat, start, at[key, last]) & np.uint64(mask))
        while tab[i] != 0:
            i = (i + 1) & mask
        tab[i] = key + 1


def _table(num_keys: int) -> Any:
    size = 8
    while size < 2 * num_keys:
        size *= 2
    return np.zeros(size, np.int64)


@dataclass(slots=True, frozen=True)
class WireIds:
    """The snapshot (layout in the module docstring); ``max_field`` bounds one id field."""

    id_flat: Any
    id_at: Any
    id_tab: Any
    node_flat: Any
    node_at: Any
    node_tab: Any
    max_field: int

    @staticmethod
    def build(table: ReplicaTable) -> WireIds:
        """The ids of every replica ``table`` knows now, by slot, and its node codes."""
        id_at = np.full((max(table.capacity, 1), 3), -1, np.int64)
        parts: list[bytes] = []
        pos = max_field = 0
        for slot, rec in table.by_slot.items():
            raw = rec.replica_id.encode()
            head = b"\x0a" + varint_bytes(len(raw))
            id_at[slot] = (pos, len(head), len(raw))
            parts += (head, raw)
            pos += len(head) + len(raw)
            max_field = max(max_field, len(head) + len(raw))
        id_flat = np.frombuffer(b"".join(parts) or b"\0", np.uint8).copy()
        id_tab = _table(len(table.by_slot))
        _fill(id_tab, id_flat, id_at, 1)
        codes = table.node_codes()
        node_at = np.full((max(len(codes), 1), 2), -1, np.int64)
        nparts: list[bytes] = []
        pos = 0
        for node, code in codes.items():
            raw = node.encode()
            node_at[code] = (pos, len(raw))
            nparts.append(raw)
            pos += len(raw)
        node_flat = np.frombuffer(b"".join(nparts) or b"\0", np.uint8).copy()
        node_tab = _table(len(codes))
        _fill(node_tab, node_flat, node_at, 0)
        return WireIds(id_flat, id_at, id_tab, node_flat, node_at, node_tab, max_field)
