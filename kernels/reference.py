"""Pure-PyTorch reference implementations of every hot op.

They run on CPU and GPU, define the exact semantics the Triton kernels must
match, and are the engine's CPU backend. Numerics follow Hugging Face's
Llama (fp32 statistics in RMSNorm, HF's half-rotation RoPE) so that greedy
decoding in fp32 reproduces ``transformers`` token for token.

KV cache layout, per layer: ``k_cache``/``v_cache`` ``[num_blocks, block_size,
num_kv_heads, head_dim]``; slot ``s`` is ``(s // block_size, s % block_size)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H], weight [H] -> [T, H]. Statistics in fp32, like HF."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # HF's formula without its no-op casts and with one temporary fewer:
        # bit-identical in fp32 (tests/test_reference_ops.py), 7x faster than
        # HF's at 1024x256 on CPU (60 vs 406 us; F.rms_norm took 928 us).
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        return x.mul(r).mul_(weight)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rms_norm(residual), residual). [T, H] each."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first, then up) -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_cos_sin(max_positions: int, head_dim: int, theta: float, scaling_factor: float,
                 dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (cos, sin), each [max_positions, head_dim] in ``dtype``.

    HF layout: the head_dim/2 frequencies are duplicated (``cat(f, f)``), so
    row p rotates both halves of a head. Computed in fp32, then cast, as HF
    does. Linear rope scaling divides positions by ``scaling_factor``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device)
                                .float() / head_dim))
    pos = torch.arange(max_positions, dtype=torch.int64, device=device).float() / scaling_factor
    freqs = torch.outer(pos, inv_freq)                      # [P, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)                 # [P, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place with each token's cos/sin
    rows [T, D] (``rope_cos_sin`` tables gathered at the tokens' positions) and
    stores k and v [T, Hkv, D] into the cache slots ``slot_mapping`` [T]; slot
    -1 is skipped. Same arithmetic as HF: x * cos + rotate_half(x) * sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)            # [T, 1, D]
    half = q.shape[-1] // 2
    for x in _adjacent_heads(q, k) or (q, k):
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        x.mul_(cos).add_(rotated * sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping)


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor):
    """When k's heads directly follow q's in memory (both are views of the
    fused qkv matmul output), one [T, Hq+Hkv, D] view rotates both in one pass:
    5 torch calls per layer fewer, ~8% of a decode step of a small model."""
    T, Hq, D = q.shape
    if (k.shape[0] == T and q.stride(1) == D and k.stride(1) == D and q.stride(2) == 1
            and k.stride(2) == 1 and q.stride(0) == k.stride(0) and k.dtype == q.dtype
            and k.data_ptr() == q.data_ptr() + Hq * D * q.element_size()):
        return (q.as_strided((T, Hq + k.shape[1], D), (q.stride(0), D, 1)),)
    return None


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Stores k, v [T, Hkv, D] at cache slots [T]; slot -1 is skipped."""
    nb, bs = k_cache.shape[0], k_cache.shape[1]
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    k_cache.view(nb * bs, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(nb * bs, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, nblocks: int) -> torch.Tensor:
    """cache [NB, bs, Hkv, D], block_tables [B, >=nblocks] -> [B, Hkv, nblocks*bs, D]."""
    B = block_tables.shape[0]
    nb, bs, Hkv, D = cache.shape
    flat = cache.index_select(0, block_tables[:, :nblocks].reshape(-1))
    return flat.view(B, nblocks * bs, Hkv, D).transpose(1, 2)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention for packed queries q [T, Hq, D] -> [T, Hq, D].

    Each sequence's queries are its last q_len positions and attend to its
    cached prefix plus themselves, K/V read only through the block table.
    Sequences of similar length run as one padded batch (one SDPA call
    instead of one per sequence: 16 prompts of 64 tokens prefill 1.2x
    faster on CPU); very ragged batches of long queries, where padding would more
    than double the work, run one sequence at a time.
    """
    T, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    # host copies from the runner when present: no device sync
    qsl = meta.host_query_start_loc or meta.query_start_loc.tolist()
    ctx = meta.host_context_lens or meta.context_lens.tolist()
    B, Qm = len(ctx), meta.max_query_len
    q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    if qsl[-1] < T or 0 in q_lens:   # a padded (graph-shaped) step: padding rows get zeros
        return _without_padding(q, k_cache, v_cache, meta, scale, qsl, ctx, q_lens)
    # Short queries (verify steps of speculative decoding: 1 + k per sequence) always run
    # padded: their cost is the K/V gather, which the per-sequence path repeats per
    # sequence (a batch-8 Self-RAG verify step: per-sequence 0.13 s of 0.45 s on the CPU VM).
    if B > 1 and Qm > 16 and B * Qm > 2 * T:
        out = torch.empty_like(q)
        for i in range(B):
            sub = AttentionMetadata(True, meta.slot_mapping, meta.block_tables[i:i + 1],
                                    meta.context_lens[i:i + 1],
                                    torch.tensor([0, q_lens[i]], dtype=torch.int32),
                                    q_lens[i], ctx[i])
            out[qsl[i]:qsl[i + 1]] = prefill_attention(q[qsl[i]:qsl[i + 1]], k_cache, v_cache,
                                                       sub, scale)
        return out
    nblocks = (meta.max_context_len + bs - 1) // bs
    k = _gather_blocks(k_cache, meta.block_tables, nblocks)           # [B, Hkv, L, D]
    v = _gather_blocks(v_cache, meta.block_tables, nblocks)
    # The padding indices and the causal mask are the same for every layer of a step:
    # built once: a Self-RAG verify step's forward (3 x 5 queries) 3.91 -> 3.79 ms on the
    # CPU VM, paired median of 20.
    layout = meta.scratch.get("prefill_layout")
    if layout is None:
        layout = meta.scratch["prefill_layout"] = _padded_layout(qsl, q_lens, ctx, Qm, nblocks * bs, q.device)
    rows, mask, keep = layout
    if B == 1:
        qp = q.transpose(0, 1).unsqueeze(0)                            # [1, Hq, T, D]
    else:   # each sequence's queries padded to Qm rows
        qp = q.index_select(0, rows).view(B, Qm, Hq, D).transpose(1, 2)
    o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=Hq != Hkv)            # [B, Hq, Qm, D]
    o = o.transpose(1, 2)                                              # [B, Qm, Hq, D]
    if B == 1:
        return o[0]
    return o.reshape(B * Qm, Hq, D).index_select(0, keep)


def _without_padding(q, k_cache, v_cache, meta, scale, qsl, ctx, q_lens):
    """prefill_attention of a step padded as a CUDA graph has it (sequences without queries,
    query rows past the last sequence's): the real sequences' rows, zeros elsewhere."""
    live = [i for i, n in enumerate(q_lens) if n]
    out = q.new_zeros(q.shape)
    if not live:
        return out
    total = qsl[-1]
    sub_qsl = [0]
    for i in live:
        sub_qsl.append(sub_qsl[-1] + q_lens[i])
    index = torch.tensor(live, device=q.device)
    sub = AttentionMetadata(True, meta.slot_mapping[:total], meta.block_tables.index_select(0, index),
                            meta.context_lens.index_select(0, index),
                            torch.tensor(sub_qsl, dtype=torch.int32, device=q.device),
                            max(q_lens[i] for i in live), max(ctx[i] for i in live),
                            host_query_start_loc=sub_qsl, host_context_lens=[ctx[i] for i in live])
    out[:total] = prefill_attention(q[:total], k_cache, v_cache, sub, scale)
    return out


def _padded_layout(qsl: list, q_lens: list, ctx: list, Qm: int, L: int, dev):
    """(rows [B*Qm]: the packed query each padded row copies, repeating a sequence's
    first row as padding; mask [B, 1, Qm, L]: causal over the cached prefix; keep [T]:
    the padded rows that are real queries)."""
    rows = [r for a, n in zip(qsl, q_lens) for r in list(range(a, a + n)) + [a] * (Qm - n)]
    # query j of sequence i sits at position ctx_i - q_len_i + j and sees keys <= it
    start = torch.tensor([c - n for c, n in zip(ctx, q_lens)], device=dev)
    qpos = start.unsqueeze(1) + torch.arange(Qm, device=dev)                       # [B, Qm]
    mask = torch.arange(L, device=dev)[None, None, :] <= qpos[:, :, None]            # [B, Qm, L]
    keep = [i * Qm + j for i, n in enumerate(q_lens) for j in range(n)]
    return (torch.tensor(rows, device=dev), mask.unsqueeze(1), torch.tensor(keep, device=dev))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D] -> [B, Hq, D]; batched over sequences.
    With ``meta.query_lens`` (a verify step), Q = max_query_len rows per sequence,
    q [B * Q, Hq, D] -> [B * Q, Hq, D], each row causal, padding rows zero (see
    ``AttentionMetadata``).

    Gathers every sequence's blocks (padded to the longest) and masks
    positions >= context_lens, so a step costs a handful of torch calls
    whatever the batch size; GQA heads share their K/V without a copy.
    """
    T, Hq, D = q.shape
    B, Q = meta.context_lens.shape[0], meta.decode_query_len
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    nblocks = (meta.max_context_len + bs - 1) // bs
    L = nblocks * bs
    k = _gather_blocks(k_cache, meta.block_tables, nblocks)           # [B, Hkv, L, D]
    v = _gather_blocks(v_cache, meta.block_tables, nblocks)
    mask = meta.scratch.get("decode_mask")                  # shared by all layers of a step
    if mask is None:
        if Q == 1:
            limit = meta.context_lens.unsqueeze(1)                                  # [B, 1]
        else:   # row j of sequence i sees keys < ctx_i - qlen_i + 1 + j; padding rows none
            j = torch.arange(Q, device=q.device)
            qlen = meta.query_lens.unsqueeze(1).long()
            limit = torch.where(j < qlen, meta.context_lens.unsqueeze(1) - qlen + 1 + j, 0)   # [B, Q]
        valid = torch.arange(L, device=q.device) < limit.unsqueeze(2)                 # [B, Q, L]
        mask = meta.scratch["decode_mask"] = valid[:, None]                           # [B, 1, Q, L]
    if Q == 1:
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=Hq != Hkv).squeeze(2)    # [B, Hq, D]
    qb = q.view(B, Q, Hq, D).transpose(1, 2)                                          # [B, Hq, Q, D]
    out = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=Hq != Hkv)          # [B, Hq, Q, D]
    # fully masked rows (padding) come out NaN: zeros, as the kernel gives
    out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    return out.transpose(1, 2).reshape(T, Hq, D)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> [N] int64, the first maximal index (torch.argmax's rule)."""
    return logits.argmax(dim=-1)


def gather_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits [N, V]) at token_ids [N, K] -> [N, K] fp32."""
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    return logits.float().gather(1, token_ids) - lse


def quantize_int8(w: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> None:
    """The int8 weight format's definition (kernels/triton/w8a16.py): w [N, K] float ->
    qweight [N, K] int8 and scales [N] fp32, in place. Per output row n:
    scales[n] = max|w[n]| / 127 (fp32), qweight = sign(y) * floor(|y| + 1/2) with
    y = w[n] / scales[n] (an all-zero row: scale 0, values 0)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)                                             # [N]
    # A tensor divisor: CUDA torch divides by a Python scalar as a multiply by its
    # reciprocal (not IEEE division; CPU torch divides exactly), which gives another
    # scale on ~4.5% of rows.
    s = amax / torch.full_like(amax, 127.0)
    y = wf / torch.where(s == 0, torch.ones_like(s), s)[:, None]
    q = torch.floor(y.abs() + 0.5).clamp(max=127.0)
    qweight.copy_(torch.where(y < 0, -q, q).to(torch.int8))
    scales.copy_(s)


def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (qweight [N, K] (int8 or fp8 e4m3) * scales[:, None]).T -> [M, N] in x's dtype, computed in
    fp32: exact to the quantized weights up to fp32 rounding (slow: it converts the
    int8 weight to fp32 on every call; the CPU path for tests and quality checks)."""
    return ((x.float() @ qweight.float().t()) * scales).to(x.dtype)


def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype, summed in fp32: W = w (x's dtype), or
    w * scales[:, None] for an 8-bit w (int8 / float8_e4m3fn) with fp32 scales [N]."""
    out = x.float() @ w.float().t()
    return (out if scales is None else out * scales).to(x.dtype)


def silu_mul_gemv(gate_up: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """gemv(silu(gate) * up, w, scales): gate_up [M, 2K] -> [M, N] (the down projection with
    the MLP's activation as its prologue). The activation is computed in fp32 and rounded
    once to gate_up's dtype, as the Triton ``silu_and_mul`` writes it (torch's half
    ``F.silu`` rounds twice: up to an ulp of the activation apart, which a K-long sum can
    turn into far more than an ulp of a small output)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return gemv((F.silu(gate) * up).to(gate_up.dtype), w, scales)


FP8_MAX = 448.0                 # the largest finite float8 e4m3fn


def quantize_fp8(w: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> None:
    """The fp8 weight format: w [N, K] float -> qweight [N, K] float8_e4m3fn and scales [N]
    fp32, in place. Per output row n: scales[n] = max|w[n]| / 448 (fp32), qweight =
    w[n] / scales[n] rounded to the nearest e4m3 value (ties to even; an all-zero row:
    scale 0, values 0). Also the CUDA path: the elementwise torch ops run on the GPU."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)                                             # [N]
    s = amax / torch.full_like(amax, FP8_MAX)          # IEEE on CUDA too (see quantize_int8)
    y = wf / torch.where(s == 0, torch.ones_like(s), s)[:, None]
    qweight.copy_(y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
    scales.copy_(s)
