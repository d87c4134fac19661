"""What the ingress's prompt encoding costs: the HF wrapper's ``encode`` against
``cluster.serve.tokenizer_pool.encode_ids`` (the backend's ``encode_batch_fast``), on the
embedded model's tokenizer, same texts, alternated.

    python benchmarks/tokenize_cost.py --tokens 256 1024 4096 --json results/tokenize_cost_cpu.json

Prints a table and writes JSON: per prompt size, the median ms of each way and their ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

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


def measure(tokenizer: Any, text: str, rounds: int) -> dict[str, float]:
    """Median ms of each way over ``rounds`` alternated calls (their ids checked equal)."""
    assert encode_ids(tokenizer, text) == list(tokenizer.encode(text))
    wrapper: list[float] = []
    fast: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tokenizer.encode(text)
        t1 = time.perf_counter()
        encode_ids(tokenizer, text)
        t2 = time.perf_counter()
        wrapper.append((t1 - t0) * 1e3)
        fast.append((t2 - t1) * 1e3)
    w, f = statistics.median(wrapper), statistics.median(fast)
    return {"wrapper_ms": w, "encode_ids_ms": f, "ratio": f / w}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--json", type=Path)
    ns = p.parse_args()
    from replicas.model_loader import load_tokenizer
    from replicas.model_source import resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir("default"))
    rows = [{"tokens": n, **measure(tokenizer, prompt_of(tokenizer, n, n), ns.rounds)}
            for n in ns.tokens]
    print(f"{'tokens':>7} {'wrapper ms':>11} {'encode_ids ms':>14} {'ratio':>6}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['wrapper_ms']:>11.3f} {r['encode_ids_ms']:>14.3f} "
              f"{r['ratio']:>6.2f}")
    if ns.json:
        ns.json.write_text(json.dumps({"benchmark": "tokenize_cost", "machine": platform.node(),
                                       "rows": rows}, indent=1))
        print(f"wrote {ns.json}")


if __name__ == "__main__":
    main()
