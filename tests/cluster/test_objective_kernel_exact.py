"""objective_kernel.score's short cuts give, bit for bit, what the calls they skip give: the
hotness term without expm1 where the hotness is ±0, one exp shared by equal logits."""

from __future__ import annotations

import math

import numpy as np

from cluster.selector import objective_kernel as ok
from cluster.selector.objective import ObjectiveConfig


def _score(hotness: list[float], matched: list[int]) -> tuple[np.ndarray, np.ndarray]:
    n = len(hotness)
    # NOTE: candidate j at slot j; matched blocks make unequal logits where they differ
    res = np.asarray(matched, np.int64)
    tab_ints = np.zeros((7, n), np.int64)
    tab_ints[0], tab_ints[1], tab_ints[2] = 16, 1000, 500  # block size, blocks, free blocks
    # NOTE: w1 = w3 = 0: the logit is sim * sim_w alone, which the test can recompute exactly
    cfg_obj = ObjectiveConfig(w=(2.0, 0.0, 4.0, 0.0))
    cfg = ok.pack_config(cfg_obj, np.asarray(cfg_obj.w, np.float64))
    out = np.empty((len(ok.OUT_ROWS), n))
    req = np.array([40.0, 640.0, 16.0, 0.0])
    ok.score(np.arange(n), res, res, np.zeros(n, np.int64), np.asarray(hotness, np.float64),
             np.zeros(n), tab_ints, np.zeros((5, n)), cfg, req, 0.5, out)  # fmt: skip
    return out, cfg


def _row(name: str) -> int:
    return ok.OUT_ROWS.index(name)


def test_hotness_term_is_expm1_bit_for_bit_including_signed_zeros() -> None:
    hot = [0.0, -0.0, 0.5, 3.0, 0.0, 40.0]
    # NOTE: a full match (sim 1.0): the reported frequency is the term times sim, unchanged
    out, cfg = _score(hot, [40] * len(hot))
    for j, h in enumerate(hot):
        want = -math.expm1(h * (-1.0 / cfg[2]))
        got = out[_row("frequency"), j]
        assert got.hex() == want.hex() and math.copysign(1, got) == math.copysign(1, want)


def test_equal_logits_share_one_exp_and_each_utility_is_its_own_exp() -> None:
    # NOTE: runs of equal logits (no match) broken by matches of several lengths, in an order
    # where a shared value must not leak into its neighbours
    matched = [0, 0, 10, 0, 0, 40, 40, 0, 25, 0]
    out, cfg = _score([0.0] * len(matched), matched)
    sim_w = (cfg[4] * 0.5 + cfg[6]) * cfg[8]
    logits = [min(m / 40.0, 1.0) * sim_w for m in matched]
    top = max(logits)
    for j, logit in enumerate(logits):
        assert out[_row("utility"), j].hex() == math.exp(logit - top).hex()
