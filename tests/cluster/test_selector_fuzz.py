"""Hypothesis fuzz of every CacheSelection RPC over real gRPC on loopback: random messages
(every field of the request type, from its descriptor: full integer ranges, NaN/inf,
unicode, long lists, every oneof branch), truncated encodings, random bytes and oversized
messages. No call may end with a server-fault status (UNKNOWN, INTERNAL, DATA_LOSS,
UNIMPLEMENTED) or hang, and the service must still answer correctly afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.selector.core import SelectorCore
from cluster.selector.server import MAX_MESSAGE_BYTES, ServerThread
from protos import cache_selection_pb2 as pb
from protos import cache_selection_pb2_grpc as pb_grpc

TOKEN = "fuzz-t0k"
MD = (("authorization", f"Bearer {TOKEN}"),)
SERVICE = pb.DESCRIPTOR.services_by_name["CacheSelection"]
UNARY = {m.name: m.input_type for m in SERVICE.methods if not m.client_streaming}
FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS,
          grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DEADLINE_EXCEEDED,
          grpc.StatusCode.UNAVAILABLE}
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
T = FieldDescriptor
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    T.TYPE_UINT64: st.integers(0, 2**64 - 1),
    T.TYPE_UINT32: st.integers(0, 2**32 - 1),
    T.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    T.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    T.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    T.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    T.TYPE_BOOL: st.booleans(),
    T.TYPE_STRING: st.one_of(st.text(max_size=24), st.text(min_size=200, max_size=2000),
                             st.sampled_from(["", "r0", "tinyserve", "round_robin"])),
}


def _value(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if f.type == T.TYPE_MESSAGE:
        return messages(f.message_type, depth + 1)
    if f.type == T.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values])
    return _SCALARS[f.type]


@st.composite
def _message(draw: st.DrawFn, desc: Descriptor, depth: int) -> Message:
    cls = getattr(pb, desc.name)
    msg = cls()
    oneof_fields = {f.name for o in desc.oneofs for f in o.fields}
    chosen = {draw(st.sampled_from([f.name for f in o.fields])) for o in desc.oneofs}
    for f in desc.fields:
        if f.name in oneof_fields and f.name not in chosen:
            continue
        if depth > 3 or not draw(st.booleans()):
            continue
        if f.is_repeated:
            size = draw(st.sampled_from([3, 40, 2000])) if f.type != T.TYPE_MESSAGE else 4
            values = draw(st.lists(_value(f, depth), max_size=size))
            if f.type == T.TYPE_MESSAGE:
                getattr(msg, f.name).extend(values)
            else:
                getattr(msg, f.name)[:] = values
        elif f.type == T.TYPE_MESSAGE:
            getattr(msg, f.name).CopyFrom(draw(_value(f, depth)))
        else:
            setattr(msg, f.name, draw(_value(f, depth)))
    return msg


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of type ``desc``: each field set or not, any value of its type."""
    return _message(desc, depth)


def payloads(desc: Descriptor) -> st.SearchStrategy[bytes]:
    """Wire bytes: a random message, a truncated one, or random bytes."""
    encoded = messages(desc).map(lambda m: m.SerializeToString())
    truncated = st.tuples(encoded, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
    return st.one_of(encoded, truncated, st.binary(max_size=512))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(SelectorCore(), token=TOKEN) as srv:
        yield srv


@pytest.fixture(scope="module")
def chan(server: ServerThread) -> Iterator[grpc.Channel]:
    opts = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(server.address, options=opts) as ch:
        yield ch


def _raw_unary(ch: grpc.Channel, method: str) -> Any:
    return ch.unary_unary(f"/{SERVICE.full_name}/{method}", request_serializer=None,
                          response_deserializer=None)


def _status(call: Any, *args: Any) -> grpc.StatusCode:
    try:
        call(*args, timeout=20, metadata=MD)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _assert_alive(server: ServerThread, ch: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.CacheSelectionStub(ch)
    hello = pb.ReportKVRequest(replica_id="alive", hello=pb.ReplicaHello(block_size=16))
    resync = pb.ReportKVRequest(replica_id="alive",
                                resync=pb.KVResync(seq=1, block_hashes=[5, 6], done=True))
    assert stub.ReportKV(iter([hello, resync]), timeout=10, metadata=MD).last_applied_seq == 1
    sel = stub.Select(pb.SelectRequest(block_hashes=[5, 6], num_prompt_tokens=32,
                                       candidate_replica_ids=["alive"]), timeout=10, metadata=MD)
    assert sel.replicas[0].replica_id == "alive" and sel.replicas[0].terms.num_matched_blocks == 2


@pytest.mark.parametrize("method", sorted(UNARY))
def test_unary_methods_never_fault(server: ServerThread, chan: grpc.Channel, method: str) -> None:
    call = _raw_unary(chan, method)
    seen: set[grpc.StatusCode] = set()

    @FUZZ
    @given(payloads(UNARY[method]))
    def check(raw: bytes) -> None:
        code = _status(call, raw)
        seen.add(code)
        assert code not in FAULTS, (method, code, raw[:64])

    check()
    assert grpc.StatusCode.OK in seen or method == "Select"  # NOTE: not a blanket refusal
    _assert_alive(server, chan)


def test_report_kv_streams_never_fault(server: ServerThread, chan: grpc.Channel) -> None:
    call = chan.stream_unary(f"/{SERVICE.full_name}/ReportKV", request_serializer=None,
                             response_deserializer=None)
    hello = pb.ReportKVRequest(replica_id="fz", hello=pb.ReplicaHello(block_size=16))
    seen: set[grpc.StatusCode] = set()

    @FUZZ
    @given(st.booleans(), st.lists(payloads(pb.ReportKVRequest.DESCRIPTOR), max_size=6))
    def check(greet: bool, raws: list[bytes]) -> None:
        stream = [hello.SerializeToString()] * greet + raws
        code = _status(call, iter(stream))
        seen.add(code)
        assert code not in FAULTS, (code, [r[:32] for r in stream])

    check()
    assert seen >= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, seen
    _assert_alive(server, chan)


def test_oversized_and_huge_messages_are_refused(server: ServerThread, chan: grpc.Channel) -> None:
    over = b"\x0a" + b"\xff" * 4 + b"\x7f" + b"x" * (MAX_MESSAGE_BYTES + 16)  # > the limit
    for method in sorted(UNARY):
        assert _status(_raw_unary(chan, method), over) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # under the byte limit but over the service's own bounds: 1M hashes, 1 MB ids
    huge_select = pb.SelectRequest(block_hashes=range(1_000_000), num_prompt_tokens=16,
                                   request_id="q" * 1_000_000)
    stub = pb_grpc.CacheSelectionStub(chan)
    assert _status(stub.Select, huge_select) == grpc.StatusCode.INVALID_ARGUMENT
    huge_fb = pb.FeedbackRequest(request_id="q", replica_id="r" * 1_000_000)
    assert _status(stub.Feedback, huge_fb) == grpc.StatusCode.INVALID_ARGUMENT
    node = pb.ReportKVRequest(replica_id="big", hello=pb.ReplicaHello(node_id="n" * 100_000))
    assert _status(stub.ReportKV, iter([node])) == grpc.StatusCode.INVALID_ARGUMENT
    big_resync = [pb.ReportKVRequest(replica_id="big", hello=pb.ReplicaHello(num_blocks=10))] + [
        pb.ReportKVRequest(replica_id="big", resync=pb.KVResync(block_hashes=range(500_000)))
        for _ in range(5)]
    assert _status(stub.ReportKV, iter(big_resync)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _status(_raw_unary(chan, "Ping"), b"") == grpc.StatusCode.OK
    _assert_alive(server, chan)
    counters = server.core.metrics.errors
    assert counters.labels("malformed")._value.get() > 0
    assert counters.labels("invalid_argument")._value.get() > 0
