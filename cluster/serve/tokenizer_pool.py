"""Tokenization off the ingress's event loop, on several threads, one tokenizer each.

HF fast tokenizers release the GIL while they encode, so N threads tokenize N prompts at
once; but one instance must not be used from two threads at a time (the Rust side raises
"Already borrowed"). Each worker thread therefore gets its own deep copy, made when the
thread starts; the caller's instance stays with the event loop (response detokenization).
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class TokenizerPool:
    """``await pool.run(fn, *args)`` calls ``fn(tokenizer, *args)`` on a worker thread with
    that thread's own tokenizer (``None`` stays ``None``: token-id-only models)."""

    def __init__(self, tokenizer: Any, num_threads: int) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self._tokenizer = tokenizer
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(
            num_threads, thread_name_prefix="tinyserve-tokenize", initializer=self._init_thread
        )

    def _init_thread(self) -> None:
        self._local.tokenizer = copy.deepcopy(self._tokenizer)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        return fn(self._local.tokenizer, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(tokenizer, *args)`` on a worker thread; its exception is raised here."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._call, fn, args
        )

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
