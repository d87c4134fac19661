"""``replicas.engine_core_pipe``: frames arrive whole and in order (small, large, split across
reads, from several threads at once); a send never blocks, even when the reader is not
reading; ``close`` flushes what waited; a gone peer raises on send and reads as EOF."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from replicas.engine_core_pipe import HEADER, FrameReader, FrameWriter


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def _read_all(reader: FrameReader, count: int, timeout_s: float = 10.0) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        reader.wait(0.05)
        out += reader.read()
    return out


def test_frames_arrive_whole_and_in_order() -> None:
    a, b = _pair()
    writer, reader = FrameWriter(a), FrameReader(b)
    frames = [b"", b"x", os.urandom(1000), os.urandom(70_000), b"last"]
    for f in frames:
        writer.send(f)
    assert _read_all(reader, len(frames)) == frames
    assert reader.read() == [] and not reader.eof


def test_a_frame_split_across_reads_waits_for_its_rest() -> None:
    a, b = _pair()
    reader = FrameReader(b)
    payload = os.urandom(300)
    frame = HEADER.pack(len(payload)) + payload
    a.sendall(frame[:2])
    assert _read_all(reader, 1, timeout_s=0.2) == []
    a.sendall(frame[2:150])
    assert _read_all(reader, 1, timeout_s=0.2) == []
    a.sendall(frame[150:] + HEADER.pack(1) + b"z")
    assert _read_all(reader, 2) == [payload, b"z"]


def test_a_send_never_blocks_while_the_reader_is_away_and_all_arrives() -> None:
    a, b = _pair()
    writer, reader = FrameWriter(a), FrameReader(b)
    frames = [os.urandom(50_000) + i.to_bytes(4, "little") for i in range(200)]  # ~10 MB
    t0 = time.perf_counter()
    for f in frames:
        writer.send(f)
    sent_s = time.perf_counter() - t0
    assert writer.num_buffered > 0  # NOTE: far over the socket's buffer: the flusher's work
    assert sent_s < 5.0  # NOTE: no reader at all: a blocking send would never return
    assert _read_all(reader, len(frames), timeout_s=30) == frames
    assert writer.close(timeout_s=5.0)


def test_frames_from_several_threads_stay_whole() -> None:
    a, b = _pair()
    writer, reader = FrameWriter(a), FrameReader(b)

    def send(tag: int) -> None:
        for i in range(300):
            writer.send(bytes([tag]) * (1 + (i * 37) % 5000))

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    got = _read_all(reader, 1200, timeout_s=30)
    for t in threads:
        t.join()
    assert len(got) == 1200
    for tag in range(4):
        mine = [f for f in got if f[0] == tag]
        assert [len(f) for f in mine] == [1 + (i * 37) % 5000 for i in range(300)]
        assert all(f == bytes([tag]) * len(f) for f in mine)


def test_close_flushes_what_waited_then_sends_raise() -> None:
    a, b = _pair()
    writer, reader = FrameWriter(a), FrameReader(b)
    frames = [os.urandom(100_000) for _ in range(20)]
    for f in frames:
        writer.send(f)
    got: list[bytes] = []
    drain = threading.Thread(target=lambda: got.extend(_read_all(reader, len(frames))))
    drain.start()
    assert writer.close(timeout_s=10.0)
    drain.join()
    assert got == frames
    with pytest.raises(BrokenPipeError):
        writer.send(b"late")


def test_a_gone_peer_raises_on_send_and_reads_as_eof() -> None:
    a, b = _pair()
    writer, reader = FrameWriter(a), FrameReader(b)
    writer.send(b"before")
    a.close()
    assert _read_all(reader, 1) == [b"before"]
    reader.wait(1.0)
    assert reader.read() == [] and reader.eof
    c, d = _pair()
    w2 = FrameWriter(c)
    d.close()
    with pytest.raises(OSError):
        for _ in range(3):  # NOTE: the first send after the peer's close may still be taken
            w2.send(b"x" * 1000)
            time.sleep(0.01)
    with pytest.raises(OSError):
        w2.send(b"again")  # NOTE: the error stays
