"""Typed boundary objects of the selection service (no gRPC, no Ray).

The policy interface is columnar: a ``Candidates`` object holds one numpy array per feature,
one row per candidate replica, because a Select at 256 replicas must stay well under 100 us of
Python; per-candidate objects would cost more than the whole budget. ``Ranking.top(k)`` turns
the best k rows into ``Ranked`` dataclasses for the wire. A simulator builds ``Candidates``
with ``Candidates.from_rows`` from plain ``CandidateRow`` objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(slots=True, frozen=True)
class SelectionRequest:
    """One request to place. ``block_hashes`` are the chained 64-bit hashes of the prompt's full
    blocks (Python ints, or uint64 straight from the wire: the service decodes a Select's
    hashes into an array, once); ``num_output_tokens`` is the expected output length
    (0 = unknown)."""

    request_id: str
    block_hashes: Sequence[int] | npt.NDArray[np.uint64]
    num_prompt_tokens: int
    num_output_tokens: int = 0
    session_id: str = ""
    origin_node_id: str = ""

    @property
    def num_prompt_blocks(self) -> int:
        return len(self.block_hashes)


@dataclass(slots=True)
class LoadSnapshot:
    """A replica's periodic load/fragmentation report (mirrors ``tinyserve.v1.LoadSnapshot``)."""

    num_blocks: int = 0
    num_free_blocks: int = 0
    num_cached_blocks: int = 0
    num_used_blocks: int = 0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_running_tokens: int = 0
    num_waiting_tokens: int = 0
    ttft_ewma_s: float = 0.0
    step_time_ewma_s: float = 0.0
    f_total: float = 0.0
    usage: float = 0.0
    external_fragmentation: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass(slots=True)
class CandidateRow:
    """One candidate replica as plain scalars (simulator / test convenience)."""

    replica_id: str
    num_matched_blocks: int = 0
    num_pending_blocks: int = 0
    num_host_blocks: int = 0
    hotness: float = 0.0
    block_size: int = 16
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_cached_blocks: int = 0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_queued_tokens: int = 0
    ttft_ewma_s: float = 0.0
    f_total: float = 0.0
    usage: float = 0.0
    reward: float = 0.0
    same_node: bool = False
    prefill_tokens_per_s: float = 0.0


@dataclass(slots=True)
class Candidates:
    """Columnar view of the candidate replicas for one request; every array has ``len(self)``
    rows in ``replica_ids`` order. ``num_matched_blocks`` is the longest resident prefix;
    ``num_pending_blocks`` the extra prefix covered only by speculative (pending) inserts;
    ``num_host_blocks`` how many matched blocks live only on the host tier;
    ``num_queued_tokens`` running + waiting tokens + tokens routed since the last snapshot;
    ``reward`` is R(c), already discounted; ``prefill_tokens_per_s`` is c's measured prefill
    rate (0 = not reported: the objective's configured rate stands in). Read-only for
    policies."""

    replica_ids: list[str]
    num_matched_blocks: IntArray
    num_pending_blocks: IntArray
    num_host_blocks: IntArray
    hotness: FloatArray
    block_size: IntArray
    num_blocks: IntArray
    num_free_blocks: IntArray
    num_cached_blocks: IntArray
    num_running_reqs: IntArray
    num_waiting_reqs: IntArray
    num_queued_tokens: IntArray
    ttft_ewma_s: FloatArray
    f_total: FloatArray
    usage: FloatArray
    reward: FloatArray
    same_node: BoolArray
    prefill_tokens_per_s: FloatArray

    def __len__(self) -> int:
        return len(self.replica_ids)

    @classmethod
    def from_rows(cls, rows: Sequence[CandidateRow]) -> Candidates:
        """Stack rows into columns (dtype per field type)."""
        cols: dict[str, object] = {"replica_ids": [r.replica_id for r in rows]}
        for f in fields(CandidateRow):
            if f.name == "replica_id":
                continue
            values = [getattr(r, f.name) for r in rows]
            dtype = {"int": np.int64, "float": np.float64, "bool": np.bool_}[str(f.type)]
            cols[f.name] = np.asarray(values, dtype=dtype).reshape(len(rows))
        return cls(**cols)  # type: ignore[arg-type]


@dataclass(slots=True)
class ScoreTerms:
    """Why a candidate got its score. Baselines fill what they use; the rest stays 0."""

    utility: float = 0.0
    cost: float = 0.0
    reward: float = 0.0
    size_cost: float = 0.0
    load_cost: float = 0.0
    latency_cost: float = 0.0
    fragmentation_cost: float = 0.0
    complexity: float = 0.0
    frequency: float = 0.0
    similarity: float = 0.0
    locality: float = 0.0
    num_matched_blocks: int = 0
    num_pending_blocks: int = 0


TERM_NAMES: tuple[str, ...] = tuple(
    f.name for f in fields(ScoreTerms) if not f.name.startswith("num_")
)


@dataclass(slots=True)
class Ranked:
    replica_id: str
    score: float
    terms: ScoreTerms


@dataclass(slots=True)
class Ranking:
    """A policy's answer: ``order`` lists candidate row indices best first (every row exactly
    once); ``scores[i]`` is row i's score (higher is better); ``terms`` maps ScoreTerms field
    names to per-row columns (only the ones the policy computes)."""

    policy: str
    order: IntArray
    scores: FloatArray
    terms: dict[str, FloatArray] = field(default_factory=dict)

    def top(self, candidates: Candidates, k: int = 0) -> list[Ranked]:
        """The best ``k`` rows (all when k <= 0) as wire-ready dataclasses."""
        rows = self.order if k <= 0 else self.order[:k]
        # NOTE: one [columns, rows] gather + one tolist() for every term column at once; per
        # column or per element numpy access costs ~10x more at k = 4.
        names = list(self.terms)
        cols = [
            *self.terms.values(),
            candidates.num_matched_blocks,
            candidates.num_pending_blocks,
            self.scores,
        ]
        table = np.array(cols, dtype=np.float64)[:, rows].T.tolist()
        ids = candidates.replica_ids
        out: list[Ranked] = []
        for i, vals in zip(rows.tolist(), table, strict=True):
            terms = ScoreTerms(**dict(zip(names, vals, strict=False)))
            terms.num_matched_blocks = int(vals[-3])
            terms.num_pending_blocks = int(vals[-2])
            out.append(Ranked(ids[i], vals[-1], terms))
        return out


@dataclass(slots=True, frozen=True)
class Outcome:
    """Realised outcome of a routed request (the Feedback RPC)."""

    request_id: str
    replica_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    ttft_s: float = 0.0
    num_output_tokens: int = 0

    @property
    def cached_ratio(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0
