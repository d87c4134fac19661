"""How a replica's outputs leave it: every delta, fewer under load, or one per sequence.

Each output a replica yields is a Ray streaming item that the replica serializes, the ingress
receives and turns into an SSE chunk, and Serve's proxy forwards: about 2.7 ms of CPU per item
across the three processes on the 2-core CPU box (benchmarks/serve_path_capacity.py,
benchmarks/results/serve_overhead_notes.md "Path capacity"). With a fast engine and many
streams that per-item cost, not the engine, bounds the app (issue 16). So:

- a non-streamed request (``stream`` False) leaves as one output per sequence, at its end;
- a streamed one leaves every delta while the replica is below ``max_outputs_per_s``; above
  it each sequence's deltas are merged until ``active sequences / max_outputs_per_s`` seconds
  have passed since its last output (no timer: the merged output goes with the next delta
  past that gap, so a chunk is late by at most one ``stream_interval``);
- a sequence's first output and its last always leave at once (TTFT and the end of the
  stream are never held); if the stream fails, ``flush`` hands out what is held, so the
  caller still sends everything generated before the error.

``StreamBudget`` is the replica's (the number of open sequences); ``OutputPacer`` one
request's (per choice index). Pure: time is passed in.
"""

from __future__ import annotations

from replicas.outputs import RequestOutput, merge_outputs


class StreamBudget:
    """The replica-wide cap: ``max_outputs_per_s`` items per second over its open streamed
    sequences (0 = no cap, every delta leaves)."""

    def __init__(self, max_outputs_per_s: float) -> None:
        if max_outputs_per_s < 0:
            raise ValueError(f"max_outputs_per_s must be >= 0, got {max_outputs_per_s}")
        self.max_outputs_per_s = max_outputs_per_s
        self.num_sequences = 0

    def min_gap_s(self) -> float:
        """Seconds a streamed sequence waits between outputs now (0.0 below the cap)."""
        if not self.max_outputs_per_s:
            return 0.0
        return self.num_sequences / self.max_outputs_per_s


class OutputPacer:
    """One request's outputs: ``offer(out, now)`` returns what to yield now (``out``, or it
    merged with the held deltas of its sequence) or None (held). Use as a context manager
    around the request's stream so the budget counts it while open."""

    def __init__(self, budget: StreamBudget, stream: bool, n: int = 1) -> None:
        self._budget = budget
        self._stream = stream
        self._n = n if stream else 0
        self._held: dict[int, RequestOutput] = {}
        self._last_emit: dict[int, float] = {}

    def __enter__(self) -> OutputPacer:
        self._budget.num_sequences += self._n
        return self

    def __exit__(self, *_: object) -> None:
        self._budget.num_sequences -= self._n

    def offer(self, out: RequestOutput, now: float) -> RequestOutput | None:
        earlier = self._held.pop(out.index, None)
        if earlier is not None:
            out = merge_outputs(earlier, out)
        last = self._last_emit.get(out.index)
        hold = not out.finished and (
            not self._stream
            or (last is not None and now - last < self._budget.min_gap_s()))
        if hold:
            self._held[out.index] = out
            return None
        self._last_emit[out.index] = now
        return out

    def flush(self) -> list[RequestOutput]:
        """The held (merged, unfinished) outputs, one per sequence, and forget them."""
        held = list(self._held.values())
        self._held.clear()
        return held
