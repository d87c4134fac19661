#!/usr/bin/env bash
# Download, HERE, the wheels that the GPU tests and benchmarks need and the GPU image lacks
# (pytest, xgrammar + apache-tvm-ffi, pydantic, jsonschema, xxhash, sortedcontainers: ~9 MB)
# for THE GPU machine's interpreter (CPython 3.12, x86-64) into .gpuwhl/ (git-ignored):
#
#   scripts/gpu_testhouse.sh                      # -> .gpuwhl/*.whl
#
# On the GPU machine, with .gpuwhl carried there (run(..., carry=[".gpuwhl"])):
#   . scripts/gpu_test_site.sh && python3 -m pytest -q -m gpu tests/cuda_kernels tests/replicas
# NOTE: separate from gpu_wheelhouse.sh (Ray, ~50 MB): both with the repo exceed one transfer
# (64 MiB), so kernel/engine runs carry this one and Serve runs carry .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(realpath -s "${PY:-.venv/bin/python}")"
DEST="${DEST:-.gpuwhl}"
# NOTE: pinned to this venv's versions, so the GPU run tests what CI tests.
PINNED="$("$PY" -c 'import importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in
  ("xgrammar", "apache-tvm-ffi", "pytest", "pluggy", "iniconfig", "pydantic", "pydantic-core",
   "annotated-types", "typing-inspection", "jsonschema", "jsonschema-specifications",
   "referencing", "rpds-py", "attrs", "xxhash", "sortedcontainers")))')"
mkdir -p "$DEST"
echo "== downloading $PINNED for CPython 3.12 x86-64 into $DEST"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" $PINNED
du -sh "$DEST"
