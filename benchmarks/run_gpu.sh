#!/usr/bin/env bash
# The GPU benchmark in one command: jlora on a Gemma-2-2B-shaped model against PEFT, keras-hub and
# a hand-written JAX step, each configuration in its own process (so each peak memory is its own).
#
# Usage, from the repository root of a clone on a one-GPU machine (benchmarks/README.md):
#   bash benchmarks/run_gpu.sh table        # the comparison: jlora r=4 q,v and r=16 all-linear, PEFT
#                                           # (torch.compile + sdpa), keras-hub (enable_lora) and the
#                                           # hand-written JAX step in both (about 520 s on an H200)
#   bash benchmarks/run_gpu.sh attribution  # jlora's benchmark model, one change at a time: the merge
#                                           # path, the plain loss, autodiff's RoPE gradient, XLA's
#                                           # dots remat policy (about 250 s)
#   bash benchmarks/run_gpu.sh ablations    # more same-model rows: remat policies, the loss
#                                           # formulation, jlora's fold, the scan layout, the full
#                                           # fine-tune, the matmul peak
#   bash benchmarks/run_gpu.sh profile      # the loss kernel's tiles, and both configurations with
#                                           # kernel profiles, XLA's memory analysis and the HLO
#   bash benchmarks/run_gpu.sh check        # the same-model check on the CPU (four implementations,
#                                           # one set of weights, one loss)
# Add --tiny to any phase for a dry run on the CPU (tiny model, seconds per job):
#   PY=.venv/bin/python bash benchmarks/run_gpu.sh table --tiny
#
# Needs the packages of benchmarks/requirements-gpu.txt. Where keras / keras-hub are not installed
# (the workplace's GPU image), their wheels in .whl/ (benchmarks/fetch_wheels.sh) are installed into
# /tmp/site for the keras-hub jobs only.
# Writes under $OUT (default runs/gpu): results.jsonl (one JSON row per configuration, and one per
# job with its exit status and wall time), table_<phase>.md (benchmarks/make_table.py's tables, for
# table and attribution), versions.json, log_<phase>.txt (everything printed), clocks_<phase>.csv
# (SM clock, power and throttle reasons every 250 ms), and for profile profiles.jsonl and the HLO.
# A job that would not finish inside BUDGET seconds (default 570) is skipped and recorded as such;
# the exit status is 1 when a job failed or a row of the table is missing.
set -u
PHASE=${1:-table}
TINY=0
[ "${2:-}" = "--tiny" ] && TINY=1
OUT=${OUT:-$PWD/runs/gpu}
STATE=${STATE:-$PWD/.cache/gpustate}  # ignored by git; survives between calls on a warm machine
BUDGET=${BUDGET:-570}
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
START=$(date +%s)
mkdir -p "$OUT" "$STATE"
RES=$OUT/results.jsonl
PROF=$OUT/profiles.jsonl
LOG=$OUT/log_$PHASE.txt
FAILED=0
export PYTHONUNBUFFERED=1 PEAK_TFLOPS=${PEAK_TFLOPS:-779}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export JAX_COMPILATION_CACHE_DIR=$STATE/jaxcache
ARGS=""
PEFT_COMPILE="--compile"
if (( TINY )); then
  ARGS="--tiny"
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  # torch.compile on a 2-core CPU takes about a minute per job: TINY_COMPILE=1 includes it.
  [ "${TINY_COMPILE:-0}" = 1 ] || PEFT_COMPILE=""
  BUDGET=100000
fi

# The card's clocks, power and throttle reasons through the whole call (read-only queries).
if (( ! TINY )) && command -v nvidia-smi >/dev/null; then
  CLOCK_Q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active
  nvidia-smi --query-gpu=$CLOCK_Q --format=csv >/dev/null 2>&1 || CLOCK_Q=${CLOCK_Q%,*}
  nvidia-smi --query-gpu=$CLOCK_Q --format=csv -lms 250 > "$OUT/clocks_$PHASE.csv" 2>/dev/null &
  CLOCKS_PID=$!
  trap 'kill $CLOCKS_PID 2>/dev/null' EXIT
fi

# Reads a process's output on stdin; every line that is a JSON object goes to $RES, tagged
# with the phase and the job's label.
tag_json() {
  "$PY" -c '
import json, sys
phase, label, res = sys.argv[1:4]
with open(res, "a") as f:
  for line in sys.stdin:
    line = line.strip()
    if line.startswith("{") and line.endswith("}"):
      try:
        row = json.loads(line)
      except ValueError:
        continue
      row["phase"], row["job"] = phase, label
      f.write(json.dumps(row) + "\n")
' "$@"
}

# job EST_S LIMIT_S LABEL CMD...: runs CMD unless it would overrun the budget.
job() {
  local est=$1 lim=$2 label=$3
  shift 3
  local now=$(( $(date +%s) - START ))
  if (( now + est > BUDGET )); then
    echo "### SKIP $label: elapsed ${now}s + estimate ${est}s > budget ${BUDGET}s" | tee -a "$LOG"
    echo "{\"phase\": \"$PHASE\", \"job\": \"$label\", \"skipped\": true}" >> "$RES"
    return
  fi
  echo "### RUN $label (elapsed ${now}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 10 "$lim" "$@" 2>&1 | tee -a "$LOG" | tag_json "$PHASE" "$label" "$RES"
  local rc=${PIPESTATUS[0]}
  local wall=$(( $(date +%s) - t0 ))
  echo "### END $label rc=$rc wall=${wall}s" | tee -a "$LOG"
  echo "{\"phase\": \"$PHASE\", \"job\": \"$label\", \"rc\": $rc, \"wall_s\": $wall}" >> "$RES"
  (( rc == 0 )) || FAILED=1
  cp "$RES" "$STATE/results_$PHASE.jsonl" 2>/dev/null || true
}

# keras and keras-hub: installed, or from the wheels in $WHEELS into /tmp/site (keras jobs only).
KERAS_PATH=""
keras_setup() {
  if KERAS_BACKEND=jax "$PY" -c "import keras_hub" >/dev/null 2>&1; then
    return
  fi
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl 2>&1 | tail -2 | tee -a "$LOG"
    KERAS_PATH=/tmp/site
  else
    echo "### keras-hub is not installed and $WHEELS/ holds no wheels (benchmarks/fetch_wheels.sh)" \
      | tee -a "$LOG"
  fi
}

versions() {
  env PYTHONPATH="$KERAS_PATH" "$PY" -c '
import json, platform, subprocess, sys
from importlib import metadata
names = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "flax",
         "optax", "orbax-checkpoint", "numpy", "torch", "triton", "transformers", "peft",
         "accelerate", "safetensors", "tokenizers", "huggingface_hub", "keras", "keras-hub",
         "namex", "optree", "h5py", "rich", "absl-py", "ml-dtypes", "packaging", "regex"]
v = {"python": platform.python_version()}
for n in names:
  try:
    v[n] = metadata.version(n)
  except metadata.PackageNotFoundError:
    pass
try:
  v["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                             "--format=csv,noheader"], capture_output=True, text=True,
                            timeout=20).stdout.strip()
except Exception:
  v["gpu"] = None
print(json.dumps(v))
' | tee "$OUT/versions.json" | tee -a "$LOG"
}

J="$PY benchmarks/gemma2_lora_gpu.py $ARGS"
HW="$PY benchmarks/baselines/jax_handwritten.py $ARGS"
PE="$PY benchmarks/baselines/peft_torch.py $ARGS"

# The comparison table (benchmarks/README.md): jlora's two configurations and the three baselines
# in both. jlora runs its defaults: remat wide_mid_xa, RoPE's gradient as one rotation, the fused
# loss with its Pallas pass. About 520 s on an H200.
phase_table() {
  keras_setup
  versions
  local KE="env PYTHONPATH=$KERAS_PATH KERAS_BACKEND=jax $PY benchmarks/baselines/keras_hub_lora.py $ARGS"
  job 45 200 jlora_qv4 $J qv4
  job 55 200 jlora_all16 $J all16
  job 125 300 peft_qv4 $PE qv4 $PEFT_COMPILE
  job 150 300 peft_all16 $PE all16 $PEFT_COMPILE
  job 60 200 keras_qv4 $KE qv4
  job 65 200 keras_all16 $KE all16
  job 30 120 handwritten_qv4 $HW qv4
  job 25 120 handwritten_all16 $HW all16
}

# The attribution table: jlora's benchmark model with one change at a time, in one call. What
# jlora's factored step is worth (the merge path instead), and what the benchmark model's own
# parts are worth (the plain loss, autodiff's RoPE gradient, XLA's dots remat policy instead).
# About 300 s on an H200.
phase_attribution() {
  versions
  job 45 200 jlora_qv4 $J qv4
  job 40 150 jlora_qv4_merge $J qv4_merge
  job 45 150 jlora_qv4_plainloss $J qv4 --chunk 0 --tag plainloss
  job 40 150 jlora_qv4_ropeautodiff $J qv4 --rope-autodiff --tag ropeautodiff
  job 40 150 jlora_qv4_dots $J qv4 --remat dots --tag dots
  job 55 200 jlora_all16 $J all16
  job 50 150 jlora_all16_merge $J all16_merge
}

# More A/B rows on the same model, one flag away from the table's jlora rows.
phase_ablations() {
  versions
  job 15 60 peak $J peak
  job 45 200 jlora_qv4 $J qv4
  job 40 150 jlora_qv4_wide $J qv4 --remat wide --tag wide
  job 40 150 jlora_qv4_names $J qv4 --remat names --tag names
  job 40 150 jlora_qv4_exploss $J qv4 --loss-math exp --tag exploss
  job 50 150 jlora_all16_plainloss $J all16 --chunk 0 --tag plainloss
  job 50 150 jlora_all16_nofold $J all16 --fold never --tag nofold
  job 50 150 jlora_all16_wide_xa $J all16 --remat wide_xa --tag wide_xa
  job 45 150 jlora_qv4_scan $J qv4 --layers scan --tag scan
  job 60 200 jlora_full $J full
}

# Where the time goes: the loss kernel's tiles, and the two table configurations with kernel
# summaries (profiles.jsonl), XLA's memory analysis and the compiled HLO.
phase_profile() {
  versions
  local KB="$PY benchmarks/softcap_kernel_bench.py"
  (( TINY )) && KB="$KB --rows 8 --vocab 4096 --calls 1 --rounds 1"
  job 60 150 softcap_kernel $KB
  job 90 200 jlora_qv4 $J qv4 --profile --profile-out "$PROF" --xla-analysis --hlo-out "$OUT/hlo_qv4.txt.gz"
  job 90 200 jlora_all16 $J all16 --profile --profile-out "$PROF" --xla-analysis --hlo-out "$OUT/hlo_all16.txt.gz"
}

# QLoRA (issue 17): jlora's all-linear r=16 step with a bf16 base and with an NF4 base (double
# quantization), and PEFT + bitsandbytes QLoRA beside it (../shared/bench/peft_variants_bench.py,
# copied to $SHARED_BENCH; bitsandbytes' wheel from $WHEELS/bnb into /tmp/bnb).
SHARED_BENCH=${SHARED_BENCH:-.bench/shared}
BNB_PATH=""
bnb_setup() {
  if "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then return; fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/bnb \
    "$WHEELS"/bnb/*.whl 2>&1 | tail -2 | tee -a "$LOG"
  BNB_PATH=/tmp/bnb
}
phase_qlora() {
  versions
  bnb_setup
  local PV="env PYTHONPATH=$BNB_PATH:$SHARED_BENCH $PY $SHARED_BENCH/peft_variants_bench.py"
  job 70 200 jlora_all16 $J all16 --xla-analysis
  job 80 200 jlora_all16_nf4 $J all16 --quantize nf4 --double-quant --xla-analysis --tag nf4
  job 80 200 jlora_all16_nf4_scan $J all16 --quantize nf4 --double-quant --layers scan \
    --xla-analysis --tag nf4_scan
  job 70 200 jlora_all16_scan $J all16 --layers scan --xla-analysis --tag scan
  (( TINY )) && return
  job 120 240 peft_qlora16_compile $PV qlora16_compile
  job 90 200 peft_qlora16_sdpa $PV qlora16_sdpa
}

# DoRA (issue 18) and many adapters in one batch (issue 19): jlora's all-linear r=16 step with
# LoRA and with DoRA, PEFT's DoRA (../shared/bench/peft_variants_bench.py, eager: its
# torch.compile did not finish compiling, PEERS.md); 16 stacked rank-8 adapters on a mixed batch
# against one adapter (forward and train step, q,v and all-linear), PEFT's mixed-batch forward
# with adapter_names, and KV-cache decode with 16 adapters against one.
phase_variants() {
  versions
  local PV="env PYTHONPATH=$SHARED_BENCH $PY $SHARED_BENCH/peft_variants_bench.py"
  local M="$PY benchmarks/multi_gpu.py"
  job 65 200 jlora_all16 $J all16
  job 75 200 jlora_all16_dora $J all16 --dora --tag dora
  job 60 150 jlora_multi_qv $M train qv $ARGS
  job 70 150 jlora_multi_all $M train all $ARGS
  job 70 150 jlora_decode $M decode $ARGS
  job 40 120 peft_multi $PY benchmarks/baselines/peft_multi.py $ARGS
  (( TINY )) && return
  job 60 150 peft_dora16_sdpa $PV dora16_sdpa
}

# QLoRA on 16 GB: the 8B-shaped model with an NF4 base under a 16 GB allocator cap.
phase_qlora16gb() {
  versions
  local SZ=${SIZES:-4x2048,8x2048,16x2048}
  (( TINY )) && SZ=2x32
  job 400 560 qlora_16gb $PY benchmarks/qlora_16gb.py $ARGS --sizes $SZ --out "$OUT/qlora_16gb.json"
}

# No abstraction tax (issue 20): one model written plainly (baselines/jax_handwritten.py), its LoRA
# inline against the same model through jlora, scanned and looped blocks, four remat policies, both
# configurations; a Flax NNX model (nnx_lora.py) against Flax's own LoRA; keras-hub's Gemma
# through jlora.keras.apply_fn against enable_lora. Each pair of rows runs on one GPU, one after
# the other; with GPUS=N the pairs are dealt over N GPUs, one copy of this script per GPU
# (SHARD=k), each writing under $OUT/gpuK. TAX_PARTS picks the parts (hw, nnx, keras) and
# TAX_LAYOUTS the hand-written model's layouts (scan, loop).
TAX_T="--warmup 2 --steps 6 --rounds 5"
PAIR=-1
pair() {  # the jobs after it, up to the next pair, run on GPU (pair index mod GPUS)
  PAIR=$(( PAIR + 1 ))
}
tjob() {
  (( PAIR % ${GPUS:-1} == ${SHARD:-0} )) && job "$@"
  return 0
}
phase_tax() {
  local parts=${TAX_PARTS:-hw nnx keras}
  if (( ${GPUS:-1} > 1 )) && [ -z "${SHARD:-}" ]; then
    versions
    local k pids=()
    for (( k = 0; k < GPUS; k++ )); do
      CUDA_VISIBLE_DEVICES=$k SHARD=$k OUT=$OUT/gpu$k bash "$0" tax ${2:-} >/dev/null 2>&1 &
      pids+=($!)
    done
    for k in "${pids[@]}"; do wait "$k" || FAILED=1; done
    cat "$OUT"/gpu*/results.jsonl >> "$RES"
    return
  fi
  (( ${GPUS:-1} > 1 )) || versions
  local T=$TAX_T
  (( TINY )) && T="--warmup 1 --steps 1 --rounds 2"
  local cfg lay rm impl
  if [[ " $parts " == *" hw "* ]]; then
    for lay in ${TAX_LAYOUTS:-scan loop}; do for cfg in qv4 all16; do for rm in dots names nothing none; do
      pair
      for impl in inline jlora; do
        tjob 45 150 hw_${cfg}_${lay}_${rm}_$impl $HW $cfg --impl $impl --layout $lay --remat $rm \
          --hlo-stats $T
      done
    done; done; done
    pair
    [[ " ${TAX_LAYOUTS:-scan} " == *" scan "* ]] && \
      tjob 45 150 hw_all16_scan_dots_jlora_nofold $HW all16 --impl jlora --fold never $T
  fi
  if [[ " $parts " == *" nnx "* ]]; then
    for rm in ${TAX_NNX_REMAT:-dots nothing none}; do for cfg in qv4 all16; do
      pair
      for impl in builtin jlora; do
        tjob 60 200 nnx_${cfg}_${rm}_$impl $PY benchmarks/nnx_lora.py $cfg --impl $impl \
          --remat $rm $ARGS $T
      done
    done; done
  fi
  if [[ " $parts " == *" keras "* ]]; then
    keras_setup
    local KE="env PYTHONPATH=$KERAS_PATH KERAS_BACKEND=jax $PY benchmarks/baselines/keras_hub_lora.py $ARGS"
    local hd=""
    for cfg in qv4 all16; do
      pair
      (( TINY )) && [ $cfg = all16 ] && hd="--head-dim 32"
      for impl in keras jlora; do
        tjob 70 200 keras_${cfg}_$impl $KE $cfg --impl $impl $hd $T
      done
    done
  fi
}

phase_check() {
  keras_setup
  job 120 300 same_model env PYTHONPATH=$KERAS_PATH KERAS_BACKEND=jax JAX_PLATFORMS=cpu \
    CUDA_VISIBLE_DEVICES="" "$PY" benchmarks/baselines/check_same_model.py
}

echo "### $(date -u) phase=$PHASE tiny=$TINY $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>/dev/null)" | tee -a "$LOG"
case "$PHASE" in
  table) phase_table ;;
  attribution) phase_attribution ;;
  ablations) phase_ablations ;;
  profile) phase_profile ;;
  check) phase_check ;;
  qlora) phase_qlora ;;
  qlora16gb) phase_qlora16gb ;;
  variants) phase_variants ;;
  tax) phase_tax "$@" ;;
  *) echo "usage: $0 table|attribution|ablations|profile|check|qlora|qlora16gb|variants|tax [--tiny]" >&2
     exit 2 ;;
esac
if [ "$PHASE" = table ] || [ "$PHASE" = attribution ]; then
  "$PY" benchmarks/make_table.py "$RES" --phase "$PHASE" --versions "$OUT/versions.json" \
    > "$OUT/table_$PHASE.md" || FAILED=1
  cat "$OUT/table_$PHASE.md" | tee -a "$LOG"
fi
echo "### done in $(( $(date +%s) - START ))s, failed=$FAILED" | tee -a "$LOG"
exit $FAILED
