"""Tokenization off the ingress's event loop, on several threads, one tokenizer each; short
prompts inline on the loop.

HF fast tokenizers release the GIL while they encode, so N threads tokenize N prompts at
once; but one instance must not be used from two threads at a time (the Rust side raises
"Already borrowed"). Each worker thread therefore gets its own deep copy, made when the
thread starts; the caller's instance stays with the event loop (response detokenization, and
the prompts short enough to encode inline).

Every worker thread is started, and its copy made, when the pool is built: a copy of a real
tokenizer costs tens of milliseconds (SmolLM2's, 49k tokens), and made lazily it landed on the
first burst of requests (1B on an H100, 16 concurrent: tokenize p50 74-128 ms against ~5).
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from cluster.serve.chunked_encode import encode_pieces

T = TypeVar("T")
SPLIT_MODES = ("idle", "always", "never")


class TokenizerPool:
    """``await pool.run(fn, *args, num_chars=n, idle=...)`` calls ``fn(tokenizer, *args)``: on
    the calling thread with the caller's tokenizer when ``0 <= n <= inline_max_chars`` (or
    ``n <= idle_inline_max_chars`` when the caller says it is ``idle`` and no worker thread is
    busy), else on a worker thread with that thread's own tokenizer (``None`` stays ``None``:
    token-id-only models).

    NOTE: the thread hop (executor submit, a worker wake-up, the result posted back to the
    loop) costs more than encoding a short prompt; the threads exist so that a long prompt
    does not stall every other stream on the loop. ``inline_max_chars`` bounds the time one
    inline call holds the loop (roughly linear in characters). When the loop serves no one
    else (the caller's ``idle``: no request in flight) a longer encode holds no one up, and the
    hop is saved (~0.3 ms on the 2-core box); ``idle_inline_max_chars`` bounds that encode, in
    case a request arrives meanwhile. ``may_split`` says whether a long prompt may be encoded
    in pieces on the tokenizer's own thread pool (``split_encode``: "idle", "always", "never")."""

    def __init__(self, tokenizer: Any, num_threads: int, inline_max_chars: int = 0,
                 start_timeout_s: float = 120.0, idle_inline_max_chars: int = 0,
                 split_encode: str = "idle") -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if inline_max_chars < 0 or idle_inline_max_chars < 0:
            raise ValueError(f"inline_max_chars and idle_inline_max_chars must be >= 0, got "
                             f"{inline_max_chars}, {idle_inline_max_chars}")
        if split_encode not in SPLIT_MODES:
            raise ValueError(f"split_encode must be one of {SPLIT_MODES}, got {split_encode!r}")
        self._tokenizer = tokenizer
        self.split_encode = split_encode
        self.inline_max_chars = inline_max_chars
        self.idle_inline_max_chars = idle_inline_max_chars
        self.num_inline = 0
        self.num_threaded = 0
        self._num_busy = 0  # calls on the worker threads now
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(
            num_threads, thread_name_prefix="tinyserve-tokenize", initializer=self._init_thread
        )
        self._start_all(num_threads, start_timeout_s)

    def _start_all(self, num_threads: int, timeout_s: float) -> None:
        # NOTE: the executor starts a thread per submit while none is idle; tasks that wait at
        # a barrier keep every started thread busy until all ``num_threads`` exist.
        barrier = threading.Barrier(num_threads)
        futures = [self._executor.submit(barrier.wait, timeout_s) for _ in range(num_threads)]
        for f in futures:
            f.result(timeout=timeout_s)

    @property
    def num_threads_started(self) -> int:
        """Worker threads running now (each with its tokenizer copy made)."""
        return len(self._executor._threads)

    def _init_thread(self) -> None:
        self._local.tokenizer = copy.deepcopy(self._tokenizer)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        return fn(self._local.tokenizer, *args)

    def is_inline(self, num_chars: int, idle: bool = False) -> bool:
        """Whether ``run(..., num_chars=num_chars, idle=idle)`` encodes on the calling thread
        (never for ``num_chars`` < 0, nor when the limit that applies is 0)."""
        if num_chars < 0:
            return False
        if self.inline_max_chars > 0 and num_chars <= self.inline_max_chars:
            return True
        return (self._quiet(idle) and self.idle_inline_max_chars > 0
                and num_chars <= self.idle_inline_max_chars)

    def _quiet(self, idle: bool) -> bool:
        """The caller is ``idle`` and no prompt is on a worker thread."""
        return idle and self._num_busy == 0

    def may_split(self, idle: bool) -> bool:
        """Whether a long prompt may be encoded in pieces on the tokenizer's thread pool now.
        NOTE: "idle" (no request in flight, no prompt on the worker threads): the pieces use
        cores no one else wants then; under load the requests' own encodes already run side by
        side, and every ingress process's pool fanning each prompt out over all cores competes
        with the engine's host threads (session 17, random 1B, H100 host: c = 16-64)."""
        if self.split_encode == "idle":
            return self._quiet(idle)
        return self.split_encode == "always"

    async def run(self, fn: Callable[..., T], *args: Any, num_chars: int = -1,
                  idle: bool = False) -> T:
        """``fn(tokenizer, *args)``, inline or on a worker thread (see the class); its
        exception is raised here. ``num_chars`` < 0 (unknown) always takes a thread."""
        if self.is_inline(num_chars, idle):
            self.num_inline += 1
            return fn(self._tokenizer, *args)
        self.num_threaded += 1
        self._num_busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._call, fn, args
            )
        finally:
            self._num_busy -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def encode_ids(tokenizer: Any, text: str, add_special_tokens: bool = True,
               split: bool = True) -> list[int]:
    """The ids ``tokenizer.encode(text, add_special_tokens=...)`` gives, for an HF tokenizer.

    NOTE: a fast tokenizer's wrapper asks the Rust side for offsets and the other encoding
    fields and then keeps only the ids; ``encode_batch_fast`` (tokenizers >= 0.21) skips them
    and, like the wrapper's batch call, releases the GIL. SmolLM2's tokenizer, ~2,000 tokens,
    2-core box: 2.55 -> 2.02 ms. The wrapper is used whenever its own settings could change the
    ids (truncation or padding set on the backend) or there is no fast backend. A long text is
    encoded in pieces on the backend's thread pool where that is exact (``chunked_encode``)
    and ``split`` allows it."""
    backend: Any = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None or backend.truncation is not None or backend.padding is not None:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    ids = encode_pieces(backend, text, add_special_tokens) if split else None
    if ids is not None:
        return ids
    return list(fast([text], add_special_tokens=add_special_tokens)[0].ids)
