"""lcc's native CPU kernels (csrc/: the int4 experts, attention, routing): one library built with the
system's C++ compiler at first use, cached, and called through ctypes.

Needs Linux on x86-64 with AVX-512 (PyTorch's CPU capability "AVX512") and a C++ compiler (`$CXX`, else
g++ or c++). The AMX path is built when the compiler takes `-mamx-bf16` (a compiler that rejects it is
remembered in the cache) and used when the CPU has AMX and Linux grants its tile state. The library lands
in `$LCC_KERNEL_CACHE` (default `~/.cache/lcc/kernels`) under a name hashed from the sources, the flags and
the compiler's version, written atomically: concurrent ranks build it at most once each and never load a
partial file. A build says so in one line on stderr (it takes a few seconds); a cached library says nothing.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "int4_experts.cpp", CSRC / "decode_attention.cpp", CSRC / "routing.cpp")
HEADERS = (CSRC / "simd.h",)
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl"]
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16", "-DLCC_AMX"]
_P, _I = ctypes.c_void_p, ctypes.c_int


class NativeKernelMissing(RuntimeError):
    """The plan runs lcc's native CPU kernels and this machine cannot build or run them."""


@dataclass(frozen=True)
class Library:
    lib: ctypes.CDLL
    path: Path
    amx: bool  # the AMX path is built and this process may use AMX tiles


def cache_dir() -> Path:
    env = os.environ.get("LCC_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lcc" / "kernels"


def compiler() -> list[str] | None:
    """The C++ compiler command: `$CXX` (which may carry arguments, such as `ccache g++`), else g++ or c++."""
    if os.environ.get("CXX", "").strip():
        return shlex.split(os.environ["CXX"])
    found = shutil.which("g++") or shutil.which("c++")
    return [found] if found else None


def unavailable() -> str | None:
    """None when the kernel can run here (building it if needed), else why not (one sentence)."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return f"it needs a CPU with AVX-512 (PyTorch reports {capability})"
    if compiler() is None:
        return "it is built at first use and no C++ compiler was found (install g++ or set CXX)"
    try:
        load()
    except NativeKernelMissing as exc:
        return str(exc)
    return None


def require() -> Library:
    why = unavailable()
    if why is not None:
        raise NativeKernelMissing(f"lcc's native CPU kernels cannot run here: {why}")
    return load()


@functools.cache
def load() -> Library:
    cxx = compiler()
    if cxx is None:
        raise NativeKernelMissing("no C++ compiler was found (install g++ or set CXX)")
    path, amx = _build(cxx, BASE_FLAGS + AMX_FLAGS)
    if path is None:  # a compiler without AMX intrinsics: the AVX-512 path alone
        path, _ = _build(cxx, BASE_FLAGS)
        amx = False
    lib = ctypes.CDLL(str(path))
    # (x, counts, E, codes, scales, shifts, N, K, group, out, threads, amx_min_rows)
    lib.lcc_int4_matmul.argtypes = [_P, _P, _I, _P, _P, _P, _I, _I, _I, _P, _I, _I]
    lib.lcc_int4_matmul.restype = None
    # (x, counts, E, bf16, w13 codes, scales, shifts, w2 codes, scales, shifts, D, F, group, out, threads,
    #  amx_min_rows)
    lib.lcc_int4_swiglu.argtypes = [_P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _I, _I]
    lib.lcc_int4_swiglu.restype = None
    # (x, T, D, centroids, G, weight, E, bias, temperature, top, softmax, K, k min, threshold, renormalize,
    #  gate scale, experts, gates, mask, k, counts, threads)
    _F = ctypes.c_float
    lib.lcc_route.argtypes = [_P, _I, _I, _P, _I, _P, _I, _P, _F, _I, _I, _I, _I, _F, _I, _F, _P, _P, _P, _P, _P, _I]
    lib.lcc_route.restype = None
    # (q, k, v, both, sign, slots, T, H, KV, d, bf16, q out, k cache, v cache, threads)
    lib.lcc_rope_cache.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P, _P, _P, _I]
    lib.lcc_rope_cache.restype = None
    # (q, k cache, v cache, rows, slots, lengths, n, longest, H, KV, d, bf16, out, threads)
    lib.lcc_decode_attention.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _I]
    lib.lcc_decode_attention.restype = None
    amx = amx and _cpu_has_amx() and lib.lcc_int4_amx_init() == 0
    return Library(lib, path, amx)


def _build(cxx: list[str], flags: list[str]) -> tuple[Path | None, bool]:
    """The library built with `flags` (cached); (None, False) when the compiler rejects AMX flags (also
    cached: a marker file, so that later processes do not try again)."""
    key = hashlib.sha256(_sources() + " ".join(flags).encode() + _version(cxx).encode()).hexdigest()[:16]
    try:
        return _build_in(cache_dir(), key, cxx, flags)
    except OSError as exc:  # the cache cannot be written (a read-only home): a private temporary folder
        if os.environ.get("LCC_KERNEL_CACHE"):
            raise NativeKernelMissing(f"cannot write the kernel cache {cache_dir()} (LCC_KERNEL_CACHE): "
                                      f"{exc}") from None
        return _build_in(Path(tempfile.gettempdir()) / f"lcc-kernels-{os.getuid()}", key, cxx, flags)


def _sources() -> bytes:
    """The sources and headers the library is built (and named) from. An installation that lacks one cannot
    build the kernels: NativeKernelMissing naming the file, so that the launch is refused with the way out."""
    parts = []
    for f in (*SOURCES, *HEADERS):
        try:
            parts.append(f.read_bytes())
        except OSError as exc:
            raise NativeKernelMissing(f"their source {f} cannot be read ({exc.strerror or exc}): this installation "
                                      "of lcc is incomplete") from None
    return b"".join(parts)


def _version(cxx: list[str]) -> str:
    """The compiler's `--version` text, part of the library's name: a new compiler builds a new library."""
    try:
        return subprocess.run([*cxx, "--version"], capture_output=True, text=True).stdout
    except OSError as exc:
        raise NativeKernelMissing(f"the C++ compiler {' '.join(cxx)} cannot be run ({exc.strerror or exc})") from None


@functools.cache
def _announce(folder: Path) -> None:
    """One line on stderr when a build starts (a few silent seconds otherwise); nothing when it is cached."""
    print(f"building lcc's native CPU kernels (first use, about 5 s) in {folder}", file=sys.stderr, flush=True)


def _build_in(folder: Path, key: str, cxx: list[str], flags: list[str]) -> tuple[Path | None, bool]:
    path = folder / f"lcc_cpu_kernels-{key}.so"
    rejected = path.with_suffix(".rejected")
    amx = "-DLCC_AMX" in flags
    if path.exists():
        return path, amx
    if amx and rejected.exists():
        return None, False
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + "-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        _announce(folder)  # the folder is writable: the build happens here
        done = subprocess.run([*cxx, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            if amx:
                rejected.write_text(done.stderr)
                return None, False
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise NativeKernelMissing(f"{' '.join(cxx)} could not build lcc's CPU kernels ({CSRC}):\n{tail}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path, amx


def _cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags and " amx_tile" in flags
