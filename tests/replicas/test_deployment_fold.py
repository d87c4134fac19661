"""A non-streamed request leaves the replica as one output per sequence, the same tokens and
text as the deltas it folds; a streamed one keeps every delta (no Serve here: the deployment's
class with a fake engine)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from replicas.deployment import GenerateRequest
from replicas.outputs import RequestMetrics, RequestOutput, RequestTrace
from replicas.sampling_params import SamplingParams
from tests.replica_fakes import fake_replica


def _deltas(n: int) -> list[RequestOutput]:
    """Four deltas per sequence, sequences interleaved; the last carries the trace."""
    outs = []
    for step in range(4):
        for index in range(n):
            last = step == 3
            outs.append(RequestOutput(
                "r", [10 * index + step, 100 + step], f"<{index}:{step}>", last,
                "length" if last else None, 7, 3, 2 * (step + 1), None,
                RequestMetrics(ttft_s=0.01 if last else None), trace=RequestTrace() if last
                else None, index=index))
    return outs


class _FakeEngine:
    def __init__(self, outs: list[RequestOutput]) -> None:
        self.outs = outs

    def generate(self, *_: object, **__: object) -> AsyncIterator[RequestOutput]:
        async def gen() -> AsyncIterator[RequestOutput]:
            for out in self.outs:
                yield out

        return gen()


def _replica(outs: list[RequestOutput]) -> Any:
    return fake_replica(_FakeEngine(outs))


def _collect(outs: list[RequestOutput], n: int, stream: bool) -> list[RequestOutput]:
    req = GenerateRequest("r", [1, 2, 3], SamplingParams(max_tokens=8), n=n, stream=stream)

    async def main() -> list[RequestOutput]:
        return [o async for o in _replica(outs).generate(req)]

    return asyncio.run(main())


def test_streamed_request_keeps_every_delta() -> None:
    got = _collect(_deltas(1), 1, stream=True)
    assert [o.text_delta for o in got] == ["<0:0>", "<0:1>", "<0:2>", "<0:3>"]
    assert all(o.emit_time > 0 for o in got)


def test_unstreamed_request_is_one_output_per_sequence_with_the_same_content() -> None:
    for n in (1, 3):
        deltas = _deltas(n)
        streamed = _collect(_deltas(n), n, stream=True)
        folded = _collect(deltas, n, stream=False)
        assert len(folded) == n and sorted(o.index for o in folded) == list(range(n))
        for out in folded:
            mine = [d for d in streamed if d.index == out.index]
            assert out.finished and out.finish_reason == "length"
            assert out.text_delta == "".join(d.text_delta for d in mine)
            assert out.new_token_ids == [t for d in mine for t in d.new_token_ids]
            assert (out.num_prompt_tokens, out.num_cached_tokens, out.num_output_tokens) == (
                7, 3, 8)
            assert out.metrics.ttft_s == 0.01 and out.trace is not None
            assert out.trace.num_outputs >= 1 and out.emit_time > 0


def test_the_last_output_carries_the_replica_loops_lag_when_sampled() -> None:
    from replicas.loop_lag import LoopLag

    outs = _deltas(1)
    outs[-1].trace = RequestTrace(engine_add=0.0)
    replica = _replica(outs)
    lag = LoopLag(0.002)
    replica._loop_lag = lag
    import time

    now = time.time()
    lag.record(now - 5.0, 0.500)  # long before: not this request's
    lag.record(now - 0.05, 0.030)  # NOTE: within the 100 ms before the request

    async def main() -> list[RequestOutput]:
        req = GenerateRequest("r", [1, 2, 3], SamplingParams(max_tokens=8))
        return [o async for o in replica.generate(req)]

    trace = asyncio.run(main())[-1].trace
    assert trace is not None and trace.replica_lag_before_s == 0.030
    assert trace.replica_lag_queue_s == -1.0  # NOTE: engine_add not stamped: not measured
    plain = _collect(_deltas(1), 1, stream=True)[-1].trace
    assert plain is not None and plain.replica_lag_before_s == -1.0


def test_a_failed_stream_still_sends_what_it_held_then_raises() -> None:
    import pytest

    class _Failing(_FakeEngine):
        def generate(self, *_: object, **__: object) -> AsyncIterator[RequestOutput]:
            async def gen() -> AsyncIterator[RequestOutput]:
                for out in self.outs:
                    yield out
                raise RuntimeError("engine step failed")

            return gen()

    replica = _replica(_deltas(1)[:3])  # three unfinished deltas
    replica.engine = _Failing(_deltas(1)[:3])
    got: list[RequestOutput] = []

    async def main() -> None:
        req = GenerateRequest("r", [1], SamplingParams(max_tokens=8), stream=False)
        async for out in replica.generate(req):
            got.append(out)

    with pytest.raises(RuntimeError, match="engine step failed"):
        asyncio.run(main())
    assert [o.text_delta for o in got] == ["<0:0><0:1><0:2>"] and not got[0].finished
