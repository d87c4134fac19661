"""serve_overhead's figures: client samples -> RunResult (throughput, TTFT, TPOT), the per-hop
breakdown joined with the ingress traces, and the console table. Pure functions of their
inputs (tested without Ray: tests/benchmarks/test_bench_serve_overhead.py)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.serve_overhead_report import HOPS, pct, reference_side


@dataclass(slots=True)
class Sample:
    send: float
    first: float  # first output (streaming), else = last
    last: float
    num_output_tokens: int
    response_id: str = ""


@dataclass(slots=True)
class RunResult:
    side: str  # "engine" or "served"
    endpoint: str  # "completions" / "chat"
    stream: bool
    concurrency: int
    num_requests: int
    num_errors: int
    output_tok_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    latency_p50_ms: float
    wall_s: float
    hops_ms: dict[str, float] = field(default_factory=dict)
    # NOTE: the engine core's own TTFT of each request (both sides), in the clients' send order
    # (is a slow cell slow throughout, or in its first requests?)
    engine_ttft_ms: list[float] = field(default_factory=list)
    num_early: int = 0  # served: requests the replica started early (replicas/early_start.py)
    # served with --cpu-roles: where the run's CPU went (path_capacity_procs.cpu_report)
    cpu: dict[str, Any] = field(default_factory=dict)


def summarize(side: str, endpoint: str, stream: bool, c: int, samples: list[Sample],
              errors: int) -> RunResult:
    wall = max(s.last for s in samples) - min(s.send for s in samples)
    ttft = [1e3 * (s.first - s.send) for s in samples]
    tpot = [1e3 * (s.last - s.first) / (s.num_output_tokens - 1) for s in samples
            if s.num_output_tokens > 1]
    return RunResult(
        side=side, endpoint=endpoint, stream=stream, concurrency=c, num_requests=len(samples),
        num_errors=errors, output_tok_s=sum(s.num_output_tokens for s in samples) / wall,
        ttft_p50_ms=statistics.median(ttft) if stream else None,
        ttft_p99_ms=pct(ttft, 0.99) if stream else None,
        tpot_p50_ms=statistics.median(tpot) if stream and tpot else None,
        tpot_p99_ms=pct(tpot, 0.99) if stream and tpot else None,
        latency_p50_ms=statistics.median(1e3 * (s.last - s.send) for s in samples),
        wall_s=wall,
    )


def _lag(v: float | None) -> float:
    return float("nan") if v is None or v < 0 else v


def medians(rows: dict[str, list[float]]) -> dict[str, float]:
    """The median milliseconds of each hop (``benchmarks.serve_overhead_report.HOPS``) from
    ``hop_rows`` (hops without any value left out)."""
    return {k: statistics.median(v) for k, v in rows.items() if v}


def hop_rows(samples: list[Sample], traces: list[dict[str, Any]], stream: bool
             ) -> dict[str, list[float]]:
    """Milliseconds of each hop per request, in the clients' send order, joining the client's
    samples with the ingress traces by response id (a request without a trace, or a hop
    without its stamps, is left out of that hop). Client stamps are ``perf_counter``; they are
    moved onto the wall clock through one offset."""
    offset = time.time() - time.perf_counter()
    by_id = {t["response_id"]: t for t in traces}
    rows: dict[str, list[float]] = {h: [] for h, _ in HOPS}
    for s in sorted(samples, key=lambda x: x.send):
        t = by_id.get(s.response_id)
        if t is None or not t.get("engine_add"):
            continue
        send, first, last = s.send + offset, s.first + offset, s.last + offset
        vals = {
            "client_to_ingress": t["recv"] - send,
            "parse_tokenize": t["tokenized"] - t["recv"],
            # NOTE: traces from before the ``parsed`` stamp have none: NaN, skipped.
            "read_parse": t["parsed"] - t["recv"] if t.get("parsed") else float("nan"),
            "tokenize": t["tokenized"] - t["parsed"] if t.get("parsed") else float("nan"),
            "router_select": t["replica_recv"] - t["tokenized"],
            "replica_queue": t["engine_add"] - t["replica_recv"],
            "serve_call_behind": (t["replica_claim"] - t["replica_recv"]
                                  if t.get("replica_claim") else float("nan")),
            "engine_ttft": t["engine_first_token"] - t["engine_add"],
            "engine_total": t["engine_finish"] - t["engine_add"],
            "detokenize": t["detokenize_s"],
            "engine_to_replica_yield": t["replica_first_yield"] - t["engine_first_token"],
            "replica_to_ingress_first": t["first_out"] - t["replica_first_yield"],
            "replica_to_ingress_mean": t["hop_sum_s"] / max(t["num_outputs_received"], 1),
            "ingress_last": t["last_sent"] - t["last_out"],
            "ingress_to_client_first": first - t["first_sent"] if stream else float("nan"),
            "ingress_to_client_last": last - t["last_sent"],
            "after_engine_finish": last - t["engine_finish"],
            "client_total": last - send,
            # NOTE: -1.0 = not sampled (no --loop-lag): made NaN, skipped.
            "ingress_lag_before_recv": _lag(t.get("lag_before_recv_s")),
            "ingress_main_lag_before_recv": _lag(t.get("main_lag_before_recv_s")),
            "ingress_lag_life": _lag(t.get("lag_life_s")),
            "replica_lag_before_recv": _lag(t.get("replica_lag_before_s")),
            "replica_lag_queue": _lag(t.get("replica_lag_queue_s")),
        }
        for k, v in vals.items():
            if v == v:  # NOTE: skips NaN (no first chunk when not streaming)
                rows[k].append(1e3 * v)
    return rows


def print_table(results: list[RunResult]) -> None:
    sides = {r.side for r in results}
    engine = {(r.side, r.endpoint, r.concurrency): r for r in results
              if r.side.startswith("engine")}
    head = (f"{'side':<12}{'endpoint':<13}{'stream':<8}{'c':>5}{'tok/s':>9}{'ratio':>7}"
            f"{'TTFT p50':>10}{'p99':>9}{'TPOT p50':>10}{'p99':>9}{'lat p50':>10}{'err':>5}")
    print(head)
    print("-" * len(head))

    def ms(v: float | None) -> str:
        return f"{v:.1f}" if v is not None else "-"

    for r in results:
        base = engine.get((reference_side(r.side, sides), r.endpoint, r.concurrency))
        ratio = r.output_tok_s / base.output_tok_s if base else float("nan")
        print(f"{r.side:<12}{r.endpoint:<13}{r.stream!s:<8}{r.concurrency:>5}"
              f"{r.output_tok_s:>9.1f}{ratio:>7.2f}{ms(r.ttft_p50_ms):>10}{ms(r.ttft_p99_ms):>9}"
              f"{ms(r.tpot_p50_ms):>10}{ms(r.tpot_p99_ms):>9}{r.latency_p50_ms:>10.1f}"
              f"{r.num_errors:>5}")
