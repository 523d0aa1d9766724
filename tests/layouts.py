"""The tiny-moe layouts that the compiler and runtime tests share (the runtime issue's list)."""

LAYOUTS = {
    "world1": ["parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=1"],
    "tp2": ["parallelism.tp=2", "parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1",
            "cluster.gpus_per_node=2"],
    "pp2": ["parallelism.pp=2", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=2"],
    "dp2": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=1", "cluster.gpus_per_node=2"],
    "dp2_ep2": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2", "cluster.gpus_per_node=2"],
    "pp2_tp2": ["parallelism.pp=2", "parallelism.tp=2", "parallelism.dp=1", "parallelism.ep=1",
                "cluster.gpus_per_node=4"],
    "pp2_dp2_ep2": ["parallelism.pp=2", "parallelism.dp=2", "parallelism.ep=2", "cluster.gpus_per_node=4"],
    "dp2_tp2_ep4": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.tp=2", "parallelism.ep=4",
                    "cluster.gpus_per_node=4"],
    "interleaved": ["parallelism.pp=2", "parallelism.dp=1", "parallelism.ep=1", "cluster.gpus_per_node=2",
                    "parallelism.pipeline.schedule=interleaved_1f1b", "parallelism.pipeline.virtual_stages=2"],
    # a tied head on the second virtual stage of the same pipeline rank: one tensor, one reduction (ZeRO 2)
    "tied_pp1_v2_zero2": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2", "cluster.gpus_per_node=2",
                          "parallelism.pipeline.schedule=interleaved_1f1b", "parallelism.pipeline.virtual_stages=2",
                          "model.tie_embeddings=true", "parallelism.zero=2"],
    # 2 kv heads on 4 tp ranks: each kv head on two ranks, whose gradients are summed
    "tp4_kv2": ["parallelism.tp=4", "parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1",
                "cluster.gpus_per_node=4"],
    # a first stage without routers
    "dense_first_pp2": ["model.moe.layers=[3]", "parallelism.pp=2", "parallelism.dp=1", "parallelism.ep=1",
                        "cluster.gpus_per_node=2"],
    # sequence parallelism: norms, residuals and routers split over tp along the sequence (2 micro-batches)
    "sp_tp2": ["parallelism.tp=2", "parallelism.pp=1", "parallelism.dp=1", "parallelism.ep=1",
               "cluster.gpus_per_node=2", "parallelism.sequence_parallel=true", "parallelism.pipeline.microbatches=2"],
    "sp_pp2_tp2": ["parallelism.pp=2", "parallelism.tp=2", "parallelism.dp=1", "parallelism.ep=1",
                   "cluster.gpus_per_node=4", "parallelism.sequence_parallel=true",
                   "parallelism.pipeline.microbatches=2"],
    "sp_dp2_tp2_ep4": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.tp=2", "parallelism.ep=4",
                       "cluster.gpus_per_node=4", "parallelism.sequence_parallel=true",
                       "parallelism.pipeline.microbatches=2"],
    "sp_dp2_tp2_ep4_zero3_selective": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.tp=2", "parallelism.ep=4",
                                       "cluster.gpus_per_node=4", "parallelism.sequence_parallel=true",
                                       "parallelism.zero=3", "parallelism.activation_checkpointing=selective",
                                       "parallelism.pipeline.microbatches=2"],
}

# expert-parallel groups across nodes (cluster.gpus_per_node ranks are a node): node-limited routing and the
# hierarchical exchange, at 2 nodes x 2 ranks and, with pp 2, at 4 nodes x 2 ranks (each stage's EP group
# spans two nodes; pipeline stages are the outermost rank axis, so an EP group can span nodes only where a
# stage does)
NODE_LAYOUTS = {
    "nodes2_dp4_ep4_sets_hier": ["parallelism.pp=1", "parallelism.dp=4", "parallelism.ep=4", "cluster.nodes=2",
                                 "cluster.gpus_per_node=2", "parallelism.expert_exchange=hierarchical",
                                 "routing.groups.sets=2", "routing.groups.max_sets=1"],
    "pp2_nodes4_dp4_ep4_hier_selective": ["parallelism.pp=2", "parallelism.dp=4", "parallelism.ep=4",
                                          "cluster.nodes=4", "cluster.gpus_per_node=2",
                                          "parallelism.expert_exchange=hierarchical",
                                          "parallelism.activation_checkpointing=selective"],
}

# the overlapped expert exchange (each MoE layer's tokens in two halves), with pipeline stages, and with ZeRO-3 and
# full recomputation (the halves' exchanges rerun in backward)
OVERLAP_LAYOUTS = {
    "dp2_ep2_overlap": ["parallelism.pp=1", "parallelism.dp=2", "parallelism.ep=2", "cluster.gpus_per_node=2",
                        "parallelism.expert_overlap=true"],
    "pp2_dp2_ep2_overlap_zero3_full": ["parallelism.pp=2", "parallelism.dp=2", "parallelism.ep=2",
                                       "cluster.gpus_per_node=4", "parallelism.expert_overlap=true",
                                       "parallelism.zero=3", "parallelism.activation_checkpointing=full"],
}

# zero-bubble schedules: each backward as I (the input's gradient) and W (the weights'), with expert and tensor
# parallelism and ZeRO 1 / 2
ZB_LAYOUTS = {
    "zb_h1_pp2_dp4_ep4_zero2": ["parallelism.pipeline.schedule=zb_h1", "parallelism.zero=2"],
    "zbv_pp2_dp2_tp2_ep2_zero1": ["parallelism.pipeline.schedule=zbv", "parallelism.pipeline.virtual_stages=2",
                                  "parallelism.pp=2", "parallelism.dp=2", "parallelism.tp=2", "parallelism.ep=2",
                                  "parallelism.zero=1"],
}
