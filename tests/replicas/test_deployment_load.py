"""The load a replica reports: tokens still to compute, not prompt + max_tokens forever."""

from __future__ import annotations

from replicas.deployment import remaining_work_tokens
from replicas.outputs import RequestMetrics, RequestOutput


def _out(num_output: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        new_token_ids=[1] if num_output else [],
        text_delta="",
        finished=finished,
        finish_reason="length" if finished else None,
        num_prompt_tokens=100,
        num_cached_tokens=64,
        num_output_tokens=num_output,
        logprobs=None,
        metrics=RequestMetrics(queue_time_s=None, ttft_s=None, tpot_s=None),
    )


def test_remaining_work_shrinks_as_the_request_progresses() -> None:
    assert remaining_work_tokens(100, 20, None) == 120  # queued: all of it
    assert remaining_work_tokens(100, 20, _out(0)) == 120  # nothing out yet
    assert remaining_work_tokens(100, 20, _out(1)) == 19  # prompt done, 19 outputs owed
    assert remaining_work_tokens(100, 20, _out(20, finished=True)) == 0
    assert remaining_work_tokens(100, 20, _out(25)) == 0  # never negative
