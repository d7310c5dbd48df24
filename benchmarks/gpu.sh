#!/usr/bin/env bash
# The accelerator benchmark set, in one command (about 6-8 minutes on one H100/H200-class GPU):
#
#     bash benchmarks/gpu.sh            # installs the project if needed, then appends rows to benchmarks/results.*
#     SMOKE=1 bash benchmarks/gpu.sh    # tiny shapes, to check the script itself on a CPU (rows not recorded)
#
# Every step runs under its own time limit, so one slow step leaves the others' rows; each row
# carries the device name. The set:
#   1. gated vs plain forward, GPT-2 small shape, 200 x 16 tokens: q/k/v-split edges, node gates; fp32 and bf16
#   2. EAP over all 32,491 edges on an IOI-shaped batch of 200 prompts x 16 tokens; fp32 and bf16
#   3. ACDC on GPT-2 small, 200 prompts, threshold 1% of the ablated KL: a timed 120 s sample of the
#      search, extrapolated to every edge tested once (an upper bound), and the whole run on the
#      2-layer GPT-2-width model
#   4. the largest vmap over gate configurations: 4,096 and 16,384 configurations of GPT-2 small, one prompt
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
if ! "$PY" -c "import acdc_jax, jax" 2>/dev/null; then
    "$PY" -m pip install -q -e ".[test]" || exit 1
fi
"$PY" -c "import jax; print('devices:', jax.devices())"

if [[ -n "${SMOKE:-}" ]]; then
    export ACDC_JAX_BENCH_DRY=1
    PROMPTS=4; LAYERS=2; BUDGET=5; CONFIGS=8; SIZE=gpt2
else
    PROMPTS=200; LAYERS=12; BUDGET=120; CONFIGS=4096; SIZE=gpt2
fi

failed=0
step() {  # step SECONDS ARGS...: one benchmark under a time limit
    local limit=$1; shift
    echo "== $* (limit ${limit}s)"
    if ! timeout "$limit" "$PY" -m "$@"; then
        echo "!! failed or timed out: $*"; failed=1
    fi
}

for dtype in float32 bfloat16; do
    step 90 benchmarks.forward_throughput --size $SIZE --batch $PROMPTS --pos 16 --dtype $dtype
    step 90 benchmarks.eap_speed --size $SIZE --prompts $PROMPTS --pos 16 --dtype $dtype --no-dense
done
step 60 benchmarks.forward_throughput --size $SIZE --batch $PROMPTS --pos 16 --level node
step 150 benchmarks.eap_speed --size $SIZE --prompts 8 --pos 15         # with the dense-read comparison
step $((BUDGET + 60)) benchmarks.acdc_speed --layers $LAYERS --prompts $PROMPTS --pos 16 --time-budget $BUDGET
step 90 benchmarks.acdc_speed --layers 2 --prompts $PROMPTS --pos 16
step 90 benchmarks.vmap_capacity --configs $CONFIGS --prompts 1 --pos 16
[[ -z "${SMOKE:-}" ]] && step 120 benchmarks.vmap_capacity --configs 16384 --prompts 1 --pos 16

if [[ -n "${SMOKE:-}" ]]; then echo "smoke run: nothing recorded"; else echo "rows appended to benchmarks/results.jsonl and benchmarks/results.md"; fi
exit $failed
