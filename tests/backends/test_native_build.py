"""How lcc's native CPU kernels are built, on any machine: an installation without a source or header is
refused with the file named (not an internal error), and a build says so once on stderr while a cached
library says nothing. A stand-in compiler writes the library, so no C++ compiler is needed."""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path

import pytest
from lcc.backends.cpu import native

BUILD_LINE = "building lcc's native CPU kernels (first use, about 15 s) in {}\n"


@pytest.fixture
def fresh(monkeypatch):
    """native.load and the build announcement as in a new process; afterwards as they were computed anew."""
    native.load.cache_clear()
    native._announce.cache_clear()
    yield
    native.load.cache_clear()
    native._announce.cache_clear()


def fake_compiler(folder: Path, reject_amx: bool = False) -> str:
    """A compiler that writes a placeholder library to its `-o` path (and rejects the AMX flags if asked)."""
    script = folder / "fake-cxx"
    amx = 'case "$*" in *-mamx-tile*) exit 1;; esac\n' if reject_amx else ""
    script.write_text(f'#!/bin/sh\n{amx}while [ $# -gt 0 ]; do [ "$1" = -o ] && echo lib > "$2"; shift; done\n')
    script.chmod(0o755)
    return str(script)


def without_header(tmp_path: Path, monkeypatch) -> Path:
    """The module pointed at a copy of csrc/ that lacks simd.h, as in a wheel that did not package it."""
    csrc = tmp_path / "csrc"
    shutil.copytree(native.CSRC, csrc)
    (csrc / "simd.h").unlink()
    monkeypatch.setattr(native, "CSRC", csrc)
    monkeypatch.setattr(native, "SOURCES", tuple(csrc / f.name for f in native.SOURCES))
    monkeypatch.setattr(native, "HEADERS", tuple(csrc / f.name for f in native.HEADERS))
    return csrc / "simd.h"


def test_the_header_is_packaged_with_the_sources():
    """pyproject's package data takes every file the kernels are built from."""
    import tomllib

    from tests.conftest import ROOT

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.name for pattern in patterns["lcc.backends.cpu"] for p in native.CSRC.parent.glob(pattern)}
    assert {f.name for f in (*native.SOURCES, *native.HEADERS)} <= shipped


def test_a_missing_header_is_refused_with_the_file_named(tmp_path, monkeypatch, fresh):
    header = without_header(tmp_path, monkeypatch)
    monkeypatch.setenv("LCC_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", fake_compiler(tmp_path))
    with pytest.raises(native.NativeKernelMissing, match=f"{header}.*this installation of lcc is incomplete"):
        native.load()
    assert not (tmp_path / "cache").exists()  # nothing built from the incomplete sources


@pytest.mark.skipif(sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the kernels' own platform check answers first elsewhere")
def test_a_missing_header_is_the_reason_the_kernels_cannot_run(tmp_path, monkeypatch, fresh):
    """unavailable() gives the reason that a launch is refused with (and the fall-back to PyTorch's kernels)."""
    header = without_header(tmp_path, monkeypatch)
    monkeypatch.setenv("LCC_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", fake_compiler(tmp_path))
    monkeypatch.setattr(native.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    why = native.unavailable()
    assert why is not None and str(header) in why
    with pytest.raises(native.NativeKernelMissing, match="cannot run here: their source .*simd.h"):
        native.require()


def test_a_build_says_so_once_and_a_cached_library_says_nothing(tmp_path, monkeypatch, capsys, fresh):
    """A compiler without AMX compiles twice (the AMX build is rejected, then the AVX-512 one): one line."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LCC_KERNEL_CACHE", str(cache))
    cxx = [fake_compiler(tmp_path, reject_amx=True)]
    assert native._build(cxx, native.BASE_FLAGS + native.AMX_FLAGS) == (None, False)
    path, _ = native._build(cxx, native.BASE_FLAGS)
    assert path is not None and path.parent == cache
    captured = capsys.readouterr()
    assert captured.err == BUILD_LINE.format(cache) and captured.out == ""
    native._announce.cache_clear()  # a later process: the library is in the cache
    assert native._build(cxx, native.BASE_FLAGS + native.AMX_FLAGS) == (None, False)
    assert native._build(cxx, native.BASE_FLAGS)[0] == path
    assert capsys.readouterr().err == ""


def test_a_build_that_fails_for_another_reason_does_not_turn_amx_off(tmp_path, monkeypatch, fresh):
    """A compiler that takes the AMX flags but fails the build (here every source; in life a full disk or a
    compiler killed for memory): the failure is reported, and no marker switches the AMX build off for good."""
    script = tmp_path / "failing-cxx"
    script.write_text('#!/bin/sh\ncase "$*" in *probe.cpp*) exit 0;; esac\necho "cc1plus: out of memory" >&2\nexit 1\n')
    script.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LCC_KERNEL_CACHE", str(cache))
    with pytest.raises(native.NativeKernelMissing, match="out of memory"):
        native._build([str(script)], native.BASE_FLAGS + native.AMX_FLAGS)
    assert not list(cache.glob("*.rejected")) and not list(cache.glob("*.tmp"))
