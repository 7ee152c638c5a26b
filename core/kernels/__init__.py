"""Kernels: numba kernels with their numpy twins (`coact`, `ffn`) and torch/Triton kernels for the GPU
(`coact_gpu`, `select_gpu`, `reduce_gpu`, `sparse_gpu`)."""
