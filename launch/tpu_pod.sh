#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) the slice, install effjax on every worker,
# run the same train command on all workers (JAX auto-detects the pod: --distributed), stream
# process 0's log, and when the slice is preempted recreate it and rerun the same command,
# which resumes from the last checkpoint (use a gs:// workdir so checkpoints outlive the VMs).
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION -- TRAIN_ARGS...
#   launch/tpu_pod.sh effjax-v5p us-east5-a v5p-128 v2-alpha-tpuv5 -- \
#       --config=configs/quickstart.py --workdir=gs://BUCKET/runs/quickstart
#
# Env: EFFJAX_REPO (git URL to install, default: this checkout's origin), MAX_RETRIES (3),
# SPOT=1 for spot capacity, DRY_RUN=1 to print the commands without running them (no gcloud
# calls; the slice is taken as absent). Every command is printed before it runs. An exit code 75
# (the run was interrupted and checkpointed, e.g. a maintenance SIGTERM) reruns on the same
# slice (assumes `gcloud ... ssh --worker=all` returns the workers' exit code, unverified: with several
# workers it may report 1 or 255, which is then treated like a failure or a preemption by the slice
# state). Not yet run on a real pod.
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
run() { echo "+ $*" >&2; [[ -n ${DRY_RUN:-} ]] || "$@"; }

[[ $# -ge 5 && $5 == "--" ]] || die "usage: $0 NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION -- TRAIN_ARGS..."
name=$1 zone=$2 accel=$3 runtime=$4; shift 5
printf '%s\n' "$@" | grep -q -- '^--workdir=gs://' \
  || die "pass --workdir=gs://BUCKET/... after '--' (TPU VMs are recreated on preemption; checkpoints must outlive them)"
if [[ -z ${DRY_RUN:-} ]]; then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud SDK"
  gcloud auth list --filter=status:ACTIVE --format='value(account)' 2>/dev/null | grep -q . \
    || die "no active gcloud credential: run 'gcloud auth login'"
  project=$(gcloud config get-value project 2>/dev/null)
  [[ -n $project ]] || die "no gcloud project: run 'gcloud config set project PROJECT'"
fi
repo=${EFFJAX_REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}
[[ -n $repo || -n ${DRY_RUN:-} ]] || die "set EFFJAX_REPO to a git URL the workers can clone"
repo=${repo:-GIT_URL}
train_args=$(printf ' %q' "$@")
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all)

state() { [[ -n ${DRY_RUN:-} ]] && return 0
  gcloud compute tpus tpu-vm describe "$name" --zone="$zone" --format='value(state)' 2>/dev/null || true; }

ensure_slice() {
  case "$(state)" in
    READY) echo "tpu_pod.sh: reusing slice $name" >&2 ;;
    "") run gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" \
          --version="$runtime" ${SPOT:+--spot} ;;
    *) run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
       run gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" \
          --version="$runtime" ${SPOT:+--spot} ;;
  esac
  run "${ssh_all[@]}" --command="test -d effjax || git clone $repo effjax; cd effjax && git pull -q; pip install -q -e . 'jax[tpu]'"
}

for attempt in $(seq 0 "${MAX_RETRIES:-3}"); do
  ensure_slice
  # Every worker runs the same command; only process 0 writes metrics and prints progress.
  rc=0
  run "${ssh_all[@]}" --command="cd effjax && python -m effjax.train --distributed$train_args" || rc=$?
  [[ $rc == 0 || -n ${DRY_RUN:-} ]] && exit 0
  [[ $rc == 75 ]] && { echo "tpu_pod.sh: run interrupted and checkpointed (exit 75); rerunning" >&2; continue; }
  [[ $(state) == READY ]] && die "training failed with exit code $rc on a healthy slice (not a preemption)"
  echo "tpu_pod.sh: slice $name is $(state) (preempted?); retry $((attempt + 1))" >&2
done
die "gave up after ${MAX_RETRIES:-3} retries"
