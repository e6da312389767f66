#!/usr/bin/env bash
# Local multi-process launcher: starts NUM_PROCESSES copies of muddit-train on this machine, wired
# together through jax.distributed (coordinator on 127.0.0.1). Used by the tests (CPU) and handy
# for a multi-GPU box run as one process per GPU.
#
# Usage:  launch/local.sh --config configs/train_tiny.py --workdir runs/local [--config.a.b=v ...]
#
# Variables (all optional):
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  CPU only: fake host devices per process via
#                        --xla_force_host_platform_device_count (default 4; empty = leave XLA_FLAGS)
#   GPUS_PER_PROCESS     GPU only: give process i the GPUs [i*G, (i+1)*G) via CUDA_VISIBLE_DEVICES
#   COORDINATOR_PORT     coordinator port (default: a free port)
#   LOG_DIR              write process i's output to LOG_DIR/process_i.log (default: terminal,
#                        lines prefixed with [i])
#   PYTHON               interpreter (default python)
# Exit status: the first non-zero exit status of the processes (see muddit-train's codes), else 0.
set -euo pipefail

NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS-4}
PYTHON=${PYTHON:-python}
PORT=${COORDINATOR_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
cd "$(dirname "$0")/.."

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  env_vars=(JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$NUM_PROCESSES"
            JAX_PROCESS_ID="$i")
  if [[ -n "$DEVICES_PER_PROCESS" ]]; then
    env_vars+=(JAX_PLATFORMS=cpu
               XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
  fi
  if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
    env_vars+=(CUDA_VISIBLE_DEVICES="$(seq -s, $((i * GPUS_PER_PROCESS)) $(((i + 1) * GPUS_PER_PROCESS - 1)))")
  fi
  if [[ -n "${LOG_DIR:-}" ]]; then
    mkdir -p "$LOG_DIR"
    env "${env_vars[@]}" "$PYTHON" -m muddit_jax.cli.train "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    env "${env_vars[@]}" "$PYTHON" -m muddit_jax.cli.train "$@" 2>&1 | sed "s/^/[$i] /" &
  fi
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [[ $status -eq 0 ]] && status=$rc; }
done
exit "$status"
