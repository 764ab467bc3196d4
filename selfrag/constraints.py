"""Reflection-token grammar as a batched logits processor for the engine.

``ReflectionConstraint`` masks, at every decoding step, each token the Self-RAG
output grammar does not allow in the sequence's current state.  Attach it with
``SamplingParams(logits_processors=[proc])``; leaving it off is unconstrained
decoding.  Log-probs the engine reports are of the raw logits (taken before
processors run), so masking never changes a reported or scored log-prob; it
only changes which token is picked.

The grammar (Self-RAG training output format, as the pipeline uses it)::

    [No Retrieval] text [Utility:k] </s>
    [Retrieval]<paragraph>passage</paragraph>            (the system inserts this)
        [Relevant|Irrelevant] text [support]
        ( [Continue to Use Evidence] text [support] )*
        ( [Retrieval] ... again | [Utility:k] </s> )

States and what each allows (``TEXT`` = every id except the 15 reflection /
markup tokens, ``<pad>`` and ``</s>``; ``RET`` = ``[Retrieval]`` unless the
mode is "never")::

    state            allowed next tokens                       -> next state
    ---------------  ----------------------------------------  ------------------
    START            adaptive: [Retrieval], [No Retrieval]
                     always: [Retrieval]; never: [No Retrieval]
    AWAIT_PARAGRAPH  <paragraph>                                -> IN_PARAGRAPH
    IN_PARAGRAPH     TEXT (stay), </paragraph>                  -> AFTER_PARAGRAPH
    AFTER_PARAGRAPH  [Relevant], [Irrelevant]                   -> EVIDENCE_TEXT
    EVIDENCE_TEXT    TEXT (stay), </s>, [Fully supported],
                     [Partially supported], [No support / ...]  -> AFTER_SUPPORT
    FREE_TEXT        TEXT (stay), </s>, [Utility:1..5]          -> AFTER_UTILITY
    AFTER_SUPPORT    [Utility:1..5], RET, [Continue to Use Evidence]
    AFTER_UTILITY    </s>                                       -> DONE
    DONE             </s> (only reached with ignore_eos)

The transition function is the same in every mode and total (it also covers
histories the mask would never have let through): each control token sends
the machine to a fixed state, whatever the state before, and every other
token (text, ``<pad>``) leaves the state unchanged::

    [No Retrieval] -> FREE_TEXT          [Retrieval]      -> AWAIT_PARAGRAPH
    <paragraph>    -> IN_PARAGRAPH       </paragraph>     -> AFTER_PARAGRAPH
    [Relevant], [Irrelevant], [Continue to Use Evidence]  -> EVIDENCE_TEXT
    support tokens -> AFTER_SUPPORT      [Utility:k]      -> AFTER_UTILITY
    </s>           -> DONE

So a sequence's state is fixed by its last control token (its start state if
it has none yet), which is what makes incremental tracking cheap and exact.
The modes only change the masks: "always" forces ``[Retrieval]`` at START,
"never" masks ``[Retrieval]`` everywhere, "adaptive" lets the model decide.

Why ``</s>`` is allowed inside text: the model may legitimately stop before a
reflection token (and the released code scores such outputs); masking ``</s>``
would force it to invent a critique it did not mean, or run on to
``max_tokens``.  ``[Retrieval]`` after a segment normally makes the pipeline
stop (``stop_token_ids``) and insert a passage itself; AWAIT_PARAGRAPH and
IN_PARAGRAPH only matter when it does not.

Start state per request: ``begin(request_id, state)`` before queueing (with
``start_state_for_prompt(prompt_ids)`` to read it off the prompt), else the
constructor's ``default_state``.  ``forget(request_id)`` drops a request's
bookkeeping; it is dropped automatically once the output reaches a state
that forces ``</s>`` (AFTER_UTILITY, DONE).  Requests ending otherwise (length, ``</s>`` inside
text, abort) keep a tiny entry until ``forget`` or ``reset``.

Cost per call: O(new tokens) host work per row (the engine's ``output_token_ids``
lists; the consumed length and the state are cached per request) and one
``masked_fill_`` with a precomputed [num_states, V] boolean table that lives on
the logits' device.  No host sync, no loop over the vocabulary.
"""

from __future__ import annotations

import enum

import torch

MODES = ("adaptive", "always", "never")


class State(enum.IntEnum):
    """Grammar states; the value is the row of the mask table."""

    START = 0
    AWAIT_PARAGRAPH = 1
    IN_PARAGRAPH = 2
    AFTER_PARAGRAPH = 3
    EVIDENCE_TEXT = 4
    FREE_TEXT = 5
    AFTER_SUPPORT = 6
    AFTER_UTILITY = 7
    DONE = 8


# States in which the only allowed token is </s>: the request ends next step.
_FINAL = (State.AFTER_UTILITY, State.DONE)


class ReflectionConstraint:
    """Per-sequence Self-RAG grammar, applied as ``proc(logits, request_ids, output_token_ids)``.

    vocab: a ``selfrag.vocab.ReflectionVocab`` (or any object with its id attributes).
    vocab_size: the logits' width V (may exceed the tokenizer's; extra ids count as text).
    mode: "adaptive", "always" or "never" (retrieval at START; see module docstring).
    default_state: start state of requests never passed to ``begin``.
    """

    def __init__(self, vocab, vocab_size: int, mode: str = "adaptive",
                 default_state: State = State.START):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        self.vocab, self.vocab_size, self.mode = vocab, vocab_size, mode
        self.default_state = State(default_state)
        v = vocab
        self._targets: dict[int, State] = {
            v.no_retrieval: State.FREE_TEXT, v.retrieval: State.AWAIT_PARAGRAPH,
            v.paragraph_open: State.IN_PARAGRAPH, v.paragraph_close: State.AFTER_PARAGRAPH,
            v.relevant: State.EVIDENCE_TEXT, v.irrelevant: State.EVIDENCE_TEXT,
            v.continue_evidence: State.EVIDENCE_TEXT,
            **{t: State.AFTER_SUPPORT for t in (v.fully, v.partially, v.no_support)},
            **{t: State.AFTER_UTILITY for t in v.utility},
            v.eos: State.DONE,
        }
        special = [v.no_retrieval, v.retrieval, v.continue_evidence, v.relevant, v.irrelevant,
                   v.paragraph_open, v.paragraph_close, v.fully, v.partially, v.no_support,
                   *v.utility, v.pad, v.eos]
        if len(v.utility) != 5 or len(set(special)) != len(special):
            raise ValueError("vocab must hold 5 utility ids and 17 distinct reflection/markup/pad/eos ids")
        bad = [t for t in special if not (isinstance(t, int) and 0 <= t < vocab_size)]
        if bad:
            raise ValueError(f"token ids {bad} are outside the vocabulary [0, {vocab_size})")
        self._special = special
        self._allowed_cpu = self._build_allowed()
        self._tables: dict = {}     # device -> forbidden [S, V]; ("next", device) -> next_state [S, V]
        self._start: dict[str, State] = {}                    # from begin()
        # rid -> (ids consumed, state, whether a control token of the output set it)
        self._track: dict[str, tuple[int, State, bool]] = {}

    # ------------------------------------------------------------------ grammar
    def allowed_ids(self, state: State) -> list[int]:
        """The non-text ids allowed in ``state`` (text states also allow all TEXT ids)."""
        v, s = self.vocab, State(state)
        ret = [] if self.mode == "never" else [v.retrieval]
        return {
            State.START: {"adaptive": [v.retrieval, v.no_retrieval], "always": [v.retrieval],
                          "never": [v.no_retrieval]}[self.mode],
            State.AWAIT_PARAGRAPH: [v.paragraph_open],
            State.IN_PARAGRAPH: [v.paragraph_close],
            State.AFTER_PARAGRAPH: [v.relevant, v.irrelevant],
            State.EVIDENCE_TEXT: [v.eos, v.fully, v.partially, v.no_support],
            State.FREE_TEXT: [v.eos, *v.utility],
            State.AFTER_SUPPORT: [*v.utility, *ret, v.continue_evidence],
            State.AFTER_UTILITY: [v.eos],
            State.DONE: [v.eos],
        }[s]

    @staticmethod
    def allows_text(state: State) -> bool:
        """Whether ``state`` allows ordinary vocabulary."""
        return State(state) in (State.IN_PARAGRAPH, State.EVIDENCE_TEXT, State.FREE_TEXT)

    def _build_allowed(self) -> torch.Tensor:
        """Boolean [num_states, V] table of allowed tokens, on the CPU."""
        table = torch.zeros(len(State), self.vocab_size, dtype=torch.bool)
        special = torch.tensor(self._special)
        for s in State:
            if self.allows_text(s):
                table[s].fill_(True)
                table[s, special] = False
            table[s, torch.tensor(self.allowed_ids(s), dtype=torch.long)] = True
        return table

    def allowed(self, state: State, device=None) -> torch.Tensor:
        """Boolean mask [V] of the tokens allowed in ``state``."""
        return self._allowed_cpu[State(state)].to(device or "cpu")

    def next_state(self, state: State, token_id: int) -> State:
        """One transition (total: control tokens jump, all else stays)."""
        return self._targets.get(token_id, State(state))

    def state_after(self, token_ids, start: State = State.START) -> State:
        """State after ``token_ids`` from ``start``: set by the last control token."""
        targets = self._targets
        for i in range(len(token_ids) - 1, -1, -1):
            s = targets.get(token_ids[i])
            if s is not None:
                return s
        return State(start)

    def forced_token(self, request_id: str, output_token_ids) -> int | None:
        """The one token the grammar allows after ``output_token_ids`` (``<paragraph>``
        after ``[Retrieval]``, ``</s>`` after a utility token, ...), or None. For
        speculative decoding's grammar drafts; reads no tracking state."""
        start = self._start.get(str(request_id), self.default_state)
        state = self.state_after(output_token_ids, start)
        if self.allows_text(state):
            return None
        ids = self.allowed_ids(state)
        return ids[0] if len(ids) == 1 else None

    def start_state_for_prompt(self, prompt_token_ids) -> State:
        """Start state implied by a prompt's last id.

        ``</paragraph>`` -> AFTER_PARAGRAPH, ``[No Retrieval]`` -> FREE_TEXT,
        ``[Continue to Use Evidence]`` -> EVIDENCE_TEXT, anything else -> START.
        """
        if not prompt_token_ids:
            return State.START
        v, last = self.vocab, prompt_token_ids[-1]
        return {v.paragraph_close: State.AFTER_PARAGRAPH, v.no_retrieval: State.FREE_TEXT,
                v.continue_evidence: State.EVIDENCE_TEXT}.get(last, State.START)

    def mask_logits(self, logits: torch.Tensor, state: State) -> torch.Tensor:
        """Out-of-place: ``logits`` [..., V] with the tokens ``state`` forbids set to -inf."""
        return logits.masked_fill(~self.allowed(state, logits.device), float("-inf"))

    # ------------------------------------------------------------- per request
    def begin(self, request_id: str, state: State = State.START) -> None:
        """Register a request's start state (call before queueing it)."""
        rid = str(request_id)
        self._start[rid] = State(state)
        self._track.pop(rid, None)

    def forget(self, request_id: str) -> None:
        """Drop all bookkeeping of a request (no error if unknown)."""
        rid = str(request_id)
        self._start.pop(rid, None)
        self._track.pop(rid, None)

    def fork(self, parent_id: str, child_ids) -> None:
        """``LLM.fork``'s hook: each child starts from the parent's start state and
        tracked position, then advances on its own."""
        pid = str(parent_id)
        for cid in child_ids:
            cid = str(cid)
            if pid in self._start:
                self._start[cid] = self._start[pid]
            if pid in self._track:
                self._track[cid] = self._track[pid]

    def reset(self) -> None:
        """Forget every request."""
        self._start.clear()
        self._track.clear()

    def state_of(self, request_id: str) -> State | None:
        """The tracked state of a request (as of the last call), or None."""
        entry = self._track.get(str(request_id))
        return None if entry is None else entry[1]

    @property
    def num_tracked(self) -> int:
        """Requests with bookkeeping (registered or being tracked)."""
        return len(self._start.keys() | self._track.keys())

    def _advance(self, rid: str, out: list[int]) -> State:
        entry = self._track.get(rid)
        if entry is None or entry[0] > len(out):      # new request (or a reused id)
            consumed, state, seen = 0, self._start.get(rid, self.default_state), False
        else:
            consumed, state, seen = entry
        targets = self._targets
        for i in range(len(out) - 1, consumed - 1, -1):   # last new control token wins
            s = targets.get(out[i])
            if s is not None:
                state, seen = s, True
                break
        if seen and state in _FINAL:
            # Only </s> is allowed, so the request ends now.  Its output holds a
            # control token, so a replay (ignore_eos) needs no start state.
            self.forget(rid)
        else:
            self._track[rid] = (len(out), state, seen)
        return state

    # ------------------------------------------------- on the device (the engine's hook)
    def grammar_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(forbidden [S, V] bool, next_state [S, V] int64) on ``device``: the engine's
        device-grammar hook (engine/sampling/logits_processors.py), with which it masks a
        row whose last token it has not read back yet (async scheduling) as a call would."""
        device = torch.device(device)
        key = ("next", device)
        nxt = self._tables.get(key)
        if nxt is None:
            nxt = torch.arange(len(State)).unsqueeze(1).repeat(1, self.vocab_size)   # text: stay
            for tok, target in self._targets.items():
                nxt[:, tok] = int(target)                                           # control: jump
            nxt = self._tables[key] = nxt.to(device)
        return self._table(device), nxt

    def grammar_state(self, request_id: str, output_token_ids) -> int:
        """The state after ``output_token_ids`` (the start state if they hold no control
        token), tracked incrementally as a call does: O(new tokens) a step."""
        return int(self._advance(str(request_id), output_token_ids))

    def _table(self, device: torch.device) -> torch.Tensor:
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = (~self._allowed_cpu).to(device)
        return table

    def __call__(self, logits: torch.Tensor, request_ids, output_token_ids) -> torch.Tensor:
        """Masks each row in place by its request's state; returns ``logits``."""
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [n, {self.vocab_size}], got {tuple(logits.shape)}")
        if not (len(request_ids) == len(output_token_ids) == logits.shape[0]):
            raise ValueError(f"{logits.shape[0]} logits rows, {len(request_ids)} request ids and "
                             f"{len(output_token_ids)} output lists must match")
        states = [self._advance(str(r), out) for r, out in zip(request_ids, output_token_ids)]
        table = self._table(logits.device)
        if len(set(states)) <= 1:
            if states:
                logits.masked_fill_(table[states[0]], float("-inf"))
        else:
            idx = torch.tensor(states, dtype=torch.long).to(logits.device, non_blocking=True)
            logits.masked_fill_(table[idx], float("-inf"))
        return logits
