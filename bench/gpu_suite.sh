#!/usr/bin/env bash
# One prepared accelerator run (issue 21): every GPU figure of the README in one go.
#
#   bench/gpu_suite.sh [--out DIR] [--budget SECONDS] [--smoke] [--only NAME,NAME...]
#
# Runs, each in its own process with its own time limit, in priority order, skipping what no
# longer fits in --budget (default 480 s of wall time): gpt2_124m's train step at 16 x 1024 as
# shipped (bf16, scanned layers, auto attention = cudnn on GPUs, one document per row) and the
# torch.compile nanoGPT step of the same shape (bench/torch_train.py), both profiled; then one
# change at a time (unrolled layers, bf16 logits, fused loss, no Triton GEMMs, the layer loop
# as a CUDA graph, no z-loss);
# then the combination of the changes that paid (bench/suite_best.py) without and with
# document masking, profiled, for gpt2_124m and gpt2_350m (torch too), 64 x 1024 (llm.c's
# batch) for both, llama_1b, the xla attention path, KV-cache decode (batch 1 and 64; plain
# and its loop as a CUDA graph) and the attention kernels alone.
# Missing Python packages on the machine (grain, tensorboardX): bench/gpu_wheels.sh fetches
# them here into .gpu_wheels/, which this script installs when present.
# Results: DIR/results.jsonl (one JSON object per measurement), DIR/table.md (the same as a
# table, jax against torch in the same run), DIR/log.txt (everything printed, with the kernel
# time per kind of the profiled steps), DIR/*.xplane.pb (their traces:
# bench/profile_summary.py reads them), DIR/*.hlo.txt (the combined step's optimised HLO).
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
# best BASE: the --set arguments (into BEST_SETS) and XLA flags (BEST_XLA) of the ablations of
# BASE that made its step faster (bench/suite_best.py), so that the jobs after it run the
# combination in the same call; z-loss is a diagnostic (it changes the loss), never taken.
best() {
  local sets
  sets=$("$PY" bench/suite_best.py "$RES" "$1" --exclude train.z_loss --sets 2>>"$LOG")
  read -ra BEST_SETS <<<"$sets"
  BEST_XLA=$("$PY" bench/suite_best.py "$RES" "$1" --exclude train.z_loss --xla 2>/dev/null)
  log "== best of $1's ablations: sets [${BEST_SETS[*]}] xla [$BEST_XLA]"
}
if [ "$SMOKE" = 1 ]; then
  TINY=(--config configs/tiny_pretrain.yaml --vocab 512 --steps 2 --set loader.batch_size=4 --set loader.seq_len=64)
  job attention 120 "$PY" bench/attention.py --smoke --repeats 2 --json "$RES"
  job mfu-tiny 120 "$PY" "${MFU[@]}" "${TINY[@]}" --label tiny-one
  job mfu-tiny-logits_bf16 120 "$PY" "${MFU[@]}" "${TINY[@]}" --set model.logits_dtype=bfloat16 --label tiny-one-logits_bf16
  best tiny-one
  XLA_FLAGS="$BEST_XLA" job mfu-tiny-best 120 "$PY" "${MFU[@]}" "${TINY[@]}" "${BEST_SETS[@]}" \
    --profile "$OUT_DIR/tiny-best.xplane.pb" --hlo "$OUT_DIR/tiny-best.hlo.txt" --label tiny-best
  job mfu-tiny-packed 120 "$PY" "${MFU[@]}" "${TINY[@]}" --quick-init --docs packed --doc-len 16 --label tiny-packed
  # the same model and shape as the jax rows: the config's overrides of the tiny preset included
  job torch-tiny 120 "$PY" bench/torch_train.py "${TINY[@]}" --no-compile --profile --json "$RES" --label tiny
  job decode-tiny 120 "$PY" bench/decode.py --preset tiny --vocab 512 --new 8 --batches 1 4 --no-uncached --json "$RES"
else
  # Persistent compile cache: a job whose program an earlier job compiled starts at once.
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxllm-xla-cache}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
  # jax takes 75 % of the card by default: 58 GiB on an H100, short of a 64 x 1024 step
  # (each job is its own process; torch's run after jax's have exited)
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
  # --quick-init: no random initialisers to compile (unrolled, they took over a minute on the
  # H200 on 2026-12-04); the step is the same program.
  Q=(--quick-init --config configs/gpt2_124m.yaml --set train.grad_accum=1 --steps 10)
  B16=(--set loader.batch_size=16)
  L1B=(--quick-init --config configs/llama_1b.yaml --vocab 128256 --set train.grad_accum=1 --set train.loss_chunk=256 --steps 4)
  # 2026-12-04 (H200): scanned, cudnn, 16 x 1024: 272,602 tokens/s (no masking 286k) against
  # torch.compile's 387,148. The base as shipped (scanned), then one change at a time.
  BASE=gpt2_124m-b16
  CMDBUF="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
  job "$BASE" 60 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" --profile "$OUT_DIR/$BASE.xplane.pb" \
    --hlo "$OUT_DIR/$BASE.hlo.txt" --label "$BASE"
  job torch-gpt2_124m-b16 90 "$PY" bench/torch_train.py --preset gpt2_124m --batch 16 --seq 1024 --profile --json "$RES" --label gpt2_124m-b16
  job "$BASE-unrolled" 75 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" --set model.scan_layers=false --label "$BASE-unrolled"
  job "$BASE-logits_bf16" 45 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" --set model.logits_dtype=bfloat16 --label "$BASE-logits_bf16"
  job "$BASE-loss_chunk" 45 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" --set train.loss_chunk=256 --label "$BASE-loss_chunk256"
  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
    job "$BASE-notriton" 45 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" --label "$BASE-no_triton_gemm"
  # the scanned layers' while loop (and the cond inside) as one CUDA graph
  XLA_FLAGS="$CMDBUF" job "$BASE-cmdbuf" 45 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" --label "$BASE-cmdbuf_while"
  best "$BASE"
  BEST=("${Q[@]}" "${B16[@]}" "${BEST_SETS[@]}")
  XLA_FLAGS="$BEST_XLA" job best-nomask 60 "$PY" "${MFU[@]}" "${BEST[@]}" --docs none \
    --profile "$OUT_DIR/best-nomask.xplane.pb" --hlo "$OUT_DIR/best-nomask.hlo.txt" --label gpt2_124m-best-nomask
  XLA_FLAGS="$BEST_XLA" job best 60 "$PY" "${MFU[@]}" "${BEST[@]}" --label gpt2_124m-best
  XLA_FLAGS="$BEST_XLA" job gpt2_350m-best-nomask 90 "$PY" "${MFU[@]}" "${BEST[@]}" --set model.preset=gpt2_350m --docs none --label gpt2_350m-best-nomask
  job torch-gpt2_350m-b16 90 "$PY" bench/torch_train.py --preset gpt2_350m --batch 16 --seq 1024 --json "$RES" --label gpt2_350m-b16
  XLA_FLAGS="$BEST_XLA" job gpt2_350m-best 60 "$PY" "${MFU[@]}" "${BEST[@]}" --set model.preset=gpt2_350m --label gpt2_350m-best
  # diagnostic (changes the loss): what the z-loss pass costs
  job "$BASE-noz" 45 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" --set train.z_loss=0 --label "$BASE-no_z_loss"
  # llm.c's batch (64 x 1024), both frameworks
  XLA_FLAGS="$BEST_XLA" job best-b64-nomask 90 "$PY" "${MFU[@]}" "${Q[@]}" "${BEST_SETS[@]}" --docs none --label gpt2_124m-best-b64-nomask
  job torch-gpt2_124m 100 "$PY" bench/torch_train.py --preset gpt2_124m --batch 64 --seq 1024 --json "$RES" --label gpt2_124m
  XLA_FLAGS="$BEST_XLA" job llama_1b 120 "$PY" "${MFU[@]}" "${L1B[@]}" --label llama_1b
  job gpt2_124m-xla-b16 60 "$PY" "${MFU[@]}" "${Q[@]}" "${B16[@]}" --set model.attention=xla --label gpt2_124m-xla-b16
  job decode-gpt2_124m 100 "$PY" bench/decode.py --preset gpt2_124m --dtype bfloat16 --batches 1 64 --no-uncached --json "$RES"
  # the decode loop (a while_loop) as one CUDA graph: batch 1 ran 0.74 ms per token of launches
  XLA_FLAGS="$CMDBUF" job decode-gpt2_124m-cmdbuf 100 "$PY" bench/decode.py --preset gpt2_124m --dtype bfloat16 --batches 1 64 --no-uncached --json "$RES"
  job attention 90 "$PY" bench/attention.py --repeats 5 --json "$RES"
fi

"$PY" bench/suite_table.py "$RES" >"$OUT_DIR/table.md" 2>>"$LOG"
cat "$OUT_DIR/table.md" | tee -a "$LOG"
log "gpu_suite.sh done in $(($(date +%s) - START))s"
