"""The messages between AsyncLLMEngine and its engine-core process (msgpack via msgspec).

    parent (replica)  --PUSH/PULL-->  child (engine core)      Adds | Aborts | Query | Shutdown
    parent (replica)  <--PULL/PUSH--  child (engine core)      Ready | Step | Reply | Bye

Every message is a tagged, array-like ``msgspec.Struct`` (no field names on the wire). The hot
path is ``Step``: one message per engine step, holding that step's outputs as ``WireOutput``
rows (request id, new token ids, text delta, finish, counters) plus the engine's measured
rates. Queries (stats, KV events, hashes, integrity, calibration) are rare: their results
travel pickled inside ``Reply``, which keeps the dataclass types exact.

NOTE: detokenization stays in the child, inside the step's output processing: stop strings
end a request in the step that completes them (blocks freed at once, no extra round trip, no
token computed past the stop), the text delta costs the wire a few bytes, and
``DecodeStream`` costs ~0.6 us a token (benchmarks/results/serve_overhead_notes.md), far
below a step, on a process whose GIL nothing else wants; the parent is the busy process this
split relieves.
"""

from __future__ import annotations

import msgspec

from replicas.outputs import RequestMetrics, RequestOutput, RequestTrace
from replicas.request_limits import RequestLimits
from replicas.sampling_params import SamplingParams

# -- parent -> child ---------------------------------------------------------------------------


class WireAdd(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class Adds(msgspec.Struct, tag="add", array_like=True):
    """Requests queued in one hand-over (a parallel-sampling request's children together);
    the child compiles a structured-output grammar off its step loop before adding them."""

    adds: list[WireAdd]


class Aborts(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class Query(msgspec.Struct, tag="query", array_like=True):
    """Answered between steps with a ``Reply`` of the same ``query_id``. ``name`` is one of
    ``QUERIES``."""

    query_id: int
    name: str


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    """Abort everything (final outputs in one ``Step``), send ``Bye``, exit."""


Inbound = Adds | Aborts | Query | Shutdown
QUERIES = (
    "stats",
    "take_events",
    "cached_block_hashes",
    "check_integrity",
    "calibrate",
    "sparse_stats",
)

# -- child -> parent ---------------------------------------------------------------------------


class WireOutput(msgspec.Struct, array_like=True):
    """One ``RequestOutput`` (the same fields, flat)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    logprobs: list[dict[int, float]] | None
    queue_time_s: float | None
    ttft_s: float | None
    tpot_s: float | None
    trace: RequestTrace | None


class WireError(msgspec.Struct, array_like=True):
    """A request that failed: its stream raises ``kind(message)``."""

    request_id: str
    kind: str
    message: str


class Step(msgspec.Struct, tag="step", array_like=True):
    outputs: list[WireOutput]
    errors: list[WireError]
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


class Reply(msgspec.Struct, tag="reply", array_like=True):
    """A query's pickled result, or its error (``error_kind`` non-empty)."""

    query_id: int
    payload: bytes
    error_kind: str = ""
    error: str = ""


class Ready(msgspec.Struct, tag="ready", array_like=True):
    """The engine is built (``limits`` set) or failed to build (``error_kind`` set)."""

    limits: RequestLimits | None
    error_kind: str = ""
    error: str = ""


class Bye(msgspec.Struct, tag="bye", array_like=True):
    """The child's last message after a ``Shutdown``."""


Outbound = Ready | Step | Reply | Bye

# -- conversions ---------------------------------------------------------------------------------

_KINDS: dict[str, type[BaseException]] = {
    "ValueError": ValueError,
    "AssertionError": AssertionError,
}


def to_wire(out: RequestOutput) -> WireOutput:
    m = out.metrics
    return WireOutput(
        out.request_id,
        out.new_token_ids,
        out.text_delta,
        out.finished,
        out.finish_reason,
        out.num_prompt_tokens,
        out.num_cached_tokens,
        out.num_output_tokens,
        out.logprobs,
        m.queue_time_s,
        m.ttft_s,
        m.tpot_s,
        out.trace,
    )


def from_wire(w: WireOutput) -> RequestOutput:
    return RequestOutput(
        w.request_id,
        w.new_token_ids,
        w.text_delta,
        w.finished,
        w.finish_reason,
        w.num_prompt_tokens,
        w.num_cached_tokens,
        w.num_output_tokens,
        w.logprobs,
        RequestMetrics(w.queue_time_s, w.ttft_s, w.tpot_s),
        trace=w.trace,
    )


def error_kind(exc: BaseException) -> str:
    """The name an exception crosses the wire as (ValueError, AssertionError, else its own
    name, raised back as RuntimeError)."""
    return type(exc).__name__


def make_error(kind: str, message: str) -> BaseException:
    """The exception to raise in the parent for ``(kind, message)``: ValueError (bad input)
    and AssertionError (broken pool) keep their type, anything else is a RuntimeError."""
    cls = _KINDS.get(kind)
    if cls is not None:
        return cls(message)
    return RuntimeError(f"{kind}: {message}" if kind else message)


def to_wire_error(request_id: str, exc: BaseException) -> WireError:
    return WireError(request_id, error_kind(exc), str(exc))


def from_wire_error(e: WireError) -> BaseException:
    return make_error(e.kind, e.message)
