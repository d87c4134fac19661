"""The committed stubs under protos/ must equal a fresh `python -m protos.generate`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protos import generate

# NOTE: generator/runtime version stamps differ between grpcio-tools releases without any
# change in the .proto; only the schema-derived content must match.
_VERSION_LINE = re.compile(
    r"(GRPC_GENERATED_VERSION|_runtime_version\.ValidateProtobuf|# Protobuf Python Version).*"
)


def _normalise(text: str) -> str:
    return "\n".join(_VERSION_LINE.sub(r"\1 <version>", line) for line in text.splitlines())


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = generate.PROTO_DIR / path.name
        assert committed.exists(), f"{committed.name} is not committed; run `make protos`"
        assert _normalise(committed.read_text()) == _normalise(path.read_text()), (
            f"{committed.name} is stale: run `python -m protos.generate` and commit the result"
        )


def test_stale_stub_is_detected(tmp_path: Path) -> None:
    """The comparison is sensitive to a schema change (guards against a vacuous normaliser)."""
    pytest.importorskip("grpc_tools")
    fresh = generate.generate(tmp_path, with_pyi=False)
    pb2 = next(p for p in fresh if p.name.endswith("_pb2.py"))
    committed = (generate.PROTO_DIR / pb2.name).read_text()
    tampered = committed.replace("num_prompt_tokens", "num_prompt_tokenz")
    assert _normalise(tampered) != _normalise(pb2.read_text())


def test_grpc_module_imports_as_package() -> None:
    from protos import cache_selection_pb2, cache_selection_pb2_grpc

    assert cache_selection_pb2_grpc.protos_dot_cache__selection__pb2 is cache_selection_pb2
    req = cache_selection_pb2.SelectRequest(block_hashes=[2**64 - 1, 0, 12345])
    back = cache_selection_pb2.SelectRequest.FromString(req.SerializeToString())
    assert list(back.block_hashes) == [2**64 - 1, 0, 12345]
