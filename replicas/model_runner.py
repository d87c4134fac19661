"""ModelRunner: owns the model and the KV-cache tensors; turns scheduled chunks into one
forward pass and returns the logits of the rows that sample.

Packed step layout (decode rows first, then prefill chunks; see replicas.attention)::

    input_ids    [num_tokens]          positions  [num_tokens]     slot_mapping [num_tokens]
    decode:  block_tables [num_decode, max_blocks] int32, seq_lens [num_decode] int32
    prefill: cu_seqlens_q [num_prefill + 1] int32, seq_lens, block_tables

KV cache: per layer a (K, V) pair, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.

Placeholder rows (asynchronous scheduling): a chunk whose token was sampled by the previous
step, still on the device, gets its input id by a device gather from ``PendingTokens``; the
host never waits for it. On CUDA the per-step integer tensors go up from pinned memory,
non-blocking, so building a step never waits for the one in flight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cuda_kernels import ops
from replicas.attention import AttentionMetadata
from replicas.config import SparseAttentionConfig
from replicas.cuda_graph import DecodeGraphs
from replicas.model import CausalLM
from replicas.sampled_tokens import PendingTokens
from replicas.scheduler import ScheduledChunk
from replicas.sparse import SparseAttention, attach_sparse_attention

# Longest / shortest context allowed inside one CPU decode attention call.
DECODE_GROUP_SPREAD = 1.5


def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block occupies across every layer's K and V."""
    cfg = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def _h2d(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``. NOTE: a blocking copy from pageable memory synchronises
    the stream (it would wait for the step in flight); pinned + non_blocking does not."""
    if device.type != "cuda":
        return t
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype, device=device)
    return t.pin_memory().to(device, non_blocking=True)


def _device_tensor(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _h2d(torch.tensor(values, dtype=dtype), device)


def _block_table_tensor(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    out = torch.zeros((len(tables), max(width, 1)), dtype=torch.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return _h2d(out, device)


class ModelRunner:
    """Runs the model over one step's chunks; mutates the KV cache, nothing else."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        sparse_attention: SparseAttentionConfig | None = None,
        cuda_graphs: bool = False,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        cfg = model.config
        dtype = next(model.parameters()).dtype
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(cfg.num_hidden_layers)
        ]
        # NOTE: compile the CUDA prefill kernel now, not inside the first request's step.
        ops.warm_up_prefill(*self.kv_caches[0], cfg.num_attention_heads)
        # NOTE: page metadata for sparse decode; its tensors must move with compaction too
        # (self.sparse.metadata_tensors()).
        self.sparse: SparseAttention | None = None
        if sparse_attention is not None:
            self.sparse = attach_sparse_attention(model, sparse_attention, num_blocks, block_size)
        # NOTE: decode-only steps replay captured graphs (replicas.cuda_graph); sparse decode
        # keeps host-side page counters per step, so it stays eager.
        self.graphs: DecodeGraphs | None = None
        if (
            cuda_graphs
            and self.sparse is None
            and max_model_len is not None
            and DecodeGraphs.supported(model, self.kv_caches)
        ):
            self.graphs = DecodeGraphs(
                model, self.kv_caches, max_num_seqs, -(-max_model_len // block_size), device
            )
            self.graphs.capture_all()

    def _decode_groups(self, seq_lens: list[int]) -> list[tuple[int, int]] | None:
        """Row ranges of ascending ``seq_lens`` whose longest context is at most
        DECODE_GROUP_SPREAD x the shortest (CPU only; None = one call)."""
        if self.device.type != "cpu" or len(seq_lens) < 2:
            return None
        groups: list[tuple[int, int]] = []
        start = 0
        for i in range(1, len(seq_lens) + 1):
            if i == len(seq_lens) or seq_lens[i] > DECODE_GROUP_SPREAD * seq_lens[start]:
                groups.append((start, i))
                start = i
        return groups

    def execute(
        self, chunks: Sequence[ScheduledChunk], pending: PendingTokens | None = None
    ) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """Forward pass over ``chunks``. Returns the sampling chunks (in row order) and their
        float32 logits ``[num_sampling_chunks, vocab_size]``. ``pending`` supplies the ids of
        placeholder chunks (required when there are any)."""
        if self.graphs is not None:
            replayed = self.graphs.run(chunks, pending)
            if replayed is not None:
                return replayed
        # NOTE: decode rows sorted by context length, so length groups are row ranges.
        decode = sorted((c for c in chunks if c.num_new_tokens == 1), key=lambda c: c.end)
        prefill = [c for c in chunks if c.num_new_tokens > 1]
        ordered = decode + prefill
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampling: list[ScheduledChunk] = []
        placeholders: list[int] = []
        for c in ordered:
            if c.placeholder:
                placeholders.append(len(input_ids))
                input_ids.append(0)  # NOTE: overwritten on the device below
            else:
                input_ids.extend(c.request.token_ids[c.start : c.end])
            positions.extend(range(c.start, c.end))
            slots.extend(c.slot_mapping)
            if c.samples:
                logits_rows.append(len(input_ids) - 1)
                sampling.append(c)
        dev = self.device
        cu = [0]
        for c in prefill:
            cu.append(cu[-1] + c.num_new_tokens)
        meta = AttentionMetadata(
            slot_mapping=_device_tensor(slots, torch.long, dev),
            num_decode_tokens=len(decode),
            decode_block_tables=_block_table_tensor([c.block_table for c in decode], dev),
            decode_seq_lens=_device_tensor([c.end for c in decode], torch.int32, dev),
            # NOTE: prefill lengths stay on the host: the prefill kernel reads them there, and a
            # device copy would force a sync per layer.
            prefill_cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            prefill_seq_lens=torch.tensor([c.end for c in prefill], dtype=torch.int32),
            prefill_block_tables=_block_table_tensor([c.block_table for c in prefill], dev),
            num_prefill_tokens=cu[-1],
            decode_groups=self._decode_groups([c.end for c in decode]),
        )
        if self.sparse is not None:
            self.sparse.count_step([c.end for c in decode], meta.decode_block_tables.shape[1])
        ids = _device_tensor(input_ids, torch.long, dev)
        if placeholders:
            assert pending is not None, "placeholder rows need the pending tokens"
            src = pending.sources([c.request.request_id for c in ordered if c.placeholder])
            ids[_device_tensor(placeholders, torch.long, dev)] = pending.token_ids[
                _device_tensor(src, torch.long, dev)
            ]
        logits = self.model(
            ids,
            _device_tensor(positions, torch.long, dev),
            self.kv_caches,
            meta,
            _device_tensor(logits_rows, torch.long, dev),
        )
        return sampling, logits
