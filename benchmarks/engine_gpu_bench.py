"""Engine GPU benchmark: decode tokens/s of the TinyServe engine on one CUDA GPU, eager vs
CUDA-graph decode, vs transformers ``generate`` on the same GPU in the same run, and as a
fraction of the memory-bandwidth roofline.

Model: a random bf16 Llama shape (benchmarks.gpu_models: ``--shape 1b`` = 16 layers, hidden
2048, 32/8 heads of 64, intermediate 8192, vocab 32000; ``--shape 8b`` = Llama-3-8B), written
once as a HF checkpoint so both sides load the SAME weights; with ``--no-hf`` the weights are
filled in place instead (no checkpoint, no transformers row). Per batch size B: B fresh random prompts of --prompt-len tokens,
greedy, ignore_eos, --decode-tokens new tokens each.

- ours: all B requests added to LLMEngine at once and stepped to completion; the decode rate
  counts the tokens produced after every request has its first token, over the wall time
  from that step to the end (scheduler, sampler and output processing included).
- transformers: ``generate`` on the [B, prompt_len] batch (no padding needed), decode rate =
  B * decode_tokens / (time(1 + decode_tokens new tokens) - time(1 new token)).
- roofline: a decode step must read every weight once (the embedding only for B rows) and
  every sequence's K/V once; bytes per step at the mean decode context, over the device copy
  bandwidth measured in this run (bytes read + written of a 1 GiB device-to-device copy):
  roofline tokens/s = B * bandwidth / bytes_per_step.

Run (GPU machine, repo root):
    PYTHONPATH=. python3 benchmarks/engine_gpu_bench.py --json benchmarks/results/engine_gpu_h200.json
    PYTHONPATH=. python3 benchmarks/engine_gpu_bench.py --shape 8b --no-hf --decode-tokens 64
``--smoke``: a 2-layer model and tiny sizes, to check the code path in seconds.
``--async-scheduling``: one more mode per batch, ``graphs_async`` (CUDA graphs with
EngineConfig.async_scheduling switched on, same engine, same run), its fraction of the
roofline and ``async_over_graphs`` (its decode tok/s over the synchronous graphs mode).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import platform
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_phases import PhaseTimes
from benchmarks.gpu_models import SHAPES, copy_bandwidth, random_checkpoint_dir, random_weights
from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams

BLOCK_SIZE = 16


def make_checkpoint(path: Path, shape: dict[str, int], max_positions: int) -> Any:
    """Random bf16 Llama written with save_pretrained; returns the transformers model (GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **shape,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        eos_token_id=1,
        bos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(str(path))
    return model


def prompts_for(batch: int, prompt_len: int, seed: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, prompt_len), generator=gen).tolist()


def run_ours(
    engine: LLMEngine,
    prompts: list[list[int]],
    decode_tokens: int,
    phases: PhaseTimes | None = None,
) -> dict[str, Any]:
    """Step B requests to completion; decode rate after all have their first token. With
    ``phases``: mean host ms per decode step in each phase (``step_phase_ms``)."""
    params = SamplingParams(max_tokens=1 + decode_tokens, temperature=0.0, ignore_eos=True)
    tag = time.perf_counter_ns()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{tag}-{i}", p, params)
    started: set[str] = set()
    t0 = time.perf_counter()
    t_first: float | None = None
    decode_produced = 0
    step_times: list[float] = []
    while engine.has_unfinished_requests():
        ts = time.perf_counter()
        outs = engine.step()
        te = time.perf_counter()
        if t_first is not None:
            decode_produced += sum(len(o.new_token_ids) for o in outs)
            step_times.append(te - ts)
        for o in outs:
            started.add(o.request_id)
        if t_first is None and len(started) == len(prompts):
            t_first = te
            if phases is not None:
                phases.take()
                phases.on = True
    t_end = time.perf_counter()
    assert t_first is not None
    extra: dict[str, Any] = {}
    if phases is not None:
        phases.on = False
        steps = max(len(step_times), 1)
        per = {k: 1e3 * v / steps for k, v in phases.take().items()}
        per["update_and_outputs"] = 1e3 * sum(step_times) / steps - sum(per.values())
        extra["step_phase_ms"] = per
    return {
        **extra,
        "prefill_s": t_first - t0,
        "decode_s": t_end - t_first,
        "decode_tokens": decode_produced,
        "decode_tok_s": decode_produced / (t_end - t_first),
        "median_step_ms": 1e3 * statistics.median(step_times),
    }


def graph_replay_ms(engine: LLMEngine, batch: int, context: int, iters: int = 20) -> float | None:
    """GPU time of one replay of the graph a decode step of ``batch`` sequences at ``context``
    tokens uses (the model alone, no host work; the static buffers hold the last step's rows)."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    b = next(s for s in graphs.buckets if s >= batch)
    w = graphs.width_bucket(-(-context // BLOCK_SIZE))
    if (b, w) not in graphs.captured:
        return None
    graph, _ = graphs._graphs[b, w]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def run_hf(model: Any, prompts: list[list[int]], decode_tokens: int) -> dict[str, Any]:
    ids = torch.tensor(prompts, device="cuda")
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    t1 = gen(1)
    tn = gen(1 + decode_tokens)
    produced = len(prompts) * decode_tokens
    return {"prefill_s": t1, "decode_s": tn - t1, "decode_tok_s": produced / (tn - t1)}


def roofline(
    weight_bytes: int, hidden: int, batch: int, mean_ctx: float, bandwidth: float,
    kv_bytes_per_token: int,
) -> dict[str, float]:  # fmt: skip
    """weight_bytes: every weight but the embedding table, of which only B rows are read."""
    weights = weight_bytes + batch * hidden * 2
    kv = batch * mean_ctx * kv_bytes_per_token
    step_s = (weights + kv) / bandwidth
    return {
        "weight_bytes": weights,
        "kv_bytes": kv,
        "step_ms": 1e3 * step_s,
        "tok_s": batch / step_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layers")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (random weights)")
    ap.add_argument("--profile", action="store_true", help="cProfile the host side of each "
                    "batch's CUDA-graph decode run (top functions by own time)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="2 layers, batches 1 4, short")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="also run graphs_async: CUDA graphs + async scheduling")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.prompt_len, args.decode_tokens, args.layers = [1, 4], 64, 8, 2
    shape = dict(SHAPES[args.shape])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    import transformers

    from benchmarks.gpu_models import param_bytes_and_flops

    torch.backends.cuda.matmul.allow_tf32 = False
    dev_name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    max_len = -(-(args.prompt_len + args.decode_tokens + 2) // BLOCK_SIZE) * BLOCK_SIZE
    hf = None
    if args.no_hf:
        model_dir = random_checkpoint_dir(shape, max_len)
    else:
        model_dir = Path(tempfile.mkdtemp(prefix="engine_gpu_bench_"))
        hf = make_checkpoint(model_dir, shape, max_len)
    max_batch = max(args.batches)
    num_blocks = max_batch * (max_len // BLOCK_SIZE) + 64
    config = EngineConfig(
        model=str(model_dir),
        device="cuda",
        dtype="bfloat16",
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max(8192, args.prompt_len),
        max_model_len=max_len,
        cuda_graphs=True,
        async_scheduling=False,  # NOTE: the synchronous loop is the baseline mode
    )
    with random_weights() if args.no_hf else contextlib.nullcontext():
        engine = LLMEngine(config)
    weight_bytes, _ = param_bytes_and_flops(engine.loaded.model)
    phases = PhaseTimes(engine)
    graphs = engine.runner.graphs
    assert graphs is not None, "CUDA graphs unavailable (CuPy kernels missing?)"
    cfg = engine.loaded.arch
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_kv_heads * cfg.head_dim * 2
    mean_ctx = args.prompt_len + args.decode_tokens / 2
    vocab = cfg.vocab_size
    rows: list[dict[str, Any]] = []
    seed = 0
    for batch in args.batches:
        row: dict[str, Any] = {"batch": batch}
        modes = ("eager", "graphs", "graphs_async") if args.async_scheduling else ("eager", "graphs")
        for mode in modes:
            engine.runner.graphs = graphs if mode != "eager" else None
            engine.set_async_scheduling(mode == "graphs_async")
            phases.attach_stepper(engine)
            seed += 1
            run_ours(engine, prompts_for(batch, args.prompt_len, 10_000 + seed, vocab), 4)
            seed += 1
            prompts = prompts_for(batch, args.prompt_len, seed, vocab)
            prof = cProfile.Profile() if args.profile and mode == "graphs" else None
            with prof if prof is not None else contextlib.nullcontext():
                row[mode] = run_ours(
                    engine, prompts, args.decode_tokens, phases if mode != "eager" else None
                )
            if prof is not None:
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
            phase = row[mode].get("step_phase_ms", {})
            print(f"  b{batch} {mode}: {row[mode]['decode_tok_s']:.0f} tok/s, median step "
                  f"{row[mode]['median_step_ms']:.2f} ms "
                  + " ".join(f"{k} {v:.2f}" for k, v in phase.items()), flush=True)  # fmt: skip
        engine.runner.graphs = graphs
        engine.set_async_scheduling(False)
        row["graph_replay_ms"] = graph_replay_ms(
            engine, batch, args.prompt_len + args.decode_tokens
        )
        seed += 1
        best = max(row["eager"]["decode_tok_s"], row["graphs"]["decode_tok_s"])
        if hf is not None:
            run_hf(hf, prompts_for(batch, args.prompt_len, 20_000 + seed, vocab), 2)
            row["transformers"] = run_hf(hf, prompts, args.decode_tokens)
            print(f"  b{batch} transformers: {row['transformers']['decode_tok_s']:.0f} tok/s",
                  flush=True)  # fmt: skip
            row["best_over_transformers"] = best / row["transformers"]["decode_tok_s"]
        row["roofline"] = roofline(
            weight_bytes, cfg.hidden_size, batch, mean_ctx, bandwidth, kv_tok
        )
        row["graphs_over_eager"] = row["graphs"]["decode_tok_s"] / row["eager"]["decode_tok_s"]
        row["graphs_fraction_of_roofline"] = (
            row["graphs"]["decode_tok_s"] / row["roofline"]["tok_s"]
        )
        row["eager_fraction_of_roofline"] = row["eager"]["decode_tok_s"] / row["roofline"]["tok_s"]
        if "graphs_async" in row:
            row["graphs_async_fraction_of_roofline"] = (
                row["graphs_async"]["decode_tok_s"] / row["roofline"]["tok_s"]
            )
            row["async_over_graphs"] = (
                row["graphs_async"]["decode_tok_s"] / row["graphs"]["decode_tok_s"]
            )
        if row["graph_replay_ms"]:
            row["graph_replay_fraction_of_roofline"] = (
                row["roofline"]["step_ms"] / row["graph_replay_ms"]
            )
        rows.append(row)
        torch.cuda.empty_cache()
    result = {
        "benchmark": "engine_gpu_bench",
        "gpu": dev_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.platform(),
        "shape": args.shape,
        "model": {
            **shape,
            "head_dim": cfg.head_dim,
            "dtype": "bfloat16",
            "weights": "random",
        },
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "block_size": BLOCK_SIZE,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "kv_bytes_per_token": kv_tok,
        "async_scheduling_measured": args.async_scheduling,
        "rows": rows,
        "targets": {
            "1b": "graphs_fraction_of_roofline >= 0.50 at batch 1, >= 0.60 at batch 64",
            "8b": "graphs_fraction_of_roofline >= 0.70 at batch 1, >= 0.65 at batch 64",
        }[args.shape]
        if args.shape in ("1b", "8b")
        else "",
    }
    print()
    print(f"engine_gpu_bench  {dev_name}  copy {bandwidth / 1e12:.2f} TB/s  prompt "
          f"{args.prompt_len}  decode {args.decode_tokens}  shape {args.shape}  layers "
          f"{shape['num_hidden_layers']}")  # fmt: skip
    hdr = ("batch", "eager tok/s", "graphs tok/s", "HF tok/s", "roofline", "graphs/roof",
           "replay/roof", "vs HF", "graph/eager")  # fmt: skip
    print("".join(f"{h:>13}" for h in hdr))
    for r in rows:
        vals = (r["batch"], r["eager"]["decode_tok_s"], r["graphs"]["decode_tok_s"],
                r.get("transformers", {}).get("decode_tok_s", 0.0), r["roofline"]["tok_s"],
                r["graphs_fraction_of_roofline"], r.get("graph_replay_fraction_of_roofline", 0.0),
                r.get("best_over_transformers", 0.0), r["graphs_over_eager"])  # fmt: skip
        print("".join(f"{v:>13.0f}" if i < 5 else f"{v:>13.2f}" for i, v in enumerate(vals)))
    if args.async_scheduling:
        print(f"{'batch':>13}{'async tok/s':>13}{'async/roof':>13}{'async/graphs':>13}")
        for r in rows:
            print(f"{r['batch']:>13}{r['graphs_async']['decode_tok_s']:>13.0f}"
                  f"{r['graphs_async_fraction_of_roofline']:>13.2f}"
                  f"{r['async_over_graphs']:>13.2f}")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
