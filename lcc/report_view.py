"""Human rendering of a cost report (rich tables). The JSON from `cost_report` is the source of truth."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.4g} {unit}".rstrip()


def gib(n: float) -> str:
    """Binary sizes, in the largest unit that keeps the number at least 1."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if abs(n) >= 2**shift:
            return f"{n / 2**shift:.2f} {unit}"
    return f"{n:.0f} B"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    return table


def _header(report: dict[str, Any], console: Console) -> None:
    lay = report["layout"]
    console.print(f"[bold]{report['spec']}[/bold]: world {report['world_size']} = pp {lay['pp']} x dp {lay['dp']}"
                  f" x tp {lay['tp']}; ep {lay['ep']} (edp {lay['edp']}); ZeRO-{lay['zero']}, checkpointing "
                  f"{lay['activation_checkpointing']}; {lay['schedule']} x {lay['microbatches']} micro-batches")
    dev = report["device"]
    console.print(f"devices: {dev['count']} x {escape(dev['name'])} ({dev['kind']}): {dev['peak_tflops']:g} TFLOP/s, "
                  f"{dev['memory_tbps']:g} TB/s, {dev['memory_gib']:g} GiB each")


def render_serve(report: dict[str, Any], console: Console) -> None:
    """`lcc report --mode serve`: per role its weights and KV cache, how many tokens of KV cache fit, and
    the memory-bound decode step."""
    _header(report, console)
    serve, ex = report["serve"], report["experts"]
    console.print(f"serving: {serve['dtype']} weights, experts {ex['serve_format']}; batch {serve['max_batch']} "
                  f"sequences per dp rank of up to {serve['max_seq_len']} tokens")
    t = _table("Memory per rank (serving)", "role", "weights", "KV / token", "KV at max batch", "total",
               "KV tokens that fit", "decode reads", "decode step")
    for r in serve["by_role"]:
        fit = f"{r['kv_tokens_fit']:,}" if r["kv_tokens_fit"] is not None else "-"
        t.add_row(r["role"], gib(r["weights_bytes"]), gib(r["kv_bytes_per_token"]), gib(r["kv_cache_bytes"]),
                  gib(r["total_bytes"]), fit, gib(r["decode_read_bytes"]),
                  f"{r['decode_seconds'] * 1e3:.3f} ms")
    console.print(t)
    fits = "[green]fits[/green]" if serve["fits"] else "[red]does NOT fit[/red]"
    worst = max(serve["by_role"], key=lambda r: r["total_bytes"])
    console.print(f"worst rank {gib(serve['worst_rank_bytes'])} of {gib(report['memory']['device_bytes'])} "
                  f"(weights + KV cache at max batch + workspace {gib(worst['workspace_bytes'])}): {fits}")
    step = serve["decode_step"]
    console.print(f"decode step (memory-bound): {step['seconds'] * 1e3:.3f} ms, {human(step['tokens_per_second'])} "
                  f"tokens/s; stages in turn, full context, {step['experts_touched_share']:.0%} of experts reached")


def _exchange(report: dict[str, Any], console: Console) -> None:
    """The expert exchange: where a token's experts sit on nodes, and what crosses nodes."""
    ex = report["comm"].get("expert_exchange")
    if ex is None:
        return
    t = _table("Expert exchange", "", "value")
    t.add_row("exchange", ex["exchange"] + (", overlapped (two halves)" if ex.get("overlap") else ""))
    t.add_row("EP group", f"{ex['ep_nodes']} node(s) x {ex['ranks_per_node']} ranks" if ex["ep_nodes"] is not None
              else "straddles nodes unevenly")
    t.add_row("nodes a token's experts can span", str(ex["token_nodes"]))
    t.add_row("nodes a token reaches (expected, uniform routing)",
              f"{ex['nodes_per_token']:.2f} of {ex['reachable_nodes']}")
    t.add_row("dedup ratio (slots per destination node)", f"{ex['dedup_ratio']:.2f}")
    t.add_row("inter-node bytes per step", human(ex["inter_node_bytes_per_step"], "B"))
    t.add_row("inter-node seconds per step (busiest rank)", f"{ex['inter_node_seconds']:.3f} s")
    console.print(t)


def render(report: dict[str, Any], console: Console) -> None:
    lay, params, mem = report["layout"], report["params"], report["memory"]
    _header(report, console)

    t = _table("Parameters", "", "count")
    for key in ("total", "embedding", "head", "attention", "dense_ffn", "router", "shared_experts", "routed_experts"):
        t.add_row(key.replace("_", " "), human(params[key]))
    for key, value in params["active_per_token"].items():
        t.add_row(f"active per token (k {key})", human(value))
    console.print(t)

    t = _table("Memory per rank (training)", "role", "layers", "in flight", "weights", "grads", "optimizer",
               "activations", "total")
    for r in mem["by_role"]:
        worst = r["role"] == mem["worst_rank"]["role"]
        layers = ", ".join(f"{a}-{b - 1}" for a, b in r["layers"])
        t.add_row(r["role"] + (" (worst)" if worst else ""), layers,
                  str(r["inflight_microbatches"]), gib(r["weights_bytes"]), gib(r["grads_bytes"]),
                  gib(r["optimizer_bytes"]), gib(r["activations_bytes"]), gib(r["total_bytes"]))
    console.print(t)
    fits = "[green]fits[/green]" if mem["fits"] else "[red]does NOT fit[/red]"
    console.print(f"worst rank {mem['worst_rank']['rank']} ({mem['worst_rank']['role']}): peak "
                  f"{gib(mem['worst_rank']['peak_bytes'])} ({mem['worst_rank']['peak_phase']}) of "
                  f"{gib(mem['device_bytes'])}: {fits}")
    layout = report["layout"]
    if layout["zero"] >= 2 and layout["microbatches"] > 1:
        once = mem["gradient_reduction"] == "step"
        console.print("gradients reduce-scattered " + ("once per step (whole gradients over the micro-batches fit)"
                                                       if once else "every micro-batch (whole gradients would not "
                                                       "fit)"))

    cmp = mem["comparison"]
    ex = report["experts"]
    t = _table("Claims, side by side", "", "value")
    t.add_row("expert bytes, training precision", gib(ex["bytes_train"]))
    t.add_row("expert bytes, bf16", gib(ex["bytes_bf16"]))
    t.add_row(f"expert bytes, serving ({ex['serve_format']})", gib(ex["bytes_serve"]))
    if ex["serve_vs_bf16"] is not None:
        t.add_row("serving / bf16", f"{ex['serve_vs_bf16']:.1%}")
    t.add_row("peak, plain DP without checkpointing", gib(cmp["plain_dp_no_checkpointing_bytes"]))
    t.add_row("peak, ZeRO-3 + full checkpointing (gradients reduced per micro-batch)",
              gib(cmp["zero3_full_checkpointing_bytes"]))
    t.add_row("reduction", f"{cmp['zero3_full_checkpointing_reduction']:.1%}")
    console.print(t)

    comm, time = report["comm"]["bytes_per_step"], report["time"]
    t = _table("Per optimizer step", "", "value")
    t.add_row("FLOPs (model)", human(report["flops"]["per_step"], "FLOP"))
    t.add_row("FLOPs (with recomputation)", human(report["flops"]["per_step_with_recompute"], "FLOP"))
    for kind, value in comm["by_kind"].items():
        t.add_row(f"comm {kind.replace('_', ' ')}", human(value, "B"))
    t.add_row("comm intra-node / inter-node", f"{human(comm['by_link']['intra_node'], 'B')} / "
              f"{human(comm['by_link']['inter_node'], 'B')}")
    t.add_row("all-to-all bytes crossing nodes", f"{report['comm']['expert_alltoall_inter_node_share']:.1%}")
    t.add_row("pipeline bubble", f"{report['pipeline']['bubble_fraction']:.1%}")
    t.add_row("stage imbalance (slowest / mean)", f"{lay['stage_imbalance']:.3f}")
    t.add_row("compute: arithmetic / memory (busiest rank)",
              f"{time['arithmetic_seconds']:.3f} s / {time['weight_read_seconds']:.3f} s")
    if time["fixed_seconds"]:
        t.add_row("fixed costs: latency (busiest rank)", f"{time['fixed_seconds']:.3f} s")
    t.add_row("step time (estimate)", f"{time['step_seconds_estimate']:.3f} s")
    if time["step_seconds_low"] is not None:
        t.add_row("  range (the calibration's spread)",
                  f"{time['step_seconds_low']:.3f}-{time['step_seconds_high']:.3f} s")
    rates = time["rates"]
    t.add_row("  rates: compute / communication", f"{rates['compute']} / {rates['communication']}")
    if rates["compiled"] is not None:
        t.add_row("  rates: compiled layers", rates["compiled"])
    t.add_row("  of it: exposed communication / bubble",
              f"{time['exposed_communication_seconds']:.3f} s / {time['bubble_seconds']:.3f} s")
    if time["hidden_communication_seconds"]:
        t.add_row("  communication hidden behind compute", f"{time['hidden_communication_seconds']:.3f} s")
    t.add_row("tokens / s", human(time["tokens_per_second"]))
    t.add_row("model FLOPs utilisation (MFU)", f"{time['utilization']:.1%}")
    t.add_row("busy time: share computing (busiest GPU)",
              f"{time['busy_fraction']:.1%} ({time['busiest_busy_fraction']:.1%})")
    console.print(t)
    console.print("busy time: the share of the step a GPU runs compute kernels. The article's 98% GPU utilisation "
                  "compares with busy time, not with MFU, which counts only the model's FLOPs at the device's peak.")
    _exchange(report, console)

    serve = report["serve"]
    if serve is not None:
        fits = "fits" if serve["fits"] else "does NOT fit"
        console.print(f"serving ({serve['dtype']}, batch {serve['max_batch']} x {serve['max_seq_len']} tokens): "
                      f"worst rank {gib(serve['worst_rank_bytes'])} (weights + KV cache + workspace): {fits} "
                      "(--mode serve: more)")
