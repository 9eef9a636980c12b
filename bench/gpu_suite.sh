#!/usr/bin/env bash
# One prepared accelerator run (issue 21): every GPU figure of the README in one go.
#
#   bench/gpu_suite.sh [--out DIR] [--budget SECONDS] [--smoke] [--only NAME,NAME...]
#
# Runs, each in its own process with its own time limit, in priority order, skipping what no
# longer fits in --budget (default 480 s of wall time): gpt2_124m's train step at 16 x 1024
# (bf16, auto attention = cudnn on GPUs; scanned, unrolled, without document masking), the
# torch.compile nanoGPT step of the same shape (bench/torch_train.py), ablations (fused loss,
# no z-loss, no Triton GEMMs), 64 x 1024 (llm.c's batch) for both, gpt2_350m for both, the xla
# attention path, KV-cache decode (batch 1 and 64), llama_1b, the attention kernels alone.
# Missing Python packages on the machine (grain, tensorboardX): bench/gpu_wheels.sh fetches
# them here into .gpu_wheels/, which this script installs when present.
# Results: DIR/results.jsonl (one JSON object per measurement), DIR/table.md (the same as a
# table, jax against torch in the same run), DIR/log.txt (everything printed).
# --smoke: tiny shapes on whatever device there is (CPU), for the test suite.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT_DIR="${OUT:-bench_out}"
BUDGET=480
SMOKE=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --only) ONLY=",$2,"; shift 2 ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (expected --out DIR, --budget S, --smoke, --only LIST)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
RES="$OUT_DIR/results.jsonl"
LOG="$OUT_DIR/log.txt"
: >"$RES"
: >"$LOG"
START=$(date +%s)
export PYTHONUNBUFFERED=1

log() { echo "$*" | tee -a "$LOG"; }

# job NAME LIMIT_SECONDS COMMAND...: runs COMMAND with at most LIMIT seconds (less when the
# budget is nearly spent; skipped below 20 s), output appended to the log.
job() {
  local name="$1" limit="$2"
  shift 2
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then
    return
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    log "== $name: skipped, ${left}s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  log "== $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  log "== $name: exit $rc after $(($(date +%s) - t0))s"
}

log "gpu_suite.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) smoke=$SMOKE budget=${BUDGET}s"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  log "no CUDA jax here: installing jax[cuda12]"
  "$PY" -m pip install -q -U "jax[cuda12]" >>"$LOG" 2>&1 || log "install failed: the jobs below run on $("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null)"
fi
if [ -d .gpu_wheels ] && ! "$PY" -c "import grain" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/jaxllm-site .gpu_wheels/*.whl >>"$LOG" 2>&1
  export PYTHONPATH="/tmp/jaxllm-site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # a missing baseline library skips its jobs, not the suite
        print(name, "missing:", type(e).__name__)
import jax
print("devices:", jax.devices())
EOF

MFU=(bench/mfu.py --json "$RES")
if [ "$SMOKE" = 1 ]; then
  TINY=(--config configs/tiny_pretrain.yaml --vocab 512 --steps 2 --set loader.batch_size=4 --set loader.seq_len=64)
  job attention 120 "$PY" bench/attention.py --smoke --repeats 2 --json "$RES"
  job mfu-tiny 120 "$PY" "${MFU[@]}" "${TINY[@]}" --label tiny-one
  job mfu-tiny-packed 120 "$PY" "${MFU[@]}" "${TINY[@]}" --quick-init --docs packed --doc-len 16 --label tiny-packed
  # the same model and shape as the jax rows: the config's overrides of the tiny preset included
  job torch-tiny 120 "$PY" bench/torch_train.py "${TINY[@]}" --no-compile --json "$RES" --label tiny
  job decode-tiny 120 "$PY" bench/decode.py --preset tiny --vocab 512 --new 8 --batches 1 4 --no-uncached --json "$RES"
else
  # Persistent compile cache: a job whose program an earlier job compiled starts at once.
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxllm-xla-cache}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
  # --quick-init: no random initialisers to compile (unrolled, they took over a minute on the
  # H200 on 2026-12-04); the step is the same program.
  Q=(--quick-init --config configs/gpt2_124m.yaml --set train.grad_accum=1 --steps 10)
  B16=(--set loader.batch_size=16)
  U=(--set model.scan_layers=false)
  L1B=(--quick-init --config configs/llama_1b.yaml --vocab 128256 --set train.grad_accum=1 --set train.loss_chunk=256 --steps 4)
  # 2026-12-04: scanned, cudnn, 16 x 1024: 272,602 tokens/s (no masking 286k) against
  # torch.compile's 387,148. First the ablations that say where the rest goes.
  job gpt2_124m-b16 60 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" --label gpt2_124m-b16
  job gpt2_124m-b16-unrolled 60 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" "${U[@]}" --label gpt2_124m-b16-unrolled
  job gpt2_124m-b16-unrolled-nomask 45 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" "${U[@]}" --docs none --label gpt2_124m-b16-unrolled-nomask
  job torch-gpt2_124m-b16 90 "$PY" bench/torch_train.py --preset gpt2_124m --batch 16 --seq 1024 --json "$RES" --label gpt2_124m-b16
  job gpt2_124m-b16-loss_chunk 45 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" "${U[@]}" --set train.loss_chunk=256 --label gpt2_124m-b16-unrolled-loss_chunk256
  job gpt2_124m-b16-noz 45 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" "${U[@]}" --set train.z_loss=0 --label gpt2_124m-b16-unrolled-no-z_loss
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
    job gpt2_124m-b16-notriton 45 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" "${U[@]}" --label gpt2_124m-b16-unrolled-no-triton-gemm
  job gpt2_124m-b64 90 "$PY" "${MFU[@]}" "${Q[@]}" "${U[@]}" --label gpt2_124m-b64-unrolled
  job torch-gpt2_124m 100 "$PY" bench/torch_train.py --preset gpt2_124m --batch 64 --seq 1024 --json "$RES" --label gpt2_124m
  job gpt2_350m-b16 90 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" "${U[@]}" --set model.preset=gpt2_350m --label gpt2_350m-b16-unrolled
  job torch-gpt2_350m-b16 90 "$PY" bench/torch_train.py --preset gpt2_350m --batch 16 --seq 1024 --json "$RES" --label gpt2_350m-b16
  job gpt2_124m-xla-b16 60 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" --set model.attention=xla --label gpt2_124m-xla-b16
  job decode-gpt2_124m 100 "$PY" bench/decode.py --preset gpt2_124m --dtype bfloat16 --batches 1 64 --no-uncached --json "$RES"
  job llama_1b 150 "$PY" "${MFU[@]}" "${L1B[@]}" --label llama_1b
  job attention 90 "$PY" bench/attention.py --repeats 5 --json "$RES"
fi

"$PY" bench/suite_table.py "$RES" >"$OUT_DIR/table.md" 2>>"$LOG"
cat "$OUT_DIR/table.md" | tee -a "$LOG"
log "gpu_suite.sh done in $(($(date +%s) - START))s"
