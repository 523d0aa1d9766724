"""The spec's pydantic models. Field names are the public interface (docs/spec.md).

Every model forbids unknown fields; derived values are properties, never fields, so a spec cannot
contradict itself. Cross-field rules live in `checks.py`, where they can name every field they involve.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from lcc.spec.calibration import Calibration

MAX_INT = 2**40  # far beyond any real size; keeps arithmetic on sizes fast and exact
MAX_FLOAT = 1e12
Pos = Annotated[int, Field(gt=0, le=MAX_INT, strict=True)]
NonNeg = Annotated[int, Field(ge=0, le=MAX_INT, strict=True)]
PosFloat = Annotated[float, Field(gt=0, le=MAX_FLOAT, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, le=MAX_FLOAT, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=1e-6, le=MAX_FLOAT, allow_inf_nan=False)]  # a hardware rate or size
DType = Literal["float32", "bfloat16", "float64"]

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# A spec's name is a plain folder name (generated/<name>/, .lcc-cache/<name>-<key>/): it starts with a letter or a
# digit, so it is never `.` or `..` (a plan written into generated/ itself, or into the working directory), nor hidden.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Attention(_Section):
    n_heads: Pos = Field(description="Query heads.")
    n_kv_heads: Pos = Field(description="Key/value heads (grouped-query attention); equal to n_heads for MHA.")
    head_dim: Pos = Field(description="Dimension of one head; even, for rotary embeddings.")
    rope_theta: PosFloat = Field(10000.0, description="Rotary embedding base.")
    qk_norm: Literal["none", "head", "all"] = Field(
        "none", description="RMSNorm of the projected queries and keys before rotary embeddings: over each head's "
        "head_dim with one weight per head dimension (head, as Qwen3-MoE), or over all heads at once (all, as OLMoE).")


class FFN(_Section):
    d_ff: Pos = Field(description="Hidden width of the dense SwiGLU FFN used by layers that are not MoE.")


class MoE(_Section):
    layers: Literal["all"] | list[NonNeg] = Field(
        "all", description='"all", or the indices of the layers that are MoE; the others use the dense FFN.'
    )
    n_experts: Pos = Field(description="Routed experts per MoE layer.")
    n_groups: Pos = Field(1, description="Experts are split evenly into this many groups (stage-1 routing).")
    expert_d_ff: Pos = Field(description="Hidden width of one expert's SwiGLU FFN.")
    n_shared_experts: NonNeg = Field(0, description="Always-on experts of width expert_d_ff added to the routed ones.")

    @property
    def experts_per_group(self) -> int:
        return self.n_experts // self.n_groups


class Model(_Section):
    vocab_size: Pos = Field(description="Tokens in the vocabulary.")
    d_model: Pos = Field(description="Residual stream width.")
    n_layers: Annotated[int, Field(gt=0, le=10_000, strict=True)] = Field(description="Transformer layers.")
    max_seq_len: Pos = Field(description="Longest sequence the model supports (tokens).")
    norm_eps: PosFloat = Field(1.0e-5, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Share the token embedding with the LM head.")
    tokenizer: str | None = Field(None, description="A Hugging Face tokenizer.json (relative to the spec file) "
                                  "for text in and out; null: one token per byte.")
    attention: Attention
    ffn: FFN | None = Field(None, description="Dense FFN of the layers that are not MoE; needed if there are any.")
    moe: MoE | None = Field(None, description="Omit for a dense model.")

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers, sorted."""
        if self.moe is None:
            return ()
        if self.moe.layers == "all":
            return tuple(range(self.n_layers))
        return tuple(sorted(self.moe.layers))

    @cached_property
    def _moe_set(self) -> frozenset[int]:
        return frozenset(self.moe_layers)

    def is_moe(self, layer: int) -> bool:
        return layer in self._moe_set


class Groups(_Section):
    similarity: Literal["cosine"] = Field("cosine", description="Stage 1: token vs learned group centroids.")
    top: Pos = Field(1, description="Groups kept per token.")
    temperature: PosFloat = Field(1.0, description="tau in cos(x, c) / tau.")
    sets: Pos = Field(1, description="The groups split into this many consecutive sets; placement keeps a set "
                      "inside one node.")
    max_sets: Pos | None = Field(None, description="Sets a token may use (by each set's best group score), before "
                                 "its top groups are chosen inside them: a token's experts span at most this many "
                                 "nodes. null = every set (no limit).")

    @property
    def kept_sets(self) -> int:
        """Sets a token's groups may come from (every set when there is no limit)."""
        return self.sets if self.max_sets is None else self.max_sets

    @property
    def node_limited(self) -> bool:
        return self.kept_sets < self.sets


class ExpertSelection(_Section):
    selection: Literal["least_loaded", "top_score"] = Field(
        "least_loaded", description="Stage 2: rank by pi + load bias (least_loaded) or by pi (top_score)."
    )


class K(_Section):
    min: Pos = Field(1, description="Fewest experts per token.")
    max: Pos = Field(1, description="Most experts per token (static slots).")
    threshold: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0, description="Smallest k whose top-k probability mass reaches this, clamped to [min, max]."
    )
    expected: PosFloat | None = Field(
        None, description="Planning estimate of the mean k for the cost model; default (min + max) / 2."
    )

    @property
    def planned(self) -> float:
        return self.expected if self.expected is not None else (self.min + self.max) / 2


class Balance(_Section):
    bias_rate: NonNegFloat = Field(1.0e-3, description="Load-bias step per optimizer step (least_loaded only).")
    aux_loss_coef: NonNegFloat = Field(0.0, description="Switch-style load-balancing loss coefficient.")
    z_loss_coef: NonNegFloat = Field(0.0, description="Router z-loss coefficient.")
    expected_imbalance: Annotated[float, Field(ge=1.0, le=1e6, allow_inf_nan=False)] = Field(
        1.0, description="Planning estimate for the cost model: the busiest expert's routed tokens over the mean "
                         "(training reports it as imbalance_expert); 1.0 = even load.")


class Routing(_Section):
    score: Literal["softmax", "sigmoid"] = Field("softmax", description="Expert scores within each kept group.")
    groups: Groups = Groups()
    experts: ExpertSelection = ExpertSelection()
    k: K = K()
    gate_scale: PosFloat = Field(1.0, description="Gates are gate_scale * pi.")
    renormalize: bool = Field(False, description="Divide gates by their sum over the chosen experts.")
    balance: Balance = Balance()
    capacity_factor: PosFloat | None = Field(
        None, description="Tokens an expert accepts per unit, as a multiple of its fair share; null = dropless."
    )


class ExpertQuant(_Section):
    bits: Literal[4] = Field(4, description="Bits per expert weight (int4, two per byte).")
    group_size: Pos = Field(128, description="Input elements sharing one scale (and zero-point).")
    symmetric: bool = Field(True, description="Symmetric (scale only) or asymmetric (scale + zero-point).")


class Quantization(_Section):
    experts: ExpertQuant | None = Field(None, description="Expert weight quantization for serving; null = none.")


class Pipeline(_Section):
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"] = Field(
        "1f1b", description="Pipeline schedule; zb_h1 and zbv (zero bubble) split each backward into its input "
        "gradient (I) and its weight gradients (W), which fill the bubbles.")
    microbatches: Pos = Field(1, description="Micro-batches per data-parallel rank per optimizer step.")
    virtual_stages: Pos = Field(1, description="Stages per pipeline rank (interleaved_1f1b; zbv: 2).")


class Parallelism(_Section):
    tp: Pos = Field(1, description="Tensor-parallel degree (inside a node).")
    pp: Pos = Field(1, description="Pipeline-parallel degree.")
    dp: Pos = Field(1, description="Data-parallel degree; world_size = pp * dp * tp.")
    ep: Pos = Field(1, description="Expert-parallel degree; divides dp * tp; experts replicated over dp*tp/ep ranks.")
    zero: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage over dp (dense) and edp (experts).")
    activation_checkpointing: Literal["none", "selective", "full"] = Field("none", description="Recompute policy.")
    sequence_parallel: bool = Field(False, description="Split norms and residuals over tp along the sequence.")
    expert_overlap: bool = Field(
        False, description="Split each micro-batch's tokens in two halves per MoE layer: one half's dispatch and "
        "combine all-to-alls run while the other half's experts compute.")
    expert_exchange: Literal["flat", "hierarchical"] = Field(
        "flat", description="Expert all-to-all: flat (every slot to its expert's rank) or hierarchical (a token once "
        "to each node it needs, then forwarded inside the node; combined in reverse, summed in the node first).")
    pipeline: Pipeline = Pipeline()

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def edp(self) -> int:
        return self.dp * self.tp // self.ep

    @property
    def n_stages(self) -> int:
        return self.pp * self.pipeline.virtual_stages


class Device(_Section):
    kind: Literal["cpu", "cuda"] = Field("cpu", description="Selects the kernel backend (never the compiling host).")
    name: str = Field("cpu", description="Device model, for reports.")
    memory_gib: Rate = Field(description="Memory per device (GiB).")
    peak_tflops: Rate = Field(description="Peak dense matmul rate at the training dtype (TFLOP/s).")
    memory_tbps: Rate = Field(description="Memory bandwidth (TB/s).")
    tf32: bool = Field(False, description="cuda: let float32 matmuls use TF32 (faster, about 1e-3 relative error).")


class Network(_Section):
    intra_node_gbps: Rate = Field(description="Bandwidth per device to devices in its node (Gbit/s).")
    inter_node_gbps: Rate = Field(description="Bandwidth per device to other nodes (Gbit/s).")
    intra_node_latency_us: NonNegFloat = Field(0.0, description="Fixed time of one collective or message within "
                                               "a node, whatever its size (microseconds).")
    inter_node_latency_us: NonNegFloat = Field(0.0, description="The same for one that crosses nodes.")


class Cluster(_Section):
    nodes: Pos = Field(1, description="Machines.")
    gpus_per_node: Pos = Field(description="Devices (ranks) per machine.")
    device: Device
    network: Network
    calibration: Calibration | None = Field(None, description="Achieved rates measured by lcc calibrate; the "
                                            "cost model uses them instead of the device's and network's peaks.")

    @property
    def n_devices(self) -> int:
        return self.nodes * self.gpus_per_node


class Optimizer(_Section):
    name: Literal["adamw"] = "adamw"
    lr: PosFloat = Field(3.0e-4, description="Peak learning rate.")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: PosFloat = 1.0e-8
    weight_decay: NonNegFloat = 0.0
    warmup_steps: NonNeg = Field(0, description="Linear warmup steps, then cosine decay to min_lr_ratio * lr.")
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    grad_clip: NonNegFloat = Field(1.0, description="Clip the global gradient norm to this; 0 = off.")


class Init(_Section):
    std: PosFloat = Field(0.02, description="Normal std for embeddings, router and other weights.")
    experts: Literal["he_normal", "normal"] = Field("he_normal", description="Expert input projections.")
    attention: Literal["orthogonal", "normal"] = Field("orthogonal", description="Attention projections.")


class GradientShaping(_Section):
    experts: Literal["none", "token_count"] = Field("none", description="Scale expert grads by T / n_e per step.")


class Blended(_Section):
    path: str = Field(description="A prepared folder (lcc data prepare), relative to the spec file.")
    weight: PosFloat = Field(description="Its share of the training sequences (the weights are normalised).")


class Data(_Section):
    kind: Literal["builtin", "text", "synthetic", "prepared"] = Field("builtin", description="Corpus: prepared is a "
                                                                      "folder written by lcc data prepare.")
    path: str | None = Field(None, description="The text file (kind: text) or prepared folder (kind: prepared), "
                             "relative to the spec file.")
    blend: list[Blended] | None = Field(None, description="kind: prepared, instead of path: several prepared "
                                        "folders, each sequence from one of them in proportion to their weights.")
    validation: str | None = Field(None, description="kind: prepared: a prepared folder to validate on "
                                   "(train.eval_every), whole; null: the last 5% of the training data.")
    document_mask: bool = Field(False, description="kind: prepared: attention stays inside each document of a "
                                "packed sequence (as if each document were run on its own).")
    held_out: Annotated[float, Field(ge=0, le=0.5)] = Field(0.05, description="The fraction of the data's tokens, "
                                                            "at its end, left out of training to validate on.")


class Train(_Section):
    seq_len: Pos = Field(description="Tokens per training sequence.")
    global_batch: Pos = Field(description="Sequences per optimizer step.")
    steps: Pos = Field(100, description="Optimizer steps.")
    dtype: DType = Field("float32", description="Training precision; float64 is for verification.")
    optimizer: Optimizer = Optimizer()
    init: Init = Init()
    gradient_shaping: GradientShaping = GradientShaping()
    data: Data = Data()
    eval_every: Pos | None = Field(None, description="Every this many steps, the loss on the validation split "
                                   "(val_loss, val_perplexity in the step's metrics); null: never.")
    eval_batches: Pos = Field(1, description="Global batches of the validation split each evaluation reads (the "
                              "same ones every time).")
    collective_timeout_s: PosFloat = Field(120.0, description="A rank waiting longer on a collective ends the run.")
    checkpoint_every: NonNeg = Field(0, description="Steps between checkpoints; 0 = only at the end.")
    compile: Literal["inductor", "none"] = Field(
        "none", description="Compile each layer function of the programs with torch.compile (Inductor: fused C++ "
        "on CPU, Triton on GPU), or run them eagerly. float64 runs stay eager. docs/runtime.md, 'Compiled programs'.")


class Serve(_Section):
    max_batch: Pos = Field(16, description="Sequences batched together.")
    max_seq_len: Pos = Field(description="Longest sequence (prompt + generated) served.")
    routing_tables: bool = Field(True, description="Precompute static routing tables in serve plans.")
    dtype: Literal["bfloat16", "float32", "float64"] = Field(
        "bfloat16", description="Precision of the non-expert weights and activations; float64 is for verification.")
    cpu_kernels: Literal["native", "torch"] = Field(
        "native", description="On CPU in bfloat16 or float32, what runs the int4 experts, attention, routing and (in "
        "bfloat16) the dense projections of decode steps: lcc's native kernels (x86-64 with AVX-512 or AVX2, AMX and "
        "AVX512-BF16 where present; built at first use with the system's C++ compiler) or PyTorch's (the int4 experts "
        "through aten._weight_int4pack_mm_for_cpu; group sizes 32-256).")
    block_size: Pos = Field(16, description="Tokens per block of the paged KV cache.")
    prefix_caching: bool = Field(True, description="Reuse the cached key/value blocks of a prompt's prefix that "
                                 "an earlier request computed (whole blocks, identified by their tokens and "
                                 "everything before them; least recently used evicted first).")
    kv_blocks: Pos | None = Field(None, description="KV cache blocks per rank; null: enough for max_batch sequences "
                                  "of max_seq_len tokens.")
    max_batched_tokens: Pos = Field(256, description="Tokens per engine step (decodes first, then prefill chunks).")
    stop_token_ids: list[NonNeg] = Field(default_factory=list, description="Token ids that end a completion (the "
                                         "model's end of sequence): generated, with finish reason stop.")

    @property
    def blocks_per_sequence(self) -> int:
        return -(-self.max_seq_len // self.block_size)

    @property
    def n_kv_blocks(self) -> int:
        return self.kv_blocks if self.kv_blocks is not None else self.max_batch * self.blocks_per_sequence


class Spec(_Section):
    """A whole lcc spec: one MoE (or dense) model, its parallel layout and the cluster it runs on."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)] = Field(
        description="Lowercase letters, digits, '.', '_' and '-', starting with a letter or digit; also the "
        "default output folder generated/<name>/."
    )
    seed: NonNeg = Field(0, description="Seeds initialisation and data order.")
    model: Model
    routing: Routing | None = None
    quantization: Quantization | None = None
    parallelism: Parallelism = Parallelism()
    cluster: Cluster
    train: Train
    serve: Serve | None = None

    _source: object = PrivateAttr(default=None)
    _folder: Path | None = PrivateAttr(default=None)  # the spec file's folder, when loaded from a file

    @property
    def has_moe(self) -> bool:
        return self.model.moe is not None

    @property
    def ep_nodes(self) -> tuple[int, int] | None:
        """(nodes one expert-parallel group spans, its ranks on each of them). An EP group is ep consecutive
        ranks starting at a multiple of ep (docs/cost-model.md, rank order); nodes are gpus_per_node
        consecutive ranks. None where the groups straddle nodes unevenly (neither divides the other)."""
        ep, per_node = self.parallelism.ep, self.cluster.gpus_per_node
        if per_node % ep == 0:
            return 1, ep
        if ep % per_node == 0:
            return ep // per_node, per_node
        return None
