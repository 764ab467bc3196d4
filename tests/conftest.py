"""Test-session setup.

Without CUDA, Triton kernels run in Triton's interpreter, which has to be
switched on before triton is first imported. On a GPU machine the kernels run
compiled (the GPU check).
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
