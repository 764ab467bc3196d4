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


def render(template: str, messages: list[dict], bos_token: str | None = None,
           eos_token: str | None = None, add_generation_prompt: bool = True) -> str:
    """``messages`` ([{"role", "content"}, ...]) through ``template``."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token or "",
                                                eos_token=eos_token or "",
                                                add_generation_prompt=add_generation_prompt)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the checkpoint's chat_template failed: {e}") from None
