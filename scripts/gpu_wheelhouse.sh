#!/usr/bin/env bash
# Build, HERE, the Python packages that the GPU machines lack (Ray Serve, the OpenAI client and
# their dependencies) for THEIR interpreter (CPython 3.12, x86-64, manylinux), and pack them as
# one trimmed site-packages archive split into parts under .whl/ (git-ignored):
#
#   scripts/gpu_wheelhouse.sh            # -> .whl/site312.tar.xz.part-aa, -ab, ... + .sha256,
#                                        #    .whl/tokenizer + tok.tar.xz, .whl/extra (test wheels)
#
# On the GPU machine (no network), with .whl carried there: `. scripts/gpu_site.sh` unpacks it
# into /tmp/site and puts it (and this repo) on PYTHONPATH; Ray's workers inherit that.
#
# NOTE: the Ray wheel alone is ~79 MB, more than one transfer (64 MiB). Trimmed of what Serve
# never loads (Java jars, RLlib, Tune, Train, source maps) and xz-compressed, everything is
# ~50 MB; with the native binaries stripped (Ray ships gcs_server, raylet and _raylet.so with
# their symbols, uvloop with debug info) and Ray Data dropped, ~34 MB (Ray LLM stays: gpu_ab's
# ray_prefix_affinity policy is its PrefixCacheAffinityRouter), which leaves
# room in one transfer for the repo and the HAProxy binary (Serve's HAProxy mode, issue 16).
# Packages the GPU image already ships (numpy) and optional ones (virtualenv for pip
# runtime_envs, py-spy, cryptography for cloud auth) are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(realpath -s "${PY:-.venv/bin/python}")"
DEST="${DEST:-.whl}"
PART_MB="${PART_MB:-30}"
RAY_VERSION="$("$PY" -c 'import ray; print(ray.__version__)')"
# NOTE: the project's own runtime needs that the GPU image lacks, pinned to this venv's versions.
PINNED="$("$PY" -c 'import importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in
  ("ray", "openai", "grpcio-health-checking", "grpcio-reflection", "msgspec", "cbor2", "pyzmq",
   "uvloop")))')"
SKIP='^(numpy|virtualenv|distlib|platformdirs|python_discovery|py_spy|cryptography|cffi|pycparser)-'
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
  --platform manylinux1_x86_64 --platform linux_x86_64)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "== downloading ray[serve] and $PINNED for CPython 3.12 x86-64"
# shellcheck disable=SC2086
"$PY" -m pip download -q "${TARGET[@]}" -d "$work/wheels" "ray[serve]==$RAY_VERSION" $PINNED \
  2> >(grep -v '^WARNING: Location' >&2)
mapfile -t wheels < <(ls "$work/wheels" | grep -vE "$SKIP")
echo "== installing ${#wheels[@]} wheels into a 3.12 site-packages"
(cd "$work/wheels" && "$PY" -m pip install -q --no-deps --no-compile --target "$work/site" \
  "${TARGET[@]}" "${wheels[@]}")
rm -rf "$work/site/bin" "$work/site/ray/jars" "$work/site/ray/rllib" "$work/site/ray/tune" \
  "$work/site/ray/train" "$work/site/ray/data"
# NOTE: symbols only serve native stack traces; stripped, the site is ~35 MB smaller.
strip "$work/site/ray/core/src/ray/gcs/gcs_server" "$work/site/ray/core/src/ray/raylet/raylet"
find "$work/site" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
find "$work/site" -name '*.js.map' -delete
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
echo "== packing (xz, a few minutes)"
mkdir -p "$DEST"
rm -f "$DEST"/site312.tar.xz.part-* "$DEST"/site312.sha256
tar -C "$work/site" -cf - . | xz -T0 -9 | split -b "${PART_MB}M" - "$DEST/site312.tar.xz.part-"
(cd "$DEST" && sha256sum site312.tar.xz.part-* > site312.sha256)
du -ch "$DEST"/site312.tar.xz.part-* | tail -1
# NOTE: the GPU A/B serves a random-weight Llama with the default model's real tokenizer.
"$PY" - "$DEST/tokenizer" <<'PYEOF'
import shutil, sys
from pathlib import Path
from replicas.model_source import resolve_model_dir
src, dst = resolve_model_dir("default"), Path(sys.argv[1])
dst.mkdir(parents=True, exist_ok=True)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(src / name, dst / name)
PYEOF
tar -C "$DEST" -cJf "$DEST/tok.tar.xz" tokenizer
# NOTE: what the GPU tests and benchmarks pip-install there from local wheels (gpu_next.sh).
echo "== wheels for $DEST/extra (pytest, xxhash, sortedcontainers, psutil)"
rm -rf "$DEST/extra"
"$PY" -m pip download -q "${TARGET[@]}" -d "$DEST/extra" pytest xxhash sortedcontainers psutil \
  2> >(grep -v '^WARNING: Location' >&2)
echo "== done: carry $DEST to the GPU machine and source scripts/gpu_site.sh there"
