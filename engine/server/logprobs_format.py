"""Log-probs in OpenAI's response shapes: legacy completions (tokens, token_logprobs,
top_logprobs, text_offset; the echoed prompt's too) and chat (content entries)."""
from __future__ import annotations


def legacy_logprobs(comp, start: int, text_offset: int, tokenizer):
    """OpenAI's legacy completions log-probs of ``comp``'s tokens from ``start``."""
    if comp.logprobs is None:
        return None
    toks, lps, tops, offs = [], [], [], []
    off = text_offset
    for tid, d in zip(comp.token_ids[start:], comp.logprobs[start:]):
        lp = d.get(tid)
        tok = (lp.decoded_token if lp is not None and lp.decoded_token is not None
               else (tokenizer.decode([tid]) if tokenizer is not None else str(tid)))
        toks.append(tok)
        lps.append(None if lp is None else lp.logprob)
        tops.append({(v.decoded_token if v.decoded_token is not None else str(k)): v.logprob
                     for k, v in d.items() if k != tid or v.rank is not None})
        offs.append(off)
        off += len(tok)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def echo_part(out, want_logprobs: bool, tokenizer):
    """(text, legacy log-probs or None) of an echoed prompt: the first token has no
    log-prob, as in OpenAI's legacy completions."""
    ids = out.prompt_token_ids
    text = out.prompt if out.prompt is not None else (
        tokenizer.decode(ids) if tokenizer is not None else "")
    if not want_logprobs:
        return text, None
    toks, lps, tops, offs, off = [], [], [], [], 0
    for j, tid in enumerate(ids):
        d = out.prompt_logprobs[j] if out.prompt_logprobs is not None else None
        tok = tokenizer.decode([tid]) if tokenizer is not None else str(tid)
        toks.append(tok)
        lps.append(None if d is None else d[tid].logprob)
        tops.append(None if d is None else {(v.decoded_token if v.decoded_token is not None else str(k)):
                                            v.logprob for k, v in d.items()})
        offs.append(off)
        off += len(tok)
    return text, {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def joined(a, b):
    """Two legacy log-prob blocks as one (either may be None)."""
    if a is None or b is None:
        return a if b is None else b
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(comp, start: int, top: bool):
    """OpenAI's chat log-probs of ``comp``'s tokens from ``start``."""
    if comp.logprobs is None:
        return None
    content = []
    for tid, d in zip(comp.token_ids[start:], comp.logprobs[start:]):
        lp = d.get(tid)
        tok = lp.decoded_token if lp is not None and lp.decoded_token is not None else str(tid)
        entry = {"token": tok, "logprob": None if lp is None else lp.logprob, "bytes": list(tok.encode())}
        entry["top_logprobs"] = [{"token": v.decoded_token if v.decoded_token is not None else str(k),
                                  "logprob": v.logprob} for k, v in d.items()] if top else []
        content.append(entry)
    return {"content": content}
