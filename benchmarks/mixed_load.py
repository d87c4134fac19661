"""Mixed OpenAI traffic against the app over real HTTP, every request's outcome classified.

The fault runs and the soak drive the app with this: chat and completions, streamed and not,
some streams cancelled by the client mid-way, some deliberately bad requests. Each request
ends as exactly one ``Outcome.status``:

    ok         complete: a non-streamed 200 with choices, or a stream with content, a
               finish_reason and [DONE], no error event
    rejected   a deliberately bad request answered 4xx in OpenAI's error shape (expected)
    cancelled  a stream the client closed on purpose after ``cancel_after`` chunks
    lost       a good request that failed before anything streamed (non-2xx, connection
               error, a stream whose first event is an error): the retry should prevent it
    cut_clean  a stream that had started and ended with an OpenAI error event, then [DONE]
    cut_dirty  a stream that had started and ended any other way (connection dropped, no
               [DONE], garbage)
    wrong      a bad request that was not refused with a 4xx, or a good one refused with one

Raw SSE over aiohttp (not the ``openai`` client): the client library hides whether an error
event was followed by [DONE], which is part of the contract checked here.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

STATUSES = ("ok", "rejected", "cancelled", "lost", "cut_clean", "cut_dirty", "wrong")

# Bad requests: (endpoint, body overrides) the ingress must refuse with a 4xx.
BAD_CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("chat", {"temperature": 9}),
    ("chat", {"messages": []}),
    ("completion", {"prompt": [-1]}),
    ("chat", {"model": "no-such-model"}),
    ("completion", {"max_tokens": 10**7}),
    ("chat", {"tool_choice": "auto"}),
)


@dataclass(slots=True, frozen=True)
class Mix:
    """Shares of each request kind (independent draws per request)."""

    p_stream: float = 0.6
    p_chat: float = 0.6
    p_cancel: float = 0.1  # of streamed requests: closed by the client after 1-3 chunks
    p_bad: float = 0.05
    max_tokens: tuple[int, int] = (4, 24)
    num_prefixes: int = 8  # shared system prompts (tenants): cache hits across requests
    ignore_eos: bool = True


@dataclass(slots=True)
class Outcome:
    request_id: int
    endpoint: str
    stream: bool
    intent: str  # "good" | "bad" | "cancel"
    status: str = ""
    http_status: int = 0
    num_chunks: int = 0
    num_cached_tokens: int = -1
    start_s: float = 0.0
    first_s: float = 0.0
    end_s: float = 0.0
    error: str = ""
    tag: str = ""


def prefix_text(tag: str) -> str:
    """A system prompt of ~150 tokens (9+ full blocks of 16) shared by requests of ``tag``."""
    return f"[{tag}] You are a careful assistant for topic {tag}. " + " ".join(
        f"Rule {i}: answer about {tag} precisely." for i in range(12)
    )


class MixedLoad:
    """Closed-loop traffic: ``concurrency`` workers, each sending one request after another
    until ``stop()``, ``deadline`` or ``max_requests``. ``outcomes`` grows as requests end."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        concurrency: int = 4,
        mix: Mix | None = None,
        seed: int = 0,
        timeout_s: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = concurrency
        self.mix = mix or Mix()
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.outcomes: list[Outcome] = []
        self.on_outcome: Callable[[Outcome], None] | None = None
        self._stop = threading.Event()
        self._next_id = 0
        self._thread: threading.Thread | None = None

    # -- one request -----------------------------------------------------------------------------
    def _plan(self) -> tuple[Outcome, str, dict[str, Any], int]:
        m, rng = self.mix, self.rng
        rid = self._next_id
        self._next_id += 1
        endpoint = "chat" if rng.random() < m.p_chat else "completion"
        stream = rng.random() < m.p_stream
        intent, cancel_after = "good", 0
        tag = f"t{rng.randrange(m.num_prefixes)}"
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": rng.randint(*m.max_tokens),
            "temperature": 0 if rng.random() < 0.5 else 0.8,
            "stream": stream,
        }
        if m.ignore_eos:
            body["ignore_eos"] = True
        question = f"Question {rid} {uuid.uuid4().hex[:6]}: tell me about {tag}."
        if endpoint == "chat":
            body["messages"] = [{"role": "system", "content": prefix_text(tag)},
                                {"role": "user", "content": question}]  # fmt: skip
        else:
            body["prompt"] = prefix_text(tag) + "\n" + question
        if stream:
            body["stream_options"] = {"include_usage": True}
            if rng.random() < m.p_cancel:
                intent, cancel_after = "cancel", rng.randint(1, 3)
                body["max_tokens"] = max(body["max_tokens"], 16)
        if rng.random() < m.p_bad:
            endpoint, bad = BAD_CASES[rng.randrange(len(BAD_CASES))]
            intent, cancel_after = "bad", 0
            body.pop("messages", None)
            body.pop("prompt", None)
            if endpoint == "chat":
                body["messages"] = [{"role": "user", "content": question}]
            else:
                body["prompt"] = question
            body.update(bad)
        out = Outcome(rid, endpoint, stream, intent, tag=tag)
        return out, endpoint, body, cancel_after

    async def request(self, session: Any, body: dict[str, Any], endpoint: str,
                      out: Outcome, cancel_after: int = 0) -> Outcome:
        """Send one request and classify it (fills and returns ``out``)."""
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        out.start_s = time.time()
        try:
            async with session.post(self.base_url + path, json=body, headers=self.headers) as r:
                out.http_status = r.status
                if r.status != 200:
                    text = await r.text()
                    shaped = _is_openai_error(text)
                    out.error = text[:200]
                    if out.intent == "bad":
                        out.status = "rejected" if 400 <= r.status < 500 and shaped else "wrong"
                    else:
                        out.status = "wrong" if 400 <= r.status < 500 else "lost"
                elif not body.get("stream"):
                    data = await r.json()
                    out.num_chunks = 1
                    out.first_s = time.time()
                    usage = data.get("usage") or {}
                    out.num_cached_tokens = int(
                        (usage.get("prompt_tokens_details") or {}).get("cached_tokens", -1))
                    ok = bool(data.get("choices")) and out.intent != "bad"
                    out.status = "ok" if ok else "wrong"
                else:
                    await self._read_stream(r, out, cancel_after)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NOTE: connection refused/reset, timeouts: classified
            out.error = f"{type(exc).__name__}: {exc}"[:200]
            if out.intent == "cancel" and out.status == "cancelled":
                pass
            elif out.num_chunks:
                out.status = "cut_dirty"
            else:
                out.status = "lost" if out.intent != "bad" else "wrong"
        out.end_s = time.time()
        return out

    async def _read_stream(self, r: Any, out: Outcome, cancel_after: int) -> None:
        errored = done = finished = False
        buf = b""
        async for raw in r.content.iter_any():
            buf += raw
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.decode().removeprefix("data: ").strip()
                if data == "[DONE]":
                    done = True
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    errored = True
                    out.error = str(obj["error"].get("message", ""))[:200]
                    continue
                if obj.get("choices"):
                    out.num_chunks += 1
                    out.first_s = out.first_s or time.time()
                    if any(c.get("finish_reason") for c in obj["choices"]):
                        finished = True
                usage = obj.get("usage") or {}
                if usage:
                    out.num_cached_tokens = int(
                        (usage.get("prompt_tokens_details") or {}).get("cached_tokens", -1))
                if cancel_after and out.num_chunks >= cancel_after:
                    out.status = "cancelled"
                    r.close()  # NOTE: the client goes away mid-stream
                    return
        if out.intent == "bad":
            out.status = "wrong"
        elif errored:
            out.status = ("cut_clean" if done else "cut_dirty") if out.num_chunks else "lost"
        elif done and finished:
            out.status = "ok"
        else:
            out.status = "cut_dirty" if out.num_chunks else "lost"

    # -- the loop --------------------------------------------------------------------------------
    async def _worker(self, session: Any, deadline: float, max_requests: int) -> None:
        while not self._stop.is_set() and time.time() < deadline:
            if max_requests and self._next_id >= max_requests:
                return
            out, endpoint, body, cancel_after = self._plan()
            await self.request(session, body, endpoint, out, cancel_after)
            self.outcomes.append(out)
            if self.on_outcome is not None:
                self.on_outcome(out)

    async def run(self, duration_s: float, max_requests: int = 0) -> list[Outcome]:
        """Send traffic for ``duration_s`` (or until ``stop()``/``max_requests``)."""
        import aiohttp

        deadline = time.time() + duration_s
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session, deadline, max_requests)
                                   for _ in range(self.concurrency)))  # fmt: skip
        return self.outcomes

    def start(self, duration_s: float, max_requests: int = 0) -> None:
        """``run`` on a background thread (for synchronous tests and scripts)."""
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.run(duration_s, max_requests)),
            name="mixed-load", daemon=True,
        )
        self._thread.start()

    def stop(self, timeout_s: float = 180.0) -> list[Outcome]:
        """Stop sending, wait for the requests in flight, return every outcome."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            assert not self._thread.is_alive(), "load generator did not stop"
        return self.outcomes


def _is_openai_error(text: str) -> bool:
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(err, dict) and bool(err.get("message")) and "type" in err


def count(outcomes: list[Outcome]) -> dict[str, int]:
    """Outcomes by status (every status present, zeros included)."""
    c = Counter(o.status for o in outcomes)
    return {s: int(c.get(s, 0)) for s in STATUSES}


def to_dicts(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    return [asdict(o) for o in outcomes]
