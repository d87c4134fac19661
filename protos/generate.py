"""Regenerate the Python stubs of every ``protos/*.proto``: ``python -m protos.generate``.

Contract: writes ``<out>/protos/<name>_pb2.py``, ``<name>_pb2_grpc.py`` and ``<name>_pb2.pyi``
(the .pyi through mypy-protobuf's ``protoc-gen-mypy``) for each .proto. ``--out`` defaults to
the repository root, so the stubs land beside the .proto files. The include root is the
repository root, hence the generated ``*_pb2_grpc.py`` imports ``from protos import xxx_pb2``
with no post-processing. ``tests/protos`` regenerates into a temp dir and diffs against the
committed files, so a stale stub fails CI.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent


def proto_files() -> list[Path]:
    """Every .proto under protos/, sorted (deterministic output order)."""
    return sorted(PROTO_DIR.glob("*.proto"))


def _mypy_plugin() -> str | None:
    # NOTE: the venv's bin dir is not always on PATH (e.g. `.venv/bin/python -m ...`).
    local = Path(sys.executable).parent / "protoc-gen-mypy"
    if local.exists():
        return str(local)
    return shutil.which("protoc-gen-mypy")


def generate(out_dir: Path = REPO_ROOT, with_pyi: bool = True) -> list[Path]:
    """Run protoc for every .proto; returns the generated file paths. Raises RuntimeError when
    protoc fails or (with ``with_pyi``) mypy-protobuf is missing."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: grpcio-tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ]
    if with_pyi:
        plugin = _mypy_plugin()
        if plugin is None:
            raise RuntimeError("protoc-gen-mypy not found: pip install mypy-protobuf")
        args += [f"--plugin=protoc-gen-mypy={plugin}", f"--mypy_out={out_dir}"]
    protos = [str(p.relative_to(REPO_ROOT)) for p in proto_files()]
    rc = protoc.main([*args, *protos])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} for {protos}")
    generated: list[Path] = []
    for p in proto_files():
        stem = out_dir / "protos" / p.stem
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            path = Path(f"{stem}{suffix}")
            if path.exists():
                generated.append(path)
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repo)")
    parser.add_argument("--no-pyi", action="store_true", help="skip the mypy-protobuf .pyi")
    ns = parser.parse_args(argv)
    for path in generate(ns.out, with_pyi=not ns.no_pyi):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
