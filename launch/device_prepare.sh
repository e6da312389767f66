#!/usr/bin/env bash
# Stage what launch/device_shapes.sh needs on a bare accelerator machine (run here, with network
# to the package registry; both folders are git-ignored and travel with the device tool's carry):
#   .whl/     wheels of the packages muddit_jax needs that the device image (Python 3.12, jax,
#             flax, optax, orbax, sentencepiece preinstalled) lacks
#   .device/  run/ = a finished default run's tokenizer.model and last VQ checkpoint;
#             data/ = the built `shapes` dataset of the default config
#
# Usage: launch/device_prepare.sh RUN_DIR [DATA_DIR]
#   RUN_DIR   a workdir of `muddit-train --config $CONFIG` whose VQ stage finished
#   DATA_DIR  where that dataset was built (default $MUDDIT_DATA_DIR or ~/muddit_data)
# Variables: CONFIG (default configs/shapes_tiny.py; path[:arg]), DEVICE_DIR (default .device),
#   NO_WHEELS=1 skips the wheels (no network: the tests), PYTHON (python3).
set -euo pipefail
[[ $# -ge 1 && -d "$1" ]] || { echo "usage: launch/device_prepare.sh RUN_DIR [DATA_DIR]"; exit 2; }
RUN_DIR=$(cd "$1" && pwd)
DATA_DIR=${2:-${MUDDIT_DATA_DIR:-$HOME/muddit_data}}  # muddit_jax.data.registry's default
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/shapes_tiny.py}
DEVICE_DIR=${DEVICE_DIR:-.device}

# the runtime closure of muddit_jax's install_requires minus the packages of the device image
# (as the device tool's KINDS.md lists them), pinned to what pip resolves for Python 3.12 here
WHEELS=(array-record==0.8.6 dm-tree==0.1.10 docstring-parser==0.18.0
        googleapis-common-protos==1.76.0 grain==0.2.18 immutabledict==4.3.1 ml-collections==1.1.0
        portpicker==1.6.0 simple-parsing==0.1.9 tensorboardx==2.6.5 tensorflow-datasets==4.9.10
        tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2)
if [[ -z "${NO_WHEELS:-}" ]]; then
  rm -rf .whl && mkdir -p .whl
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  "$PYTHON" -m pip wheel -q --no-deps -w .whl promise==2.3  # sdist only: build the pure wheel
fi

[[ -f "$RUN_DIR/tokenizer.model" ]] || { echo "no $RUN_DIR/tokenizer.model"; exit 2; }
last=$(ls "$RUN_DIR/vq/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1 || true)
[[ -n "$last" ]] || { echo "no VQ checkpoint under $RUN_DIR/vq/checkpoints"; exit 2; }
# the config's built dataset, where its TFDS builder keeps it (relative to the data root)
dataset=$("$PYTHON" - "$CONFIG" "$DATA_DIR" <<'EOF'
import os, sys
sys.path.insert(0, ".")
from bench.code_probe import load_config
from muddit_jax.data import registry
data, root = load_config(sys.argv[1]).data, sys.argv[2]
builder = registry.get_builder(data.dataset, root, **data.options.to_dict())
print(os.path.relpath(builder.data_dir, root) if builder.is_prepared else "")
EOF
)
[[ -n "$dataset" ]] || { echo "no built dataset of $CONFIG under $DATA_DIR (run it once)"; exit 2; }

rm -rf "$DEVICE_DIR" && mkdir -p "$DEVICE_DIR/run/vq/checkpoints" "$DEVICE_DIR/data/$dataset"
cp "$RUN_DIR/tokenizer.model" "$DEVICE_DIR/run/"
cp -r "$RUN_DIR/vq/checkpoints/$last" "$DEVICE_DIR/run/vq/checkpoints/"
cp -r "$DATA_DIR/$dataset/." "$DEVICE_DIR/data/$dataset/"
du -sh "$DEVICE_DIR" .whl 2>/dev/null || true
