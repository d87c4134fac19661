"""Engine GPU benchmark: decode tokens/s of the TinyServe engine on one CUDA GPU, eager vs
CUDA-graph decode, vs transformers ``generate`` on the same GPU in the same run, and as a
fraction of the memory-bandwidth roofline.

Model: a 1B-class Llama architecture (16 layers, hidden 2048, 32/8 heads of 64, intermediate
8192, vocab 32000) with random bf16 weights, written once as a HF checkpoint so both sides
load the SAME weights. Per batch size B: B fresh random prompts of --prompt-len tokens,
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
``--smoke``: a 2-layer model and tiny sizes, to check the code path in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams

ARCH = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
)
BLOCK_SIZE = 16


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth, bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def make_checkpoint(path: Path, num_layers: int, max_positions: int) -> Any:
    """Random bf16 Llama written with save_pretrained; returns the transformers model (GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{**ARCH, "num_hidden_layers": num_layers},
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


def run_ours(engine: LLMEngine, prompts: list[list[int]], decode_tokens: int) -> dict[str, Any]:
    """Step B requests to completion; decode rate after all have their first token."""
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
    t_end = time.perf_counter()
    assert t_first is not None
    return {
        "prefill_s": t_first - t0,
        "decode_s": t_end - t_first,
        "decode_tokens": decode_produced,
        "decode_tok_s": decode_produced / (t_end - t_first),
        "median_step_ms": 1e3 * statistics.median(step_times),
    }


def graph_replay_ms(engine: LLMEngine, batch: int, iters: int = 20) -> float | None:
    """GPU time of one replay of the graph this batch used (the model alone, no host work)."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    keys = [k for k in graphs.captured if k[0] >= batch]
    if not keys:
        return None
    graph, _ = graphs._graphs[min(keys)]
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
    model: Any, batch: int, mean_ctx: float, bandwidth: float, kv_bytes_per_token: int
) -> dict[str, float]:
    embed = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= embed.numel() * embed.element_size()
    weights += batch * embed.shape[1] * embed.element_size()
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
    ap.add_argument("--layers", type=int, default=ARCH["num_hidden_layers"])
    ap.add_argument("--smoke", action="store_true", help="2 layers, batches 1 4, short")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.prompt_len, args.decode_tokens, args.layers = [1, 4], 64, 8, 2
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    dev_name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    max_len = -(-(args.prompt_len + args.decode_tokens + 2) // BLOCK_SIZE) * BLOCK_SIZE
    tmp = Path(tempfile.mkdtemp(prefix="engine_gpu_bench_"))
    hf = make_checkpoint(tmp, args.layers, max_len)
    max_batch = max(args.batches)
    num_blocks = max_batch * (max_len // BLOCK_SIZE) + 64
    engine = LLMEngine(
        EngineConfig(
            model=str(tmp),
            device="cuda",
            dtype="bfloat16",
            num_blocks=num_blocks,
            block_size=BLOCK_SIZE,
            max_num_seqs=max_batch,
            max_num_batched_tokens=max(8192, args.prompt_len),
            max_model_len=max_len,
            cuda_graphs=True,
        )
    )
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
        for mode in ("eager", "graphs"):
            engine.runner.graphs = graphs if mode == "graphs" else None
            seed += 1
            run_ours(engine, prompts_for(batch, args.prompt_len, 10_000 + seed, vocab), 4)
            seed += 1
            prompts = prompts_for(batch, args.prompt_len, seed, vocab)
            row[mode] = run_ours(engine, prompts, args.decode_tokens)
            print(f"  b{batch} {mode}: {row[mode]['decode_tok_s']:.0f} tok/s", flush=True)
        engine.runner.graphs = graphs
        row["graph_replay_ms"] = graph_replay_ms(engine, batch)
        seed += 1
        run_hf(hf, prompts_for(batch, args.prompt_len, 20_000 + seed, vocab), 2)
        row["transformers"] = run_hf(hf, prompts, args.decode_tokens)
        print(
            f"  b{batch} transformers: {row['transformers']['decode_tok_s']:.0f} tok/s", flush=True
        )
        row["roofline"] = roofline(hf, batch, mean_ctx, bandwidth, kv_tok)
        best = max(row["eager"]["decode_tok_s"], row["graphs"]["decode_tok_s"])
        row["graphs_over_eager"] = row["graphs"]["decode_tok_s"] / row["eager"]["decode_tok_s"]
        row["best_over_transformers"] = best / row["transformers"]["decode_tok_s"]
        row["graphs_fraction_of_roofline"] = (
            row["graphs"]["decode_tok_s"] / row["roofline"]["tok_s"]
        )
        row["eager_fraction_of_roofline"] = row["eager"]["decode_tok_s"] / row["roofline"]["tok_s"]
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
        "model": {
            **ARCH,
            "num_hidden_layers": args.layers,
            "head_dim": cfg.head_dim,
            "dtype": "bfloat16",
            "weights": "random",
        },
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "block_size": BLOCK_SIZE,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "kv_bytes_per_token": kv_tok,
        "rows": rows,
        "target": "graphs_fraction_of_roofline >= 0.5 at batch 64",
    }
    print()
    print(f"engine_gpu_bench  {dev_name}  copy {bandwidth / 1e12:.2f} TB/s  prompt "
          f"{args.prompt_len}  decode {args.decode_tokens}  layers {args.layers}")  # fmt: skip
    hdr = ("batch", "eager tok/s", "graphs tok/s", "HF tok/s", "roofline", "graphs/roof",
           "replay/roof", "vs HF", "graph/eager")  # fmt: skip
    print("".join(f"{h:>13}" for h in hdr))
    for r in rows:
        vals = (r["batch"], r["eager"]["decode_tok_s"], r["graphs"]["decode_tok_s"],
                r["transformers"]["decode_tok_s"], r["roofline"]["tok_s"],
                r["graphs_fraction_of_roofline"], r.get("graph_replay_fraction_of_roofline", 0.0),
                r["best_over_transformers"], r["graphs_over_eager"])  # fmt: skip
        print("".join(f"{v:>13.0f}" if i < 5 else f"{v:>13.2f}" for i, v in enumerate(vals)))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
