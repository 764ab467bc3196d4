"""Loopback load generator for the OpenAI-compatible server (``selfrag serve``).

The same workload runs twice per concurrency level (1, 8 and 64 clients):

  in-process  ``AsyncEngine.generate`` in this process's event loop (no HTTP);
  http        streaming ``POST /v1/completions`` with ``httpx.AsyncClient`` against a
              ``selfrag serve`` subprocess on 127.0.0.1 (a free port).

Each client sends its share of the requests back to back (greedy, fixed
``--max-tokens``, ignore_eos). Reported per level: requests/s, TTFT p50/p99
(send -> first chunk with text) and inter-token latency p50/p99 (between
successive text chunks), plus the HTTP overhead on p50 TTFT at 1 client
(target: <= 1 ms on CPU). Bounded: ``--requests`` per level (at least one per
client) and ``--max-seconds`` per run. Writes benchmarks/results/server_<device>.json
(``--quick``: server_quick.json; also into $OUT when set) via ``common.write_json``.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_server.py [--quick] [--model DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import device_name, record, slug, write_json  # noqa: E402

PROMPTS = [f"Question {i}: tell me something about {w}." for i, w in enumerate(
    ["alpacas", "llamas", "camels", "vicunas", "guanacos", "wool", "the Andes", "Peru"] * 16)]


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def summarize(ttfts, itls, n, seconds):
    ms = lambda x: None if x is None else round(x * 1e3, 3)  # noqa: E731
    return {"requests": n, "seconds": round(seconds, 3), "requests_per_s": round(n / seconds, 2),
            "ttft_ms_p50": ms(pct(ttfts, 50)), "ttft_ms_p99": ms(pct(ttfts, 99)),
            "itl_ms_p50": ms(pct(itls, 50)), "itl_ms_p99": ms(pct(itls, 99))}


async def run_level(one_request, clients: int, n: int, deadline: float):
    """``clients`` workers send ``n`` requests in all; ``one_request(i)`` returns the
    chunk arrival times (first = first token) relative to its own send time."""
    ttfts, itls = [], []
    counter = iter(range(n))
    done = 0

    async def worker():
        nonlocal done
        for i in counter:
            if time.perf_counter() > deadline:
                return
            times = await one_request(i)
            ttfts.append(times[0])
            itls.extend(b - a for a, b in zip(times, times[1:]))
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(clients)])
    return summarize(ttfts, itls, done, time.perf_counter() - t0)


def params_for(max_tokens):
    from engine import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def bench_in_process(llm, levels, per_level, max_tokens, max_seconds):
    from engine.server import AsyncEngine
    engine = AsyncEngine(llm, max_waiting=None)
    engine.start()
    params = params_for(max_tokens)

    async def one(i):
        t0 = time.perf_counter()
        times, sent = [], 0
        async for out in engine.generate(PROMPTS[i % len(PROMPTS)], params):
            text = out.outputs[0].text
            if len(text) > sent or (out.finished and not times):
                times.append(time.perf_counter() - t0)
                sent = len(text)
        return times

    try:
        await run_level(one, 1, 3, time.perf_counter() + 30)         # warm-up
        return {c: await run_level(one, c, max(c, per_level[c]), time.perf_counter() + max_seconds)
                for c in levels}
    finally:
        engine.stop()


async def bench_http(url, levels, per_level, max_tokens, max_seconds):
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as ac:
            async def one(i):
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                t0 = time.perf_counter()
                times = []
                async with ac.stream("POST", "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            ch = json.loads(line[6:])["choices"][0]
                            if ch["text"] or (ch["finish_reason"] and not times):
                                times.append(time.perf_counter() - t0)
                return times

            await run_level(one, 1, 3, time.perf_counter() + 30)     # warm-up (and connection)
            return {c: await run_level(one, c, max(c, per_level[c]), time.perf_counter() + max_seconds)
                    for c in levels}
    return await main()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, port, threads):
    cmd = [sys.executable, "-m", "selfrag.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-waiting", "4096"]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("server did not start in 120 s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--levels", default="1,8,64")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level (default: 24 at 1 client, 64 at 8, 128 at 64)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="time cap per level and mode")
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    if args.quick:
        args.max_tokens = min(args.max_tokens, 16)
    per_level = {c: args.requests or (8 if args.quick else 24) * (1 if c == 1 else max(1, c // 8) * 2 + 1)
                 for c in levels}
    per_level = {c: max(c, n) for c, n in per_level.items()}

    import torch
    from engine import LLM
    from selfrag.default_model import default_model_dir
    threads = 1 if args.model is None else torch.get_num_threads()
    torch.set_num_threads(threads)
    path = args.model or default_model_dir()
    llm = LLM(path, show_progress=False)
    device = llm.model.device.type

    print(f"workload: {sum(per_level.values())} requests over levels {levels}, greedy, "
          f"{args.max_tokens} new tokens each, model {path}", flush=True)
    inproc = asyncio.run(bench_in_process(llm, levels, per_level, args.max_tokens, args.max_seconds))
    del llm
    port = free_port()
    proc = start_server(args.model, port, threads)
    try:
        http = asyncio.run(bench_http(f"http://127.0.0.1:{port}", levels, per_level, args.max_tokens,
                                      args.max_seconds))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    rows = []
    print(f"{'clients':>7} {'mode':>10} {'req/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  (ms)")
    for c in levels:
        for mode, res in (("in-process", inproc[c]), ("http", http[c])):
            rows.append({"clients": c, "mode": mode, **res})
            print(f"{c:>7} {mode:>10} {res['requests_per_s']:>8} {res['ttft_ms_p50']:>9} "
                  f"{res['ttft_ms_p99']:>9} {res['itl_ms_p50']:>8} {res['itl_ms_p99']:>8}")
    overhead = None
    if 1 in levels:
        overhead = round(http[1]["ttft_ms_p50"] - inproc[1]["ttft_ms_p50"], 3)
        verdict = "meets" if overhead <= 1.0 else "MISSES"
        print(f"HTTP overhead on p50 TTFT at 1 client: {overhead:+.3f} ms ({verdict} the <= 1 ms target)")
    dev = device_name(device)
    payload = record(device=dev, model=path, max_tokens=args.max_tokens, levels=levels,
                     requests_per_level=per_level, rows=rows, http_ttft_overhead_ms_p50_1_client=overhead,
                     target_overhead_ms=1.0)
    name = "server_quick.json" if args.quick else f"server_{slug(dev)}.json"
    for p in write_json(name, payload):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
