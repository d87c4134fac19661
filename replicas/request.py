"""Request: the engine's mutable state of one generation (owned by the scheduler)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from replicas.outputs import RequestMetrics, TokenLogprobs
from replicas.sampling_params import SamplingParams
from replicas.structured_output import GrammarState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(slots=True)
class Request:
    """Token state and accounting of one request.

    ``token_ids`` = prompt + outputs so far. ``num_computed_tokens`` counts the tokens whose
    K/V is in the pool; after a preemption it drops to 0 and the request is recomputed (the
    outputs become part of the re-prefilled context). ``arrival_index`` orders requests by
    age: preemption takes the largest (youngest) first.

    ``num_pending_tokens`` (asynchronous scheduling, ``replicas.async_scheduling``): tokens
    sampled on the device by a step still in flight, not yet in ``token_ids``. The scheduler
    counts them (``num_tokens + num_pending_tokens`` is the length being computed); the host
    appends them one step later. Always 0 between steps of a synchronous engine.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_index: int
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    num_cached_tokens: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    # NOTE: structured output: the sequence's grammar matcher, advanced after each sample.
    grammar: GrammarState | None = None
    # Streaming cursors: how much of the outputs/text was already handed out.
    num_sent_tokens: int = 0
    output_text: str = ""
    num_sent_chars: int = 0
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def needs_host_history(self) -> bool:
        """True when sampling reads the outputs so far on the host (penalties, a grammar):
        such a request cannot have a token still on the device, so it steps synchronously."""
        return self.grammar is not None or self.params.has_penalties

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def metrics(self) -> RequestMetrics:
        """Snapshot of the latency figures known so far."""
        m = RequestMetrics()
        if self.first_scheduled_time is not None:
            m.queue_time_s = self.first_scheduled_time - self.arrival_time
        if self.first_token_time is not None:
            m.ttft_s = self.first_token_time - self.arrival_time
            if self.last_token_time is not None and self.num_output_tokens > 1:
                m.tpot_s = (self.last_token_time - self.first_token_time) / (
                    self.num_output_tokens - 1
                )
        return m
