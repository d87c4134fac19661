"""How long ONE ``openai`` client process takes to put N concurrent requests on the wire.

serve_overhead's ``client_to_ingress`` hop starts when a client task calls ``create()``; with
c concurrent requests per client process, part of that hop is the client's own Python work
(building and sending each request), not the serving path. This measures that part alone: a
trivial HTTP server (raw asyncio, in this process: it answers a fixed completion) records when
each request's body has arrived; the client sends waves of N requests together from one loop,
as serve_overhead's client processes do.

    python benchmarks/client_send_lag.py --concurrency 1 4 16 64 --json results/client_send_lag_cpu.json
    python benchmarks/client_send_lag.py --first-wave --concurrency 4 16 --json ...

``--first-wave``: the first wave of a freshly started client process (what serve_overhead's
client processes send first), cold and after ``N`` short warm-up requests, against its second.

Prints a table and writes JSON: per N, the send -> arrival lag (ms) p50 and the wave's
slowest request p50. NOTE: the server shares this process's CPU, so the figures are an upper
bound of the client's own cost on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import openai

_BODY = json.dumps({
    "id": "x", "object": "text_completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": None}],
}).encode()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 arrivals: list[float]) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            arrivals.append(time.perf_counter())
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % len(_BODY) + _BODY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        writer.close()


async def measure(n: int, waves: int, prompt_words: int) -> dict[str, Any]:
    """Send ``waves`` waves of ``n`` concurrent completions; the lags of all but the first 3."""
    arrivals: list[float] = []
    server = await asyncio.start_server(lambda r, w: _serve(r, w, arrivals), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                max_retries=0)
    prompt = " ".join(["word"] * prompt_words)
    lags: list[float] = []
    slowest: list[float] = []
    for wave in range(waves):
        arrivals.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[
            client.completions.create(model="m", prompt=prompt, max_tokens=128) for _ in range(n)
        ])
        if wave >= 3:  # NOTE: the first waves open the connections
            wave_lags = [(a - t0) * 1e3 for a in arrivals]
            lags += wave_lags
            slowest.append(max(wave_lags))
    await client.close()
    server.close()
    await server.wait_closed()
    return {"concurrency": n, "lag_p50_ms": statistics.median(lags),
            "wave_slowest_p50_ms": statistics.median(slowest), "num_requests": len(lags)}


async def first_waves(n: int, warm: bool, prompt_words: int) -> dict[str, Any]:
    """In a fresh process: the first and second wave's send -> arrival lag p50 (ms), after
    ``n`` concurrent one-token warm-up requests when ``warm``."""
    arrivals: list[float] = []
    server = await asyncio.start_server(lambda r, w: _serve(r, w, arrivals), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                max_retries=0)
    if warm:
        await asyncio.gather(*[client.completions.create(model="m", prompt="warm up",
                                                         max_tokens=1) for _ in range(n)])
    prompt = " ".join(["word"] * prompt_words)
    p50s = []
    for _ in range(2):
        arrivals.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[
            client.completions.create(model="m", prompt=prompt, max_tokens=128) for _ in range(n)
        ])
        p50s.append(statistics.median((a - t0) * 1e3 for a in arrivals))
    await client.close()
    server.close()
    await server.wait_closed()
    return {"concurrency": n, "warm": warm, "first_wave_p50_ms": p50s[0],
            "second_wave_p50_ms": p50s[1]}


def _first_waves_fresh(n: int, warm: bool, prompt_words: int) -> dict[str, Any]:
    return asyncio.run(first_waves(n, warm, prompt_words))


def run_first_waves(ns: argparse.Namespace) -> list[dict[str, Any]]:
    """``first_waves`` for each N, cold and warm, each in its own freshly spawned process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rows = []
    for n in ns.concurrency:
        for warm in (False, True):
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                rows.append(ex.submit(_first_waves_fresh, n, warm, ns.prompt_words).result())
    print(f"{'N':>4} {'warm-up':>8} {'first wave p50 ms':>18} {'second wave p50 ms':>19}")
    for r in rows:
        print(f"{r['concurrency']:>4} {'yes' if r['warm'] else 'no':>8} "
              f"{r['first_wave_p50_ms']:>18.2f} {r['second_wave_p50_ms']:>19.2f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--waves", type=int, default=30)
    p.add_argument("--prompt-words", type=int, default=1024)
    p.add_argument("--first-wave", action="store_true",
                   help="a fresh process's first wave, cold and warmed, against its second")
    p.add_argument("--json", type=Path)
    ns = p.parse_args()
    if ns.first_wave:
        rows = run_first_waves(ns)
        if ns.json:
            ns.json.write_text(json.dumps({"benchmark": "client_send_lag_first_wave",
                                           "rows": rows}, indent=1))
            print(f"wrote {ns.json}")
        return
    rows = [asyncio.run(measure(n, ns.waves, ns.prompt_words)) for n in ns.concurrency]
    print(f"{'N':>4} {'lag p50 ms':>11} {'slowest p50 ms':>15} {'per request ms':>15}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['lag_p50_ms']:>11.2f} {r['wave_slowest_p50_ms']:>15.2f} "
              f"{r['wave_slowest_p50_ms'] / r['concurrency']:>15.2f}")
    if ns.json:
        ns.json.write_text(json.dumps({"benchmark": "client_send_lag", "rows": rows}, indent=1))
        print(f"wrote {ns.json}")


if __name__ == "__main__":
    main()
