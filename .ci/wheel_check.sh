#!/usr/bin/env bash
# lcc as a user installs it: the wheel, built from this checkout, installed into a new virtual environment
# (no editable install) and run from a folder outside the checkout: `lcc report`, `lcc compile` and
# `lcc run generate` on lcc's native CPU kernels, built at first use from the sources the wheel carries.
#
# Dependencies: the new environment gets lcc from the wheel alone (`pip install --no-deps`); the packages it
# depends on (torch among them, about 1 GB) are not downloaded again but taken from .venv, whose
# site-packages folder a .pth file appends to the new environment's path. Python adds such a folder as a
# plain path entry without running the .pth files in it, so .venv's editable install of lcc (a .pth hook
# that maps lcc to this checkout) stays inactive; the script checks that lcc is imported from the new
# environment and that no folder of the checkout is on the path. `pip check` checks the wheel's declared
# dependencies against what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lcc-wheel-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SECONDS=0
say() { echo "wheel check (${SECONDS} s): $*" >&2; }
fail() { echo "wheel check: FAILED: $*" >&2; exit 1; }

# The wheel, built from a copy of the files git knows (committed, or new and not ignored): a stale build/
# folder in the checkout cannot leak removed files into it.
"$PY" - "$ROOT" "$WORK/src" <<'PY'
import shutil, subprocess, sys
from pathlib import Path

root, dest = Path(sys.argv[1]), Path(sys.argv[2])
listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                         "--", "pyproject.toml", "README.md", "lcc", "backends"],
                        check=True, capture_output=True, text=True).stdout.split("\0")
for name in filter(None, listed):
    if (root / name).is_file():  # a file deleted but not yet committed is listed too
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
PY
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src" >/dev/null
WHEEL=$(ls "$WORK"/dist/lcc-*.whl)
say "built $(basename "$WHEEL")"

"$PY" -m venv --without-pip "$WORK/venv"
VPY=$WORK/venv/bin/python
site() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
VSITE=$(site "$VPY")
site "$PY" > "$VSITE/lcc-wheel-check-dependencies.pth"
"$PY" -m pip --python "$VPY" install --quiet --no-deps --no-index "$WHEEL"
"$PY" -m pip --python "$VPY" check >/dev/null || "$PY" -m pip --python "$VPY" check >&2 || fail "pip check"
say "installed into a new environment"

# The native kernels where this machine runs them (as the tests decide, with .venv's lcc and its kernel
# cache), else PyTorch's, said so
NATIVE=$("$PY" -c "from lcc.backends.cpu.native import unavailable; print(unavailable() or '')")
KERNELS=()
[ -z "$NATIVE" ] || { KERNELS=(--set serve.cpu_kernels=torch); say "no native kernels here ($NATIVE)"; }

mkdir "$WORK/run"
cd "$WORK/run"
cp "$ROOT/specs/tiny-moe.yaml" .
export LCC_KERNEL_CACHE=$WORK/kernels PYTHONNOUSERSITE=1
unset PYTHONPATH
"$VPY" - "$VSITE" "$ROOT" <<'PY' || fail "the installed lcc (above)"
import sys
from pathlib import Path

import lcc
from lcc.backends.cpu import native

site, root = Path(sys.argv[1]), Path(sys.argv[2])
for module in (lcc, native):
    assert Path(module.__file__).is_relative_to(site), f"{module.__name__} from {module.__file__}, not {site}"
assert all(f.is_file() for f in (*native.SOURCES, *native.HEADERS)), "the kernels' sources are not all installed"
on_path = [p for p in sys.path if p and Path(p).resolve().is_relative_to(root) and ".venv" not in Path(p).parts]
assert not on_path, f"the checkout is on sys.path: {on_path}"
PY

"$WORK/venv/bin/lcc" report tiny-moe.yaml > report.txt || fail "lcc report"
grep -q "fits" report.txt || fail "lcc report printed no memory verdict"
say "lcc report"

# Two ranks (the spec's two pipeline stages, without its four data-parallel copies): a multi-process launch,
# at a quarter of the spec's eight processes on a small machine
"$WORK/venv/bin/lcc" compile tiny-moe.yaml --mode serve --out "$WORK/plan" --set parallelism.dp=1 \
  --set parallelism.ep=1 --set cluster.gpus_per_node=2 ${KERNELS[@]+"${KERNELS[@]}"} >/dev/null || fail "lcc compile"
say "lcc compile"

"$WORK/venv/bin/lcc" run generate "$WORK/plan" --prompt-ids 72,101 --max-tokens 4 --json \
  > generate.json 2> generate.err || { cat generate.err >&2; fail "lcc run generate"; }
"$VPY" - "$WORK/plan/plan.json" generate.json "${NATIVE:+torch}" <<'PY' || { cat generate.err >&2; fail "lcc run generate"; }
import json, sys

serving = json.load(open(sys.argv[1]))["serving"]
kernels = {serving["expert_kernel"], serving["attention_kernel"], serving["routing_kernel"]}
want = {"int4_packed_cpu", "torch"} if sys.argv[3] else {"int4_native_cpu", "native_cpu"}
assert kernels == want, f"the plan runs {kernels}, not {want}"
result = json.loads(open(sys.argv[2]).read())
assert len(result["token_ids"]) == 4 and result["finish_reason"] == "length", result
PY
if [ -z "$NATIVE" ]; then
  ls "$LCC_KERNEL_CACHE"/lcc_cpu_kernels-*.so >/dev/null 2>&1 || fail "no native kernels were built in $LCC_KERNEL_CACHE"
  grep -q "building lcc's native CPU kernels" generate.err || fail "the kernels' build was not announced"
fi
say "lcc run generate: $(cat generate.json)"
say "passed"
