"""Per-request bookkeeping after sampling: stop checks, text, log-probs.

One ``RequestState`` wraps a ``Sequence`` with what the user sees: the
incremental text, stop-string handling and the ``RequestOutput`` it builds.
"""
from __future__ import annotations

import copy

from engine.core.sequence import Sequence
from engine.outputs import CompletionOutput, Logprob, RequestOutput, StepLogprobs


class RequestState:
    def __init__(self, seq: Sequence, prompt: str | None, tokenizer, eos_token_id: int | None,
                 max_model_len: int):
        self.seq = seq
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        self.params = seq.params
        self.text = ""
        self.stop_reason = None
        self.error: str | None = None      # set when the request failed (finish_reason "error")
        self._decoded = 0                  # generated tokens fed to the detokenizer
        self._final_token_is_stop = False  # last token is EOS / a stop id (not text)
        self.logprobs = [] if self.params.wants_logprobs else None
        self.group = None                  # engine/core/n_samples.py's SampleGroup when n > 1
        self.prompt_logprobs = None        # engine/sampling/prompt_logprobs.py fills it
        self.num_drafted = self.num_accepted = 0     # speculative decoding (engine/spec_decode/speculator.py)
        self.num_forks = 0                 # children made by LLM.fork (their ids count on)
        self._prompt_ids = seq.prompt_token_ids
        # append_token's per-token checks, precomputed (it runs for every token).
        p = self.params
        self._eos = None if p.ignore_eos else eos_token_id
        self._stop_ids = frozenset(p.stop_token_ids or ())
        self._max_len = max_model_len if p.max_tokens is None else min(
            max_model_len, seq.num_prompt_tokens + p.max_tokens)
        self.detok = None
        if tokenizer is not None:
            from engine.tokenizer.detokenizer import make_detokenizer
            # Decoded as a continuation of the prompt (as vLLM does), so a leading
            # space of the first generated word is kept.
            self.detok = make_detokenizer(tokenizer, seq.prompt_token_ids,
                                          skip_special_tokens=self.params.skip_special_tokens)

    def fork(self, child: Sequence, new_params: bool) -> "RequestState":
        """The state of ``child``, a copy of this request's sequence (engine/core/forking.py):
        same text, log-probs and detokenizer state. With ``new_params`` (the child's
        own), its ``max_tokens`` counts from the fork point; a child asking for log-probs
        its parent did not record has empty dicts for the tokens before the fork."""
        from engine.core.forking import clone_detokenizer
        c = copy.copy(self)
        c.seq, c.params = child, child.params
        c.group, c.num_forks = None, 0        # a fork of one of n samples is a request of its own
        c.detok = clone_detokenizer(self.detok, self.tokenizer)
        if c.params.wants_logprobs:
            c.logprobs = list(self.logprobs) if self.logprobs is not None else [{}] * child.num_generated_tokens
        else:
            c.logprobs = None
        if new_params:
            p = c.params
            c._eos = None if p.ignore_eos else self.eos_token_id
            c._stop_ids = frozenset(p.stop_token_ids or ())
            c._max_len = self.max_model_len if p.max_tokens is None else min(
                self.max_model_len, len(child) + p.max_tokens)
        return c

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        """The request's prompt as it was submitted (before any sampled token)."""
        return self._prompt_ids

    @property
    def max_len(self) -> int:
        """The sequence length at which the request stops (``max_tokens`` or
        ``max_model_len``, whichever comes first)."""
        return self._max_len

    def append(self, token_id: int, lp: StepLogprobs) -> str | None:
        """Records one sampled token and detokenizes; returns a finish reason or None."""
        reason = self.append_token(token_id, lp)
        return self.detokenize() or reason

    def append_token(self, token_id: int, lp: StepLogprobs) -> str | None:
        """The cheap part: token, log-probs, EOS / stop ids / length checks.

        Text (and stop strings) follow in ``detokenize``, which the engine may
        run later, overlapped with the next step on the GPU.
        """
        seq = self.seq
        seq.token_ids.append(token_id)
        seq.cumulative_logprob += lp.sampled_logprob
        if self.logprobs is not None:
            self.logprobs.append({
                t: Logprob(v, r, self._decode_one(t)) for t, (v, r) in (lp.entries or {}).items()})
        if token_id == self._eos:
            self.stop_reason = None
            self._final_token_is_stop = True
            return "stop"
        if token_id in self._stop_ids:
            self.stop_reason = token_id
            self._final_token_is_stop = True
            return "stop"
        if len(seq.token_ids) >= self._max_len:       # max_tokens or max_model_len
            return "length"
        return None

    def detokenize(self) -> str | None:
        """Feeds every generated token not yet decoded to the detokenizer (a
        final EOS / stop id is not part of the text); returns "stop" when a
        stop string matched, after cutting the text off. The engine appends no
        token to a request between its deferral and this call."""
        if self.detok is None:
            return None
        out = self.seq.output_token_ids
        end = len(out) - (1 if self._final_token_is_stop else 0)
        while self._decoded < end:
            before = len(self.text)
            self.detok.add(out[self._decoded])
            self._decoded += 1
            self.text = self.detok.text
            if self.params.stop_list and self._check_stop_strings(before):
                return "stop"
        return None

    def _check_stop_strings(self, before: int) -> bool:
        """A new match must end in the text added since length ``before`` (however long
        that token's text is): search from the earliest start such a match can have."""
        start = max(0, before - max(len(s) for s in self.params.stop_list) + 1)
        hits = [(self.text.find(s, start), s) for s in self.params.stop_list]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[:i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        self.stop_reason = s
        return True

    def _decode_one(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def visible_text(self) -> str:
        """The text a caller may see now: while the request runs, a tail that could still
        be the start of a stop string is held back (the final text would cut it off), so
        every text a caller sees is a prefix of the final one."""
        text = self.text
        # With include_stop_str_in_output a match is kept and cut after its end, which
        # lies in text not yet seen: everything visible now stays, so nothing is held.
        if not self.params.stop_list or self.seq.is_finished or self.params.include_stop_str_in_output:
            return text
        hold = 0
        for s in self.params.stop_list:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[:len(text) - hold] if hold else text

    def completion(self, index: int = 0) -> CompletionOutput:
        seq = self.seq
        # step() builds one of these per running request per step: one slice for the
        # generated ids (the prompt's ids are one list shared by all its outputs).
        finish = seq.finish_reason if seq.is_finished else None
        return CompletionOutput(index, self.visible_text(), seq.token_ids[seq.num_prompt_tokens:],
                                seq.cumulative_logprob,
                                list(self.logprobs) if self.logprobs is not None else None,
                                finish, self.stop_reason)

    def output(self) -> RequestOutput:
        """This request's output; for one sample of several (n > 1), the whole group's."""
        if self.group is not None:
            return self.group.output()
        comp = self.completion()
        return RequestOutput(self.seq.request_id, self.prompt, self._prompt_ids, [comp],
                             comp.finish_reason is not None, self.error, self.prompt_logprobs,
                             self.num_drafted, self.num_accepted)

