"""The gRPC service on a real loopback server: RPCs, bad input, auth, health, reflection."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.server import SERVICE_NAME, ServerThread
from protos import cache_selection_pb2 as pb
from protos import cache_selection_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    core = SelectorCore(
        CoreConfig(max_prompt_blocks=64, max_events_per_batch=4, max_hashes_per_event=8)
    )
    with ServerThread(core) as st:
        yield st


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.CacheSelectionStub]:
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.CacheSelectionStub(ch)


def _msgs(replica_id: str, *bodies: dict[str, object]) -> Iterator[pb.ReportKVRequest]:
    yield pb.ReportKVRequest(
        replica_id=replica_id, hello=pb.ReplicaHello(block_size=16, num_blocks=100)
    )
    for body in bodies:
        yield pb.ReportKVRequest(replica_id=replica_id, **body)  # type: ignore[arg-type]


def _batch(seq: int, *hashes: int) -> dict[str, object]:
    ev = pb.KVEvent(block_stored=pb.BlockStored(block_hashes=hashes, block_size=16))
    return {"batch": pb.KVEventBatch(seq=seq, events=[ev])}


def _code(fn: object, *args: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=5)  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


def test_report_then_select_over_the_wire(stub: pb_grpc.CacheSelectionStub) -> None:
    big = 2**64 - 5  # full 64-bit range survives the wire
    resp = stub.ReportKV(
        _msgs("w1", {"resync": pb.KVResync(seq=3, block_hashes=[big], done=True)}, _batch(4, 7, 8)),
        timeout=5,
    )
    assert not resp.resync_required and resp.last_applied_seq == 4 and resp.num_messages == 3
    stub.ReportKV(
        _msgs("w2", {"snapshot": pb.LoadSnapshot(num_blocks=100, num_free_blocks=50)}), timeout=5
    )
    sel = stub.Select(
        pb.SelectRequest(
            block_hashes=[big, 7, 8, 9], num_prompt_tokens=64, candidate_replica_ids=["w1", "w2"]
        ),
        timeout=5,
    )
    assert sel.policy == "tinyserve" and sel.num_prompt_blocks == 4
    assert [r.replica_id for r in sel.replicas] == ["w1", "w2"]
    assert (
        sel.replicas[0].terms.num_matched_blocks == 3 and sel.replicas[0].terms.similarity == 0.75
    )
    assert sel.replicas[0].score > sel.replicas[1].score
    named = stub.Select(
        pb.SelectRequest(
            block_hashes=[big], policy="round_robin", max_results=1, no_speculative_insert=True
        ),
        timeout=5,
    )
    assert named.policy == "round_robin" and len(named.replicas) == 1
    listed = {
        r.replica_id: r for r in stub.ListReplicas(pb.ListReplicasRequest(), timeout=5).replicas
    }
    assert (
        listed["w1"].num_resident_blocks == 3 and listed["w1"].synced and listed["w1"].last_seq == 4
    )
    assert listed["w2"].load.num_free_blocks == 50 and not listed["w2"].connected
    stats = stub.Stats(pb.StatsRequest(), timeout=5)
    assert stats.num_selects >= 2 and stats.num_resyncs >= 1 and len(stats.tinyserve_w) == 4
    assert stub.Feedback(
        pb.FeedbackRequest(
            request_id="x", replica_id="w1", num_prompt_tokens=64, num_cached_tokens=48
        ),
        timeout=5,
    ).accepted
    assert not stub.Feedback(
        pb.FeedbackRequest(replica_id="ghost", num_prompt_tokens=1), timeout=5
    ).accepted
    stub.Ping(pb.PingRequest(), timeout=5)


def test_sequence_gap_asks_for_resync(stub: pb_grpc.CacheSelectionStub) -> None:
    resp = stub.ReportKV(_msgs("g1", _batch(0, 1), _batch(2, 2), _batch(3, 3)), timeout=5)
    assert resp.resync_required and resp.last_applied_seq == 0 and resp.num_messages == 3


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.SelectRequest(block_hashes=list(range(65))), "exceed"),
        (pb.SelectRequest(policy="magic"), "unknown policy"),
        (pb.SelectRequest(candidate_replica_ids=[""]), "required"),
        (pb.SelectRequest(request_id="x" * 300), "limit"),
    ],
)
def test_bad_select_is_invalid_argument(
    stub: pb_grpc.CacheSelectionStub, request_: pb.SelectRequest, needle: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Select(request_, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


def _bad_streams() -> list[list[pb.ReportKVRequest]]:
    hello = pb.ReportKVRequest(replica_id="bad", hello=pb.ReplicaHello())
    big_batch = pb.KVEventBatch(
        seq=0, events=[pb.KVEvent(all_blocks_cleared=pb.AllBlocksCleared())] * 5
    )
    return [
        [pb.ReportKVRequest(replica_id="bad", batch=pb.KVEventBatch(seq=0))],  # no hello first
        [pb.ReportKVRequest(hello=pb.ReplicaHello())],  # no replica_id
        [hello, pb.ReportKVRequest(replica_id="other", snapshot=pb.LoadSnapshot())],  # foreign id
        [hello, pb.ReportKVRequest(replica_id="bad")],  # empty body
        [hello, pb.ReportKVRequest(batch=big_batch)],  # too many events
        [
            hello,
            pb.ReportKVRequest(batch=pb.KVEventBatch(seq=0, events=[pb.KVEvent()])),
        ],  # empty event
        [hello, pb.ReportKVRequest(**_batch(0, *range(9)))],  # too many hashes in one event
        [hello, pb.ReportKVRequest(snapshot=pb.LoadSnapshot(f_total=math.nan))],
        [hello, pb.ReportKVRequest(feedback=pb.FeedbackRequest(replica_id="other"))],  # foreign
    ]


@pytest.mark.parametrize("messages", _bad_streams())
def test_misbehaving_stream_is_rejected_and_isolated(
    server: ServerThread, stub: pb_grpc.CacheSelectionStub, messages: list[pb.ReportKVRequest]
) -> None:
    stub.ReportKV(
        _msgs("good", {"resync": pb.KVResync(seq=0, block_hashes=[11, 12], done=True)}), timeout=5
    )
    assert _code(stub.ReportKV, iter(messages)) == grpc.StatusCode.INVALID_ARGUMENT
    # the service still serves, and another replica's state is intact
    sel = stub.Select(
        pb.SelectRequest(
            block_hashes=[11, 12], candidate_replica_ids=["good"], no_speculative_insert=True
        ),
        timeout=5,
    )
    assert sel.replicas[0].terms.num_matched_blocks == 2
    bad = {r.replica_id: r for r in server.core.list_replicas()}.get("bad")
    assert bad is None or bad.num_resident_blocks == 0


def test_bad_feedback_is_invalid_argument(stub: pb_grpc.CacheSelectionStub) -> None:
    msg = pb.FeedbackRequest(replica_id="w1", num_prompt_tokens=4, num_cached_tokens=5)
    assert _code(stub.Feedback, msg) == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(iter(refl.ServerReflectionInfo(iter([req]), timeout=5)))
        names = {s.name for s in resp.list_services_response.service}
        assert SERVICE_NAME == "tinyserve.v1.CacheSelection" and SERVICE_NAME in names


def test_shared_token_auth() -> None:
    with ServerThread(token="s3cret") as st, grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.CacheSelectionStub(ch)
        assert _code(stub.Ping, pb.PingRequest()) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            stub.Ping(pb.PingRequest(), timeout=5, metadata=(("authorization", "Bearer wrong"),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            stub.ReportKV(_msgs("r"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert st.core.list_replicas() == []
        stub.Ping(pb.PingRequest(), timeout=5, metadata=(("authorization", "Bearer s3cret"),))
        status = (
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        )
        assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
def test_cli_serves_on_loopback_with_token() -> None:
    import re
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.selector.server", "--port", "0", "--token", "t0k", "--policy", "round_robin"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while "listening on" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "selector exited early"
            assert time.monotonic() < deadline
        match = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        assert match, line
        with grpc.insecure_channel(match.group(1)) as ch:
            md = (("authorization", "Bearer t0k"),)
            stats = pb_grpc.CacheSelectionStub(ch).Stats(pb.StatsRequest(), timeout=10, metadata=md)
            assert stats.default_policy == "round_robin"
    finally:
        proc.terminate()
        proc.wait(10)


def _errors(server: ServerThread) -> float:
    registry = server.core.metrics.registry
    v = registry.get_sample_value("tinyserve_selector_errors_total", {"kind": "invalid_argument"})
    return v or 0.0


def _realised(server: ServerThread) -> float:
    v = server.core.metrics.registry.get_sample_value("tinyserve_selector_realised_hit_tokens_total")
    return v or 0.0


def test_feedback_on_the_report_stream_is_applied_as_the_unary_call(
    server: ServerThread, stub: pb_grpc.CacheSelectionStub
) -> None:
    """An outcome on a ReportKV stream goes through the same core method and counters as the
    unary Feedback; a malformed one is counted and skipped, the stream goes on."""
    core = server.core
    stub.ReportKV(
        _msgs("fb", {"resync": pb.KVResync(seq=0, block_hashes=[41, 42], done=True)}), timeout=5
    )
    sel = stub.Select(
        pb.SelectRequest(request_id="fq1", block_hashes=[41, 42], num_prompt_tokens=32,
                         candidate_replica_ids=["fb"]),
        timeout=5,
    )  # fmt: skip
    assert sel.replicas[0].replica_id == "fb"
    n_feedback = core.counters["feedback"]
    errors, realised = _errors(server), _realised(server)
    resp = stub.ReportKV(
        _msgs(
            "fb",
            {"feedback": pb.FeedbackRequest(request_id="fq1", num_prompt_tokens=32,
                                            num_cached_tokens=32, ttft_s=0.01)},
            {"feedback": pb.FeedbackRequest(num_prompt_tokens=4, num_cached_tokens=5)},  # bad
            _batch(1, 43),
            {"feedback": pb.FeedbackRequest(request_id="fq2", replica_id="fb",
                                            num_prompt_tokens=16)},
        ),
        timeout=5,
    )  # fmt: skip
    assert not resp.resync_required and resp.last_applied_seq == 1 and resp.num_messages == 5
    assert core.counters["feedback"] == n_feedback + 2
    assert _errors(server) == errors + 1
    assert _realised(server) == realised + 32  # fq1 was routed to fb
