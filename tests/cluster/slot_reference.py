"""The dict model the selector's slot tables are tested against: per key, the set of slots
holding it."""

from __future__ import annotations

import numpy as np

from cluster.selector import index_kernels as k


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
