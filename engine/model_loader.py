"""Builds a ``LlamaModel`` from a checkpoint directory or a built-in config.

Weights stream tensor by tensor from the safetensors files straight into the
(fused) device parameters, so loading never holds a second copy of the model
in host RAM.
"""
from __future__ import annotations

import os

import torch

from engine.checkpoint import load_weights
from engine.config import ModelConfig
from engine.model import LlamaModel
from kernels.ops import get_ops

DTYPES = {
    "half": torch.float16, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float": torch.float32, "float32": torch.float32, "fp32": torch.float32,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto": CUDA if present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU (CPU fp16/bf16 matmuls are ~150x slower); on GPU
    the config's dtype, fp16 where the GPU lacks bf16 or the config says fp32/none."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float16, bfloat16 or float32")
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of 'auto', {sorted(DTYPES)}")
        return DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    if cfg.dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def load_model(model: str, dtype: str | torch.dtype = "auto", device=None,
               load_format: str = "auto", seed: int = 0, progress: bool = True,
               kernel_backend: str = "auto") -> tuple[LlamaModel, ModelConfig]:
    """Returns ``(model, config)``.

    model: a checkpoint directory, or (with ``load_format="dummy"``) a
        directory holding config.json or a built-in name ("selfrag-7b",
        "selfrag-13b").
    load_format: "auto"/"safetensors" reads the weights; "dummy" makes seeded
        random weights of the config's shape.
    """
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format={load_format!r}: use 'auto', 'safetensors' or 'dummy'")
    if load_format != "dummy" and not os.path.isdir(model):
        raise ValueError(f"model={model!r} is not a directory. Real weights come from a "
                         "local checkpoint directory; built-in names need load_format='dummy'")
    cfg = ModelConfig.from_pretrained(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, cfg, dev)
    llama = LlamaModel(cfg, dt, dev, get_ops(kernel_backend, dev.type))
    if load_format == "dummy":
        llama.init_random(seed)
    else:
        load_weights(model, cfg.weight_shapes(), llama.load_hf_tensor, progress=progress)
    return llama, cfg
