"""Timing the REAL engine one step at a time, for ``benchmarks/calibrate.py``: a ``StepTimer``
drives an ``LLMEngine`` and reads each step's shape from the scheduler's own output; the
``measure_*`` functions walk a grid of prefill, decode and mixed shapes (see calibrate.py)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from benchmarks.sim.fit import StepShape
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams

FIRST_PLAIN_TOKEN = 100  # NOTE: below this id SmolLM2 keeps its special tokens.


@dataclass(slots=True)
class Measurement:
    kind: str
    label: str
    shape: dict[str, Any]
    seconds: float  # median over the repeats (the fitted value)
    repeats_s: list[float] = field(default_factory=list)


class StepTimer:
    """Drives one LLMEngine and times single steps; reads each step's shape from the
    scheduler output (the engine's scheduler is wrapped, nothing else is touched)."""

    def __init__(self, engine: LLMEngine, seed: int, clock: str = "wall") -> None:
        self.engine = engine
        # NOTE: "cpu" = this process's CPU time: on a shared box it is what the step costs
        # when the engine has its core(s) to itself; wall / cpu per step is kept as the
        # contention seen while measuring.
        self.clock = clock
        self.wall_over_cpu: list[float] = []
        self.rng = np.random.default_rng(seed)
        self.cuda = engine.loaded.device.type == "cuda"
        self._last: Any = None
        self._ids = 0
        self._prefixes: dict[int, list[int]] = {}
        schedule = engine.scheduler.schedule

        def capture() -> Any:
            self._last = schedule()
            return self._last

        engine.scheduler.schedule = capture  # type: ignore[method-assign]

    def fresh(self, n: int) -> list[int]:
        return self.rng.integers(FIRST_PLAIN_TOKEN, self.engine.vocab_size, size=n).tolist()

    def add(self, prompt: list[int], max_tokens: int) -> str:
        self._ids += 1
        rid = f"cal-{self._ids}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(rid, prompt, params)
        return rid

    def step(self) -> tuple[float, StepShape, list[Any]]:
        """One engine step: (seconds on ``self.clock``, its shape, its outputs)."""
        if self.cuda:
            torch.cuda.synchronize()
        c0, t0 = time.process_time(), time.perf_counter()
        outs = self.engine.step()
        if self.cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.wall_over_cpu.append(wall / cpu if cpu > 0 else 1.0)
        return (cpu if self.clock == "cpu" else wall), self.shape(), outs

    def shape(self) -> StepShape:
        """The last step as the simulator counts it (prefill: chunk before the prompt end)."""
        tokens = seqs = ctx = 0
        pairs = 0.0
        n_pre = n_dec = 0
        for c in self._last.chunks:
            tokens += c.num_new_tokens
            seqs += 1
            if c.start < c.request.num_prompt_tokens:
                pairs += c.num_new_tokens * (c.start + c.num_new_tokens / 2)
                n_pre += 1
            else:
                ctx += c.start
                n_dec += 1
        kind = "mixed" if n_pre and n_dec else "prefill" if n_pre else "decode"
        return StepShape(tokens, seqs, pairs, ctx, kind)

    def run_all(self) -> None:
        while self.engine.has_unfinished_requests():
            self.step()

    def cache_prefix(self, n: int, fresh: bool = False) -> list[int]:
        """An ``n``-token prefix (multiple of block_size) made resident in the prefix cache
        (reused per length unless ``fresh``; re-running it is ~free while it stays cached)."""
        prefix = self.fresh(n) if fresh or n not in self._prefixes else self._prefixes[n]
        if not fresh:
            self._prefixes[n] = prefix
        if n:
            self.add(prefix, 1)
            self.run_all()
        return prefix


def _median_row(kind: str, label: str, runs: list[tuple[float, StepShape]]) -> Measurement:
    times = [t for t, _ in runs]
    shapes = [s for _, s in runs]
    mid = shapes[len(shapes) // 2]
    shape = StepShape(
        round(statistics.median(s.num_tokens for s in shapes)), mid.num_seqs,
        float(statistics.median(s.attn_pairs for s in shapes)),
        round(statistics.median(s.decode_ctx_tokens for s in shapes)), kind)
    return Measurement(kind, label, asdict(shape), statistics.median(times), times)


def measure_prefill(t: StepTimer, chunk: int, ctx: int, warmup: int, repeats: int
                    ) -> Measurement:
    prefix = t.cache_prefix(ctx)
    runs = []
    for r in range(warmup + repeats):
        t.add(prefix + t.fresh(chunk), 1)
        dt, shape, _ = t.step()
        t.run_all()
        assert shape.kind == "prefill" and shape.num_tokens == chunk, (shape, chunk, ctx)
        if r >= warmup:
            runs.append((dt, shape))
    return _median_row("prefill", f"prefill c={chunk} ctx={ctx}", runs)


def measure_decode_group(t: StepTimer, batch: int, context: int,
                         mixed: list[tuple[int, int]], warmup: int, repeats: int,
                         distinct_tokens: int) -> list[Measurement]:
    """B decoders at context L; decode rows, then one mixed row per (chunk, ctx) in ``mixed``."""
    bs = t.engine.kv.block_size
    prefixes = {ctx: t.cache_prefix(ctx) for _, ctx in mixed}
    if batch * context <= distinct_tokens:
        prompts = [t.fresh(context) for _ in range(batch)]
    else:
        shared = t.cache_prefix(context - bs, fresh=True)
        prompts = [shared + t.fresh(bs) for _ in range(batch)]
    # NOTE: early admits decode while later ones still prefill; budget for those steps too.
    budget = t.engine.config.max_num_batched_tokens
    startup = sum(-(-len(p) // budget) for p in prompts) + batch
    steps_needed = (warmup + repeats) * (1 + len(mixed)) + startup + 8
    ids = {t.add(p, min(steps_needed, t.engine.max_model_len - context - 1)) for p in prompts}
    started: set[str] = set()
    while not ids <= started:
        _, _, outs = t.step()
        started.update(o.request_id for o in outs if o.request_id in ids)
    rows: list[Measurement] = []
    runs = []
    for r in range(warmup + repeats):
        dt, shape, _ = t.step()
        assert shape.kind == "decode" and shape.num_seqs == batch, (shape, batch)
        if r >= warmup:
            runs.append((dt, shape))
    rows.append(_median_row("decode", f"decode B={batch} L={context}", runs))
    for chunk, ctx in mixed:
        runs = []
        for r in range(warmup + repeats):
            t.add(prefixes[ctx] + t.fresh(chunk), 1)
            dt, shape, _ = t.step()
            assert shape.kind == "mixed" and shape.num_seqs == batch + 1 \
                and shape.num_tokens == batch + chunk, (shape, batch, chunk)
            if r >= warmup:
                runs.append((dt, shape))
        rows.append(_median_row("mixed", f"mixed B={batch} L={context} c={chunk} ctx={ctx}",
                                runs))
    for rid in ids:
        t.engine.abort(rid)
    return rows


def measure_grid(t: StepTimer, grid: dict[str, list[Any]], warmup: int, repeats: int,
                 distinct_tokens: int) -> list[Measurement]:
    budget = t.engine.config.max_num_batched_tokens
    rows: list[Measurement] = []
    n_points = len(grid["prefill"]) + len(grid["decode"]) + len(grid["mixed"])

    def done(new: list[Measurement]) -> None:
        for m in new:
            rows.append(m)
            print(f"  [{len(rows):>3}/{n_points}] {m.label:<40} {1e3 * m.seconds:10.2f} ms",
                  flush=True)

    for chunk, ctx in grid["prefill"]:
        if chunk <= budget:
            done([measure_prefill(t, chunk, ctx, warmup, repeats)])
    mixed_by_group: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for b, n, c, x in grid["mixed"]:
        if b + c <= budget and b <= t.engine.config.max_num_seqs - 1:
            mixed_by_group.setdefault((b, n), []).append((c, x))
    groups = [(b, n) for b, n in grid["decode"] if b <= min(budget, t.engine.config.max_num_seqs)]
    groups += [g for g in mixed_by_group if g not in groups]
    for b, n in groups:
        new = measure_decode_group(t, b, n, mixed_by_group.get((b, n), []), warmup, repeats,
                                   distinct_tokens)
        if (b, n) not in grid["decode"]:
            new = new[1:]
        done(new)
    return rows
