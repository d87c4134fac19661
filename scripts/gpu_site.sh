# Source this on a GPU machine (bash): unpack the archive that scripts/gpu_wheelhouse.sh built
# into $SITE (default /tmp/site, once per machine) and put it and this repo on PYTHONPATH.
#   . scripts/gpu_site.sh && python3 -c 'import ray, ray.serve, openai'
# NOTE: a sourced file must not `exit`: it returns non-zero and the caller decides.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SITE="${SITE:-/tmp/site}"
_whl="${WHEELHOUSE:-$_repo/.whl}"
if [ ! -f "$SITE/.complete" ]; then
  if ! (cd "$_whl" && sha256sum --quiet -c site312.sha256); then
    echo "gpu_site.sh: $_whl is missing or corrupt: build it with scripts/gpu_wheelhouse.sh" >&2
    return 1
  fi
  mkdir -p "$SITE"
  cat "$_whl"/site312.tar.xz.part-* | xz -d -T0 | tar -C "$SITE" -xf - || return 1
  touch "$SITE/.complete"
fi
export PYTHONPATH="$SITE:$_repo${PYTHONPATH:+:$PYTHONPATH}"
# NOTE: Ray's workers inherit this environment from the local raylet that the driver starts.
export RAY_USAGE_STATS_ENABLED=0
unset _repo _whl
