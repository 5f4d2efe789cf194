#!/usr/bin/env bash
# The device check on a lent GPU (bench/README.md "Device check"): install the carried wheels
# (.whl, built from bench/device_wheels.txt), note the GPU, then run bench/device_check.py.
# Arguments go to device_check.py. Output: $OUT (summary.json, logs, figures).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
out=${OUT:-bench/out/device-check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "${WHEELS:-.whl}"/*.whl > "$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 3; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -m pip list > "$out/pip-list.txt" 2>&1
exec python3 bench/device_check.py --out "$out" "$@"
