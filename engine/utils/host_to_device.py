"""Small per-step host arrays to the device without stalling the host.

``tensor.to("cuda")`` from ordinary (pageable) memory is a synchronous copy: the host
waits until the GPU has finished everything queued before it, i.e. the forward pass
the step just launched, which ends the overlap of host work (detokenizing the last
step) with the device. A copy from page-locked (pinned) memory with
``non_blocking=True`` is queued like a kernel and returns at once.

``HostToDevice.send(a, b, ...)`` packs ``array.array``s (typecodes ``q``, ``i``,
``f``, ``d``) into one pinned staging buffer, each at an 8-byte-aligned offset, queues
ONE copy, and returns device tensors viewing that copy (int64 / int32 / float32 /
float64 by typecode), to be used by work queued after it on the same stream.

The rule that makes it safe: a staging buffer is never rewritten (nor dropped for a
larger one) before the copy out of it has completed. Each buffer of the ring records
a CUDA event after its copy; reusing the buffer first waits for that event, which in
the engine has long completed (every step reads its sampled tokens back, so at most
the current step's copies are in flight), so the wait costs a query. ``num_waits``
counts the waits that actually blocked.

On CPU there is no copy at all: the tensors view the arrays themselves
(``torch.frombuffer``), as the callers did before.
"""
from __future__ import annotations

import array

import torch

_DTYPES = {"q": torch.int64, "i": torch.int32, "f": torch.float32, "d": torch.float64}
_ALIGN = 8


class HostToDevice:
    """A ring of ``num_buffers`` pinned staging buffers for ``device`` (see the module doc)."""

    def __init__(self, device, num_buffers: int = 2, *, staged: bool | None = None, copy=None,
                 make_event=None):
        """``staged``/``copy``/``make_event`` replace the CUDA pieces in tests: ``copy(src)``
        queues a copy of the host bytes ``src`` and returns the device tensor, and
        ``make_event()`` gives an object with ``record()``, ``query()`` and ``synchronize()``."""
        if num_buffers < 1:
            raise ValueError(f"HostToDevice: num_buffers must be >= 1, got {num_buffers}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.staged = cuda if staged is None else staged
        self._pin = cuda
        self._copy = copy or (lambda src: src.to(self.device, non_blocking=True))
        self._make_event = make_event or torch.cuda.Event
        self._bufs: list[torch.Tensor | None] = [None] * num_buffers
        self._events: list = [None] * num_buffers
        self._next = 0
        self.num_copies = 0          # copies queued
        self.num_waits = 0           # times a buffer's previous copy had not completed yet

    def send(self, *arrays: array.array) -> list[torch.Tensor]:
        """One device tensor per array (their dtypes by typecode), from one copy."""
        for a in arrays:
            if a.typecode not in _DTYPES:
                raise ValueError(f"HostToDevice.send: array typecode {a.typecode!r} is not one of "
                                 f"{sorted(_DTYPES)}")
        if not self.staged:
            return [torch.frombuffer(a, dtype=_DTYPES[a.typecode]) if len(a) else
                    torch.empty(0, dtype=_DTYPES[a.typecode]) for a in arrays]
        spans, total = [], 0
        for a in arrays:
            n = len(a) * a.itemsize
            spans.append((total, n))
            total += -(-n // _ALIGN) * _ALIGN
        k = self._next
        self._next = (k + 1) % len(self._bufs)
        ev = self._events[k]
        if ev is not None and not ev.query():
            self.num_waits += 1
            ev.synchronize()                  # its copy still reads this buffer
        buf = self._bufs[k]
        if buf is None or buf.numel() < total:
            size = max(total, 4096, 2 * (buf.numel() if buf is not None else 0))
            buf = self._bufs[k] = torch.empty(size, dtype=torch.uint8, pin_memory=self._pin)
        host = memoryview(buf.numpy())
        for a, (off, n) in zip(arrays, spans):
            if n:
                host[off:off + n] = memoryview(a).cast("B")
        dev = self._copy(buf[:max(total, _ALIGN)])
        ev = self._events[k] = self._make_event()
        ev.record()
        self.num_copies += 1
        return [dev[off:off + n].view(_DTYPES[a.typecode]) for a, (off, n) in zip(arrays, spans)]
