"""Prometheus metrics of the server, served on ``GET /metrics`` (prometheus_client).

Names follow vLLM's where a counterpart exists, so its dashboards work:

  http_requests_total{handler,method,status}   requests by route and status
  vllm:time_to_first_token_seconds             histogram, admission -> first token out
  vllm:inter_token_latency_seconds             histogram, between a request's token outputs
                                               (per token when several arrive at once)
  vllm:num_requests_running / _waiting         gauges (waiting: queued in the engine or its inbox)
  vllm:kv_cache_usage_perc                     gauge, fraction of KV blocks in use (0..1)
  selfrag:kv_blocks_used / _free / _total      gauges (no vLLM counterpart: block counts)
  vllm:prefix_cache_queries_total / _hits_total   counters, in tokens
  vllm:gpu_prefix_cache_hit_rate               gauge, hits / queries since start (vLLM V0's name)
  vllm:prompt_tokens_total / vllm:generation_tokens_total
  vllm:num_preemptions_total
  vllm:request_success_total{finished_reason}  finished requests by reason (error included)

Each app has its own registry (several apps can live in one process, as in tests).
The engine's state is read when scraped; latencies and token counts are recorded by
the stepping thread as it hands out outputs (``AsyncEngine.observer``).
"""
from __future__ import annotations

import time

# TTFT and inter-token latency buckets (seconds): from a GPU's few ms to a CPU's seconds.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
            2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, llm, engine, routes: set[str]):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        self.llm, self.engine, self.routes = llm, engine, routes
        r = self.registry = CollectorRegistry()
        self.http = Counter("http_requests", "HTTP requests by route, method and status",
                            ["handler", "method", "status"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token",
                              buckets=_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens",
                             buckets=_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of started requests",
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("vllm:request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=r)
        r.register(_EngineState(llm, engine))
        self._live: dict[str, list] = {}        # request id -> [start, tokens seen, last output]

    # ---- the stepping thread's hooks (AsyncEngine.observer) ----------------------------
    def on_submit(self, request_ids) -> None:
        now = time.perf_counter()
        for rid in request_ids:
            self._live[rid] = [now, 0, now]

    def on_outputs(self, outs) -> None:
        # Runs in the stepping thread once per step: the counters are incremented once
        # per call, not per request (each inc/observe is ~0.7 us; at 256 streams the
        # per-request version cost ~0.36 ms a step).
        now = time.perf_counter()
        generated = prompt = 0
        itl = self.itl.observe
        for out in outs:
            st = self._live.get(out.request_id)
            if st is None:
                continue
            n = len(out.outputs[0].token_ids)
            new = n - st[1]
            if new > 0:
                if st[1] == 0:
                    self.ttft.observe(now - st[0])
                    prompt += len(out.prompt_token_ids)
                else:
                    gap = (now - st[2]) / new
                    for _ in range(new):
                        itl(gap)
                generated += new
                st[1], st[2] = n, now
            if out.finished:
                self.finished.labels(out.outputs[0].finish_reason or "unknown").inc()
                del self._live[out.request_id]
        if generated:
            self.generation_tokens.inc(generated)
        if prompt:
            self.prompt_tokens.inc(prompt)

    def forget(self, request_id: str) -> None:
        self._live.pop(request_id, None)

    # ---- HTTP ----------------------------------------------------------------------------
    def count_http(self, path: str, method: str, status: int) -> None:
        self.http.labels(path if path in self.routes else "other", method, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineState:
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, llm, engine):
        self.llm, self.engine = llm, engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        sched, bm = self.llm.scheduler, self.llm.block_manager
        stats = bm.get_stats()

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            return c
        yield gauge("vllm:num_requests_running", "Requests decoding or prefilling", len(sched.running))
        yield gauge("vllm:num_requests_waiting", "Requests queued for a prefill",
                    len(sched.waiting) + self.engine.num_submitted)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use",
                    stats["used"] / stats["num_blocks"])
        yield gauge("selfrag:kv_blocks_used", "KV blocks held by running requests", stats["used"])
        yield gauge("selfrag:kv_blocks_free", "KV blocks free or held only by the prefix cache",
                    stats["free"] + stats["cached_evictable"])
        yield gauge("selfrag:kv_blocks_total", "KV blocks in the pool", stats["num_blocks"])
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                      stats["prefix_cache_query_tokens"])
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                      stats["prefix_cache_hit_tokens"])
        yield gauge("vllm:gpu_prefix_cache_hit_rate", "Prefix-cache hit rate, in tokens (0..1)",
                    stats["prefix_cache_hit_tokens"] / max(1, stats["prefix_cache_query_tokens"]))
        yield counter("vllm:num_preemptions", "Requests preempted (recomputed later)",
                      sched.num_preemptions)
