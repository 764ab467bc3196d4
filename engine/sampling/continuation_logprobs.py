"""``LLM.score``: the log-probability of given continuations of one prompt, from one
prefill of the prompt and one of each continuation, which share the prompt's KV.

The prompt minus its last token is prefilled once and held (``max_tokens=0,
hold=True``), forked once per extra continuation, and each copy is extended with the
prompt's last token plus its continuation, asking for the extension's log-probs
(engine/sampling/prompt_logprobs.py): the logits at the prompt's last position score the
continuation's first token. Nothing else is generated. A continuation is token ids, or
text tokenized on its own without special tokens (give ids where the tokenization at
the boundary matters).
"""
from __future__ import annotations

from engine import request_validation
from engine.errors import InvalidRequestError, RequestFailedError
from engine.sampling_params import SamplingParams, is_int


def score(llm, prompt, continuations, per_token: bool = False) -> list:
    llm.check_alive()
    vocab = llm.config.vocab_size
    _, prompt_ids = request_validation.prompt_ids(prompt, llm.tokenizer, vocab, llm.max_model_len)
    if isinstance(continuations, (str, dict)) or not hasattr(continuations, "__iter__"):
        raise InvalidRequestError("score: continuations must be a list (of str or of token-id lists)")
    conts = [_ids(llm, c, k) for k, c in enumerate(continuations)]
    if not conts:
        return []
    P = len(prompt_ids)
    for k, c in enumerate(conts):
        if P + len(c) > llm.max_model_len:
            raise InvalidRequestError(f"score: prompt ({P}) + continuation {k} ({len(c)} tokens) exceed "
                                      f"max_model_len={llm.max_model_len}")
    scored = SamplingParams(max_tokens=0, prompt_logprobs=0)
    if P >= 2:
        root = llm.add_request({"prompt_token_ids": prompt_ids[:-1]}, SamplingParams(max_tokens=0, hold=True))
        wait_all(llm, [root])
        ids = [root] + (llm.fork(root, n=len(conts) - 1) if len(conts) > 1 else [])
        for rid, c in zip(ids, conts):
            llm.extend(rid, [prompt_ids[-1]] + c, scored)
    else:
        ids = [llm.add_request({"prompt_token_ids": prompt_ids + c}, scored) for c in conts]
    finals = wait_all(llm, ids)
    values = [[entry[t].logprob for entry, t in zip(finals[rid].prompt_logprobs[P:], c)]
              for rid, c in zip(ids, conts)]
    return values if per_token else [sum(v) for v in values]


def _ids(llm, c, k: int) -> list[int]:
    if isinstance(c, str):
        if llm.tokenizer is None:
            raise InvalidRequestError("score: text continuations need a tokenizer; give token ids")
        ids = llm.tokenizer.encode(c, add_special_tokens=False)
    elif hasattr(c, "__iter__") and not isinstance(c, (bytes, dict)):
        ids = list(c)
    else:
        raise InvalidRequestError(f"score: continuation {k} must be a str or a list of token ids")
    if not ids:
        raise InvalidRequestError(f"score: continuation {k} is empty")
    if not all(is_int(t) and 0 <= t < llm.config.vocab_size for t in ids):
        raise InvalidRequestError(f"score: continuation {k} has ids outside [0, {llm.config.vocab_size})")
    return [int(t) for t in ids]


def wait_all(llm, ids: list[str]) -> dict:
    """``llm.wait(ids)``, failing on a failed request and aborting the rest on any error."""
    try:
        finals = llm.wait(ids)
        for out in finals.values():
            if out.error is not None:
                raise RequestFailedError(out.error)
    except BaseException:
        for rid in ids:
            llm.abort(rid)
        raise
    return finals
