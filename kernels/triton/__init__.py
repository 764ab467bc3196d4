"""Triton kernels, one concept per file, each beside its PyTorch reference
(``kernels/reference.py``) with the same launcher signature."""
