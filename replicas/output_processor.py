"""Output processing: append sampled tokens, detokenize incrementally, check stop conditions,
and build the streamed RequestOutput deltas.

Incremental detokenization (the read/prefix offset scheme)::

    ids    = last <=5 prompt tokens + output tokens
             [prefix_offset ........ read_offset ........ len(ids))
    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]   unless it ends in U+FFFD (an incomplete
                                                 UTF-8 sequence: wait for the next token)

NOTE: decoding from a few tokens of context keeps SentencePiece/BPE leading-space handling
right without re-decoding the whole output each step.
"""

from __future__ import annotations

import time
from typing import Any

from replicas.outputs import RequestOutput, RequestTrace, TokenLogprobs
from replicas.request import Request

_CONTEXT_TOKENS = 5
# NOTE: the engine keeps time.monotonic(); traces cross processes, so they carry wall time.
_WALL_OFFSET = time.time() - time.monotonic()


class IncrementalDetokenizer:
    """Turns a request's growing output token list into text deltas."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.seconds = 0.0  # time spent in add(), for the request's trace

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special))

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


class OutputProcessor:
    """Per-request stop checking and delta building; holds one detokenizer per request."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def append_token(
        self, req: Request, token_id: int, logprobs: TokenLogprobs | None
    ) -> str | None:
        """Append a sampled token to ``req``; returns the finish reason when it ends here."""
        now = time.monotonic()
        req.token_ids.append(token_id)
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        if logprobs is not None:
            req.pending_logprobs.append(logprobs)
        params = req.params
        if self.tokenizer is not None:
            detok = self._detok.get(req.request_id)
            if detok is None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, req.prompt_token_ids, params.skip_special_tokens
                )
                self._detok[req.request_id] = detok
            old_len = len(req.output_text)
            t0 = time.perf_counter()
            req.output_text += detok.add(token_id)
            detok.seconds += time.perf_counter() - t0
            if params.stop and len(req.output_text) > old_len:
                longest = max(len(s) for s in params.stop)
                window_start = max(0, old_len - longest + 1)
                hits = [
                    pos for s in params.stop if (pos := req.output_text.find(s, window_start)) >= 0
                ]
                if hits:
                    req.output_text = req.output_text[: min(hits)]
                    return "stop"
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in req.eos_token_ids:
            return "stop"
        if req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def make_output(self, req: Request) -> RequestOutput:
        """The delta since the previous output of ``req`` (advances its cursors)."""
        new_ids = req.output_token_ids[req.num_sent_tokens :]
        req.num_sent_tokens = req.num_output_tokens
        text_end = len(req.output_text)
        if not req.is_finished and req.params.stop:
            # NOTE: hold back a possible partial stop string until it is decided.
            text_end = max(
                req.num_sent_chars, text_end - (max(len(s) for s in req.params.stop) - 1)
            )
        delta = req.output_text[req.num_sent_chars : text_end]
        req.num_sent_chars = text_end
        logprobs = None
        if req.params.logprobs is not None:
            logprobs, req.pending_logprobs = req.pending_logprobs, []
        trace = None
        if req.is_finished:
            detok = self._detok.pop(req.request_id, None)
            trace = self._trace(req, detok.seconds if detok is not None else 0.0)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            text_delta=delta,
            finished=req.is_finished,
            finish_reason=req.finish_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens or 0,
            num_output_tokens=req.num_output_tokens,
            logprobs=logprobs,
            metrics=req.metrics(),
            trace=trace,
        )

    @staticmethod
    def _trace(req: Request, detokenize_s: float) -> RequestTrace:
        """The engine's stamps of a finished request (the replica adds its own)."""
        first = req.first_token_time
        last = req.last_token_time
        return RequestTrace(
            engine_add=req.arrival_time + _WALL_OFFSET,
            engine_first_token=first + _WALL_OFFSET if first is not None else 0.0,
            engine_finish=last + _WALL_OFFSET if last is not None else 0.0,
            detokenize_s=detokenize_s,
        )
