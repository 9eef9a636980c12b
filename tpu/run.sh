#!/usr/bin/env bash
# Run one jaxllm config on every worker of a TPU VM or slice at once, as one multi-host job
# (`distributed: true`: jax.distributed finds the other workers itself on Cloud TPU).
#
#   tpu/run.sh --name NAME --zone ZONE --config configs/X.yaml [--set KEY=VALUE ...]
#              [--project P] [--runs gs://BUCKET/runs] [--dry-run]
#
# Each worker appends its output to /opt/jaxllm/logs/<run name>.worker<N>.log (and prints it).
# Running the same command again after a preemption or a crash resumes from the last
# checkpoint: an unfinished run directory with the same config continues where it stopped.
# --runs puts the run directory and the compilation cache under that path (a bucket survives
# the VM). --dry-run prints the gcloud command.
set -euo pipefail

show() {  # the command, quoted so that it can be pasted into a shell
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_=,./:@+%-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}

name="" zone="" config="" project="" runs="" dry=0
sets=()
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --set) sets+=("$2"); shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
for v in name zone config; do
  if [ -z "${!v}" ]; then echo "run.sh: --$v is required" >&2; usage; fi
done

run_name="$(basename "$config" .yaml)"
args=(--config "$config" --set distributed=true)
# the bucket also holds the compilation cache, so a restarted VM does not compile again
[ -n "$runs" ] && args+=(--set "output_dir=$runs/$run_name" --set "compile_cache=$runs/xla-cache")
for s in "${sets[@]+"${sets[@]}"}"; do args+=(--set "$s"); done
quoted="$(printf '%q ' "${args[@]}")"
log="logs/$run_name.worker\$(cat /tmp/jaxllm-worker 2>/dev/null || hostname).log"
remote="cd /opt/jaxllm && mkdir -p logs && .venv/bin/python -m jaxllm.main ${quoted% } 2>&1 | tee -a $log"

cmd=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$zone" --worker=all "--command=$remote")
[ -n "$project" ] && cmd+=("--project=$project")

if [ "$dry" = 1 ]; then
  show "${cmd[@]}"
else
  "${cmd[@]}"
fi
