"""Strict, streaming safetensors checkpoint I/O (HF Llama layout).

Only safetensors is read; pickle checkpoints (``pytorch_model*.bin``, ``*.pt``,
``*.pth``) are refused and never opened, because unpickling runs arbitrary code.

Reading (:func:`load_weights`) validates every header up front (names, shapes,
dtypes, duplicates, index consistency, missing tensors) before a single tensor
is materialised, then streams tensor by tensor into a caller-supplied
``consume(name, tensor)`` callback.  Writing (:func:`save_checkpoint`) streams
each tensor's bytes straight from its storage to disk, so no second copy of a
shard is ever built in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from engine.errors import CheckpointError, read_json
from engine.model.config import ModelConfig

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "find_weight_files",
    "load_weights",
    "save_checkpoint",
    "random_state_dict",
    "shard_file_name",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# re-open a shard after this many bytes were read through one mapping (bounds mmap RSS, see load_weights)
_REMAP_BYTES = 64 << 20

# safetensors dtype codes <-> torch dtypes (floating point only; weights must be floats)
_ST_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _ST_FLOAT_DTYPES.items()}


def shard_file_name(i: int, n: int) -> str:
    """HF-style shard name, 1-based: ``model-00001-of-00003.safetensors``."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


# --------------------------------------------------------------------------- discovery
@dataclass
class _Layout:
    files: list[str]  # absolute paths, in load order
    weight_map: dict[str, str] | None  # tensor name -> absolute path (from the index), or None
    index_path: str | None


def _pickle_refusal(model_dir: str, pickles: list[str]) -> CheckpointError:
    names = ", ".join(sorted(pickles)[:5]) + (" ..." if len(pickles) > 5 else "")
    return CheckpointError(
        f"only pickle checkpoint files were found ({names}); pickle checkpoints are refused because "
        "loading them can execute arbitrary code, and they were NOT opened. Convert them to safetensors "
        "in a trusted environment first, e.g. `python -c \"import torch; from safetensors.torch import "
        "save_file; sd = torch.load('pytorch_model.bin', weights_only=True); "
        "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors', metadata={'format': 'pt'})\"` "
        "(one call per shard, then write model.safetensors.index.json), or with the `convert.py` script "
        "from the huggingface/safetensors repository",
        file=model_dir,
    )


def _resolve(model_dir: str | os.PathLike) -> _Layout:
    model_dir = os.path.abspath(os.fspath(model_dir))
    if not os.path.exists(model_dir):
        raise CheckpointError("checkpoint directory does not exist", file=model_dir)
    if not os.path.isdir(model_dir):
        raise CheckpointError("checkpoint path is not a directory", file=model_dir)

    index_path = os.path.join(model_dir, INDEX_NAME)
    if os.path.isfile(index_path):
        index = read_json(index_path, "index")
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError("index has no (or an empty) 'weight_map' object", file=index_path)
        weight_map: dict[str, str] = {}
        shard_names: list[str] = []
        for tensor, shard in wm.items():
            if not isinstance(shard, str) or not shard or os.path.basename(shard) != shard or shard in (".", ".."):
                raise CheckpointError(
                    f"index maps the tensor to an invalid shard file name {shard!r} "
                    "(must be a plain file name inside the checkpoint directory)",
                    file=index_path,
                    tensor=tensor,
                )
            path = os.path.join(model_dir, shard)
            weight_map[tensor] = path
            if shard not in shard_names:
                shard_names.append(shard)
        shard_names.sort()
        files = []
        for shard in shard_names:
            path = os.path.join(model_dir, shard)
            if not os.path.isfile(path):
                missing = [t for t, p in weight_map.items() if p == path]
                raise CheckpointError(
                    f"shard {shard} listed in the index is missing ({len(missing)} tensors, e.g. {missing[0]!r}) "
                    f"in {model_dir}",
                    file=index_path,
                )
            files.append(path)
        return _Layout(files, weight_map, index_path)

    single = os.path.join(model_dir, SINGLE_NAME)
    if os.path.isfile(single):
        return _Layout([single], None, None)

    entries = sorted(os.listdir(model_dir))
    st = [e for e in entries if e.endswith(".safetensors") and os.path.isfile(os.path.join(model_dir, e))]
    if len(st) == 1:
        return _Layout([os.path.join(model_dir, st[0])], None, None)
    if len(st) > 1:
        raise CheckpointError(
            f"{len(st)} safetensors files ({', '.join(st[:4])}{' ...' if len(st) > 4 else ''}) but no "
            f"{INDEX_NAME} saying which tensor lives where",
            file=model_dir,
        )
    pickles = [e for e in entries if e.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise _pickle_refusal(model_dir, pickles)
    raise CheckpointError(
        f"no weights found: expected {INDEX_NAME}, {SINGLE_NAME} or a single *.safetensors file", file=model_dir
    )


def find_weight_files(model_dir: str | os.PathLike) -> list[str]:
    """Absolute paths of the safetensors files to read, in order.

    ``model.safetensors.index.json`` (its shards, sorted, each must exist) > ``model.safetensors`` >
    the only ``*.safetensors`` in the directory.  Pickle-only directories raise CheckpointError.
    """
    return _resolve(model_dir).files


# --------------------------------------------------------------------------- reading
def _diagnose_truncation(path: str) -> tuple[str | None, str]:
    """Best effort: parse the header ourselves to name the first tensor whose bytes lie past EOF."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return None, f"file is only {size} bytes"
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(size - 8, 100 << 20):
                return None, f"header length {hlen} exceeds the file size {size}"
            header = json.loads(f.read(hlen))
        data = size - 8 - hlen
        entries = [(k, v) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        entries.sort(key=lambda kv: kv[1].get("data_offsets", [0, 0])[1])
        for name, info in entries:
            end = info.get("data_offsets", [0, 0])[1]
            if end > data:
                return name, f"its data ends at byte {end} of the data section but only {data} bytes are present"
    except Exception:  # the diagnosis must never mask the real error
        return None, ""
    return None, ""


def _data_offsets(path: str) -> dict[str, int]:
    """Tensor name -> start offset in the data section, from the raw header ({} if unreadable)."""
    try:
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(hlen))
        return {k: int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}
    except Exception:
        return {}


def _open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError (truncated/corrupt header), OSError, ...
        tensor, detail = _diagnose_truncation(path)
        raise CheckpointError(
            f"cannot open safetensors file (truncated or corrupt?): {e}" + (f"; {detail}" if detail else ""),
            file=path, tensor=tensor) from None


def _fmt_shape(s: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(x)) for x in s) + (",)" if len(tuple(s)) == 1 else ")")


def load_weights(
    model_dir: str | os.PathLike,
    expected: Mapping[str, tuple[int, ...]],
    consume: Callable[[str, torch.Tensor], None],
    progress: bool = True,
    ignore_unexpected: Iterable[str] = ("rotary_emb.inv_freq",),
) -> None:
    """Strictly stream every expected tensor of a safetensors checkpoint into ``consume``.

    ``expected`` maps HF tensor names to shapes (``ModelConfig.weight_shapes()``).  Every expected
    tensor is passed to ``consume(name, tensor)`` exactly once, as a CPU tensor in the checkpoint's
    own dtype (cast/move it inside ``consume``); the loader keeps no reference afterwards.

    When ``expected`` has ``model.embed_tokens.weight`` but no ``lm_head.weight`` (tied embeddings),
    an ``lm_head.weight`` in the checkpoint is ignored, as transformers does.  Names ending with a
    suffix in ``ignore_unexpected`` are skipped.  Anything else that does not match raises
    :class:`CheckpointError` naming the file and the tensor -- before ``consume`` is ever called for
    header-level problems (unknown/missing/duplicate names, shapes, dtypes, index mismatch); a file
    whose data turns out unreadable while streaming raises as soon as that tensor is read.
    """
    layout = _resolve(model_dir)
    ignore = tuple(ignore_unexpected)
    tied_lm_head = "lm_head.weight" not in expected and "model.embed_tokens.weight" in expected
    expected = {k: tuple(int(x) for x in v) for k, v in expected.items()}

    def skipped(name: str) -> bool:
        return (ignore and name.endswith(ignore)) or (tied_lm_head and name == "lm_head.weight")

    # ---- pass 1: headers only (cheap), validate everything we can before touching data
    plan: list[tuple[str, list[str]]] = []  # (file, tensor names to load from it)
    seen: dict[str, str] = {}
    total_bytes = 0
    for path in layout.files:
        with _open(path) as f:
            try:
                names = list(f.keys())
            except Exception as e:
                raise CheckpointError(f"cannot read safetensors header: {e}", file=path) from None
            to_load = []
            for name in names:
                if skipped(name):
                    continue
                if name in seen:
                    raise CheckpointError(f"duplicate tensor: also present in {os.path.basename(seen[name])}",
                                          file=path, tensor=name)
                if name not in expected:
                    raise CheckpointError(
                        "unexpected tensor: not part of this model's architecture (wrong config, or a "
                        "checkpoint of another model?)", file=path, tensor=name)
                if layout.weight_map is not None:
                    want = layout.weight_map.get(name)
                    if want is None:
                        raise CheckpointError(f"tensor is not listed in the index {layout.index_path}",
                                              file=path, tensor=name)
                    if want != path:
                        raise CheckpointError(
                            f"index {os.path.basename(layout.index_path)} says this tensor lives in "
                            f"{os.path.basename(want)}", file=path, tensor=name)
                try:
                    sl = f.get_slice(name)
                    shape = tuple(int(x) for x in sl.get_shape())
                    dtype = sl.get_dtype()
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor header: {e}", file=path, tensor=name) from None
                if shape != expected[name]:
                    raise CheckpointError(
                        f"shape mismatch: expected {_fmt_shape(expected[name])}, found {_fmt_shape(shape)}",
                        file=path, tensor=name)
                if dtype not in _ST_FLOAT_DTYPES:
                    raise CheckpointError(
                        f"unsupported dtype {dtype}: weights must be floating point "
                        f"({', '.join(_ST_FLOAT_DTYPES)}); quantized checkpoints are not supported",
                        file=path, tensor=name)
                seen[name] = path
                to_load.append(name)
                total_bytes += math.prod(shape) * _ST_FLOAT_DTYPES[dtype].itemsize
            # stream in on-disk order (sequential reads) rather than the header's key order
            offsets = _data_offsets(path)
            to_load.sort(key=lambda n: offsets.get(n, 0))
            plan.append((path, to_load))

    missing = [n for n in expected if n not in seen]
    if missing:
        name = missing[0]
        if layout.weight_map is not None and name in layout.weight_map:
            where = layout.weight_map[name]
            note = f"the index {os.path.basename(layout.index_path)} lists it but the shard does not contain it"
        elif layout.weight_map is not None:
            where = layout.index_path
            note = "the index does not list it"
        else:
            where = layout.files[0]
            note = "the file does not contain it"
        more = f"; {len(missing) - 1} more missing, e.g. {missing[1:4]}" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor ({note}){more}", file=where, tensor=name)

    # ---- pass 2: stream the data, one tensor alive at a time
    from tqdm.auto import tqdm

    bar = tqdm(total=total_bytes, desc="Loading weights", unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress, dynamic_ncols=True)
    done = 0
    try:
        for path, names in plan:
            bar.set_postfix_str(f"{os.path.basename(path)} {done}/{len(seen)} tensors", refresh=False)
            f = _open(path)
            mapped = 0  # bytes faulted into this handle's mapping since it was opened
            try:
                for name in names:
                    if mapped >= _REMAP_BYTES:
                        # safetensors hands out zero-copy views of a private mmap of the shard; pages
                        # touched so far count towards RSS until the mapping goes away.  Re-opening
                        # (once the consumer dropped its references) bounds that to ~_REMAP_BYTES.
                        f.__exit__(None, None, None)
                        f = _open(path)
                        mapped = 0
                    try:
                        t = f.get_tensor(name)
                    except Exception as e:
                        raise CheckpointError(f"cannot read tensor data (truncated or corrupt file?): {e}",
                                              file=path, tensor=name) from None
                    nbytes = t.numel() * t.element_size()
                    consume(name, t)
                    del t
                    mapped += nbytes
                    done += 1
                    bar.update(nbytes)
                    bar.set_postfix_str(f"{os.path.basename(path)} {done}/{len(seen)} tensors", refresh=False)
            finally:
                f.__exit__(None, None, None)
    finally:
        bar.close()


# --------------------------------------------------------------------------- writing
def _tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _balanced_shards(items: list[tuple[str, int]], n: int) -> list[list[str]]:
    """Split ``items`` (name, nbytes), keeping their order, into ``n`` contiguous non-empty groups of
    roughly equal bytes (a tensor goes to the shard its byte midpoint falls in)."""
    total = sum(b for _, b in items) or 1
    groups: list[list[str]] = [[]]
    acc = 0
    for i, (name, nbytes) in enumerate(items):
        shards_left = n - len(groups)
        items_left = len(items) - i
        if groups[-1] and shards_left > 0 and (
            acc + nbytes / 2 > len(groups) * total / n or items_left <= shards_left
        ):
            groups.append([])
        groups[-1].append(name)
        acc += nbytes
    return groups


def _write_safetensors(path: str, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> int:
    """Write a safetensors file streaming each tensor's bytes; returns the data size in bytes.

    Layout: u64-LE header length, JSON header (space-padded to 8 bytes), then the raw little-endian
    tensor bytes in order.  Written to ``path + '.tmp'`` then renamed, so a crash leaves no half file.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _TORCH_TO_ST:
            raise CheckpointError(f"cannot save dtype {t.dtype}: only float tensors", file=path, tensor=name)
        nb = _tensor_nbytes(t)
        header[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nb]}
        offset += nb
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for _, t in tensors:
            t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()  # no copy when already contiguous
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)
    return offset


def save_checkpoint(
    out_dir: str | os.PathLike,
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    num_shards: int = 1,
    spelling: int = 4,
) -> list[str]:
    """Write ``config.json`` + safetensors weights in the HF layout; returns the weight file paths.

    ``state_dict`` must hold exactly ``config.weight_shapes()`` (a tied config's ``lm_head.weight``,
    if given, is dropped, as transformers does).  ``num_shards > 1`` writes
    ``model-0000i-of-0000N.safetensors`` (contiguous, balanced by bytes) and
    ``model.safetensors.index.json``.  Tensors are streamed from their storage; no copy of a
    shard is assembled in memory.
    """
    out_dir = os.fspath(out_dir)
    shapes = config.weight_shapes()
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards > len(shapes):
        raise ValueError(f"num_shards={num_shards} exceeds the number of tensors ({len(shapes)})")
    extra = [k for k in state_dict if k not in shapes and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if extra:
        raise CheckpointError(f"state_dict has {len(extra)} tensor(s) not in the config's layout",
                              file="<state_dict>", tensor=extra[0])
    for name, shape in shapes.items():
        if name not in state_dict:
            raise CheckpointError("state_dict lacks a tensor the config requires", file="<state_dict>", tensor=name)
        if tuple(state_dict[name].shape) != shape:
            raise CheckpointError(
                f"shape mismatch: config wants {_fmt_shape(shape)}, state_dict has "
                f"{_fmt_shape(state_dict[name].shape)}", file="<state_dict>", tensor=name)

    os.makedirs(out_dir, exist_ok=True)
    # remove weights of an earlier save in this directory so the layout is unambiguous
    for e in os.listdir(out_dir):
        if e == INDEX_NAME or e.endswith(".safetensors"):
            os.remove(os.path.join(out_dir, e))
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict(spelling), f, indent=2, sort_keys=True)
        f.write("\n")

    names = list(shapes)
    meta = {"format": "pt"}
    if num_shards == 1:
        path = os.path.join(out_dir, SINGLE_NAME)
        _write_safetensors(path, [(n, state_dict[n]) for n in names], meta)
        return [path]

    groups = _balanced_shards([(n, _tensor_nbytes(state_dict[n])) for n in names], num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    paths = []
    for i, group in enumerate(groups, 1):
        fname = shard_file_name(i, len(groups))
        path = os.path.join(out_dir, fname)
        total += _write_safetensors(path, [(n, state_dict[n]) for n in group], meta)
        weight_map.update({n: fname for n in group})
        paths.append(path)
    with open(os.path.join(out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    return paths


# --------------------------------------------------------------------------- test weights
def random_state_dict(
    config: ModelConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.02,
    norm_noise: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Deterministic random HF-named weights for ``config``.

    Matrices ~ N(0, std^2); RMSNorm weights ~ 1 + N(0, norm_noise^2) (not all-ones, so a model that
    forgets to apply them is caught).  Values are drawn in float32 from one seeded
    ``torch.Generator`` tensor by tensor, then cast, so they do not depend on ``dtype`` beyond rounding.
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in config.weight_shapes().items():
        t = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            t.mul_(norm_noise).add_(1.0)
        else:
            t.mul_(std)
        out[name] = t if dtype == torch.float32 else t.to(dtype)
        del t
    return out
