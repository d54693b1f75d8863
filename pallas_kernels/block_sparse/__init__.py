"""The parts of `pallas_kernels.block_sparse_attention`: plan, tile helpers, one module per backend, targets,
tools."""
