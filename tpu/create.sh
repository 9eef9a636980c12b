#!/usr/bin/env bash
# Create a Cloud TPU VM (one host) or slice (several hosts) that sets itself up at boot with
# tpu/startup.sh. Runs from a laptop with the gcloud CLI, logged in to a project.
#
#   tpu/create.sh --name NAME --zone ZONE --type TYPE [--version RUNTIME] [--spot]
#                 [--project P] [--repo URL] [--branch B] [--runs gs://BUCKET/runs] [--dry-run]
#
# TYPE is the accelerator type, e.g. v4-8, v5litepod-8, v5p-16, v6e-8; RUNTIME defaults to
# the software version Google documents for that generation. --spot asks for spot capacity
# (cheaper; may be preempted: tpu/run.sh then resumes from the last checkpoint). --repo and
# --branch say which jaxllm startup.sh installs (default: this checkout's origin, main); --runs where runs and the XLA compilation
# cache live (a bucket survives preemption; the VM's disk does not).
# --dry-run prints the gcloud command instead of running it.
set -euo pipefail

show() {  # the command, quoted so that it can be pasted into a shell
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_=,./:@+%-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
here="$(cd "$(dirname "$0")" && pwd)"

name="" zone="" type="" version="" spot=0 project="" dry=0
repo="$(git -C "$here" remote get-url origin 2>/dev/null || true)" branch="main" runs=""
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --project) project="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --branch) branch="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "create.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
for v in name zone type repo; do
  if [ -z "${!v}" ]; then echo "create.sh: --$v is required (--repo: no git origin here)" >&2; usage; fi
done

if [ -z "$version" ]; then
  case "$type" in
    v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) echo "create.sh: no default runtime for '$type': pass --version" >&2; exit 2 ;;
  esac
fi

cmd=(gcloud compute tpus tpu-vm create "$name" "--zone=$zone" "--accelerator-type=$type"
     "--version=$version" "--metadata-from-file=startup-script=$here/startup.sh"
     "--metadata=jaxllm-repo=$repo,jaxllm-branch=$branch,jaxllm-runs=$runs")
[ -n "$project" ] && cmd+=("--project=$project")
[ "$spot" = 1 ] && cmd+=(--spot)

if [ "$dry" = 1 ]; then
  show "${cmd[@]}"
else
  "${cmd[@]}"
fi
