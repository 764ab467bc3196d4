"""engine/utils/host_to_device.py: per-step host arrays to the device in one queued copy from
pinned memory, and the rule that a staging buffer is never rewritten before its copy
has completed. On CPU a simulated DMA engine (copies that read their source only when
they complete) shows the hazard; the GPU check runs the same on CUDA with the copies held
back behind a sleeping kernel, and the sampling knobs on CUDA against the CPU."""
import array

import pytest
import torch

from engine.utils.host_to_device import HostToDevice
from tests.helpers import DEVICE

cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="pinned memory and CUDA events: GPU check only")


class FakeDMA:
    """Copies queued in order, each reading its (host) source only when it completes."""

    def __init__(self):
        self.queue, self.done = [], 0

    def copy(self, src):
        dst = torch.empty_like(src)
        self.queue.append((src, dst))
        return dst

    def run(self, upto=None):
        upto = len(self.queue) if upto is None else upto
        while self.done < upto:
            src, dst = self.queue[self.done]
            dst.copy_(src)
            self.done += 1


class FakeEvent:
    def __init__(self, dma):
        self.dma, self.mark = dma, None

    def record(self):
        self.mark = len(self.dma.queue)      # the copies queued before it

    def query(self):
        return self.dma.done >= self.mark

    def synchronize(self):
        self.dma.run(self.mark)


def _batch(i):
    return (array.array("q", range(100 * i, 100 * i + 3 + i)), array.array("f", [i + 0.25] * (2 + i)),
            array.array("i", [-i] * 5), array.array("q"))


def _check(got, arrays):
    assert [t.dtype for t in got] == [torch.int64, torch.float32, torch.int32, torch.int64]
    for t, a in zip(got, arrays):
        assert t.cpu().tolist() == list(a)


def test_cpu_views_the_arrays_without_a_copy():
    up = HostToDevice("cpu")
    arrays = _batch(2)
    got = up.send(*arrays)
    _check(got, arrays)
    assert up.num_copies == 0
    arrays[0][0] = 77                             # a view, not a copy
    assert got[0][0].item() == 77


def test_a_buffer_waits_for_its_last_copy_before_it_is_rewritten():
    """Six sends through two buffers while the simulated DMA runs nothing on its own: each
    reuse must wait for the copy still reading the buffer, or an early send would come
    back holding a later send's data."""
    dma = FakeDMA()
    up = HostToDevice("cpu", 2, staged=True, copy=dma.copy, make_event=lambda: FakeEvent(dma))
    sent = [(_batch(i), up.send(*_batch(i))) for i in range(6)]
    dma.run()
    for arrays, got in sent:
        _check(got, arrays)
    assert up.num_copies == 6 and up.num_waits == 4


def test_a_growing_buffer_is_replaced_only_after_its_copy():
    dma = FakeDMA()
    up = HostToDevice("cpu", 1, staged=True, copy=dma.copy, make_event=lambda: FakeEvent(dma))
    small = (array.array("q", [5, 6]),)
    got_small = up.send(*small)
    big = (array.array("q", range(2000)),)        # 16 kB: more than the 4 kB first buffer
    got_big = up.send(*big)
    dma.run()
    assert got_small[0].tolist() == [5, 6] and got_big[0].tolist() == list(range(2000))
    assert up.num_waits == 1


def test_offsets_are_aligned_and_empty_arrays_allowed():
    up = HostToDevice("cpu", staged=True, copy=lambda s: s.clone(), make_event=lambda: FakeEvent(FakeDMA()))
    arrays = (array.array("f", [1.5]), array.array("q", [2 ** 40]), array.array("q"), array.array("d", [0.1]))
    got = up.send(*arrays)
    assert [t.tolist() for t in got] == [[1.5], [2 ** 40], [], [0.1]]
    assert (up.send()) == []


def test_bad_typecode_is_named():
    with pytest.raises(ValueError, match="typecode 'b'"):
        HostToDevice("cpu").send(array.array("b", [1]))
    with pytest.raises(ValueError, match="num_buffers"):
        HostToDevice("cpu", 0)


@cuda_only
def test_pinned_buffers_survive_copies_queued_behind_a_busy_gpu():
    """Copies queued behind ~50 ms of GPU sleep: the ring must wait before rewriting a
    buffer whose copy has not run yet; each result is read (cloned) after its copy."""
    up = HostToDevice("cuda", 2)
    torch.cuda._sleep(100_000_000)
    sent = []
    for i in range(12):
        arrays = _batch(i)
        sent.append((arrays, [t.clone() for t in up.send(*arrays)]))
    torch.cuda.synchronize()
    for arrays, got in sent:
        _check(got, arrays)
    assert up.num_copies == 12 and up.num_waits >= 1


@cuda_only
def test_sampling_knobs_on_cuda_equal_the_cpu():
    """The knob state on CUDA (every copy staged and queued) gives the CPU's logits bit for
    bit over steps that grow rows, switch masks and outgrow the working copy."""
    from engine.core.sequence import Sequence
    from engine.sampling.knobs import KnobState, apply_knobs, restore
    from engine.sampling_params import SamplingParams
    V, eos = 64, 2
    knobs = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25,
                           min_tokens=2, stop_token_ids=[9], logit_bias={5: 1.5, 0: -2.0})
    knobs.bad_words_token_ids = [[7], [11, 12]]
    mk = lambda: [Sequence([1, 5, 5, 8], "a", knobs), Sequence(list(range(2, 34)), "c",  # noqa: E731
                                                               SamplingParams(frequency_penalty=0.5))]
    runs = {dev: (mk(), KnobState(torch.device(dev))) for dev in ("cpu", "cuda")}
    gen = torch.Generator().manual_seed(0)
    for step, new in enumerate([[11, 40], [12, 41], [5, 0], [9, 42], [3, 43]]):
        raw = torch.randn(2, V, generator=gen) * 2
        out = {}
        for dev, (seqs, state) in runs.items():
            logits = raw.to(dev)
            undo = apply_knobs(logits, seqs, [0, 1], state, eos, keep_raw=True)
            out[dev] = logits.cpu().clone()
            restore(logits, undo)
            assert torch.equal(logits.cpu(), raw)
            for s, t in zip(seqs, new):
                s.token_ids.append(t)
        assert torch.equal(out["cpu"], out["cuda"]), step
    assert runs["cuda"][1].upload.num_copies >= 5


def _mixed_batch():
    from engine.core.sequence import Sequence
    from engine.sampling_params import SamplingParams
    params = [SamplingParams(temperature=0, repetition_penalty=1.2, logit_bias={3: 2.0}, min_tokens=1, logprobs=2),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=4, presence_penalty=0.3),
              SamplingParams(temperature=1.0, logprob_token_ids=[5, 6], frequency_penalty=0.2)]
    return [Sequence([1, 7, 8, i], f"r{i}", p) for i, p in enumerate(params)]


def test_the_sampler_staged_gives_the_unstaged_tokens_and_logprobs():
    """Every per-step tensor of a mixed batch (greedy and sampled rows, knobs, filters,
    log-probs) through the packed staging path as on CUDA (a clone for the copy): the same
    tokens and log-prob entries as the direct path."""
    from engine.sampling.sampler import Sampler
    from kernels import ops as kernel_ops
    ops = kernel_ops.get_ops("torch", "cpu")
    runs = []
    for staged in (False, True):
        sampler = Sampler(torch.device("cpu"), 0)
        sampler.eos_token_id = 2
        if staged:
            sampler.upload = HostToDevice("cpu", staged=True, copy=lambda src: src.clone(),
                                          make_event=lambda: FakeEvent(FakeDMA()))
        seqs, gen, steps = _mixed_batch(), torch.Generator().manual_seed(0), []
        for _ in range(4):
            tokens, lps, failed = sampler(torch.randn(len(seqs), 512, generator=gen) * 3, seqs, ops)
            steps.append((tokens, [(lp.sampled_logprob, lp.entries) for lp in lps], failed))
            for s, t in zip(seqs, tokens):
                s.token_ids.append(t)
        runs.append((steps, sampler.upload.num_copies))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == 0 and runs[1][1] >= 4 * 5


@cuda_only
def test_a_sampling_step_queues_without_synchronizing():
    """Sampler.launch on CUDA for a batch that mixes greedy and sampled rows, every knob,
    top-k/top-p/min-p and log-probs: after a warm-up step, nothing in it synchronizes
    with the device (torch's sync debug mode raises on any synchronizing call); only
    ``wait()`` reads back."""
    from engine.sampling.sampler import Sampler
    from kernels import ops as kernel_ops
    ops = kernel_ops.get_ops("auto", "cuda")
    V = 512
    seqs = _mixed_batch()
    sampler = Sampler(torch.device("cuda"), 0)
    sampler.eos_token_id = 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(3):
        logits = torch.randn(len(seqs), V, device="cuda", generator=gen)
        if step:
            torch.cuda.set_sync_debug_mode("error")
        try:
            pending = sampler.launch(logits, seqs, ops)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tokens, lps, failed = pending.wait()
        assert not failed and all(0 <= t < V for t in tokens)
        for s, t in zip(seqs, tokens):
            s.token_ids.append(t)
