"""Step "kernels": every Triton kernel at the 7B shape against kernels/reference.py.

Each case runs the Triton launcher on fp16 / bf16 inputs and the PyTorch reference
on the same inputs upcast to fp32, and records the error (‖out − ref‖ / ‖ref‖ and the
max abs difference), the seconds of the first call (the JIT compile on a GPU), and
the steady-state host µs per launch (launches queued without a sync: the launch
overhead a CUDA graph removes). The dry run uses tiny shapes in Triton's interpreter
(fp16 only: the interpreter's bf16 tl.dot is wrong).
"""
from __future__ import annotations

import dataclasses
import time

import torch

# Normalized L2 error allowed per dtype (fp32 reference): fp16 rounds once at
# ~5e-4, bf16 at ~4e-3; a wrong index or a missed mask is orders of magnitude more.
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}


def shapes(dry: bool) -> dict:
    if dry:
        return dict(T=13, H=64, I=160, Hq=4, kv_heads=[4, 2], D=32, V=320, bs=16,
                    dtypes=[torch.float16], prefill_ctx=[40, 17, 70], prefill_q=[40, 5, 9],
                    decode_ctx=[0, 5, 100, 600], max_pos=512)
    return dict(T=33, H=4096, I=11008, Hq=32, kv_heads=[32, 8], D=128, V=32016, bs=16,
                dtypes=[torch.float16, torch.bfloat16], prefill_ctx=[300, 77, 1024],
                prefill_q=[300, 20, 64], decode_ctx=[0, 17, 300, 2000], max_pos=4096)


def _err(out, ref) -> dict:
    out, ref = out.float(), ref.float()
    diff = (out - ref)
    return dict(rel_l2=float(diff.norm() / ref.norm().clamp_min(1e-30)),
                max_abs=float(diff.abs().max()) if diff.numel() else 0.0,
                finite=bool(torch.isfinite(out).all()))


class Checker:
    def __init__(self, ctx):
        self.ctx, self.dev = ctx, ctx.device
        self.rows = []
        self.gen = torch.Generator(device=self.dev).manual_seed(1234)

    def randn(self, *shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, device=self.dev, generator=self.gen) * scale).to(dtype)

    def case(self, name: str, dtype, kernel, reference, compare, launches: int = 20, launch=None):
        """kernel() -> outputs on fresh inputs, compared with reference(); ``launch``
        (default: kernel) is what the host-us timing repeats: the bare launcher call, on
        inputs it may overwrite (in-place kernels), without kernel()'s input copies."""
        ctx = self.ctx
        t = time.perf_counter()
        out = kernel()
        ctx.sync()
        first_s = time.perf_counter() - t
        ref = reference()
        errs = compare(out, ref)
        # The dry run (the interpreter, where a launch costs a second and means nothing) times
        # one launch without a warm-up: the same path, a quarter of the interpreter's work.
        n = launches if ctx.cuda else 1
        launch = launch or kernel
        if ctx.cuda:
            launch()
            ctx.sync()
        t = time.perf_counter()
        for _ in range(n):
            launch()
        host_us = (time.perf_counter() - t) / n * 1e6
        ctx.sync()
        worst = max(e["rel_l2"] for e in errs.values())
        ok = all(e["finite"] for e in errs.values()) and worst <= TOL[dtype]
        row = dict(case=name, dtype=str(dtype).replace("torch.", ""), ok=ok, rel_l2=worst,
                   max_abs=max(e["max_abs"] for e in errs.values()), errors=errs,
                   first_call_s=round(first_s, 4), host_us_per_launch=round(host_us, 1))
        self.rows.append(row)
        ctx.log(f"   {'ok  ' if ok else 'FAIL'} {name:34s} {row['dtype']:8s} rel_l2 {worst:.2e} "
                f"first {first_s:6.3f} s  host {host_us:6.1f} us/launch")


def _paged(chk, contexts, Hkv, D, bs, dtype, spare=3):
    """Caches with random K/V at every position of each sequence, shuffled blocks."""
    nblk = [max(1, -(-c // bs)) for c in contexts]
    NB = sum(nblk) + spare
    kc = chk.randn(NB, bs, Hkv, D, dtype=dtype)
    vc = chk.randn(NB, bs, Hkv, D, dtype=dtype)
    perm = torch.randperm(NB, generator=torch.Generator().manual_seed(7)).tolist()
    width = max(nblk) + 1
    tables = torch.zeros(len(contexts), width, dtype=torch.int32)
    for i, n in enumerate(nblk):
        tables[i, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    return kc, vc, tables.to(chk.dev)


def run(ctx) -> dict:
    from kernels import reference as R, triton_ops as K
    from kernels.metadata import AttentionMetadata
    from kernels.triton.prefill_attention import _prefill_attention
    S = shapes(ctx.dry)
    chk = Checker(ctx)
    T, H, I, Hq, D, V, bs = S["T"], S["H"], S["I"], S["Hq"], S["D"], S["V"], S["bs"]
    dev = ctx.device
    for dt in S["dtypes"]:
        f32 = lambda t: t.float()     # noqa: E731
        # ---- norms and the MLP activation
        x, res, w = chk.randn(T, H, dtype=dt), chk.randn(T, H, dtype=dt), (1 + chk.randn(H, scale=0.1)).to(dt)
        chk.case("rms_norm", dt, lambda: K.rms_norm(x, w, 1e-5),
                 lambda: R.rms_norm(f32(x), f32(w), 1e-5), lambda o, r: {"out": _err(o, r)})
        res2 = res.clone()
        chk.case("fused_add_rms_norm", dt, lambda: K.fused_add_rms_norm(x, res.clone(), w, 1e-5),
                 lambda: R.fused_add_rms_norm(f32(x), f32(res), f32(w), 1e-5),
                 lambda o, r: {"normed": _err(o[0], r[0]), "residual": _err(o[1], r[1])},
                 launch=lambda: K.fused_add_rms_norm(x, res2, w, 1e-5))
        gu = chk.randn(T, 2 * I, dtype=dt)
        chk.case("silu_and_mul", dt, lambda: K.silu_and_mul(gu), lambda: R.silu_and_mul(f32(gu)),
                 lambda o, r: {"out": _err(o, r)})
        # ---- RoPE + KV write into a paged cache, with padding slots (-1)
        for Hkv in S["kv_heads"]:
            cos_t, sin_t = R.rope_cos_sin(S["max_pos"], D, 10000.0, 1.0, dtype=torch.float32, device=dev)
            pos = torch.randint(0, S["max_pos"], (T,), generator=torch.Generator().manual_seed(3)).to(dev)
            NB = -(-T // bs) + 2
            slots = torch.randperm(NB * bs, generator=torch.Generator().manual_seed(4))[:T].to(dev)
            slots[::5] = -1
            qkv0 = chk.randn(T, (Hq + 2 * Hkv) * D, dtype=dt)
            cache0 = chk.randn(NB, bs, Hkv, D, dtype=dt)

            def rope_args(dtype_, qkv0=qkv0, cache0=cache0, Hkv=Hkv, pos=pos, slots=slots):
                qkv = qkv0.to(dtype_).clone()
                q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
                q, k, v = q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
                kc, vc = cache0.to(dtype_).clone(), cache0.to(dtype_).clone()
                return q, k, v, cos_t[pos].to(dtype_), sin_t[pos].to(dtype_), kc, vc, slots

            def rope(dtype_, op=K, rope_args=rope_args):
                args = rope_args(dtype_)
                op.rope_and_write_kv(*args)
                q, k, _, _, _, kc, vc, _ = args
                return q, k, kc, vc
            scratch_args = rope_args(dt)                 # rotated again and again by the timing
            chk.case(f"rope_and_write_kv[Hkv={Hkv}]", dt, lambda rope=rope: rope(dt),
                     lambda rope=rope: rope(torch.float32, op=R),
                     lambda o, r: {n: _err(a, b) for n, a, b in zip(("q", "k", "k_cache", "v_cache"), o, r)},
                     launch=lambda a=scratch_args: K.rope_and_write_kv(*a))
        # ---- prefill attention with a cached prefix: dense grid and tile map
        for Hkv in S["kv_heads"]:
            ctxs, qls = S["prefill_ctx"], S["prefill_q"]
            kc, vc, tables = _paged(chk, ctxs, Hkv, D, bs, dt)
            qsl = [0]
            for n in qls:
                qsl.append(qsl[-1] + n)
            q = chk.randn(qsl[-1], Hq, D, dtype=dt)
            meta = AttentionMetadata(True, torch.zeros(qsl[-1], dtype=torch.int64, device=dev), tables,
                                     torch.tensor(ctxs, dtype=torch.int32, device=dev),
                                     torch.tensor(qsl, dtype=torch.int32, device=dev), max(qls), max(ctxs),
                                     host_query_start_loc=qsl, host_context_lens=list(ctxs))
            for use_map in (False, True):
                m = dataclasses.replace(meta, scratch={})   # one step's metadata (its tile map)
                chk.case(f"prefill[{'map' if use_map else 'dense'},Hkv={Hkv}]", dt,
                         lambda m=m, use_map=use_map, q=q, kc=kc, vc=vc:
                         _prefill_attention(q, kc, vc, m, D ** -0.5, use_map),
                         lambda m=m, q=q, kc=kc, vc=vc: R.prefill_attention(
                             f32(q), f32(kc), f32(vc), dataclasses.replace(m, scratch={}), D ** -0.5),
                         lambda o, r: {"out": _err(o, r)}, launches=5)
        # ---- decode attention: split and direct, MHA and GQA, a context of 0
        for Hkv in S["kv_heads"]:
            ctxs = S["decode_ctx"]
            kc, vc, tables = _paged(chk, ctxs, Hkv, D, bs, dt)
            q = chk.randn(len(ctxs), Hq, D, dtype=dt)
            meta = AttentionMetadata(False, torch.zeros(len(ctxs), dtype=torch.int64, device=dev), tables,
                                     torch.tensor(ctxs, dtype=torch.int32, device=dev),
                                     torch.arange(len(ctxs) + 1, dtype=torch.int32, device=dev), 1, max(ctxs))
            live = [i for i, c in enumerate(ctxs) if c > 0]
            for splits in (None, 1):
                def cmp(o, r, live=live):
                    zero_rows = [i for i in range(o.shape[0]) if i not in live]
                    out = {"out": _err(o[live], r[live])}
                    out["context_0_rows_zero"] = dict(rel_l2=0.0 if bool((o[zero_rows] == 0).all()) else 1.0,
                                                      max_abs=float(o[zero_rows].abs().max()) if zero_rows else 0.0,
                                                      finite=True)
                    return out
                m = dataclasses.replace(meta, scratch={})    # one step's metadata (its scratch)
                chk.case(f"decode[{'auto-split' if splits is None else 'direct'},Hkv={Hkv}]", dt,
                         lambda m=m, s=splits, q=q, kc=kc, vc=vc: K.decode_attention(
                             q, kc, vc, m, D ** -0.5, num_splits=s),
                         lambda m=meta, q=q, kc=kc, vc=vc: R.decode_attention(
                             f32(q), f32(kc), f32(vc), dataclasses.replace(m, scratch={}), D ** -0.5),
                         cmp)
        # ---- int8 weights: quantize (bit-exact) and the matmuls at decode and prefill rows
        for N, Kd in ((H, H), (H, I)) if not ctx.dry else ((H, I),):
            w8 = chk.randn(N, Kd, dtype=dt, scale=0.02)

            def quant(w8=w8):
                q, sc = torch.empty(w8.shape, dtype=torch.int8, device=dev), torch.empty(w8.shape[0], device=dev)
                K.quantize_int8(w8, q, sc)
                return q, sc

            def quant_ref(w8=w8):
                q, sc = torch.empty(w8.shape, dtype=torch.int8, device=dev), torch.empty(w8.shape[0], device=dev)
                R.quantize_int8(w8, q, sc)
                return q, sc
            chk.case(f"quantize_int8[{N}x{Kd}]", dt, quant, quant_ref, lambda o, r: {
                "exact": dict(rel_l2=0.0 if torch.equal(o[0], r[0]) and torch.equal(o[1], r[1]) else 1.0,
                              max_abs=float((o[0].int() - r[0].int()).abs().max()), finite=True)})
            q8, s8 = quant_ref()
            for M in (1, 16, T):
                xm = chk.randn(M, Kd, dtype=dt)
                chk.case(f"w8a16_linear[M={M},{N}x{Kd}]", dt, lambda xm=xm, q8=q8, s8=s8: K.w8a16_linear(xm, q8, s8),
                         lambda xm=xm, q8=q8, s8=s8: R.w8a16_linear(f32(xm), q8, s8), lambda o, r: {"out": _err(o, r)})
            if ctx.dry or torch.cuda.get_device_capability() >= (8, 9):     # fp8 (e4m3) weights
                f8 = torch.empty(w8.shape, dtype=torch.float8_e4m3fn, device=dev)
                sf8 = torch.empty(w8.shape[0], device=dev)
                R.quantize_fp8(w8, f8, sf8)
                for M in (1, T):
                    xm = chk.randn(M, Kd, dtype=dt)
                    chk.case(f"w8a16_linear[fp8,M={M},{N}x{Kd}]", dt,
                             lambda xm=xm, f8=f8, sf8=sf8: K.w8a16_linear(xm, f8, sf8),
                             lambda xm=xm, f8=f8, sf8=sf8: R.w8a16_linear(f32(xm), f8, sf8),
                             lambda o, r: {"out": _err(o, r)})
    # ---- sampling helpers on fp32 logits (what compute_logits returns)
    logits = chk.randn(7, V, scale=3.0)
    logits[2, V // 3] = logits[2].max() + 1          # a clear winner late in a row
    ids = torch.randint(0, V, (7, 5), generator=torch.Generator().manual_seed(5)).to(dev)
    chk.case("greedy_argmax", torch.float32, lambda: K.greedy_argmax(logits),
             lambda: R.greedy_argmax(logits),
             lambda o, r: {"ids": dict(rel_l2=0.0 if torch.equal(o, r) else 1.0, max_abs=0.0, finite=True)})
    chk.case("gather_logprobs", torch.float32, lambda: K.gather_logprobs(logits, ids),
             lambda: R.gather_logprobs(logits, ids), lambda o, r: {"out": _err(o, r)})
    failed = [r["case"] + "/" + r["dtype"] for r in chk.rows if not r["ok"]]
    return dict(shape=dict((k, v) for k, v in S.items() if k != "dtypes"), cases=chk.rows,
                failed=failed, all_ok=not failed)
