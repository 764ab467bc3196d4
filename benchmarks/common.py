"""Helpers shared by the benchmarks: result records and where they go."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3' (for file names)."""
    import re
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def record(**fields) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), **fields}


def write_json(name: str, payload, to_out: bool = True) -> list[str]:
    """Writes ``payload`` to benchmarks/results/NAME and, when set and
    ``to_out``, $OUT/NAME (the GPU check collects stage results itself)."""
    paths = []
    out = [os.environ["OUT"]] if os.environ.get("OUT") and to_out else []
    for folder in [RESULTS] + out:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        paths.append(path)
    return paths
