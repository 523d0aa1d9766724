"""The `lcc` command. The only place that strings the parts together; heavy imports stay inside commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lcc.cli_exits import exit_on_run_error, exit_on_spec_error, load_or_exit, plan_spec
from lcc.cli_usage import name_arguments_in_usage
from lcc.spec import Location, SpecError, load_spec

# plain help (click's layout): typer's rich panels print `<bool>` after flags that take no value
app = typer.Typer(
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compile Mixture-of-Experts model specs into parallel plans, and report what they cost.",
)

def _version(value: bool) -> None:
    if value:
        from lcc import __version__

        typer.echo(f"lcc {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print lcc's version and exit.")] = False,
) -> None:
    """Compile Mixture-of-Experts model specs into parallel plans, and report what they cost."""


SpecArg = Annotated[Path, typer.Argument(metavar="SPEC", help="The spec file (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,  # noqa: UP007 - typer needs Optional here
    typer.Option("--set", metavar="FIELD=VALUE",
                 help="Override a field before validation: --set parallelism.dp=8 (repeatable)."),
]


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec: field types, ranges and cross-field rules. Exit 2 with file:line:col on a problem."""
    loaded = load_or_exit(spec, set_)
    par = loaded.parallelism
    typer.echo(f"{spec}: ok ({loaded.name}: world {par.world_size} = pp {par.pp} x dp {par.dp} x tp {par.tp}, "
               f"ep {par.ep})")


@app.command()
def schema() -> None:
    """Print the spec's JSON Schema (for editors: yaml-language-server)."""
    from lcc.spec.schema import json_schema

    typer.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


@app.command()
def report(
    spec: SpecArg,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema lcc.report/1).")] = False,
    mode: Annotated[str, typer.Option("--mode", help="train (default) or serve: weights and KV cache per rank, KV "
                                      "tokens that fit, a memory-bound decode step.")] = "train",
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw memory per role against the device and "  # noqa: UP007
                                              "one step's pipeline timeline (PNG; the plot extra).")] = None,
) -> None:
    """Parameters, per-rank memory, FLOPs, communication, bubble and step time of a spec (no torch); with
    --mode serve, what serving it takes. Exit 1 when the worst rank does not fit the device memory."""
    from lcc.compiler.cost import cost_report

    if mode not in ("train", "serve"):
        typer.echo(f"--mode must be train or serve, not {mode!r}", err=True)
        raise typer.Exit(2)
    loaded = load_or_exit(spec, set_)
    if mode == "serve" and loaded.serve is None:
        typer.echo(f"{spec}: no serve section (serve.max_seq_len at least): nothing to report for serving", err=True)
        raise typer.Exit(2)
    data = cost_report(loaded)
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        from rich.console import Console

        from lcc.report_view import render, render_serve

        (render_serve if mode == "serve" else render)(data, Console(width=120))
    fits = data["serve"]["fits"] if mode == "serve" else data["memory"]["fits"]
    if plot is not None:
        _report_plot(spec, set_, mode, data, plot)
    if not fits:  # the report is printed; the exit code says the layout cannot train (or serve)
        raise typer.Exit(1)


def _report_plot(spec: Path, sets: list[str] | None, mode: str, data: dict[str, Any], path: Path) -> None:
    """The report's picture: the plan compiled in memory for the pipeline timeline (memory alone when the
    layout does not compile, saying why)."""
    typer.echo(f"lcc report: drawing {path} (compiling the plan for its pipeline timeline) ...", err=True)
    from lcc.compiler.plan import compile_plan
    from lcc.inspect import plot as pictures
    from lcc.inspect.target import InspectError, Target
    from lcc.plan import loads

    try:
        files = compile_plan(load_spec(spec, sets or []), mode)
        target, why = Target(loads(files["plan.json"]), str(spec), files=files), ""
    except SpecError as exc:
        target, why = None, str(exc.problems[0])
    try:
        pictures.report_picture(data, mode, target, path, why)
    except InspectError as exc:
        typer.echo(f"lcc: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}", err=True)


ModeOpt = Annotated[str, typer.Option("--mode", help="train (default) or serve (int4 experts, routing tables).")]


@app.command()
def compile(  # noqa: A001 - the command is called compile
    spec: SpecArg,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default generated/<name>/).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Compare with the folder instead of writing it.")] = False,
    mode: ModeOpt = "train",
) -> None:
    """Compile a spec into a parallel plan: plan.json, schedule.csv, actions.txt (golden files in generated/)."""
    if mode not in ("train", "serve"):
        typer.echo(f"--mode must be train or serve, not {mode!r}", err=True)
        raise typer.Exit(2)
    loaded = load_or_exit(spec, set_)
    if set_ and out is None:
        typer.echo("a compile with --set overrides needs --out: generated/ holds only the shipped specs as written",
                   err=True)
        raise typer.Exit(2)
    from lcc.compiler.output import first_difference, write
    from lcc.compiler.plan import compile_plan
    from lcc.plan.program_check import ProgramMismatch
    from lcc.runtime.preflight import check_writable

    target = out or Path("generated") / loaded.name / ("serve" if mode == "serve" else "")
    if not check:
        exit_on_run_error(check_writable, target, "--out", True)
    try:
        files = compile_plan(loaded, mode)
    except SpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except ProgramMismatch as exc:  # a compiler bug: nothing is written
        typer.echo(f"lcc compile: the rendered programs do not match the plan, nothing written: {exc}", err=True)
        raise typer.Exit(3) from None
    if check:
        diff = first_difference(files, target)
        if diff:
            typer.echo(f"{target}: out of date ({diff})\n  refresh on purpose with: make golden", err=True)
            raise typer.Exit(1)
        typer.echo(f"{target}: up to date ({len(files)} files)")
        return
    removed = write(files, target)
    typer.echo(f"wrote {target}/ ({', '.join(sorted(files))})")
    if removed:
        typer.echo(f"removed stale {', '.join(str(p.relative_to(target)) for p in removed)}")


run_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Execute compiled plans on torch.distributed.")
app.add_typer(run_app, name="run")


@run_app.command("train")
def run_train(
    target: Annotated[Path, typer.Argument(metavar="SPEC|PLAN_DIR", help="A spec (compiled into .lcc-cache/) or "
                                           "a compiled plan folder.")],
    set_: SetOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default train.steps).")] = None,
    metrics: Annotated[Path | None, typer.Option("--metrics", help="Write one JSON object per step here.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir", help="Save checkpoints here (at the "
                                                        "end and every train.checkpoint_every steps).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --checkpoint-dir "
                                         "(an error if there is none, or if it fails its checks).")] = False,
    resume_if_any: Annotated[bool, typer.Option("--resume-if-any", help="Continue from the latest checkpoint if "
                                                "there is one, else start at step 0 (for a job that is restarted "
                                                "as it was first started).")] = False,
    fallback: Annotated[bool, typer.Option("--fallback", help="With --resume or --resume-if-any: if the latest "
                                           "checkpoint fails its checks (a missing, truncated or corrupt file), "
                                           "resume from the newest older one that passes, saying which.")] = False,
    keep: Annotated[int, typer.Option("--keep", min=0, metavar="N", help="Keep the newest N checkpoints, removing "
                                      "older ones after each save; 0 keeps all.")] = 3,
    track_memory: Annotated[bool, typer.Option("--track-memory", help="On CPU, measure peak memory as the bytes "
                                               "of live tensors (exact; slows steps) instead of the peak resident "
                                               "size.")] = False,
    transcript: Annotated[Path | None, typer.Option("--transcript", help="Write every collective each rank issues "
                                                    "in its steps here (JSON lines: rank, step, op, axis, shape, "
                                                    "dtype).")] = None,
    trace: Annotated[Path | None, typer.Option("--trace", help="Write a Perfetto trace (ui.perfetto.dev) of each "
                                               "rank's pipeline actions, experts and overlapped exchanges "
                                               "here.")] = None,
    tensorboard: Annotated[Path | None, typer.Option("--tensorboard", help="Write each step's figures here as "
                                                     "TensorBoard scalars (the tensorboard extra).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start the ranks even where this machine looks too small "
                                        "for them (more than 16 ranks per core, or more memory than is "
                                        "available).")] = False,
    init_from: Annotated[Path | None, typer.Option("--init-from", help="Start from the weights of this checkpoint "
                                                   "(any layout of the same model, e.g. one lcc checkpoint "
                                                   "import-hf wrote) with a fresh optimizer, unless the run "
                                                   "resumes from a checkpoint of its own.")] = None,
) -> None:
    """Train on local ranks (gloo on CPU, NCCL on CUDA GPUs), one process per rank of the plan."""
    from lcc.runtime.preflight import check_outputs
    from lcc.runtime.rendezvous import rank_outputs
    from lcc.runtime.support import RunError
    from lcc.spec.data import check_data, spec_folder

    if resume and resume_if_any:
        typer.echo("--resume and --resume-if-any exclude each other", err=True)
        raise typer.Exit(2)
    if fallback and not (resume or resume_if_any):
        typer.echo("--fallback applies with --resume or --resume-if-any", err=True)
        raise typer.Exit(2)
    if (resume or resume_if_any) and checkpoint_dir is None:
        typer.echo(f"{'--resume' if resume else '--resume-if-any'} needs --checkpoint-dir", err=True)
        raise typer.Exit(2)
    # before torch is imported, and compiling: tried by creating them (under torchrun, what this rank writes)
    exit_on_run_error(check_outputs, rank_outputs({"--metrics": metrics, "--transcript": transcript,
                                                   "--trace": trace, "--checkpoint-dir": checkpoint_dir}))
    if target.is_dir():
        if set_:
            typer.echo("--set applies to a spec, not to a compiled plan folder", err=True)
            raise typer.Exit(2)
        loaded, spec_dir = plan_spec(target), None
        exit_on_spec_error(check_data, loaded, None, Location(str(target / "spec.json")))
        plan_dir = target
    else:
        from lcc.cache import run_dir, write_atomically
        from lcc.compiler.plan import compile_plan
        from lcc.runtime.preflight import check_steps, check_writable

        loaded = load_or_exit(target, set_)
        spec_dir = spec_folder(loaded)
        exit_on_spec_error(check_data, loaded)
        plan_dir = run_dir(loaded)  # keyed by the resolved spec, the plan version and lcc's own source
        exit_on_run_error(check_steps, steps if steps is not None else loaded.train.steps)
        if not (plan_dir / "plan.json").is_file():
            exit_on_run_error(check_writable, plan_dir, "the run cache", True)
            write_atomically(exit_on_spec_error(compile_plan, loaded), plan_dir)
    from lcc.runtime.launch import launch

    try:  # spec_dir: the ranks read a relative train.data.path from it, which a plan does not record
        launch(plan_dir, steps if steps is not None else loaded.train.steps, metrics, checkpoints=checkpoint_dir,
               resume=resume, track_memory=track_memory, spec_dir=spec_dir, transcript=transcript,
               resume_if_any=resume_if_any, fallback=fallback, keep=keep, force=force, init_from=init_from,
               trace=trace, tensorboard=tensorboard)
    except RunError as exc:
        typer.echo(f"lcc run train: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None  # 1; a stop by SIGINT or SIGTERM: 130 or 143


@run_app.command("generate")
def run_generate(
    target: Annotated[Path, typer.Argument(metavar="SPEC|PLAN_DIR", help="A spec (compiled into .lcc-cache/ as "
                                           "a serve plan) or a compiled serve plan folder (lcc compile --mode "
                                           "serve).")],
    set_: SetOpt = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint of lcc run train (a "
                                                    "step-NNNNNN folder, or a --checkpoint-dir: its latest), saved "
                                                    "under any layout. Default: the deterministic initialisation.")]
    = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Text to continue (repeat for several "
                                                     "prompts, served together).")] = None,
    prompt_ids: Annotated[list[str] | None, typer.Option("--prompt-ids", help="Token ids to continue, e.g. "
                                                         "1,2,3 (repeatable; these prompts come before the "
                                                         "--prompt ones).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens to generate per prompt.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0: greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the sampler (with --temperature > 0).")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="End a completion where this text appears "
                                                   "(repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per prompt: {\"token_ids\": [the "
                                          "generated ids], \"text\": ..., \"finish_reason\": ...}.")] = False,
    max_num_seqs: Annotated[int | None, typer.Option("--max-num-seqs", min=1, help="Sequences per step and dp rank "
                                                     "(default and at most serve.max_batch).")] = None,
    max_batched_tokens: Annotated[int | None, typer.Option("--max-batched-tokens", min=1, help="Tokens per step "
                                                           "and dp rank (default serve.max_batched_tokens).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start the ranks even where this machine looks too small "
                                        "for them.")] = False,
) -> None:
    """Generate continuations of prompts with a serve plan on local ranks, printing them as they come."""
    from lcc.runtime.rendezvous import refuse_under_torchrun
    from lcc.runtime.support import RunError
    from lcc.serve.launch import Job, generate
    from lcc.serve.sampling import SamplingParams

    exit_on_run_error(refuse_under_torchrun, "lcc run generate")  # it starts its ranks itself
    prompts_ids: list[list[int]] = []
    for text in prompt_ids or []:
        try:
            prompts_ids.append([int(t) for t in text.replace(" ", "").split(",") if t])
        except ValueError:
            typer.echo(f"--prompt-ids {text!r}: expected comma-separated token ids, e.g. 1,2,3", err=True)
            raise typer.Exit(2) from None
    if not prompt and not prompts_ids:
        typer.echo("give --prompt TEXT or --prompt-ids 1,2,3", err=True)
        raise typer.Exit(2)
    plan_dir = _serve_plan(target, set_)
    from lcc.data.tokenizer import plan_tokenizer

    try:
        tokenizer = plan_tokenizer(plan_dir)
        for text in prompt or []:
            prompts_ids.append(tokenizer.encode(text))
    except ValueError as exc:
        typer.echo(f"--prompt: {exc}; use --prompt-ids", err=True)
        raise typer.Exit(2) from None
    try:
        params = SamplingParams(max_tokens, temperature, top_p, seed, list(stop or []))
    except ValueError as exc:
        typer.echo(f"lcc run generate: {exc}", err=True)
        raise typer.Exit(2) from None
    job = Job(prompts_ids, params, str(checkpoint) if checkpoint else None, as_json=as_json,
              max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens)
    try:
        generate(plan_dir, job, force=force)
    except RunError as exc:
        typer.echo(f"lcc run generate: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except ValueError as exc:  # a request the engine refuses (RequestError)
        typer.echo(f"lcc run generate: {exc}", err=True)
        raise typer.Exit(2) from None


@run_app.command("serve")
def run_serve(
    target: Annotated[Path, typer.Argument(metavar="SPEC|PLAN_DIR", help="A spec (compiled into .lcc-cache/ as "
                                           "a serve plan) or a compiled serve plan folder (lcc compile --mode "
                                           "serve).")],
    set_: SetOpt = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint of lcc run train (a "
                                                    "step-NNNNNN folder, or a --checkpoint-dir: its latest), saved "
                                                    "under any layout. Default: the deterministic initialisation.")]
    = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LCC_API_KEY", show_envvar=True, help="Answer "
                                                "the /v1/ routes only with `Authorization: Bearer KEY` (401 "
                                                "otherwise); /health and /metrics stay open.")] = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: one the "
                                              "system chooses, named in the ready line).")] = 8000,
    max_queued: Annotated[int, typer.Option("--max-queued", min=1, help="Requests waiting for their first step "
                                            "beyond which new ones get 429.")] = 64,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", min=0.0, help="On SIGTERM or SIGINT, "
                                                    "seconds to let running requests finish before aborting them.")]
    = 30.0,
    max_num_seqs: Annotated[int | None, typer.Option("--max-num-seqs", min=1, help="Sequences per step and dp rank "
                                                     "(default and at most serve.max_batch).")] = None,
    max_batched_tokens: Annotated[int | None, typer.Option("--max-batched-tokens", min=1, help="Tokens per step "
                                                           "and dp rank (default serve.max_batched_tokens).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start the ranks even where this machine looks too small "
                                        "for them.")] = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, /health, /metrics)."""
    from lcc.runtime.rendezvous import refuse_under_torchrun
    from lcc.runtime.support import RunError
    from lcc.serve.launch import ServeOptions, serve

    exit_on_run_error(refuse_under_torchrun, "lcc run serve")  # it starts its ranks itself
    plan_dir = _serve_plan(target, set_)
    opts = ServeOptions(str(checkpoint) if checkpoint else None, host, port, max_queued, shutdown_timeout,
                        max_num_seqs, max_batched_tokens, api_key or None)
    try:
        serve(plan_dir, opts, force=force)
    except RunError as exc:
        typer.echo(f"lcc run serve: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    typer.echo("lcc run serve: stopped; every request finished or aborted, every rank ended")


def _serve_plan(target: Path, set_: list[str] | None) -> Path:
    """A serve plan folder: the given one, or the spec compiled into the run cache."""
    if target.is_dir():
        if set_:
            typer.echo("--set applies to a spec, not to a compiled plan folder", err=True)
            raise typer.Exit(2)
        return target
    from lcc.cache import run_dir, write_atomically
    from lcc.compiler.plan import compile_plan
    from lcc.runtime.preflight import check_writable

    loaded = load_or_exit(target, set_)
    plan_dir = run_dir(loaded, mode="serve")
    if not (plan_dir / "plan.json").is_file():
        exit_on_run_error(check_writable, plan_dir, "the run cache", True)
        write_atomically(exit_on_spec_error(compile_plan, loaded, "serve"), plan_dir)
    return plan_dir


from lcc.inspect.commands import plan_app  # noqa: E402 - beside the other command groups

app.add_typer(plan_app, name="plan")

checkpoint_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                             help="Inspect checkpoints, and convert Hugging Face weights in and out.")
app.add_typer(checkpoint_app, name="checkpoint")

from lcc.interop.commands import checkpoint_export_hf, checkpoint_import_hf, import_app  # noqa: E402

app.add_typer(import_app, name="import")

from lcc.search.commands import calibrate  # noqa: E402

app.command("calibrate")(calibrate)
checkpoint_app.command("import-hf")(checkpoint_import_hf)
checkpoint_app.command("export-hf")(checkpoint_export_hf)

from lcc.data.commands import data_app  # noqa: E402
from lcc.inspect.metrics_plot import plot_command  # noqa: E402
from lcc.runtime.checkpoint_command import checkpoint_info  # noqa: E402

app.add_typer(data_app, name="data")
app.command("plot")(plot_command)

checkpoint_app.command("info")(checkpoint_info)


name_arguments_in_usage(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # an lcc bug: say so briefly; LCC_DEBUG=1 shows the traceback
        if os.environ.get("LCC_DEBUG"):
            raise
        typer.echo(f"lcc: internal error: {type(exc).__name__}: {exc}\n  (run with LCC_DEBUG=1 for the "
                   "traceback, and please report it)", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
