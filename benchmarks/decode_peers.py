"""The decode grid of kernels_bench and the library peers timed on it (issue 15): torch
FlexAttention (flex_peer.py) and FlashInfer (flashinfer_peer.py) over the same paged cache
as our kernel, each as TB/s of K+V read and the ratio ours / peer per grid row.

``decode_inputs(batch, context)`` builds one row's inputs (scattered block tables, copies
beyond L2); ``run_peers(...)`` times the peers asked for, last in the run (a device-side
assert in a peer ends the process), and prints them against our kernel's rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.flashinfer_peer import make_flashinfer_paged_decode
from benchmarks.flex_peer import make_flex_paged_decode
from benchmarks.gpu_timing import rotations, time_ms

try:
    from cuda_kernels import launchers
except ImportError:  # no cupy: kernels_bench explains and exits
    launchers = None  # type: ignore[assignment]

DECODE_GRID = [(1, 4096), (16, 4096), (64, 2048), (128, 1024), (32, 16384)]
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
# (q, k_cache, v_cache, block_tables, seq_lens, scale) -> a zero-argument decode call
PeerFactory = Callable[..., Callable[[], torch.Tensor]]


def decode_inputs(batch: int, context: int) -> tuple[torch.Tensor, ...]:
    """(q, k_cache, v_cache, tables stacked [rot, batch, blocks], seq_lens) for one grid row:
    scattered tables, ``rot`` copies so the working set exceeds L2."""
    gen = torch.Generator(device="cuda").manual_seed(batch * 7 + context)
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    rot = rotations(kv_bytes)
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = rot * batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    tables = [
        perm[r * batch * blocks_per_seq :][: batch * blocks_per_seq].view(batch, -1)
        for r in range(rot)
    ]
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    return q, k_cache, v_cache, torch.stack(tables), seq_lens


def bench_peer(
    name: str, make: PeerFactory, batch: int, context: int, iters: int, reps: int
) -> dict[str, float | str]:
    """A library peer (FlexAttention, FlashInfer) on bench_decode's inputs: ``{name}_us``,
    ``{name}_TBps``, its error against our kernel; a failure is a result (``error``)."""
    q, k_cache, v_cache, tables, seq_lens = decode_inputs(batch, context)
    scale = 1 / math.sqrt(HEAD_DIM)
    rot, kv_bytes = tables.shape[0], 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    out: dict[str, float | str] = {"batch": batch, "context": context}
    try:
        runs = [make(q, k_cache, v_cache, tables[r], seq_lens, scale) for r in range(rot)]
        ours = launchers.paged_decode_attention(q, k_cache, v_cache, tables[0], seq_lens, scale)
        out["rel_err_vs_ours"] = float(
            (runs[0]().float() - ours.float()).norm() / ours.float().norm()
        )
        try:
            ms = time_ms(lambda r: runs[r](), rot, iters, reps, graph=True)
        except Exception:  # NOTE: not graph-capturable here: time it eagerly instead
            ms, out["eager"] = time_ms(lambda r: runs[r](), rot, iters, reps, graph=False), 1.0
        out[f"{name}_us"], out[f"{name}_TBps"] = ms * 1e3, kv_bytes / 1e9 / ms
    except Exception as exc:  # NOTE: the peer's failure is a result to report
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def bench_flashinfer(batch: int, context: int, iters: int, reps: int) -> dict[str, object]:
    """FlashInfer's paged decode (flashinfer_peer.py), CUDA-core and tensor-core variants;
    ``flashinfer_TBps`` is the faster one's (the bar the issue's >= 0.95x reads)."""
    rows = {
        tc: bench_peer(
            "flashinfer",
            functools.partial(make_flashinfer_paged_decode, use_tensor_cores=tc),
            batch,
            context,
            iters,
            reps,
        )
        for tc in (False, True)
    }
    ok = [r for r in rows.values() if "flashinfer_TBps" in r]
    best = max(ok, key=lambda r: float(r["flashinfer_TBps"])) if ok else rows[False]
    return {**best, "variants": {"cuda_cores": rows[False], "tensor_cores": rows[True]}}


def run_peers(
    flex: bool, flashinfer: bool, iters: int, reps: int, res: dict[str, object],
    decode: list[dict[str, Any]],
) -> None:  # fmt: skip
    """Time the peers asked for on DECODE_GRID into ``res[name]`` (rows gain ``ours_over_peer``
    from our kernel's ``decode`` rows) and print them."""
    peers: list[tuple[str, str, Callable[..., dict[str, Any]]]] = []
    if flex:
        peers.append(("flex", "FlexAttention over the paged cache (compiled, 16-token pages)",
                      functools.partial(bench_peer, "flex", make_flex_paged_decode)))  # fmt: skip
    if flashinfer:
        peers.append(("flashinfer", "FlashInfer paged decode (NHD pages, best of CUDA/tensor cores)",
                      bench_flashinfer))  # fmt: skip
    for name, title, bench in peers:
        res[name] = rows = [bench(b, c, iters, reps) for b, c in DECODE_GRID]
        print(f"\n{title} vs ours")
        for pr, dr in zip(rows, decode, strict=True):
            key = f"{name}_TBps"
            if key in pr:
                pr["ours_over_peer"] = dr["ours_TBps"] / pr[key]
                line = (f"{pr[key]:.2f} TB/s, ours x{pr['ours_over_peer']:.2f}, "
                        f"err vs ours {pr['rel_err_vs_ours']:.1e}")  # fmt: skip
            else:
                line = f"failed: {pr.get('error')}"
            print(f"  b{pr['batch']} ctx {pr['context']}: {line}")
