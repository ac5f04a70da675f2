#!/usr/bin/env bash
# The prepared GPU benchmark of issue 15 (item 6): one call on one H100/H200, < 9 min wall.
#
#   bash bench/gpu_run.sh            # GPU: TinyLlama-1.1B shape, batch 4x2048, r=16 on all seven projections, bf16
#   bash bench/gpu_run.sh --smoke    # (or SMOKE=1) the same stages on the `tiny` preset, CPU, < 2 min
#                                    # (the budget skips the last stages on a loaded 2-core CPU;
#                                    # BUDGET_S=240 runs them all; OUT: $TMPDIR/dora_jax-gpu-run-smoke)
#
# Runs from the repository root with the source tree on PYTHONPATH (no install, no network).
# Writes under OUT (default bench/results/gpu-DATE; a rerun replaces that folder's files):
#   env.json, nvidia-smi.txt       versions, devices, where dora_jax is imported from
#   <stage>.jsonl, <stage>.log     each benchmark's JSON lines, and its stdout + stderr
#   stages.jsonl                   one line per stage: ok / failed / timeout / skipped, rc, wall time
#   summary.json                   issue 15's GPU targets (met or not), ratios, per-stage numbers
# and prints timestamped progress lines, then the summary as the last line (one JSON object).
#
# Stages, most important first; each runs under `timeout` (its whole process group), gets
# min(its own limit, what is left of BUDGET_S) and is skipped when less than its minimum is left,
# so a failure or timeout costs only that stage's numbers:
#   env                       versions, jax.devices(), nvidia-smi
#   step_time_tinyllama       frozen-forward, LoRA, DoRA (default path), compiled in one process and
#                             timed round-robin: DoRA/LoRA step per round, MFU, XLA memory analysis
#   step_time_tinyllama_xla_attention   only when the above failed or gave no LoRA record without
#                             timing out (e.g. cuDNN attention unavailable): the same with XLA attention
#   peft_compare              HF PEFT eager + torch.compile against ours (one subprocess per
#                             configuration: ours give per-configuration device peak memory)
#   quant_memory_tinyllama    XLA memory analysis of the bf16 / NF4 / int8 step at 4x2048 on the GPU
#                             (its buffer assignment: no CPU float32 upcast), one line per configuration
#   step_time_smollm2         frozen-forward, LoRA, DoRA on SmolLM2-135M, 4x2048
#   quant_time_smollm2        bf16 vs NF4 base, LoRA and DoRA step time (SmolLM2-135M, 4x2048)
#
# Sizing (GPU): a LoRA step at 4x2048 is ~45 TFLOP as counted (bench/common.py: frozen weights get
# no weight gradient), ~0.1 s at 45 % MFU of 989 TFLOP/s, so 30 timed steps of three
# configurations take < 30 s; the cost is compilation: the scanned 22-layer step ~30-90 s each,
# torch.compile of PEFT's model ~1-2 min per configuration cold. JAX's persistent compilation cache
# (a fresh folder per run) lets the later stages reuse the first stage's executables.
set -u

cd "$(dirname "$0")/.." || exit 1
SMOKE=${SMOKE:-0}
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
PY=${PYTHON:-$(command -v python || command -v python3)}
if [[ "$SMOKE" == 1 ]]; then OUT=${OUT:-${TMPDIR:-/tmp}/dora_jax-gpu-run-smoke}; fi
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT" || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
JAX_CACHE=$(mktemp -d "${TMPDIR:-/tmp}/dora_jax_gpu_run_cache.XXXXXX")
export JAX_COMPILATION_CACHE_DIR=$JAX_CACHE JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export PYTHONUNBUFFERED=1

if [[ "$SMOKE" == 1 ]]; then
  # CPU only; XLA's backend optimizations off (compiles ~2x faster); torch.compile a no-op
  # (TORCHDYNAMO_DISABLE: its cold compile alone takes minutes on CPU), so the smoke run proves
  # the stages' plumbing, not the numbers.
  export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  export TORCHDYNAMO_DISABLE=1
  BUDGET_S=${BUDGET_S:-118} SUMMARY_RESERVE_S=8
  PRESET=tiny BATCH=1 SEQ=32 STEPS=2 WARMUP=1
  PEFT_ARGS=(--steps 2 --warmup 1 --rounds 1 --timeout 25)
  SMALL=(--preset tiny --batch 1 --seq 32 --steps 2 --warmup 1)  # = the first stage: cached compiles
  QUANT_TIME=(--time-preset tiny --time-batch 1 --time-seq 32 --rounds 2 --warmup 1)
  QUANT_SHAPE=tiny:1x32
  #     (seconds)  limit  minimum: a stage is skipped when less than its minimum is left
  L_ENV=20     M_ENV=5
  L_MAIN=40    M_MAIN=5
  L_XLA_ATT=30 M_XLA_ATT=5
  L_PEFT=80    M_PEFT=5
  L_QMEM=40    M_QMEM=5
  L_SMALL=20   M_SMALL=5
  L_QTIME=45   M_QTIME=5
else
  BUDGET_S=${BUDGET_S:-520} SUMMARY_RESERVE_S=25
  PRESET=tinyllama-1.1b BATCH=4 SEQ=2048 STEPS=30 WARMUP=3
  PEFT_ARGS=(--steps 10 --warmup 3 --rounds 1 --timeout 150)
  SMALL=(--preset smollm2-135m --batch 4 --seq 2048 --steps 20 --warmup 3)
  QUANT_TIME=(--time-preset smollm2-135m --time-batch 4 --time-seq 2048 --rounds 10 --warmup 2)
  QUANT_SHAPE=tinyllama-1.1b:4x2048
  # Minimums: stages that write their records only at the end get one only when they can finish.
  L_ENV=60     M_ENV=20
  L_MAIN=300   M_MAIN=60    # 3 compiles of the 22-layer step (~30-90 s each) + 3x(3+30) steps
  L_XLA_ATT=180 M_XLA_ATT=90
  L_PEFT=270   M_PEFT=90    # ours x2 (cached compiles), PEFT eager x2, PEFT torch.compile x2
  L_QMEM=150   M_QMEM=45    # 6 compiles, never run; one line each, so a cut keeps the first ones
  L_SMALL=100  M_SMALL=70
  L_QTIME=150  M_QTIME=100  # 4 compiles + 10 rounds
fi
COMMON=(--rank 16 --dtype bfloat16)
T0=$(date +%s)
LAST_STATUS=none
: > "$OUT/stages.jsonl"

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET_S - SUMMARY_RESERVE_S - ($(date +%s) - T0) )); }
stage_line() {  # name status rc wall timeout reason
  printf '{"stage": "%s", "status": "%s", "rc": %s, "wall_s": %s, "timeout_s": %s, "reason": "%s", "date": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$(date -u +%FT%TZ)" >> "$OUT/stages.jsonl"
}
digest() {  # one line per JSON record of a stage file: label, median, MFU or the error
  "$PY" - "$1" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
  if not line.startswith("{"):
    continue
  try:
    r = json.loads(line)
  except json.JSONDecodeError:  # a line cut by a kill
    continue
  name = r.get("label") or f"{r.get('kind')}:{r.get('base')}/{r.get('method')}"
  if "error" in r:
    print(f"    {name}: ERROR {r['error'][:160]}")
  elif r.get("summary"):
    v = {k: (x or {}).get("median") for k, x in (r.get("ours_over_peft_tokens_per_s") or {}).items()}
    print(f"    summary ours/PEFT tokens/s: {v}")
  elif "median_ms" in r:
    mfu = r.get("mfu")
    print(f"    {name}: {r['median_ms']:.1f} ms" + (f", MFU {mfu:.3f}" if mfu else "")
          + (f", compile {r['compile_s']:.0f} s" if r.get("compile_s") else "")
          + (f", DoRA/LoRA {r['dora_lora_ratio']}" if r.get("dora_lora_ratio") else ""))
  elif r.get("kind") == "memory":
    print(f"    {name}: XLA peak estimate {(r.get('xla') or {}).get('peak_estimate_bytes', 0) / 1e9:.2f} GB")
EOF
}
run_stage() {  # name limit_s min_s command...
  local name=$1 limit=$2 min=$3; shift 3
  local avail t start rc status reason=""
  avail=$(left)
  t=$(( limit < avail ? limit : avail ))
  if (( t < min )); then
    log "skip $name: ${avail}s left of the budget, it needs ${min}s"
    stage_line "$name" skipped null null null "budget: ${avail}s left, needs ${min}s"
    LAST_STATUS=skipped
    return 0
  fi
  rm -f "$OUT/$name.jsonl"
  log "start $name (timeout ${t}s): $*"
  start=$(date +%s)
  timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; reason="killed after ${t}s" ;;
    *) status=failed; reason=$(tail -n 1 "$OUT/$name.log" | tr -d '"\\\000-\037' | cut -c1-200) ;;
  esac
  LAST_STATUS=$status
  stage_line "$name" "$status" "$rc" "$(( $(date +%s) - start ))" "$t" "$reason"
  log "end $name: $status (rc $rc, $(( $(date +%s) - start ))s)"
  [[ -s "$OUT/$name.jsonl" ]] && digest "$OUT/$name.jsonl"
  [[ $status != ok ]] && tail -n 3 "$OUT/$name.log" | cut -c1-300 | sed 's/^/    | /'
  return 0
}
has_ok() {  # file label: is there a record with this label and no error?
  [[ -s "$1" ]] && "$PY" -c 'import json,sys; sys.exit(0 if any(l.startswith("{") and json.loads(l).get("label")==sys.argv[2] and "error" not in json.loads(l) for l in open(sys.argv[1])) else 1)' "$1" "$2"
}

log "gpu_run: OUT=$OUT smoke=$SMOKE budget=${BUDGET_S}s preset=$PRESET ${BATCH}x${SEQ} jax cache=$JAX_CACHE"
timeout 20 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi unavailable" >> "$OUT/nvidia-smi.txt"
XLA_PYTHON_CLIENT_PREALLOCATE=false run_stage env "$L_ENV" "$M_ENV" \
  "$PY" -m bench.gpu_report env "$OUT/env.json"
tail -n 1 "$OUT/env.log" | cut -c1-600 | sed 's/^/    /'

STEP=(--batch "$BATCH" --seq "$SEQ" "${COMMON[@]}" --scan --methods frozen-forward,lora,dora
      --dora-paths custom_vjp --interleave --steps "$STEPS" --warmup "$WARMUP")
run_stage step_time_tinyllama "$L_MAIN" "$M_MAIN" \
  "$PY" -m bench.step_time --preset "$PRESET" "${STEP[@]}" --out "$OUT/step_time_tinyllama.jsonl"
# A retry without cuDNN attention when the first stage failed or gave no LoRA record; not after a
# timeout (slow compiles would be as slow again, and peft_compare needs the time).
if [[ $LAST_STATUS != timeout ]] && ! has_ok "$OUT/step_time_tinyllama.jsonl" lora; then
  run_stage step_time_tinyllama_xla_attention "$L_XLA_ATT" "$M_XLA_ATT" \
    "$PY" -m bench.step_time --preset "$PRESET" "${STEP[@]}" --attention-impl xla \
    --out "$OUT/step_time_tinyllama_xla_attention.jsonl"
fi

# PEFT's DoRA first in each torch mode: dora/peft-compile is the target.
run_stage peft_compare "$L_PEFT" "$M_PEFT" \
  "$PY" -m bench.peft_compare --preset "$PRESET" --batch "$BATCH" --seq "$SEQ" "${COMMON[@]}" \
  --scan --methods dora,lora "${PEFT_ARGS[@]}" --out "$OUT/peft_compare.jsonl"

run_stage quant_memory_tinyllama "$L_QMEM" "$M_QMEM" \
  "$PY" -m bench.quant_memory --parts memory --memory-shapes "$QUANT_SHAPE" \
  --out "$OUT/quant_memory_tinyllama.jsonl"

run_stage step_time_smollm2 "$L_SMALL" "$M_SMALL" \
  "$PY" -m bench.step_time "${SMALL[@]}" "${COMMON[@]}" --scan --methods frozen-forward,lora,dora \
  --dora-paths custom_vjp --interleave --out "$OUT/step_time_smollm2.jsonl"

run_stage quant_time_smollm2 "$L_QTIME" "$M_QTIME" \
  "$PY" -m bench.quant_memory --parts time --time-bases bf16,nf4 "${QUANT_TIME[@]}" \
  --out "$OUT/quant_time_smollm2.jsonl"

log "summary (total $(( $(date +%s) - T0 ))s)"
timeout 30 "$PY" -m bench.gpu_report summary "$OUT" 2> "$OUT/summary.log" \
  || { echo "{\"bench\": \"gpu_run\", \"summary\": \"failed\", \"error\": \"$(tail -n 1 "$OUT/summary.log" | tr -d '"\\\000-\037' | cut -c1-300)\"}"; }
rm -rf "$JAX_CACHE"
