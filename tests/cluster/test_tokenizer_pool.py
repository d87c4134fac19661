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


def test_short_prompts_encode_inline_long_ones_on_threads_same_ids() -> None:
    tok = _tokenizer()
    pool = TokenizerPool(tok, 2, inline_max_chars=100)
    short = " ".join(f"w{j + 1}" for j in range(20))  # 98 characters
    long = " ".join(f"w{j % 499 + 1}" for j in range(600))
    assert len(short) <= 100 < len(long)

    async def main() -> list[tuple[int, str, list[int]]]:
        loop_thread = threading.current_thread().name
        out = [await pool.run(_encode, t, num_chars=len(t)) for t in (short, long)]
        out.append(await pool.run(_encode, short))  # length unknown: a thread
        assert out[0][1] == loop_thread and out[1][1] != loop_thread != out[2][1]
        return out

    try:
        (id_short, _, ids_short), (id_long, _, ids_long), (id_unknown, _, ids_unknown) = (
            asyncio.run(main()))
    finally:
        pool.shutdown()
    assert ids_short == ids_unknown == list(tok.encode(short))
    assert ids_long == list(tok.encode(long))
    assert id_short == id(tok)  # inline: the caller's own instance
    assert id(tok) not in (id_long, id_unknown)  # threads: their copies
    assert (pool.num_inline, pool.num_threaded) == (1, 2)
    assert pool.is_inline(100) and not pool.is_inline(101) and not pool.is_inline(-1)


def test_an_idle_caller_encodes_long_prompts_inline_unless_a_thread_is_busy() -> None:
    tok = _tokenizer()
    pool = TokenizerPool(tok, 2, inline_max_chars=10, idle_inline_max_chars=1000)
    text = " ".join(f"w{j % 499 + 1}" for j in range(150))
    assert 10 < len(text) <= 1000
    release = threading.Event()

    def slow(tokenizer: Any) -> None:
        release.wait(10)

    async def main() -> list[str]:
        loop_thread = threading.current_thread().name
        where = [(await pool.run(_encode, text, num_chars=len(text), idle=True))[1]]
        where.append((await pool.run(_encode, text, num_chars=len(text)))[1])  # not idle
        busy = asyncio.ensure_future(pool.run(slow))  # a thread is busy: no inline
        await asyncio.sleep(0.05)
        assert not pool.is_inline(len(text), idle=True)
        where.append((await pool.run(_encode, text, num_chars=len(text), idle=True))[1])
        release.set()
        await busy
        assert pool.is_inline(len(text), idle=True)
        return [w == loop_thread for w in where]

    try:
        assert asyncio.run(main()) == [True, False, False]
    finally:
        pool.shutdown()
    assert not pool.is_inline(1001, idle=True) and not pool.is_inline(-1, idle=True)
    assert not TokenizerPool(None, 1, idle_inline_max_chars=0).is_inline(5, idle=True)
    with pytest.raises(ValueError, match="idle_inline_max_chars"):
        TokenizerPool(None, 1, idle_inline_max_chars=-1)


def test_split_encodes_only_while_idle_unless_set_otherwise() -> None:
    release = threading.Event()

    def slow(tokenizer: Any) -> None:
        release.wait(10)

    async def main(pool: TokenizerPool) -> list[bool]:
        seen = [pool.may_split(idle=True), pool.may_split(idle=False)]
        busy = asyncio.ensure_future(pool.run(slow))  # a prompt on a worker thread
        await asyncio.sleep(0.05)
        seen.append(pool.may_split(idle=True))
        release.set()
        await busy
        release.clear()
        return seen

    got = {}
    for mode in ("idle", "always", "never"):
        pool = TokenizerPool(None, 1, split_encode=mode)
        try:
            got[mode] = asyncio.run(main(pool))
        finally:
            pool.shutdown()
    assert got == {"idle": [True, False, False], "always": [True, True, True],
                   "never": [False, False, False]}
    with pytest.raises(ValueError, match="split_encode"):
        TokenizerPool(None, 1, split_encode="sometimes")


def test_encode_ids_splits_only_when_asked() -> None:
    from unittest import mock

    from cluster.serve import tokenizer_pool

    tok = _tokenizer()
    text = " ".join(f"w{j % 499 + 1}" for j in range(1500))
    whole = tokenizer_pool.encode_ids(tok, text, split=False)
    with mock.patch.object(tokenizer_pool, "encode_pieces", return_value=None) as pieces:
        assert tokenizer_pool.encode_ids(tok, text, split=False) == whole
        assert not pieces.called
        assert tokenizer_pool.encode_ids(tok, text) == whole
        assert pieces.called


def test_inline_errors_reach_the_caller_and_zero_means_always_threads() -> None:
    pool = TokenizerPool(None, 1, inline_max_chars=10)

    def fails(tokenizer: Any, text: str) -> None:
        raise ValueError(f"bad {text}")

    try:
        with pytest.raises(ValueError, match="bad x"):
            asyncio.run(pool.run(fails, "x", num_chars=1))
    finally:
        pool.shutdown()
    assert pool.num_inline == 1
    off = TokenizerPool(None, 1)
    off.shutdown()
    assert not off.is_inline(0) and not off.is_inline(1)  # 0: always threads
    with pytest.raises(ValueError, match="inline_max_chars"):
        TokenizerPool(None, 1, inline_max_chars=-1)


def test_every_thread_and_its_copy_exist_before_the_first_request() -> None:
    tok = _tokenizer()
    copies: list[int] = []

    class Counting(TokenizerPool):
        def _init_thread(self) -> None:
            super()._init_thread()
            copies.append(id(self._local.tokenizer))

    pool = Counting(tok, 3)
    try:
        assert pool.num_threads_started == 3
        assert len(set(copies)) == 3 and id(tok) not in copies
        texts = [" ".join(f"w{i + j}" for j in range(50)) for i in range(12)]

        async def main() -> list[tuple[int, str, list[int]]]:
            return await asyncio.gather(*(pool.run(_encode, t) for t in texts))

        results = asyncio.run(main())
        assert {tok_id for tok_id, _, _ in results} <= set(copies)  # no copy made later
        assert len(copies) == 3
    finally:
        pool.shutdown()


_TEXTS = [
    "",
    "plain words",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",  # special tokens in the text
    "混合文本：中文、日本語、한국어 🚀👩‍💻 ∑∫√ `def f(x): return x**2`\n\tindented  double  spaces",
    " ".join(f"word{i}" for i in range(3000)),
]


@pytest.mark.parametrize("special", [True, False])
def test_encode_ids_equals_the_wrappers_encode_on_the_embedded_tokenizer(special: bool) -> None:
    from cluster.serve.tokenizer_pool import encode_ids
    from replicas.model_loader import load_tokenizer
    from replicas.model_source import resolve_model_dir

    try:
        tok = load_tokenizer(resolve_model_dir("default"))
    except Exception as exc:  # NOTE: the embedded model ships with the dev install.
        pytest.skip(f"SmolLM2 not available: {exc!r}")
    assert hasattr(tok.backend_tokenizer, "encode_batch_fast")  # the fast path is taken
    for text in _TEXTS:
        assert encode_ids(tok, text, special) == list(tok.encode(text, add_special_tokens=special))


def test_encode_ids_leaves_truncation_to_the_wrapper() -> None:
    from cluster.serve.tokenizer_pool import encode_ids

    tok = _tokenizer()
    text = " ".join(f"w{i}" for i in range(1, 50))
    tok.backend_tokenizer.enable_truncation(8)
    # NOTE: the wrapper turns the backend's truncation off per call; the raw backend would cut.
    assert len(tok.backend_tokenizer.encode(text).ids) == 8
    assert encode_ids(tok, text) == list(tok.encode(text)) and len(encode_ids(tok, text)) == 49
