#!/usr/bin/env bash
# Download, HERE, FlashInfer and the few packages its import needs, for the GPU machines'
# interpreter (CPython 3.12, x86-64), into .fiwhl/ (git-ignored; ~12 MB, one transfer):
#
#   scripts/gpu_flashinfer_wheels.sh
#
# On the GPU machine, with .fiwhl carried there (run's carry: [".fiwhl"]):
#   python3 -m pip install -q --no-index --no-deps .fiwhl/*.whl
#   PYTHONPATH=. python3 benchmarks/kernels_bench.py --only decode --flashinfer --flex --json ...
#
# NOTE: FlashInfer 0.6.1, not the newest: 0.7.4's wheel is 101 MB (715 MB unpacked) with 17
# required dependencies; 0.6.1 is 7.6 MB and `import flashinfer` needs only apache-tvm-ffi,
# einops, ninja, nvidia-ml-py and tabulate beside what the GPU image ships (torch, numpy,
# packaging, requests, tqdm, click). Its declared cudnn-frontend and cutlass-dsl dependencies
# serve other kernels (installed --no-deps: checked on the CPU box, 2026-12-06). Its decode
# kernels are built on first use by its JIT (nvcc + ninja, on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${DEST:-.fiwhl}"
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --dest "$DEST" --python-version 3.12 --implementation cp \
  --abi cp312 --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  flashinfer-python==0.6.1 "apache-tvm-ffi>=0.1.6,<0.2,!=0.1.8,!=0.1.8.post0" einops ninja \
  nvidia-ml-py tabulate
ls -la "$DEST"
