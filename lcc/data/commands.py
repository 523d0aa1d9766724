"""`lcc data prepare` (docs/data.md)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Prepare a user's documents for training: tokenized once, read without loading whole.")


@data_app.command("prepare")
def prepare_command(
    sources: Annotated[list[Path], typer.Argument(metavar="SOURCE", help="JSON Lines, Parquet or text files, or "
                                                  "folders of them.", show_default=False)],
    spec: Annotated[Path, typer.Option("--spec", help="The spec whose tokenizer (model.tokenizer; else one token per "
                                       "byte) and end-of-sequence id (serve.stop_token_ids) are used.",
                                       show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The folder to write (a prepared dataset there is replaced).",
                                      show_default=False)],
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="FIELD=VALUE", help="Override a spec field "
                                                   "(repeatable).")] = None,
    text_field: Annotated[str, typer.Option("--text-field", help="The field (JSON Lines) or column (Parquet) "
                                            "holding each document's text.")] = "text",
    chat: Annotated[bool, typer.Option("--chat", help="Records hold `messages` ({role, content}), rendered with "
                                       "the model's chat template; only assistant turns are trained on.")] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Processes tokenizing in parallel "
                                                "(default: the CPUs).", show_default=False)] = None,
) -> None:
    """Tokenize documents into memory-mapped token files, an index of document boundaries and a manifest.
    Running it again on the same inputs does nothing; a changed input is prepared again."""
    from rich.progress import Progress

    from lcc.cli_exits import load_or_exit
    from lcc.data.chat_template import ChatTemplateError, find
    from lcc.data.prepare import Encoder, PrepareError, prepare
    from lcc.data.tokenizer import TokenizerError, tokenizer_digest, tokenizer_file
    from lcc.spec import SpecError

    command = "lcc data prepare"
    loaded = load_or_exit(spec, set_)
    try:
        sha = tokenizer_digest(loaded)
    except SpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    path = tokenizer_file(loaded)
    template = None
    if chat and path is not None:
        try:
            template = find(path)
        except ChatTemplateError as exc:
            raise _fail(command, str(exc)) from None
    stops = loaded.serve.stop_token_ids if loaded.serve is not None else []
    eos = stops[0] if stops and path is not None else None
    enc = Encoder(loaded.model.vocab_size, str(path.resolve()) if path is not None else None, eos, chat, template)
    field = "messages" if chat else text_field
    start = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task("tokenizing", total=None)
        try:
            done = prepare(sources, enc, sha, out, field, workers or os.cpu_count() or 1,
                           lambda n, total: bar.update(task, completed=n, total=total))
        except (PrepareError, TokenizerError) as exc:
            raise _fail(command, str(exc)) from None
        except OSError as exc:
            typer.echo(f"{command}: writing {out} failed: {exc.strerror or exc}", err=True)
            raise typer.Exit(1) from None
    if done["unchanged"]:
        typer.echo(f"{out} is up to date: {done['documents']:,} documents, {done['tokens']:,} tokens (nothing to do)")
        return
    seconds = time.perf_counter() - start
    typer.echo(f"wrote {out}: {done['documents']:,} documents, {done['tokens']:,} tokens from "
               f"{len(done['sources'])} file(s) in {seconds:.1f} s ({done['tokens'] / seconds:,.0f} tokens/s)")


def _fail(command: str, message: str) -> typer.Exit:
    typer.echo(f"{command}: {message}", err=True)
    return typer.Exit(2)
