"""LoRA for training on the CPU: low-rank updates of frozen projections, and trainable
rows for the added tokens of a tied embedding.

``LoRALinear`` computes ``x W^T + s (x A^T) B^T`` with ``W`` frozen, ``A`` [r, in] and
``B`` [out, r] trained, ``s = alpha / r``; ``B`` starts at zero so training starts at the
base. ``AddedRows`` replaces a tied embedding and head: the first ``base_vocab`` rows stay
frozen, the added rows train, and the head's logits come from the same rows. Merging is
``selfrag.smollm2.merge_adapter``'s ``W + s B A``: exactly what these modules compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.scale = alpha / rank
        out_f, in_f = base.weight.shape
        # Kaiming-uniform A (as nn.Linear initialises), zero B: the update starts at 0.
        bound = 1.0 / math.sqrt(in_f)
        self.lora_A = nn.Parameter(torch.empty(rank, in_f).uniform_(-bound, bound, generator=generator))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class AddedRows(nn.Module):
    """A tied embedding [base_vocab + n, H] whose first ``base_vocab`` rows are frozen."""

    def __init__(self, weight: torch.Tensor, base_vocab: int):
        super().__init__()
        self.register_buffer("frozen", weight[:base_vocab].detach().clone(), persistent=False)
        self.added = nn.Parameter(weight[base_vocab:].detach().clone())

    def weight(self) -> torch.Tensor:
        return torch.cat([self.frozen, self.added])


class AddedRowsEmbedding(nn.Module):
    def __init__(self, rows: AddedRows):
        super().__init__()
        self.rows = rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.rows.weight())


class AddedRowsHead(nn.Module):
    def __init__(self, rows: AddedRows):
        super().__init__()
        self.rows = rows

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.rows.weight())


def attach(model, rank: int, alpha: float, base_vocab: int, seed: int) -> dict[str, nn.Parameter]:
    """Freezes an HF ``LlamaForCausalLM`` (tied head), wraps its ``TARGETS`` in
    ``LoRALinear`` and its embedding/head in ``AddedRows``; returns the trainable
    parameters by their adapter name (``<module>.lora_A``, ``<module>.lora_B``,
    ``added_rows``)."""
    if not model.config.tie_word_embeddings:
        raise ValueError("attach: expected a tied embedding and head")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    params: dict[str, nn.Parameter] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha, g)
                setattr(module, child_name, lora)
                full = f"{name}.{child_name}"
                params[f"{full}.lora_A"], params[f"{full}.lora_B"] = lora.lora_A, lora.lora_B
    rows = AddedRows(model.model.embed_tokens.weight, base_vocab)
    model.model.embed_tokens = AddedRowsEmbedding(rows)
    model.lm_head = AddedRowsHead(rows)
    params["added_rows"] = rows.added
    return params
