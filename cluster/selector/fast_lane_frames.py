"""The Select fast lane's framing: what travels on its TCP connections, both directions.

One frame = a 9-byte header + payload:

    u32 payload length | u32 call id | u8 kind      (little endian)

Client -> server kinds: ``HELLO`` (payload: the shared token, UTF-8; empty when the service
has none), ``SELECT`` (payload: ``SelectRequest`` bytes, the same as gRPC's Select carries),
``PING`` (empty). Server -> client: the call id of the frame it answers, kind ``OK``
(payload: ``SelectResponse`` bytes for a Select, empty otherwise) or an error kind (payload:
the message, UTF-8). Answers to one connection's calls come in the order the calls arrived;
the id is what a pipelined client matches them by.

A connection must open with ``HELLO``; until one with the right token has been answered
``OK``, every other frame is refused (``UNAUTHENTICATED``, then the server closes the
connection). A frame longer than ``MAX_FRAME_BYTES`` is answered ``TOO_LARGE`` and the
connection closed (its remaining bytes cannot be trusted as frames); a bad Select only fails
that call (``INVALID_ARGUMENT``) and the connection stays open.
"""

from __future__ import annotations

import struct
from enum import IntEnum

HEADER = struct.Struct("<IIB")
# NOTE: the largest legitimate Select: max_prompt_blocks (16,384) hashes at <= 10 bytes and
# 4,096 candidate ids of <= 256 chars: ~1.3 MB; 4 MiB leaves room and refuses garbage early.
MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_CALL_ID = (1 << 32) - 1


class Kind(IntEnum):
    """A frame's kind (the header's last byte)."""

    OK = 0
    HELLO = 1
    SELECT = 2
    PING = 3
    # errors (server -> client), the payload says why
    INVALID_ARGUMENT = 64
    UNAUTHENTICATED = 65
    TOO_LARGE = 66
    INTERNAL = 67


ERROR_KINDS = frozenset(
    {Kind.INVALID_ARGUMENT, Kind.UNAUTHENTICATED, Kind.TOO_LARGE, Kind.INTERNAL}
)


def frame(call_id: int, kind: int, payload: bytes = b"") -> bytes:
    """One frame's bytes."""
    return HEADER.pack(len(payload), call_id, kind) + payload


class FastLaneError(Exception):
    """The server answered a call with an error frame (``kind`` says which)."""

    def __init__(self, kind: int, message: str) -> None:
        super().__init__(f"{_name(kind)}: {message}")
        self.kind = kind
        self.message = message


def _name(kind: int) -> str:
    try:
        return Kind(kind).name
    except ValueError:
        return f"kind {kind}"
