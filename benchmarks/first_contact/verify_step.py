"""First-contact step ``verify``: a speculative verify step with k=4 drafts against a plain
decode step (graph replay) on the shared 7B dummy engine, at batch 1 and 16.

The drafts come from an oracle (the plain run's own next tokens), so every decode step
is a verify step that accepts all four; the verify step's wall time per step is compared
with the plain run's. Target (issue 18): <= 1.15x a plain decode step at batch 1."""
from __future__ import annotations

import statistics
import time


class _Oracle:
    def __init__(self, futures):
        self.futures = futures

    def propose(self, seq_id, token_ids, k):
        for full in self.futures:
            if full[:len(token_ids)] == list(token_ids):
                return full[len(token_ids):len(token_ids) + k]
        return []


def timed_steps(ctx, llm, prompts, new):
    """The prompts through step(): (each step's seconds after the prefill, finished
    outputs by request id)."""
    from engine import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
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
        futures = [p + outs[r].outputs[0].token_ids for p, r in zip(prompts, sorted(outs, key=int))]
        llm.enable_speculation({"method": "custom", "num_speculative_tokens": 4, "proposer": _Oracle(futures)})
        try:
            timed_steps(ctx, llm, prompts, new)                                # warm-up of the verify shapes
            spec, souts = timed_steps(ctx, llm, prompts, new)
        finally:
            llm.enable_speculation(None)
        same = all(souts[a].outputs[0].token_ids == outs[b].outputs[0].token_ids
                   for a, b in zip(sorted(souts, key=int), sorted(outs, key=int)))
        p_ms, s_ms = statistics.median(plain) * 1e3, statistics.median(spec[:-1] or spec) * 1e3
        out[f"batch_{batch}"] = dict(plain_step_ms=p_ms, verify_step_ms=s_ms, ratio=s_ms / p_ms,
                                     tokens_per_verify_step=new / max(len(spec), 1), same_tokens=same)
        ctx.log(f"   batch {batch}: plain decode step {p_ms:.2f} ms, verify step (k=4) {s_ms:.2f} ms "
                f"({s_ms / p_ms:.2f}x), {new / max(len(spec), 1):.1f} tokens per verify step, same tokens {same}")
        if not same:
            failures.append(f"batch {batch}: speculative tokens differ from plain decoding")
    out["target_batch1_le_1_15"] = out["batch_1"]["ratio"] <= 1.15
    return dict(out, failures=failures)
