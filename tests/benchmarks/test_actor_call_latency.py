"""benchmarks/actor_call_latency.py: both kinds of call timed through a real local Ray."""

from benchmarks.actor_call_latency import run


def test_both_calls_are_timed_and_their_ratio_reported() -> None:
    res = run(requests=5)
    for kind in ("plain", "streaming"):
        assert 0 < res[kind]["p50_ms"] <= res[kind]["p90_ms"] < 1000
    assert res["streaming_over_plain_p50"] == res["streaming"]["p50_ms"] / res["plain"]["p50_ms"]
