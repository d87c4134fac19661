"""CUDA-graph replay of decode-only engine steps (opt-in: EngineConfig.cuda_graphs).

A decode step of a small model is dominated by host time: every layer launches a dozen
kernels, and the paged decode launcher alone costs ~75-130 us of Python per call
(benchmarks/results/kernels_notes.md). ``DecodeGraphs`` captures the whole forward pass once
per padded batch size and replays it, so a step costs one graph launch plus a few copies.

Contract:

- ``DecodeGraphs.supported(model, kv_caches)``: True when every kernel of a decode step is
  capturable here (CUDA tensors, CuPy kernels available, a dtype/shape the CUDA decode kernel
  instantiates). fp32 decode falls back to the torch reference, which reads ``seq_lens`` on
  the host, so it cannot be captured.
- ``run(chunks)`` takes a step whose chunks ALL have one new token and returns the same
  ``(sampling_chunks, float32 logits)`` as ``ModelRunner.execute``, or None when the step
  does not fit (a prefill chunk, more rows than the largest bucket, a table wider than the
  captured width); the caller then runs eagerly.
- One graph per (batch bucket, table-width bucket): ``capture_all()`` takes them all at
  start-up (ModelRunner does); a pair still missing is captured the first time a step needs
  it. NOTE: the decode kernel sizes its grid by the table width (it reads no
  lengths on the host), so one graph at max_model_len's width would launch mostly-empty
  CTAs on every short step; widths are powers of two blocks instead.

Static buffers (one set, shared by every bucket; a bucket of size B uses rows ``[:B]``)::

    input_ids, positions, slot_mapping   [max_batch] int64
    block_tables[w]                       [max_batch, w] int32, one per width bucket w
    seq_lens                              [max_batch] int32
    logits_indices                        arange(max_batch) int64

Padding rows (real rows n .. B-1) get slot -1 (reshape_and_cache skips it) and seq_len 0
(the decode kernel writes zeros), position 0 and token 0: they compute garbage nobody reads.

Placeholder rows (asynchronous scheduling) stage the row of ``PendingTokens`` that holds their
token; ``input_ids`` is then filled by a device gather before the replay, so the host never
waits for the step in flight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cuda_kernels import ops
from replicas.attention import AttentionMetadata
from replicas.model import CausalLM
from replicas.sampled_tokens import PendingTokens
from replicas.scheduler import ScheduledChunk

# NOTE: small steps padded to a power of two, larger ones to a multiple of 16: at most 16
# wasted rows of GEMM work, which is nearly free while decode is memory-bound.
_SMALL_BUCKETS = (1, 2, 4, 8)
_BUCKET_STEP = 16
_MIN_WIDTH = 16  # blocks


def bucket_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes graphs may be captured for, ascending, the last >= max_batch."""
    steps = -(-max(max_batch, 1) // _BUCKET_STEP)
    candidates = [*_SMALL_BUCKETS, *(_BUCKET_STEP * k for k in range(1, steps + 1))]
    smaller = [c for c in candidates if c < max_batch]
    return [*smaller, min(c for c in candidates if c >= max_batch)]


class DecodeGraphs:
    """Per-bucket CUDA graphs of ``model`` over decode-only steps (module docstring)."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_batch: int,
        max_blocks: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.max_blocks = max_blocks
        self.buckets = bucket_sizes(max_batch)
        self.max_batch = self.buckets[-1]
        n, dev = self.max_batch, device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables: dict[int, torch.Tensor] = {}
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.long, device=dev)
        # NOTE: host staging in pinned memory: one packed int64 row per sequence (token,
        # position, slot, seq_len, pending row or -1), so a step's scalars travel in ONE H2D
        # copy.
        self._staging = torch.zeros((n, 5), dtype=torch.long).pin_memory()
        self._host_tables: dict[int, torch.Tensor] = {}  # width -> pinned [max_batch, w]
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: object | None = None
        # NOTE: recorded after the step's H2D copies; waited on before the pinned buffers
        # are rewritten, so an async copy never reads the next step's values.
        self._copied = torch.cuda.Event()
        self.num_replays = 0

    @staticmethod
    def supported(model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """True when a decode step of this model can be captured (module docstring)."""
        if not kv_caches or not kv_caches[0][0].is_cuda or not ops.cuda_kernels_available():
            return False
        from cuda_kernels.decode import decode_supported

        cfg = model.config
        k_cache = kv_caches[0][0]
        probe = torch.empty((1, cfg.num_attention_heads, cfg.head_dim), dtype=k_cache.dtype)
        return decode_supported(probe, k_cache)

    @property
    def captured(self) -> list[tuple[int, int]]:
        """(batch bucket, table width) of every captured graph."""
        return sorted(self._graphs)

    def width_bucket(self, width: int) -> int:
        """Table width (blocks) of the graph serving a step whose widest table is ``width``."""
        w = _MIN_WIDTH
        while w < width:
            w *= 2
        return min(w, self.max_blocks)

    def _tables_for(self, w: int) -> torch.Tensor:
        if w not in self.block_tables:
            shape = (self.max_batch, w)
            self.block_tables[w] = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._host_tables[w] = torch.zeros(shape, dtype=torch.int32).pin_memory()
        return self.block_tables[w]

    def _meta(self, b: int, w: int) -> AttentionMetadata:
        dev = self.device
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            num_decode_tokens=b,
            decode_block_tables=self._tables_for(w)[:b],
            decode_seq_lens=self.seq_lens[:b],
            prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
            prefill_seq_lens=torch.zeros(0, dtype=torch.int32),
            prefill_block_tables=torch.zeros((0, 1), dtype=torch.int32, device=dev),
            num_prefill_tokens=0,
        )

    def _forward(self, b: int, w: int) -> torch.Tensor:
        return self.model(
            self.input_ids[:b],
            self.positions[:b],
            self.kv_caches,
            self._meta(b, w),
            self.logits_indices[:b],
        )

    def _capture(self, b: int, w: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # NOTE: the static rows may hold a previous step's real slots; reset them so the
        # warm-up and capture runs below write nothing into the KV cache.
        self.slot_mapping.fill_(-1)
        self.seq_lens.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # NOTE: warm-up outside capture: NVRTC compiles and smem attributes happen here.
            self._forward(b, w)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                out = self._forward(b, w)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph, out

    def capture_all(self) -> None:
        """Capture every (batch bucket, width bucket) graph now, as vLLM captures at start-up:
        a lazy capture inside a step stalls every running request for tens of milliseconds
        (each capture runs the forward pass twice)."""
        widths = sorted({self.width_bucket(w) for w in range(1, self.max_blocks + 1)})
        for b in self.buckets:
            for w in widths:
                if (b, w) not in self._graphs:
                    self._graphs[b, w] = self._capture(b, w)
        torch.cuda.synchronize(self.device)

    def remap_block_tables(self, remap: dict[int, int], num_blocks: int) -> None:
        """Compaction moved blocks (old -> new): rewrite every persistent device table on the
        current stream (after the last replay, before the next), so no row keeps a moved id."""
        lut = torch.arange(num_blocks, dtype=torch.int32)
        lut[list(remap)] = torch.tensor(list(remap.values()), dtype=torch.int32)
        lut = lut.to(self.device)
        for tables in self.block_tables.values():
            tables.copy_(lut[tables.long()])

    def run(
        self, chunks: Sequence[ScheduledChunk], pending: PendingTokens | None = None
    ) -> tuple[list[ScheduledChunk], torch.Tensor] | None:
        """Replay the graph of this decode-only step; None when it does not fit (see module).
        ``pending`` supplies the placeholder rows' ids (on the device)."""
        n = len(chunks)
        if n == 0 or n > self.max_batch or any(c.num_new_tokens != 1 for c in chunks):
            return None
        width = max(len(c.block_table) for c in chunks)
        if width > self.max_blocks:
            return None
        b = next(s for s in self.buckets if s >= n)
        w = self.width_bucket(width)
        if (b, w) not in self._graphs:
            self._graphs[b, w] = self._capture(b, w)
        graph, logits = self._graphs[b, w]
        if not self._copied.query():  # NOTE: query first: no sync call when already done
            self._copied.synchronize()
        stage = self._staging.numpy()
        # NOTE: one numpy conversion of a list of rows (a row assignment each costs ~1 us).
        rows = pending.rows if pending is not None else {}
        stage[:n] = [
            (0, c.start, c.slot_mapping[0], c.end, rows[c.request.request_id])
            if c.placeholder
            else (c.request.token_ids[c.start], c.start, c.slot_mapping[0], c.end, -1)
            for c in chunks
        ]
        stage[n:b] = (0, 0, -1, 0, -1)
        tables = self._host_tables[w].numpy()
        for i, c in enumerate(chunks):
            tables[i, : len(c.block_table)] = c.block_table
        staged = self._staging[:b].to(self.device, non_blocking=True)
        if pending is not None and any(c.placeholder for c in chunks):
            src = staged[:, 4]
            fed = pending.token_ids.index_select(0, src.clamp(min=0))
            self.input_ids[:b].copy_(torch.where(src >= 0, fed, staged[:, 0]))
        else:
            self.input_ids[:b].copy_(staged[:, 0])
        self.positions[:b].copy_(staged[:, 1])
        self.slot_mapping[:b].copy_(staged[:, 2])
        self.seq_lens[:b].copy_(staged[:, 3])
        # NOTE: stale table entries past a row's length are never read (the kernel stops at
        # seq_len), so only the rows' prefixes need to be current.
        self.block_tables[w][:n].copy_(self._host_tables[w][:n], non_blocking=True)
        self._copied.record()
        graph.replay()
        self.num_replays += 1
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        rows = logits[:n] if len(sampling) == n else logits[torch.tensor(sampling)]
        return [chunks[i] for i in sampling], rows.clone()
