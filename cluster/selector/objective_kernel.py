"""The TinyServe objective's per-candidate arithmetic as one compiled (numba) pass.

Same formulas, same operation order per element as the numpy definition
(``TinyServeObjective.features`` / ``costs`` / ``select_reference``; tests check they agree on
random candidate sets to 1e-12). NOTE: the numpy form costs ~40 numpy calls per Select
(~1 us each at 256 candidates: 40-55 us, a third of the old Select); this is two loops.

Inputs are read where the service keeps them (numba checks each argument's type on every
call; 30 separate columns cost more than the arithmetic), candidate j being slot ``slots[j]``:

    res, both, host [>= slots]        int64:   by slot, the walk's resident prefix, resident
                                               or pending prefix, host-only blocks of it
    hot, same       [N]               float64: per candidate, hotness and same node (0/1)
    tab_ints        [7, >= slots]     int64:   ``ReplicaTable.ints`` (``replica_table._INT_COLS``
                                               rows: block_size, num_blocks, num_free_blocks,
                                               num_cached_blocks, -, -, num_queued_tokens)
    tab_floats      [5, >= slots]     float64: ``ReplicaTable.floats`` (``_FLOAT_COLS``:
                                               ttft_ewma_s, f_total, -, reward,
                                               prefill_tokens_per_s, 0 = the configured rate)
    cfg    [CFG_LEN]       float64: see ``pack_config``
    req    [4]             float64: num_prompt_blocks, num_prompt_tokens, num_output_tokens,
                                    origin_node_id given (0/1)
    out    [OUT_ROWS, N]   float64: written, rows named by ``OUT_ROWS``
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster.selector.index_kernels import _jit

if TYPE_CHECKING:
    from cluster.selector.objective import ObjectiveConfig

OUT_ROWS = (
    "utility",
    "cost",
    "size_cost",
    "load_cost",
    "latency_cost",
    "fragmentation_cost",
    "complexity",
    "frequency",
    "similarity",
    "locality",
    "score",
)
CFG_LEN = 22  # entries of pack_config


def pack_config(cfg: ObjectiveConfig, w: Any) -> np.ndarray:
    """The objective's scalars in the kernel's order (``w`` may be the learnt one)."""
    return np.asarray(
        [
            cfg.host_weight,
            cfg.pending_weight,
            cfg.hot_scale,
            cfg.q_scale_tokens,
            float(w[0]),
            float(w[1]),
            float(w[2]),
            float(w[3]),
            1.0 / cfg.temperature,
            cfg.alpha_size,
            cfg.alpha_load,
            cfg.alpha_latency,
            cfg.alpha_fragmentation,
            cfg.lambda_utility,
            cfg.lambda_cost,
            cfg.lambda_reward,
            cfg.prefill_tokens_per_s,
            cfg.queued_token_weight,
            cfg.evict_token_weight,
            cfg.load_clip_s,
            cfg.latency_ref_s,
            1.0 if cfg.match_scaled_features else 0.0,
        ],
        np.float64,
    )


def complexity(num_prompt_tokens: int, q_scale_tokens: float) -> float:
    """Q(q), computed in Python exactly as the numpy definition does."""
    return 1.0 - math.exp(-num_prompt_tokens / q_scale_tokens)


@_jit
def score(
    slots: Any, res: Any, both: Any, host: Any, hot: Any, same: Any, tab_ints: Any,
    tab_floats: Any, cfg: Any, req: Any, q: float, out: Any,
) -> None:  # fmt: skip
    """Fill ``out`` (see the module docstring) for every candidate.
    NOTE: read by slot, not gathered first: ~1.1 us less a Select at 256 candidates (the
    gather's two arrays and their copy)."""
    n = slots.shape[0]
    hw, pw, hot_scale = cfg[0], cfg[1], cfg[2]
    w0, w1, w2, w3, inv_t = cfg[4], cfg[5], cfg[6], cfg[7], cfg[8]
    a_size, a_load, a_lat, a_frag = cfg[9], cfg[10], cfg[11], cfg[12]
    l_util, l_cost, l_rew = cfg[13], cfg[14], cfg[15]
    pps, qtw, etw, clip, lat_ref = cfg[16], cfg[17], cfg[18], cfg[19], cfg[20]
    scale_by_match = cfg[21] > 0
    npb, npt, nout, origin = int(req[0]), req[1], int(req[2]), req[3] > 0
    inv_npb = 1.0 / max(npb, 1)
    sim_w = (w0 * q + w2) * inv_t
    any_reward = False
    max_logit = -np.inf
    min_load = np.inf
    for j in range(n):
        s = slots[j]
        m, bs = res[s], tab_ints[0, s]
        pend = both[s] - m
        nblocks, free, cached, queued = tab_ints[1, s], tab_ints[2, s], tab_ints[3, s], tab_ints[6, s]
        # features (objective.features)
        tiered = m - (1.0 - hw) * host[s]
        covered = tiered + pw * pend
        sim = min(covered * inv_npb, 1.0)
        # NOTE: no hotness (every candidate but the few that matched): expm1(x) is x at
        # x = ±0, so the same value without the call (~254 of 256 calls a Select)
        x = hot[j] * (-1.0 / hot_scale)
        freq = -(math.expm1(x) if x != 0.0 else x)
        loc = tiered / max(m, 1)
        if origin:
            loc = loc * (1.0 if same[j] > 0 else 0.5)
        if scale_by_match:
            freq = freq * sim
            loc = loc * sim
        logit = sim * sim_w
        if w1:
            logit = logit + freq * (w1 * inv_t)
        if w3:
            logit = logit + loc * (w3 * inv_t)
        max_logit = max(max_logit, logit)
        # costs (objective.costs, ttft_estimate)
        need = max(npb - m - pend, 0)
        if nout:
            need = need - (-nout // max(bs, 1))
        known = nblocks > 0
        size = min(need / max(free, 1), 2.0) if known else 0.0
        uncached = max(npt - covered * bs, 0.0)
        pr = tab_floats[4, s]
        rate = pr if pr > 0 else pps
        load = (max(queued, 0) * qtw + uncached) * (1.0 / rate)
        if etw:
            evicted = (max(need - max(free - cached, 0), 0) if known else 0) * bs
            load = load + evicted * (etw / rate)
        min_load = min(min_load, load)
        out[0, j] = logit
        out[2, j] = size
        out[3, j] = load
        out[4, j] = min(tab_floats[0, s] * (1.0 / lat_ref), 4.0)
        out[5, j] = min(tab_floats[1, s], 4.0)
        out[6, j] = q * sim
        out[7, j] = freq
        out[8, j] = sim
        out[9, j] = loc
        if tab_floats[3, s] != 0:
            any_reward = True
    # NOTE: the candidates without a match share one logit (0.0): one exp for all of them,
    # the same value the call would give each (bit for bit: same argument)
    last_logit, last_utility = np.nan, 0.0
    for j in range(n):
        if out[0, j] != last_logit:
            last_logit = out[0, j]
            last_utility = math.exp(last_logit - max_logit)
        utility = last_utility
        load = min(out[3, j] - min_load, clip)
        cost = a_size * out[2, j] + a_load * load + a_lat * out[4, j] + a_frag * out[5, j]
        sc = l_util * utility - l_cost * cost
        if l_rew and any_reward:
            sc = sc + l_rew * tab_floats[3, slots[j]]
        out[0, j] = utility
        out[1, j] = cost
        out[3, j] = load
        out[10, j] = sc


_warm = False


def warm_up() -> None:
    """Compile (or load from numba's cache) ``score`` once per process; idempotent."""
    global _warm
    if not _warm:
        out = np.empty((len(OUT_ROWS), 1))
        cfg = np.ones(CFG_LEN)
        one = np.ones(1, np.int64)
        score(np.zeros(1, np.int64), one, one, one, np.ones(1), np.ones(1),
              np.ones((7, 1), np.int64), np.ones((5, 1)), cfg, np.ones(4), 0.5, out)  # fmt: skip
        _warm = True
