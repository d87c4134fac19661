"""benchmarks/tokenize_cost.py: both ways timed on the same text, their ids checked equal."""

from __future__ import annotations

from typing import Any

from benchmarks.tokenize_cost import measure


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def test_measure_times_both_ways_and_reports_their_ratio() -> None:
    row = measure(_tokenizer(), "a b c " * 100, rounds=5)
    assert row["wrapper_ms"] > 0 and row["encode_ids_ms"] > 0
    assert row["ratio"] == row["encode_ids_ms"] / row["wrapper_ms"]
