"""Structured-output benchmark: decode tokens/s of a full batch with and without a JSON
schema, side by side in one run (the embedded SmolLM2-135M-Instruct by default).

Three arms over the same prompts, alternated ``--repeats`` times (median of each arm):

- ``free``: no constraint (ignore_eos, so every row decodes ``--max-tokens`` tokens);
- ``json_schema``: every row constrained by SCHEMA (a list of at least 40 records, so rows
  stay in the batch for the whole window), xgrammar bitmask applied in the sampler;
- ``mixed``: half the rows constrained, half free (the sampler's masked-row path).

Only steps in which all ``--batch`` rows decode count (no prefill, no half-empty batch), so
each arm's tokens/s is measured at exactly batch ``--batch``. The grammar is compiled before
the timed window (the engine compiles off the step thread; here it is the cache's hit).

CPU:  python benchmarks/structured_bench.py --json benchmarks/results/structured_cpu.json
GPU:  python benchmarks/structured_bench.py --device cuda --batch 16 --model random-1b \\
          --json benchmarks/results/structured_gpu.json         (target: json_schema >= 0.9x)

``--model random-1b|random-8b``: the GPU benchmarks' random bf16 Llama shapes with the embedded
model's tokenizer (the GPU machine has no SmolLM2 checkpoint; the grammar's cost per step
depends on the vocabulary and the batch, not on the weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams, StructuredOutputSpec
from replicas.structured_output import canonical_schema

SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "score": {"type": "integer"},
                    "ok": {"type": "boolean"},
                },
                "required": ["name", "score", "ok"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}
TOPICS = ["cities", "rivers", "planets", "authors", "birds", "rivers", "cars", "fruits"]


def _prompts(engine: LLMEngine, batch: int) -> list[list[int]]:
    tok = engine.tokenizer
    out = []
    for i in range(batch):
        msg = f"List {TOPICS[i % len(TOPICS)]} with a score, as JSON records. Batch item {i}."
        text = tok.apply_chat_template(
            [{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True
        )
        out.append(list(tok.encode(text, add_special_tokens=False)))
    return out


def _arm(
    engine: LLMEngine, prompts: list[list[int]], constrained: list[bool], max_tokens: int, tag: str
) -> dict[str, float]:
    spec = StructuredOutputSpec("json_schema", canonical_schema(SCHEMA))
    for i, (prompt, c) in enumerate(zip(prompts, constrained, strict=True)):
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=not c,
            structured_output=spec if c else None,
        )
        engine.add_request(f"{tag}-{i}", prompt, params)
    batch = len(prompts)
    tokens, seconds, steps = 0, 0.0, 0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        # NOTE: a full decode step: every row sampled once, none finished or prefilled.
        full = len(outs) == batch and steps > 0
        if full and all(len(o.new_token_ids) == 1 and not o.finished for o in outs):
            tokens += batch
            seconds += dt
        steps += 1
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds if seconds else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="an EngineConfig.model, or random-1b|8b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    engine = LLMEngine(
        EngineConfig(
            model=_model_dir(args.model),
            device=args.device,
            num_blocks=1024 if args.device == "cpu" else None,
            max_num_seqs=max(args.batch, 8),
            num_threads=args.threads,
            # NOTE: a request with structured output steps synchronously; the free arm does too,
            # so the figure is the grammar's cost alone, not the loss of the async pipeline.
            async_scheduling=False,
        )
    )
    prompts = _prompts(engine, args.batch)
    t0 = time.perf_counter()
    engine.grammar_compiler().compile(StructuredOutputSpec("json_schema", canonical_schema(SCHEMA)))
    compile_s = time.perf_counter() - t0
    half = [i % 2 == 0 for i in range(args.batch)]
    arms = {"free": [False] * args.batch, "json_schema": [True] * args.batch, "mixed": half}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in arms}
    _arm(engine, prompts, arms["free"], 8, "warmup")
    for r in range(args.repeats):
        for name, constrained in arms.items():
            runs[name].append(_arm(engine, prompts, constrained, args.max_tokens, f"{name}{r}"))
    med = {k: statistics.median(x["tok_s"] for x in v) for k, v in runs.items()}
    result: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "device_name": _device_name(args.device),
        "host": platform.node(),
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "schema_compile_s": compile_s,
        "median_decode_tok_s": med,
        "ratio_vs_free": {k: v / med["free"] for k, v in med.items()},
        "runs": runs,
    }
    print(f"{args.device} ({result['device_name']}), batch {args.batch}, "
          f"median of {args.repeats}; schema compiled in {compile_s:.2f} s")
    print("| arm | decode tok/s | vs free |")
    print("| --- | --- | --- |")
    for k in arms:
        print(f"| {k} | {med[k]:.1f} | {result['ratio_vs_free'][k]:.3f} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _model_dir(model: str) -> str:
    """``model`` itself, or a random-weight checkpoint of the named GPU shape."""
    if model not in ("random-1b", "random-8b"):
        return model
    import tempfile

    from benchmarks.random_llama import LLAMA_1B, LLAMA_8B, make_random_llama
    from benchmarks.serve_overhead import default_tokenizer_dir

    path = Path(tempfile.gettempdir()) / f"structured_{model}"
    shape = LLAMA_1B if model == "random-1b" else LLAMA_8B
    return str(make_random_llama(path, default_tokenizer_dir(), shape))


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return str(torch.cuda.get_device_name())
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
