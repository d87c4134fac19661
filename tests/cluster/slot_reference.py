"""The dict model the selector's slot tables are tested against: per key, the set of slots
holding it (or pending on it)."""

from __future__ import annotations

import numpy as np

from cluster.selector import holder_kernels as hk
from cluster.selector import index_kernels as k
from cluster.selector.holder_table import HolderTable

_OVER_BIT = np.uint64(1 << 63)


def keys_homed_at(homes: tuple[int, ...], bits: int, per_home: int) -> list[int]:
    """``per_home`` keys (as uint64 ints, 0 included when it fits) per home row of a table of
    ``2**bits`` rows: collisions and wrapped probe runs on purpose."""
    out: dict[int, list[int]] = {h: [] for h in homes}
    key = 0
    while any(len(v) < per_home for v in out.values()):
        h = int(k._home(np.uint64(key), bits))
        if h in out and len(out[h]) < per_home:
            out[h].append(key)
        key += 1
    return [x for h in homes for x in out[h]]


def apply_op(ref: dict[int, set[int]], op: str, slot: int, keys: list[int]) -> int:
    """Apply ``op`` to ``ref`` in place ("set": ``slot`` gains ``keys``; "clear": loses them;
    anything else: ``slot`` leaves every key; keys left without slots are dropped). Returns how
    many distinct keys changed ("set" / "clear"; 0 otherwise), what the table's call answers."""
    changed = 0
    if op == "set":
        changed = sum(1 for x in dict.fromkeys(keys) if slot not in ref.get(x, set()))
        for x in keys:
            ref.setdefault(x, set()).add(slot)
    elif op == "clear":
        changed = sum(1 for x in dict.fromkeys(keys) if slot in ref.get(x, set()))
        for x in keys:
            ref.get(x, set()).discard(slot)
    else:
        for v in ref.values():
            v.discard(slot)
    for x in [x for x, v in ref.items() if not v]:
        del ref[x]
    return changed


def check_holder_table(
    t: HolderTable, ref: dict[int, set[int]], keys: list[int], slots: list[int]
) -> None:
    """Every answer of ``t`` on ``keys`` x ``slots`` equals the dict's, and the row layout's
    invariants hold (probe runs unbroken, inline iff <= 3 slots, the overflow pool's rows in
    use plus its free list are the pool)."""
    assert len(t) == len(ref)
    for x in keys:
        held = ref.get(x, set())
        for s in slots:
            assert t.has(np.uint64(x), s) == (s in held)
        words = t.holders(np.uint64(x))
        assert {64 * w + b for w in range(len(words)) for b in range(64)
                if int(words[w]) >> b & 1} == held  # fmt: skip
    live = [i for i in range(len(t.tab)) if t.tab[i, 1]]
    # NOTE: no orphan rows: every live row is reachable from its home (probe runs unbroken)
    assert sorted(hk.find(t.tab, t.bits, t.tab[i, 0]) for i in live) == live
    over_rows = []
    for i in live:
        n = len(ref[int(t.tab[i, 0])])
        assert bool(t.tab[i, 1] & _OVER_BIT) == (n > hk.NUM_INLINE)
        if n > hk.NUM_INLINE:
            over_rows.append(int(t.tab[i, 1] & np.uint64(0xFFFFFFFF)))
    assert t.num_overflow == len(over_rows) == len(set(over_rows))
    free, o = [], int(t.ostate[0])
    while o >= 0:
        free.append(o)
        o = int(t.over[o, 0]) - 1
    assert sorted(free + over_rows) == list(range(len(t.over)))
