"""The vocabulary of generated programs: every line of a rank's program calls one of these.

Dense and MoE ops on local shards, each equal to the reference model's computation, and collectives
with explicit autograd rules. A program receives its process groups per mesh axis; with a group of one
rank every collective is the identity.
"""

from lcc.ops.collectives import (
    all_reduce,
    all_to_all,
    all_to_all_start,
    copy_to_tp,
    exchange_wait,
    gather_sequence,
    gather_tokens,
    gather_vocab,
    reduce_scatter_sequence,
    split_tokens,
)
from lcc.ops.context import ProgramContext
from lcc.ops.decode import decode_layer
from lcc.ops.layers import attention, embedding_shard, head_norm, linear, rms_norm, rms_norm_tp
from lcc.ops.loss import all_reduce_max, cross_entropy, flatten_logits, row_max, sum_exp, target_logit
from lcc.ops.moe import (
    MoEPlan,
    combine_tokens,
    grouped_swiglu,
    grouped_swiglu_int4,
    moe_plan,
    route,
    unit_balance,
)
from lcc.ops.node_exchange import NodePlan, node_plan
from lcc.ops.overlap import HalvesPlan, cat_rows, moe_plan_halves
from lcc.ops.recompute import recompute
from lcc.ops.serve import last_positions, paged_attention, route_tables
from lcc.ops.zero import offload_gathered, zero_gather, zero_prefetch

__all__ = [
    "MoEPlan",
    "ProgramContext",
    "all_reduce",
    "all_reduce_max",
    "all_to_all",
    "attention",
    "combine_tokens",
    "copy_to_tp",
    "cross_entropy",
    "decode_layer",
    "embedding_shard",
    "flatten_logits",
    "gather_sequence",
    "gather_tokens",
    "gather_vocab",
    "grouped_swiglu",
    "head_norm",
    "grouped_swiglu_int4",
    "last_positions",
    "linear",
    "moe_plan",
    "NodePlan",
    "node_plan",
    "HalvesPlan",
    "moe_plan_halves",
    "cat_rows",
    "all_to_all_start",
    "exchange_wait",
    "offload_gathered",
    "paged_attention",
    "recompute",
    "reduce_scatter_sequence",
    "rms_norm",
    "rms_norm_tp",
    "route",
    "route_tables",
    "row_max",
    "split_tokens",
    "sum_exp",
    "target_logit",
    "unit_balance",
    "zero_gather",
    "zero_prefetch",
]
