"""Fine-tune SmolLM2-135M-Instruct into a Self-RAG model with LoRA, on the CPU
(``make train-selfrag-smollm2``).

    python -m selfrag.training.train_smollm2 [--out DIR] [--steps N] [--smoke]

What it does, deterministically from the recipe's seed:
1. builds (once, in the cache) the pinned base with Self-RAG's 16 tokens
   (``selfrag.smollm2_vocab``);
2. draws examples (``selfrag.training.smollm2_data``, split ``train``) and encodes them in
   Self-RAG's prompt format with the model's end-of-sequence token; the loss covers only
   response tokens outside passages (``selfrag.training.data.encode_example``);
3. trains LoRA on every attention and MLP projection plus the 16 added rows of the tied
   embedding (``selfrag.training.lora``), the base frozen, with AdamW, warm-up and cosine
   decay; the head runs only at the positions in the loss (a third of them: passages and
   prompts are masked), which saves a fifth of each step;
4. writes the adapter (``adapter.safetensors``, fp16: 10 MB) and ``training.json``: the
   recipe and its commit, the base GGUF's sha256, the training data's hash, the loss
   curve and timings. ``selfrag.smollm2`` merges it into an ordinary checkpoint.

``--smoke`` runs three tiny steps and writes to a temporary directory unless ``--out``
is given: the test of the trainer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

from selfrag.smollm2 import ADAPTER_DIR  # the shipped adapter: one place names it

RECIPE = {
    "seed": 0,
    "rank": 16, "alpha": 32,
    "batch_size": 8, "max_len": 384,
    # Run 1 (issue 29): 300 steps, 24 min. Run 2 (issue 30): 760 steps, about 60 min.
    "steps": 760, "warmup": 30,
    "lr": 2e-3, "rows_lr": 5e-3, "min_lr_ratio": 0.1, "weight_decay": 0.0,
    "betas": [0.9, 0.99], "grad_clip": 1.0,
    "threads": 2,
    "weights": None,            # example kinds: smollm2_data.KIND_WEIGHTS
}
SMOKE = {"steps": 3, "batch_size": 2, "max_len": 96, "warmup": 1}


class BPETokenizer:
    """``tokenizers.Tokenizer`` as ``encode_example`` uses a tokenizer (no BOS: SmolLM2 adds none)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._tok.token_to_id(token)


def lr_at(step: int, recipe: dict) -> float:
    """Fraction of the peak rate: linear warm-up, then cosine to ``min_lr_ratio``."""
    import math
    if step < recipe["warmup"]:
        return (step + 1) / recipe["warmup"]
    frac = (step - recipe["warmup"]) / max(1, recipe["steps"] - recipe["warmup"])
    lo = recipe["min_lr_ratio"]
    return lo + 0.5 * (1 - lo) * (1 + math.cos(math.pi * min(1.0, frac)))


def example_stream(recipe: dict, eos: str):
    """The training examples, in order, each output ending with the end-of-sequence token."""
    from selfrag.training.smollm2_data import make_examples
    block = 0
    while True:
        for ex in make_examples(1024, seed=recipe["seed"] * 1000 + block, weights=recipe["weights"]):
            yield {**ex, "output": ex["output"] + eos}
        block += 1


def train(out_dir: str | os.PathLike, recipe: dict | None = None, progress: bool = True,
          cache_dir: str | None = None, log_every: int = 10) -> dict:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    from selfrag.smollm2_vocab import BASE_GGUF_SHA256, BASE_VOCAB, selfrag_vocab_dir
    from selfrag.training import lora
    from selfrag.training.data import IGNORE
    from selfrag.training.train import _git_commit, batches

    recipe = dict(RECIPE if recipe is None else recipe)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe["seed"])
    torch.set_num_threads(recipe["threads"])
    t_start = time.perf_counter()

    base_dir = selfrag_vocab_dir(cache_dir)
    with open(os.path.join(base_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        eos = json.load(f)["eos_token"]
    with open(os.path.join(base_dir, "config.json")) as f:
        pad_id = json.load(f)["pad_token_id"]
    tokenizer = BPETokenizer(os.path.join(base_dir, "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    params = lora.attach(model, recipe["rank"], recipe["alpha"], BASE_VOCAB, recipe["seed"])
    model.train()
    n_trainable = sum(p.numel() for p in params.values())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in params.items() if n != "added_rows"], "lr": recipe["lr"]},
         {"params": [params["added_rows"]], "lr": recipe["rows_lr"]}],
        betas=tuple(recipe["betas"]), weight_decay=recipe["weight_decay"])
    peaks = [g["lr"] for g in opt.param_groups]

    hasher = hashlib.sha256()
    data = batches(tokenizer, example_stream(recipe, eos), recipe["batch_size"], recipe["max_len"], pad_id,
                   random.Random(recipe["seed"]), hasher)
    curve, tokens, loss_tokens, t0, ema = [], 0, 0, time.perf_counter(), None
    bar = tqdm(range(recipe["steps"]), desc="train", unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        x, y, m = next(data)
        for g, peak in zip(opt.param_groups, peaks):
            g["lr"] = peak * lr_at(step, recipe)
        hidden = model.model(input_ids=x, attention_mask=m).last_hidden_state       # [B, T, H]
        target = y[:, 1:]
        keep = target != IGNORE                                                       # [B, T-1]
        logits = model.lm_head(hidden[:, :-1][keep])                                  # [N, V]
        loss = F.cross_entropy(logits.float(), target[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), recipe["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(m.sum())
        loss_tokens += int(keep.sum())
        lv = float(loss.detach())
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        if step % log_every == 0 or step == recipe["steps"] - 1:
            curve.append({"step": step, "loss": round(lv, 4), "loss_ema": round(ema, 4), "tokens": tokens,
                          "seconds": round(time.perf_counter() - t0, 1)})
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    train_s = time.perf_counter() - t0

    tensors = {n: p.detach().to(torch.float16).contiguous() for n, p in params.items()}
    save_file(tensors, str(out / "adapter.safetensors"),
              metadata={"rank": str(recipe["rank"]), "alpha": str(recipe["alpha"]), "base_vocab": str(BASE_VOCAB)})
    meta = {
        "recipe": recipe, "recipe_commit": _git_commit(), "base_gguf_sha256": BASE_GGUF_SHA256,
        "base_vocab": BASE_VOCAB, "trainable_params": n_trainable, "updates": recipe["steps"],
        "train_data_sha256": hasher.hexdigest(), "tokens": tokens, "loss_tokens": loss_tokens,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
        "tokens_per_second": round(tokens / train_s, 1), "first_loss": curve[0]["loss"],
        "final_loss_ema": round(ema, 4), "curve": curve, "torch": torch.__version__,
        "adapter_sha256": hashlib.sha256((out / "adapter.safetensors").read_bytes()).hexdigest(),
    }
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m selfrag.training.train_smollm2", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"adapter directory to write (default: the shipped {ADAPTER_DIR}; with --smoke a "
                        "temporary directory)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {RECIPE['steps']})")
    p.add_argument("--smoke", action="store_true", help="three tiny steps (seconds): the trainer's test")
    args = p.parse_args(argv)
    recipe = dict(RECIPE)
    if args.smoke:
        recipe.update(SMOKE)
    if args.steps is not None:
        if args.steps < 1:
            p.error("--steps must be >= 1")
        recipe["steps"] = args.steps
    if args.out is None:
        import tempfile
        out = tempfile.mkdtemp(prefix="selfrag-smollm2-smoke-") if args.smoke else str(ADAPTER_DIR)
    else:
        out = args.out
    meta = train(out, recipe)
    print(f"wrote {out}: {meta['trainable_params'] / 1e6:.2f}M trainable params, {meta['tokens']} tokens in "
          f"{meta['train_seconds']:.0f} s ({meta['tokens_per_second']:.0f} tokens/s), loss "
          f"{meta['first_loss']:.3f} -> {meta['final_loss_ema']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
