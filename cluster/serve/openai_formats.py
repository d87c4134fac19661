"""OpenAI's ``response_format`` and ``logit_bias`` as the engine's types.

    {"type": "text"}                                   -> no constraint
    {"type": "json_object"}                            -> StructuredOutputSpec("json_object")
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}
                                                       -> StructuredOutputSpec("json_schema", ...)

The schema's shape is checked here (an object); whether xgrammar can compile it is checked
by the replica before the request is scheduled (a 400 either way, naming the problem).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from replicas.sampling_params import StructuredOutputSpec
from replicas.structured_output import canonical_schema


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def spec(self) -> StructuredOutputSpec | None:
        """The engine's constraint; ValueError when ``json_schema`` is missing."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputSpec("json_object")
        if self.json_schema is None:
            raise ValueError("response_format type json_schema needs a json_schema object")
        return StructuredOutputSpec("json_schema", canonical_schema(self.json_schema.schema_))


def logit_bias_ids(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's ``{"token id as a string": bias}`` with int keys; ValueError for a bad key.
    (Range checks, [-100, 100] and the vocabulary, are the engine's.)"""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = float(value)
        except ValueError as exc:
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from exc
    return out
