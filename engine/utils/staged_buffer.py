"""A persistent device int64 buffer filled from the host with one queued copy a step.

The decode and prefill inputs (engine/worker/decode_inputs.py, prefill_graphs.py) live in
buffers a CUDA graph reads, so each step writes the same device buffer: the host packs
the step's ints into a pinned buffer and queues one non-blocking copy. Two pinned buffers
alternate, each with a CUDA event recorded after its copy: rewriting one first waits for
its last copy to finish (with async scheduling two steps may be queued; the wait is a
query in practice, counted in ``num_waits``). On CPU, where every op has finished when it
returns, the values are written into the buffer itself: no staging, no copy (~2 us of a
64 us batch-1 host step, bench_host_step).
"""
from __future__ import annotations

import torch


class StagedBuffer:
    """``device`` int64 [capacity] (``.device_buffer``), written by ``send``."""

    def __init__(self, capacity: int, device: torch.device):
        self.device_buffer = torch.zeros(capacity, dtype=torch.int64, device=device)
        self._cuda = device.type == "cuda"
        self._direct = None if self._cuda else self.device_buffer.numpy()
        self._host = [torch.zeros(capacity if self._cuda else 0, dtype=torch.int64, pin_memory=self._cuda)
                      for _ in range(2)]
        self._host_np = [h.numpy() for h in self._host]
        self._events = [None, None]
        self._flip = 0
        self.num_uploads = 0          # copies queued
        self.num_waits = 0            # times a pinned buffer's last copy had not finished

    def send(self, values: list) -> None:
        """``values`` (ints) into ``device_buffer[:len(values)]``, one queued copy."""
        self.num_uploads += 1
        if self._direct is not None:             # CPU: the buffer is host memory
            self._direct[:len(values)] = values
            return
        k = self._flip = 1 - self._flip
        ev = self._events[k]
        if ev is not None and not ev.query():
            self.num_waits += 1
            ev.synchronize()
        n = len(values)
        self._host_np[k][:n] = values
        self.device_buffer[:n].copy_(self._host[k][:n], non_blocking=True)
        ev = self._events[k] = torch.cuda.Event()
        ev.record()
