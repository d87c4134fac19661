#!/usr/bin/env bash
# `make run`: serve TinyServe Cluster on this machine.
#   1. the venv is set up by make (target `run: $(STAMP)`); the project is installed into it
#      before Ray starts, so Serve can import cluster.router / replicas.deployment;
#   2. start a local Ray head (unless one is already running: then it is reused and left up);
#   3. `serve run deploy/app.yaml` (SmolLM2 on CPU, 2 replicas, the cache-aware router);
#   4. wait until the app answers, send one request, and print the curl line.
# Ctrl-C stops `serve run` (the app is torn down); the Ray head keeps running (`ray stop`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
APP_YAML="${APP_YAML:-deploy/app.yaml}"
HTTP="${HTTP:-http://127.0.0.1:8000}"
METRICS_PORT="${METRICS_PORT:-8080}"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

pip show -q tinyserve-cluster >/dev/null 2>&1 || pip install -q -e .
# NOTE: Ray enables token auth whenever ~/.ray/auth_token exists; say so explicitly so that
# `ray status` / `serve run` and the head agree (and make the token on a fresh machine).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ]; then ray get-auth-token --generate >/dev/null; fi

SERVE_PID=""
cleanup() {
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -INT "$SERVE_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 1; done
    kill -TERM "$SERVE_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

if ray status >/dev/null 2>&1; then
  echo "== using the running Ray cluster"
else
  echo "== starting a local Ray head (dashboard http://127.0.0.1:8265, metrics :$METRICS_PORT)"
  ray start --head --dashboard-host=127.0.0.1 --metrics-export-port="$METRICS_PORT" \
    >/tmp/tinyserve-ray-head.log 2>&1 || { cat /tmp/tinyserve-ray-head.log; exit 1; }
fi

echo "== serve run $APP_YAML (the first start converts the model once: ~1 min)"
serve run "$APP_YAML" &
SERVE_PID=$!

for _ in $(seq 600); do
  curl -sf "$HTTP/v1/models" >/dev/null 2>&1 && break
  sleep 1
done
curl -sf "$HTTP/v1/models" >/dev/null || { echo "the app did not come up"; exit 1; }

MODEL=$(curl -s "$HTTP/v1/models" | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
CURL="curl -s $HTTP/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Say hello in five words.\"}], \"max_tokens\": 16, \"temperature\": 0}'"
echo "== ready. Try:"
echo "$CURL"
eval "$CURL"
echo
echo "== OpenAI base URL: $HTTP/v1   Ray dashboard: http://127.0.0.1:8265"
echo "== Ctrl-C stops serving; \`ray stop\` then stops Ray."
wait "$SERVE_PID"
