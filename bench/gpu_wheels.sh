#!/usr/bin/env bash
# Downloads (here, where pip reaches an index) the wheels jaxllm needs that the GPU machine's
# image lacks (grain and its array-record and portpicker, tensorboardX) into .gpu_wheels/,
# for Python 3.12 on x86-64 Linux. bench/gpu_suite.sh installs them when the folder is there;
# carry it to the machine with the working tree (device run: carry [".gpu_wheels"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .gpu_wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu_wheels grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
ls .gpu_wheels
