"""What the engine hands back per step and per request (typed, no engine internals)."""

from __future__ import annotations

from dataclasses import dataclass

# One generated token's top-n: token_id -> log-probability (includes the sampled token).
TokenLogprobs = dict[int, float]


@dataclass(slots=True)
class RequestMetrics:
    """Latency accounting of one request, in seconds (None until known).

    queue_time_s: arrival -> first scheduled; ttft_s: arrival -> first output token;
    tpot_s: mean time per output token after the first.
    """

    queue_time_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass(slots=True)
class RequestTrace:
    """Wall-clock stamps (``time.time()``, seconds) of one request inside a replica, carried
    on its last output only: the replica's half of the per-hop breakdown
    (``cluster.serve.openai_trace`` adds the ingress's half). 0.0 = not stamped.

    replica_recv: the replica's ``generate`` entered, or the router's early start arrived
    (``replicas.early_start``); replica_claim: Serve's call claimed that early start (0.0:
    not started early); engine_add: the engine accepted it;
    engine_first_token / engine_finish: its first / last token sampled; replica_first_yield:
    its first output left the replica; detokenize_s: time spent turning its tokens into text;
    replica_lag_*: how busy the replica's loop was around them (``replicas.loop_lag``).
    NOTE: one host's wall clock is shared by its processes, so hops between processes are
    differences of these stamps; across hosts they carry the clocks' skew.
    """

    replica_recv: float = 0.0
    replica_claim: float = 0.0
    engine_add: float = 0.0
    engine_first_token: float = 0.0
    engine_finish: float = 0.0
    replica_first_yield: float = 0.0
    detokenize_s: float = 0.0
    num_outputs: int = 0
    # NOTE: the replica loop's worst timer lag (``replicas.loop_lag``; -1.0 = not sampled)
    # in the 100 ms before replica_recv, and between replica_recv and engine_add.
    replica_lag_before_s: float = -1.0
    replica_lag_queue_s: float = -1.0


@dataclass(slots=True)
class RequestOutput:
    """One streamed delta of a request.

    ``new_token_ids`` / ``text_delta`` / ``logprobs`` cover only what is new since the previous
    output of this request. The counters are cumulative. ``num_cached_tokens`` is the prefix-hit
    length at the request's first scheduling. ``finished`` is set on the last output, with
    ``finish_reason`` "stop" (EOS, stop token, stop string), "length" or "abort".
    ``emit_time`` is the wall-clock time the replica handed it on (0.0 inside the engine);
    ``trace`` is set on the last output only. ``index`` is the sequence's choice index
    among a parallel-sampling request's ``n`` (0 otherwise).
    """

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprobs] | None
    metrics: RequestMetrics
    emit_time: float = 0.0
    trace: RequestTrace | None = None
    index: int = 0


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """``first`` then ``later`` of one request as one delta (counters, state: ``later``'s).

    NOTE: a stream whose consumer falls behind gets its queued deltas merged, as vLLM's
    output collector does, so a slow client costs one hop per read, not one per token.
    """
    logprobs = None
    if first.logprobs is not None or later.logprobs is not None:
        logprobs = [*(first.logprobs or []), *(later.logprobs or [])]
    return RequestOutput(
        later.request_id,
        [*first.new_token_ids, *later.new_token_ids],
        first.text_delta + later.text_delta,
        later.finished,
        later.finish_reason,
        later.num_prompt_tokens,
        later.num_cached_tokens,
        later.num_output_tokens,
        logprobs,
        later.metrics,
        later.emit_time,
        later.trace,
        later.index,
    )
