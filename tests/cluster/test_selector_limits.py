"""Size limits of the gRPC service on a real loopback server: every oversized field is
INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for a message over the byte limit), applies nothing,
and the server keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from cluster.selector import servicer
from cluster.selector.server import MAX_MESSAGE_BYTES, ServerThread
from protos import cache_selection_pb2 as pb
from protos import cache_selection_pb2_grpc as pb_grpc


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ServerThread() as st:
        yield st


def _hello(replica_id: str, node_id: str = "n", num_blocks: int = 64) -> pb.ReportKVRequest:
    return pb.ReportKVRequest(replica_id=replica_id, hello=pb.ReplicaHello(
        node_id=node_id, block_size=16, num_blocks=num_blocks))


def _stored(hashes: list[int], num_tokens: int) -> pb.ReportKVRequest:
    ev = pb.KVEvent(block_stored=pb.BlockStored(block_hashes=hashes, block_size=16,
                                                token_ids=[1] * num_tokens))
    return pb.ReportKVRequest(replica_id="r", batch=pb.KVEventBatch(seq=1, events=[ev]))


def _resync(num_hashes: int) -> pb.ReportKVRequest:
    return pb.ReportKVRequest(replica_id="r", resync=pb.KVResync(
        seq=1, block_hashes=list(range(1, num_hashes + 1)), done=True))


def _report(stub: pb_grpc.CacheSelectionStub, *msgs: pb.ReportKVRequest) -> grpc.StatusCode:
    try:
        stub.ReportKV(iter(msgs), timeout=10)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_oversized_fields_are_refused_and_apply_nothing(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.CacheSelectionStub(ch)
        bad = grpc.StatusCode.INVALID_ARGUMENT
        assert _report(stub, _hello("r", node_id="n" * 257)) == bad
        assert _report(stub, _hello("r"), _stored([5, 6], 2 * 16 + 1)) == bad
        assert _report(stub, _hello("r", num_blocks=64), _resync(129)) == bad  # > 2 x pool
        assert server.core.stats().num_unique_blocks == 0
        # At the limits: accepted.
        assert _report(stub, _hello("r"), _stored([5, 6], 2 * 16)) == grpc.StatusCode.OK
        assert _report(stub, _hello("r", num_blocks=64), _resync(128)) == grpc.StatusCode.OK
        assert server.core.stats().num_unique_blocks == 128
        huge = pb.SelectRequest(block_hashes=[2**63] * (MAX_MESSAGE_BYTES // 9))
        with pytest.raises(grpc.RpcError) as info:
            stub.Select(huge, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stub.Ping(pb.PingRequest(), timeout=10)  # still serving


def test_one_peer_may_hold_only_so_many_replica_ids(
        server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servicer, "MAX_REPLICAS_PER_PEER", 2)
    release = threading.Event()

    def held_open(replica_id: str) -> Iterator[pb.ReportKVRequest]:
        yield _hello(replica_id)
        release.wait(30)

    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.CacheSelectionStub(ch)
        open_calls = [stub.ReportKV.future(held_open(f"r{i}"), timeout=30) for i in range(2)]
        deadline = 200
        while len(server.core.list_replicas()) < 2 and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        assert len(server.core.list_replicas()) == 2
        assert _report(stub, _hello("r9")) == grpc.StatusCode.INVALID_ARGUMENT
        assert "r9" not in {r.replica_id for r in server.core.list_replicas()}
        # A replica already held may reconnect (a second stream of the same id).
        again = stub.ReportKV.future(held_open("r0"), timeout=30)
        release.set()
        for call in [*open_calls, again]:
            call.result(timeout=30)
        # Closed streams free their slots.
        assert _report(stub, _hello("r9")) == grpc.StatusCode.OK


def test_snapshot_counts_beyond_int64_are_rejected() -> None:
    """A uint64 count the replica table's int64 columns cannot hold is bad input (ValueError,
    so the stream ends INVALID_ARGUMENT), not an OverflowError inside the core."""
    from cluster.selector.convert import load_from_proto

    assert load_from_proto(pb.LoadSnapshot(num_waiting_tokens=(1 << 62) - 1)).num_waiting_tokens
    for v in (1 << 62, 1 << 63, (1 << 64) - 1):
        with pytest.raises(ValueError, match="num_waiting_tokens"):
            load_from_proto(pb.LoadSnapshot(num_waiting_tokens=v))
