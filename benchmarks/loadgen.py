"""Replay a workload against a real OpenAI-compatible endpoint (the TinyServe ingress, vLLM,
SGLang, ...) with the ``openai`` streaming client.

    python -m benchmarks.loadgen --base-url http://127.0.0.1:8000/v1 --model tinyserve \
        --workload generated_shared_prefix --scale 0.05 --time-scale 20 --max-requests 64 \
        --out benchmarks/results/loadgen_gsp.json

Each content id of a prompt is rendered as ``block_size`` words from a fixed vocabulary
(deterministic), so shared segments are byte-identical and share KV on the server; the server's
tokenizer decides the exact token counts. Requests are sent at their arrival times (times
``--time-scale``: a CPU cluster is far slower than the calibrated GPU); closed-loop turns
(``parent_id``) are sent after the parent's answer plus the think time, as a chat with the
parent's REAL answer in the history. TTFT is measured at the first streamed chunk carrying
content; cached tokens come from ``usage.prompt_tokens_details.cached_tokens`` (requested with
``stream_options={"include_usage": True}``). Output figures use the simulator's names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workloads import SimRequest, Workload, build_workload

_WORDS = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child",
    "world", "school", "state", "family", "student", "group", "country", "problem", "hand",
    "part", "place", "case", "week", "company", "system", "program", "question", "work",
    "government", "number", "night", "point", "home", "water", "room", "mother", "area",
    "money", "story", "fact", "month", "lot", "right", "study", "book", "eye", "job",
    "word", "business", "issue", "side", "kind", "head", "house", "service", "friend",
    "father", "power", "hour", "game", "line", "end", "member", "law", "car", "city",
    "community", "name", "president", "team", "minute", "idea", "kid", "body",
    "information", "back", "parent", "face", "others", "level", "office", "door", "health",
    "person", "art", "war", "history", "party", "result", "change", "morning", "reason",
    "research", "girl", "guy", "moment", "air", "teacher", "force", "education", "foot",
    "boy", "age", "policy", "music", "market", "sense", "nation", "plan", "college",
    "interest", "death",
)


def render_blocks(blocks: tuple[int, ...], block_size: int) -> str:
    """Deterministic text for content ids: ``block_size`` words per block."""
    out: list[str] = []
    n = len(_WORDS)
    for c in blocks:
        rng = np.random.default_rng(c)
        out.extend(_WORDS[i] for i in rng.integers(0, n, size=block_size).tolist())
    return " ".join(out)


@dataclass(slots=True)
class LoadRecord:
    request_id: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    error: str = ""

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


class Replayer:
    """Sends a workload through ``client`` (an ``openai.AsyncOpenAI`` or a test double)."""

    def __init__(self, client: Any, model: str, workload: Workload, time_scale: float = 1.0,
                 max_requests: int = 0, nonce: str = "",
                 extra_body: dict[str, Any] | None = None) -> None:
        """``nonce`` opens every conversation, so a replay shares no KV with earlier replays of
        the same workload (back-to-back A/B runs); ``extra_body`` goes into every request
        (e.g. ``{"routing_policy": ...}``)."""
        self.nonce = f"[{nonce}] " if nonce else ""
        self.extra_body = extra_body
        self.client = client
        self.model = model
        self.workload = workload
        self.time_scale = time_scale
        reqs = workload.requests
        self.requests = reqs[:max_requests] if max_requests > 0 else list(reqs)
        kept = {r.request_id for r in self.requests}
        # NOTE: truncation may cut a session; orphans are dropped with their parents.
        self.requests = [r for r in self.requests if r.parent_id is None or r.parent_id in kept]
        self._by_id = {r.request_id: r for r in self.requests}
        self._messages: dict[str, list[dict[str, str]]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self.records: list[LoadRecord] = []

    def messages_for(self, req: SimRequest) -> list[dict[str, str]]:
        bs = self.workload.block_size
        if req.parent_id is None:
            return [{"role": "user", "content": self.nonce + render_blocks(req.prompt_blocks, bs)}]
        parent = self._by_id[req.parent_id]
        new = req.prompt_blocks[len(parent.prompt_blocks) + len(parent.output_blocks):]
        return self._messages[req.parent_id] + [{"role": "user", "content": render_blocks(new, bs)}]

    async def _one(self, req: SimRequest, t0: float) -> None:
        if req.parent_id is not None:
            await self._done[req.parent_id].wait()
            await asyncio.sleep(req.think_time_s * self.time_scale)
        else:
            await asyncio.sleep(max(0.0, t0 + req.arrival_s * self.time_scale - time.perf_counter()))
        messages = self.messages_for(req)
        start = time.perf_counter()
        first, text, usage, error = -1.0, [], None, ""
        try:
            stream = await self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=req.num_output_tokens,
                temperature=0.0, stream=True, stream_options={"include_usage": True},
                extra_body=self.extra_body,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if first < 0:
                        first = time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if getattr(chunk, "usage", None) is not None:
                    usage = chunk.usage
        except Exception as exc:  # recorded per request; the replay goes on
            error = f"{type(exc).__name__}: {exc}"
        end = time.perf_counter()
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        self.records.append(LoadRecord(
            req.request_id, start - t0, (first if first >= 0 else end) - t0, end - t0,
            int(getattr(usage, "prompt_tokens", 0) or 0) if usage else 0,
            int(getattr(details, "cached_tokens", 0) or 0) if details else 0,
            int(getattr(usage, "completion_tokens", 0) or 0) if usage else 0, error))
        self._messages[req.request_id] = [*messages, {"role": "assistant", "content": "".join(text)}]
        self._done[req.request_id].set()

    async def run(self) -> list[LoadRecord]:
        self._done = {r.request_id: asyncio.Event() for r in self.requests}
        t0 = time.perf_counter()
        await asyncio.gather(*(self._one(r, t0) for r in self.requests))
        return self.records


def summarize(records: list[LoadRecord]) -> dict[str, Any]:
    """Same figure names as the simulator's ``RunSummary`` (where they exist)."""
    ok = [r for r in records if not r.error]
    if not ok:
        return {"num_requests": len(records), "num_errors": len(records)}
    ttft = np.asarray([r.ttft_s for r in ok])
    span = max(r.finish_s for r in ok) - min(r.arrival_s for r in ok)
    prompt = sum(r.num_prompt_tokens for r in ok)
    return {
        "num_requests": len(records), "num_errors": len(records) - len(ok),
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p90_s": float(np.percentile(ttft, 90)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "throughput_tok_s": sum(r.num_output_tokens for r in ok) / max(span, 1e-9),
        "hit_ratio": sum(r.num_cached_tokens for r in ok) / prompt if prompt else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="EMPTY")
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.05, help="workload scale (8 replicas = 1.0)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="stretch arrival times")
    ap.add_argument("--max-requests", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="workload key=value (JSON value)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key)
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}
    workload = build_workload(args.workload, args.seed, args.scale, **overrides)
    rep = Replayer(client, args.model, workload, args.time_scale, args.max_requests)
    records = asyncio.run(rep.run())
    summary = summarize(records)
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(
            {"args": vars(args), "summary": summary, "records": [asdict(r) for r in records]},
            indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
