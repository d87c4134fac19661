"""Sparse paged decode speed (GPU): Quest-style page selection vs our dense paged kernel.

1. Decode attention, one layer of a Llama-3.2-1B-shaped model (32 query heads, 8 KV heads,
   head_dim 64, bf16, block_size 16): contexts 8k/32k/128k x batch 1/16 x budgets
   1024/2048/4096. Each op is captured in a CUDA graph and replayed (the engine's decode
   path); the dense kernel is timed in the same run and every ratio is against it. The
   sparse time is split into phases: score kernel, top-k selection (page_select.cu; the
   torch topk path is timed too), attention on the pages.
2. End to end: decode steps/s of a random-weight 1B-class model (Llama-3.2-1B shapes, 16
   layers) at 32k context, batch 1 and 16, dense vs sparse (budget 2048, dense_layers 2),
   whole forward pass in one CUDA graph.

    python benchmarks/sparse_bench.py --json benchmarks/results/sparse_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from cuda_kernels import ops, sparse_decode
from cuda_kernels import sparse_reference as sr

BS, HKV, GROUP, D = 16, 8, 4, 64


def graph_time_us(fn: Callable[[], object], iters: int, reps: int) -> float:
    """Median over reps of the mean replay time of fn captured in a CUDA graph (us)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # NOTE: warm-up outside capture (compiles kernels, sets smem attributes)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def time_config(
    q: torch.Tensor, kv: tuple[torch.Tensor, ...], bt: torch.Tensor, sl: torch.Tensor,
    budgets: list[int], it: int, reps: int,
) -> list[dict]:  # fmt: skip
    """Dense vs sparse (and its phases) for one (context, batch) point."""
    k_cache, v_cache, k_min, k_max = kv
    scale = D**-0.5
    dense = graph_time_us(
        lambda: ops.paged_decode_attention(q, k_cache, v_cache, bt, sl, scale), it, reps
    )
    rows = []
    for budget in budgets:
        totals = {}
        for variant in ("kernel", "torch"):
            totals[variant] = graph_time_us(
                lambda b=budget, v=variant: sparse_decode.sparse_paged_decode_attention(
                    q, k_cache, v_cache, k_min, k_max, bt, sl, scale, b, select=v
                ), it, reps,
            )  # fmt: skip
        scores = sparse_decode.page_scores(q, k_min, k_max, bt, sl, BS)
        sel = sparse_decode.select_pages(scores, bt, sl, BS, budget // BS)
        t_scores = {
            v: graph_time_us(
                lambda v=v: sparse_decode.page_scores(q, k_min, k_max, bt, sl, BS, v), it, reps
            )
            for v in ("warp", "thread")
        }
        t_score = t_scores[sparse_decode.SCORE_VARIANT]
        t_select = graph_time_us(
            lambda b=budget, s=scores: sparse_decode.select_pages(s, bt, sl, BS, b // BS), it, reps
        )
        t_select_torch = graph_time_us(
            lambda b=budget, s=scores: sr.select_pages(s, bt, sl, BS, b // BS), it, reps
        )
        t_attend = graph_time_us(
            lambda s=sel: sparse_decode.decode_selected(q, k_cache, v_cache, s, scale), it, reps
        )
        sparse = totals["kernel"]
        rows.append(dict(context=int(sl[0]), batch=q.shape[0], budget=budget, dense_us=dense,
                         sparse_us=sparse, speedup=dense / sparse,
                         sparse_torch_select_us=totals["torch"],
                         speedup_torch_select=dense / totals["torch"], score_us=t_score,
                         select_us=t_select, select_torch_us=t_select_torch,
                         score_variant=sparse_decode.SCORE_VARIANT,
                         score_warp_us=t_scores["warp"], score_thread_us=t_scores["thread"],
                         attend_us=t_attend))  # fmt: skip
    return rows


def pick_score_variant(kv: tuple[torch.Tensor, ...], it: int, reps: int) -> dict:
    """Time both page score kernels at 32k x batch 16 (checked against the reference first)
    and make the faster correct one sparse_decode's default for the rest of the run."""
    k_cache, _, k_min, k_max = kv
    dev = k_cache.device
    g = torch.Generator(device=dev).manual_seed(1)
    batch, nb = 16, 32768 // BS
    bt = torch.randperm(k_cache.shape[0], generator=g, device=dev)[: batch * nb]
    bt = bt.view(batch, nb).to(torch.int32)
    sl = torch.full((batch,), 32768 - 5, dtype=torch.int32, device=dev)
    q = torch.randn((batch, HKV * GROUP, D), generator=g, device=dev).to(torch.bfloat16)
    want = sr.page_scores(q, k_min, k_max, bt, sl, BS)
    out = {}
    for v in ("warp", "thread"):
        got = sparse_decode.page_scores(q, k_min, k_max, bt, sl, BS, v)
        ok = bool(torch.allclose(got, want, atol=2e-3, rtol=1e-4))
        t = graph_time_us(lambda v=v: sparse_decode.page_scores(q, k_min, k_max, bt, sl, BS, v),
                          it, reps)  # fmt: skip
        out[v] = dict(correct=ok, us=t)
    good = [v for v in out if out[v]["correct"]]
    sparse_decode.SCORE_VARIANT = min(good, key=lambda v: out[v]["us"])
    print(f"page score variants at 32k x 16: {out} -> {sparse_decode.SCORE_VARIANT}", flush=True)
    return out


def kernel_rows(args: argparse.Namespace) -> list[dict]:
    dev = torch.device("cuda")
    max_tokens = max(b * c for b in args.batches for c in args.contexts)
    num_blocks = max_tokens // BS + max(args.batches)
    g = torch.Generator(device=dev).manual_seed(0)
    k_cache = torch.randn((num_blocks, BS, HKV, D), generator=g, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    kv = (k_cache, v_cache, k_cache.amin(1).contiguous(), k_cache.amax(1).contiguous())
    args.score_variants = pick_score_variant(kv, args.iters, args.reps)
    rows = []
    for ctx in args.contexts:
        for batch in args.batches:
            nb = ctx // BS
            perm = torch.randperm(num_blocks, generator=g, device=dev)[: batch * nb]
            bt = perm.view(batch, nb).to(torch.int32)
            sl = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
            q = torch.randn((batch, HKV * GROUP, D), generator=g, device=dev).to(torch.bfloat16)
            for r in time_config(q, kv, bt, sl, args.budgets, args.iters, args.reps):
                rows.append(r)
                print(f"ctx {ctx:>6} batch {batch:>2} budget {r['budget']:>4}: dense "
                      f"{r['dense_us']:8.1f} us  sparse {r['sparse_us']:7.1f} us  "
                      f"x{r['speedup']:5.2f}  (score {r['score_us']:.1f} select "
                      f"{r['select_us']:.1f} attend {r['attend_us']:.1f}; torch-select total "
                      f"{r['sparse_torch_select_us']:.1f} x{r['speedup_torch_select']:.2f})",
                      flush=True)  # fmt: skip
    return rows


def time_e2e(batch: int, args: argparse.Namespace) -> dict:
    """Decode step of the random 1B-class model, dense then sparse, in one CUDA graph each."""
    from replicas.attention import AttentionMetadata
    from replicas.config import SparseAttentionConfig
    from replicas.model import CausalLM
    from replicas.model_config import ModelArchConfig, RopeConfig
    from replicas.sparse import attach_sparse_attention

    cfg = ModelArchConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_kv_heads=8, head_dim=64,
        rms_norm_eps=1e-5, max_position_embeddings=131072, rope=RopeConfig(theta=500000.0),
        qkv_bias=False, o_bias=False, mlp_bias=False, tie_word_embeddings=True,
        sliding_window=None, eos_token_ids=(1,), torch_dtype="bfloat16",
    )  # fmt: skip
    dev = torch.device("cuda")
    ctx = args.e2e_context
    with torch.device(dev):
        model = CausalLM(cfg, ctx + 64).to(torch.bfloat16).eval()
    nb = ctx // BS + 1
    num_blocks = batch * nb
    shape = (num_blocks, BS, cfg.num_kv_heads, cfg.head_dim)
    caches = [
        (torch.randn(shape, device=dev, dtype=torch.bfloat16),
         torch.randn(shape, device=dev, dtype=torch.bfloat16))
        for _ in range(cfg.num_hidden_layers)
    ]  # fmt: skip
    bt = torch.arange(num_blocks, device=dev, dtype=torch.int32).view(batch, nb)
    pos = torch.full((batch,), ctx - 1, device=dev)
    slots = bt[:, (ctx - 1) // BS].long() * BS + (ctx - 1) % BS
    no_bt = torch.zeros((0, 1), dtype=torch.int32, device=dev)
    no_len = torch.zeros(0, dtype=torch.int32, device=dev)
    meta = AttentionMetadata(
        slot_mapping=slots, num_decode_tokens=batch, decode_block_tables=bt,
        decode_seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=dev),
        prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=dev),
        prefill_seq_lens=no_len, prefill_block_tables=no_bt, num_prefill_tokens=0,
    )  # fmt: skip
    ids = torch.randint(0, cfg.vocab_size, (batch,), device=dev)
    rows_idx = torch.arange(batch, device=dev)

    def step() -> torch.Tensor:
        return model(ids, pos, caches, meta, rows_idx)

    t_dense = graph_time_us(step, args.iters, args.reps)
    sparse = attach_sparse_attention(
        model, SparseAttentionConfig(token_budget=args.e2e_budget, dense_layers=2),
        num_blocks, BS,
    )  # fmt: skip
    for layer_idx, layer in sparse.layers.items():
        layer.k_min.copy_(caches[layer_idx][0].amin(1))
        layer.k_max.copy_(caches[layer_idx][0].amax(1))
    t_sparse = graph_time_us(step, args.iters, args.reps)
    return dict(context=ctx, batch=batch, budget=args.e2e_budget, dense_layers=2,
                dense_step_ms=t_dense / 1e3, sparse_step_ms=t_sparse / 1e3,
                dense_tok_s=batch / (t_dense / 1e6), sparse_tok_s=batch / (t_sparse / 1e6),
                speedup=t_dense / t_sparse,
                metadata_bytes_per_block=sparse.metadata_bytes_per_block(),
                kv_bytes_per_block=2 * len(caches) * caches[0][0][0].numel() * 2)  # fmt: skip


def e2e_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for batch in args.batches:
        row = time_e2e(batch, args)
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"e2e 1B ctx {row['context']} batch {batch:>2}: dense {row['dense_tok_s']:9.1f} "
              f"tok/s  sparse {row['sparse_tok_s']:9.1f} tok/s  x{row['speedup']:.2f}",
              flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--e2e-context", type=int, default=32768)
    ap.add_argument("--e2e-budget", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.inference_mode():
        args.score_variants = None
        kernels = [] if args.skip_kernels else kernel_rows(args)
        e2e = [] if args.skip_e2e else e2e_rows(args)
    result = dict(
        device=torch.cuda.get_device_name(), shapes=dict(block_size=BS, num_kv_heads=HKV,
        group=GROUP, head_dim=D, dtype="bfloat16"), score_variants=args.score_variants,
        score_variant=sparse_decode.SCORE_VARIANT, timing="CUDA graph replay, median of "
        f"{args.reps} x mean of {args.iters}", kernels=kernels, e2e=e2e,
    )  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
