"""chunked_encode: a long text encoded in pieces gives the ids of the whole-text encode, for
every tokenizer it accepts; the others are refused (and encoded whole by ``encode_ids``)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from cluster.serve import chunked_encode as ce
from cluster.serve.tokenizer_pool import encode_ids

_CORPUS = [
    "The quick brown fox jumps over the lazy dog's back, doesn't it? 12345 and 678.",
    "def f(x):\n    return x ** 2  # squares\n\n\tindented\r\nline",
    "混合文本：中文、日本語、한국어 🚀 ∑∫√ naïve café — 'quoted' \"double\"",
    "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
]
# NOTE: the alphabet holds every class the patterns treat apart: letters (ASCII and not),
# digits, punctuation, apostrophes (contractions), spaces, tabs, newlines, other whitespace.
_ALPHABET = st.sampled_from([*list("abcXYZ019'.,-_!? \t\n\r"), " ", "  ", "\xa0", "é", "中", "🚀", "'s", "'ll", "\u2028"])
_WORDS = st.sampled_from(["the", "fox", "12345", "it's", "x**2", "<|im_start|>", "<|im_end|>",
                          "\n\n", "  ", "\t", "—", "naïve", "日本語"])
_TEXT = st.lists(st.one_of(_ALPHABET, _WORDS), max_size=120).map("".join)


def _bpe(pre: Any, added: list[AddedToken] | None = None, template: bool = False) -> Tokenizer:
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tk.train_from_iterator(_CORPUS * 20, trainer)
    if added:
        tk.add_tokens(added)
    if template:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", tk.token_to_id("<s>")),
                                                  ("</s>", tk.token_to_id("</s>"))])
    return tk


def _split(pattern: str) -> Any:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


_SAFE = {
    "gpt2": _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    "llama3": _bpe(_split(ce.LLAMA3_PATTERN), template=True),
    "qwen2": _bpe(_split(ce.QWEN2_PATTERN)),
    "digits+bytelevel": _bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])),
}


@pytest.mark.parametrize("name", sorted(_SAFE))
@settings(max_examples=150, deadline=None)
@given(text=_TEXT, special=st.booleans(), chunk=st.integers(1, 40))
def test_pieces_encode_as_the_whole_text(name: str, text: str, special: bool, chunk: int) -> None:
    tk = _SAFE[name]
    assert ce.chunk_safe(tk)
    whole = tk.encode_batch_fast([text], add_special_tokens=special)[0].ids
    ids = ce.encode_pieces(tk, text, special, chunk_chars=chunk, max_pieces=16)
    if ids is None:  # NOTE: no cut point (or too short): the caller encodes it whole.
        assert ce.num_pieces(tk, text, chunk, 16) == 1
    else:
        assert ids == whole


def test_a_long_text_is_cut_and_its_specials_added_once() -> None:
    tk = _SAFE["llama3"]
    text = " ".join(_CORPUS) * 8
    assert ce.num_pieces(tk, text, 64, 8) == 8
    ids = ce.encode_pieces(tk, text, True, chunk_chars=64, max_pieces=8)
    assert ids == tk.encode(text).ids
    assert ids is not None and ids.count(tk.token_to_id("<s>")) == 1 and ids[0] == 0


@pytest.mark.parametrize("case", ["metaspace", "normalizer", "prefix_space", "unknown_split",
                                  "stripped_added", "spaced_added", "bytelevel_no_regex"])
def test_tokenizers_the_cut_could_change_are_refused(case: str) -> None:
    if case == "metaspace":
        tk = _bpe(pre_tokenizers.Metaspace())
    elif case == "normalizer":
        tk = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
        tk.normalizer = normalizers.NFKC()
    elif case == "prefix_space":
        tk = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=True))
    elif case == "unknown_split":
        tk = _bpe(_split(r"\S+\s*"))
    elif case == "stripped_added":
        tk = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                  [AddedToken("<tool>", rstrip=True)])
    elif case == "spaced_added":
        tk = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), [AddedToken("end turn")])
    else:
        tk = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    assert not ce.chunk_safe(tk)
    assert ce.encode_pieces(tk, "word " * 400, False, chunk_chars=64, max_pieces=8) is None


def test_cuts_fall_on_single_spaces_between_words() -> None:
    text = "alpha beta  gamma\tdelta epsilon\nzeta eta theta"
    for n in range(1, 12):
        pieces = ce.cut(text, n)
        assert "".join(pieces) == text and len(pieces) <= n
        start = 0
        for p in pieces:
            if start:
                assert p[0] == " " and not p[1].isspace() and not text[start - 1].isspace()
            start += len(p)
    assert ce.cut("no-spaces-at-all" * 10, 4) == ["no-spaces-at-all" * 10]


def test_the_thread_pool_off_means_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    tk = _SAFE["gpt2"]
    text = "word " * 400
    assert ce.num_pieces(tk, text, 64, 8) == 8
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert ce.num_pieces(tk, text, 64, 8) == 1 and ce.encode_pieces(tk, text, True, 64, 8) is None


def test_encode_ids_cuts_the_embedded_tokenizers_long_prompts() -> None:
    from replicas.model_loader import load_tokenizer
    from replicas.model_source import resolve_model_dir

    try:
        tok = load_tokenizer(resolve_model_dir("default"))
    except Exception as exc:  # NOTE: the embedded model ships with the dev install.
        pytest.skip(f"SmolLM2 not available: {exc!r}")
    assert ce.chunk_safe(tok.backend_tokenizer)
    text = "\n".join(_CORPUS) * 40
    assert ce.num_pieces(tok.backend_tokenizer, text, max_pieces=4) == 4
    for special in (True, False):
        assert encode_ids(tok, text, special) == list(tok.encode(text, add_special_tokens=special))
