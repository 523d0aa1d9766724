#!/usr/bin/env bash
# lcc on one CUDA GPU, in at most 4 minutes on an H200: (1) every Triton MoE kernel against a float64
# reference, (2) the kernels' speed against torch's grouped matmul and lcc's torch path, with the GPU's
# copy bandwidth and bf16 matmul rate as rooflines, (3) `lcc run train` and `lcc run generate` on the GPU
# against this repository's committed CPU results. JSON under $OUT after each section, a table at the end.
#
# The GPU machine may have another Python, torch and Triton than pyproject.toml pins and no network: lcc
# runs from a copy of this source tree laid out as pip installs it; Python packages it lacks travel as
# wheels in .whl/ (benchmarks/gpu/wheels.sh fetches them) and are installed into a temporary folder.
# Without a GPU every section says so and the script exits with 2.
#
# Usage, from anywhere: [OUT=dir] [PYTHON=python3] bash benchmarks/gpu/run.sh [--quick]
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="$(mkdir -p "${OUT:-$REPO/benchmarks/gpu/out}" && cd "${OUT:-$REPO/benchmarks/gpu/out}" && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
TREE="$(mktemp -d)"
trap 'rm -rf "$TREE"' EXIT
cp -r "$REPO/lcc" "$TREE/lcc" && cp -r "$REPO/backends" "$TREE/lcc/backends" && cp -r "$REPO/benchmarks" "$TREE/" \
  && cp -r "$REPO/specs" "$TREE/" && mkdir -p "$TREE/tests" \
  && cp -r "$REPO/tests/backends" "$TREE/tests/" || { echo "run.sh: cannot copy the source tree"; exit 1; }
SITE=""
if ! "$PYTHON" -c "import pydantic, yaml, jinja2, typer, rich" 2>/dev/null; then
  if ! compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    echo "run.sh: $PYTHON lacks lcc's dependencies and $REPO/.whl has no wheels (run benchmarks/gpu/wheels.sh here first)"
    exit 1
  fi
  SITE="$TREE/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$REPO"/.whl/*.whl \
    || { echo "run.sh: installing the carried wheels failed"; exit 1; }
fi
export PYTHONPATH="$TREE${SITE:+:$SITE}"
"$PYTHON" -c "import pydantic, yaml, jinja2, typer, rich" \
  || { echo "run.sh: lcc's dependencies still do not import (see above)"; exit 1; }
cd "$TREE"
"$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
torch.cuda.is_available() and torch.cuda.get_device_name(0))"
status=0
"$PYTHON" -m benchmarks.gpu.kernels --out "$OUT" "$@" || status=$?
if [ "$status" -le 2 ]; then
  "$PYTHON" -m benchmarks.gpu.runtime --out "$OUT" || { s=$?; [ "$s" -gt "$status" ] && status=$s; }
fi
"$PYTHON" -m benchmarks.gpu.table "$OUT"
exit "$status"
