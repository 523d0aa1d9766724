"""lcc's native CPU kernels (csrc/: the int4 experts, attention, routing) as PyTorch operators,
`torch.ops.lcc.*` (csrc/ops.cpp: the schemas, and checks on every tensor before a kernel runs): one library
built with the system's C++ compiler at first use against the installed PyTorch (its headers, libraries and
ABI flag, from torch.utils.cpp_extension), cached, and loaded with torch.ops.load_library. The fake
implementations registered here let torch.compile and torch.fx trace through the operators.

Needs Linux on x86-64 with AVX-512 or AVX2 (PyTorch's CPU capability "AVX512" or "AVX2": the library is built
for that instruction set, so `ATEN_CPU_CAPABILITY=avx2` builds and runs the AVX2 one on an AVX-512 CPU) and a
C++ compiler (`$CXX`, else g++ or c++) that takes C++20. Both builds compute the same bits on their common
paths (csrc/simd.h); AVX-512's adds AVX512-BF16 dot products where the CPU has them, and AMX: the AMX path
is built when the compiler takes `-mamx-bf16` (a compiler that rejects it is remembered in the cache) and
used when the CPU has AMX and Linux grants its tile state. The
library lands in `$LCC_KERNEL_CACHE` (default `~/.cache/lcc/kernels`) under a name hashed from the sources,
the flags, the compiler's version and PyTorch's, written atomically: concurrent ranks build it at most once
each and never load a partial file. The sources compile in parallel; a build says so in one line on stderr
(it takes some seconds); a cached library says nothing.
"""

from __future__ import annotations

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
SOURCES = (CSRC / "int4_experts.cpp", CSRC / "decode_attention.cpp", CSRC / "routing.cpp", CSRC / "dense_bf16.cpp",
           CSRC / "rows.cpp", CSRC / "ops.cpp")
HEADERS = (CSRC / "simd.h", CSRC / "kernels.h")
COMMON_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fPIC", "-fopenmp"]
ISA_FLAGS = {"avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl"], "avx2": ["-mavx2", "-mfma"]}
CAPABILITIES = {"AVX512": "avx512", "AVX2": "avx2"}  # PyTorch's CPU capability: the build for it
BASE_FLAGS = COMMON_FLAGS + ISA_FLAGS["avx512"]
AVX2_FLAGS = COMMON_FLAGS + ISA_FLAGS["avx2"]
AMX_FLAGS = ["-mamx-tile", "-mamx-bf16", "-DLCC_AMX"]


class NativeKernelMissing(RuntimeError):
    """The plan runs lcc's native CPU kernels and this machine cannot build or run them."""


@dataclass(frozen=True)
class Library:
    path: Path
    amx: bool  # the AMX path is built and this process may use AMX tiles
    isa: str = "avx512"  # the instruction set it is built for: "avx512" or "avx2"

    @property
    def ops(self):
        """The operators, `torch.ops.lcc`."""
        return torch.ops.lcc


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
    if isa() is None:
        return f"it needs a CPU with AVX2 or AVX-512 (PyTorch reports {torch.backends.cpu.get_cpu_capability()})"
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


def isa() -> str | None:
    """The instruction set the library is built for here ("avx512" or "avx2", from PyTorch's CPU capability),
    or None where neither is available."""
    return CAPABILITIES.get(torch.backends.cpu.get_cpu_capability())


@functools.cache
def load() -> Library:
    cxx = compiler()
    if cxx is None:
        raise NativeKernelMissing("no C++ compiler was found (install g++ or set CXX)")
    kind = isa()
    if kind is None:
        raise NativeKernelMissing(f"it needs a CPU with AVX2 or AVX-512 (PyTorch reports "
                                  f"{torch.backends.cpu.get_cpu_capability()})")
    if kind == "avx2":
        path, amx = _build(cxx, AVX2_FLAGS)
    else:
        path, amx = _build(cxx, BASE_FLAGS + AMX_FLAGS)
        if path is None:  # a compiler without AMX intrinsics: the AVX-512 path alone
            path, _ = _build(cxx, BASE_FLAGS)
            amx = False
    torch.ops.load_library(str(path))
    _register_fakes()
    amx = amx and _cpu_has_amx() and torch.ops.lcc.amx_init()
    return Library(path, amx, kind)


def _build(cxx: list[str], flags: list[str]) -> tuple[Path | None, bool]:
    """The library built with `flags` (cached); (None, False) when the compiler rejects AMX flags (also
    cached: a marker file, so that later processes do not try again)."""
    compile_flags, link_flags = _torch_flags()
    named = [*flags, *compile_flags, *link_flags, torch.__version__]
    key = hashlib.sha256(_sources() + " ".join(named).encode() + _version(cxx).encode()).hexdigest()[:16]
    try:
        return _build_in(cache_dir(), key, cxx, flags)
    except OSError as exc:  # the cache cannot be written (a read-only home): a private temporary folder
        if os.environ.get("LCC_KERNEL_CACHE"):
            raise NativeKernelMissing(f"cannot write the kernel cache {cache_dir()} (LCC_KERNEL_CACHE): "
                                      f"{exc}") from None
        return _build_in(Path(tempfile.gettempdir()) / f"lcc-kernels-{os.getuid()}", key, cxx, flags)


def _torch_flags() -> tuple[list[str], list[str]]:
    """What building against the installed PyTorch takes: its ABI flag and headers (compiling), its
    libraries (linking), as torch.utils.cpp_extension names them."""
    from torch.utils import cpp_extension

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    libs = cpp_extension.library_paths()
    return ([abi, *(f"-I{p}" for p in cpp_extension.include_paths())],
            [*(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch", "-ltorch_cpu"])


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
    print(f"building lcc's native CPU kernels (first use, about 15 s) in {folder}", file=sys.stderr, flush=True)


def _build_in(folder: Path, key: str, cxx: list[str], flags: list[str]) -> tuple[Path | None, bool]:
    path = folder / f"lcc_cpu_kernels-{key}.so"
    rejected = path.with_suffix(".rejected")
    amx = "-DLCC_AMX" in flags
    if path.exists():
        return path, amx
    if amx and rejected.exists():
        return None, False
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=path.stem + "-", suffix=".tmp", dir=folder))
    try:
        _announce(folder)  # the folder is writable: the build happens here
        errors = _compile(cxx, flags, work)
        if errors is None:
            done = subprocess.run([*cxx, *flags, "-shared", *(str(work / f"{src.stem}.o") for src in SOURCES),
                                   *_torch_flags()[1], "-o", str(work / path.name)], capture_output=True, text=True)
            errors = done.stderr if done.returncode else None
        if errors is not None:
            if amx and not _takes(cxx, AMX_FLAGS, work):  # the AMX flags, not the build, failed: remembered
                rejected.write_text(errors)
                return None, False
            tail = "\n".join(errors.strip().splitlines()[-5:])
            raise NativeKernelMissing(f"{' '.join(cxx)} could not build lcc's CPU kernels ({CSRC}):\n{tail}")
        os.replace(work / path.name, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path, amx


def _compile(cxx: list[str], flags: list[str], work: Path) -> str | None:
    """Every source compiled into `work` at once, one compiler process each; None, or the first failure's
    messages."""
    compile_flags = _torch_flags()[0]
    running: list[subprocess.Popen] = []
    try:
        for src in SOURCES:
            running.append(subprocess.Popen([*cxx, *flags, *compile_flags, "-c", str(src), "-o",
                                             str(work / f"{src.stem}.o")],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        errors = [p.communicate()[1] for p in running]  # a process blocked on a full pipe waits for its turn
    finally:  # interrupted (or a compiler that cannot start): none left running
        for p in running:
            if p.poll() is None:
                p.kill()
                p.wait()
    return next((err for p, err in zip(running, errors, strict=True) if p.returncode != 0), None)


def _takes(cxx: list[str], flags: list[str], work: Path) -> bool:
    """Whether the compiler compiles an empty file with `flags` (a failed build is the flags' fault, or not)."""
    probe = work / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    done = subprocess.run([*cxx, *flags, "-c", str(probe), "-o", str(work / "probe.o")], capture_output=True)
    return done.returncode == 0


@functools.cache
def _register_fakes() -> None:
    """Fake implementations of the operators (their outputs' shapes and dtypes from their inputs'), so that
    torch.compile and torch.fx trace through them without running a kernel. Once a process."""

    @torch.library.register_fake("lcc::simd_exp")
    def _(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lcc::int4_matmul")
    def _(x, counts, codes, scales, shifts, group_size, amx_min_rows):
        return x.new_empty(x.shape[0], codes.shape[1] * 16, dtype=torch.float32)

    @torch.library.register_fake("lcc::int4_swiglu")
    def _(x, counts, codes13, scales13, shifts13, codes2, scales2, shifts2, group_size, amx_min_rows,
          dot_products=None):
        return x.new_empty(x.shape[0], codes2.shape[1] * 16)

    @torch.library.register_fake("lcc::rope_cache")
    def _(q, k, v, both, sign, slots, k_cache, v_cache):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lcc::decode_attention")
    def _(q, k_cache, v_cache, rows, slots, lengths, out):
        return None

    @torch.library.register_fake("lcc::bf16_linear")
    def _(x, weight, dot_products=None):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("lcc::route")
    def _(x, centroids, weight, bias, temperature, top, softmax, k, k_min, threshold, renormalize, gate_scale):
        T, E = x.shape[0], weight.shape[0]
        S = torch.library.get_ctx().new_dynamic_size()  # the used slots: known once routed
        i64, f32 = torch.int64, torch.float32
        return (x.new_empty(T, k, dtype=i64), x.new_empty(T, k, dtype=f32), x.new_empty(T, k, dtype=torch.bool),
                x.new_empty(T, dtype=i64), x.new_empty(E, dtype=i64), x.new_empty(E, dtype=torch.float64),
                x.new_empty(S, dtype=i64), x.new_empty(S, dtype=f32))

    @torch.library.register_fake("lcc::bf16_swiglu")
    def _(x, counts, w1, w3, w2, dot_products=None):
        return x.new_empty(x.shape[0], w2.shape[1])

    @torch.library.register_fake("lcc::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lcc::decode_layer")
    def _(x, *args):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lcc::combine")
    def _(y, token_S, gate_S, tokens):
        return y.new_empty(tokens, y.shape[1])


def _cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags and " amx_tile" in flags
