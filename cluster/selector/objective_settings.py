"""ObjectiveConfig from operator input: ``deploy/app.yaml`` (``selector.objective``) and the
service CLI (``--objective KEY=VALUE``), validated with messages that name the field.

    selector:
      objective: {alpha_load: 3.0, prefill_tokens_per_s: 250, w: [2, 1, 4, 1]}

    python -m cluster.selector --objective alpha_load=3 --objective 'w=[2,1,4,1]'

Contract: ``check_objective`` raises ValueError for the first out-of-range field (every
``ObjectiveConfig`` runs it on construction, so a sweep's overrides are checked too);
``objective_from_mapping`` also refuses unknown keys and wrong types, and returns a new
frozen config; nothing is mutated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.selector.objective import ObjectiveConfig

# field -> (low, high, low inclusive); high is always inclusive.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "lambda_utility": (0.0, math.inf, True),
    "lambda_cost": (0.0, math.inf, True),
    "lambda_reward": (0.0, math.inf, True),
    "alpha_size": (0.0, math.inf, True),
    "alpha_load": (0.0, math.inf, True),
    "alpha_latency": (0.0, math.inf, True),
    "alpha_fragmentation": (0.0, math.inf, True),
    "temperature": (0.0, math.inf, False),
    "gamma": (0.0, 1.0, False),
    "reward_window": (1, math.inf, True),
    "reward_tolerance": (0.0, math.inf, True),
    "reward_half_life_s": (0.0, math.inf, False),
    "reward_rate_weight": (0.0, math.inf, True),
    "q_scale_tokens": (0.0, math.inf, False),
    "hot_scale": (0.0, math.inf, False),
    "host_weight": (0.0, 1.0, True),
    "pending_weight": (0.0, 1.0, True),
    "latency_ref_s": (0.0, math.inf, False),
    "prefill_tokens_per_s": (0.0, math.inf, False),
    "queued_token_weight": (0.0, math.inf, True),
    "evict_token_weight": (0.0, math.inf, True),
    "load_clip_s": (0.0, math.inf, False),
    "learning_rate": (0.0, math.inf, True),
    "w_max": (0.0, math.inf, False),
}


def check_objective(cfg: ObjectiveConfig) -> None:
    """ValueError naming the first field outside its range (or a bad ``w``)."""
    for name, (lo, hi, lo_incl) in _RANGES.items():
        v = getattr(cfg, name)
        ok = (v >= lo if lo_incl else v > lo) and v <= hi and not math.isnan(v)
        if not ok:
            left = "[" if lo_incl else "("
            raise ValueError(f"objective {name}={v!r} outside {left}{lo}, {hi}]")
    if len(cfg.w) != 4 or any(not (x >= 0.0) for x in cfg.w):
        raise ValueError(f"objective w={cfg.w!r} must be 4 non-negative feature weights")


def _coerce(name: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"objective {name} must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"objective {name} must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"objective {name} must be a number, got {value!r}")
        return float(value)
    # the feature weights w
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 4:
        raise ValueError(f"objective {name} must be a list of 4 numbers, got {value!r}")
    return tuple(_coerce(f"{name}[{i}]", "float", x) for i, x in enumerate(value))


def objective_from_mapping(
    values: Mapping[str, Any], base: ObjectiveConfig | None = None
) -> ObjectiveConfig:
    """``base`` (default: the documented defaults) with ``values`` applied and validated."""
    from cluster.selector.objective import ObjectiveConfig

    base = base or ObjectiveConfig()
    kinds = {f.name: str(f.type) for f in fields(base)}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ValueError(f"unknown objective keys {unknown}; known: {sorted(kinds)}")
    kw = {
        name: _coerce(name, "w" if name == "w" else kinds[name], v) for name, v in values.items()
    }
    return replace(base, **kw)


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["alpha_load=3", "w=[2,1,4,1]", "learn=true"]`` -> a mapping (values read as JSON,
    so numbers, lists and true/false keep their types)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"objective setting {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"objective setting {item!r}: value is not JSON ({exc})") from exc
    return out
