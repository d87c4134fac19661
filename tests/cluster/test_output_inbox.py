"""Streamed outputs over a Unix socket (replicas.output_post -> cluster.serve.output_inbox):
frames reach their request's queue in order, strangers and ended requests are dropped, the
merge with the Serve call's stream loses nothing and raises its errors, and the replica
posts (yields nothing) only to an inbox on its own node. Real sockets, no Ray."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cluster.serve.output_inbox import OutputInbox, merge_posted
from replicas.deployment import GenerateRequest, LLMReplica
from replicas.output_post import HEADER, OutputPost, ReplyTo, frame, hello
from replicas.outputs import RequestMetrics, RequestOutput, RequestTrace
from replicas.sampling_params import SamplingParams
from tests.replica_fakes import fake_replica


def _out(rid: str, step: int, finished: bool = False, index: int = 0) -> RequestOutput:
    return RequestOutput(rid, [step], f"<{step}>", finished, "length" if finished else None,
                         4, 0, step + 1, None, RequestMetrics(), index=index,
                         trace=RequestTrace() if finished else None)


def test_reply_to_round_trips_and_rejects_malformed() -> None:
    r = ReplyTo("node-a", "/tmp/x/s", "ab12")
    assert ReplyTo.decode(r.encode()) == r
    assert ReplyTo.decode("") is None and ReplyTo.decode("a|b") is None
    assert ReplyTo.decode("a||c") is None


def test_posted_frames_reach_their_requests_in_order_and_strangers_are_refused() -> None:
    async def main() -> tuple[list[str], list[str], OutputInbox, list[str]]:
        inbox = OutputInbox("node-a")
        await inbox.start()
        post = OutputPost("node-a")
        assert post.accepts(inbox.reply_to)
        assert not post.accepts(ReplyTo("node-b", inbox.reply_to.path, "t"))
        assert not post.accepts(ReplyTo("node-a", "/nonexistent/s", "t"))
        assert not OutputPost("").accepts(inbox.reply_to)
        qa, qb = inbox.open("a"), inbox.open("b")
        conn = await post.connection(inbox.reply_to)
        assert await post.connection(inbox.reply_to) is conn  # NOTE: one shared connection
        for step in range(5):
            await OutputPost.send(conn, "a", _out("a", step, step == 4))
            await OutputPost.send(conn, "b", _out("b", step, step == 4))
            await OutputPost.send(conn, "gone", _out("gone", step))
        got_a = [(await qa.get()).text_delta for _ in range(5)]
        got_b = [(await qb.get()).text_delta for _ in range(5)]
        # A peer without the token is cut off: nothing it sends is delivered.
        qc = inbox.open("c")
        _, w = await asyncio.open_unix_connection(inbox.reply_to.path)
        w.write(hello("wrong") + frame("c", _out("c", 0, True)))
        await w.drain()
        await asyncio.sleep(0.1)
        leaked = [qc.get_nowait().text_delta for _ in range(qc.qsize())]
        w.close()
        post.close()
        return got_a, got_b, inbox, leaked

    got_a, got_b, inbox, leaked = asyncio.run(main())
    assert got_a == got_b == ["<0>", "<1>", "<2>", "<3>", "<4>"]
    assert inbox.num_frames == 15 and inbox.num_dropped == 5
    assert leaked == []
    path = Path(inbox.reply_to.path)
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    inbox.shutdown()
    assert not path.parent.exists()


def test_requests_racing_to_start_the_inbox_share_one_server() -> None:
    async def main() -> bool:
        inbox = OutputInbox("n")
        await asyncio.gather(*(inbox.start() for _ in range(5)))
        post = OutputPost("n")
        q = inbox.open("r")
        conn = await post.connection(inbox.reply_to)
        await OutputPost.send(conn, "r", _out("r", 0, True))
        got = (await asyncio.wait_for(q.get(), 5)).finished
        post.close()
        inbox.shutdown()
        return got

    assert asyncio.run(main())


def test_a_frame_over_the_size_bound_closes_the_connection() -> None:
    async def main() -> bool:
        inbox = OutputInbox("n")
        await inbox.start()
        r, w = await asyncio.open_unix_connection(inbox.reply_to.path)
        w.write(hello(inbox.reply_to.token) + HEADER.pack(0xFFFFFFFF))
        await w.drain()
        closed = await asyncio.wait_for(r.read(), 5) == b""
        inbox.shutdown()
        return closed

    assert asyncio.run(main())


async def _items(outs: list[RequestOutput], exc: BaseException | None = None,
                 delay: float = 0.0) -> AsyncIterator[RequestOutput]:
    for out in outs:
        yield out
    await asyncio.sleep(delay)
    if exc is not None:
        raise exc


def _merge(items: AsyncIterator[RequestOutput], posted: list[tuple[float, RequestOutput]],
           n: int = 1, grace_s: float = 5.0) -> list[RequestOutput]:
    async def main() -> list[RequestOutput]:
        q: asyncio.Queue[Any] = asyncio.Queue()

        async def feed() -> None:
            for delay, out in posted:
                await asyncio.sleep(delay)
                q.put_nowait(out)

        feeder = asyncio.ensure_future(feed())
        got = [o async for o in merge_posted(items, q, n, grace_s)]
        feeder.cancel()
        return got

    return asyncio.run(main())


def test_merge_waits_for_posted_outputs_that_arrive_after_the_call_ended() -> None:
    # The call's stream is empty and ends at once; the posted outputs trickle in after it.
    got = _merge(_items([]), [(0.02, _out("r", 0)), (0.02, _out("r", 1)),
                              (0.05, _out("r", 2, True))])
    assert [o.text_delta for o in got] == ["<0>", "<1>", "<2>"]


def test_merge_takes_ray_items_too_and_ends_when_every_sequence_finished() -> None:
    # A replica that could not post yields Ray items; n = 2 sequences, mixed paths.
    items = _items([_out("r", 0, index=0), _out("r", 1, True, index=0)])
    got = _merge(items, [(0.01, _out("r", 0, index=1)), (0.01, _out("r", 1, True, index=1))],
                 n=2)
    assert sorted((o.index, o.text_delta) for o in got) == [
        (0, "<0>"), (0, "<1>"), (1, "<0>"), (1, "<1>")]


def test_merge_raises_the_calls_error_and_never_ends_short_silently() -> None:
    with pytest.raises(ValueError, match="bad request"):
        _merge(_items([], ValueError("bad request"), delay=0.05), [(0.0, _out("r", 0))])
    with pytest.raises(RuntimeError, match="1 of its 1 sequences"):
        _merge(_items([]), [(0.0, _out("r", 0))], grace_s=0.2)


class _FakeEngine:
    def __init__(self, outs: list[RequestOutput]) -> None:
        self.outs = outs
        self.closed = False

    def generate(self, *_: object, **__: object) -> AsyncIterator[RequestOutput]:
        async def gen() -> AsyncIterator[RequestOutput]:
            try:
                for out in self.outs:
                    await asyncio.sleep(0.01)
                    yield out
            finally:
                self.closed = True

        return gen()


def _replica(outs: list[RequestOutput], node: str) -> Any:
    return fake_replica(_FakeEngine(outs), OutputPost(node))


def _run_replica(node: str, stream: bool = True, drop_inbox_after: int = 0
                 ) -> tuple[list[RequestOutput], list[RequestOutput], Any]:
    outs = [_out("r", s, s == 3) for s in range(4)]
    replica = _replica(outs, node)

    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        inbox = OutputInbox("node-a")
        await inbox.start()
        q = inbox.open("r")
        req = GenerateRequest("r", [1, 2], SamplingParams(max_tokens=4), stream=stream,
                              reply_to=inbox.reply_to.encode())
        yielded: list[RequestOutput] = []
        try:
            async for out in replica.generate(req):
                yielded.append(out)
        finally:
            await asyncio.sleep(0.05)
            posted = [q.get_nowait() for _ in range(q.qsize())]
            inbox.shutdown()
        return yielded, posted

    async def dropping() -> tuple[list[RequestOutput], list[RequestOutput]]:
        inbox = OutputInbox("node-a")
        await inbox.start()
        req = GenerateRequest("r", [1, 2], SamplingParams(max_tokens=4),
                              reply_to=inbox.reply_to.encode())
        agen = replica.generate(req)
        task = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0.01 * drop_inbox_after + 0.005)
        inbox._server.result().close()  # type: ignore[union-attr]
        for w in list(replica._post._conns.values()):
            w.transport.abort()  # NOTE: the ingress died: its end of the socket is gone
        with pytest.raises(ConnectionError):
            await task
        return [], []

    yielded, posted = asyncio.run(dropping() if drop_inbox_after else main())
    return yielded, posted, replica


def test_the_replica_posts_to_an_inbox_on_its_node_and_yields_nothing() -> None:
    yielded, posted, _ = _run_replica("node-a")
    assert yielded == [] and [o.text_delta for o in posted] == ["<0>", "<1>", "<2>", "<3>"]
    assert posted[-1].finished and posted[-1].emit_time > 0 and posted[-1].trace is not None


def test_the_replica_yields_ray_items_off_node() -> None:
    yielded, posted, _ = _run_replica("node-b")
    assert posted == [] and [o.text_delta for o in yielded] == ["<0>", "<1>", "<2>", "<3>"]


def test_a_non_streamed_request_posts_its_one_folded_output() -> None:
    yielded, posted, _ = _run_replica("node-a", stream=False)
    assert yielded == [] and len(posted) == 1
    assert posted[0].finished and posted[0].text_delta == "<0><1><2><3>"


def test_a_lost_inbox_ends_the_request_on_the_replica_at_once() -> None:
    _, _, replica = _run_replica("node-a", drop_inbox_after=2)
    assert replica.engine.closed  # NOTE: the engine's stream was closed: its request aborted
    assert replica._inflight == {}


def test_merge_raises_when_the_call_itself_is_cancelled() -> None:
    async def cancelled() -> AsyncIterator[RequestOutput]:
        await asyncio.sleep(0.01)
        raise asyncio.CancelledError  # NOTE: what a cancelled Serve call can raise
        yield  # pragma: no cover

    with pytest.raises(asyncio.CancelledError):
        _merge(cancelled(), [(0.0, _out("r", 0))], grace_s=0.5)


def test_replica_shutdown_closes_its_connections_to_the_inboxes() -> None:
    class _Engine:
        async def shutdown(self) -> None:
            pass

    async def main() -> tuple[asyncio.StreamWriter, OutputPost, OutputInbox]:
        inbox = OutputInbox("node-a")
        await inbox.start()
        post = OutputPost("node-a")
        conn = await post.connection(inbox.reply_to)
        replica = fake_replica(_Engine(), post)
        await LLMReplica.func_or_class.__del__(replica)  # NOTE: Serve's shutdown hook
        return conn, post, inbox

    conn, post, inbox = asyncio.run(main())
    assert conn.is_closing() and post._conns == {}
    inbox.shutdown()
