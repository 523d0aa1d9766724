"""What `lcc run train` refuses before any rank starts: one message, exit code 2, nothing started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lcc.cache import write_atomically
from lcc.cli import app
from lcc.plan import read_plan
from lcc.runtime.preflight import GIB, RANK_BASE_BYTES, LaunchRefused, check_machine, check_writable, rank_bytes
from tests.conftest import ROOT, SPECS

GENERATED = ROOT / "generated"


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_steps_must_be_positive(steps):
    result = run("run", "train", str(SPECS / "tiny-moe.yaml"), "--steps", steps)
    assert result.exit_code == 2
    assert f"--steps {steps}: the number of optimizer steps to run must be at least 1" in result.output


def test_a_cuda_plan_of_2048_ranks_is_refused_at_once():
    result = run("run", "train", str(GENERATED / "longcat-2.0"), "--steps", "1")
    assert result.exit_code == 2
    assert "the plan runs on CUDA GPUs (cluster.device.kind: cuda) and this machine has none" in result.output


def test_a_serve_plan_is_not_trained():
    result = run("run", "train", str(GENERATED / "tiny-moe" / "serve"), "--steps", "1")
    assert result.exit_code == 2
    assert "a serve plan; lcc run train executes train plans" in result.output


def test_a_folder_that_is_not_a_plan(tmp_path):
    result = run("run", "train", str(tmp_path), "--steps", "1")
    assert result.exit_code == 2
    assert f"{tmp_path / 'plan.json'}: missing (not a compiled plan folder" in result.output


def test_a_fifo_is_not_read_as_a_spec(tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    for command in (["validate"], ["report"], ["run", "train"]):
        result = run(*command, str(fifo))
        assert result.exit_code == 2, command
        assert f"{fifo}: cannot read spec: not a regular file" in result.output


@pytest.mark.parametrize(("option", "message"), [("--metrics", "is not a folder"),
                                                 ("--checkpoint-dir", "exists and is not a folder")])
def test_unwritable_outputs_are_found_before_training(tmp_path, option, message):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = blocker / "metrics.jsonl" if option == "--metrics" else blocker
    result = run("run", "train", str(GENERATED / "tiny-moe"), "--steps", "1", option, str(path))
    assert result.exit_code == 2
    assert f"{option} {path}: " in result.output and message in result.output


@pytest.fixture
def no_ranks(monkeypatch):
    """The calls that would have started a run's ranks (none, when the run is refused)."""
    import lcc.runtime.launch

    started = []
    monkeypatch.setattr(lcc.runtime.launch, "_launch", lambda *args: started.append(args))
    return started


needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")


@needs_proc
@pytest.mark.parametrize("option, path", [("--metrics", "/proc/lcc.jsonl"), ("--transcript", "/proc/lcc.jsonl"),
                                          ("--checkpoint-dir", "/proc/lcc-ckpt"), ("--metrics", "/proc/a/b.jsonl")])
def test_an_output_that_cannot_be_created_is_refused_before_any_rank_starts(no_ranks, option, path):
    """Nothing can be created in /proc, which permission bits (and os.access) call writable for root: the
    check creates what it checks, in the command and in the launcher it calls."""
    from lcc.runtime.launch import launch

    result = run("run", "train", str(GENERATED / "tiny-moe"), "--steps", "1", option, path)
    assert result.exit_code == 2 and no_ranks == []
    assert result.stderr.startswith(f"lcc: {option} {path}: cannot create it in /proc (")
    assert result.stderr.count("\n") == 1
    keyword = {"--metrics": "metrics", "--transcript": "transcript", "--checkpoint-dir": "checkpoints"}[option]
    with pytest.raises(LaunchRefused, match=f"^{option} {path}: cannot create it in /proc"):
        launch(GENERATED / "tiny-moe", 1, **{keyword: Path(path)})
    assert no_ranks == []


@needs_proc
def test_compile_export_and_cache_outputs_are_tried_before_any_work(monkeypatch):
    import lcc.inspect.target

    result = run("compile", str(SPECS / "tiny-moe.yaml"), "--out", "/proc/lcc-plan")
    assert result.exit_code == 2
    assert result.stderr.startswith("lcc: --out /proc/lcc-plan: cannot create it in /proc (")
    monkeypatch.setattr(lcc.inspect.target, "load", lambda *args: pytest.fail("compiled before checking --out"))
    result = run("plan", "export", str(GENERATED / "tiny-moe"), "--format", "csv", "--out", "/proc/lcc.csv")
    assert result.exit_code == 2
    assert result.stderr.startswith("lcc: --out /proc/lcc.csv: cannot create it in /proc (")
    monkeypatch.chdir("/proc")  # the run cache, .lcc-cache/ in the working directory
    result = run("run", "train", str(SPECS / "tiny-moe.yaml"), "--steps", "1")
    assert result.exit_code == 2
    assert result.stderr.startswith("lcc: the run cache .lcc-cache/tiny-moe-")
    assert ": cannot create it in /proc (" in result.stderr


def test_checking_an_output_changes_nothing(tmp_path):
    """An existing file is not truncated (a resumed run appends to its metrics); what the check creates to
    try is removed again."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    check_writable(metrics, "--metrics")
    check_writable(tmp_path / "new.jsonl", "--transcript")
    check_writable(tmp_path / "runs" / "a" / "m.jsonl", "--metrics")
    check_writable(tmp_path / "ckpt", "--checkpoint-dir", folder=True)
    check_writable(tmp_path, "--checkpoint-dir", folder=True)
    assert metrics.read_text() == '{"step": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_resume_from_a_missing_directory_is_refused(no_ranks, tmp_path):
    mistyped = tmp_path / "ckpt-typo"
    result = run("run", "train", str(GENERATED / "tiny-moe"), "--steps", "1", "--checkpoint-dir", str(mistyped),
                 "--resume")
    assert result.exit_code == 2 and no_ranks == []
    assert result.stderr == (f"lcc run train: {mistyped}: no checkpoint to resume from (no such directory); "
                             "--resume-if-any starts at step 0 when there is none\n")
    assert not mistyped.exists()
    from lcc.runtime.launch import launch

    with pytest.raises(LaunchRefused, match=f"^{mistyped}: no such file or directory"):  # --init-from: the same
        launch(GENERATED / "tiny-moe", 1, init_from=mistyped)
    assert no_ranks == []


def test_compile_out_must_be_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("compile", str(SPECS / "tiny-moe.yaml"), "--set", "train.steps=5", "--out", str(blocker))
    assert result.exit_code == 2
    assert f"--out {blocker}: exists and is not a folder" in result.output


def test_the_machine_must_hold_the_ranks():
    plan = read_plan(GENERATED / "tiny-moe")  # 8 ranks
    need = sum(rank_bytes(plan))
    assert need >= 8 * RANK_BASE_BYTES
    check_machine(plan, force=False, cores=2, memory=need + 1)
    with pytest.raises(LaunchRefused, match=r"the plan's 8 ranks need about .* GiB here .* more than the 1.0 GiB"):
        check_machine(plan, force=False, cores=2, memory=GIB)
    with pytest.raises(LaunchRefused, match="the plan has 8 ranks .* more than 16 per core on this machine's 0"):
        check_machine(plan, force=False, cores=0.25, memory=need + 1)
    check_machine(plan, force=True, cores=1, memory=1)  # --force


def test_a_model_this_machine_cannot_hold_is_refused(tmp_path):
    """10^12 experts on a device said to have 10^9 GiB: the cost model's per-rank bytes against this
    machine's memory, before any rank allocates them."""
    result = run("run", "train", str(SPECS / "tiny-moe.yaml"), "--steps", "1",
                 "--set", "model.moe.n_experts=1000000000000", "--set", "model.moe.n_groups=8",
                 "--set", "cluster.device.memory_gib=1000000000")
    assert result.exit_code == 2, result.output
    assert "the plan's 8 ranks need about" in result.output and "available on this machine" in result.output


def test_report_exits_1_when_the_layout_does_not_fit():
    result = run("report", str(SPECS / "longcat-2.0.yaml"), "--set", "cluster.device.memory_gib=8")
    assert result.exit_code == 1
    assert "does NOT fit" in result.output
    assert run("report", str(SPECS / "tiny-moe.yaml")).exit_code == 0


def test_version_and_help():
    from lcc import __version__

    assert run("--version").output.strip() == f"lcc {__version__}"
    assert "<bool>" not in run("run", "train", "--help").output
    assert "--force" in run("run", "train", "--help").output


def test_the_run_cache_is_written_whole(tmp_path):
    folder = tmp_path / "tiny-moe-0123"
    folder.mkdir()  # a partly written folder (no plan.json) is replaced, not trusted
    (folder / "programs").mkdir()
    write_atomically({"plan.json": "{}\n", "programs/stage0.py": "x = 1\n"}, folder)
    assert sorted(p.name for p in folder.rglob("*")) == ["plan.json", "programs", "stage0.py"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_cuda_plan_needs_gpus_and_for_serving_triton(monkeypatch):
    """The launcher's device check (lcc.runtime.device): no GPU, too few, or no Triton for a serve plan whose
    experts run on the Triton kernels; each refused before any rank starts, never run on the CPU instead."""
    import lcc.backends.triton as triton_backend
    import torch

    from lcc.runtime.device import check_device

    serve = read_plan(GENERATED / "tiny-moe" / "serve")
    serve.device, serve.backend = "cuda", "triton"
    with pytest.raises(LaunchRefused, match="runs on CUDA GPUs .* this machine has none"):
        check_device(serve, serve.world_size)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LaunchRefused, match="starts 8 ranks of one GPU each on this machine .* it has 2 GPUs"):
        check_device(serve, serve.world_size)
    monkeypatch.setattr(triton_backend, "available", lambda: "Triton is not installed (pip install 'lcc[gpu]')")
    with pytest.raises(LaunchRefused, match="run on the Triton kernels .*: Triton is not installed"):
        check_device(serve, 2)
    serve.backend = "torch"  # float64 serving and training need no Triton
    check_device(serve, 2)


def test_bfloat16_on_a_cpu_without_bfloat16_matrix_instructions_is_warned_of(monkeypatch):
    """A CPU plan in bfloat16 where oneDNN reports no bfloat16 support (no AVX512-BF16 or AMX) runs, with a
    warning naming the field to change; a CPU that has them, float32 and CUDA plans get none."""
    import torch

    from lcc.runtime.device import slow_bfloat16

    serve, train = read_plan(GENERATED / "tiny-moe" / "serve"), read_plan(GENERATED / "tiny-moe")
    serve.dtype = train.dtype = "bfloat16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert "--set serve.dtype=float32 runs faster here" in slow_bfloat16(serve)
    assert "no bfloat16 matrix instructions (PyTorch's CPU capability: " in slow_bfloat16(train)
    assert "--set train.dtype=float32" in slow_bfloat16(train)
    train.device = "cuda"
    assert slow_bfloat16(train) is None
    serve.dtype = "float32"
    assert slow_bfloat16(serve) is None
    serve.dtype = "bfloat16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert slow_bfloat16(serve) is None


def test_generate_refuses_a_cuda_plan_here():
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run("run", "generate", str(SPECS / "tiny-moe.yaml"), "--set", "cluster.device.kind=cuda",
                 "--prompt", "a")
    assert result.exit_code == 2
    assert "the plan runs on CUDA GPUs (cluster.device.kind: cuda) and this machine has none" in result.output


def test_threads_per_rank_share_the_cores_this_process_may_use(monkeypatch):
    """The cores of the process's CPU affinity (taskset, container CPU sets), not the machine's, shared among
    the ranks; LCC_THREADS chooses the number instead, and a bad value is refused before any rank starts."""
    from lcc.runtime import threads

    monkeypatch.delenv("LCC_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5, 7})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert [threads.threads_per_rank(n) for n in (1, 2, 4, 8)] == [6, 3, 1, 1]
    monkeypatch.setenv("LCC_THREADS", "2")
    assert threads.threads_per_rank(8) == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("LCC_THREADS", bad)
        with pytest.raises(LaunchRefused, match="LCC_THREADS"):
            threads.threads_per_rank(1)


def test_host_memory_is_kept_for_the_next_step_unless_told_otherwise(monkeypatch):
    """A rank raises glibc's mmap and trim thresholds (lcc.runtime.host_memory); LCC_HOST_MALLOC=system keeps
    glibc's own, and another value is refused before any rank starts (in a child process: the thresholds are
    the process's)."""
    import platform
    import subprocess
    import sys

    from lcc.runtime import host_memory

    code = "from lcc.runtime.host_memory import keep_freed_memory; print(keep_freed_memory())"
    for choice, took in (("reuse", "True"), ("system", "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "LCC_HOST_MALLOC": choice}).stdout.strip()
        assert out == (took if platform.libc_ver()[0] == "glibc" else "False")
    monkeypatch.setenv("LCC_HOST_MALLOC", "jemalloc")
    with pytest.raises(LaunchRefused, match="LCC_HOST_MALLOC='jemalloc'"):
        host_memory.choice()
    result = run("run", "train", str(SPECS / "tiny-moe.yaml"), "--steps", "1")
    assert result.exit_code != 0 and "LCC_HOST_MALLOC='jemalloc'" in result.output
