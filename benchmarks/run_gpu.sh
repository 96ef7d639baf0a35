#!/usr/bin/env bash
# One-command GPU benchmark: jlora's Gemma-2-2B configurations and the three baselines,
# each configuration in its own process (so each peak memory is its own), sequentially.
#
# Usage, from the repository root on the GPU machine:
#   bash benchmarks/run_gpu.sh jlora       # matmul peak, jlora configs, hand-written JAX baseline
#   bash benchmarks/run_gpu.sh baselines   # PEFT (torch.compile + sdpa), keras-hub, jlora re-run
#   bash benchmarks/run_gpu.sh all         # both, one after the other
#   bash benchmarks/run_gpu.sh loop        # jlora with the blocks in a Python loop (jax 0.11)
#
# Expects the three baseline scripts (PEFT, keras-hub, hand-written JAX) in .bench/ and, for keras-hub,
# the keras / keras-hub / namex / optree wheels in .whl/ (installed into /tmp/site).
# Writes under $OUT (default runs/gpu): results.jsonl (one JSON row per configuration, tagged
# with its suite), profiles.jsonl (kernel-time summaries), log_<phase>.txt (everything printed).
# A job that would not finish inside BUDGET seconds (default 570) is skipped and recorded as such.
# benchmarks/README.md turns results.jsonl into the table (python benchmarks/gemma2_lora_gpu.py
# is the jlora driver; see its docstring for the configurations and the FLOP model).
set -u
PHASE=${1:-all}
OUT=${OUT:-$PWD/runs/gpu}
STATE=${STATE:-$PWD/.cache/gpustate}  # ignored: survives between calls on a warm machine
BUDGET=${BUDGET:-570}
PY=${PY:-python3}
START=$(date +%s)
mkdir -p "$OUT" "$STATE"
RES=$OUT/results.jsonl
PROF=$OUT/profiles.jsonl
LOG=$OUT/log_$PHASE.txt
export PYTHONUNBUFFERED=1 PEAK_TFLOPS=${PEAK_TFLOPS:-779}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export JAX_COMPILATION_CACHE_DIR=$STATE/jaxcache

# Reads a process's output on stdin; every line that is a JSON object goes to $RES tagged
# with the suite and the process label.
tag_json() {
  "$PY" -c '
import json, sys
suite, label, res = sys.argv[1:4]
with open(res, "a") as f:
  for line in sys.stdin:
    line = line.strip()
    if line.startswith("{") and line.endswith("}"):
      try:
        row = json.loads(line)
      except ValueError:
        continue
      row.setdefault("suite", suite)
      row["process"] = label
      f.write(json.dumps(row) + "\n")
' "$@"
}

# job EST_S LIMIT_S SUITE LABEL CMD...: run CMD unless it would overrun the budget.
job() {
  local est=$1 lim=$2 suite=$3 label=$4
  shift 4
  local now=$(( $(date +%s) - START ))
  if (( now + est > BUDGET )); then
    echo "### SKIP $label: elapsed ${now}s + estimate ${est}s > budget ${BUDGET}s" | tee -a "$LOG"
    echo "{\"suite\": \"$suite\", \"process\": \"$label\", \"skipped\": true}" >> "$RES"
    return
  fi
  echo "### RUN $label (elapsed ${now}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 10 "$lim" "$@" 2>&1 | tee -a "$LOG" | tag_json "$suite" "$label" "$RES"
  local rc=${PIPESTATUS[0]}
  echo "### END $label rc=$rc wall=$(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  if (( rc != 0 )); then
    echo "{\"suite\": \"$suite\", \"process\": \"$label\", \"rc\": $rc}" >> "$RES"
  fi
  cp "$RES" "$STATE/results_$PHASE.jsonl" 2>/dev/null || true
}

J="$PY benchmarks/gemma2_lora_gpu.py ${JLORA_ARGS:-}"  # JLORA_ARGS: e.g. "--tiny" for a dry run
HW="$PY .bench/jax_gemma2_handwritten.py"

# The remat policy that ran fastest for CONFIG in an earlier phase on this machine (default names).
best_remat() {
  "$PY" -c '
import json, sys
best = None
try:
  for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("suite") == "jlora" and r.get("config") == sys.argv[2] and r.get("tokens_s") \
        and r.get("loss_chunk", 0) > 0 and (best is None or r["tokens_s"] > best["tokens_s"]):
      best = r
except OSError:
  pass
print(best["remat"] if best else "names")
' "$STATE/results_jlora.jsonl" "$1"
}

phase_jlora() {
  echo "### $(date -u) $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>/dev/null)" | tee -a "$LOG"
  "$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)' 2>&1 | tee -a "$LOG"
  job 30 120 jlora peak $J peak
  job 80 240 jlora qv4_names $J qv4 --layers scan --remat names --profile --profile-out "$PROF"
  job 80 240 jlora all16_names $J all16 --layers scan --remat names --profile --profile-out "$PROF"
  job 70 240 handwritten hw_qv4_fact env REMAT=dots $HW qv4_fact
  job 70 240 handwritten hw_all16_fact env REMAT=dots $HW all16_fact
  job 70 200 jlora qv4_dots $J qv4 --layers scan --remat dots --tag dots
  job 70 200 jlora all16_dots $J all16 --layers scan --remat dots --tag dots
  job 70 200 jlora full $J full --layers scan --remat names
  job 70 200 jlora qv4_merge $J qv4_merge --layers scan --remat names
  job 70 200 jlora qv4_plainloss $J qv4 --layers scan --remat names --chunk 0 --tag plainloss
  job 70 200 jlora qv4_chunk2048 $J qv4 --layers scan --remat names --chunk 2048 --tag chunk2048
}

phase_baselines() {
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl 2>&1 | tail -2 | tee -a "$LOG"
  fi
  local KE="env PYTHONPATH=/tmp/site KERAS_BACKEND=jax $PY .bench/keras_gemma2_bench.py"
  local PE="$PY .bench/peft_gemma2_bench.py"
  job 150 300 peft peft_qv4_compile $PE qv4_compile
  job 150 300 keras keras_qv4 $KE qv4
  job 150 300 peft peft_all16_compile $PE all16_compile
  job 150 300 keras keras_all16 $KE all16
  local rq=$(best_remat qv4) ra=$(best_remat all16)
  job 60 200 jlora qv4_rerun $J qv4 --remat "$rq" --tag "rerun_$rq"
  job 60 200 jlora all16_rerun $J all16 --remat "$ra" --tag "rerun_$ra"
}

# jlora with the blocks in a Python loop over the stacked weights (jax 0.11 changed the scan
# primitive's parameters, which jlora.lora's scan rule reads), next to the hand-written anchor
# and keras-hub.
phase_loop() {
  job 30 120 handwritten hw_qv4_fact env REMAT=dots $HW qv4_fact
  job 100 200 jlora qv4_loop $J qv4 --layers loop --remat names --tag loop --profile --profile-out "$PROF"
  job 100 200 jlora all16_loop $J all16 --layers loop --remat names --tag loop --profile --profile-out "$PROF"
  job 25 120 handwritten hw_all16_fact env REMAT=dots $HW all16_fact
  job 90 180 jlora qv4_loop_dots $J qv4 --layers loop --remat dots --tag loop_dots
  job 90 180 jlora all16_loop_dots $J all16 --layers loop --remat dots --tag loop_dots
  local KE="env PYTHONPATH=/tmp/site KERAS_BACKEND=jax $PY .bench/keras_gemma2_bench.py"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2
  job 50 100 keras keras_qv4 $KE qv4
  job 60 100 keras keras_all16 $KE all16
  job 20 60 jlora peak $J peak
}

case "$PHASE" in
  jlora) phase_jlora ;;
  baselines) phase_baselines ;;
  loop) phase_loop ;;
  all) BUDGET=${BUDGET_ALL:-100000}; phase_jlora; phase_baselines ;;
  *) echo "usage: $0 jlora|baselines|all" >&2; exit 2 ;;
esac
echo "### done in $(( $(date +%s) - START ))s" | tee -a "$LOG"
