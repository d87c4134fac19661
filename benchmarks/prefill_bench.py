"""Prefill attention over a cached prefix (kernels_bench's prefill rows), side by side in one
run, CUDA events, median of reps:

- triton        cuda_kernels.prefill_triton (what ops.paged_prefill_attention runs on CUDA),
                default tiles, plus every CANDIDATE_CONFIGS entry (``triton_sweep_us``)
- gather_sdpa   cuda_kernels.reference (gather through block tables, expand GQA, SDPA):
                TINYSERVE_PREFILL_BACKEND=sdpa, the path before the Triton kernel
- sdpa_contig   the same SDPA call over contiguous K/V (expansion included, no gather)
- sdpa_pure     the SDPA kernel alone over contiguous, pre-expanded K/V
- sdpa_boolmask contiguous K/V, boolean mask + enable_gqa (SDPA's math path)

Target (issue 15): triton <= 1.1x sdpa_contig. FLOP/s count QK + PV over the keys each query
sees (causal), also as a fraction of the bf16 matmul peak measured in the same run.

    python benchmarks/prefill_bench.py --json prefill.json     (or kernels_bench.py --only prefill)
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from benchmarks.gpu_timing import time_ms
from cuda_kernels import reference

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DEVICE = "cuda"  # NOTE: a module constant so a CPU smoke run (interpreter) can swap it
# (num_seqs, context, chunk): chunks over a cached prefix, then fresh prompts (chunk == context)
PREFILL_GRID = [(4, 4096, 512), (1, 8192, 2048), (4, 2048, 2048)]


def bench_prefill(
    num_seqs: int, context: int, chunk: int, iters: int, reps: int, sweep: bool = True
) -> dict[str, object]:
    from cuda_kernels import prefill_triton

    blocks = context // BLOCK_SIZE
    shape = (num_seqs * blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=DEVICE).to(DTYPE)
    v_cache = torch.randn(shape, device=DEVICE).to(DTYPE)
    tables = torch.randperm(num_seqs * blocks, device=DEVICE).to(torch.int32).view(num_seqs, blocks)
    q = torch.randn(num_seqs * chunk, NUM_HEADS, HEAD_DIM, device=DEVICE).to(DTYPE)
    cu = torch.arange(0, num_seqs + 1, dtype=torch.int32) * chunk  # host tensors: no sync
    lens = torch.full((num_seqs,), context, dtype=torch.int32)
    scale = 1 / math.sqrt(HEAD_DIM)
    k_c = [
        k_cache[tables[i]].view(context, NUM_KV_HEADS, HEAD_DIM).transpose(0, 1).contiguous()
        for i in range(num_seqs)
    ]
    v_c = [
        v_cache[tables[i]].view(context, NUM_KV_HEADS, HEAD_DIM).transpose(0, 1).contiguous()
        for i in range(num_seqs)
    ]
    mask = (
        torch.arange(context, device=DEVICE)[None, :]
        <= torch.arange(context - chunk, context, device=DEVICE)[:, None]
    )
    args = (q, k_cache, v_cache, cu, lens, tables, scale)

    def triton_default(r: int) -> torch.Tensor:
        return prefill_triton.paged_prefill_attention(*args)

    def gather_sdpa(r: int) -> torch.Tensor:
        return reference.paged_prefill_attention(*args)

    def sdpa_contig(r: int) -> None:  # the same SDPA call over contiguous K/V: no gather
        for i in range(num_seqs):
            qi = q[i * chunk : (i + 1) * chunk].transpose(0, 1)
            reference._causal_sdpa(qi, k_c[i], v_c[i], scale)

    group = NUM_HEADS // NUM_KV_HEADS
    k_x = [k.repeat_interleave(group, dim=0)[None] for k in k_c]  # expanded before timing
    v_x = [v.repeat_interleave(group, dim=0)[None] for v in v_c]
    bias = causal_lower_right(chunk, context)

    def sdpa_pure(r: int) -> None:  # the SDPA kernel alone: K/V contiguous AND pre-expanded
        for i in range(num_seqs):
            qi = q[i * chunk : (i + 1) * chunk].transpose(0, 1)[None]
            F.scaled_dot_product_attention(qi, k_x[i], v_x[i], attn_mask=bias, scale=scale)

    def sdpa_boolmask(r: int) -> None:  # contiguous K/V, bool mask + enable_gqa (math path)
        for i in range(num_seqs):
            qi = q[i * chunk : (i + 1) * chunk].transpose(0, 1)
            F.scaled_dot_product_attention(
                qi, k_c[i], v_c[i], attn_mask=mask, scale=scale, enable_gqa=True
            )

    ref = gather_sdpa(0).float()
    err = float((triton_default(0).float() - ref).norm() / ref.norm())
    t_tri = time_ms(triton_default, 1, iters, reps, graph=False)
    t_ours = time_ms(gather_sdpa, 1, iters, reps, graph=False)
    t_sdpa = time_ms(sdpa_contig, 1, iters, reps, graph=False)
    t_bool = time_ms(sdpa_boolmask, 1, max(1, iters // 4), reps, graph=False)
    t_pure = time_ms(sdpa_pure, 1, iters, reps, graph=False)
    sweep_us: dict[str, float] = {}
    for cfg in prefill_triton.CANDIDATE_CONFIGS if sweep else ():

        def run(r: int, cfg: prefill_triton.TileConfig = cfg) -> torch.Tensor:
            return prefill_triton.paged_prefill_attention(*args, config=cfg)

        key = "x".join(map(str, cfg))  # BLOCK_M x BLOCK_N x warps x stages
        sweep_us[key] = time_ms(run, 1, iters, reps, graph=False) * 1e3
    # NOTE: QK + PV over the keys each query sees (causal); the rows before this change (and
    # kernels_notes' 108-271 TFLOP/s) counted the full chunk x context rectangle.
    prefix = context - chunk
    flops = 4 * num_seqs * NUM_HEADS * HEAD_DIM * (chunk * prefix + chunk * (chunk + 1) // 2)
    best = min(sweep_us.values(), default=t_tri * 1e3)
    return {
        "num_seqs": num_seqs,
        "context": context,
        "chunk": chunk,
        "flops_causal": flops,
        "triton_us": t_tri * 1e3,
        "triton_config": "x".join(map(str, prefill_triton.tile_config(HEAD_DIM))),
        "triton_sweep_us": sweep_us,
        "triton_best_us": best,
        "triton_rel_err_vs_gather_sdpa": err,
        "gather_sdpa_us": t_ours * 1e3,
        "sdpa_contig_us": t_sdpa * 1e3,
        "sdpa_boolmask_contig_us": t_bool * 1e3,
        "sdpa_pure_us": t_pure * 1e3,
        "triton_over_sdpa_contig": t_tri / t_sdpa,
        "triton_best_over_sdpa_contig": best / 1e3 / t_sdpa,
        "triton_over_sdpa_pure": t_tri / t_pure,
        "gather_overhead": t_ours / t_sdpa,
        "over_sdpa_pure": t_ours / t_pure,
        "gather_over_triton": t_ours / t_tri,
        "triton_TFLOPs": flops / t_tri / 1e9,
        "gather_sdpa_TFLOPs": flops / t_ours / 1e9,
        "sdpa_contig_TFLOPs": flops / t_sdpa / 1e9,
    }


def run_prefill(iters: int, reps: int, sweep: bool = True) -> dict[str, object]:
    """Every PREFILL_GRID row plus the bf16 matmul peak of this GPU; prints the table."""
    from benchmarks.gpu_models import matmul_peak

    peak = matmul_peak() / 1e12
    rows = [bench_prefill(s, c, ch, iters, reps, sweep) for s, c, ch in PREFILL_GRID]
    for r in rows:
        r["triton_of_matmul_peak"] = float(r["triton_TFLOPs"]) / peak  # type: ignore[arg-type]
    print(
        f"\nprefill over a cached prefix, {NUM_HEADS}q/{NUM_KV_HEADS}kv heads, d={HEAD_DIM}, bf16, "
        f"block {BLOCK_SIZE}; bf16 matmul peak {peak:.0f} TFLOP/s; x = time / SDPA contiguous"
    )
    print(
        f"{'seqs':>4} {'ctx':>5} {'chunk':>5} | {'triton us':>9} {'best us':>8} {'gath+SDPA':>9} "
        f"{'SDPA ctg':>8} {'SDPA pure':>9} | {'x tri':>5} {'x best':>6} {'x gath':>6} | "
        f"{'tri TF/s':>8} {'of peak':>7} {'err':>7}"
    )
    for r in rows:
        print(
            f"{r['num_seqs']:>4} {r['context']:>5} {r['chunk']:>5} | {r['triton_us']:>9.1f} "
            f"{r['triton_best_us']:>8.1f} {r['gather_sdpa_us']:>9.1f} {r['sdpa_contig_us']:>8.1f} "
            f"{r['sdpa_pure_us']:>9.1f} | {r['triton_over_sdpa_contig']:>5.2f} "
            f"{r['triton_best_over_sdpa_contig']:>6.2f} {r['gather_overhead']:>6.2f} | "
            f"{r['triton_TFLOPs']:>8.0f} {r['triton_of_matmul_peak']:>7.2f} "
            f"{r['triton_rel_err_vs_gather_sdpa']:>7.1e}"
        )
    for r in rows:
        print(f"  sweep ({r['num_seqs']},{r['context']},{r['chunk']}) us: {r['triton_sweep_us']}")
    return {"matmul_peak_TFLOPs": peak, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write results to this path")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-sweep", action="store_true", help="default tiles only")
    args = parser.parse_args()
    main_with(args.json, args.iters, args.reps, not args.no_sweep)


def main_with(json_path: str | None, iters: int, reps: int, sweep: bool = True) -> None:
    import triton

    props = torch.cuda.get_device_properties(0)
    res: dict[str, object] = {"gpu": props.name, "torch": torch.__version__}
    res["triton"] = triton.__version__
    res["prefill"] = run_prefill(iters, reps, sweep)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
