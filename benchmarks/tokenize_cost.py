"""What the ingress's prompt encoding costs, on the embedded model's tokenizer, same texts,
alternated: the HF wrapper's ``encode`` (the baseline), the backend's ``encode_batch_fast`` on
the whole text, and ``cluster.serve.tokenizer_pool.encode_ids`` (the latter, in pieces on the
backend's thread pool for a long text: ``cluster.serve.chunked_encode``).

    python benchmarks/tokenize_cost.py --tokens 256 1024 4096 --json results/tokenize_cost_cpu.json

Prints a table and writes JSON: per prompt size, the median ms of each way, the ratios to the
wrapper, and how many pieces ``encode_ids`` cut the text into.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from cluster.serve.chunked_encode import chunk_safe, num_pieces
from cluster.serve.tokenizer_pool import encode_ids


def prompt_of(tokenizer: Any, num_tokens: int, seed: int) -> str:
    """A text of about ``num_tokens`` tokens (random words of this repo's README)."""
    words = (Path(__file__).resolve().parent.parent / "README.md").read_text().split()
    rng = random.Random(seed)
    text = ""
    while len(tokenizer.encode(text, add_special_tokens=False)) < num_tokens:
        text += " " + " ".join(rng.choice(words) for _ in range(64))
    ids = tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
    return str(tokenizer.decode(ids))


def _whole(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.backend_tokenizer.encode_batch_fast([text])[0].ids)


def measure(tokenizer: Any, text: str, rounds: int) -> dict[str, float]:
    """Median ms of each way over ``rounds`` alternated calls (their ids checked equal)."""
    ways = {"wrapper": lambda: tokenizer.encode(text), "whole": lambda: _whole(tokenizer, text),
            "encode_ids": lambda: encode_ids(tokenizer, text)}
    assert encode_ids(tokenizer, text) == _whole(tokenizer, text) == list(tokenizer.encode(text))
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"wrapper_ms": ms["wrapper"], "whole_ms": ms["whole"],
            "encode_ids_ms": ms["encode_ids"], "whole_ratio": ms["whole"] / ms["wrapper"],
            "ratio": ms["encode_ids"] / ms["wrapper"], "pieces_ratio": ms["encode_ids"] / ms["whole"],
            "pieces": num_pieces(tokenizer.backend_tokenizer, text)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--json", type=Path)
    p.add_argument("--tokenizer", type=Path, help="a tokenizer directory (default: the "
                   "embedded model's; on the GPU machine .whl/tokenizer)")
    ns = p.parse_args()
    from replicas.model_loader import load_tokenizer
    from replicas.model_source import resolve_model_dir

    tokenizer = load_tokenizer(ns.tokenizer or resolve_model_dir("default"))
    rows = [{"tokens": n, **measure(tokenizer, prompt_of(tokenizer, n, n), ns.rounds)}
            for n in ns.tokens]
    print(f"{'tokens':>7} {'wrapper ms':>11} {'whole ms':>9} {'encode_ids ms':>14} {'pieces':>7} "
          f"{'ids/wrapper':>12} {'ids/whole':>10}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['wrapper_ms']:>11.3f} {r['whole_ms']:>9.3f} "
              f"{r['encode_ids_ms']:>14.3f} {r['pieces']:>7} {r['ratio']:>12.2f} "
              f"{r['pieces_ratio']:>10.2f}")
    out = {"benchmark": "tokenize_cost", "machine": platform.node(), "cpus": os.cpu_count(),
           "chunk_safe": chunk_safe(tokenizer.backend_tokenizer), "rows": rows}
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {ns.json}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
