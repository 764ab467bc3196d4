"""bench_latency.py's PNG: decode tokens/s against batch size (the ``sweep`` stage) beside
the copy-bandwidth ceiling, with and without KV reads, and the HF peer at batch 1.
"""
from __future__ import annotations

from benchmarks.latency_roofline import ceiling_tokens_per_s


def _fmt(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{n:.0f} B"


def plot(payload: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", flush=True)
        return None
    sweep = [r for r in payload["records"] if r.get("stage") == "sweep"]
    if not sweep:
        print("no sweep results: no PNG", flush=True)
        return None
    bw, W = payload["copy"]["copy_bytes_per_s"], payload["weight_bytes"]
    bs = [r["batch_size"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(bs, [r["decode_tokens_per_s"] for r in sweep], "o-", label="engine decode tokens/s")
    ax.plot(bs, [r["output_tokens_per_s"] for r in sweep], "s:", alpha=0.6,
            label="engine output tokens/s (incl. prefill)")
    xs = [min(bs), max(bs)]
    ax.plot(xs, [ceiling_tokens_per_s(b, bw, W) for b in xs], "k--",
            label=f"ceiling b x {_fmt(bw)}/s copy / {_fmt(W)} weights")
    ax.plot(bs, [r["ceiling_with_kv_tokens_per_s"] for r in sweep], "k.", alpha=0.5,
            label="ceiling with KV reads")
    for r in payload["records"]:
        if r.get("stage") in ("hf_latency", "hf_static_latency"):
            ax.plot([1], [r["decode_tokens_per_s"]], "x" if r["stage"] == "hf_latency" else "+",
                    ms=10, label=f"HF generate ({r['cache']}) batch 1")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{payload['model']} {payload['dtype']} on {payload['device']}\n"
                 f"prompt {sweep[0]['prompt_len']}, {sweep[0]['output_len']} new tokens", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
