"""A process-wide count of array replacements, for callers that bind arrays once.

The fast path passes ~30 arrays (the index's tables, the access table, the replica table's
columns, the pending deadlines and queue, its own buffers) to one compiled call per Select.
Gathering them from their owners cost a Python attribute walk per Select; instead the caller
keeps them in a tuple (``Ranker``) and re-reads them only when this count moved.

Contract: every owner of such an array calls ``bump()`` right after it replaces one (growth,
widening, a fresh allocation); a binding is valid while ``Generation.value`` is unchanged.
``ReplicaTable`` also bumps it when a replica joins or leaves or a node id is first seen: the
compiled wire Select (``wire_select``) holds the replicas' ids as bytes per slot.
NOTE: process-wide and conservative: any owner's growth invalidates every binding (growth is
rare: tables double). A binding holds references to its arrays, so a missed bump would leave
stale data, never freed memory; ``tests/cluster/test_selector_bound_select.py`` checks the
binding against freshly read arrays through growth.
"""

from __future__ import annotations

from typing import ClassVar


class Generation:
    """The count (a class attribute: one read per Select)."""

    value: ClassVar[int] = 0


def bump() -> None:
    """An owner replaced an array a binding may hold."""
    Generation.value += 1
