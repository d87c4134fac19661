"""RateMeter: a replica's own prefill and decode rates, measured, never assumed.

The selection objective turns queued and uncached tokens into estimated seconds of TTFT with
each replica's prefill rate (ARCHITECTURE.md: "Rates are each replica's own, measured and
reported, never a constant of one GPU"). A replica measures its rates once at start
(``calibrate``: synthetic prefills, a few decode steps) and then follows its real steps with
a fit of step time to the step's work (``replicas/step_fit.py``):

    T ≈ fixed_s + c_p·P + c_d·D      P = prompt tokens, D = decode rows computed in the step

    prefill_tokens_per_s = P̄ / (fixed_s + c_p·P̄)     P̄ = recent prompt tokens per prefill step
    decode_tokens_per_s  = D̄ / (fixed_s + c_d·D̄)     D̄ = recent decode rows per decode step

i.e. each kind of work alone at its recent size, the step's fixed cost included once.

NOTE: why a fit. The meter before it kept two ratios of EWMAs split by step kind and counted a
mixed step's whole time as prefill, so a replica that decodes while it prefills (most steps
of a busy replica) reported a prefill rate up to ~2x low, the Load term overstated its queue,
and the objective spread requests off their cached replica (generated_shared_prefix, 32
replicas, seed 0: TTFT p99 0.0846 s with the configured rate, 0.0937 s with those reports).
NOTE: why at P̄ and not at a full step budget B (B / (fixed_s + c_p·B), the rate a long queue
drains at). A GPU step below the matmul's memory-bound knee (~200 tokens on an H100 for an
8B model) costs about the same whatever its size, so a fit over such steps has c_p ~ 0 and
extrapolating it to B overstated the rate 2-9x, differently on every replica (the spread
across 8 identical replicas was 27k-269k tokens/s on generated_shared_prefix; TTFT p99 2x
that of the configured rate). At P̄ the fit is used where it was measured (17k-53k there).

NOTE: the start-up probe's full-budget prefill stays in the fit as a step like the others. It
weighs with its work squared, so on a GPU it holds c_p near the compute-bound cost per token for
a few hundred steps of ~100-token chunks (which alone leave c_p ill-determined: below the knee
a chunk's size hardly changes the step time). Measured both ways (simulated, TinyServe, gsp at
8 replicas, seeds 0/1, p99 over the configured rate's): kept as data 1.03 / 1.00; as a prior
only (``StepTimeFit`` restarted after the probe) 1.10 / 1.14. The price: a replica that slows
down shows it at once in fixed_s and c_d, but in c_p only as the probe fades (half speed,
measured by the replica: its prefill rate 0.87x the healthy ones' after ~100 steps,
tests/benchmarks/test_bench_trace_faults.py).

Contract: not thread-safe; the engine core thread is the only writer. ``rates()`` may run on
another thread (the replica's reporting loop): it solves the fit (three unknowns,
microseconds) from the writer's sums without a lock, see ``StepTimeFit.coefficients``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from replicas.step_fit import StepCoefficients, StepTimeFit

if TYPE_CHECKING:
    from replicas.llm_engine import LLMEngine

# NOTE: 0.02 follows ~the last 50 steps (0.1 measured worse: the fit then follows each
# replica's momentary mix, and identical replicas report rates far apart; on the 8-replica
# matrix TTFT p99 geometric mean vs the configured rate, 1.03 at 0.1 and 1.005 at 0.02). 50
# steps: about a second on an H100, a few seconds to a minute on the CPU replica.
RATE_EWMA_ALPHA = 0.02


@dataclass(slots=True, frozen=True)
class Rates:
    """Measured rates in tokens per second (0.0 = not measured yet)."""

    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0


class RateMeter:
    """Prefill/decode rates from a fit of real steps' times to their work (module docstring)."""

    def __init__(self, alpha: float = RATE_EWMA_ALPHA) -> None:
        self.fit = StepTimeFit(alpha)
        self.alpha = alpha

    @property
    def num_steps(self) -> int:
        """Steps folded in so far."""
        return self.fit.num_steps

    def observe(
        self, num_prefill_tokens: int, num_decode_tokens: int, seconds: float, num_steps: int = 1
    ) -> None:
        """Fold in ``num_steps`` steps that did this work in ``seconds`` in all; a step with
        no tokens or no measurable time is ignored."""
        self.fit.observe(num_prefill_tokens, num_decode_tokens, seconds, num_steps)

    def coefficients(self) -> StepCoefficients:
        """The fitted step-time model (seconds)."""
        return self.fit.coefficients()

    def rates(self) -> Rates:
        """The current estimate (0.0 for a kind of step never seen)."""
        c = self.fit.coefficients()
        p_mean, d_mean = self.fit.mean_prefill_tokens, self.fit.mean_decode_tokens
        tp = c.step_time(p_mean, 0) if p_mean > 0 else 0.0
        td = c.step_time(0, d_mean) if d_mean > 0 else 0.0
        return Rates(p_mean / tp if tp > 0 else 0.0, d_mean / td if td > 0 else 0.0)


def calibrate(
    engine: LLMEngine, num_prompt_tokens: int | None = None, num_decode_steps: int = 4
) -> Rates:
    """Measure ``engine``'s rates once, before it serves (the replica's start-up probe).

    Runs two synthetic prompts one after the other, of ``num_prompt_tokens`` (default: the
    engine's token budget per step; capped by the pool and model length) and a quarter of
    that, each for ``num_decode_steps`` outputs, through the real step path, so
    ``engine.rates`` holds the first figures; then drops the probe's cached blocks and KV
    events so the selection service never sees them. Must not run concurrently with other
    steps (call it before serving)."""
    from replicas.sampling_params import SamplingParams

    pool_tokens = engine.kv.num_blocks * engine.kv.block_size
    limit = min(engine.max_model_len - num_decode_steps - 1, pool_tokens // 2)
    budget = engine.scheduler.max_num_batched_tokens
    wanted = budget if num_prompt_tokens is None else num_prompt_tokens
    n = max(min(wanted, limit), 1)
    params = SamplingParams(max_tokens=num_decode_steps, temperature=0.0, ignore_eos=True)
    # NOTE: two prompt sizes, so the fit can tell the fixed cost of a step from the cost per
    # prompt token; token ids spread over the vocabulary, no prefix of a real prompt (no false
    # hits), and the second is not a prefix of the first (it is computed, not cached).
    for size, salt in ((n, 13), (max(n // 4, 1), 5)):
        prompt = [(7919 * i + salt) % engine.vocab_size for i in range(size)]
        engine.generate([prompt], params)
    with engine.lock:
        engine.kv.reset_prefix_cache()
        engine.kv.take_events()
    return engine.rates.rates()
