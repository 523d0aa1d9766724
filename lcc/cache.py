"""The run cache: where `lcc run train SPEC` keeps the plan it compiled, and what makes a cached plan current.

A cached plan is reused only while everything that produced it is unchanged: the resolved spec, the plan
format (`PLAN_VERSION`) and lcc itself. Keying by the spec alone ran a stale plan after an upgrade of lcc
(or after editing its source in a checkout), with programs and a plan.json that the new runtime may no longer
read the same way. lcc's own source is hashed rather than its version number, since an editable install or a
development checkout changes without a new version.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from lcc.compiler.plan import PLAN_VERSION
from lcc.spec import Spec, resolved

CACHE = Path(".lcc-cache")
SOURCE_SUFFIXES = (".py", ".j2")
PACKAGES = ("lcc", "lcc.backends")  # lcc.backends may live outside lcc/ (package_dir in pyproject.toml)


def source_roots() -> list[Path]:
    """The folders of the installed packages whose code compiles and runs plans."""
    roots: list[Path] = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            roots.append(Path(location).resolve())
    return roots


def source_hash(roots: Iterable[Path]) -> str:
    """sha256 over the relative path and bytes of every *.py and *.j2 file under `roots` (in the order given,
    each root's files in sorted order). A root inside another one (lcc/backends in a wheel) is read once."""
    roots = list(dict.fromkeys(Path(r) for r in roots))
    digest = hashlib.sha256()
    for root in roots:
        if any(root != outer and root.is_relative_to(outer) for outer in roots):
            continue
        files = sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())
        for path in files:
            digest.update(f"{root.name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def installed_source_hash() -> str:
    """`source_hash` of the installed lcc, computed once per process (~80 small files)."""
    return source_hash(source_roots())


def run_key(spec: Spec, source: str | None = None) -> str:
    """sha256 of the resolved spec, the plan version and lcc's source hash (`source`, default: the installed)."""
    key = {"spec": resolved(spec), "plan_version": PLAN_VERSION,
           "source": source if source is not None else installed_source_hash()}
    if spec.model.tokenizer is not None:  # the plan carries the file's text, which the spec only names
        from lcc.data.tokenizer import tokenizer_digest
        key["tokenizer"] = tokenizer_digest(spec)
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_dir(spec: Spec, base: Path = CACHE, mode: str = "train") -> Path:
    """The cached plan folder of a spec: `.lcc-cache/<name>-<first 16 hex digits of run_key>` (serve plans:
    with `-serve`)."""
    return base / f"{spec.name}-{run_key(spec)[:16]}{'-serve' if mode == 'serve' else ''}"


def write_atomically(files: dict[str, str], folder: Path) -> None:
    """Write a compiled plan into the cache so that a folder is either complete or absent: written next to
    it under a temporary name, then renamed (a run killed while compiling leaves only the temporary folder,
    which the next run replaces)."""
    from lcc.compiler.output import write

    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(files, tmp)
    if folder.is_dir() and not (folder / "plan.json").is_file():  # not written by this function: replace it
        shutil.rmtree(folder)
    try:
        os.replace(tmp, folder)
    except OSError:  # another run finished the same plan first: it is the same plan
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "plan.json").is_file():
            raise
