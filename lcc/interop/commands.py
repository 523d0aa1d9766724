"""`lcc import hf`, `lcc checkpoint import-hf` and `lcc checkpoint export-hf` (docs/interop.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

import_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Write lcc specs of models made elsewhere.")


def _fail(command: str, message: str) -> typer.Exit:
    typer.echo(f"{command}: {message}", err=True)
    return typer.Exit(2)


def _not_written(command: str, message: str) -> typer.Exit:
    """A write that failed part way (a full disk): a failure, not a refusal."""
    typer.echo(f"{command}: {message}", err=True)
    return typer.Exit(1)


@import_app.command("hf")
def import_hf(
    model_dir: Annotated[Path, typer.Argument(help="A Hugging Face model folder (config.json; tokenizer.json is "
                                              "used when present).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The spec file to write (YAML).", show_default=False)],
    gpus: Annotated[int | None, typer.Option("--gpus", min=1, help="Lay the model out on this many GPUs (8 a "
                                             "node); default: one CPU rank.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="The spec's name (default: the folder's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write an lcc spec that computes the same model as a transformers Mixtral, Qwen3-MoE or OLMoE config."""
    from lcc.interop.hf_config import ImportRefused, import_config

    if out.exists() and not force:
        raise _fail("lcc import hf", f"{out} exists (--force overwrites it)")
    try:
        text, family = import_config(model_dir, out, gpus, name)
    except ImportRefused as exc:
        raise _fail("lcc import hf", str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"wrote {out} ({family}); weights: lcc checkpoint import-hf {model_dir} --spec {out} --out CKPT")


def checkpoint_import_hf(
    model_dir: Annotated[Path, typer.Argument(help="A Hugging Face model folder (config.json and safetensors).",
                                              show_default=False)],
    spec: Annotated[Path, typer.Option("--spec", help="The model's lcc spec (lcc import hf writes one).",
                                       show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The checkpoint folder to write.", show_default=False)],
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="FIELD=VALUE", help="Override a spec field "
                                                   "(repeatable).")] = None,
) -> None:
    """Convert safetensors weights (one tensor per expert, or fused expert stacks) into an lcc checkpoint,
    one tensor at a time, that loads under any layout of the spec."""
    from lcc.interop.hf_config import ImportRefused, model_sections, read_config
    from lcc.interop.hf_weights import import_weights
    from lcc.runtime.checkpoint_files import CheckpointError
    from lcc.runtime.checkpoint_identity import spec_differences
    from lcc.spec import SpecError, load_spec, resolved
    from lcc.spec.models import Model, Routing

    command = "lcc checkpoint import-hf"
    if out.exists():
        raise _fail(command, f"{out} exists; choose a new folder")
    try:
        loaded = load_spec(spec, set_ or [])
    except SpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    try:
        path, data = read_config(model_dir)
        family, model, routing, _ = model_sections(path, data)
        mine = resolved(loaded)
        theirs = {"model": {**Model.model_validate(model).model_dump(mode="json"),
                            "tokenizer": mine["model"].get("tokenizer")},
                  "routing": Routing.model_validate(routing).model_dump(mode="json")}
        diffs = spec_differences(theirs, {"model": mine["model"], "routing": mine["routing"]})
        if diffs:
            field, a, b = diffs[0]
            raise ImportRefused(f"{spec}: {field} is {b!r}; {path} makes it {a!r} (lcc import hf writes a matching "
                                "spec)")
        start = time.perf_counter()
        done = import_weights(model_dir, loaded, family, out)
    except ImportRefused as exc:
        raise _fail(command, str(exc)) from None
    except CheckpointError as exc:
        raise _not_written(command, str(exc)) from None
    except OSError as exc:
        raise _not_written(command, f"writing {out} failed: {exc.strerror or exc}") from None
    typer.echo(f"wrote {out}: {done['tensors']} tensors, {done['parameters']:,} parameters in "
               f"{time.perf_counter() - start:.1f} s")


def checkpoint_export_hf(
    ckpt: Annotated[Path, typer.Argument(help="A checkpoint folder (step-NNNNNN or one written by import-hf), or a "
                                         "--checkpoint-dir folder (its latest).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The Hugging Face model folder to write.", show_default=False)],
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="A tokenizer.json to put beside the weights "
                                                   "(default: the checkpoint's own, if it has one).")] = None,
    max_shard_gib: Annotated[float, typer.Option("--max-shard-gib", min=1e-6, help="Largest safetensors shard."
                                                 )] = 2.0,
) -> None:
    """Write safetensors weights and a config.json that transformers loads, one tensor at a time."""
    from lcc.interop.hf_config import ImportRefused
    from lcc.interop.hf_weights import export_weights
    from lcc.runtime.checkpoint_files import CheckpointError

    command = "lcc checkpoint export-hf"
    if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
        raise _fail(command, f"{out} exists and is not an empty folder")
    if tokenizer is not None and not tokenizer.is_file():
        raise _fail(command, f"--tokenizer {tokenizer}: no such file")
    try:
        done = export_weights(ckpt, out, int(max_shard_gib * (1 << 30)), tokenizer)
    except (ImportRefused, CheckpointError) as exc:
        raise _fail(command, str(exc)) from None
    except OSError as exc:
        raise _not_written(command, f"writing {out} failed: {exc.strerror or exc}") from None
    note = "" if done["tokenizer"] else "; no tokenizer.json (give --tokenizer)"
    typer.echo(f"wrote {out} ({done['family']}): {done['tensors']} tensors in {len(done['files'])} file(s), "
               f"{done['bytes'] / 1e6:.1f} MB{note}")
