"""benchmarks/client_send_lag.py: a real openai client against the in-process HTTP server."""

import asyncio

from benchmarks.client_send_lag import measure


def test_every_request_of_every_timed_wave_arrives() -> None:
    row = asyncio.run(measure(3, waves=5, prompt_words=8))
    assert row["concurrency"] == 3
    assert row["num_requests"] == 3 * (5 - 3)  # NOTE: the first 3 waves are warm-up
    assert row["lag_p50_ms"] > 0 and row["wave_slowest_p50_ms"] > 0


def test_first_waves_measure_both_waves_with_and_without_warm_up() -> None:
    from benchmarks.client_send_lag import first_waves

    for warm in (False, True):
        row = asyncio.run(first_waves(2, warm, prompt_words=8))
        assert row["warm"] is warm and row["concurrency"] == 2
        assert row["first_wave_p50_ms"] > 0 and row["second_wave_p50_ms"] > 0
