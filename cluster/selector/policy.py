"""The routing-policy interface and registry (shared by the service and the simulator).

Interface (in-process, no gRPC, no Ray)::

    policy = make_policy("tinyserve")              # or any name in policy_names()
    ranking = policy.select(request, candidates)    # SelectionRequest, Candidates -> Ranking
    best = ranking.top(candidates, k=1)[0]          # Ranked(replica_id, score, ScoreTerms)
    policy.on_feedback(outcome)                     # optional: realised reward (Outcome)

- ``select`` must rank every candidate row exactly once (``Ranking.order``), higher score =
  better, and must not mutate ``candidates``. It may keep private state (round-robin counter,
  RNG, learned weights); policies are not thread-safe, callers serialise.
- ``candidates`` (``cluster.selector.types.Candidates``) is columnar: the core fills it from the index
  (longest resident prefix + speculative pending prefix per replica) and the replicas' load
  snapshots; a simulator fills it with ``Candidates.from_rows``.
- ``name`` is the registry key and the ``policy`` label in metrics.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np

from cluster.selector.types import Candidates, FloatArray, Outcome, Ranking, SelectionRequest

_REGISTRY: dict[str, type[Policy]] = {}
P = TypeVar("P", bound="type[Policy]")


class Policy(ABC):
    """Ranks candidate replicas for one request."""

    name: ClassVar[str]

    @abstractmethod
    def select(self, request: SelectionRequest, candidates: Candidates) -> Ranking:
        """Rank every candidate row; see the module docstring for the contract."""

    def on_feedback(self, outcome: Outcome) -> None:  # noqa: B027 - optional hook
        """Realised outcome of a request this policy routed (default: ignored)."""


def register_policy(cls: P) -> P:
    """Class decorator: make ``cls`` constructible by ``make_policy(cls.name)``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"policy name {name!r} is already registered by {_REGISTRY[name]}")
    _REGISTRY[name] = cls
    return cls


def _ensure_builtin() -> None:
    # NOTE: importing the modules runs their @register_policy decorators.
    import cluster.selector.baselines
    import cluster.selector.objective  # noqa: F401


def policy_names() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def make_policy(name: str, **kwargs: Any) -> Policy:
    """Instantiate a registered policy; ValueError for an unknown name."""
    _ensure_builtin()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(_REGISTRY)}")
    return cls(**kwargs)


def policy_params(name: str) -> list[str]:
    """The keyword arguments policy ``name``'s constructor takes (e.g. ``seed``)."""
    _ensure_builtin()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(_REGISTRY)}")
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def rank_by(name: str, scores: FloatArray, terms: dict[str, FloatArray] | None = None) -> Ranking:
    """Ranking by descending score; ties keep candidate order (stable sort)."""
    order = np.argsort(-scores, kind="stable")
    return Ranking(name, order, scores, terms or {})


def prefix_fraction(request: SelectionRequest, candidates: Candidates) -> FloatArray:
    """Matched (resident + pending) fraction of the prompt's blocks per candidate."""
    n = max(request.num_prompt_blocks, 1)
    matched = candidates.num_matched_blocks + candidates.num_pending_blocks
    return np.asarray(matched / n, dtype=np.float64)


PolicyFactory = Callable[..., Policy]
