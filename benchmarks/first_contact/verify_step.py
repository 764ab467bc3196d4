"""First-contact step ``verify``: speculative verify steps as CUDA-graph replays, on the
shared 7B dummy engine.

1. **Step cost**: a verify step with k=4 drafts against a plain decode step (both graph
   replays), at batch 1 and 16. An oracle drafts the plain run's own next tokens, so every
   decode step verifies four drafts and accepts them. Targets (issue 28): <= 1.15x a plain
   decode step at batch 1, <= 1.25x at batch 16.
2. **Wall time**: batch 1, a 128-token prompt, 64 new tokens, a (host-side, identity)
   logits processor on every request; the oracle's drafts accepted at 3.75 tokens per
   verify step (the rate measured for Self-RAG answers on the CPU: a cycle of 4, 4, 2 and
   1 accepted drafts, plus each step's bonus token). Plain and speculative runs alternate,
   3 pairs, after a warm-up of each. Target: speculative >= 2x plain.
Every speculative run must give plain decoding's tokens."""
from __future__ import annotations

import statistics
import time

ACCEPT_CYCLE = (4, 4, 2, 1)        # accepted drafts of k = 4, step after step: mean 2.75 + bonus = 3.75


class _Oracle:
    """Drafts the plain run's next tokens; ``cycle``: how many of each step's k drafts are
    right, in turn (the rest are corrupted), None: all."""

    def __init__(self, futures, cycle=None):
        self.futures, self.cycle, self.calls = futures, cycle, 0

    def propose(self, seq_id, token_ids, k):
        for full in self.futures:
            if full[:len(token_ids)] == list(token_ids):
                d = list(full[len(token_ids):len(token_ids) + k])
                if self.cycle is not None:
                    right = self.cycle[self.calls % len(self.cycle)]
                    self.calls += 1
                    d = [t if j < right else (t + 1) % 7 + 3 for j, t in enumerate(d)]
                return d
        return []


def _identity(token_ids, logits):
    """A host-side logits processor that changes nothing: the request pays for one."""
    return logits


def timed_steps(ctx, llm, prompts, new, processors=None):
    """The prompts through step(): (each step's seconds after the prefill, finished
    outputs by request id)."""
    from engine import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, logits_processors=processors)
    for p in prompts:
        llm.add_request({"prompt_token_ids": p}, sp)
    times, outs = [], {}
    llm.step()                                    # the prefill
    while llm.has_unfinished_requests():
        ctx.sync()
        t = time.perf_counter()
        for o in llm.step():
            if o.finished:
                outs[o.request_id] = o
        ctx.sync()
        times.append(time.perf_counter() - t)
    return times, outs


def _tokens(outs):
    return [outs[r].outputs[0].token_ids for r in sorted(outs, key=int)]


def _wall(ctx, llm, prompts, new, config):
    """Seconds of one generate (prefill included) with ``config`` (None: plain), and its tokens."""
    from engine import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, logits_processors=[_identity])
    llm.enable_speculation(config)
    try:
        ctx.sync()
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        ctx.sync()
        return time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]
    finally:
        llm.enable_speculation(None)


def verify(ctx) -> dict:
    from benchmarks.first_contact.engine_steps import rand_prompts, sizes
    llm = ctx.shared["llm"]
    S = sizes(ctx.dry)
    V, P = llm.config.vocab_size, S["prompt"]
    new = 8 if ctx.dry else 40
    out, failures = {}, []
    for batch in ((1, 2) if ctx.dry else (1, 16)):
        prompts = rand_prompts(batch, P, V, seed=70 + batch)
        timed_steps(ctx, llm, prompts, new)                                    # warm-up, same shapes
        plain, outs = timed_steps(ctx, llm, prompts, new)
        futures = [p + t for p, t in zip(prompts, _tokens(outs))]
        llm.enable_speculation({"method": "custom", "num_speculative_tokens": 4, "proposer": _Oracle(futures)})
        try:
            timed_steps(ctx, llm, prompts, new)                                # warm-up of the verify shapes
            spec, souts = timed_steps(ctx, llm, prompts, new)
        finally:
            llm.enable_speculation(None)
        same = _tokens(souts) == _tokens(outs)
        p_ms, s_ms = statistics.median(plain) * 1e3, statistics.median(spec[:-1] or spec) * 1e3
        out[f"batch_{batch}"] = dict(plain_step_ms=p_ms, verify_step_ms=s_ms, ratio=s_ms / p_ms,
                                     tokens_per_verify_step=new / max(len(spec), 1), same_tokens=same)
        ctx.log(f"   batch {batch}: plain decode step {p_ms:.2f} ms, verify step (k=4) {s_ms:.2f} ms "
                f"({s_ms / p_ms:.2f}x), {new / max(len(spec), 1):.1f} tokens per verify step, same tokens {same}")
        if not same:
            failures.append(f"batch {batch}: speculative tokens differ from plain decoding")
    out["cuda_graphs"] = llm.cuda_graphs

    # wall time: batch 1, 128-token prompt, 64 new tokens, a processor on, 3.75 tokens a verify step
    new = 8 if ctx.dry else 64
    prompts = rand_prompts(1, P, V, seed=91)
    plain_s, want = _wall(ctx, llm, prompts, new, None)
    futures = [p + t for p, t in zip(prompts, want)]

    def config():
        return {"method": "custom", "num_speculative_tokens": 4, "proposer": _Oracle(futures, ACCEPT_CYCLE)}
    _wall(ctx, llm, prompts, new, config())                                    # warm-up of each
    pairs = []
    for _ in range(1 if ctx.dry else 3):
        p_s, p_tok = _wall(ctx, llm, prompts, new, None)
        s_s, s_tok = _wall(ctx, llm, prompts, new, config())
        pairs.append((p_s, s_s))
        if s_tok != want or p_tok != want:
            failures.append("wall-time run: speculative tokens differ from plain decoding")
    speedup = statistics.median(p / s for p, s in pairs)
    steps = -(-(new - 1) // 3.75)
    out["wall_batch_1"] = dict(prompt_len=P, new_tokens=new, processor="identity (host-side)",
                               tokens_per_verify_step=3.75, pairs_s=pairs, speedup=speedup,
                               verify_steps_expected=steps)
    ctx.log(f"   wall time, batch 1, {P}-token prompt, {new} new tokens, processor on: plain "
            f"{statistics.median(p for p, _ in pairs) * 1e3:.1f} ms, speculative "
            f"{statistics.median(s for _, s in pairs) * 1e3:.1f} ms ({speedup:.2f}x)")
    out["targets"] = dict(batch1_le_1_15=out["batch_1"]["ratio"] <= 1.15,
                          batch16_le_1_25=out.get("batch_16", out["batch_2"])["ratio"] <= 1.25,
                          speculative_ge_2x_plain=speedup >= 2.0)
    return dict(out, failures=failures)
