"""One turn of the engine core, the same on its thread or in its own process.

    apply_inputs(engine, adds, aborts)   queue new requests, finish aborted ones
    safe_step(engine)                    one step; a failed step fails its requests, never hangs
    check_idle(engine)                   the pool's integrity check, when the core is idle

Each returns what must reach the streams as ``Routed``: ``(request_id, RequestOutput)`` or
``(request_id, exception)`` (the stream raises it). Only the core (thread or child process)
calls these, between steps: it is the one place that mutates the engine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from replicas.outputs import RequestOutput
from replicas.sampling_params import SamplingParams

if TYPE_CHECKING:
    import xgrammar

    from replicas.llm_engine import LLMEngine

# A request as the core adds it: (request_id, prompt_token_ids, params, compiled grammar).
Add = tuple[str, list[int], SamplingParams, "xgrammar.CompiledGrammar | None"]
Routed = list[tuple[str, RequestOutput | BaseException]]

logger = logging.getLogger(__name__)


def apply_inputs(engine: LLMEngine, adds: list[Add], aborts: list[str]) -> Routed:
    """Add ``adds`` (a refused one routes its ValueError), then abort ``aborts`` (each known
    one routes its final "abort" output)."""
    routed: Routed = []
    for rid, prompt, params, grammar in adds:
        try:
            engine.add_request(rid, prompt, params, grammar)
        except ValueError as exc:
            routed.append((rid, exc))
    for rid in aborts:
        out = engine.abort(rid)
        if out is not None:
            routed.append((rid, out))
    return routed


def safe_step(engine: LLMEngine) -> Routed:
    """One ``engine.step()``; if it raises, every request fails with a RuntimeError naming
    the cause and the prefix cache is dropped."""
    try:
        return [(out.request_id, out) for out in engine.step()]
    except Exception as exc:  # NOTE: a broken step must not hang every stream.
        logger.exception("engine step failed; aborting every request")
        failed = [rid for rid in list(engine.requests) if engine.abort(rid)]
        # NOTE: blocks are hashed when scheduled (replicas.scheduler), so the failed step may
        # have cached hashes over K/V it never wrote; with every request aborted no block is
        # in use and the reset cannot be refused.
        with engine.lock:
            engine.kv.reset_prefix_cache()
        return [(rid, RuntimeError(f"engine step failed: {exc!r}")) for rid in failed]


def abort_all(engine: LLMEngine) -> Routed:
    """Finish every request with "abort" (shutdown): their final outputs."""
    routed: Routed = []
    for rid in list(engine.requests):
        out = engine.abort(rid)
        if out is not None:
            routed.append((rid, out))
    return routed


def check_idle(engine: LLMEngine) -> None:
    """The idle-time work: a compaction if one is due (``CompactionConfig.when='idle'``),
    then the pool's integrity check; a broken pool is logged, never raised."""
    # NOTE: idle: every block is free or cached, the cheapest moment to move and verify.
    try:
        with engine.lock:
            if not engine.has_unfinished_requests():
                engine.compactor.maybe_compact_idle()
            engine.kv.check_integrity()
    except AssertionError:
        logger.exception("KV pool integrity check failed")
