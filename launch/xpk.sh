#!/usr/bin/env bash
# Train as a GKE workload with xpk (JobSet + Kueue on an existing xpk cluster): xpk builds an
# image from BASE_IMAGE plus this checkout (--script-dir), runs the same train command on every
# TPU VM of every slice (JAX auto-detects the GKE TPU environment: --distributed), and restarts
# the whole workload after a preemption (--max-restarts); the rerun resumes from the last
# checkpoint, so the workdir must be a gs:// path.
#
#   launch/xpk.sh CLUSTER WORKLOAD TPU_TYPE NUM_SLICES -- TRAIN_ARGS...
#   launch/xpk.sh my-cluster effjax-q v5p-128 2 -- \
#       --config=configs/quickstart.py --workdir=gs://BUCKET/runs/quickstart
#
# With NUM_SLICES > 1 the script adds --config.mesh.dcn.data=NUM_SLICES (data parallel across
# slices over DCN, everything else inside a slice) unless TRAIN_ARGS set a mesh.dcn key.
# Env: BASE_IMAGE (default python:3.11-slim), MAX_RESTARTS (3), ZONE/PROJECT (else gcloud's),
# DRY_RUN=1 to print the xpk command without running it. Not yet run on a real cluster.
set -euo pipefail

die() { echo "xpk.sh: $*" >&2; exit 2; }
run() { echo "+ $*" >&2; [[ -n ${DRY_RUN:-} ]] || "$@"; }

[[ $# -ge 5 && $5 == "--" ]] || die "usage: $0 CLUSTER WORKLOAD TPU_TYPE NUM_SLICES -- TRAIN_ARGS..."
cluster=$1 workload=$2 tpu_type=$3 slices=$4; shift 5
[[ $slices =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer; got '$slices'"
printf '%s\n' "$@" | grep -q -- '^--workdir=gs://' \
  || die "pass --workdir=gs://BUCKET/... after '--' (pods are ephemeral; checkpoints must outlive them)"
if [[ -z ${DRY_RUN:-} ]]; then
  command -v xpk >/dev/null || die "xpk not found: pip install xpk"
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud SDK"
  command -v kubectl >/dev/null || die "kubectl not found: gcloud components install kubectl"
  gcloud auth list --filter=status:ACTIVE --format='value(account)' | grep -q . \
    || die "no active gcloud credential: run 'gcloud auth login'"
fi
project=${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}
zone=${ZONE:-$(gcloud config get-value compute/zone 2>/dev/null || true)}
[[ -n $project || -n ${DRY_RUN:-} ]] || die "no project: set PROJECT or 'gcloud config set project P'"
[[ -n $zone || -n ${DRY_RUN:-} ]] || die "no zone: set ZONE or 'gcloud config set compute/zone Z'"

train_args=("$@")
if (( slices > 1 )) && ! printf '%s\n' "$@" | grep -q -- '^--config.mesh.dcn'; then
  train_args+=("--config.mesh.dcn.data=$slices")
fi
# Inside the container: install this checkout with TPU JAX, then the same command on every VM.
inner="pip install -q -e . 'jax[tpu]' && python -m effjax.train --distributed$(printf ' %q' "${train_args[@]}")"

run xpk workload create --cluster="$cluster" --workload="$workload" --tpu-type="$tpu_type" \
  --num-slices="$slices" --base-docker-image="${BASE_IMAGE:-python:3.11-slim}" \
  --script-dir="$(cd "$(dirname "$0")/.." && pwd)" --max-restarts="${MAX_RESTARTS:-3}" \
  ${project:+--project="$project"} ${zone:+--zone="$zone"} --command="$inner"
echo "xpk.sh: follow with: xpk workload list --cluster=$cluster; kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$workload" >&2
