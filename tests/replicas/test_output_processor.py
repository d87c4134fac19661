"""Incremental detokenization: DecodeStream (fast tokenizers) against the offset scheme."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from replicas.output_processor import (
    IncrementalDetokenizer,
    StreamDetokenizer,
    make_detokenizer,
)

TEXTS = [
    "Hello world, this is a plain English sentence with punctuation!",
    "Größe, café, naïve façade — déjà vu… «quotes» and “curly” ones.",
    "混合文本：中文、日本語のテキスト、그리고 한국어 문장도 있습니다。",
    "Emoji 🚀🔥👩‍💻 and symbols ∑∫√≠ plus code: `def f(x): return x**2`\n\tindented",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    from replicas.model_loader import load_tokenizer
    from replicas.model_source import resolve_model_dir

    try:
        return load_tokenizer(resolve_model_dir("default"))
    except Exception as exc:  # NOTE: the embedded model ships with the dev install.
        pytest.skip(f"SmolLM2 not available: {exc!r}")


def _run(detok: Any, ids: list[int]) -> list[str]:
    return [detok.add(t) for t in ids]


def test_decode_stream_is_exact_where_the_offset_scheme_drops_characters(
    smollm2_tokenizer: Any,
) -> None:
    """At every cut of multibyte text (byte-fallback tokens split mid-character) the streamed
    text equals decoding the whole output; the old offset scheme is not always exact
    (it dropped a split emoji right after the prompt), which is one reason it was replaced."""
    tok = smollm2_tokenizer
    rng = random.Random(0)
    num_checked = num_offset_wrong = 0
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for cut in sorted(rng.sample(range(1, len(ids) - 1), min(12, len(ids) - 2))):
            prompt, out = ids[:cut], ids[cut:]
            if "\ufffd" in tok.decode(prompt):
                continue  # the prompt ends mid-character: no exact continuation to compare
            want = tok.decode(ids)[len(tok.decode(prompt)) :]
            for skip in (True, False):
                fast = make_detokenizer(tok, prompt, skip)
                assert isinstance(fast, StreamDetokenizer)
                assert "".join(_run(fast, out)) == want, (prompt, out)
                slow = IncrementalDetokenizer(tok, prompt, skip)
                num_offset_wrong += "".join(_run(slow, out)) != want
                num_checked += 1
    assert num_checked >= 40
    assert num_offset_wrong < num_checked


def test_decode_stream_text_is_the_continuation_of_the_prompt(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        cut = next(n for n in range(4, len(ids)) if "\ufffd" not in tok.decode(ids[:n]))
        prompt, out = ids[:cut], ids[cut:]
        deltas = _run(make_detokenizer(tok, prompt, True), out)
        assert "".join(deltas) == tok.decode(ids)[len(tok.decode(prompt)):]
        # A delta never ends inside a UTF-8 sequence (no replacement characters leak out).
        assert all("\ufffd" not in d for d in deltas)


def test_tokenizers_without_a_fast_backend_fall_back_to_offsets(tiny_llama_dir: Path) -> None:
    from replicas.model_loader import load_tokenizer

    fast_tok = load_tokenizer(tiny_llama_dir)

    class SlowOnly:
        """A tokenizer with ``decode`` only (no Rust backend)."""

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return str(fast_tok.decode(ids, skip_special_tokens=skip_special_tokens))

    slow = make_detokenizer(SlowOnly(), [5, 6, 7], True)
    assert isinstance(slow, IncrementalDetokenizer)
    fast = make_detokenizer(fast_tok, [5, 6, 7], True)
    assert isinstance(fast, StreamDetokenizer)
    out = [8, 9, 10, 11]
    assert "".join(_run(slow, out)) == "".join(_run(fast, out)) == " " + fast_tok.decode(out)


def test_wall_offset_takes_the_tightest_bracket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first try straddling a 2 ms stall (a GIL switch, a preemption) is not the offset: the
    tightest monotonic bracket around a wall read is."""
    import replicas.output_processor as op

    # (monotonic, wall, monotonic) per try: the first stalls between the wall and its 2nd read
    reads = iter([10.0, 1010.0, 10.002, 20.0, 1020.0000005, 20.000001, 30.0, 1030.001, 30.00001])
    monkeypatch.setattr(op.time, "monotonic", lambda: next(reads))
    monkeypatch.setattr(op.time, "time", lambda: next(reads))
    assert op.wall_offset(tries=3) == pytest.approx(1000.0, abs=1e-6)
