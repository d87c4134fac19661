"""replicas.loop_lag: the loop-lag sampler finds a blocked loop and answers windows; the
ingress's trace log stamps it; the benchmark's hop table reads it (and skips unsampled)."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.serve_overhead_stats import Sample, hop_rows, medians
from cluster.serve.openai_trace import IngressTrace, TraceLog
from replicas.loop_lag import ENV, LoopLag


def test_windows_take_the_worst_wakeup_whose_late_stretch_overlaps() -> None:
    lag = LoopLag(0.002)
    for wall, g in [(10.0, 0.001), (10.5, 0.2), (11.0, 0.004), (12.0, 0.05)]:
        lag.record(wall, g)
    assert lag.max_between(10.0, 10.4) == 0.2  # NOTE: blocked over [10.3, 10.5]
    assert lag.max_between(10.0, 10.29) == 0.001
    assert lag.max_between(10.6, 11.5) == 0.004  # NOTE: 12.0's stretch starts at 11.95
    assert lag.max_between(10.6, 11.96) == 0.05
    assert lag.max_between(12.1, 13.0) == 0.0
    assert lag.max_between(0.0, 100.0) == 0.2


def test_a_blocked_loop_shows_as_lag_in_its_window() -> None:
    async def main() -> tuple[float, float]:
        lag = LoopLag(0.002)
        lag.ensure_running()
        lag.ensure_running()  # NOTE: idempotent: one task
        await asyncio.sleep(0.02)
        t0 = time.time()
        time.sleep(0.08)  # NOTE: the loop is blocked
        t1 = time.time()
        await asyncio.sleep(0.02)
        lag.stop()
        return lag.max_between(t0, t1), lag.max_between(t0 - 100.0, t0 - 50.0)

    blocked, before = asyncio.run(main())
    assert blocked >= 0.07
    assert before == 0.0  # NOTE: nothing sampled back then


def test_env_names_the_period_in_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert LoopLag.from_env() is None
    monkeypatch.setenv(ENV, "0")
    assert LoopLag.from_env() is None
    monkeypatch.setenv(ENV, "2.5")
    lag = LoopLag.from_env()
    assert lag is not None and lag.period_s == pytest.approx(0.0025)
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match="milliseconds"):
        LoopLag.from_env()
    with pytest.raises(ValueError):
        LoopLag(0.0)


def test_trace_log_stamps_the_ingress_lag_and_hops_read_it() -> None:
    lag = LoopLag(0.002)
    now = time.time()
    lag.record(now - 0.04, 0.025)  # before recv
    lag.record(now + 0.2, 0.010)  # during the request
    log = TraceLog(loop_lag=lag)
    t = IngressTrace("cmpl-1", recv=now, parsed=now, tokenized=now + 0.001)
    t.last_sent = now + 0.3
    log.add(t)
    untraced = TraceLog()
    u = IngressTrace("cmpl-2", recv=now)
    untraced.add(u)
    (d,), (e,) = log.take(), untraced.take()
    assert d["lag_before_recv_s"] == 0.025 and d["lag_life_s"] == 0.010
    assert e["lag_before_recv_s"] == -1.0 and e["lag_life_s"] == -1.0
    # the hop table: sampled lag in ms, unsampled skipped
    offset = time.time() - time.perf_counter()
    base = {"recv": now, "parsed": now, "tokenized": now, "replica_recv": now, "engine_add": now,
            "engine_first_token": now, "engine_finish": now, "detokenize_s": 0.0,
            "replica_first_yield": now, "first_out": now, "last_out": now, "hop_sum_s": 0.0,
            "num_outputs_received": 1, "first_sent": now, "last_sent": now}
    sample = Sample(send=now - offset, first=now - offset, last=now - offset,
                    num_output_tokens=1, response_id="cmpl-1")
    hops = medians(hop_rows([sample], [{**base, **d, "replica_lag_before_s": 0.003,
                                        "replica_lag_queue_s": -1.0}], stream=True))
    assert hops["ingress_lag_before_recv"] == pytest.approx(25.0)
    assert hops["replica_lag_before_recv"] == pytest.approx(3.0)
    assert "replica_lag_queue" not in hops
    hops = medians(hop_rows([sample], [{**base, **e}], stream=True))
    assert "ingress_lag_before_recv" not in hops


def test_a_sampler_on_another_threads_loop_is_read_from_this_one() -> None:
    import threading

    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    try:
        async def main() -> float:
            lag = LoopLag(0.002)
            lag.ensure_running(other)
            await asyncio.sleep(0.02)
            t0 = time.time()
            other.call_soon_threadsafe(time.sleep, 0.08)  # NOTE: blocks the other loop only
            await asyncio.sleep(0.15)
            lag.stop()
            return lag.max_between(t0, time.time())

        assert asyncio.run(main()) >= 0.07
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(timeout=5)


def test_trace_log_samples_serves_main_loop_only_when_it_is_another_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from cluster.serve import openai_trace

    async def outside_serve() -> LoopLag | None:
        log = TraceLog(loop_lag=LoopLag(0.002), main_lag=LoopLag(0.002))
        log.sample_loops()
        assert log.loop_lag is not None
        log.loop_lag.stop()
        return log.main_lag

    assert asyncio.run(outside_serve()) is None  # NOTE: not in a Serve replica

    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(openai_trace, "serve_main_loop", lambda: other)
    try:
        async def in_replica() -> dict[str, float]:
            log = TraceLog(main_lag=LoopLag(0.002))
            log.sample_loops()
            await asyncio.sleep(0.02)
            other.call_soon_threadsafe(time.sleep, 0.06)
            await asyncio.sleep(0.1)
            t = IngressTrace("cmpl-3", recv=time.time())
            log.add(t)
            assert log.main_lag is not None
            log.main_lag.stop()
            return log.take()[0]

        d = asyncio.run(in_replica())
        assert d["main_lag_before_recv_s"] >= 0.05
        assert d["lag_before_recv_s"] == -1.0
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(timeout=5)
