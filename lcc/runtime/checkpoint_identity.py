"""What a checkpoint is: its lcc-checkpoint.json (format, step, the resolved spec it was trained from, the
layout it was saved in, a hash of the spec that is equal for every layout) and how two specs differ in
what a checkpoint's training depends on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lcc
from lcc.runtime.checkpoint_files import IDENTITY, CheckpointError

SCHEMA = "lcc.checkpoint/2"
# spec fields that are layout, or that do not change what training computes (top-level sections, and
# how often to save, to validate, and how long to wait on a collective)
LAYOUT_SECTIONS = ("name", "parallelism", "cluster", "serve")
OPERATIONAL = ("train.checkpoint_every", "train.collective_timeout_s", "train.compile", "train.eval_every",
               "train.eval_batches", "train.data.validation")
# training-only routing fields: a checkpoint's weights serve, or start a run, whatever they were
IGNORED = ("routing.balance", "routing.capacity_factor")
# model fields added since checkpoints were first written, left out of the identity at their defaults, so
# that a checkpoint written before them resumes under the spec it was trained from
ADDED = (("routing.groups.sets", 1), ("routing.groups.max_sets", None), ("train.data.blend", None),
         ("train.data.document_mask", False), ("train.data.held_out", 0.05))


def layout_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The layout a run of the resolved spec (as in a plan's spec.json) is in: its parallelism section,
    the world size and where it ran."""
    par, cluster = spec["parallelism"], spec["cluster"]
    return {**par, "world_size": par["pp"] * par["dp"] * par["tp"], "edp": par["dp"] * par["tp"] // par["ep"],
            "nodes": cluster["nodes"], "gpus_per_node": cluster["gpus_per_node"], "device": cluster["device"]["kind"]}


def identity(spec: dict[str, Any], step: int) -> dict[str, Any]:
    """lcc-checkpoint.json but its `files` (which `save` adds): deterministic (no times, no paths), from the
    plan's spec.json."""
    return {"schema": SCHEMA, "step": step, "spec": spec, "spec_hash": spec_hash(spec), "layout": layout_of(spec),
            "lcc_version": lcc.__version__}


def trained(spec: dict[str, Any]) -> dict[str, Any]:
    """The resolved spec without the fields a resume may change (the layout and operational ones)."""
    def drop(tree: Any, parts: list[str]) -> Any:
        if not isinstance(tree, dict) or parts[0] not in tree:
            return tree
        if len(parts) == 1:
            return {k: v for k, v in tree.items() if k != parts[0]}
        return {**tree, parts[0]: drop(tree[parts[0]], parts[1:])}

    def value(tree: Any, parts: list[str]) -> Any:
        for part in parts:
            tree = tree.get(part, {}) if isinstance(tree, dict) else {}
        return tree

    out = {k: v for k, v in spec.items() if k not in LAYOUT_SECTIONS}
    for field in OPERATIONAL:
        out = drop(out, field.split("."))
    for field, default in ADDED:
        if value(out, field.split(".")) == default:
            out = drop(out, field.split("."))
    return out


def spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of `trained(spec)`: equal for every layout of
    the same model and training."""
    text = json.dumps(trained(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_identity(path: Path) -> dict[str, Any]:
    """The lcc-checkpoint.json of checkpoint folder `path`, checked for its format."""
    file = Path(path) / IDENTITY
    if not file.is_file():
        raise CheckpointError(f"{path}: not an lcc checkpoint ({IDENTITY} is missing)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        why = (" (saved by an earlier lcc, without the file checksums a resume checks: resume it with that lcc, or "
               "train again)" if found == "lcc.checkpoint/1" else "")
        raise CheckpointError(f"{file}: checkpoint format {found!r}; this lcc reads {SCHEMA!r}{why}")
    return data


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()  # a field one of two specs does not have


def spec_differences(saved: Any, current: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(field path, saved, current) for every field that differs, outside the layout sections."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if (not path and key in LAYOUT_SECTIONS) or sub in OPERATIONAL:
                continue
            out += spec_differences(saved.get(key, ABSENT), current.get(key, ABSENT), sub)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current, strict=True))
                for d in spec_differences(a, b, f"{path}[{i}]")]
    default = dict(ADDED).get(path, ABSENT)
    if default is not ABSENT and all(v is ABSENT or v == default for v in (saved, current)):  # an older spec
        return []
    return [] if saved == current else [(path, saved, current)]


def shown_value(v: Any) -> str:
    """A spec field's value as a message shows it: JSON, or `absent`."""
    return "absent" if v is ABSENT else json.dumps(v)
