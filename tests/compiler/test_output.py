"""Writing plan folders: stale programs of an older layout go away, and nothing else is ever touched."""

from __future__ import annotations

from lcc.compiler.output import first_difference, write
from tests.conftest import ROOT


def plan_files(n_stages: int) -> dict[str, str]:
    files = {"plan.json": "{}\n", "spec.json": "{}\n", "actions.txt": "", "schedule.csv": ""}
    files.update({f"programs/stage{s}.py": f"# stage {s}\n" for s in range(n_stages)})
    return files


def test_write_removes_programs_of_an_older_layout(tmp_path):
    out = tmp_path / "plan"
    write(plan_files(4), out)  # pp 4
    removed = write(plan_files(2), out)  # then pp 2
    assert removed == [out / "programs/stage2.py", out / "programs/stage3.py"]
    assert sorted(p.name for p in (out / "programs").iterdir()) == ["stage0.py", "stage1.py"]
    assert first_difference(plan_files(2), out) is None


def test_write_touches_nothing_but_python_files_in_programs(tmp_path):
    out = tmp_path / "plan"
    keep = [out / "programs" / "notes.txt", out / "programs" / "stage9.py.tmp", out / "programs" / "old" / "x.py",
            out / "stage7.py", tmp_path / "stage8.py"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine\n")
    (out / "programs" / "dir.py").mkdir()
    assert write(plan_files(2), out) == []
    assert all(path.read_text() == "mine\n" for path in keep)
    assert (out / "programs" / "dir.py").is_dir()


def test_write_never_deletes_through_a_linked_programs_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "stage5.py").write_text("not lcc's\n")
    out = tmp_path / "plan"
    out.mkdir()
    (out / "programs").symlink_to(elsewhere)
    write(plan_files(1), out)
    assert (elsewhere / "stage5.py").read_text() == "not lcc's\n"


def test_check_names_a_stale_program(tmp_path):
    out = tmp_path / "plan"
    write(plan_files(4), out)
    diff = first_difference(plan_files(2), out)
    assert diff is not None and diff.startswith(f"{out / 'programs' / 'stage2.py'}: not produced by the compiler")


def test_cli_check_reports_and_compile_removes_a_stale_program(tmp_path, monkeypatch):
    """In process (the CLI's own app), so that three compiles cost no interpreter starts."""
    from typer.testing import CliRunner

    from lcc.cli import app

    monkeypatch.chdir(ROOT)
    world1 = ["parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1"]
    sets = [a for s in world1 for a in ("--set", s)]

    def lcc(*args: str):
        return CliRunner().invoke(app, ["compile", "specs/tiny-moe.yaml", *sets, "--out", str(tmp_path), *args])

    assert lcc().exit_code == 0
    stale = tmp_path / "programs" / "stage1.py"  # left by an earlier compile with pp 2
    stale.write_text("# stage 1\n")
    out = lcc("--check")
    assert out.exit_code == 1 and f"{stale}: not produced by the compiler" in out.stderr
    out = lcc()
    assert out.exit_code == 0 and "removed stale programs/stage1.py" in out.stdout
    assert not stale.exists() and (tmp_path / "programs" / "stage0.py").is_file()
