#!/usr/bin/env bash
# Set-up of one TPU VM worker, run by the VM at every boot (tpu/create.sh passes it as the
# startup script) or by hand. Idempotent: a second run updates the checkout and reinstalls
# only what changed.
#
#   tpu/startup.sh [--repo URL|PATH] [--branch B] [--home DIR] [--runs gs://BUCKET/runs]
#                  [--no-tpu] [--dry-run]
#
# Without arguments it reads the VM's metadata (jaxllm-repo, jaxllm-branch, jaxllm-runs, set
# by create.sh). It clones (or updates) jaxllm into DIR (default /opt/jaxllm), makes DIR/.venv
# with Python >= 3.11 (apt's python3.11 where the image has an older python3), installs
# jax[tpu] (--no-tpu: plain jax, for a test off TPU) and jaxllm, and writes this worker's
# number to /tmp/jaxllm-worker (run.sh names the logs by it). --runs is accepted for
# create.sh's metadata; run.sh points the compilation cache at RUNS/xla-cache itself.
# --dry-run prints what it would do.
set -euo pipefail

repo="" branch="" home="/opt/jaxllm" runs="" tpu=1 dry=0
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --repo) repo="$2"; shift 2 ;;
    --branch) branch="$2"; shift 2 ;;
    --home) home="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --no-tpu) tpu=0; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "startup.sh: unknown argument '$1'" >&2; usage ;;
  esac
done

meta() {  # a metadata attribute of this VM, empty off Google Cloud
  curl -sf -m 2 -H "Metadata-Flavor: Google" \
    "http://metadata.google.internal/computeMetadata/v1/instance/$1" 2>/dev/null || true
}
[ -z "$repo" ] && repo="$(meta attributes/jaxllm-repo)"
[ -z "$branch" ] && branch="$(meta attributes/jaxllm-branch)"
[ -z "$runs" ] && runs="$(meta attributes/jaxllm-runs)"
branch="${branch:-main}"
if [ -z "$repo" ]; then
  echo "startup.sh: no repository: pass --repo or set the jaxllm-repo metadata" >&2
  exit 2
fi
jax_spec="jax[tpu]"
[ "$tpu" = 0 ] && jax_spec="jax"

run() {
  if [ "$dry" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ -d "$home/.git" ]; then
  run git -C "$home" fetch --quiet origin "$branch"
  run git -C "$home" checkout --quiet --detach FETCH_HEAD
else
  run git clone --quiet --branch "$branch" "$repo" "$home"
fi
# jaxllm needs Python >= 3.11; the TPU runtime images (Ubuntu 22.04) ship 3.10
py=python3
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  py=python3.11
  command -v python3.11 >/dev/null || run bash -c \
    "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv"
fi
[ -x "$home/.venv/bin/python" ] || run "$py" -m venv "$home/.venv"
stamp="$home/.venv/.installed"
want="$(git -C "$home" rev-parse HEAD 2>/dev/null || echo dry-run) $jax_spec"
if [ "$dry" = 1 ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  run "$home/.venv/bin/pip" install -q --upgrade pip
  run "$home/.venv/bin/pip" install -q "$jax_spec"
  run "$home/.venv/bin/pip" install -q -e "$home"
  [ "$dry" = 1 ] || echo "$want" >"$stamp"
fi
worker="$(meta attributes/agent-worker-number)"
[ "$dry" = 1 ] || echo "${worker:-0}" >/tmp/jaxllm-worker
[ "$dry" = 1 ] || chmod -R a+rwX "$home" 2>/dev/null || true  # the ssh user runs and logs here
echo "startup.sh: jaxllm at $home ($branch), worker ${worker:-0}, $jax_spec"
