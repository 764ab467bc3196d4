"""GGUF tensor data -> float arrays: the block formats we import, and GGUF's q/k order.

GGUF stores a 2-D weight as rows of ``ne0`` values (ne0 = the HF ``in_features``),
each row a run of fixed-size blocks. The formats here, one block = 32 values:

  Q8_0   fp16 d, int8 q[32]                 x = d * q                    34 bytes
  Q4_0   fp16 d, uint8 qs[16]               x = d * (nibble - 8)         18 bytes
  Q4_1   fp16 d, fp16 m, uint8 qs[16]       x = d * nibble + m           20 bytes

A Q4 block's byte j holds value j in its low nibble and value j + 16 in its high one.
F32, F16 and BF16 are plain little-endian arrays. Everything is computed in float32
(as ggml's own dequantization does) and cast once to the target dtype by the caller.

llama.cpp's converter reorders the rows of each q/k head from HF's rotate-half layout
(the first half of a head's rows pairs with the second half) into interleaved pairs
(rows 2i and 2i+1), because ggml's RoPE rotates adjacent values. ``unpermute_qk``
undoes that: GGUF row ``h*D + 2i + s`` is HF row ``h*D + s*D/2 + i``.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
# type name -> (bytes per block of BLOCK values, or None for a plain float type)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
PLAIN = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
SUPPORTED = tuple(PLAIN) + tuple(BLOCK_BYTES)


class UnsupportedTensorType(ValueError):
    pass


def _blocks(raw: np.ndarray, kind: str, n_values: int) -> np.ndarray:
    """The raw bytes as [n_blocks, bytes per block] uint8, after checking the size."""
    per = BLOCK_BYTES[kind]
    if n_values % BLOCK:
        raise ValueError(f"{kind}: {n_values} values is not a whole number of {BLOCK}-value blocks")
    flat = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    want = n_values // BLOCK * per
    if flat.size != want:
        raise ValueError(f"{kind}: {flat.size} bytes for {n_values} values, expected {want}")
    return flat.reshape(-1, per)


def _scale(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte ``at`` of every block, as float32 [n_blocks, 1]."""
    return blocks[:, at:at + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> float32 [n, 32]: the low nibbles, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def dequantize(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of ``shape`` (HF order: the last axis is GGUF's ne0) from ``raw``,
    the tensor's bytes (any uint8 / typed view of exactly its data)."""
    n = int(np.prod(shape))
    if kind in PLAIN:
        flat = np.ascontiguousarray(raw).view(np.uint8).reshape(-1).view(PLAIN[kind])
        if flat.size != n:
            raise ValueError(f"{kind}: {flat.size} values, expected {n}")
        if kind == "BF16":                      # bf16 is the top half of a float32
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        return flat.astype(np.float32).reshape(shape)
    if kind not in BLOCK_BYTES:
        raise UnsupportedTensorType(f"tensor type {kind} is not supported; supported: {', '.join(SUPPORTED)}")
    b = _blocks(raw, kind, n)
    if kind == "Q8_0":
        out = _scale(b, 0) * b[:, 2:].copy().view(np.int8).astype(np.float32)
    elif kind == "Q4_0":
        out = _scale(b, 0) * (_nibbles(b[:, 2:]) - 8.0)
    else:                                       # Q4_1
        out = _scale(b, 0) * _nibbles(b[:, 4:]) + _scale(b, 2)
    return out.reshape(shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads * D, in] in GGUF's interleaved-pair row order -> HF's rotate-half order."""
    rows, cols = w.shape
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even size")
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of ``unpermute_qk`` (what llama.cpp's converter applies)."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).swapaxes(1, 2).reshape(rows, cols)
