#!/usr/bin/env bash
# Cloud TPU pod launcher: create a TPU VM slice, copy this repo to every worker, install, start
# muddit-train on all workers at once (one JAX process per host; jax.distributed finds the pod
# by itself), follow worker 0's log, stop, delete.
#
# Usage:  launch/tpu_pod.sh {create|copy|setup|run|tail|stop|delete|all} [--config.a.b=v ...]
#         (extra arguments after the command go to muddit-train)
#
# Variables (TPU_NAME, ZONE and PROJECT are required except with DRY_RUN=1):
#   TPU_NAME          name of the TPU VM
#   ZONE              e.g. us-east5-a
#   PROJECT           GCP project id
#   ACCELERATOR_TYPE  slice type (default v5p-32 = 4 hosts x 4 chips)
#   RUNTIME_VERSION   TPU VM image (default v2-alpha-tpuv5)
#   SPOT              1 = create a spot (preemptible) slice (default 0); muddit-train saves on
#                     the preemption notice and `run` again resumes from the last checkpoint
#   CONFIG            config file[:arg] (default configs/muddit_512.py:fsdp,synthetic)
#   REMOTE_DIR        where the repo goes on the workers, relative to the home folder
#                     (default muddit_jax)
#   WORKDIR           run folder on each host for logs/metrics, relative to REMOTE_DIR
#                     (default runs/muddit)
#   CKPT_DIR          checkpoint folder, shared by all hosts: a gs:// bucket path (required for
#                     multi-host runs; default: WORKDIR/checkpoints, single-host only)
#   JAX_SPEC          pip spec of JAX for TPU (default "jax[tpu]")
#   DRY_RUN           1 = print the gcloud commands instead of running them
set -euo pipefail

CMD=${1:-}
shift || true
DRY_RUN=${DRY_RUN:-0}
if [[ "$DRY_RUN" != 1 && ( -z "${TPU_NAME:-}" || -z "${ZONE:-}" || -z "${PROJECT:-}" ) ]]; then
  echo "tpu_pod.sh: set TPU_NAME, ZONE and PROJECT (see the top of this file)" >&2
  exit 2
fi
TPU_NAME=${TPU_NAME:-TPU_NAME}
ZONE=${ZONE:-ZONE}
PROJECT=${PROJECT:-PROJECT}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
SPOT=${SPOT:-0}
CONFIG=${CONFIG:-configs/muddit_512.py:fsdp,synthetic}
WORKDIR=${WORKDIR:-runs/muddit}
CKPT_DIR=${CKPT_DIR:-}
REMOTE_DIR=${REMOTE_DIR:-muddit_jax}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
REPO=$(cd "$(dirname "$0")/.." && pwd)

run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
tpu() { run gcloud compute tpus tpu-vm "$@" --zone "$ZONE" --project "$PROJECT"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command "$1"; }

create() {
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" \
    "${spot[@]}"
}

copy() {
  local tarball=/tmp/muddit_jax_src.tar.gz
  run tar -C "$REPO" --exclude=.git --exclude=runs --exclude='*.egg-info' -czf "$tarball" .
  tpu scp "$tarball" "$TPU_NAME:/tmp/muddit_jax_src.tar.gz" --worker=all
  on_all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/muddit_jax_src.tar.gz"
}

setup() {
  on_all "pip install -U '$JAX_SPEC' && pip install -e $REMOTE_DIR && pip install tensorboardX"
}

start() {
  local ckpt=() args
  [[ -n "$CKPT_DIR" ]] && ckpt=(--config.checkpoint.dir="$CKPT_DIR")
  args=$(printf '%q ' --config "$CONFIG" --workdir "$WORKDIR" --config.distributed.mode=cluster \
    "${ckpt[@]}" "$@")
  on_all "cd $REMOTE_DIR && mkdir -p $WORKDIR && { nohup python -m muddit_jax.cli.train $args \
> $WORKDIR/train.log 2>&1 & echo \$! > $WORKDIR/train.pid; }"
}

case "$CMD" in
  create) create ;;
  copy) copy ;;
  setup) setup ;;
  run) start "$@" ;;
  tail) tpu ssh "$TPU_NAME" --worker=0 --command "tail -n 100 -f $REMOTE_DIR/$WORKDIR/train.log" ;;
  # SIGTERM = preemption notice: all hosts agree on a step, save it, exit 75
  stop) on_all "kill -TERM \$(cat $REMOTE_DIR/$WORKDIR/train.pid) || true" ;;
  delete) tpu delete "$TPU_NAME" --quiet ;;
  all) create; copy; setup; start "$@"; tpu ssh "$TPU_NAME" --worker=0 \
         --command "sleep 60; tail -n 100 -f $REMOTE_DIR/$WORKDIR/train.log" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
