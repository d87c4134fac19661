# Source this on a GPU machine (bash), with .gpuwhl/ carried there (scripts/gpu_testhouse.sh
# built it): installs the test wheels offline and puts this repo on PYTHONPATH.
#   . scripts/gpu_test_site.sh && python3 -m pytest -q -m gpu tests/cuda_kernels
# NOTE: a sourced file must not `exit`: it returns non-zero and the caller decides.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! python3 -m pip install -q --no-index --find-links "$_repo/.gpuwhl" xgrammar pytest \
    jsonschema xxhash sortedcontainers pydantic >/tmp/gpu_test_site.log 2>&1; then
  # NOTE: a read-only or externally managed system site: install beside it instead.
  echo "gpu_test_site.sh: pip install failed (tail of /tmp/gpu_test_site.log below); --target /tmp/site2"
  tail -3 /tmp/gpu_test_site.log
  python3 -m pip install -q --no-index --no-deps --target /tmp/site2 "$_repo"/.gpuwhl/*.whl || return 1
  export PYTHONPATH=/tmp/site2${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$_repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, xgrammar, pydantic, pytest; print('torch', torch.__version__, 'xgrammar', xgrammar.__version__)"
unset _repo
