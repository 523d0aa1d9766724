"""Reference implementations in plain torch: the ground truth that fused kernels are tested against."""
