"""Continuous-batching scheduler. Plain Python, no torch.

Each ``schedule()`` call picks one step's work:

* **Prefill first.** Waiting sequences (new, or preempted ones coming back)
  are admitted in FIFO order while there is room: at most ``max_num_seqs``
  running, at most ``max_num_batched_tokens`` new tokens in the step (the
  first prefill of a step is always admitted, so a long prompt cannot starve),
  and KV blocks for the whole sequence. If any were admitted, the step is a
  prefill of those sequences only.
* **Otherwise decode** every running sequence by one token. When the pool has
  no block for a sequence's next token, the most recently admitted running
  sequence is preempted: its blocks are freed and it goes back to the front of
  the queue, to be recomputed (prefix caching usually makes that cheap) and
  resumed with the tokens it had. Nothing is lost or duplicated. Before anything
  running is preempted (or a waiting request refused), the blocks of finished requests
  held for a later ``extend`` (``SamplingParams.hold``) are dropped, oldest first. (When the pool
  has a block for every sequence that needs one, ``BlockManager.append_slots``
  does the whole step in one pass: no preemption can happen.)
"""
from __future__ import annotations

from collections import deque

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence, SequenceStatus


class SchedulerOutput:
    """One step's work, from the scheduler to the executor (engine/worker/executor.py).

    ``seqs``: the sequences to prefill (positions ``num_cached_tokens ... len - 1``, their
    KV slots allocated) or to decode (position ``len - 1`` each). Empty when idle. The
    engine core plans the rest before the step runs:

    * ``drafts``: for a decode, sequence index -> drafted tokens whose KV slots are
      reserved; any makes the step a *verify* step (engine/spec_decode/speculator.py);
    * ``sample_seqs`` / ``sample_rows``: for a prefill, the sequences that sample this step
      and the row of ``seqs``' logits each samples from (``n > 1`` requests' samples repeat
      their parent's row: engine/core/n_samples.py); None: ``seqs`` one row each;
    * ``block_copies``: ``(src, dst)`` KV block copies to make right after the forward
      (the samples' private copy of a partial prompt block, written by this forward).
    """

    # A plain slotted class, built once per step: a dataclass with default factories cost
    # ~1 us more per step (bench_host_step, batch 1: 64 us a step in all).
    __slots__ = ("seqs", "is_prefill", "drafts", "sample_seqs", "sample_rows", "block_copies")

    def __init__(self, seqs: list[Sequence], is_prefill: bool):
        self.seqs, self.is_prefill = seqs, is_prefill
        self.drafts: dict[int, list[int]] = {}
        self.sample_seqs: list[Sequence] | None = None
        self.sample_rows: list[int] | None = None
        self.block_copies: list[tuple[int, int]] = []

    def __repr__(self) -> str:
        return (f"SchedulerOutput({'prefill' if self.is_prefill else 'decode'} of {len(self.seqs)}, "
                f"drafts={len(self.drafts)}, samples={self.sample_rows})")

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that sample a token this step, in row order."""
        return self.seqs if self.sample_seqs is None else self.sample_seqs


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Finished requests that keep their KV blocks (SamplingParams.hold), oldest first;
        # their blocks are dropped under pressure before anything running is preempted.
        self.held: dict[int, Sequence] = {}
        self.num_preemptions = 0
        self.num_held_dropped = 0
        self.num_prefill_tokens = 0          # positions computed by prefill steps

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """The next step's sequences (see ``SchedulerOutput``; none when idle)."""
        bm = self.block_manager
        admitted: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # New tokens this seq would compute; cache hits are a bonus, not counted.
            cost = len(seq)
            if admitted and num_tokens + cost > self.max_num_batched_tokens:
                break
            # a sequence that needs log-probs of given positions gets them computed
            cap = None if seq.logprobs_from is None else seq.logprobs_from - 1
            if seq.block_table:             # a held request extended: its blocks are kept
                if not self._make_room(lambda: bm.can_extend(seq, cap)):
                    break
                bm.extend(seq, cap)
            else:
                if not self._make_room(lambda: bm.can_allocate(seq, cap)):
                    break
                bm.allocate(seq, cap)
            num_tokens += len(seq) - seq.num_cached_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        if admitted:
            self.num_prefill_tokens += num_tokens
            return SchedulerOutput(admitted, True)

        if bm.append_slots(self.running):           # the pool covers every new block
            return SchedulerOutput(list(self.running), False)
        while self.held:                            # held blocks go before anything running
            self._drop_oldest_held()
            if bm.append_slots(self.running):
                return SchedulerOutput(list(self.running), False)
        scheduled: list[Sequence] = []
        queue = self.running
        self.running = []
        while queue:
            seq = queue.pop(0)
            while not bm.can_append(seq):
                if queue:
                    self._preempt(queue.pop())      # youngest first
                else:
                    self._preempt(seq)
                    break
            else:
                bm.append_slot(seq)
                scheduled.append(seq)
        self.running = list(scheduled)   # finish() edits running while callers iterate
        return SchedulerOutput(scheduled, False)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def requeue(self, seqs: list[Sequence]) -> None:
        """Puts a batch whose step failed back at the front of the queue, blocks
        freed, to be recomputed: nothing is lost."""
        for seq in reversed(seqs):
            if seq in self.running:
                self.running.remove(seq)
            self._preempt(seq)
        self.num_preemptions -= len(seqs)
        # Blocks registered in the prefix cache this step were never written:
        # drop every unreferenced cached block so no later prompt can hit them.
        self.block_manager.reset_prefix_cache()

    def finish(self, seq: Sequence, reason: str, hold: bool = False) -> None:
        """Marks ``seq`` finished and frees its blocks (also for aborts), or with
        ``hold`` keeps them (``SamplingParams.hold``)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_pending = 0          # a step queued past its last token (async scheduling) is discarded
        if hold and seq.block_table:
            self.held[seq.seq_id] = seq
        else:
            self.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def hold(self, seq: Sequence) -> None:
        """Registers a finished sequence that already holds blocks (a fork of a held one)."""
        if seq.block_table:
            self.held[seq.seq_id] = seq

    def release(self, seq: Sequence) -> None:
        """Frees a (held or finishing) sequence's blocks."""
        self.held.pop(seq.seq_id, None)
        self.block_manager.free(seq)

    def resume(self, seq: Sequence) -> None:
        """Queues a held sequence that was extended; it keeps its blocks (if they were not
        dropped) and its next prefill computes only what they do not cover."""
        self.held.pop(seq.seq_id, None)
        self.add(seq)

    def _drop_oldest_held(self) -> None:
        seq = next(iter(self.held.values()))
        self.release(seq)
        self.num_held_dropped += 1

    def _make_room(self, fits) -> bool:
        """Whether ``fits()`` holds, after dropping held blocks (oldest first) if needed."""
        while not fits():
            if not self.held:
                return False
            self._drop_oldest_held()
        return True
