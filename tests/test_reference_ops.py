"""The PyTorch reference ops against independent formulations (HF's modules, naive attention)."""
import pytest
import torch
import torch.nn.functional as F

from kernels import reference as R
from kernels.metadata import AttentionMetadata
from tests.helpers import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_matches_hf_bitwise(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    norm = norm.to(dtype)
    x = torch.randn(7, 96).to(dtype)
    assert torch.equal(R.rms_norm(x, norm.weight.data, 1e-5), norm(x))
    res = torch.randn(7, 96).to(dtype)
    out, new_res = R.fused_add_rms_norm(x, res, norm.weight.data, 1e-5)
    assert torch.equal(new_res, x + res) and torch.equal(out, norm(x + res))


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_rope_and_write_kv_match_hf_and_skip_padding(factor):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    T, Hq, Hkv, D, bs, nb = 5, 4, 2, 32, 4, 6
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    pos = torch.tensor([0, 3, 7, 100, 4095])
    cos_t, sin_t = R.rope_cos_sin(4096, D, 10000.0, factor)
    # HF's own cos/sin: inv_freq outer positions / factor, duplicated halves
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(pos.float() / factor, inv)
    emb = torch.cat([freqs, freqs], -1)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                        emb.cos()[None], emb.sin()[None])
    kc, vc = torch.zeros(nb, bs, Hkv, D), torch.zeros(nb, bs, Hkv, D)
    slots = torch.tensor([0, 5, -1, 23, 9])
    q2, k2 = q.clone(), k.clone()
    R.rope_and_write_kv(q2, k2, v, cos_t[pos], sin_t[pos], kc, vc, slots)
    torch.testing.assert_close(q2, q_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k2, k_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    flat_k, flat_v = kc.view(-1, Hkv, D), vc.view(-1, Hkv, D)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k2[t]) and torch.equal(flat_v[s], v[t])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(nb * bs) if s not in written]
    assert flat_k[untouched].abs().sum() == 0       # padding slot -1 wrote nothing


def _naive_attention(q, k, v, q_start, scale):
    """q [n, Hq, D] at positions q_start.., k/v [L, Hkv, D] contiguous: explicit softmax."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    qpos = torch.arange(q_start, q_start + q.shape[0])[:, None]
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()).float()


def _paged(contexts, Hkv, D, bs, nb, gen):
    """Scatters contiguous per-sequence K/V into shuffled blocks of a pool."""
    kc, vc = torch.zeros(nb, bs, Hkv, D), torch.zeros(nb, bs, Hkv, D)
    free = torch.randperm(nb, generator=gen).tolist()
    tables, ks, vs = [], [], []
    for L in contexts:
        k, v = torch.randn(L, Hkv, D, generator=gen), torch.randn(L, Hkv, D, generator=gen)
        blocks = [free.pop() for _ in range(-(-L // bs))]
        for p in range(L):
            kc[blocks[p // bs], p % bs], vc[blocks[p // bs], p % bs] = k[p], v[p]
        tables.append(blocks)
        ks.append(k)
        vs.append(v)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return kc, vc, bt, ks, vs


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (4, 1)])
def test_prefill_and_decode_attention_match_naive(Hq, Hkv):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    D, bs, nb = 16, 4, 64
    contexts = [1, 7, 16, 29]               # ragged, some multiples of the block size
    q_lens = [1, 3, 16, 29]                 # cached prefix for some sequences (forks / resumes)
    kc, vc, bt, ks, vs = _paged(contexts, Hkv, D, bs, nb, g)
    scale = D ** -0.5
    qs = [torch.randn(n, Hq, D, generator=g) for n in q_lens]
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = AttentionMetadata(True, torch.empty(0, dtype=torch.int64), bt,
                             torch.tensor(contexts, dtype=torch.int32), qsl, max(q_lens), max(contexts))
    out = R.prefill_attention(torch.cat(qs), kc, vc, meta, scale)
    for i, (L, n) in enumerate(zip(contexts, q_lens)):
        ref = _naive_attention(qs[i], ks[i], vs[i], L - n, scale)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], ref, rtol=1e-5, atol=1e-5)
    # decode: one query at the last position of each sequence
    qd = torch.randn(len(contexts), Hq, D, generator=g)
    meta_d = AttentionMetadata(False, torch.empty(0, dtype=torch.int64), bt,
                               torch.tensor(contexts, dtype=torch.int32),
                               torch.arange(len(contexts) + 1, dtype=torch.int32), 1, max(contexts))
    out_d = R.decode_attention(qd, kc, vc, meta_d, scale)
    for i, L in enumerate(contexts):
        ref = _naive_attention(qd[i:i + 1], ks[i], vs[i], L - 1, scale)
        torch.testing.assert_close(out_d[i:i + 1], ref, rtol=1e-5, atol=1e-5)


def test_silu_and_mul_and_logprob_helpers():
    x = torch.randn(5, 2 * 24)
    torch.testing.assert_close(R.silu_and_mul(x), F.silu(x[:, :24]) * x[:, 24:])
    logits = torch.randn(3, 50)
    ids = torch.tensor([[0, 5], [49, 1], [7, 7]])
    torch.testing.assert_close(R.gather_logprobs(logits, ids), torch.log_softmax(logits, -1).gather(1, ids))
    logits[1, 3] = logits[1, 9] = 100.0       # a tie: the first index wins, like torch.argmax
    assert R.greedy_argmax(logits)[1] == 3


def test_rope_on_fused_qkv_views_equals_separate_tensors():
    """The model passes q/k/v as views of one qkv matmul output (the joint-rotation path)."""
    T, Hq, Hkv, D = 6, 4, 2, 16
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.reshape(T, Hq, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
    assert R._adjacent_heads(q, k) is not None
    qs, ks = q.clone(), k.clone()
    cos_t, sin_t = R.rope_cos_sin(64, D, 10000.0, 1.0)
    pos = torch.arange(3, 3 + T)
    slots = torch.arange(T)
    caches = [torch.zeros(4, 4, Hkv, D) for _ in range(4)]
    R.rope_and_write_kv(q, k, v, cos_t[pos], sin_t[pos], caches[0], caches[1], slots)
    R.rope_and_write_kv(qs, ks, v.clone(), cos_t[pos], sin_t[pos], caches[2], caches[3], slots)
    assert torch.equal(q, qs) and torch.equal(k, ks) and torch.equal(caches[0], caches[2])
    assert torch.equal(v, qkv[:, (Hq + Hkv) * D:].reshape(T, Hkv, D))   # v untouched
