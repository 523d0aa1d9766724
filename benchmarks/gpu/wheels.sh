#!/usr/bin/env bash
# Wheels of lcc's dependencies that the GPU machine's image lacks (pydantic and its own dependencies, with the
# typing-extensions this pydantic-core needs: an image's older one would fail its import), for
# its Python (3.12, x86-64), into .whl/ of this repository (not committed: .whl/ is ignored). run.sh
# installs them there. Usage: bash benchmarks/gpu/wheels.sh [python version, default 3.12]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${1:-3.12}"
PIP="${PIP:-$REPO/.venv/bin/pip}"
mkdir -p "$REPO/.whl"
for pkg in pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  version="$("$PIP" show "$pkg" 2>/dev/null | sed -n 's/^Version: //p')"
  "$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$REPO/.whl" "$pkg${version:+==$version}"
done
ls -1 "$REPO/.whl"
