"""vLLM ZMQ KV-event adapter, tested against messages produced by vLLM's own classes.

Produced by ``vllm.distributed.kv_events`` (``ZmqEventPublisher``, ``KVEventBatch``,
``BlockStored``/``BlockRemoved``/``AllBlocksCleared``) of the installed vLLM; written and
checked against vLLM 0.33.0 (``VLLM_VERSION_TESTED``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

kv_events = pytest.importorskip("vllm.distributed.kv_events")

from cluster.selector.core import SelectorCore  # noqa: E402
from cluster.selector.types import SelectionRequest  # noqa: E402
from cluster.selector.vllm_adapter import VllmKVSubscriber, decode_batch  # noqa: E402
from kvmanager.events import AllBlocksCleared, BlockRemoved, BlockStored  # noqa: E402

VLLM_VERSION_TESTED = "0.33.0"
pytestmark = pytest.mark.slow  # NOTE: importing vLLM costs ~30 s on the 2-core CI box


def _stored(hashes: list[object], parent: object = None, medium: str | None = "GPU") -> object:
    return kv_events.BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=list(range(16 * len(hashes))),
        block_size=16,
        lora_id=None,
        medium=medium,
        lora_name=None,
    )


def _batch(*events: object) -> object:
    return kv_events.KVEventBatch(ts=time.time(), events=list(events))


def test_decode_matches_vllm_encoding() -> None:
    raw = b"\x01" * 24 + (12345).to_bytes(8, "big")  # bytes hashes: low 64 bits, big-endian
    payload = msgspec.msgpack.Encoder().encode(
        _batch(
            _stored([2**64 - 1, 7], parent=3),
            _stored([raw], medium="CPU"),
            kv_events.BlockRemoved(block_hashes=[7], medium="GPU"),
            kv_events.AllBlocksCleared(),
        )
    )
    events = decode_batch(payload)
    assert events[0] == BlockStored([2**64 - 1, 7], 3, list(range(32)), 16, None, "GPU")
    assert isinstance(events[1], BlockStored) and events[1].block_hashes == [12345] and events[1].medium == "CPU"
    assert events[2] == BlockRemoved([7], "GPU")
    assert events[3] == AllBlocksCleared()


def test_decode_accepts_array_tagged_events_and_rejects_garbage() -> None:
    legacy = msgspec.msgpack.encode([1.0, [["BlockStored", [5], None, [1] * 16, 16, None, None], ["BlockRemoved", [5], None]]])
    assert decode_batch(legacy) == [BlockStored([5], None, [1] * 16, 16, None, "GPU"), BlockRemoved([5], "GPU")]
    for bad in (b"\xc1", msgspec.msgpack.encode({"x": 1}), msgspec.msgpack.encode([1.0, [3]])):
        with pytest.raises(ValueError):
            decode_batch(bad)


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[Callable[..., object]]:
    made: list[object] = []

    def make(buffer_steps: int = 100) -> object:
        pub = kv_events.ZmqEventPublisher(
            data_parallel_rank=0,
            endpoint=f"ipc://{tmp_path}/pub-{len(made)}",
            replay_endpoint=f"ipc://{tmp_path}/replay-{len(made)}",
            buffer_steps=buffer_steps,
            topic="kv",
        )
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.shutdown()  # type: ignore[attr-defined]


def _matched(core: SelectorCore, hashes: list[int]) -> int:
    sel = core.select(SelectionRequest("q", hashes, 16 * len(hashes)), speculative=False)
    return sel.ranked[0].terms.num_matched_blocks


def _wait(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _pub_opts(pub: object) -> tuple[str, str]:
    cfg = pub.get_publisher_config()  # type: ignore[attr-defined]
    return cfg.endpoint, cfg.replay_endpoint


def test_live_stream_and_history_via_replay(publisher: Callable[..., object]) -> None:
    pub = publisher()
    pub.publish(_batch(_stored([1, 2])))  # type: ignore[attr-defined]
    pub.publish(_batch(_stored([3], parent=2)))  # type: ignore[attr-defined]
    time.sleep(0.3)  # both are published before anyone subscribes: only the replay has them
    core = SelectorCore()
    endpoint, replay = _pub_opts(pub)
    sub = VllmKVSubscriber(core, "vllm-0", endpoint, replay, topic="kv").start()
    try:
        assert sub.ready.wait(10)
        _wait(lambda: _matched(core, [1, 2, 3]) == 3)
        time.sleep(0.2)  # let the subscription reach the publisher
        pub.publish(_batch(_stored([4], parent=3), kv_events.BlockRemoved(block_hashes=[2], medium="GPU")))  # type: ignore[attr-defined]
        _wait(lambda: _matched(core, [1, 2, 3]) == 1)
        assert _matched(core, [4]) == 1
        pub.publish(_batch(kv_events.AllBlocksCleared()))  # type: ignore[attr-defined]
        _wait(lambda: _matched(core, [1]) == 0 and _matched(core, [4]) == 0)
        assert sub.num_lost_batches == 0 and sub.num_bad_batches == 0 and sub.next_seq == 4
    finally:
        sub.stop()


class _LateReplay(VllmKVSubscriber):
    """Skips the start-up replay, so the first live batch reveals a gap."""

    skipped = False

    def _replay(self, start_seq: int) -> None:
        if not self.skipped:
            self.skipped = True
            return
        super()._replay(start_seq)


def test_gap_in_live_stream_is_filled_from_replay(publisher: Callable[..., object]) -> None:
    pub = publisher()
    for h in (10, 11, 12):
        pub.publish(_batch(_stored([h])))  # type: ignore[attr-defined]
    time.sleep(0.3)
    core = SelectorCore()
    sub = _LateReplay(core, "vllm-1", *_pub_opts(pub), topic="kv").start()
    try:
        assert sub.ready.wait(10)
        assert _matched(core, [10]) == 0
        time.sleep(0.2)
        h = 13
        deadline = time.monotonic() + 10
        while _matched(core, [13]) == 0:  # NOTE: resend if the slow-joining SUB missed one
            pub.publish(_batch(_stored([h])))  # type: ignore[attr-defined]
            h += 1
            time.sleep(0.3)
            assert time.monotonic() < deadline
        assert all(_matched(core, [x]) == 1 for x in (10, 11, 12, 13))
        assert sub.num_lost_batches == 0
    finally:
        sub.stop()


def test_replay_buffer_overrun_is_counted(publisher: Callable[..., object]) -> None:
    pub = publisher(buffer_steps=2)
    for h in range(5):
        pub.publish(_batch(_stored([100 + h])))  # type: ignore[attr-defined]
    time.sleep(0.3)
    core = SelectorCore()
    sub = VllmKVSubscriber(core, "vllm-2", *_pub_opts(pub), topic="kv").start()
    try:
        assert sub.ready.wait(10)
        _wait(lambda: sub.next_seq == 5)
        assert sub.num_lost_batches == 3
        assert [_matched(core, [100 + h]) for h in range(5)] == [0, 0, 0, 1, 1]
    finally:
        sub.stop()
