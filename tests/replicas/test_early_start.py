"""Early starts (replicas/early_start.py, cluster/serve/early_send.py): the router's frame over a
real Unix socket starts a run at once; its outputs wait for Serve's call to claim it; an
unclaimed run is aborted; every refusal leaves the request to the usual path."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cluster.serve.early_send import EarlySender
from cluster.serve.output_inbox import OutputInbox
from replicas.deployment import GenerateRequest
from replicas.early_start import ROUTING_STATS_KEY, EarlyStarts
from replicas.output_post import HEADER, OutputPost, ReplyTo, hello
from replicas.outputs import RequestMetrics, RequestOutput, RequestTrace
from replicas.sampling_params import SamplingParams
from tests.replica_fakes import fake_replica


@dataclass
class _Req:
    request_id: str
    reply_to: str = "inbox"


class _Log:
    """A fake run: records its start, waits for the claim, records the claim's time."""

    def __init__(self, fail: bool = False, slow_abort_s: float = 0.0) -> None:
        self.events: list[tuple[str, str]] = []
        self.fail, self.slow_abort_s = fail, slow_abort_s

    async def start(self, req: Any, claimed: asyncio.Future[float]) -> None:
        self.events.append(("started", req.request_id))
        if self.fail:
            raise RuntimeError("engine refused it")
        try:
            await claimed
            self.events.append(("posted", req.request_id))
        except asyncio.CancelledError:
            self.events.append(("aborted", req.request_id))
            await asyncio.sleep(self.slow_abort_s)  # NOTE: an engine abort takes a moment
            self.events.append(("freed", req.request_id))
            raise


def _run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())  # type: ignore[arg-type]


async def _until(cond: Callable[[], bool], timeout_s: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "condition never held"
        await asyncio.sleep(0.005)


def _early(log: _Log, room: bool = True, timeout_s: float = 5.0) -> EarlyStarts:
    return EarlyStarts("node-a", log.start, lambda: room, timeout_s)


def test_a_sent_request_starts_at_once_and_posts_only_once_claimed() -> None:
    async def main() -> tuple[list[tuple[str, str]], dict[str, int], int]:
        log = _Log()
        early = _early(log)
        await early.listen()
        sender = EarlySender("node-a")
        stats = early.routing_stats()
        assert not sender.send(stats, _Req("r0"))  # NOTE: the first opens the connection
        await _until(lambda: bool(sender._conns))
        assert sender.send(stats, _Req("r1"))
        await _until(lambda: ("started", "r1") in log.events)
        await asyncio.sleep(0.05)
        assert ("posted", "r1") not in log.events  # NOTE: held until Serve's call comes
        run = await early.claim("r1")
        assert run is not None
        await run
        sender.close()
        early.close()
        return log.events, early.counts.to_dict(), sender.num_sent

    events, counts, sent = _run(main)
    assert events == [("started", "r1"), ("posted", "r1")]
    assert counts["started"] == counts["claimed"] == 1 and sent == 1


def test_an_unclaimed_run_is_aborted_and_a_late_claim_runs_the_usual_way() -> None:
    async def main() -> tuple[list[tuple[str, str]], Any, dict[str, int]]:
        log = _Log(slow_abort_s=0.1)
        early = _early(log, timeout_s=0.05)
        assert early.offer("r", _Req("r"))
        await _until(lambda: ("aborted", "r") in log.events)
        # NOTE: the claim comes while the abort is still under way: it waits for the run's
        # end, so the usual run finds the request id free
        run = await early.claim("r")
        assert ("freed", "r") in log.events
        early.close()
        return log.events, run, early.counts.to_dict()

    events, run, counts = _run(main)
    assert run is None and ("posted", "r") not in events
    assert counts["expired"] == 1 and counts["claimed"] == 0


def test_refusals_leave_the_request_to_serves_call() -> None:
    async def main() -> tuple[list[bool], dict[str, int], list[tuple[str, str]]]:
        log = _Log()
        full = _early(log, room=False)
        got = [full.offer("a", _Req("a"))]
        early = _early(log)
        got.append(early.offer("b", _Req("b")))
        got.append(early.offer("b", _Req("b")))  # NOTE: its id is running
        assert await early.claim("c") is None  # NOTE: Serve's call came first
        got.append(early.offer("c", _Req("c")))  # NOTE: the late frame is refused
        await (await early.claim("b"))  # type: ignore[misc]
        counts = early.counts.to_dict()
        full.close()
        early.close()
        return got, counts, log.events

    got, counts, events = _run(main)
    assert got == [False, True, False, False]
    assert counts["refused"] == 2 and counts["started"] == counts["claimed"] == 1
    assert events == [("started", "b"), ("posted", "b")]


def test_a_run_that_fails_before_its_claim_is_forgotten() -> None:
    async def main() -> tuple[Any, dict[str, int]]:
        early = _early(_Log(fail=True))
        early.offer("r", _Req("r"))
        await _until(lambda: early.counts.failed == 1)
        run = await early.claim("r")
        early.close()
        return run, early.counts.to_dict()

    run, counts = _run(main)
    assert run is None and counts["failed"] == 1


def test_strangers_and_bad_frames() -> None:
    async def main() -> tuple[list[tuple[str, str]], dict[str, int]]:
        log = _Log()
        early = _early(log)
        await early.listen()
        # NOTE: a peer without the token: nothing it writes is read
        _, w = await asyncio.open_unix_connection(early.address.path)
        body = pickle.dumps(_Req("x"))
        w.write(hello("wrong") + HEADER.pack(len(body)) + body)
        await asyncio.sleep(0.05)
        # NOTE: an undecodable frame is refused and the link kept
        _, w2 = await asyncio.open_unix_connection(early.address.path)
        good = pickle.dumps(_Req("y"))
        w2.write(hello(early.address.token) + HEADER.pack(3) + b"bad"
                 + HEADER.pack(len(good)) + good)
        await _until(lambda: ("started", "y") in log.events)
        counts = early.counts.to_dict()
        w.close()
        w2.close()
        early.close()
        return log.events, counts

    events, counts = _run(main)
    assert events[0] == ("started", "y") and ("started", "x") not in events
    assert counts["refused"] == 1 and counts["started"] == 1


def test_the_sender_sends_only_to_its_node_and_only_posted_requests() -> None:
    async def main() -> list[bool]:
        early = _early(_Log())
        await early.listen()
        other = ReplyTo("node-b", early.address.path, early.address.token).encode()
        sender = EarlySender("node-a")
        stats = early.routing_stats()
        sender.send(stats, _Req("warm"))
        await _until(lambda: bool(sender._conns))
        got = [
            sender.send({ROUTING_STATS_KEY: other}, _Req("a")),  # another node's replica
            sender.send({}, _Req("b")),  # a replica that publishes no socket
            sender.send(stats, _Req("c", reply_to="")),  # outputs as Ray items
            sender.send(stats, _Req("d")),
        ]
        early.close()  # NOTE: the replica went away: sends fail quietly, then reopen
        await asyncio.sleep(0.05)
        for w in sender._conns.values():
            w.transport.abort()
        got.append(sender.send(stats, _Req("e")))
        sender.close()
        return got

    assert _run(main) == [False, False, False, True, False]


# -- the deployment: its generate claims the early run ------------------------------------------
class _GatedEngine:
    """Four outputs, one per 10 ms; ``closed`` once its stream ends (an abort included)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.closed: list[str] = []

    def generate(self, rid: str, *_: object, **__: object) -> AsyncIterator[RequestOutput]:
        async def gen() -> AsyncIterator[RequestOutput]:
            self.started.append(rid)
            try:
                for s in range(4):
                    await asyncio.sleep(0.01)
                    yield RequestOutput(rid, [s], f"<{s}>", s == 3, "length" if s == 3 else None,
                                        2, 0, s + 1, None, RequestMetrics(),
                                        trace=RequestTrace() if s == 3 else None)
            finally:
                self.closed.append(rid)

        return gen()


def _early_replica(timeout_s: float = 5.0) -> Any:
    replica = fake_replica(_GatedEngine(), OutputPost("node-a"))
    replica._early = EarlyStarts("node-a", replica._run_early, lambda: True, timeout_s)
    return replica


def test_the_replica_starts_early_and_its_call_claims_the_posted_outputs() -> None:
    async def main() -> tuple[list[RequestOutput], list[RequestOutput], Any]:
        replica = _early_replica()
        inbox = OutputInbox("node-a")
        await inbox.start()
        q = inbox.open("r")
        req = GenerateRequest("r", [1, 2], SamplingParams(max_tokens=4),
                              reply_to=inbox.reply_to.encode())
        assert replica._early.offer("r", req)
        await asyncio.sleep(0.1)  # NOTE: the engine ran on; nothing reached the inbox
        assert replica.engine.started == ["r"] and q.qsize() == 0
        yielded = [o async for o in replica.generate(req)]
        await asyncio.sleep(0.05)
        posted = [q.get_nowait() for _ in range(q.qsize())]
        inbox.shutdown()
        return yielded, posted, replica

    yielded, posted, replica = _run(main)
    assert yielded == [] and [o.text_delta for o in posted] == ["<0>", "<1>", "<2>", "<3>"]
    trace = posted[-1].trace
    assert trace is not None and trace.replica_claim > trace.replica_recv > 0
    assert replica.engine.started == ["r"]  # NOTE: one run: the call did not start another
    assert replica._inflight == {} and replica._early.counts.claimed == 1


def test_cancelling_the_claiming_call_aborts_the_early_run() -> None:
    async def main() -> Any:
        replica = _early_replica()
        inbox = OutputInbox("node-a")
        await inbox.start()
        req = GenerateRequest("r", [1, 2], SamplingParams(max_tokens=4),
                              reply_to=inbox.reply_to.encode())
        replica._early.offer("r", req)
        call = asyncio.ensure_future(replica.generate(req).__anext__())
        await asyncio.sleep(0.015)
        call.cancel()  # NOTE: what Serve does when the client goes away
        await asyncio.gather(call, return_exceptions=True)
        await asyncio.sleep(0.02)
        inbox.shutdown()
        return replica

    replica = _run(main)
    assert replica.engine.closed == ["r"] and replica._inflight == {}


def test_an_unclaimed_early_run_is_aborted_in_the_engine() -> None:
    async def main() -> Any:
        replica = _early_replica(timeout_s=0.005)
        inbox = OutputInbox("node-a")
        await inbox.start()
        q = inbox.open("r")
        req = GenerateRequest("r", [1, 2], SamplingParams(max_tokens=4),
                              reply_to=inbox.reply_to.encode())
        replica._early.offer("r", req)
        await asyncio.sleep(0.1)
        assert q.qsize() == 0
        inbox.shutdown()
        return replica

    replica = _run(main)
    assert replica.engine.closed == ["r"] and replica._early.counts.expired == 1
    assert replica._inflight == {}


def test_the_sender_never_raises_on_what_it_cannot_send() -> None:
    async def main() -> list[bool]:
        early = _early(_Log())
        await early.listen()
        sender = EarlySender("node-a")
        stats = early.routing_stats()
        sender.send(stats, _Req("warm"))
        await _until(lambda: bool(sender._conns))
        got = [sender.send(None, _Req("a")),  # NOTE: a replica without routing stats yet
               sender.send(stats, _Unpicklable("b"))]
        sender.close()
        early.close()
        return got

    assert _run(main) == [False, False]


@dataclass
class _Unpicklable(_Req):
    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle")
