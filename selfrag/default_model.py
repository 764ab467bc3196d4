"""The embedded models: the trained miniature Self-RAG model, and a random-weight one.

``default_model_dir()`` is the default of ``make demo``, ``selfrag ask``,
``generate``, ``serve`` and the examples: a 4.7M-parameter Llama trained from
scratch on generated Self-RAG data (``selfrag.training``), shipped in the
package as ``selfrag/data/default-v3`` (bf16, with ``training.json``: the
checksums, the recipe's commit and the training data's hash).  It reads
passages about made-up entities, judges them and answers from them.

``random_model_dir()`` returns a directory laid out exactly like the released
``selfrag/selfrag_llama2_7b`` checkpoint (``config.json``, two safetensors
shards plus ``model.safetensors.index.json``, ``tokenizer.model``,
``added_tokens.json``, ``special_tokens_map.json``, ``tokenizer_config.json``),
so every code path that loads the real model can run without downloading
13 GB.  The weights are RANDOM: the text it generates is gibberish.  Tests
whose expectations were tuned to it (margins, lengths) stay pinned to it.

The checkpoint is built once, deterministically (a seeded tokenizer training
and seeded weights), into a cache directory and reused afterwards:

* ``cache_dir`` argument, else ``$SELFRAG_CACHE``, else
  ``~/.cache/selfrag-engine``; the model lives in ``<cache>/default-v1``.
* The build happens in a temporary sibling directory that is renamed into
  place at the end, so an interrupted build never leaves a half checkpoint.

Bump ``DEFAULT_NAME`` whenever the spec or the weight recipe changes, so old
caches are not mistaken for the new model.  (The trained model, now
``default-v3``, has its own tokenizer: 3000 pieces trained on text that
includes generated names.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from engine.model.checkpoint import INDEX_NAME, random_state_dict, save_checkpoint, shard_file_name
from engine.model.config import ModelConfig
from selfrag.default_tokenizer import build_tokenizer
from selfrag.tokens import ADDED_TOKENS, CTRL_TOKENS, PAD

DEFAULT_NAME = "default-v1"        # the random-weight model's cache directory
TRAINED_NAME = "default-v3"      # v2: run D (stopped mid-schedule); v3: run E
TRAINED_DIR = Path(__file__).with_name("data") / TRAINED_NAME
CACHE_ENV = "SELFRAG_CACHE"
NUM_SHARDS = 2
SEED = 1234
BASE_VOCAB = 1000          # SentencePiece pieces; the 16 Self-RAG tokens come after them

# The Llama shape of the default model.  ``vocab_size`` is not here: it is
# read back from the built tokenizer (base pieces + added tokens).
DEFAULT_SPEC: dict = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
}

WEIGHT_STD = 0.05          # matrices ~ N(0, std^2): wide enough argmax margins for fp32 parity
REFLECTION_GAIN = 1.7      # lm_head rows of the reflection tokens are scaled up by this

TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json",
                   "tokenizer_config.json")
CHECKPOINT_FILES = ("config.json", INDEX_NAME, *(shard_file_name(i, NUM_SHARDS)
                                                for i in range(1, NUM_SHARDS + 1)))
LAYOUT_FILES = tuple(sorted(CHECKPOINT_FILES + TOKENIZER_FILES))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where cached models live: the argument, ``$SELFRAG_CACHE`` or ``~/.cache/selfrag-engine``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "selfrag-engine"


def _tokenizer_vocab(tok_dir: Path) -> tuple[int, dict[str, int]]:
    """(total vocab size, added token -> id) of a built tokenizer directory."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    added = json.loads((tok_dir / "added_tokens.json").read_text(encoding="utf-8"))
    base = sp.get_piece_size()
    ids = sorted(added.values())
    if ids != list(range(base, base + len(ids))):
        raise RuntimeError(f"added tokens of {tok_dir} do not follow the base vocabulary: {added}")
    return base + len(ids), added


def default_config(vocab_size: int, pad_token_id: int) -> ModelConfig:
    return ModelConfig.from_dict({**DEFAULT_SPEC, "vocab_size": vocab_size,
                                  "pad_token_id": pad_token_id}, source="DEFAULT_SPEC")


def _default_weights(cfg: ModelConfig, added: dict[str, int]) -> dict[str, torch.Tensor]:
    """Seeded random weights, nudged so greedy output shows reflection tokens now and then."""
    sd = random_state_dict(cfg, seed=SEED, std=WEIGHT_STD, dtype=torch.float32)
    head = sd["lm_head.weight"]
    for tok in CTRL_TOKENS:
        head[added[tok]] *= REFLECTION_GAIN
    # Never predict <pad>.
    head[added[PAD]] *= 0.0
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


def build_default_model(out_dir: str | os.PathLike) -> ModelConfig:
    """Write the default checkpoint into ``out_dir`` (not atomic; see ``default_model_dir``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, vocab_size=BASE_VOCAB)
    vocab, added = _tokenizer_vocab(out)
    missing = [t for t in ADDED_TOKENS if t not in added]
    if missing:
        raise RuntimeError(f"the built tokenizer lacks the Self-RAG tokens {missing}")
    cfg = default_config(vocab, added[PAD])
    save_checkpoint(out, cfg, _default_weights(cfg, added), num_shards=NUM_SHARDS, spelling=4)
    return cfg


def is_complete(model_dir: str | os.PathLike) -> bool:
    d = Path(model_dir)
    return d.is_dir() and all((d / f).is_file() for f in LAYOUT_FILES)


def default_model_dir() -> str:
    """Path of the embedded default model: the trained miniature Self-RAG checkpoint."""
    if not is_complete(TRAINED_DIR):
        raise FileNotFoundError(f"the embedded model {TRAINED_DIR} is incomplete (missing "
                                f"{[f for f in LAYOUT_FILES if not (TRAINED_DIR / f).is_file()]}); "
                                "reinstall, or rebuild it with `make train-miniature`")
    return str(TRAINED_DIR)


def is_random_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the random-weight model (its cache directory name)."""
    return Path(path).name == DEFAULT_NAME


def random_model_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of the random-weight checkpoint, building it first if it is not cached yet."""
    root = cache_root(cache_dir)
    final = root / DEFAULT_NAME
    if is_complete(final):
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    print(f"building the embedded default model (random weights) in {final}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}.tmp-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)            # mkdtemp makes it 0700; the cache may be shared
    try:
        build_default_model(tmp)
        if final.exists():
            if is_complete(final):           # another process finished first: keep theirs
                return str(final)
            # A stale, incomplete directory (not one of ours, since ours appear atomically).
            stale = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}.stale-", dir=root))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final):       # lost a race to a concurrent build
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


@contextlib.contextmanager
def few_threads(n: int = 1):
    """Run a block with at most ``n`` torch CPU threads (restored afterwards).

    The default model is so small that its matmuls take microseconds; extra
    OpenMP threads only add synchronisation, which on a busy machine (threads
    spin-waiting for a core) can make each step ~50x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def describe(cfg: ModelConfig) -> str:
    return (f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
            f"({cfg.num_key_value_heads} KV), MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
            f"{cfg.num_params() / 1e6:.2f}M params")


if __name__ == "__main__":   # python -m selfrag.default_model [--random [CACHE_DIR]]
    if sys.argv[1:2] == ["--random"]:
        path = random_model_dir(sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        path = default_model_dir()
    print(path)
    print(describe(ModelConfig.from_pretrained(path)))
