"""Step-time model of one replica, loaded from a calibration file (JSON).

One engine step runs a batch of prefill chunks and decode tokens. Its time is a roofline:

    t = base_s + per_seq_s * num_seqs
        + max(weights_read_s, linear_per_token_s * num_tokens)   # GEMMs: memory- or compute-bound
        + attn_per_pair_s * Σ_prefill chunk_len * (ctx_before + chunk_len / 2)   # causal attention
        + kv_read_per_token_s * Σ_decode context_len                              # decode KV reads

``num_tokens`` = prefill tokens + one per decoding sequence. The shipped file
(``calibration/h100_llama31_8b_derived.json``) is DERIVED from published H100 figures, not
measured; its ``provenance`` says so and a measured file with the same keys replaces it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

CALIBRATION_DIR = Path(__file__).parent / "calibration"
DEFAULT_CALIBRATION = CALIBRATION_DIR / "h100_llama31_8b_derived.json"


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """Per-step cost coefficients (seconds) and the engine limits they were taken with."""

    name: str
    gpu: str
    model: str
    provenance: str
    base_s: float
    per_seq_s: float
    weights_read_s: float
    linear_per_token_s: float
    attn_per_pair_s: float
    kv_read_per_token_s: float
    kv_capacity_tokens: int
    max_num_batched_tokens: int
    max_num_seqs: int

    def step_time(
        self, num_tokens: int, num_seqs: int, attn_pairs: float, decode_ctx_tokens: int
    ) -> float:
        """Seconds for one step (see the module docstring for the terms)."""
        if num_tokens <= 0:
            return 0.0
        gemm = max(self.weights_read_s, self.linear_per_token_s * num_tokens)
        return (
            self.base_s
            + self.per_seq_s * num_seqs
            + gemm
            + self.attn_per_pair_s * attn_pairs
            + self.kv_read_per_token_s * decode_ctx_tokens
        )

    def prefill_time(self, num_tokens: int, ctx_before: int = 0) -> float:
        """One sequence's prefill of ``num_tokens`` after ``ctx_before`` cached tokens, alone on
        the replica, in chunks of ``max_num_batched_tokens`` (for reports and sanity checks)."""
        t, done = 0.0, 0
        while done < num_tokens:
            n = min(self.max_num_batched_tokens, num_tokens - done)
            pairs = n * (ctx_before + done + n / 2)
            t += self.step_time(n, 1, pairs, 0)
            done += n
        return t

    def kv_blocks(self, block_size: int) -> int:
        """Pool size in blocks implied by ``kv_capacity_tokens``."""
        return self.kv_capacity_tokens // block_size


def load_calibration(path: str | Path = DEFAULT_CALIBRATION) -> StepTimeModel:
    """Read a calibration JSON; KeyError names any missing key, extra keys are ignored."""
    data = json.loads(Path(path).read_text())
    names = [f.name for f in fields(StepTimeModel)]
    missing = [n for n in names if n not in data]
    if missing:
        raise KeyError(f"calibration {path} lacks {missing}")
    return StepTimeModel(**{n: data[n] for n in names})
