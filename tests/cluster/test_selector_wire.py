"""The Select RPC's hand-rolled codec (cluster/selector/wire.py) against protobuf itself:
random SelectRequests (every field set or not, any values, hashes packed or unpacked),
truncations and random bytes decode to what protobuf + convert give or fail alike; every
answer encodes to the message ``selection_to_proto`` builds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_selector_fuzz import messages

from cluster.selector.convert import select_request_from_proto, selection_to_proto
from cluster.selector.core_types import Selection
from cluster.selector.types import Ranked, ScoreTerms
from cluster.selector.wire import MalformedMessage, decode_select, encode_select
from protos import cache_selection_pb2 as pb

_SETTINGS = settings(max_examples=400, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
MAX_BLOCKS = 1000


def _via_protobuf(raw: bytes) -> tuple[str, object]:
    """('ok', decoded tuple) | ('malformed', None) | ('invalid', message) through protobuf."""
    try:
        msg = pb.SelectRequest.FromString(raw)
    except Exception:
        return "malformed", None
    try:
        req, cands = select_request_from_proto(msg, MAX_BLOCKS)
    except ValueError as exc:
        return "invalid", str(exc)
    return "ok", (req, cands, msg.policy, msg.max_results, not msg.no_speculative_insert)


def _via_wire(raw: bytes) -> tuple[str, object]:
    try:
        return "ok", decode_select(raw, MAX_BLOCKS)
    except MalformedMessage:
        return "malformed", None
    except ValueError as exc:
        return "invalid", str(exc)


def _same(raw: bytes) -> None:
    want, got = _via_protobuf(raw), _via_wire(raw)
    assert got[0] == want[0], (raw[:80], got, want)
    if want[0] == "invalid":
        assert got[1] == want[1]
    if want[0] == "ok":
        (wr, wc, *wrest), (gr, gc, *grest) = want[1], got[1]  # type: ignore[misc]
        assert np.array_equal(gr.block_hashes, wr.block_hashes)
        assert gr.block_hashes.dtype == np.uint64
        assert (gr.request_id, gr.num_prompt_tokens, gr.num_output_tokens, gr.session_id,
                gr.origin_node_id) == (wr.request_id, wr.num_prompt_tokens,
                                        wr.num_output_tokens, wr.session_id, wr.origin_node_id)  # fmt: skip
        assert (gc, grest) == (wc, wrest)


@_SETTINGS
@given(messages(pb.SelectRequest.DESCRIPTOR))
def test_random_requests_decode_as_protobuf_does(msg: pb.SelectRequest) -> None:
    raw = msg.SerializeToString()
    _same(raw)


@_SETTINGS
@given(messages(pb.SelectRequest.DESCRIPTOR), st.floats(0, 1))
def test_truncated_requests_fail_or_decode_alike(msg: pb.SelectRequest, cut: float) -> None:
    raw = msg.SerializeToString()
    _same(raw[: int(len(raw) * cut)])


@_SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_fail_or_decode_alike(raw: bytes) -> None:
    _same(raw)


def _unpacked(hashes: list[int]) -> bytes:
    out = bytearray()
    for h in hashes:
        out.append(0x10)  # field 2, varint
        while h >= 0x80:
            out.append((h & 0x7F) | 0x80)
            h >>= 7
        out.append(h)
    return bytes(out)


def test_unpacked_and_split_hash_lists_accumulate_in_order() -> None:
    packed = pb.SelectRequest(block_hashes=[1, 2**64 - 1], request_id="a").SerializeToString()
    raw = packed + _unpacked([300, 2**63]) + pb.SelectRequest(block_hashes=[7]).SerializeToString()
    req, *_ = decode_select(raw, MAX_BLOCKS)
    assert req.block_hashes.tolist() == [1, 2**64 - 1, 300, 2**63, 7]
    assert req.block_hashes.tolist() == list(pb.SelectRequest.FromString(raw).block_hashes)


def test_limits_answer_like_convert() -> None:
    raw = pb.SelectRequest(block_hashes=range(MAX_BLOCKS + 1)).SerializeToString()
    with pytest.raises(ValueError, match="1001 block hashes exceed the limit of 1000"):
        decode_select(raw, MAX_BLOCKS)
    raw = pb.SelectRequest(candidate_replica_ids=["r"] * 4097).SerializeToString()
    with pytest.raises(ValueError, match="4097 candidates exceed the limit of 4096"):
        decode_select(raw, MAX_BLOCKS)
    with pytest.raises(MalformedMessage):
        decode_select(b"\x0a\x02\xff\xfe", MAX_BLOCKS)  # request_id not UTF-8


_floats = st.floats(allow_nan=False, allow_infinity=True, width=64)
_terms = st.builds(ScoreTerms, *([_floats] * 11), st.integers(0, 2**32 - 1),
                   st.integers(0, 2**32 - 1))  # fmt: skip
_ranked = st.builds(Ranked, st.text(max_size=20), _floats, _terms)


@_SETTINGS
@given(st.text(max_size=12), st.lists(_ranked, max_size=6), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1))  # fmt: skip
def test_answers_encode_to_the_same_message(
    policy: str, ranked: list[Ranked], blocks: int, unknown: int
) -> None:
    sel = Selection(policy, ranked, blocks, unknown)
    assert pb.SelectResponse.FromString(encode_select(sel)) == selection_to_proto(sel)


def test_nan_score_survives() -> None:
    sel = Selection("tinyserve", [Ranked("r", math.nan, ScoreTerms())], 1, 0)
    got = pb.SelectResponse.FromString(encode_select(sel))
    assert math.isnan(got.replicas[0].score)


def test_both_server_codecs_answer_alike_and_refuse_garbage() -> None:
    """A real server per codec (loopback gRPC), the same history: the same answers; random
    bytes to Select: INVALID_ARGUMENT, counted as malformed, on both."""
    import grpc

    from cluster.selector.core import SelectorCore
    from cluster.selector.server import ServerThread
    from kvmanager.events import BlockStored
    from protos import cache_selection_pb2_grpc as pb_grpc

    answers = []
    for codec in ("wire", "proto"):
        core = SelectorCore(clock=lambda: 100.0)  # NOTE: hotness decays with the clock
        for r in range(3):
            core.join(f"r{r}", block_size=16, num_blocks=100)
        core.apply_events("r1", 0, [BlockStored([5, 6, 7], None, [], 16)])
        with ServerThread(core, select_codec=codec) as srv, grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.CacheSelectionStub(ch)
            got = [stub.Select(pb.SelectRequest(request_id=f"q{i}", block_hashes=[5, 6, 7, 8 + i],
                                                num_prompt_tokens=64, max_results=2), timeout=10)
                   for i in range(3)]  # fmt: skip
            raw = ch.unary_unary("/tinyserve.v1.CacheSelection/Select")
            with pytest.raises(grpc.RpcError) as err:
                raw(b"\x0a\xff\xff", timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert core.metrics.errors.labels("malformed")._value.get() == 1
        answers.append(got)
    assert answers[0] == answers[1]
    assert answers[0][0].replicas[0].replica_id == "r1"
    with pytest.raises(ValueError, match="select_codec"):
        ServerThread(SelectorCore(), select_codec="json").start()


def test_reuse_port_lets_processes_of_one_replica_share_a_port() -> None:
    """reuse_port=True: a second server binds the same port and connections reach both;
    without it the port stays exclusive (the default keeps two selection replicas apart)."""
    import grpc

    from cluster.selector.core import SelectorCore
    from cluster.selector.server import ServerThread
    from protos import cache_selection_pb2_grpc as pb_grpc

    cores = [SelectorCore(), SelectorCore()]
    with ServerThread(cores[0], reuse_port=True) as a:
        with pytest.raises(RuntimeError, match="bind"):
            ServerThread(SelectorCore(), port=a.port).start()
        with ServerThread(cores[1], port=a.port, reuse_port=True) as b:
            assert b.port == a.port
            for i in range(40):  # NOTE: separate connections; the kernel spreads them
                opts = [("grpc.use_local_subchannel_pool", 1), ("tinyserve.test", i)]
                with grpc.insecure_channel(a.address, options=opts) as ch:
                    pb_grpc.CacheSelectionStub(ch).Select(pb.SelectRequest(), timeout=10)
                if all(c.stats().counters["selects"] for c in cores):
                    break
    assert all(c.stats().counters["selects"] > 0 for c in cores)


@pytest.mark.parametrize("raw", [
    b"\x0b\x0c",  # an empty group on field 1 (a string field): protobuf skips it
    b"\x0b\x13\x14\x0c",  # nested groups
    b"\x0b\x10\x05\x12\x01\x07\x0c\x10\x09",  # a group holding a hash (skipped), then a hash
    b"\x0b\x14",  # an end-group for another field
    b"\x0c",  # an end-group with no group open
    b"\x0b",  # a group never closed
    b"\x0b\x00\x0c",  # field 0 inside a group
    b"\x0b" * 101 + b"\x0c" * 101,  # deeper than protobuf's recursion limit
])
def test_groups_decode_or_fail_as_protobuf_does(raw: bytes) -> None:
    _same(raw)
