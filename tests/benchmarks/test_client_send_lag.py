"""benchmarks/client_send_lag.py: a real openai client against the in-process HTTP server."""

import asyncio

from benchmarks.client_send_lag import measure


def test_every_request_of_every_timed_wave_arrives() -> None:
    row = asyncio.run(measure(3, waves=5, prompt_words=8))
    assert row["concurrency"] == 3
    assert row["num_requests"] == 3 * (5 - 3)  # NOTE: the first 3 waves are warm-up
    assert row["lag_p50_ms"] > 0 and row["wave_slowest_p50_ms"] > 0
