from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
SHIPPED = sorted(SPECS.glob("*.yaml"))


def native_cpu_kernels() -> str | None:
    """None when lcc's native CPU kernels run here, else why not: CPU serving in bfloat16 and float32 then
    goes through PyTorch's kernels (`serve.cpu_kernels=torch`) in tests that are not about the kernels."""
    from lcc.backends.cpu.native import unavailable

    return unavailable()


def cpu_kernels_here() -> list[str]:
    """`--set` arguments choosing the CPU kernels this machine runs."""
    return [] if native_cpu_kernels() is None else ["--set", "serve.cpu_kernels=torch"]


@pytest.fixture
def tiny_text() -> str:
    return (SPECS / "tiny-moe.yaml").read_text()


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle`."""
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in text")


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers), each rank of a run started by a test takes one
    intra-op thread (LCC_THREADS, docs/runtime.md): the workers share the cores, and a rank's threads that
    spin waiting for a core the other worker holds make its steps many times slower."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        os.environ.setdefault("LCC_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and spinning threads collapse when the two cores
    are shared with other processes; multi-rank tests set their own."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)
