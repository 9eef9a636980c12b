#!/usr/bin/env bash
# One prepared accelerator run (issue 21): every GPU figure of the README in one go.
#
#   bench/gpu_suite.sh [--out DIR] [--budget SECONDS] [--smoke] [--only NAME,NAME...]
#
# Runs, each in its own process with its own time limit, in priority order, skipping what no
# longer fits in --budget (default 480 s of wall time):
#   1. gpt2_124m train step, bf16, 16 x 1024 tokens, auto attention (cudnn) (bench/mfu.py);
#      if it did not finish compiling, again without GEMM autotuning, pass timings logged
#   2. the torch.compile nanoGPT step of the same shape (bench/torch_train.py)
#   3. both again at 64 x 1024 (llm.c's batch)
#   4. gpt2_350m (16 x 1024), gpt2_124m with the xla attention path
#   5. KV-cache decode, gpt2_124m bf16, batch 1 and 64 (bench/decode.py)
#   6. gpt2_124m with the fused loss (train.loss_chunk), with no document masking; llama_1b
#   7. attention kernels alone: cudnn vs xla agreement and fwd+bwd time (bench/attention.py)
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
  job mfu-tiny-packed 120 "$PY" "${MFU[@]}" "${TINY[@]}" --docs packed --doc-len 16 --label tiny-packed
  job torch-tiny 120 "$PY" bench/torch_train.py --preset tiny --vocab 512 --batch 4 --seq 64 --steps 2 --no-compile --json "$RES" --label tiny
  job decode-tiny 120 "$PY" bench/decode.py --preset tiny --vocab 512 --new 8 --batches 1 4 --no-uncached --json "$RES"
else
  # Persistent compile cache: a job whose program an earlier job compiled starts at once.
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxllm-xla-cache}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
  G124=(--config configs/gpt2_124m.yaml --set train.grad_accum=1 --steps 8)
  B16=(--set loader.batch_size=16)
  G350=(--config configs/gpt2_124m.yaml --set model.preset=gpt2_350m --set train.grad_accum=1 --steps 6)
  L1B=(--config configs/llama_1b.yaml --vocab 128256 --set train.grad_accum=1 --set train.loss_chunk=256 --steps 4)
  # First the smallest run that gives the headline figure (16 x 1024 fits any compile-time
  # memory estimate); if its compile does not finish, the same without GEMM autotuning, with
  # the compiler's pass timings logged, so the run says where the time went.
  job gpt2_124m-b16 150 "$PY" "${MFU[@]}" "${G124[@]}" "${B16[@]}" --label gpt2_124m-b16
  if ! grep -q '"label": "gpt2_124m-b16"' "$RES"; then
    XLA_FLAGS="--xla_gpu_autotune_level=0" TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=gpu_compiler=1 \
      job gpt2_124m-b16-autotune0 150 "$PY" "${MFU[@]}" "${G124[@]}" "${B16[@]}" --label gpt2_124m-b16-autotune0
  fi
  job torch-gpt2_124m-b16 90 "$PY" bench/torch_train.py --preset gpt2_124m --batch 16 --seq 1024 --json "$RES" --label gpt2_124m-b16
  job gpt2_124m-b64 120 "$PY" "${MFU[@]}" "${G124[@]}" --label gpt2_124m-b64
  job torch-gpt2_124m 100 "$PY" bench/torch_train.py --preset gpt2_124m --batch 64 --seq 1024 --json "$RES" --label gpt2_124m
  job gpt2_350m-b16 150 "$PY" "${MFU[@]}" "${G350[@]}" "${B16[@]}" --label gpt2_350m-b16
  job gpt2_124m-xla-b16 100 "$PY" "${MFU[@]}" "${G124[@]}" "${B16[@]}" --set model.attention=xla --label gpt2_124m-xla-b16
  job decode-gpt2_124m 100 "$PY" bench/decode.py --preset gpt2_124m --dtype bfloat16 --batches 1 64 --no-uncached --json "$RES"
  job gpt2_124m-b64-loss_chunk 100 "$PY" "${MFU[@]}" "${G124[@]}" --set train.loss_chunk=256 --label gpt2_124m-b64-loss_chunk256
  job gpt2_124m-b16-nomask 100 "$PY" "${MFU[@]}" "${G124[@]}" "${B16[@]}" --docs none --label gpt2_124m-b16-nomask
  job llama_1b 150 "$PY" "${MFU[@]}" "${L1B[@]}" --label llama_1b
  job attention 90 "$PY" bench/attention.py --repeats 5 --json "$RES"
fi

"$PY" bench/suite_table.py "$RES" >"$OUT_DIR/table.md" 2>>"$LOG"
cat "$OUT_DIR/table.md" | tee -a "$LOG"
log "gpu_suite.sh done in $(($(date +%s) - START))s"
