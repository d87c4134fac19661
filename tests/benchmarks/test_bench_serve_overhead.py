"""serve_overhead: run summaries, the hop join of client samples with ingress traces, reports."""

from __future__ import annotations

import time
from typing import Any

import pytest

from benchmarks.serve_overhead_report import pick_side, render_comparison, render_markdown
from benchmarks.serve_overhead_stats import Sample, hop_rows, medians, summarize


def test_summary_rates_and_streaming_only_latencies() -> None:
    samples = [Sample(0.0, 0.1, 1.1, 11), Sample(0.5, 0.7, 2.0, 11)]
    r = summarize("served", "chat", True, 2, samples, 0)
    assert r.output_tok_s == pytest.approx(22 / 2.0)
    assert r.ttft_p50_ms == pytest.approx(150.0)
    assert r.tpot_p50_ms == pytest.approx(((1.0 / 10) + (1.3 / 10)) / 2 * 1e3)
    flat = summarize("served", "chat", False, 2, samples, 0)
    assert flat.ttft_p50_ms is None and flat.tpot_p50_ms is None


def test_hops_join_by_response_id_and_add_up() -> None:
    off = time.time() - time.perf_counter()
    send = 100.0
    t = {"response_id": "a", "recv": send + off + 0.010, "tokenized": send + off + 0.012,
         "replica_recv": send + off + 0.015, "engine_add": send + off + 0.016,
         "engine_first_token": send + off + 0.116, "engine_finish": send + off + 1.0,
         "detokenize_s": 0.002, "replica_first_yield": send + off + 0.117,
         "first_out": send + off + 0.119, "last_out": send + off + 1.003,
         "first_sent": send + off + 0.120, "last_sent": send + off + 1.004,
         "hop_sum_s": 0.02, "num_outputs_received": 10}
    sample = Sample(send, send + 0.122, send + 1.006, 10, "a")
    other = Sample(send, send + 0.2, send + 2.0, 10, "unknown")  # no trace: left out
    hops = medians(hop_rows([sample, other], [t], stream=True))
    assert hops["client_to_ingress"] == pytest.approx(10.0, abs=0.01)
    assert hops["parse_tokenize"] == pytest.approx(2.0, abs=0.01)
    assert hops["router_select"] == pytest.approx(3.0, abs=0.01)
    assert hops["engine_ttft"] == pytest.approx(100.0, abs=0.01)
    assert hops["replica_to_ingress_mean"] == pytest.approx(2.0, abs=0.01)
    assert hops["ingress_to_client_first"] == pytest.approx(2.0, abs=0.01)
    assert hops["after_engine_finish"] == pytest.approx(6.0, abs=0.01)
    assert hops["client_total"] == pytest.approx(1006.0, abs=0.01)
    assert "ingress_to_client_first" not in medians(hop_rows([sample], [t], stream=False))
    assert "read_parse" not in hops and "tokenize" not in hops  # no ``parsed`` stamp: no split
    split = medians(hop_rows([sample], [{**t, "parsed": send + off + 0.0115}], stream=True))
    assert split["read_parse"] == pytest.approx(1.5, abs=0.01)
    assert split["tokenize"] == pytest.approx(0.5, abs=0.01)
    assert split["read_parse"] + split["tokenize"] == pytest.approx(split["parse_tokenize"])


def test_hop_rows_keep_each_request_in_the_clients_send_order() -> None:
    off = time.time() - time.perf_counter()
    stamps = ("recv", "tokenized", "replica_recv", "engine_add", "replica_first_yield",
              "first_out", "last_out", "first_sent", "last_sent", "engine_finish")

    def trace(rid: str, send: float, ttft_s: float) -> dict:
        t = {k: send + off for k in stamps}
        return {**t, "response_id": rid, "engine_first_token": send + off + ttft_s,
                "detokenize_s": 0.0, "hop_sum_s": 0.0, "num_outputs_received": 1}

    # NOTE: samples arrive in completion order; the rows follow the send order
    late, early = Sample(2.0, 2.1, 2.2, 1, "late"), Sample(1.0, 1.5, 3.0, 1, "early")
    rows = hop_rows([late, early], [trace("late", 2.0, 0.030), trace("early", 1.0, 0.025)],
                    stream=True)
    assert rows["engine_ttft"] == pytest.approx([25.0, 30.0], abs=0.01)
    assert medians(rows)["engine_ttft"] == pytest.approx(27.5, abs=0.01)
    assert "read_parse" not in medians(rows)  # NOTE: no ``parsed`` stamp: an empty row


def test_reports_show_ratios_against_the_engine() -> None:
    def res(side: str, tok_s: float, stream: bool = True) -> dict:
        return {"side": side, "endpoint": "chat", "stream": stream, "concurrency": 4,
                "output_tok_s": tok_s, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0,
                "tpot_p50_ms": 3.0, "tpot_p99_ms": 4.0, "latency_p50_ms": 5.0, "num_errors": 0,
                "hops_ms": {"parse_tokenize": 1.5} if side == "served" else {}}

    data = {"device": "cpu", "machine": "m", "cpu_count": 2, "total_s": 1.0, "label": "x",
            "config": {"model": "smollm2", "prompt_len": 64, "output_len": 32,
                       "stream_interval": 1, "concurrency": [4]},
            "results": [res("engine", 100.0), res("served", 80.0)]}
    md = render_markdown(data)
    assert "| served | chat | yes | 4 | 80.0 | 0.80 |" in md
    assert "| parse_tokenize: ingress parse + validate + tokenize | 1.50 |" in md
    later = {**data, "results": [res("engine", 100.0), res("served", 90.0)]}
    cmp = render_comparison([("before", data), ("after", later)])
    assert "| chat stream c=4 | 0.80 | 0.90 |" in cmp
    assert "| parse_tokenize | 1.5 / 1.5 |" in cmp


def test_process_core_rows_get_their_own_hop_columns_and_compare_against_the_thread() -> None:
    def res(side: str, tok_s: float) -> dict:
        return {"side": side, "endpoint": "completions", "stream": True, "concurrency": 16,
                "output_tok_s": tok_s, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0,
                "tpot_p50_ms": 3.0, "tpot_p99_ms": 4.0, "latency_p50_ms": 5.0, "num_errors": 0,
                "hops_ms": {} if side == "engine" else {"engine_total": tok_s}}

    data = {"device": "cpu", "machine": "m", "cpu_count": 2, "total_s": 1.0, "label": "",
            "config": {"model": "smollm2", "prompt_len": 64, "output_len": 32,
                       "stream_interval": 1, "concurrency": [16]},
            "results": [res("engine", 100.0), res("served", 70.0), res("served-proc", 90.0)]}
    md = render_markdown(data)
    assert "| served-proc | completions | yes | 16 | 90.0 | 0.90 |" in md
    assert "| hop | comp s c16 | proc comp s c16 |" in md
    cmp = render_comparison([("thread", pick_side(data, "served")),
                             ("proc", pick_side(data, "served-proc"))])
    assert "| completions stream c=16 | 0.70 | 0.90 |" in cmp
    assert "| engine_total | 70.0 / 90.0 |" in cmp


def test_variant_passes_keep_their_names_and_compare_against_their_core() -> None:
    def res(side: str, tok_s: float) -> dict:
        return {"side": side, "endpoint": "completions", "stream": True, "concurrency": 1,
                "output_tok_s": tok_s, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0,
                "tpot_p50_ms": 3.0, "tpot_p99_ms": 4.0, "latency_p50_ms": 5.0, "num_errors": 0,
                "hops_ms": {} if side.startswith("engine") else {"engine_total": tok_s}}

    data = {"device": "gpu", "machine": "m", "cpu_count": 16, "total_s": 1.0, "label": "",
            "config": {"model": "random-8b", "prompt_len": 1024, "output_len": 128,
                       "stream_interval": 8, "concurrency": [1]},
            "results": [res("engine", 50.0), res("engine-proc", 100.0),
                        {**res("served-proc@1", 95.0), "num_early": 19, "num_requests": 20},
                        {**res("served-proc:no-early@1", 90.0), "num_requests": 20}]}
    md = render_markdown(data)
    assert "| requests started early / requests | 19 / 20 | 0 / 20 |" in md
    assert "| served-proc:no-early@1 | completions | yes | 1 | 90.0 | 0.90 |" in md
    assert "| hop | proc@1 comp s c1 | proc:no-early@1 comp s c1 |" in md


def test_the_process_core_is_compared_with_the_engine_alone_on_the_same_core() -> None:
    def res(side: str, tok_s: float) -> dict:
        return {"side": side, "endpoint": "completions", "stream": False, "concurrency": 64,
                "output_tok_s": tok_s, "ttft_p50_ms": None, "ttft_p99_ms": None,
                "tpot_p50_ms": None, "tpot_p99_ms": None, "latency_p50_ms": 5.0,
                "num_errors": 0, "hops_ms": {}}

    data = {"device": "gpu", "machine": "m", "cpu_count": 16, "total_s": 1.0, "label": "",
            "config": {"model": "random-1b", "prompt_len": 1024, "output_len": 128,
                       "stream_interval": 8, "concurrency": [64]},
            "results": [res("engine", 100.0), res("engine-proc", 160.0), res("served", 80.0),
                        res("served-proc", 120.0)]}
    md = render_markdown(data)
    assert "| served | completions | no | 64 | 80.0 | 0.80 |" in md
    assert "| served-proc | completions | no | 64 | 120.0 | 0.75 |" in md  # 120 / 160
    assert "| engine-proc | completions | no | 64 | 160.0 | 1.60 |" in md


def test_each_client_process_warms_up_with_c_requests_before_the_measured_ones() -> None:
    """client_run against a real HTTP server: ``c`` one-token requests first, then the prompts;
    only the prompts become samples."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from benchmarks.serve_overhead_served import Prompt, client_run

    seen: list[tuple[int, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append((body["max_tokens"], body["prompt"]))
            out = json.dumps({
                "id": f"cmpl-{len(seen)}", "object": "text_completion", "created": 0,
                "model": "m", "usage": {"prompt_tokens": 1, "completion_tokens":
                                        body["max_tokens"], "total_tokens": 2},
                "choices": [{"index": 0, "text": "x", "finish_reason": "length",
                             "logprobs": None}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prompts = [Prompt(f"prompt {i}", [i]) for i in range(5)]
        url = f"http://127.0.0.1:{server.server_address[1]}"
        samples, errors = client_run([url], "m", prompts, 3, "completions", False, 7)
    finally:
        server.shutdown()
    assert errors == 0 and len(samples) == 5
    assert seen[:3] == [(1, "warm up")] * 3  # NOTE: all warm-ups land before any prompt
    assert sorted(p for _, p in seen[3:]) == [f"prompt {i}" for i in range(5)]
    assert all(n == 7 for n, _ in seen[3:]) and all(s.num_output_tokens == 7 for s in samples)


def test_results_are_saved_after_every_run_and_marked_partial_until_the_end(tmp_path) -> None:
    import argparse
    import json

    from benchmarks.serve_overhead import save_results
    from benchmarks.serve_overhead_stats import RunResult

    out = tmp_path / "run.json"
    args = argparse.Namespace(json=out, label="", model="tiny", prompt_len=64, output_len=8,
                              stream_interval=1, concurrency=[1])
    engine = RunResult("engine", "chat", True, 1, 4, 0, 100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.0)
    save_results(args, "cpu", [engine], 1.0, partial=True)
    data = json.loads(out.read_text())
    assert data["partial"] is True and [r["side"] for r in data["results"]] == ["engine"]
    assert "PARTIAL" in out.with_suffix(".md").read_text()
    served = RunResult("served", "chat", True, 1, 4, 0, 90.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.0)
    save_results(args, "cpu", [engine, served], 2.0, partial=False)
    data = json.loads(out.read_text())
    assert data["partial"] is False and len(data["results"]) == 2
    md = out.with_suffix(".md").read_text()
    assert "PARTIAL" not in md and "| served | chat | yes | 1 | 90.0 | 0.90 |" in md
    save_results(argparse.Namespace(json=None), "cpu", [engine], 1.0, partial=True)  # no file


@pytest.mark.parametrize("warm_pass", [True, False])
def test_the_served_side_warms_each_cell_like_the_engine_side(monkeypatch, warm_pass) -> None:
    """measure_served: with --warm-pass an unmeasured run of the first mode precedes each
    (endpoint, concurrency), and its traces never reach a measured run's hops or early count."""
    import argparse

    from benchmarks import serve_overhead_served as so
    from benchmarks.serve_overhead_served import Prompt

    calls: list[tuple[str, int, bool, str | None]] = []
    pending: list[dict] = []  # NOTE: the ingress's trace log, emptied by served_traces

    def run_served(url, model_name, prompts, c, endpoint, stream, args, side=None):
        calls.append((endpoint, c, stream, side))
        rid = f"{endpoint}-{c}-{stream}-{side}"
        pending.append({"response_id": rid, "replica_claim": 1.0, "ingress_recv": 0.0})
        return (summarize(side or "served", endpoint, stream, c, [Sample(0, 0.1, 0.2, 2, rid)], 0),
                [Sample(0, 0.1, 0.2, 2, rid)])

    def served_traces(num_ingress=1):
        out = list(pending)
        pending.clear()
        return out

    monkeypatch.setattr(so, "run_served", run_served)
    monkeypatch.setattr(so, "served_traces", served_traces)
    monkeypatch.setattr(so, "hop_rows",
                        lambda samples, traces, stream: {"engine_ttft": [float(len(traces))]})
    workload = {(e, c): [Prompt("p", [1])] for e in ("completions", "chat") for c in (1, 16)}
    args = argparse.Namespace(warm_pass=warm_pass, modes=["stream", "nostream"])
    results = list(so.measure_served("u", "m", workload, args, "served", 1))

    expected: list[tuple[str, int, bool, str | None]] = []
    for e, c in workload:
        expected += [(e, c, True, None)] * warm_pass  # NOTE: the unmeasured run, side unset
        expected += [(e, c, True, "served"), (e, c, False, "served")]
    assert calls == expected
    assert [(r.endpoint, r.concurrency, r.stream) for r in results] == [
        x[:3] for x in expected if x[3] == "served"]
    assert all(r.hops_ms == {"engine_ttft": 1.0} and r.engine_ttft_ms == [1.0]
               and r.num_early == 1 for r in results)


def test_cpu_window_sees_a_client_process_burn_cpu() -> None:
    """The window's snapshots bracket the clients' work: a spawned child spinning ~0.4 s shows
    as the client role, per request, and as its busiest process's share of the window."""
    import multiprocessing

    from benchmarks.serve_overhead_served import CpuWindow

    window = CpuWindow(time.time() + 0.2)
    time.sleep(0.3)  # NOTE: past start_at: the first snapshot is taken
    ctx = multiprocessing.get_context("spawn")
    spun, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_spin, args=(0.4, spun, release))
    child.start()
    try:
        # NOTE: the child stays alive until told to go, as the pool's clients do while the
        # window stops: a snapshot racing the child's exit would miss it (a CI flake).
        assert spun.wait(timeout=60.0)
        usage = window.stop(num_requests=2)
    finally:
        release.set()
        child.join()
    assert usage["ms_per_req"]["client"] > 50.0
    assert 0.0 < usage["busiest"]["client"] <= 1.05 and 0.0 < usage["busy"] <= 1.0


def _spin(seconds: float, spun: Any, release: Any) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    spun.set()
    release.wait(timeout=60.0)


def test_the_report_renders_cpu_by_role() -> None:
    row = {"side": "served-proc", "endpoint": "completions", "stream": True, "concurrency": 64,
           "num_requests": 10, "num_errors": 0, "output_tok_s": 10.0, "ttft_p50_ms": 1.0,
           "ttft_p99_ms": 1.0, "tpot_p50_ms": 1.0, "tpot_p99_ms": 1.0, "latency_p50_ms": 1.0,
           "wall_s": 1.0, "hops_ms": {"engine_ttft": 1.0},
           "cpu": {"ms_per_req": {"ingress": 3.25, "rest": 1.0}, "busiest": {"ingress": 0.91},
                   "busy": 0.4, "cores": 16}}
    data = {"config": {"model": "m", "prompt_len": 1, "output_len": 1, "stream_interval": 1,
                       "concurrency": [64]}, "device": "d", "machine": "x", "cpu_count": 16,
            "total_s": 1.0, "results": [row]}
    md = render_markdown(data)
    assert "| ingress | 3.25 (0.91) |" in md and "| rest | 1.00 (-) |" in md
    assert "| host busy (of its cores) | 0.40 of 16 |" in md and "| client |" not in md


def test_the_engine_side_keeps_the_cores_own_ttft_in_send_order() -> None:
    """run_engine reads the core's stamps off each request's last output (as the served side
    does through the replica), so the two sides' engine TTFTs compare like with like."""
    import argparse
    from types import SimpleNamespace as Out

    from benchmarks.serve_overhead import run_engine
    from benchmarks.serve_overhead_served import Prompt
    from replicas.outputs import RequestTrace

    class Engine:  # NOTE: outputs carry only the fields run_engine reads
        async def generate(self, request_id, token_ids, params):
            k = int(request_id.rsplit("-", 1)[1])
            yield Out(new_token_ids=[1], num_output_tokens=1, trace=None)
            trace = RequestTrace(engine_add=100.0, engine_first_token=100.0 + 0.001 * (k + 1))
            yield Out(new_token_ids=[2], num_output_tokens=2, trace=trace)

    args = argparse.Namespace(output_len=2)
    r = run_engine(Engine(), [Prompt("p", [1])] * 3, 1, "completions", args)
    assert r.engine_ttft_ms == [1.0, 2.0, 3.0] and r.num_requests == 3
    row = {**{k: getattr(r, k) for k in r.__dataclass_fields__}, "side": "engine"}
    data = {"config": {"model": "m", "prompt_len": 1, "output_len": 2, "stream_interval": 1,
                       "concurrency": [1]}, "device": "d", "machine": "x", "cpu_count": 2,
            "total_s": 1.0, "results": [row]}
    assert "| engine | completions | yes | 1 | 3 | 2.00 | 3.00 | 3.00 |" in render_markdown(data)


def test_app_args_merge_an_engine_key_into_the_engine() -> None:
    """--app-args and a variant may set engine fields (e.g. ``core_niceness``) without
    replacing the benchmark's engine dict; their other keys override the app's."""
    import argparse

    from benchmarks.serve_overhead_served import app_args_for

    args = argparse.Namespace(app_args='{"ingress_num_replicas": 4, "engine": {"a": 1}}',
                              concurrency=[1, 64], output_len=8)
    engine = {"device": "cuda", "model": "m", "a": 0}
    got = app_args_for(args, engine, {"engine": {"core_niceness": 0}, "niceness": 0})
    assert got["engine"] == {"device": "cuda", "model": "m", "a": 1, "core_niceness": 0}
    assert got["ingress_num_replicas"] == 4 and got["niceness"] == 0
    assert got["num_gpus_per_replica"] == 1.0 and got["max_ongoing_requests"] == 64
    assert engine == {"device": "cuda", "model": "m", "a": 0}  # NOTE: the caller's, untouched
    assert app_args_for(args, engine)["engine"]["a"] == 1
