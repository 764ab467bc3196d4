"""Chat requests -> one prompt: message checks, text content parts, and the template.

The conversation is rendered, every message kept, by the first of:
1. the checkpoint's own ``chat_template`` (tokenizer_config.json or
   chat_template.jinja), as transformers' ``apply_chat_template`` renders it;
2. the ``chat_prompt(messages) -> str`` the server was created with (``selfrag
   serve`` passes Self-RAG's instruction format, ``selfrag.prompts.render_chat``);
3. a plain default: one ``Role: content`` line per message, then ``Assistant:``.

Roles: system (``developer`` is read as system), user, assistant. Content is a
string, or a list of parts of which only ``{"type": "text", "text": ...}`` is
supported (joined with newlines); any other part type is a 400.
"""
from __future__ import annotations

from typing import Callable

from engine.tokenizer.chat_template import ChatTemplateError, conversation_prompts, load_chat_template

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatError(ValueError):
    """A message the server cannot render; ``param`` names it (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def normalize_messages(messages) -> list[dict]:
    """Pydantic chat messages -> [{"role", "content": str}], checked."""
    out = []
    for i, m in enumerate(messages):
        role = ROLES.get(m.role)
        if role is None:
            raise ChatError(f"messages[{i}].role={m.role!r} is not supported: use system, user or "
                            "assistant", f"messages.{i}.role")
        content = m.content
        if content is None or isinstance(content, str):
            text = content or ""
        else:
            texts = []
            for j, part in enumerate(content):
                if part.type != "text":
                    raise ChatError(f"messages[{i}].content[{j}] has type {part.type!r}: only text "
                                    "parts are supported", f"messages.{i}.content.{j}.type")
                texts.append(part.text or "")
            text = "\n".join(texts)
        out.append({"role": role, "content": text})
    if not any(m["role"] == "user" and m["content"] for m in out):
        raise ChatError("messages need at least one non-empty 'user' message", "messages")
    return out


def default_chat_prompt(messages: list[dict]) -> str:
    """``Role: content`` lines, then an open ``Assistant:`` unless the last message is the
    assistant's (which is then continued)."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    if messages[-1]["role"] != "assistant":
        lines.append("Assistant:")
    return "\n".join(lines)


class ChatRenderer:
    """Renders conversations for one engine (see the module docstring for the order)."""

    def __init__(self, llm, chat_prompt: Callable[[list[dict]], str] | None = None):
        self.tokenizer = llm.get_tokenizer()
        self.template = (load_chat_template(str(llm.model_dir))
                         if self.tokenizer is not None and isinstance(llm.model_dir, str) else None)
        self.chat_prompt = chat_prompt
        self.source = ("the checkpoint's chat_template" if self.template else
                       "the server's chat format" if chat_prompt else "the default chat format")

    def __call__(self, messages: list[dict]) -> dict:
        """{"prompt_token_ids", "prompt"} of the conversation (tokenized here: the caller
        needs the prompt's length to fit max_tokens into max_model_len)."""
        if self.tokenizer is None:
            raise ChatError("this server's engine has no tokenizer: use /v1/completions with "
                            "token ids", "messages")
        try:
            if self.template is not None:
                # as LLM.chat renders it; the template writes its own special tokens
                [p] = conversation_prompts(self.tokenizer, self.template, messages)
                text, ids = p["prompt"], p["prompt_token_ids"]
            else:
                text = (self.chat_prompt or default_chat_prompt)(messages)
                ids = self.tokenizer.encode(text)
        except (ChatTemplateError, ValueError) as e:
            raise ChatError(str(e), "messages") from None
        return {"prompt_token_ids": ids, "prompt": text}
