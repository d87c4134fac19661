#!/usr/bin/env bash
# One command on a GPU machine (no network) for the real-GPU routing A/B (issue 9), with .whl
# built by scripts/gpu_wheelhouse.sh carried beside the repo:
#   scripts/gpu_ab_run.sh OUT_PREFIX [benchmarks.gpu_ab args...]
# e.g. scripts/gpu_ab_run.sh $OUT/gpu_ab --workloads generated_shared_prefix --max-requests 64
# CALIBRATE_OUT=path: afterwards, measure the simulator's step-time model on the same model.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/gpu_ab_run.sh OUT_PREFIX [args...]}"
shift
# NOTE: NVLink multicast stays off on shared multi-GPU hosts (the lender's rule).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
t0=$(date +%s)
# shellcheck disable=SC1091
. scripts/gpu_site.sh
echo "== site ready in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import ray, ray.serve, openai, torch; print("ray", ray.__version__, "torch",
  torch.__version__, "gpus", torch.cuda.device_count())'
python3 -m benchmarks.gpu_ab --device cuda --make-llama1b /tmp/llama1b \
  --tokenizer .whl/tokenizer --out "$out" "$@"
if [ -n "${CALIBRATE_OUT:-}" ]; then
  # NOTE: the simulator's step-time model, measured on the same checkpoint and engine limits.
  python3 -m benchmarks.calibrate --device cuda --model /tmp/llama1b --max-num-seqs 256 \
    --max-num-batched-tokens 8192 --out "$CALIBRATE_OUT"
fi
echo "== total $(( $(date +%s) - t0 )) s"
