"""TinyServeRouter.choose_replicas against a fake selection client (no Ray cluster): with one
candidate the request is routed before its Select answers, the Select still reaches the
service; with several the router waits for the ranking."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from cluster.selector.core_types import Selection
from cluster.selector.types import Ranked, ScoreTerms
from cluster.serve.router import TinyServeRouter
from replicas.deployment import GenerateRequest
from replicas.sampling_params import SamplingParams

# NOTE: a guard against a hang (a router that waits for the gated Select), never a timing.
HANG_GUARD_S = 30.0


class GatedClient:
    """Answers each Select only once ``gate`` is set; records the calls."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[dict[str, Any]] = []

    async def select(self, block_hashes: list[int], num_prompt_tokens: int, **kw: Any) -> Selection:
        self.calls.append({"block_hashes": block_hashes, **kw})
        await self.gate.wait()
        ids = kw["candidate_replica_ids"]
        ranked = [Ranked(rid, 1.0 - i, ScoreTerms()) for i, rid in enumerate(reversed(ids))]
        return Selection("tinyserve", ranked, len(block_hashes), 0)


class EarlyLog:
    """Stands in for ``EarlySender``: records which replica each request was sent early to."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, routing_stats: dict[str, Any], request: Any) -> bool:
        self.sent.append((routing_stats["early_start"], request.request_id))
        return True


def _router(client: GatedClient, **kwargs: Any) -> TinyServeRouter:
    router = TinyServeRouter.__new__(TinyServeRouter)
    router.initialize_state(block_size=4, **kwargs)
    router._get_client = lambda: client  # type: ignore[method-assign,assignment,return-value]
    router._early = EarlyLog()  # type: ignore[assignment]
    return router


def _replica(rid: str) -> Any:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid),
                           routing_stats={"early_start": rid})


def _pending(future: asyncio.Future[Any] | None = None) -> Any:
    req = GenerateRequest("req-1", list(range(3, 40)), SamplingParams(max_tokens=4))
    return SimpleNamespace(args=[req], routing_context=SimpleNamespace(should_backoff=False),
                           future=future)


async def _turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_one_candidate_is_routed_before_its_select_answers() -> None:
    async def main() -> None:
        client = GatedClient()
        router = _router(client)
        only = _replica("r0")
        assigned: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending = _pending(assigned)
        ranks = await asyncio.wait_for(router.choose_replicas([only], pending), HANG_GUARD_S)
        # NOTE: routed while the service has not answered (the gate is still closed)
        assert ranks == [[only]]
        assert router.num_unwaited == 1 and router.num_decisions == 0
        assert pending.routing_context.should_backoff
        # the Select waits for Serve to assign the request (its future), then goes out with
        # the request's own fields, and is counted once answered
        await _turns()
        assert not client.calls
        assigned.set_result(only)
        await _turns()
        assert len(client.calls) == 1
        call = client.calls[0]
        assert call["request_id"] == "req-1" and call["candidate_replica_ids"] == ["r0"]
        assert len(call["block_hashes"]) == 37 // 4
        client.gate.set()
        await asyncio.gather(*router._beside)
        assert router.num_decisions == 1 and not router._beside

    asyncio.run(main())


def test_several_candidates_wait_for_the_ranking() -> None:
    async def main() -> None:
        client = GatedClient()
        router = _router(client)
        replicas = [_replica("r0"), _replica("r1")]
        task = asyncio.get_running_loop().create_task(router.choose_replicas(replicas, _pending()))
        await _turns()
        assert not task.done() and len(client.calls) == 1
        client.gate.set()
        # the fake ranks the candidates in reverse order: the service's order is kept
        assert await task == [[replicas[1]], [replicas[0]]]
        assert router.num_decisions == 1 and router.num_unwaited == 0

    asyncio.run(main())


def test_a_failed_select_beside_its_request_is_not_raised() -> None:
    class Broken(GatedClient):
        async def select(self, block_hashes: list[int], num_prompt_tokens: int,
                         **kw: Any) -> Selection:
            self.calls.append(kw)
            raise RuntimeError("service broke")

    async def main() -> None:
        client = Broken()
        router = _router(client)
        only = _replica("r0")
        assert await router.choose_replicas([only], _pending()) == [[only]]
        await asyncio.gather(*router._beside)
        assert len(client.calls) == 1 and router.num_decisions == 0

    asyncio.run(main())


def test_the_request_is_sent_early_to_the_replica_serve_is_handed_first() -> None:
    async def main() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        router, off = _router(GatedClient()), _router(GatedClient(), early_start=False)
        for r in (router, off):
            r._get_client().gate.set()  # type: ignore[union-attr]
            await r.choose_replicas([_replica("r0")], _pending())
            await r.choose_replicas([_replica("r0"), _replica("r1")], _pending())
            await asyncio.gather(*r._beside)
        return router._early.sent, off._early.sent  # type: ignore[attr-defined]

    sent, sent_off = asyncio.run(main())
    # NOTE: the fake ranks in reverse: r1 leads the second request's ranking
    assert sent == [("r0", "req-1"), ("r1", "req-1")] and sent_off == []
