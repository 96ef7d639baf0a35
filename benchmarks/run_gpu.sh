#!/usr/bin/env bash
# One-command GPU benchmark: jlora's Gemma-2-2B configurations and the three baselines,
# each configuration in its own process (so each peak memory is its own), sequentially.
#
# Usage, from the repository root on the GPU machine:
#   bash benchmarks/run_gpu.sh final     # the comparison: jlora q,v and all-linear, PEFT
#                                        # (torch.compile + sdpa), keras-hub and the hand-written
#                                        # JAX step, all in one call
#   bash benchmarks/run_gpu.sh jlora     # more jlora rows: merge path, full fine-tune, remat and
#                                        # loss variants, the scan layout
#   bash benchmarks/run_gpu.sh explore   # layer layouts and XLA options, with kernel profiles and
#                                        # the compiled HLO
#   bash benchmarks/run_gpu.sh tune      # the two final configurations with profiles, and A/B
#                                        # rows: loss formulation, jlora's fold, remat policies
#   bash benchmarks/run_gpu.sh loss      # the loss formulations side by side on q,v
#   bash benchmarks/run_gpu.sh probe     # the loss kernel's tiles (softcap_kernel_bench.py), q,v
#                                        # profiled with its HLO, fold and GEMM-emitter A/B rows
#   bash benchmarks/run_gpu.sh ab        # A/B rows: RoPE's gradient, remat policies, fold rule
#   bash benchmarks/run_gpu.sh all       # final, then jlora
#
# Expects the three baseline scripts (PEFT, keras-hub, hand-written JAX) in .bench/ and, for keras-hub,
# the keras / keras-hub / namex / optree wheels in .whl/ (installed into /tmp/site).
# Writes under $OUT (default runs/gpu): results.jsonl (one JSON row per configuration, tagged
# with its suite), profiles.jsonl (kernel-time summaries), log_<phase>.txt (everything printed),
# clocks_<phase>.csv (SM clock, power, temperature and throttle reasons every 250 ms).
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

# The card's clocks, power and throttle reasons through the whole call (read-only queries).
CLOCK_Q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active
nvidia-smi --query-gpu=$CLOCK_Q --format=csv >/dev/null 2>&1 || CLOCK_Q=${CLOCK_Q%,*}
nvidia-smi --query-gpu=$CLOCK_Q --format=csv -lms 250 > "$OUT/clocks_$PHASE.csv" 2>/dev/null &
CLOCKS_PID=$!
trap 'kill $CLOCKS_PID 2>/dev/null' EXIT

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

gpu_line() {
  echo "### $(date -u) $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>/dev/null)" | tee -a "$LOG"
}

# More jlora rows (unstacked blocks unless named): the merge path, the full fine-tune, the `dots`,
# `wide` and `_xa` remat policies, the loss-chunk variants, and the scan layout.
phase_jlora() {
  gpu_line
  job 20 60 jlora peak $J peak
  job 60 200 jlora qv4_merge $J qv4_merge --tag merge
  job 60 200 jlora full $J full --tag full
  job 60 200 jlora qv4_dots $J qv4 --remat dots --tag dots
  job 60 200 jlora all16_dots $J all16 --remat dots --tag dots
  job 60 200 jlora qv4_wide $J qv4 --remat wide --tag wide
  job 60 200 jlora qv4_names_xa $J qv4 --remat names_xa --tag names_xa
  job 60 200 jlora all16_wide_xa $J all16 --remat wide_xa --tag wide_xa
  job 60 200 jlora qv4_plainloss $J qv4 --chunk 0 --tag plainloss
  job 60 200 jlora qv4_chunk2048 $J qv4 --chunk 2048 --tag chunk2048
  job 40 150 jlora qv4_scan $J qv4 --layers scan --tag scan
  job 40 150 jlora all16_scan $J all16 --layers scan --remat wide --tag scan
}

# Layer layouts and XLA options for the jlora steps, with kernel profiles and the compiled HLO.
phase_explore() {
  local U="--layers unstacked" S="--layers scan"
  gpu_line
  job 20 60 jlora peak $J peak
  job 40 150 jlora qv4_scan $J qv4 $S --tag scan --profile --profile-out "$PROF" --hlo-out "$OUT/hlo_qv4_scan.txt.gz"
  job 80 200 jlora qv4_unstacked $J qv4 $U --tag unstacked --profile --profile-out "$PROF" --hlo-out "$OUT/hlo_qv4_unstacked.txt.gz"
  job 80 200 jlora all16_unstacked $J all16 $U --tag unstacked --profile --profile-out "$PROF" --hlo-out "$OUT/hlo_all16_unstacked.txt.gz"
  job 40 150 jlora all16_scan $J all16 $S --tag scan --profile --profile-out "$PROF"
  job 40 150 jlora qv4_scan_fullunroll env XLA_FLAGS=--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL $J qv4 $S --tag scan_xlaunroll
  job 70 150 jlora qv4_unstacked_heroless env XLA_FLAGS=--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true $J qv4 $U --tag unstacked_heroless
  job 70 150 jlora qv4_unstacked_lhs env XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true $J qv4 $U --tag unstacked_lhs
  job 40 150 jlora qv4_scan_cmdbuf_while env XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL $J qv4 $S --tag scan_cmdbuf_while
  job 45 150 jlora qv4_unstacked_nograph env XLA_FLAGS=--xla_gpu_enable_command_buffer= $J qv4 $U --tag unstacked_nograph
  job 30 120 handwritten hw_qv4_fact env REMAT=dots $HW qv4_fact
}

# The two final configurations with kernel profiles, then A/B rows: the loss's soft-cap terms
# through tanh and divisions (the previous formulation), jlora.lora's fold of x·W + t·B into one
# matmul off or everywhere the layout allows, and remat policies that keep more.
phase_tune() {
  gpu_line
  job 15 60 jlora peak $J peak
  job 70 200 jlora qv4_names $J qv4 --remat names --tag names --profile --profile-out "$PROF"
  job 70 200 jlora all16_wide_xa $J all16 --remat wide_xa --tag wide_xa --profile --profile-out "$PROF"
  job 35 200 jlora qv4_names_tanhloss $J qv4 --remat names --loss-math tanh --tag names_tanhloss
  job 40 200 jlora all16_wide_xa_nofold $J all16 --remat wide_xa --fold never --tag wide_xa_nofold
  job 40 200 jlora all16_wide_xa_foldall $J all16 --remat wide_xa --fold always --tag wide_xa_foldall
  job 35 200 jlora qv4_wide $J qv4 --remat wide --tag wide
  job 35 200 jlora qv4_names_xa $J qv4 --remat names_xa --tag names_xa
  job 40 200 jlora all16_names_xa $J all16 --remat names_xa --tag names_xa
  job 35 200 jlora qv4_wide_xa $J qv4 --remat wide_xa --tag wide_xa
}

# The loss formulations side by side on q,v (remat wide): the soft-cap terms in one Pallas pass
# (profiled) or two XLA passes, each also with one 8192-token chunk and XLA's dot merger off.
phase_loss() {
  local NOMERGE="env XLA_FLAGS=--xla_gpu_dot_merger_threshold_mb=0"
  gpu_line
  job 100 200 jlora qv4_pallas $J qv4 --remat wide --loss-math pallas --tag pallas --profile --profile-out "$PROF"
  job 35 120 jlora qv4_exp $J qv4 --remat wide --loss-math exp --tag exp
  job 35 120 jlora qv4_pallas_8192_nomerge $NOMERGE $J qv4 --remat wide --loss-math pallas --chunk 8192 --tag pallas_8192_nomerge
  job 35 120 jlora qv4_exp_8192_nomerge $NOMERGE $J qv4 --remat wide --loss-math exp --chunk 8192 --tag exp_8192_nomerge
}

# The loss kernel's tiles and warps against XLA and the copy ceiling; q,v (the final
# configuration) profiled with its compiled HLO; A/B rows: jlora's fold by the byte count alone
# (it then also folds q_proj, and o_proj for all-linear) and XLA's Triton GEMM emitter off (the
# skinny adapter matmuls through cuBLAS).
phase_probe() {
  gpu_line
  job 60 150 kernel softcap_kernel "$PY" benchmarks/softcap_kernel_bench.py ${KERNEL_ARGS:-}
  job 100 200 jlora qv4 $J qv4 --remat wide --loss-math pallas --tag probe --profile --profile-out "$PROF" --hlo-out "$OUT/hlo_qv4.txt.gz"
  job 40 150 jlora qv4_foldbytes $J qv4 --remat wide --loss-math pallas --fold bytes --tag foldbytes
  job 40 150 jlora qv4_notritongemm env XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $J qv4 --remat wide --loss-math pallas --tag notritongemm
  job 45 150 jlora all16_foldbytes $J all16 --remat wide_xa --loss-math pallas --fold bytes --tag foldbytes
  job 40 150 jlora qv4_again $J qv4 --remat wide --loss-math pallas --tag probe_again
}

# A/B rows on one machine: RoPE's gradient (autodiff or one inverse rotation), the remat
# policies that also keep jlora's x·a (_xa) and the residual stream and norm statistics (wide_mid),
# jlora's fold by the byte count; the first configuration again at the end, for the spread.
phase_ab() {
  local Q="$J qv4 --loss-math pallas --long-round 20" A="$J all16 --loss-math pallas --long-round 20"
  gpu_line
  job 100 200 jlora qv4_wide_ropead $Q --remat wide --rope-autodiff --tag wide_ropead
  job 40 150 jlora qv4_wide $Q --remat wide --tag wide
  job 40 150 jlora qv4_wide_xa $Q --remat wide_xa --tag wide_xa
  job 40 150 jlora qv4_wide_mid $Q --remat wide_mid --tag wide_mid
  job 60 150 jlora qv4_wide_mid_xa $Q --remat wide_mid_xa --tag wide_mid_xa --profile --profile-out "$PROF"
  job 40 150 jlora qv4_wide_mid_xa_foldbytes $Q --remat wide_mid_xa --fold bytes --tag wide_mid_xa_foldbytes
  job 45 150 jlora all16_wide_xa $A --remat wide_xa --tag wide_xa
  job 45 150 jlora all16_wide_mid_xa $A --remat wide_mid_xa --tag wide_mid_xa
  job 40 150 jlora qv4_wide_ropead_again $Q --remat wide --rope-autodiff --tag wide_ropead_again
}

# Everything side by side in one call: the baselines first, then the hand-written anchors, then
# jlora (unstacked blocks) with the remat and XLA variants, most important first.
phase_final() {
  gpu_line
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl 2>&1 | tail -2 | tee -a "$LOG"
  fi
  local KE="env PYTHONPATH=/tmp/site KERAS_BACKEND=jax $PY .bench/keras_gemma2_bench.py"
  local PE="$PY .bench/peft_gemma2_bench.py"
  job 15 60 jlora peak $J peak
  # The configurations: remat `wide_mid_xa` (jlora.lora folds the feed-forward up-projections'
  # adapters by its GPU rule in all-linear), RoPE's gradient as one rotation, the loss's soft-cap
  # terms in one Pallas pass. Run 11's q,v configuration closes the call, as budget allows.
  job 60 200 jlora qv4 $J qv4 --remat wide_mid_xa --loss-math pallas --tag final --long-round 20
  job 60 200 jlora all16 $J all16 --remat wide_mid_xa --loss-math pallas --tag final --long-round 20
  job 120 300 peft peft_qv4_compile $PE qv4_compile
  job 120 300 peft peft_all16_compile $PE all16_compile
  job 40 300 keras keras_qv4 $KE qv4
  job 45 300 keras keras_all16 $KE all16
  job 17 120 handwritten hw_qv4_fact env REMAT=dots $HW qv4_fact
  job 12 120 handwritten hw_all16_fact env REMAT=dots $HW all16_fact
  job 25 150 jlora qv4_run11 $J qv4 --remat wide --rope-autodiff --loss-math pallas --tag run11_config
}

case "$PHASE" in
  jlora) phase_jlora ;;
  explore) phase_explore ;;
  tune) phase_tune ;;
  loss) phase_loss ;;
  final) phase_final ;;
  probe) phase_probe ;;
  ab) phase_ab ;;
  all) BUDGET=${BUDGET_ALL:-100000}; phase_final; phase_jlora ;;
  *) echo "usage: $0 final|jlora|explore|tune|loss|probe|ab|all" >&2; exit 2 ;;
esac
echo "### done in $(( $(date +%s) - START ))s" | tee -a "$LOG"
