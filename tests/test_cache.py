"""The run cache's key: a cached plan is reused only while the spec, the plan format and lcc's source are unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import lcc.cache
from lcc.cache import run_dir, run_key, source_hash, source_roots
from lcc.spec import load_spec
from tests.conftest import SPECS


def copy_of_lcc(tmp_path: Path) -> list[Path]:
    roots = []
    for root in source_roots():
        copy = tmp_path / root.name
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__"))
        roots.append(copy)
    return roots


def test_source_roots_are_lcc_and_its_backends():
    import lcc.backends

    roots = source_roots()
    assert Path(lcc.__file__).resolve().parent in roots
    assert any(Path(lcc.backends.__file__).resolve().is_relative_to(root) for root in roots)


def test_changing_one_source_byte_changes_the_key(tmp_path):
    roots = copy_of_lcc(tmp_path)
    before = source_hash(roots)
    assert before == source_hash(source_roots())  # the copy holds the same sources
    template = next(roots[0].rglob("*.j2"))
    template.write_bytes(template.read_bytes() + b" ")
    after_template = source_hash(roots)
    program = roots[-1] / "__init__.py"  # lcc.backends
    program.write_bytes(program.read_bytes().replace(b'"""', b"'''", 1))
    after_backend = source_hash(roots)
    assert len({before, after_template, after_backend}) == 3
    spec = load_spec(SPECS / "tiny-moe.yaml")
    assert run_key(spec, before) != run_key(spec, after_template)


def test_other_files_do_not_change_the_key(tmp_path):
    roots = copy_of_lcc(tmp_path)
    before = source_hash(roots)
    (roots[0] / "notes.txt").write_text("not code\n")
    (roots[0] / "__pycache__").mkdir(exist_ok=True)
    (roots[0] / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert source_hash(roots) == before


def test_key_follows_spec_and_plan_version(monkeypatch):
    spec = load_spec(SPECS / "tiny-moe.yaml")
    base = run_key(spec, "src")
    assert run_key(load_spec(SPECS / "tiny-moe.yaml", ["train.steps=7"]), "src") != base
    monkeypatch.setattr(lcc.cache, "PLAN_VERSION", lcc.cache.PLAN_VERSION + 1)
    assert run_key(spec, "src") != base


def test_run_dir_is_named_after_the_spec():
    spec = load_spec(SPECS / "tiny-moe.yaml")
    folder = run_dir(spec, Path("cache"))
    assert folder.parent == Path("cache") and folder.name == f"tiny-moe-{run_key(spec)[:16]}"
