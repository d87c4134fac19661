"""Per-request stamps of the ingress, joined with the replica's, for the per-hop breakdown.

One request through the app (wall clock, ``time.time()``, one host)::

    client send
      | client -> proxy -> ingress          recv - client send          (client's clock)
    recv            ingress route entered
      | parse + tokenize                    tokenized - recv, of which
      |   body read + parse + validate      parsed - recv
      |   tokenize + request built          tokenized - parsed
    tokenized       handed to the handle
      | router + Select + handle hop        replica.replica_recv - tokenized
    replica_recv    (an early start: the router's frame arrived; Serve's call claims it at
      |              replica.replica_claim, replicas/early_start.py)
      | replica queue                       replica.engine_add - replica.replica_recv
    engine_add
      | engine (queue, prefill, decode)     replica.engine_first_token / engine_finish
      |   of which detokenize               replica.detokenize_s
    replica_first_yield
      | replica -> ingress                  first_out - replica_first_yield; per output:
    first_out / last_out                    hop_sum_s / num_outputs_received (arrival - emit_time)
      | ingress (SSE/JSON)                  first_sent - first_out
    first_sent / last_sent
      | ingress -> proxy -> client          client receive - first_sent / last_sent

The ingress keeps the last ``TRACE_LOG_SIZE`` finished traces; ``OpenAIIngress.traces()``
hands them out (and forgets them). Stamps are a few ``time.time()`` calls per output: cheap
enough to stay on always.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any

from replicas.loop_lag import LAG_WINDOW_S, LoopLag, serve_main_loop
from replicas.outputs import RequestOutput, RequestTrace

TRACE_LOG_SIZE = 4096


@dataclass(slots=True)
class IngressTrace:
    """The ingress's stamps of one request (0.0 = not reached)."""

    response_id: str
    recv: float
    parsed: float = 0.0
    tokenized: float = 0.0
    first_out: float = 0.0
    last_out: float = 0.0
    first_sent: float = 0.0
    last_sent: float = 0.0
    hop_sum_s: float = 0.0  # sum over outputs of (ingress arrival - replica emit_time)
    num_outputs_received: int = 0
    tokenized_inline: bool = False  # encoded on the event loop, not a tokenizer thread
    split_allowed: bool = False  # a long prompt could be encoded in pieces (``may_split``)
    # NOTE: the ingress loop's worst timer lag (``replicas.loop_lag``; -1.0 = not sampled) in
    # the 100 ms before recv, and from recv to the last byte handed on.
    lag_before_recv_s: float = -1.0
    lag_life_s: float = -1.0
    # NOTE: the same for Serve's main loop of the ingress replica, when it is another loop
    # (its HTTP server in direct-ingress / HAProxy mode, and the dispatch to the user loop).
    main_lag_before_recv_s: float = -1.0
    replica: RequestTrace | None = None

    def on_output(self, out: RequestOutput) -> None:
        """Stamp one replica output as it reaches the ingress."""
        now = time.time()
        if not self.first_out:
            self.first_out = now
        self.last_out = now
        if out.emit_time:
            self.hop_sum_s += now - out.emit_time
        self.num_outputs_received += 1
        if out.trace is not None:
            self.replica = out.trace

    def on_sent(self, first: bool = False, last: bool = False) -> None:
        """Stamp a content chunk (or the whole body) handed to the proxy."""
        now = time.time()
        if first and not self.first_sent:
            self.first_sent = now
        if last:
            self.last_sent = now

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict: the ingress's fields and the replica's (disjoint names)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "replica"}
        if self.replica is not None:
            d.update(asdict(self.replica))
        return d


class TraceLog:
    """A bounded log of finished traces (oldest dropped first). With ``loop_lag`` (the
    handlers' loop) and ``main_lag`` (Serve's main loop of the replica), each trace gets the
    loops' lag around its stamps as it is added; ``sample_loops`` starts them."""

    def __init__(self, size: int = TRACE_LOG_SIZE, loop_lag: LoopLag | None = None,
                 main_lag: LoopLag | None = None) -> None:
        self._done: deque[IngressTrace] = deque(maxlen=size)
        self.loop_lag = loop_lag
        self.main_lag = main_lag
        self._main_checked = False

    def sample_loops(self) -> None:
        """Make sure the samplers run (call from a handler: cheap after the first call)."""
        if self.loop_lag is not None:
            self.loop_lag.ensure_running()
        if self.main_lag is not None and not self._main_checked:
            self._main_checked = True
            main = serve_main_loop()
            if main is None or main is asyncio.get_running_loop():
                self.main_lag = None  # NOTE: no separate main loop: loop_lag covers it
            else:
                self.main_lag.ensure_running(main)

    def add(self, trace: IngressTrace) -> None:
        if self.loop_lag is not None:
            lag = self.loop_lag
            trace.lag_before_recv_s = lag.max_between(trace.recv - LAG_WINDOW_S, trace.recv)
            trace.lag_life_s = lag.max_between(trace.recv, trace.last_sent or time.time())
        if self.main_lag is not None and self._main_checked:
            trace.main_lag_before_recv_s = self.main_lag.max_between(
                trace.recv - LAG_WINDOW_S, trace.recv)
        self._done.append(trace)

    def take(self) -> list[dict[str, Any]]:
        """The finished traces since the last call, oldest first."""
        out = [t.to_dict() for t in self._done]
        self._done.clear()
        return out
