"""Length-prefixed frames over one Unix stream socket: the replica <-> engine-core link.

    frame = 4-byte little-endian payload length + payload (a msgpack message)

``FrameWriter.send`` never blocks its caller (the replica's event loop, the child's step
loop): what the socket does not take at once waits in a buffer, in order, and a flusher
thread writes it as the peer drains. ``FrameReader.read`` returns the frames complete so far.

NOTE: ZMQ's ``ipc://`` (the link before this) moves each message through an I/O thread on
either side, two extra thread wake-ups per message; on an idle VM a wake-up is 0.1-0.2 ms. A
200-byte round trip between two processes after 5 ms idle (2-core box): ZMQ PUSH/PULL 281 us,
a socketpair 72 us; after 50 ms idle 462 vs 121 us. Here a message costs one send and one
wake-up of the reader.
"""

from __future__ import annotations

import select
import socket
import struct
import threading

HEADER = struct.Struct("<I")
RECV_BYTES = 1 << 18
MAX_FRAME = (1 << 32) - 1


class FrameWriter:
    """Frames onto ``sock`` (made non-blocking), thread-safe, never blocking: a frame the
    socket does not take whole waits, after any earlier ones, for the flusher thread.

    ``send`` raises the socket's OSError (BrokenPipeError: the peer is gone) once a send or
    the flusher has failed; ``close`` flushes for up to ``timeout_s`` and stops the flusher
    (the socket stays open: its owner closes it)."""

    def __init__(self, sock: socket.socket, name: str = "tinyserve-frames") -> None:
        sock.setblocking(False)
        self._sock = sock
        self._buf = bytearray()
        self._cv = threading.Condition()
        self._error: OSError | None = None
        self._closed = False
        self._flusher = threading.Thread(target=self._flush_loop, name=name, daemon=True)
        self._flusher.start()

    @property
    def num_buffered(self) -> int:
        """Bytes waiting for the flusher."""
        return len(self._buf)

    def send(self, payload: bytes | bytearray | memoryview) -> None:
        if len(payload) > MAX_FRAME:
            raise ValueError(f"frame of {len(payload)} bytes is over {MAX_FRAME}")
        header = HEADER.pack(len(payload))
        with self._cv:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise BrokenPipeError("frame writer is closed")
            if self._buf:
                self._buf += header
                self._buf += payload
                return
            try:
                n = self._sock.sendmsg([header, payload], [], socket.MSG_NOSIGNAL)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._error = exc
                raise
            if n < HEADER.size + len(payload):
                # NOTE: the rest, copied once (not header + payload, then a slice of it)
                if n < HEADER.size:
                    self._buf += header[n:]
                    self._buf += payload
                else:
                    self._buf += memoryview(payload)[n - HEADER.size :]
                self._cv.notify()

    def _flush_loop(self) -> None:
        while True:
            with self._cv:
                while not self._buf and not self._closed:
                    self._cv.wait()
                if not self._buf or self._error is not None:
                    return
            # NOTE: waits outside the lock: senders append meanwhile.
            select.select([], [self._sock], [], 0.1)
            with self._cv:
                try:
                    n = self._sock.send(self._buf, socket.MSG_NOSIGNAL)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    self._error = exc
                    self._buf.clear()
                    self._cv.notify_all()
                    return
                del self._buf[:n]
                if not self._buf:
                    self._cv.notify_all()

    def close(self, timeout_s: float = 5.0) -> bool:
        """Flush what is buffered (for up to ``timeout_s``), then stop; True when all of it was
        written. Sends after this raise."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._buf or self._error is not None, timeout_s)
            flushed = not self._buf and self._error is None
        self._flusher.join(timeout=1.0)
        return flushed


class FrameReader:
    """Frames from ``sock`` (made non-blocking); ``eof`` once the peer closed its end."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._buf = bytearray()
        self.eof = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[bytes]:
        """The frames complete in what the socket holds now (possibly none); a partial frame
        waits for the next call. Sets ``eof`` when the peer has closed."""
        while not self.eof:
            try:
                chunk = self._sock.recv(RECV_BYTES)
            except BlockingIOError:
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                break
            self._buf += chunk
        frames: list[bytes] = []
        at, end = 0, len(self._buf)
        # NOTE: through a view, each frame is copied once (a bytearray slice is a copy too);
        # the view is released before the buffer is resized
        with memoryview(self._buf) as view:
            while end - at >= HEADER.size:
                (size,) = HEADER.unpack_from(view, at)
                if end - at - HEADER.size < size:
                    break
                frames.append(bytes(view[at + HEADER.size : at + HEADER.size + size]))
                at += HEADER.size + size
        del self._buf[:at]
        return frames

    def wait(self, timeout_s: float | None) -> bool:
        """Until the socket is readable (or at EOF); False after ``timeout_s``."""
        r, _, _ = select.select([self._sock], [], [], timeout_s)
        return bool(r)
