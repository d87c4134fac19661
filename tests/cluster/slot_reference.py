"""The dict model the selector's slot tables are tested against: per key, the set of slots
holding it."""

from __future__ import annotations


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
