#!/usr/bin/env bash
# The next GPU batch (issues 16 and 19), one or more parts per device command (< 600 s), run from
# the repo root on the GPU machine with the Ray site carried:
#   carry: .whl/site312.tar.xz.part-aa .whl/site312.tar.xz.part-ab .whl/site312.sha256
#          .whl/extra .whl/tok.tar.xz          (scripts/gpu_wheelhouse.sh builds them)
#   scripts/gpu_next.sh serve     # HAProxy mode, 4 ingress replicas, outputs over the socket, the full 1B grid (~300 s)
#   scripts/gpu_next.sh c1        # the process core's CUDA test; c=1 TTFT, completions and chat (~300 s)
#   scripts/gpu_next.sh 8b        # the random 8B, completions, c = 1/16/64/256, process core (~500 s;
#                                 # T8B: its timeout, C8B: the concurrencies, TAG: a name suffix,
#                                 # SENV: more KEY=VALUE for the Serve cluster's environment,
#                                 # APP: the app args JSON, e.g. '{"ingress_num_replicas": 4,
#                                 # "serve_main_loop": false}' for Serve's loop layout)
#   scripts/gpu_next.sh early     # the early start vs Serve's call alone, random 8B, c=1, alternated (~450 s)
#   scripts/gpu_next.sh loops1b   # 1B completions grid: defaults vs the LLM replicas on their main loops (~400 s)
#   scripts/gpu_next.sh chat1b    # the chat endpoint, random 1B, this build's defaults (~200 s)
#   scripts/gpu_next.sh c1_8b     # random 8B, c=1, both endpoints: this build's defaults, then the
#                                 # LLM replicas on their main loops (~350 s)
#   scripts/gpu_next.sh warmab    # 1B completions c = 64/256, defaults: the served cells warmed or not,
#                                 # two runs on one host, the host's CPU logged (~300 s)
#   scripts/gpu_next.sh c1rounds  # 1B c=1 completions: defaults vs llm-main alternated twice (~240 s)
#   scripts/gpu_next.sh ingress8  # 1B completions c = 64/256: 4 vs 8 ingress replicas, CPU by role (~330 s)
#   scripts/gpu_next.sh nice0     # 1B completions c = 64/256: Ray's niceness 15 vs the app's replicas
#                                 # at 0 vs the engine core alone at 0 (~450 s)
#   scripts/gpu_next.sh nice0c1   # 1B c=1 completions: the same three, alternated twice (~400 s)
#   scripts/gpu_next.sh core1     # 1B c=1 completions streamed: the core's own TTFT alone vs in the app (~100 s)
#   scripts/gpu_next.sh tok       # the prompt encode: wrapper, whole, in pieces (~20 s)
#   scripts/gpu_next.sh tput      # RAY_SERVE_THROUGHPUT_OPTIMIZED on vs off, completions (~300 s)
#   scripts/gpu_next.sh wave      # c=16/64: the arrival wave's hops with the loops' lag sampled (~250 s)
#   scripts/gpu_next.sh selector  # selection processes N = 1/2/4 over the fast lane, pinned; a bare
#                                 # gRPC server's work; the answer in process (~400 s; PROCS=1 ~150 s)
#   scripts/gpu_ab_run.sh ...     # the routing A/B's further seeds: benchmarks/results/gpu_ab/README.md
# NOTE: since session 18 serve_overhead warms each served cell with an unmeasured run on a GPU
# (--warm-pass): parts measured before then take ~1.3x the times above (their T* bound them).
# Several parts run one after another in one machine start, e.g. (~550 s; machines are scarce):
#   PROCS=1 T8B=380 scripts/gpu_next.sh selector 8b
# Results land in $OUT (JSON + markdown); copy them to benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${1:?usage: scripts/gpu_next.sh PART... (serve|c1|8b|early|loops1b|chat1b|c1_8b|warmab|c1rounds|ingress8|nice0|nice0c1|core1|tok|tput|wave|selector), one after another}"
# shellcheck disable=SC1091
. scripts/gpu_site.sh || exit 1
python3 -m pip install -q --no-index --find-links .whl/extra pytest xxhash sortedcontainers psutil >/dev/null 2>&1
tar -C .whl -xJf .whl/tok.tar.xz
export PYTHONPATH=".:$PYTHONPATH" PYTHONUNBUFFERED=1
drain=RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0
# NOTE: the result files are named by the GPU the machine has (a call may land on an H200)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | awk '{print tolower($2)}')
gpu=${gpu:-gpu}
# The random 1B or 8B ($1: 1b or 8b), completions and chat unless the args say, process core,
# HAProxy, 4 ingress replicas; $2 the timeout, $3 names the JSON and log, the rest are
# serve_overhead's arguments (endpoints, concurrency, modes, requests, variants).
run_model() {
  local size=$1 limit=$2 tag=$3; shift 3
  timeout "$limit" python3 benchmarks/serve_overhead.py --model "random-$size" --haproxy \
    --engine-process on --app-args '{"ingress_num_replicas": 4}' --serve-env "$drain" \
    --json "$OUT/serve_overhead_${gpu}_${size}_$tag.json" "$@" \
    > "$OUT/serve_overhead_${size}_$tag.log" 2>&1
  grep -E "tok/s|^total|^wrote" "$OUT/serve_overhead_${size}_$tag.log"
}
# The host's CPU, kernel and load before a run (the path's margin follows the host's per-core
# speed: serve_overhead_notes.md, session 21).
host_cpu() {
  { grep -m1 'model name' /proc/cpuinfo; nproc; uname -r; uptime; } | tee "$OUT/host_cpu.txt"
}
for part in "$@"; do
case "$part" in
  serve)
    timeout 560 python3 benchmarks/serve_overhead.py --model random-1b --haproxy \
      --app-args '{"ingress_num_replicas": 4}' --serve-env "$drain" \
      --json "$OUT/serve_overhead_${gpu}_1b_haproxy4_socket.json" ;;
  c1)
    # NOTE: first the process core's CUDA test (session 12: the replica <-> core link is a
    # socket pair, replicas/engine_core_pipe.py); then c=1 TTFT, completions and chat, 4
    # ingress replicas, process core (session 11: the ingress's batch-encode fast path).
    timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/replicas/test_engine_process.py 2>&1 | tail -3
    timeout 560 python3 benchmarks/serve_overhead.py --model random-1b --haproxy \
      --concurrency 1 --min-requests 16 --engine-process on --endpoints completions chat \
      --app-args '{"ingress_num_replicas": 4}' --serve-env "$drain" \
      --json "$OUT/serve_overhead_${gpu}_1b_c1.json" ;;
  8b)
    # NOTE: the random 8B, completions, every concurrency (session 13: a run cut at 400 s
    # printed nothing usable; serve_overhead now writes its JSON after every run, and the log
    # goes to $OUT). The engine side makes an unmeasured pass per concurrency on a GPU.
    timeout "${T8B:-580}" python3 benchmarks/serve_overhead.py --model random-8b --haproxy \
      --endpoints completions --engine-process on \
      --app-args "${APP:-{\"ingress_num_replicas\": 4\}}" \
      --concurrency ${C8B:-1 16 64 256} \
      --serve-env "$drain" ${SENV:-} --json "$OUT/serve_overhead_${gpu}_8b_haproxy4${TAG:-}.json" \
      > "$OUT/serve_overhead_8b${TAG:-}.log" 2>&1
    grep -E "tok/s|^total|^wrote" "$OUT/serve_overhead_8b${TAG:-}.log" ;;
  early)
    # NOTE: session 17: the early start (replicas/early_start.py) against Serve's call alone,
    # random 8B, c=1, streamed completions; the two passes alternate twice after one engine run
    run_model 8b "${T8B:-560}" c1_early --concurrency 1 --endpoints completions --modes stream \
      --min-requests 20 --variant 'no-early={"early_start": false}' --variant-rounds 2 ;;
  loops1b)
    # NOTE: session 18: the LLM replicas alone on their main loops ("llm"), against this build's
    # defaults (Serve's layout), the 1B completions grid: what c1_8b's llm-main costs or gives
    # at c >= 16 (session 17's main-loop loss there was put on the ingress's loop, not measured
    # per deployment; its run of this part, split-always and threads: 877d100)
    run_model 1b 580 llm_main --endpoints completions \
      --variant 'llm-main={"serve_main_loop": "llm"}' ;;
  chat1b)
    # NOTE: session 17-18: the chat endpoint at this build's defaults (Serve's loops, early start,
    # split only while idle), random 1B; T1B bounds it (the JSON is written after every run)
    run_model 1b "${T1B:-400}" chat_s18 --endpoints chat ;;
  c1_8b)
    # NOTE: session 18: the 8B at c=1 on this build's defaults (Serve's loop layout, the early
    # start) read +11.5 / +13.2 ms over the engine's TTFT (completions), with the replica's engine
    # TTFT 2-4 ms above the engine's own; session 17's main loops read +4.8 / +5.9 on another
    # host. Both endpoints, then the LLM replicas alone on their main loops, on one host.
    run_model 8b "${T8B:-560}" c1_s19 --concurrency 1 --endpoints completions chat \
      --min-requests 12 --variant 'llm-main={"serve_main_loop": "llm"}' ;;
  warmab)
    # NOTE: session 19: the 1B grid at defaults read 0.72-0.84 at c = 64/256 (its served cells
    # warmed, new in session 18) against 0.91-1.04 in session 17 (not warmed, another host);
    # the thread engine lost 20-30% in the same run, so the host is the first suspect. Same host,
    # warm pass off then on, and the CPU it has.
    host_cpu
    for w in off on; do
      run_model 1b 175 "warm_$w" --endpoints completions --concurrency 64 256 --warm-pass $w
      ray stop --force >/dev/null 2>&1
    done ;;
  c1rounds)
    # NOTE: session 19: the replica's own engine TTFT (inside the engine core's process) read
    # 2-6 ms above its other cells in the first streamed cell of one pass, the defaults' on the
    # 8B and llm-main's on the 1B: layout or noise? Alternated passes on one host say; each
    # served cell's JSON row carries every request's engine TTFT in send order (engine_ttft_ms).
    run_model 1b "${T1B:-250}" c1_rounds --endpoints completions --concurrency 1 --min-requests 16 \
      --variant 'llm-main={"serve_main_loop": "llm"}' --variant-rounds 2 ;;
  ingress8)
    # NOTE: session 19: on the v1272 host kind every CPU hop of the path at c=64 took 2-3x
    # session 17's. Is an ingress process the bound (its busiest process near one core), and
    # do 8 ingress replicas instead of 4 lift c = 64/256? Each served run's CPU by role and the
    # host's busy fraction are in the JSON (--cpu-roles, on by default).
    host_cpu
    run_model 1b "${T1B:-330}" ingress8 --endpoints completions --concurrency 64 256 \
      --variant 'ing8={"ingress_num_replicas": 8}' ;;
  nice0)
    # NOTE: session 20 (H200, v1294 host): at c = 64/256 the host was 19-28% busy, no ingress
    # process above 0.31 cores, 8 ingress replicas no better than 4; the busiest process was the
    # replica's engine core (0.75-0.91 cores), which in the app runs at Ray's niceness 15
    # (inherited), alone at 0. On a host where a wave's client processes, tokenizer threads
    # and ingress loops contend, does the engine core at 0 give back the c >= 64 gap?
    # Session 21 (v1272 H100, 15-20% busy): no setting moved beyond the spread (0.95-1.01).
    host_cpu
    # core0: the engine core's process alone at 0 (EngineConfig.core_niceness), HAProxy and
    # the replicas left at 15 (the replicas at 0 crowd HAProxy out on the CPU box).
    run_model 1b "${T1B:-450}" nice0 --endpoints completions --concurrency 64 256 \
      --variant 'nice0={"niceness": 0}' 'core0={"engine": {"core_niceness": 0}}' ;;
  nice0c1)
    # NOTE: session 20: at c=1 the replica's own engine TTFT scatters 10-24 ms request by
    # request (the engine alone, same core: 16.6 p50, 17.1 p99 at its client). The app's core runs at
    # nice 15; does it scatter at 0?
    run_model 1b "${T1B:-400}" c1_nice0 --endpoints completions --concurrency 1 --min-requests 16 \
      --variant 'nice0={"niceness": 0}' 'core0={"engine": {"core_niceness": 0}}' \
      --variant-rounds 2 ;;
  core1)
    # NOTE: the shortest look at the engine core's own TTFT alone vs in the app (the markdown's
    # last table; session 20): 1B, c=1, completions streamed, defaults (~100 s)
    run_model 1b "${T1B:-110}" core1 --endpoints completions --modes stream --concurrency 1 \
      --min-requests 16 ;;
  tok)
    timeout 120 python3 benchmarks/tokenize_cost.py --tokenizer .whl/tokenizer \
      --tokens 256 1024 4096 --json "$OUT/tokenize_cost_h100host.json" ;;
  tput)
    # NOTE: Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED (gRPC between deployments, the router in the
    # replica's loop, user code on the main loop) against the defaults, one machine, same build.
    for opt in 1 0; do
      timeout 270 python3 benchmarks/serve_overhead.py --model random-1b --haproxy \
        --endpoints completions --engine-process on --app-args '{"ingress_num_replicas": 4}' \
        --serve-env "$drain" "RAY_SERVE_THROUGHPUT_OPTIMIZED=$opt" \
        --json "$OUT/serve_overhead_${gpu}_1b_haproxy4_tput$opt.json"
      ray stop --force >/dev/null 2>&1
    done ;;
  wave)
    # NOTE: where c=16/64 lose 15% (run8b: client -> ingress 27-34 ms, replica queue 5-12 ms):
    # the ingress's and replica's loop lag around those stamps says whether the hop waited on
    # our loops or before them (HAProxy, uvicorn, Serve's dispatch); client processes c/4.
    timeout 560 python3 benchmarks/serve_overhead.py --model random-1b --haproxy \
      --endpoints completions --concurrency 16 64 --engine-process on --loop-lag 2 \
      --app-args '{"ingress_num_replicas": 4}' --serve-env "$drain" \
      --json "$OUT/serve_overhead_${gpu}_1b_wave.json" ;;
  selector)
    # NOTE: then what a bare grpc.aio handler pays for on this host (sizes, its work, work
    # after the answer: the ninth pass's premise), 45 us of work ~ a Select's answer there
    timeout 420 python3 benchmarks/selector_bench.py --replicas 256 --procs ${PROCS:-1 2 4} \
      --client-procs 8 --scaling-front lane --pin --json "$OUT/selector_h100host_lane.json"
    timeout 120 python3 benchmarks/grpc_after_answer.py --work-us 45 \
      --json "$OUT/grpc_after_answer_h100host.json" | tail -7
    # NOTE: the answer in process on this host, hot and cold (the server's 47 us against it)
    timeout 240 python3 benchmarks/selector_select_profile.py --replicas 256 --rate 2500 \
      --defer --json "$OUT/selector_profile_h100host.json" | tail -12 ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
ray stop --force >/dev/null 2>&1
done
