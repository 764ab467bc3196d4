"""Llama forward pass over a packed batch, with a paged KV cache.

Weights are plain tensors (no nn.Module): q/k/v and gate/up are fused into
single matrices when the checkpoint is loaded, so a layer runs 4 matmuls.
Every other hot op goes through ``ops`` (see kernels/ops.py).

Shapes: T packed tokens, H hidden, Hq/Hkv query/KV heads, D head dim,
I intermediate, V vocab.
"""
from __future__ import annotations

import re

import torch

from engine.model.config import ModelConfig
from engine.model.quantized_weights import QuantizedWeight, check_quantization
from kernels.metadata import AttentionMetadata
from kernels.ops import Ops, gemv_max_rows, rope_cos_sin

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)$")


def _gemv_weights(w) -> tuple:
    """The GEMV ops' weight arguments: (qweight, scales) of an 8-bit matrix, (w,) of a plain one."""
    return (w.qweight, w.scales) if isinstance(w, QuantizedWeight) else (w,)


class LlamaLayer:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 quantization: str | None = None):
        H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        e = dict(dtype=dtype, device=device)

        def matrix(N: int, K: int):          # 8-bit matrices: engine/model/quantized_weights.py
            return torch.empty(N, K, **e) if quantization is None else QuantizedWeight.empty(N, K, device,
                                                                                            quantization)
        self.input_norm = torch.empty(H, **e)                       # [H]
        self.qkv = matrix((Hq + 2 * Hkv) * D, H)                    # [(Hq+2Hkv)D, H]
        self.o = matrix(H, Hq * D)                                  # [H, Hq D]
        self.post_norm = torch.empty(H, **e)                        # [H]
        self.gate_up = matrix(2 * I, H)                             # [2I, H]
        self.down = matrix(H, I)                                    # [H, I]


class LlamaModel:
    """Weights plus ``forward``. Build with ``LlamaModel(cfg, dtype, device)``,
    then fill through ``load_hf_tensor`` (checkpoint) or ``init_random``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, ops: Ops,
                 quantization: str | None = None):
        self.cfg, self.dtype, self.device, self.ops = cfg, dtype, device, ops
        self.quantization = check_quantization(quantization)
        e = dict(dtype=dtype, device=device)
        self.embed = torch.empty(cfg.vocab_size, cfg.hidden_size, **e)          # [V, H]
        self.layers = [LlamaLayer(cfg, dtype, device, quantization) for _ in range(cfg.num_hidden_layers)]
        self.final_norm = torch.empty(cfg.hidden_size, **e)                     # [H]
        self.lm_head = (self.embed if cfg.tie_word_embeddings
                        else torch.empty(cfg.vocab_size, cfg.hidden_size, **e))  # [V, H]
        D = cfg.head_dim
        self.q_size = cfg.num_attention_heads * D
        self.kv_size = cfg.num_key_value_heads * D
        self.scale = D ** -0.5
        # RoPE tables [max_positions, D] in the model dtype; computed once.
        self.cos, self.sin = rope_cos_sin(cfg.max_position_embeddings, D, cfg.rope_theta,
                                          cfg.rope_scaling_factor, dtype=dtype, device=device)
        self.select_gemv()

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """The projections and the head: name -> (N, K) of the [N, K] weight."""
        cfg = self.cfg
        return {"qkv": (self.q_size + 2 * self.kv_size, cfg.hidden_size), "o": (cfg.hidden_size, self.q_size),
                "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
                "down": (cfg.hidden_size, cfg.intermediate_size), "lm_head": (cfg.vocab_size, cfg.hidden_size)}

    def select_gemv(self, table: str | None = None) -> None:
        """Per matrix, up to how many rows a step runs it through the decode GEMV (op
        ``gemv``) instead of cuBLAS / w8a16: the measured table's entry for this GPU and
        shape (``kernels.ops.gemv_max_rows``; none: 0). The table's device is the GPU's
        name, or 'cpu', which the shipped table never lists (tests give their own table).
        ``gemv_note`` says what was picked, for the start-up line."""
        device = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type)
        dense = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")
        kind = self.quantization or dense
        shapes = self.matrix_shapes()
        # the head stays in the model dtype when the projections are 8-bit
        self.gemv_rows = {name: gemv_max_rows(device, dense if name == "lm_head" else kind, N, K, table)
                          for name, (N, K) in shapes.items()}
        self.gemv_rows["silu_mul+down"] = gemv_max_rows(device, kind, *shapes["down"], table,   # with its
                                                        fusion="silu_mul")                    # activation
        ours = [f"{n} (<= {r} rows)" for n, r in self.gemv_rows.items() if r]
        self.gemv_note = (f"GEMV: ours for {', '.join(ours)}, cuBLAS/w8a16 elsewhere" if ours else
                          f"GEMV: cuBLAS/w8a16 everywhere (kernels/gemv_table.json has no {kind} entry for "
                          f"{device!r})")

    # ---- weights -------------------------------------------------------------
    def _target(self, name: str) -> torch.Tensor:
        """The slice of our (possibly fused) parameter that HF tensor ``name`` fills."""
        if name == "model.embed_tokens.weight":
            return self.embed
        if name == "model.norm.weight":
            return self.final_norm
        if name == "lm_head.weight":
            return self.lm_head
        m = _LAYER_RE.match(name)
        if m is None:
            raise KeyError(name)
        layer, rest = self.layers[int(m.group(1))], m.group(2)
        q, kv, inter = self.q_size, self.kv_size, self.cfg.intermediate_size

        def rows(w, a, b=None):
            return w.rows(a, b) if isinstance(w, QuantizedWeight) else w[a:b]
        return {
            "input_layernorm.weight": lambda: layer.input_norm,
            "post_attention_layernorm.weight": lambda: layer.post_norm,
            "self_attn.q_proj.weight": lambda: rows(layer.qkv, 0, q),
            "self_attn.k_proj.weight": lambda: rows(layer.qkv, q, q + kv),
            "self_attn.v_proj.weight": lambda: rows(layer.qkv, q + kv),
            "self_attn.o_proj.weight": lambda: layer.o,
            "mlp.gate_proj.weight": lambda: rows(layer.gate_up, 0, inter),
            "mlp.up_proj.weight": lambda: rows(layer.gate_up, inter),
            "mlp.down_proj.weight": lambda: layer.down,
        }[rest]()

    def load_hf_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Copies one checkpoint tensor (any float dtype, on CPU) into place; a matrix of
        an 8-bit model is quantized from the checkpoint's own values, on the device, one
        tensor at a time (only that tensor is ever there in full precision)."""
        target = self._target(name)
        assert target.shape == tensor.shape, (name, target.shape, tensor.shape)
        if isinstance(target, QuantizedWeight):
            self._quantize(tensor.to(self.device), target)
        else:
            target.copy_(tensor)

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights for ``load_format="dummy"``: N(0, std) matrices, norms 1."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        mats = [self.embed] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            mats += [layer.qkv, layer.o, layer.gate_up, layer.down]
            layer.input_norm.fill_(1.0)
            layer.post_norm.fill_(1.0)
        self.final_norm.fill_(1.0)
        for m in mats:
            if isinstance(m, QuantizedWeight):   # the fp model's draw (same seed, same order), quantized
                w = torch.empty(m.shape, dtype=self.dtype, device=self.device).normal_(0.0, std, generator=g)
                self._quantize(w, m)
                del w
            else:
                m.normal_(0.0, std, generator=g)

    def num_bytes(self) -> int:
        tensors = [self.embed, self.final_norm] + \
            ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            tensors += list(vars(layer).values())
        return sum(t.num_bytes() if isinstance(t, QuantizedWeight) else t.numel() * t.element_size()
                   for t in tensors)

    # ---- forward -------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, H] (normed).

        Each layer writes the new tokens' K/V into its cache before attention
        reads the cache, so sequences in one batch may share freshly written
        prefix blocks.
        """
        ops, cfg = self.ops, self.cfg
        eps, D = cfg.rms_norm_eps, cfg.head_dim
        attention = ops.prefill_attention if meta.is_prefill else ops.decode_attention
        h = self.embed[input_ids]                                   # [T, H]
        cos, sin = self.cos[positions], self.sin[positions]         # [T, D], shared by all layers
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            if residual is None:
                residual = h
                x = ops.rms_norm(h, layer.input_norm, eps)
            else:
                x, residual = ops.fused_add_rms_norm(h, residual, layer.input_norm, eps)
            qkv = self._linear(x, layer.qkv, "qkv")                 # [T, (Hq+2Hkv)D]
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(-1, cfg.num_attention_heads, D)           # [T, Hq, D]
            k = k.reshape(-1, cfg.num_key_value_heads, D)           # [T, Hkv, D]
            v = v.reshape(-1, cfg.num_key_value_heads, D)
            ops.rope_and_write_kv(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
            attn = attention(q, k_cache, v_cache, meta, self.scale)  # [T, Hq, D]
            h = self._linear(attn.reshape(-1, self.q_size), layer.o, "o")  # [T, H]
            x, residual = ops.fused_add_rms_norm(h, residual, layer.post_norm, eps)
            gate_up = self._linear(x, layer.gate_up, "gate_up")     # [T, 2I]
            if gate_up.shape[0] <= self.gemv_rows["silu_mul+down"]:    # the activation fused into down
                h = ops.silu_mul_gemv(gate_up, *_gemv_weights(layer.down))
            else:
                h = self._linear(ops.silu_and_mul(gate_up), layer.down, "down")   # [T, H]
        out, _ = ops.fused_add_rms_norm(h, residual, self.final_norm, eps)
        return out

    def _quantize(self, w: torch.Tensor, target: QuantizedWeight) -> None:
        quantize = self.ops.quantize_fp8 if target.format == "fp8" else self.ops.quantize_int8
        quantize(w, target.qweight, target.scales)

    def _linear(self, x: torch.Tensor, w, name: str) -> torch.Tensor:
        """x [T, K] @ w.T: the decode GEMV where the table picked it for T rows (``select_gemv``),
        else cuBLAS/BLAS for a plain matrix and ``ops.w8a16_linear`` for 8-bit ones."""
        if x.shape[0] <= self.gemv_rows[name]:
            return self.ops.gemv(x, *_gemv_weights(w))
        if isinstance(w, QuantizedWeight):
            return self.ops.w8a16_linear(x, w.qweight, w.scales)
        return x @ w.t()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] in fp32 (HF also upcasts logits)."""
        return self._linear(hidden, self.lm_head, "lm_head").float()

