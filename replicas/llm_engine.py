"""LLMEngine: the synchronous engine (add_request / step / abort) under the async one.

One ``step()``::

    scheduler.schedule()            -> chunks (decode + prefill), preempted requests; pool.commit
                                       (full blocks hashed, BlockStored events)
    model_runner.execute(chunks)    -> logits of the chunks that reach their last token
    sampler(logits)                 -> one token per sampling request
    scheduler.update()              -> requests' num_computed_tokens advance
    output_processor                -> stop checks, text deltas -> list[RequestOutput]

With ``EngineConfig.async_scheduling`` the same parts run pipelined: step N+1 is scheduled and
launched before step N's tokens reach the host (``replicas.async_scheduling``); ``step()``
then returns the previous step's outputs, and ``drain()`` resolves the step in flight.

Admission checks (``validate``) raise ValueError naming the limit before anything is queued,
so a bad request never disturbs the others. Not thread-safe: one thread drives it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvmanager.config import PoolConfig
from kvmanager.events import KVEvent
from kvmanager.manager import KVCacheManager
from kvmanager.metrics import PoolStats
from replicas.async_scheduling import AsyncStepper
from replicas.compaction import Compactor
from replicas.config import EngineConfig
from replicas.model_loader import LoadedModel, load_model
from replicas.model_runner import ModelRunner, kv_bytes_per_block
from replicas.output_processor import OutputProcessor
from replicas.outputs import RequestOutput, TokenLogprobs
from replicas.rate_meter import RateMeter
from replicas.request import Request
from replicas.request_limits import RequestLimits
from replicas.sampler import Sampler
from replicas.sampling_params import SamplingParams
from replicas.scheduler import Scheduler
from replicas.structured_output import GrammarCompiler, GrammarState

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)

# NOTE: asynchronous scheduling on CPU can run each step's forward on a worker thread, so the
# host's Python (scheduling, detokenizing, streaming) overlaps it. It did not pay on the
# shared 2-core box (benchmarks/engine_bench.py --compare-async: 0.97x the synchronous loop,
# SmolLM2, 1 torch thread; benchmarks/results/engine_notes.md): a CPU step is nearly all forward, so
# the pipeline runs inline there (same semantics, no overlap).
CPU_WORKER_THREAD = False


def derive_num_blocks(config: EngineConfig, loaded: LoadedModel) -> int:
    """Pool size: config.num_blocks, else from GPU free memory / the CPU GiB budget."""
    if config.num_blocks is not None:
        return config.num_blocks
    per_block = kv_bytes_per_block(loaded.model, config.block_size, loaded.dtype)
    if config.sparse_attention is not None:
        # NOTE: sparse layers keep per-block key min/max: 2 * kv_heads * head_dim per layer.
        cfg = loaded.model.config
        num_sparse = max(0, cfg.num_hidden_layers - config.sparse_attention.dense_layers)
        per_block += per_block // (2 * cfg.num_hidden_layers * config.block_size) * 2 * num_sparse
    if loaded.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(loaded.device)
        budget = int(free * config.kv_cache_memory_fraction)
    else:
        budget = int(config.cpu_kv_cache_gib * (1 << 30))
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(f"KV-cache budget {budget} bytes holds no {per_block}-byte block")
    return num_blocks


class LLMEngine:
    """Synchronous continuous-batching engine over one TinyServe pool."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads is not None and config.device == "cpu":
            torch.set_num_threads(config.num_threads)
        self.loaded = load_model(config)
        self.tokenizer: Any = self.loaded.tokenizer
        self.max_model_len = self.loaded.max_model_len
        self.vocab_size = self.loaded.arch.vocab_size
        self.eos_token_ids = frozenset(self.loaded.arch.eos_token_ids)
        num_blocks = derive_num_blocks(config, self.loaded)
        self.kv = KVCacheManager(
            PoolConfig(
                num_blocks=num_blocks,
                block_size=config.block_size,
                allocator=config.allocator,
                eviction=config.eviction,
                hash_mode=config.hash_mode,
                enable_prefix_caching=config.enable_prefix_caching,
            )
        )
        self.runner = ModelRunner(
            self.loaded.model,
            num_blocks,
            config.block_size,
            self.loaded.device,
            sparse_attention=config.sparse_attention,
            cuda_graphs=config.cuda_graphs,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
        )
        self.scheduler = Scheduler(
            self.kv, config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len
        )
        self.limits = RequestLimits(
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            num_blocks=num_blocks,
            block_size=config.block_size,
            has_tokenizer=self.tokenizer is not None,
        )
        self.compactor = Compactor(self.kv, self.runner, config.compaction)
        self.sampler = Sampler(config.seed, self.loaded.device)
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self.requests: dict[str, Request] = {}
        # NOTE: held by step(); readers on another thread (stats, events) take it too.
        self.lock = threading.Lock()
        self._arrivals = itertools.count()
        self.num_steps = 0
        # NOTE: measured rates, reported to the selection service
        self.rates = RateMeter()
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()
        self._stepper: AsyncStepper | None = None
        self.set_async_scheduling(config.async_scheduling)

    # -- asynchronous scheduling -------------------------------------------------------------
    @property
    def async_scheduling(self) -> bool:
        return self._stepper is not None

    def set_async_scheduling(self, enabled: bool) -> list[RequestOutput]:
        """Switch the step loop (benchmarks compare both on one engine); drains first and
        returns what the step in flight produced. On CPU the forward runs on a worker thread
        only if ``CPU_WORKER_THREAD``."""
        with self.lock:
            outputs = self._stepper.drain() if self._stepper is not None else []
            if enabled == (self._stepper is not None):
                return outputs
            if self._stepper is not None:
                self._stepper.close()
                self._stepper = None
            else:
                worker = self.loaded.device.type == "cpu" and CPU_WORKER_THREAD
                self._stepper = AsyncStepper(self, worker_thread=worker)
            return outputs

    def drain(self) -> list[RequestOutput]:
        """Resolve the step in flight (asynchronous scheduling) and return its outputs; after
        it nothing runs on the device. The place for between-steps work that moves blocks
        (compaction). No-op (empty) when synchronous or idle."""
        with self.lock:
            return self._stepper.drain() if self._stepper is not None else []

    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler (built on first use; thread-safe). ValueError when
        the checkpoint has no tokenizer."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(
                    self.tokenizer, self.vocab_size, self.eos_token_ids
                )
            return self._grammars

    # -- admission ---------------------------------------------------------------------------
    def validate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        """Raise ValueError naming the violated limit; changes nothing."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.limits.check(prompt_token_ids, params)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        grammar: xgrammar.CompiledGrammar | None = None,
    ) -> None:
        """Validate and queue a request (ValueError on bad input, nothing queued then).

        ``grammar`` is ``params.structured_output`` compiled (``grammar_compiler()``); the
        async engine compiles it off the step thread, this synchronous API compiles inline."""
        self.validate(request_id, prompt_token_ids, params)
        if params.structured_output is not None and grammar is None:
            grammar = self.grammar_compiler().compile(params.structured_output)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.loaded.device)
            gen.manual_seed(params.seed)
        req = Request(
            request_id=request_id,
            prompt_token_ids=[int(t) for t in prompt_token_ids],
            params=params,
            eos_token_ids=self.eos_token_ids,
            arrival_index=next(self._arrivals),
            generator=gen,
            grammar=GrammarState(grammar) if grammar is not None else None,
        )
        self.requests[request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request with reason "abort" and free its blocks; None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req, "abort")
        return self.outputs.make_output(req)

    # -- stepping ----------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        """True while a request is unfinished or a step is in flight (it must be resolved)."""
        stepper = self._stepper
        return self.scheduler.num_unfinished > 0 or (stepper is not None and stepper.in_flight)

    def step(self) -> list[RequestOutput]:
        """Run one scheduling + forward + sampling step; returns the outputs it produced
        (asynchronous scheduling: launches a step and returns the previous step's outputs)."""
        with self.lock:
            # NOTE: compaction runs between steps (nothing in flight, no chunk holds a
            # table): the one place the pool may move blocks (replicas.compaction). With
            # asynchronous scheduling the step in flight is resolved first.
            if self._stepper is None:
                self.compactor.maybe_compact()
                return self.step_sync()
            try:
                drained: list[RequestOutput] = []
                stepper = self._stepper
                self.compactor.maybe_compact(before=lambda: drained.extend(stepper.drain()))
                return drained + self._stepper.step()
            except BaseException:
                self._stepper.discard()
                raise

    def step_sync(self) -> list[RequestOutput]:
        """One synchronous step (the caller holds ``lock``; nothing in flight)."""
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return []
        self.num_steps += 1
        # NOTE: a chunk of several tokens is prompt (or recompute) work; a one-token chunk is
        # a decode row (a one-token prompt chunk is rare and cheap either way).
        num_prefill = sum(c.num_new_tokens for c in sched.chunks if c.num_new_tokens > 1)
        num_decode = sched.num_batched_tokens - num_prefill
        sampling, logits = self.runner.execute(sched.chunks)
        self.scheduler.update(sched)
        requests = [c.request for c in sampling]
        sampled = self.sampler(logits, requests)
        outputs = [
            self.emit_token(req, token_id, logprobs)
            for req, token_id, logprobs in zip(
                requests, sampled.token_ids, sampled.logprobs, strict=True
            )
        ]
        self.rates.observe(num_prefill, num_decode, time.perf_counter() - start)
        return outputs

    def emit_token(
        self, req: Request, token_id: int, logprobs: TokenLogprobs | None
    ) -> RequestOutput:
        """Append a sampled token to ``req``, finish it if it stops there, and return its
        output delta (the caller holds ``lock``)."""
        if req.grammar is not None and not req.grammar.accept(token_id):
            # NOTE: cannot happen under the bitmask; kept visible if it ever does.
            logger.warning("request %s: grammar refused token %d", req.request_id, token_id)
        first = req.first_token_time is None
        reason = self.outputs.append_token(req, token_id, logprobs)
        if first and req.first_token_time is not None:
            # NOTE: feeds the pool's F_access: TTFT served from cached KV vs recompute.
            level = "device" if req.num_cached_tokens else "recompute"
            self.kv.observe_latency(level, req.first_token_time - req.arrival_time)
        if reason is not None:
            self.scheduler.finish(req, reason)
            del self.requests[req.request_id]
        return self.outputs.make_output(req)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[int]]:
        """Convenience: run prompts to completion; returns each prompt's output token ids."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [f"gen-{next(self._arrivals)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self.requests for rid in ids):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        self.drain()  # NOTE: only discarded tokens of these requests can be left in flight
        return [results[rid] for rid in ids]

    # -- observability -----------------------------------------------------------------------
    def take_events(self) -> list[KVEvent]:
        """The pool's KV events since the last call (BlockStored / BlockRemoved / ...).
        Safe from another thread (waits for a running step)."""
        with self.lock:
            return self.kv.take_events()

    def cached_block_hashes(self) -> list[int]:
        """The pool's resident cached block hashes (a full resync for the selection service).
        Safe from another thread (waits for a running step)."""
        with self.lock:
            return self.kv.cached_block_hashes()

    def stats(self) -> PoolStats:
        """The pool's stats snapshot (usage, fragmentation, prefix hits, ...). Safe from
        another thread (waits for a running step)."""
        with self.lock:
            return self.kv.stats()
