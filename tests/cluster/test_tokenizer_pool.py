"""TokenizerPool: every worker thread encodes with its own copy; results as the original's."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from cluster.serve.tokenizer_pool import TokenizerPool


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 500)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def _encode(tokenizer: Any, text: str) -> tuple[int, str, list[int]]:
    return id(tokenizer), threading.current_thread().name, list(tokenizer.encode(text))


def test_concurrent_encodes_match_and_use_one_copy_per_thread() -> None:
    tok = _tokenizer()
    pool = TokenizerPool(tok, 4)
    texts = [" ".join(f"w{(i * 7 + j) % 499 + 1}" for j in range(2000)) for i in range(32)]

    async def main() -> list[tuple[int, str, list[int]]]:
        return await asyncio.gather(*(pool.run(_encode, t) for t in texts))

    try:
        results = asyncio.run(main())
    finally:
        pool.shutdown()
    assert [ids for _, _, ids in results] == [list(tok.encode(t)) for t in texts]
    owners: dict[str, set[int]] = {}
    for tok_id, thread, _ in results:
        owners.setdefault(thread, set()).add(tok_id)
    assert all(len(ids) == 1 for ids in owners.values())  # one copy per thread, kept
    copies = set().union(*owners.values())
    assert id(tok) not in copies and len(copies) == len(owners)


def test_errors_reach_the_caller_and_none_stays_none() -> None:
    pool = TokenizerPool(None, 2)

    def fails(tokenizer: Any, text: str) -> None:
        assert tokenizer is None
        raise ValueError(f"bad {text}")

    try:
        with pytest.raises(ValueError, match="bad x"):
            asyncio.run(pool.run(fails, "x"))
    finally:
        pool.shutdown()


def test_at_least_one_thread() -> None:
    with pytest.raises(ValueError, match="num_threads"):
        TokenizerPool(None, 0)
