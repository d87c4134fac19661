"""Benchmark-only policy variants registered into ``cluster.selector.policy``'s registry.

``load_only`` is llm-d's scheduler with the prefix-cache scorer switched off (queue 2 +
kv-utilisation 2): the "load-aware" routing of llm-d's B2B SaaS comparison, which the issue's
throughput target (>= 1.9x load-only) is measured against.
"""

from __future__ import annotations

from cluster.selector.baselines import LlmdWeighted
from cluster.selector.policy import policy_names, register_policy

TINYSERVE = "tinyserve"
LOAD_ONLY = "load_only"


@register_policy
class LoadOnly(LlmdWeighted):
    """llm-d weighted scorers without the prefix scorer (load-aware only)."""

    name = LOAD_ONLY

    def __init__(self) -> None:
        super().__init__(prefix_weight=0.0, queue_weight=2.0, kv_util_weight=2.0)


def all_policies() -> list[str]:
    """Every registered policy, TinyServe first."""
    names = policy_names()
    return [TINYSERVE] + [n for n in names if n != TINYSERVE]
