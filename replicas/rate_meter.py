"""RateMeter: a replica's own prefill and decode rates, measured, never assumed.

The selection objective turns queued and uncached tokens into estimated seconds of TTFT with
each replica's prefill rate (ARCHITECTURE.md: "Rates are each replica's own, measured and
reported, never a constant of one GPU"). A replica measures both rates once at start
(``calibrate``: one synthetic prefill, a few decode steps) and then follows its real steps:

    prefill step (any prompt chunk):  tokens_p += a·(P − tokens_p), secs_p += a·(T − secs_p)
    decode step (no prompt chunk):    tokens_d += a·(D − tokens_d), secs_d += a·(T − secs_d)
    prefill_tokens_per_s = tokens_p / secs_p      decode_tokens_per_s = tokens_d / secs_d

P = prompt tokens computed in the step, D = decode rows, T = the step's wall time.
NOTE: a ratio of two EWMAs, not an EWMA of per-step ratios: a step's fixed overhead (~90 ms
on the CPU SmolLM2 replica, benchmarks/sim/calibration/cpu_smollm2_135m_measured.json) makes a
20-token chunk's own ratio ~2x lower than a 512-token chunk's, and what the objective needs
is seconds per token of work over the recent mix. A mixed step's time counts wholly as
prefill (its decode rows ride along), so the prefill rate errs low, i.e. towards spreading.

Contract: not thread-safe; the engine core thread is the only writer. Readers on other
threads get a possibly one-step-old float (a Python float read is atomic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replicas.llm_engine import LLMEngine

# NOTE: 0.1 follows ~the last 10 steps: on the CPU replica a few seconds, on an H100 tens of
# milliseconds; a noisy neighbour shows up within one snapshot interval on either.
RATE_EWMA_ALPHA = 0.1


@dataclass(slots=True, frozen=True)
class Rates:
    """Measured rates in tokens per second (0.0 = not measured yet)."""

    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0


class RateMeter:
    """EWMA prefill/decode rates from (tokens, seconds) of real steps (module docstring)."""

    def __init__(self, alpha: float = RATE_EWMA_ALPHA) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._p_tokens = self._p_secs = 0.0
        self._d_tokens = self._d_secs = 0.0
        self.num_steps = 0

    def observe(self, num_prefill_tokens: int, num_decode_tokens: int, seconds: float) -> None:
        """Fold one step in; a step with no tokens or no measurable time is ignored."""
        if seconds <= 0.0 or num_prefill_tokens + num_decode_tokens <= 0:
            return
        self.num_steps += 1
        if num_prefill_tokens > 0:
            self._p_tokens, self._p_secs = self._fold(
                self._p_tokens, self._p_secs, num_prefill_tokens, seconds
            )
        else:
            self._d_tokens, self._d_secs = self._fold(
                self._d_tokens, self._d_secs, num_decode_tokens, seconds
            )

    def _fold(self, tok: float, sec: float, n: int, t: float) -> tuple[float, float]:
        if sec == 0.0:  # NOTE: the first sample sets the level (no decay from zero)
            return float(n), t
        a = self.alpha
        return tok + a * (n - tok), sec + a * (t - sec)

    def rates(self) -> Rates:
        """The current estimate (0.0 for a kind of step never seen)."""
        p = self._p_tokens / self._p_secs if self._p_secs > 0 else 0.0
        d = self._d_tokens / self._d_secs if self._d_secs > 0 else 0.0
        return Rates(p, d)


def calibrate(
    engine: LLMEngine, num_prompt_tokens: int = 256, num_decode_steps: int = 8
) -> Rates:
    """Measure ``engine``'s rates once, before it serves (the replica's start-up probe).

    Runs one synthetic prompt of ``num_prompt_tokens`` (capped by the pool and model length)
    for ``num_decode_steps`` outputs through the real step path, so ``engine.rates`` holds the
    first figures; then drops the probe's cached blocks and KV events so the selection service
    never sees them. Must not run concurrently with other steps (call it before serving)."""
    from replicas.sampling_params import SamplingParams

    pool_tokens = engine.kv.num_blocks * engine.kv.block_size
    limit = min(engine.max_model_len - num_decode_steps - 1, pool_tokens // 2)
    n = max(min(num_prompt_tokens, limit), 1)
    # NOTE: token ids spread over the vocabulary; no prefix of a real prompt (no false hits).
    prompt = [(7919 * i + 13) % engine.vocab_size for i in range(n)]
    params = SamplingParams(max_tokens=num_decode_steps, temperature=0.0, ignore_eos=True)
    engine.generate([prompt], params)
    with engine.lock:
        engine.kv.reset_prefix_cache()
        engine.kv.take_events()
    return engine.rates.rates()
