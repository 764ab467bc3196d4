"""Chat messages -> one prompt: a checkpoint's Jinja ``chat_template``, as HF renders it.

A checkpoint may carry its chat format, as ``chat_template`` in tokenizer_config.json
(a string, or a list of named templates of which "default" is used) or as a
``chat_template.jinja`` file beside it. ``render`` runs it the way transformers'
``apply_chat_template`` does: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the variables ``messages``, ``bos_token``, ``eos_token`` and
``add_generation_prompt``, and a ``raise_exception`` helper whose message becomes a
``ChatTemplateError`` (e.g. "Conversation roles must alternate"). The rendered text
carries its own special tokens (``<s>``...), so it is encoded without adding any.
"""
from __future__ import annotations

import json
import os


class ChatTemplateError(ValueError):
    """The conversation does not fit the template (the template said so), or the
    template itself is broken."""


def load_chat_template(model_dir: str) -> str | None:
    """The checkpoint's chat template, or None if it has none."""
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path, encoding="utf-8") as f:
        try:
            template = json.load(f).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
    if isinstance(template, list):       # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """HF's ``tojson`` filter: json.dumps without Jinja's HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    from datetime import datetime
    return datetime.now().strftime(fmt)


def render(template: str, messages: list[dict], bos_token: str | None = None,
           eos_token: str | None = None, add_generation_prompt: bool = True,
           special_tokens: dict | None = None, **extra) -> str:
    """``messages`` ([{"role", "content"}, ...]) through ``template``, in HF's environment:
    ``loopcontrols``, the ``tojson`` filter, ``raise_exception`` and ``strftime_now``; the
    special tokens (``special_tokens``: {"unk_token": ..., ...}) and ``extra`` variables."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(bos_token=bos_token or "", eos_token=eos_token or "", **extra)
    try:
        return env.from_string(template).render(messages=messages,
                                                add_generation_prompt=add_generation_prompt,
                                                **variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the checkpoint's chat_template failed: {e}") from None


def _conversations(messages) -> list[list[dict]]:
    """One conversation ([{"role", "content"}, ...]) or a list of them -> a list of them."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} dicts "
                                "or a list of such lists")
    convs = [messages] if isinstance(messages[0], dict) else list(messages)
    for c, conv in enumerate(convs):
        if not isinstance(conv, (list, tuple)) or not conv:
            raise ChatTemplateError(f"conversation {c} must be a non-empty list of messages")
        for i, m in enumerate(conv):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ChatTemplateError(f"conversation {c}, message {i}: needs a str 'role' and a "
                                        f"str 'content', got {m!r}"[:300])
    return [list(conv) for conv in convs]


def conversation_prompts(tokenizer, template: str, messages, add_generation_prompt: bool = True,
                         continue_final_message: bool = False) -> list[dict]:
    """[{"prompt", "prompt_token_ids"}] of each conversation, token for token what
    ``tokenizer.apply_chat_template(conv, add_generation_prompt=...)`` gives in HF: the
    rendered text is encoded without adding special tokens (the template writes them).
    ``continue_final_message``: the text ends right after the last message's content,
    so the model continues that (assistant) message instead of starting a new turn."""
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt exclude each other")
    special = {k: getattr(tokenizer, k, None) for k in ("unk_token", "pad_token")}
    out = []
    for conv in _conversations(messages):
        text = render(template, conv, tokenizer.bos_token, tokenizer.eos_token,
                      add_generation_prompt=add_generation_prompt, special_tokens=special)
        if continue_final_message:
            final = conv[-1]["content"].strip()
            at = text.rfind(final)
            if not final or at < 0:
                raise ChatTemplateError("continue_final_message: the last message's content is not "
                                        "in the rendered text")
            text = text[:at + len(final)]
        out.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
    return out
