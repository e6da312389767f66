#!/usr/bin/env bash
# The shapes default's MM-DiT stage for many passes over its 20,000 scenes, on one accelerator,
# scored on the held-out split at several points: how the #7 targets move with passes over the
# data (BENCHMARKS.md §1.15 names this as the open measurement; 2 CPU cores reach ~3 passes).
#
# It reuses a finished default run's tokenizer and VQ (so only the MM-DiT trains) and the built
# `shapes` dataset, both copied into .device/ by launch/device_prepare.sh, and installs the
# packages the device image lacks from .whl/ (same script). On the device tool:
#   run(command="bash launch/device_shapes.sh", carry=[".whl", ".device"], timeout_s=540)
# Locally (CPU, a few steps: checks the flow, as tests/test_end_to_end.py does on the smoke run):
#   OUT=/tmp/out STEPS=4 EVALS=2 LIMIT=8 bash launch/device_shapes.sh
#
# Two phases: a short probe measures steps/s, then a run sized to RATE_FACTOR x that rate x
# TRAIN_SECONDS with its own cosine schedule, evaluated EVALS times (eval.every). The run is cut
# at DEADLINE seconds after the script's start; summary.json is written either way, from the
# evaluations that finished ("completed": false when cut), so a device call's limit never loses
# them. Measured on one H200 (BENCHMARKS.md §1.18): the loop is host-bound at batch 32 (MFU
# 0.1-0.2%); the probe's 53 steps/s fell to 30-43 over a 9,500-step run (RATE_FACTOR); the
# probe with its start, compiles and a 32-example evaluation took 128 s, and one 256-example
# held-out evaluation with the artifacts takes on the order of 1-2 minutes. To take the input
# pipeline off the step loop's process: EXTRA="--config.data.workers=4" (grain worker
# processes; same batches; not yet measured on a device). The config's model is width 64 since
# BENCHMARKS.md §1.19; §1.18 ran width 128 (EXTRA="--config.model.width=128").
# Output: $OUT/summary.json (steps, passes and held-out scores per evaluation),
# $OUT/run.tar.gz (metrics, eval JSON, PNGs) and $OUT/ckpt.tar.gz.* (the last checkpoint, in
# parts of 15 MB; about 36 MB for a width-128 model and its optimizer state).
#
# Variables: OUT (default /tmp/device_out), TRAIN_SECONDS (240), RATE_FACTOR (0.7), PROBE_STEPS
#   (200), EVALS (2), DEADLINE (520), BATCH (32, the default's), LIMIT (256 examples per task),
#   PYTHON (python3), EXTRA (more --config overrides, space separated), CONFIG
#   (configs/shapes_tiny.py; path[:arg]), DEVICE_DIR (.device), WORK (/tmp: the probe and run
#   workdirs go there), STEPS (a fixed run length instead of the probe's; evaluations every
#   STEPS / EVALS steps), KILL_AFTER (30: seconds from the DEADLINE's SIGTERM, on which the
#   trainer saves a checkpoint, to SIGKILL; a TERM during the compile waits for it).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-/tmp/device_out}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}
RATE_FACTOR=${RATE_FACTOR:-0.7}
PROBE_STEPS=${PROBE_STEPS:-200}
EVALS=${EVALS:-2}
DEADLINE=${DEADLINE:-520}
KILL_AFTER=${KILL_AFTER:-30}
BATCH=${BATCH:-32}
LIMIT=${LIMIT:-256}
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/shapes_tiny.py}
WORK=${WORK:-/tmp}
DEVICE_DIR=${DEVICE_DIR:-.device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

NEEDED="import ml_collections, tensorflow_datasets, grain, array_record"
if ! "$PYTHON" -c "$NEEDED" 2>/dev/null; then
  [[ -d .whl ]] || {
    echo "device_shapes: packages missing and no .whl/ (run launch/device_prepare.sh)"; exit 2; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
DEV=$(cd "$DEVICE_DIR" 2>/dev/null && pwd) || DEV=""
[[ -n "$DEV" && -d "$DEV/data" && -f "$DEV/run/tokenizer.model" ]] || {
  echo "device_shapes: $DEVICE_DIR/ is incomplete (run launch/device_prepare.sh)"
  exit 2
}
export MUDDIT_DATA_DIR="$DEV/data"
"$PYTHON" -c "import jax; print('device_shapes:', jax.devices())"

train() {  # workdir steps extra-overrides...
  local dir=$1 steps=$2
  shift 2
  rm -rf "$dir" && mkdir -p "$dir" && cp -r "$DEV/run/." "$dir/"
  # shellcheck disable=SC2086
  ${TIMEOUT:+timeout -k "$KILL_AFTER" "$TIMEOUT"} "$PYTHON" -m muddit_jax.cli.train \
    --config "$CONFIG" --workdir "$dir" --stage mmdit --config.train.steps="$steps" \
    --config.data.global_batch="$BATCH" \
    --config.log.every=50 --config.eval.limit="$LIMIT" ${EXTRA:-} "$@"
}

# 1. throughput probe (unless STEPS is given): the trainer's steps/s after compiling (logged from
# its second log line on), else steps over the probe's whole wall time
if [[ -n "${STEPS:-}" ]]; then
  EVERY=$((STEPS / EVALS > 0 ? STEPS / EVALS : 1))
else
  start=$(date +%s)
  train "$WORK/probe" "$PROBE_STEPS" --config.eval.at_end=False --config.artifacts.at_end=False \
    --config.checkpoint.every=100000 --config.log.every=$(((PROBE_STEPS + 3) / 4)) \
    > "$OUT/probe.log" 2>&1 || { tail -20 "$OUT/probe.log"; exit 1; }
  RATE=$("$PYTHON" - "$WORK/probe/metrics.jsonl" "$PROBE_STEPS" $(($(date +%s) - start)) <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rates = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]
print(rates[-1] if rates else int(sys.argv[2]) / max(1, int(sys.argv[3])))
EOF
  )
  EVERY=$("$PYTHON" -c "print(max(1, int($RATE * $RATE_FACTOR * $TRAIN_SECONDS / $EVALS)))")
  STEPS=$((EVERY * EVALS))
  echo "device_shapes: $RATE steps/s at batch $BATCH -> $STEPS steps, held-out eval every $EVERY"
fi

# 2. the run: cosine schedule over STEPS, eval every EVERY steps (and at the end), cut at
# DEADLINE (exit code 124): SIGTERM, on which the trainer saves a checkpoint, SIGKILL KILL_AFTER
# seconds later
left=$((DEADLINE - ($(date +%s) - T0)))
[[ $left -gt 0 ]] || { echo "device_shapes: DEADLINE ($DEADLINE s) passed before the run"; exit 1; }
rc=0
TIMEOUT=$left train "$WORK/run" "$STEPS" --config.eval.every="$EVERY" \
  --config.checkpoint.every="$EVERY" --config.checkpoint.keep=1 > "$OUT/run.log" 2>&1 || rc=$?
[[ $rc -eq 0 ]] || tail -20 "$OUT/run.log"

# passes = rows seen / training scenes (the config's num_train; EXTRA may not change it)
"$PYTHON" - "$WORK/run/metrics.jsonl" "$BATCH" "$CONFIG" "$OUT/summary.json" "$rc" <<'EOF'
import json, os, sys
from bench.code_probe import load_config
metrics, batch, config, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
scenes = load_config(config).data.options.num_train
rows = [json.loads(l) for l in open(metrics)] if os.path.exists(metrics) else []
keys = ("eval/t2i/overall", "eval/vqa/vqa_accuracy", "eval/caption/attribute_accuracy",
        "eval/caption/cider_d", "eval/vqa/question_type/exists", "eval/vqa/question_type/shape")
evals = [{"step": r["step"], "passes": r["step"] * batch / scenes,
          **{k.split("/", 1)[1]: r[k] for k in keys if k in r}}
         for r in rows if "eval/vqa/vqa_accuracy" in r]
rate = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]
json.dump({"batch": batch, "scenes": scenes, "steps_per_sec": rate[-1] if rate else None,
           "completed": sys.argv[5] == "0", "evals": evals}, open(out, "w"), indent=1)
for e in evals:
    print(json.dumps(e))
EOF
tar -czf "$OUT/run.tar.gz" -C "$WORK/run" --ignore-failed-read metrics.jsonl eval samples \
  2>/dev/null || true
# the last checkpoint in 15 MB parts (the device tool returns files of at most 16 MB), so the
# trained model can be evaluated or probed elsewhere: cat ckpt.tar.gz.* | tar -xz
if [[ -d "$WORK/run/checkpoints" ]]; then
  tar -czf - -C "$WORK/run" checkpoints | split -b 15m - "$OUT/ckpt.tar.gz."
fi
exit $rc
