"""Output processing: append sampled tokens, detokenize incrementally, check stop conditions,
and build the streamed RequestOutput deltas.

Incremental detokenization, two schemes behind one ``add(token_id) -> str``:

- ``StreamDetokenizer`` (fast tokenizers, the default): ``tokenizers``' ``DecodeStream``, as
  vLLM v1 does. It keeps its own prefix/read offsets in Rust: one native call per token.
  Primed with the prompt's last tokens so the first output's leading space comes out right.
- ``IncrementalDetokenizer`` (any HF tokenizer, the fallback): the read/prefix offset scheme::

    ids    = last <=5 prompt tokens + output tokens
             [prefix_offset ........ read_offset ........ len(ids))
    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]   unless it ends in U+FFFD (an incomplete
                                                 UTF-8 sequence: wait for the next token)

NOTE: decoding from a few tokens of context keeps SentencePiece/BPE leading-space handling
right without re-decoding the whole output each step; the offset scheme pays two Python
``decode`` calls per token, which is what ``DecodeStream`` saves.
"""

from __future__ import annotations

import time
from typing import Any

from replicas.outputs import RequestOutput, RequestTrace, TokenLogprobs
from replicas.request import Request

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # NOTE: old tokenizers (< 0.21): the offset scheme only.
    DecodeStream = None

_CONTEXT_TOKENS = 5


def wall_offset(tries: int = 5) -> float:
    """``time.time() - time.monotonic()``: the wall clock read between two monotonic stamps,
    the tightest bracket of ``tries``.

    NOTE: one unbracketed pair of reads can straddle a GIL switch or a preemption (ms on a busy
    host), and the error shifts every engine stamp of the process by as much: a CI run saw a
    trace's ``engine_add`` 0.9 ms before the replica's ``replica_recv`` that precedes it."""
    best_width, offset = float("inf"), 0.0
    for _ in range(tries):
        t0 = time.monotonic()
        wall = time.time()
        t1 = time.monotonic()
        if t1 - t0 < best_width:
            best_width, offset = t1 - t0, wall - (t0 + t1) / 2
    return offset


# NOTE: the engine keeps time.monotonic(); traces cross processes, so they carry wall time.
_WALL_OFFSET = wall_offset()


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


_INVALID_PREFIX = "Invalid prefix encountered"
_MAX_PRIME_TOKENS = 24


class StreamDetokenizer:
    """``DecodeStream`` over the fast tokenizer's Rust backend (see the module docstring)."""

    def __init__(
        self, tokenizer: Any, backend: Any, prompt_token_ids: list[int], skip_special: bool
    ) -> None:
        self.backend = backend
        self.skip_special = skip_special
        self.stream = DecodeStream(skip_special_tokens=skip_special)
        self.seconds = 0.0  # time spent in add(), for the request's trace
        # NOTE: prime with a prompt suffix that decodes cleanly (no partial UTF-8 at its
        # start), as vLLM does; the text it yields is the prompt's, not ours.
        suffix = prompt_token_ids[-_CONTEXT_TOKENS:]
        for n in range(_CONTEXT_TOKENS, min(len(prompt_token_ids), _MAX_PRIME_TOKENS) + 1):
            suffix = prompt_token_ids[-n:]
            if "\ufffd" not in tokenizer.decode(suffix, skip_special_tokens=skip_special):
                break
        for token_id in suffix:
            self._step(token_id)

    def _step(self, token_id: int) -> str | None:
        try:
            return self.stream.step(self.backend, token_id)  # type: ignore[no-any-return]
        except Exception as exc:
            # NOTE: a token sequence that decodes to non-monotonic text breaks the stream's
            # prefix state (tokenizers raises); restart from this token, as vLLM does.
            if not str(exc).startswith(_INVALID_PREFIX):
                raise
            self.stream = DecodeStream(skip_special_tokens=self.skip_special)
            return self.stream.step(self.backend, token_id)  # type: ignore[no-any-return]

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        return self._step(token_id) or ""


def make_detokenizer(
    tokenizer: Any, prompt_token_ids: list[int], skip_special: bool
) -> StreamDetokenizer | IncrementalDetokenizer:
    """``StreamDetokenizer`` when the tokenizer has a fast (Rust) backend, else the offset
    scheme."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if DecodeStream is not None and backend is not None:
        return StreamDetokenizer(tokenizer, backend, prompt_token_ids, skip_special)
    return IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special)


class OutputProcessor:
    """Per-request stop checking and delta building; holds one detokenizer per request."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._detok: dict[str, StreamDetokenizer | IncrementalDetokenizer] = {}

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
                detok = make_detokenizer(
                    self.tokenizer, req.prompt_token_ids, params.skip_special_tokens
                )
                self._detok[req.request_id] = detok
            old_len = len(req.output_text)
            t0 = time.perf_counter()
            req.output_text += detok.add(token_id)
            detok.seconds += time.perf_counter() - t0
            # NOTE: as vLLM, stop strings count only past min_tokens outputs.
            if (
                params.stop
                and len(req.output_text) > old_len
                and req.num_output_tokens > params.min_tokens
            ):
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
