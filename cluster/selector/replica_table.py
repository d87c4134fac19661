"""Replica membership and per-replica load columns, indexed by slot.

Each known replica owns a small-int ``slot`` (its bit in ``KVIndex`` masks and its row in the
numpy columns below). Columns are updated in place on snapshots, so building ``Candidates`` for
a Select is a handful of fancy-index operations instead of per-replica Python work.

Contract: not thread-safe (the core serialises calls). Slots of departed replicas are reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cluster.selector.generation import bump
from cluster.selector.types import LoadSnapshot

_INT_COLS = (
    "block_size",
    "num_blocks",
    "num_free_blocks",
    "num_cached_blocks",
    "num_running_reqs",
    "num_waiting_reqs",
    "num_queued_tokens",
)
# NOTE: the objective kernel reads these by row index (objective_kernel.score): append.
_FLOAT_COLS = ("ttft_ewma_s", "f_total", "usage", "reward", "prefill_tokens_per_s")


@dataclass(slots=True)
class ReplicaRecord:
    """Book-keeping of one replica (not on the Select hot path)."""

    replica_id: str
    slot: int
    node_id: str = ""
    block_size: int = 16
    num_blocks: int = 0
    last_seen: float = 0.0
    last_seq: int = -1
    synced: bool = False
    connected: bool = False
    load: LoadSnapshot = field(default_factory=LoadSnapshot)
    num_inflight_tokens: int = 0


class ReplicaTable:
    """Replica id <-> slot, records, and columnar load state."""

    def __init__(self, capacity: int = 64) -> None:
        self.records: dict[str, ReplicaRecord] = {}
        self.by_slot: dict[int, ReplicaRecord] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._capacity = 0
        self.cols: dict[str, np.ndarray] = {}
        self.ints = np.zeros((len(_INT_COLS), 0), np.int64)
        self.floats = np.zeros((len(_FLOAT_COLS), 0), np.float64)
        # NOTE: node ids as small ints per slot, so the Select kernel tests "same node as the
        # caller" without a Python loop over candidates (-1: no node id).
        self.node_of_slot = np.zeros(0, np.int64)
        self._node_codes: dict[str, int] = {}
        self._grow(capacity)
        self.live_mask = 0
        self._live_cache: tuple[np.ndarray, list[str]] | None = None

    def _grow(self, capacity: int) -> None:
        # NOTE: one 2-D array per dtype, so gathering all columns of the candidates is two
        # fancy-index operations (``gather``); ``cols[name]`` are row views into them.
        ints = np.zeros((len(_INT_COLS), capacity), np.int64)
        floats = np.zeros((len(_FLOAT_COLS), capacity), np.float64)
        if self._capacity:
            ints[:, : self._capacity] = self.ints
            floats[:, : self._capacity] = self.floats
        self.ints, self.floats = ints, floats
        node_of_slot = np.full(capacity, -1, np.int64)
        node_of_slot[: self._capacity] = self.node_of_slot
        self.node_of_slot = node_of_slot
        self.cols = {name: ints[i] for i, name in enumerate(_INT_COLS)}
        self.cols.update({name: floats[i] for i, name in enumerate(_FLOAT_COLS)})
        self._capacity = capacity
        bump()

    @property
    def capacity(self) -> int:
        return self._capacity

    def gather(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Every column at ``slots`` (copies), by column name."""
        ints, floats = self.ints[:, slots], self.floats[:, slots]
        out = {name: ints[i] for i, name in enumerate(_INT_COLS)}
        out.update({name: floats[i] for i, name in enumerate(_FLOAT_COLS)})
        return out

    def __len__(self) -> int:
        return len(self.records)

    def get(self, replica_id: str) -> ReplicaRecord | None:
        return self.records.get(replica_id)

    def add(
        self, replica_id: str, node_id: str = "", block_size: int = 16, num_blocks: int = 0
    ) -> tuple[ReplicaRecord, bool]:
        """Register (or refresh) a replica; returns (record, created)."""
        rec = self.records.get(replica_id)
        created = rec is None
        if rec is None:
            if self._free_slots:
                slot = min(self._free_slots)
                self._free_slots.remove(slot)
            else:
                slot = self._next_slot
                self._next_slot += 1
            if slot >= self._capacity:
                self._grow(max(2 * self._capacity, slot + 1))
            rec = ReplicaRecord(replica_id, slot)
            self.records[replica_id] = rec
            self.by_slot[slot] = rec
            self.live_mask |= 1 << slot
            self._live_cache = None
            for col in self.cols.values():
                col[slot] = 0
        rec.node_id = node_id or rec.node_id
        num_codes = len(self._node_codes)
        if rec.node_id:
            code = self._node_codes.setdefault(rec.node_id, len(self._node_codes))
            self.node_of_slot[rec.slot] = code
        if created or len(self._node_codes) != num_codes:
            bump()  # NOTE: the ids the compiled wire Select holds as bytes (wire_ids.py)
        rec.block_size = block_size or rec.block_size
        rec.num_blocks = num_blocks or rec.num_blocks
        self.cols["block_size"][rec.slot] = rec.block_size
        if rec.load.num_blocks == 0:
            self.cols["num_blocks"][rec.slot] = rec.num_blocks
            self.cols["num_free_blocks"][rec.slot] = rec.num_blocks
        return rec, created

    def node_code(self, node_id: str) -> int:
        """``node_of_slot``'s code of ``node_id``: -1 when empty, -2 when no replica has it
        (so neither matches any slot)."""
        return self._node_codes.get(node_id, -2) if node_id else -1

    def node_codes(self) -> dict[str, int]:
        """Every node id seen, with its ``node_of_slot`` code (a copy)."""
        return dict(self._node_codes)

    def remove(self, replica_id: str) -> ReplicaRecord | None:
        rec = self.records.pop(replica_id, None)
        if rec is not None:
            del self.by_slot[rec.slot]
            self._free_slots.append(rec.slot)
            self.live_mask &= ~(1 << rec.slot)
            self._live_cache = None
            self.node_of_slot[rec.slot] = -1
            bump()  # NOTE: see ``add``
        return rec

    def set_load(self, rec: ReplicaRecord, load: LoadSnapshot) -> None:
        """Apply a snapshot; it already counts what was routed before it, so in-flight resets."""
        rec.load = load
        rec.num_inflight_tokens = 0
        c, s = self.cols, rec.slot
        c["num_blocks"][s] = load.num_blocks or rec.num_blocks
        c["num_free_blocks"][s] = load.num_free_blocks
        c["num_cached_blocks"][s] = load.num_cached_blocks
        c["num_running_reqs"][s] = load.num_running_reqs
        c["num_waiting_reqs"][s] = load.num_waiting_reqs
        c["num_queued_tokens"][s] = load.num_running_tokens + load.num_waiting_tokens
        c["ttft_ewma_s"][s] = load.ttft_ewma_s
        c["f_total"][s] = load.f_total
        c["usage"][s] = load.usage
        c["prefill_tokens_per_s"][s] = load.prefill_tokens_per_s

    def add_inflight(self, rec: ReplicaRecord, num_tokens: int) -> None:
        """Optimistic load accounting for a request just routed to ``rec``."""
        self.add_inflight_record(rec, num_tokens)
        self.cols["num_queued_tokens"][rec.slot] += num_tokens
        self.cols["num_waiting_reqs"][rec.slot] += 1

    def add_inflight_record(self, rec: ReplicaRecord, num_tokens: int) -> None:
        """``add_inflight``'s record part only: the compiled Select
        (``select_kernel.select_bound``) updated the columns itself."""
        rec.num_inflight_tokens += num_tokens

    def set_reward(self, rec: ReplicaRecord, reward: float, prefill_tokens_per_s: float) -> None:
        """R(c) and the prefill rate the objective uses for ``rec`` (its reported rate, or
        that rate as R corrects it: cluster/selector/reward.py ``rate_scale``)."""
        self.cols["reward"][rec.slot] = reward
        self.cols["prefill_tokens_per_s"][rec.slot] = prefill_tokens_per_s

    def live(self) -> tuple[np.ndarray, list[str]]:
        """(slots, replica_ids) of every known replica, cached until membership changes."""
        if self._live_cache is None:
            recs = sorted(self.records.values(), key=lambda r: r.slot)
            self._live_cache = (
                np.asarray([r.slot for r in recs], np.int64),
                [r.replica_id for r in recs],
            )
        return self._live_cache

    def candidate_slots(
        self, candidate_ids: Sequence[str]
    ) -> tuple[np.ndarray, list[str], int, int]:
        """(slots, replica_ids, number of unknown ids, slots bitmask) of the named candidates
        (every live replica when none is named); unknown ids are skipped."""
        if not candidate_ids:
            slots, ids = self.live()
            return slots, ids, 0, self.live_mask
        known = [rec for rec in (self.records.get(r) for r in candidate_ids) if rec is not None]
        mask = 0
        for rec in known:
            mask |= 1 << rec.slot
        return (
            np.asarray([r.slot for r in known], np.int64),
            [r.replica_id for r in known],
            len(candidate_ids) - len(known),
            mask,
        )
