"""Spec -> plan: run the passes into a typed `Plan`, render the programs from it, check the programs
against it, and lay out the plan files deterministically.

`compile_plan(spec, mode)` returns {relative path: text}. Same spec, same bytes: sorted keys, no
timestamps, no absolute paths, nothing from the compiling machine.
"""

from __future__ import annotations

import json

from lcc.actions import Action, stage_rank
from lcc.compiler.codegen import compiled_functions, render_programs
from lcc.compiler.cost import cost_report
from lcc.compiler.cost.params import local_kv_heads
from lcc.compiler.dims import dims, precision
from lcc.compiler.kernels import (
    attention_kernel,
    decode_kernel,
    dense_kernel,
    expert_kernel,
    norm_kernel,
    routing_kernel,
)
from lcc.compiler.layout import coords
from lcc.compiler.passes import (
    data_parallel,
    expert_placement,
    memory,
    moe_lowering,
    partition,
    quantize,
    step_actions,
    tensor_parallel,
)
from lcc.compiler.schedule import COST, add_p2p, generate, simulate, to_csv
from lcc.compiler.state import CompileState
from lcc.compiler.trace import trace
from lcc.data.chat_template import PLAN_FILE as PLAN_CHAT_TEMPLATE
from lcc.data.tokenizer import PLAN_FILE as PLAN_TOKENIZER
from lcc.data.tokenizer import chat_template_text, tokenizer_text
from lcc.plan import codec
from lcc.plan.program_check import check_programs
from lcc.plan.types import (
    PLAN_VERSION,
    Collective,
    Data,
    Mesh,
    Pass,
    Plan,
    Precision,
    RankTable,
    Role,
    Schedule,
    Serving,
    Simulation,
    StepAction,
    Validation,
    is_zero3_scatter,
)
from lcc.spec import Problem, SpecError, locate, resolved, spec_hash
from lcc.spec.models import DTYPE_BYTES, Spec

PASSES = [partition, expert_placement, tensor_parallel, moe_lowering, memory, data_parallel, step_actions, quantize]


def backend(spec: Spec, mode: str) -> str:
    """The kernel backend of the programs' ops: CUDA serve plans run their experts on lcc's Triton kernels
    (lcc.backends.triton; float64 verification plans on the reference op); everything else on torch."""
    if mode == "serve" and spec.cluster.device.kind == "cuda" and _serve_dtype(spec) != "float64" and spec.model.moe:
        return "triton"
    return "torch"


def _serve_dtype(spec: Spec) -> str:
    return spec.serve.dtype if spec.serve else "bfloat16"


def check_fits(spec: Spec, report: dict) -> None:
    mem = report["memory"]
    if mem["fits"]:
        return
    worst = mem["worst_rank"]
    path = ("cluster", "device", "memory_gib")
    need = worst["peak_bytes"] / 2**30  # the peak is what `fits` compares
    raise SpecError([Problem(locate(spec, path), path,
                             f"rank {worst['rank']} ({worst['role']}) needs {need:.2f} GiB at its peak by the cost "
                             f"model, more than the device's {spec.cluster.device.memory_gib} GiB",
                             "raise zero, use activation checkpointing, add pipeline stages or expert parallelism "
                             "(lcc report shows the breakdown)",
                             ("parallelism.zero", "parallelism.activation_checkpointing"))])


def build_plan(spec: Spec, mode: str = "train") -> tuple[Plan, CompileState]:
    report = cost_report(spec)
    if mode == "train":
        check_fits(spec, report)
    else:
        check_servable(spec)
    state = CompileState(spec, mode, trace(spec))
    for p in PASSES:
        p.run(state)
        state.applied.append(Pass(p.NAME, p.DESCRIPTION))
    par = spec.parallelism
    compute = _compute_only(spec, mode)
    lowered = add_p2p(compute, par.n_stages, placement(spec, mode))
    if mode == "train":
        sim = simulate(lowered, par.n_stages, par.pipeline.microbatches, placement=placement(spec, mode))
    else:  # one batch through the stages in order: each rank busy with its own stages, idle for the others
        busy = [len(actions) for actions in compute]
        sim = Simulation(par.n_stages, busy, 1 - sum(busy) / (par.pp * par.n_stages), {"F": COST["F"]})
    params_dtype, compute_dtype = precision(spec, mode)
    d = dims(spec, mode)
    b = d.b
    plan = Plan(
        version=PLAN_VERSION, spec_name=spec.name, spec_hash=spec_hash(spec), mode=mode, world_size=par.world_size,
        backend=backend(spec, mode), device=spec.cluster.device.kind,
        dtype=spec.train.dtype if mode == "train" else (spec.serve.dtype if spec.serve else "bfloat16"),
        precision=Precision(params_dtype, compute_dtype, params_dtype != compute_dtype),
        mesh=Mesh(["pp", "dp", "tp"], [par.pp, par.dp, par.tp], par.ep, par.edp, spec.cluster.gpus_per_node,
                  "rank = (pp * dp_size + dp) * tp_size + tp; f = dp * tp_size + tp; ep = f % ep_size; "
                  "edp = f // ep_size; node = rank // gpus_per_node",
                  max(1, par.tp // spec.model.attention.n_kv_heads), *_exchange_axes(spec)),
        ranks=_ranks(spec, mode), passes=state.applied, roles=_roles(state), parameters=list(state.params.values()),
        buffers=state.buffers, experts=state.experts, partition=state.partition, memory=state.memory,
        data=Data(spec.train.seq_len, spec.train.global_batch, par.dp * par.pipeline.microbatches,
                  par.pipeline.microbatches, b, _validation(spec, mode)),
        schedule=Schedule(par.pipeline.schedule, par.pipeline.microbatches, par.pipeline.virtual_stages,
                          par.n_stages, sim if mode == "serve" else
                          Simulation(sim.makespan, sim.busy, sim.bubble_fraction,
                                     {k: c for k, c in COST.items() if any(a.kind == k for r in compute for a in r)}),
                          [[str(a) for a in actions] for actions in with_reductions(lowered, state)], state.step,
                          {"compute_only_csv": "schedule.csv", "full": "actions.txt"}, [b, d.s_local, d.D]),
        cost=report, serving=_serving(spec, state) if mode == "serve" else None,
    )
    if mode == "serve":
        plan.schedule.kind = "serve"
        plan.schedule.microbatches = 1
    return plan, state


def placement(spec: Spec, mode: str) -> str:
    """The schedule kind whose stage placement a plan uses (lcc.actions.stage_rank): the spec's training
    schedule (zbv: a V), and `serve` for serve plans, which run the stages in order on rank `stage mod pp`
    whatever the training schedule (lcc/serve/rank.py places them so)."""
    return "serve" if mode == "serve" else spec.parallelism.pipeline.schedule


FAST_INT4_GROUPS = (32, 64, 128, 256)  # what PyTorch's CPU int4 matmul takes


def check_servable(spec: Spec) -> None:
    """What a serve plan needs of the spec: a serve section, and int4 experts the plan's kernel can run:
    on CPU lcc's native kernel (any group size) or PyTorch's int4 matmul, on CUDA lcc's Triton kernels
    (float64 serving uses the reference op, which takes any group size)."""
    if spec.serve is None:
        raise SpecError([Problem(locate(spec, ("serve",)), ("serve",), "a serve plan needs a serve section",
                                 "add serve: {max_seq_len: ...}", ())])
    quant = spec.quantization.experts if spec.quantization is not None else None
    if quant is None or spec.model.moe is None or spec.serve.dtype == "float64":
        return
    path = ("quantization", "experts", "group_size")
    if spec.cluster.device.kind == "cuda":
        if quant.group_size < 16 or quant.group_size & (quant.group_size - 1):
            raise SpecError([Problem(locate(spec, path), path, f"group_size {quant.group_size}: lcc's Triton int4 "
                                     "kernels take powers of two from 16 (a tile never straddles a scale group)",
                                     "choose 32, 64, 128 or 256, or serve.dtype float64 (the reference int4 op)",
                                     ("serve.dtype",))])
        return
    if spec.serve.cpu_kernels == "torch" and quant.group_size not in FAST_INT4_GROUPS:
        sizes = ", ".join(map(str, FAST_INT4_GROUPS))
        raise SpecError([Problem(locate(spec, path), path, f"group_size {quant.group_size}: PyTorch's CPU int4 kernel "
                                 f"(serve.cpu_kernels torch) takes group sizes {sizes}", "choose one of them, "
                                 "serve.cpu_kernels native, or serve.dtype float64 (the reference int4 op)",
                                 ("serve.cpu_kernels", "serve.dtype"))])
    for field, width in (("d_model", spec.model.d_model), ("moe.expert_d_ff", spec.model.moe.expert_d_ff)):
        if width % 16:
            where = ("model", *field.split("."))
            raise SpecError([Problem(locate(spec, where), where, f"{field} {width}: the CPU int4 kernel needs output "
                                     "widths divisible by 16", "serve.dtype float64 uses the reference int4 op",
                                     ("serve.dtype",))])


def _serving(spec: Spec, state: CompileState) -> Serving:
    """The serve plan's runtime settings: KV cache, kernels, and the step's batch and logits exchange."""
    serve, par, att = spec.serve, spec.parallelism, spec.model.attention
    quant = spec.quantization.experts if spec.quantization is not None and spec.model.moe is not None else None
    kernel = expert_kernel(spec)
    kv_heads = local_kv_heads(spec)
    per_layer = 2 * kv_heads * att.head_dim * DTYPE_BYTES[serve.dtype]
    per_rank = [per_layer * sum(b - a for s, (a, b) in enumerate(state.stage_bounds)
                                if stage_rank(s, par.pp, "serve") == r) for r in range(par.pp)]
    V = spec.model.vocab_size
    before, after = [], []
    if par.world_size > 1:
        before.append(StepAction("BROADCAST_BATCH", collectives=[Collective(
            "broadcast", "world", "batch", "rank 0's schedule of the step: every dp rank's tokens, positions and "
            "block tables", None, "object")]))
        after.append(StepAction("RETURN_LOGITS", state.last_stage, collectives=[Collective(
            "send", "world", "logits", "each dp rank's last-position logits (last stage, tp rank 0) to rank 0",
            [-1, V], serve.dtype)]))
    return Serving(serve.dtype, serve.max_batch, serve.max_seq_len, serve.max_batched_tokens, serve.block_size,
                   serve.n_kv_blocks, kv_heads, att.head_dim, per_rank, serve.routing_tables, kernel,
                   quant.group_size if quant is not None else None, before, after,
                   attention_kernel=attention_kernel(spec), routing_kernel=routing_kernel(spec),
                   dense_kernel=dense_kernel(spec), norm_kernel=norm_kernel(spec), decode_kernel=decode_kernel(spec),
                   prefix_caching=serve.prefix_caching)


def with_reductions(lowered: list[list[Action]], state: CompileState) -> list[list[Action]]:
    """Each pipeline rank's actions with `{stage}REDUCE_GRAD` after the last backward of every stage that
    reduces gradients (gradient buckets, or ZeRO-3's reduce-scatters): its last B, and after that B's send
    to the previous stage, which then need not wait for the reduction; or its last W (zero-bubble schedules:
    the weight gradients are complete only then; the I's send went long before)."""
    out = []
    for actions in lowered:
        last = {a.stage: i for i, a in enumerate(actions) if a.kind in ("B", "W")}
        after = {}
        for s, i in last.items():
            if state.buckets.get(s) or _zero3_scatters(state, s):
                sends = i + 1 < len(actions) and actions[i + 1] == Action(s, "SEND_B", actions[i].mb)
                after[i + 1 if sends else i] = s  # the gradient goes to the previous stage first
        mine: list[Action] = []
        for i, a in enumerate(actions):
            mine.append(a)
            if i in after:
                mine.append(Action(after[i], "REDUCE_GRAD", None))
        out.append(mine)
    return out


def _zero3_scatters(state: CompileState, stage: int) -> list[Collective]:
    """The reduce-scatters of ZeRO-3's gathers in a stage's backward."""
    return [c for comm in state.stage_comms(stage) for c in comm.backward if is_zero3_scatter(c)]


def compile_plan(spec: Spec, mode: str = "train") -> dict[str, str]:
    plan, state = build_plan(spec, mode)
    programs = render_programs(state)
    check_programs(plan, programs)
    tokenizer = tokenizer_text(spec)  # a plan carries its spec's tokenizer: it serves and trains on its own
    chat = chat_template_text(spec)  # and the chat template beside it
    return {
        **programs,
        **({PLAN_TOKENIZER: tokenizer} if tokenizer is not None else {}),
        **({PLAN_CHAT_TEMPLATE: chat} if chat is not None else {}),
        "plan.json": codec.dumps(plan),
        "spec.json": json.dumps(resolved(spec), indent=1, sort_keys=True) + "\n",
        "schedule.csv": to_csv(_compute_only(spec, mode)),
        "actions.txt": actions_text(plan),
    }


def _compute_only(spec: Spec, mode: str = "train"):
    par = spec.parallelism
    if mode == "serve":  # each step: the stages in order, one forward each, stage s on rank s mod pp
        return [[Action(s, "F", 0) for s in range(par.n_stages) if stage_rank(s, par.pp, "serve") == r]
                for r in range(par.pp)]
    return generate(par.pipeline.schedule, par.pp, par.pipeline.virtual_stages, par.pipeline.microbatches)


def _ranks(spec: Spec, mode: str) -> RankTable:
    par, per_node = spec.parallelism, spec.cluster.gpus_per_node
    kind = placement(spec, mode)
    rows = []
    for r in range(par.world_size):
        c = coords(par, per_node, r)
        rows.append([r, c.pp, c.dp, c.tp, c.ep, c.edp, c.node])
    return RankTable(["rank", "pp", "dp", "tp", "ep", "edp", "node"], rows,
                     {str(p): [f"stage{s}" for s in range(par.n_stages) if stage_rank(s, par.pp, kind) == p]
                      for p in range(par.pp)})


def recomputed(state: CompileState, comm) -> bool:
    """Whether activation checkpointing reruns this comm's line in backward (ZeRO-3 gathers count their
    second gather in their own backward)."""
    if comm.line in ("zero_gather", "zero_prefetch") or state.memory is None:
        return False
    mode = state.memory.activation_checkpointing
    in_layer = comm.forward and comm.forward[0].site.startswith("layers.")
    return (mode == "full" and bool(in_layer)) or (mode == "selective" and comm.region == "routing")


def _roles(state: CompileState) -> list[Role]:
    roles = []
    par = state.spec.parallelism
    kind = placement(state.spec, state.mode)
    for s, (a, b) in enumerate(state.stage_bounds):
        comms = state.stage_comms(s)
        forward = [c for comm in comms for c in comm.forward]
        backward: list[Collective] = []
        for comm in reversed(comms):  # autograd runs the lines' backward rules in reverse
            if recomputed(state, comm):
                backward += comm.forward
            backward += comm.backward
        roles.append(Role(
            name=f"stage{s}", stage=s, pp_rank=stage_rank(s, par.pp, kind), layers=[a, b], embedding=s == 0,
            head=s == state.last_stage,
            program=f"programs/stage{s}.py", parameters=sorted(n for n, p in state.params.items() if s in p.stages),
            buffers=[x.name for x in state.buffers if s in x.stages], forward=forward, backward=backward,
            grad_buckets=state.buckets.get(s, []), compiled=compiled_functions(state, a, b)))
    return roles



def actions_text(plan: Plan) -> str:
    if plan.serving is not None:
        lines = [f"# lcc per-rank serve step for {plan.spec_name}: rank 0's batch to every rank, the stages in order",
                 "# (torch.distributed.pipelining actions, with the collectives each forward F issues), then each dp",
                 "# rank's last-position logits to rank 0. Stage s runs on pipeline rank s mod pp."]
    elif plan.schedule.kind in ("zb_h1", "zbv"):
        lines = [f"# lcc per-rank schedule for {plan.spec_name}: torch.distributed.pipelining actions, the",
                 "# collectives each compute action issues per micro-batch (forward F; backward split into I, the",
                 "# stage input's gradient, sent back at once, and W, the weight gradients, with the gradient",
                 "# buckets issued during it), then the step's actions after the last W. Stage s runs on pipeline",
                 "# rank " + ("s for s < pp, else 2 pp - 1 - s (a V)." if plan.schedule.kind == "zbv" else "s mod pp.")]
    else:
        lines = [f"# lcc per-rank schedule for {plan.spec_name}: torch.distributed.pipelining actions, the",
                 "# collectives each compute action issues per micro-batch (forward F, backward B, with the gradient",
                 "# buckets issued during it), then the step's actions after the last backward. Stage s runs on",
                 "# pipeline rank s mod pp."]
    recompute = {"none": "", "selective": "attention cores, routing and dispatch",
                 "full": "every layer (its forward collectives again)"}[plan.memory.activation_checkpointing]
    once = plan.memory.zero >= 3 and plan.memory.grad_reduce == "step"
    by_stage = {r.stage: r for r in plan.roles}
    serving = plan.serving
    for r, actions in enumerate(plan.schedule.actions):
        lines.append(f"pp_rank {r}:")
        for action in serving.before if serving else []:
            lines.append(f"  {action}")
        last_b = {Action.parse(a).stage: i for i, a in enumerate(actions) if Action.parse(a).kind in ("B", "W")}
        for index, text in enumerate(actions):
            extra = ""
            action = Action.parse(text)
            kind = action.kind
            role = by_stage[action.stage]
            final = index == last_b.get(action.stage)
            if kind == "REDUCE_GRAD":
                buckets = role.grad_buckets
                further = [f"all_reduce({axis})" for b in buckets for axis in b.axes[1:]]
                extra = "  # the stage's gradients complete" + (
                    ("; then " + _counted(further)) if further else "")
            if kind in ("F", "B", "I", "W"):  # I: the backward but the weights' parts, which W issues
                issued = [c for c in (role.forward if kind == "F" else role.backward)
                          if not (kind in ("B", "W") and once and not final and is_zero3_scatter(c))
                          and (kind in ("F", "B") or (kind == "W") == is_zero3_scatter(c))]
                issued += [c for b in role.grad_buckets if kind in ("B", "W") and (final or b.when == "microbatch")
                           for c in b.collectives(0, "")[:1]]
                ops = [f"{c.op}({c.axis})" for c in issued]
                extra = "  # " + _counted(ops) if ops else ""
                if kind in ("B", "I") and recompute:
                    extra += ("; " if extra else "  # ") + f"recomputes {recompute}"
            lines.append(f"  {text}{extra}")
        for action in plan.schedule.step[r] if plan.schedule.step else []:
            lines.append(f"  {action}")
        for action in serving.after if serving and action_on(serving, r, plan) else []:
            lines.append(f"  {action}")
    return "\n".join(lines) + "\n"


def _counted(ops: list[str]) -> str:
    return ", ".join(f"{k} x{ops.count(k)}" for k in dict.fromkeys(ops))


def action_on(serving: Serving, pp_rank: int, plan: Plan) -> bool:
    """Whether the serve plan's after-step actions concern `pp_rank`: the last stage's, and rank 0's."""
    return pp_rank in (0, stage_rank(plan.schedule.n_stages - 1, plan.mesh.size("pp"), plan.schedule.kind))


def _validation(spec: Spec, mode: str) -> Validation | None:
    if mode != "train" or spec.train.eval_every is None:
        return None
    return Validation(spec.train.eval_every, spec.train.eval_batches,
                      Collective("all_reduce", "world", "loss", "the validation batches' summed cross-entropy", [1],
                                 "float64"))


def _exchange_axes(spec: Spec) -> tuple[int, int]:
    """(ep_inter, ep_intra): the hierarchical exchange's two levels, (1, 1) for the flat one."""
    if spec.parallelism.expert_exchange != "hierarchical" or spec.ep_nodes is None:
        return 1, 1
    return spec.ep_nodes
