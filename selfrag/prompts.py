"""Prompt layout, task instructions and answer post-processing of the released Self-RAG code.

Mirrored from ``AkariAsai/self-rag`` (``retrieval_lm/utils.py``,
``run_short_form.py``, ``run_long_form_static.py``); strings are reproduced
verbatim.  What is mirrored, and where we deliberately differ:

* ``format_prompt``: ``PROMPT_DICT["prompt_no_input"]`` / ``["prompt_input"]``.
* ``task_instruction``: ``preprocess_input_data`` of ``run_short_form.py`` for
  the short-form tasks (``instruction + "\\n\\n## Input:\\n\\n" + question``;
  ARC: ``instruction + "\\n\\n### Input:\\n" + question + "\\nA: ...\\nB: ..."``),
  and the long-form script for ``asqa``/``eli5`` (``instruction + "## Input:\\n\\n"
  + question``: no blank line after the instruction, verbatim).  Tasks without
  an instruction (PopQA, TriviaQA: the released commands pass no ``--task``)
  use the bare question.
* ARC choices: labels "1"-"4" are shown as A-D, labels "A"-"D" as themselves,
  a missing D shows as "D: " (empty).  Any other label (e.g. a fifth choice
  "E" or "5") is dropped, exactly as released (its ``"E"`` branch is dead code).
  Missing A, B or C is a ValueError here (a KeyError in the released code).
* ``format_passage``: ``"[Retrieval]<paragraph>{title}\\n{text}</paragraph>"``,
  identical in the short- and long-form scripts.
* ``postprocess_answer``: ``postprocess_answer_option_conditioned`` followed by
  the leading ``#``/``:`` drop of ``main``.  Differences: we also remove
  ``[Continue to Use Evidence]`` (absent from the released ``control_tokens``;
  it never reached the text there because vLLM skipped special tokens), and an
  empty answer stays "" (the released code raises IndexError).  Note that for
  OPEN tasks the released code returns the winning candidate's raw text and
  only drops the leading ``#``/``:`` (no token/newline removal); with special
  tokens skipped in the text this only differs by newlines.
* ``normalize_closed_answer``: the metric step of ``main``: a prediction
  containing ``SUPPORTS`` becomes ``true``, else one containing ``REFUTES``
  becomes ``false``.  The released code applies this to every task scored with
  ``match``; here it applies to fever/pubhealth only, and ARC answers pass
  through unchanged (as released: the gold letter is matched as a substring).
"""

from __future__ import annotations

from typing import Mapping

from selfrag import tokens as T
from selfrag.types import Passage

PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# retrieval_lm/utils.py TASK_INST, verbatim (note the trailing space of "wow").
TASK_INSTRUCTIONS: dict[str, str] = {
    "wow": "Given a chat history separated by new lines, generates an informative, knowledgeable and engaging "
           "response. ",
    "fever": "Is the following statement correct or not? Say true if it's correct; otherwise say false.",
    "eli5": "Provide a paragraph-length response using simple words to answer the following question.",
    "obqa": "Given four answer candidates, A, B, C and D, choose the best answer choice.",
    "arc_easy": "Given four answer candidates, A, B, C and D, choose the best answer choice.",
    "arc_c": "Given four answer candidates, A, B, C and D, choose the best answer choice.",
    "trex": "Given the input format 'Subject Entity [SEP] Relationship Type,' predict the target entity.",
    "asqa": "Answer the following question. The question may be ambiguous and have multiple correct answers, "
            "and in that case, you have to provide a long-form answer including all correct answers.",
}
TASK_ALIASES = {"pubhealth": "fever"}
BARE_QUESTION_TASKS = ("popqa", "triviaqa", "qa")
CHOICE_TASKS = ("arc_c", "arc_easy", "obqa")
LONG_FORM_TASKS = ("asqa", "eli5")
CLOSED_TASKS = ("fever", "pubhealth", "arc_c", "arc_easy", "obqa")
KNOWN_TASKS = tuple(sorted({*TASK_INSTRUCTIONS, *TASK_ALIASES, *BARE_QUESTION_TASKS}))

# run_short_form.py preprocess_input_data: label -> letter shown in the prompt.
_CHOICE_LETTER = {"1": "A", "2": "B", "3": "C", "4": "D", "A": "A", "B": "B", "C": "C", "D": "D"}


def canonical_task(task: str | None) -> str | None:
    """Lower-cased task name with aliases resolved (pubhealth -> fever); ValueError if unknown."""
    if task is None:
        return None
    if not isinstance(task, str) or task.lower() not in KNOWN_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(KNOWN_TASKS)} (or None for a bare question)")
    task = task.lower()
    return TASK_ALIASES.get(task, task)


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The Self-RAG (Alpaca-style) prompt around an instruction (and optional input)."""
    if not isinstance(instruction, str):
        raise ValueError(f"instruction must be a string, got {type(instruction).__name__}")
    if input is None:
        return PROMPT_NO_INPUT.format_map({"instruction": instruction})
    if not isinstance(input, str):
        raise ValueError(f"input must be a string or None, got {type(input).__name__}")
    return PROMPT_INPUT.format_map({"instruction": instruction, "input": input})


def render_chat(messages: list[dict]) -> str:
    """A chat conversation in the Self-RAG instruction format, every message kept.

    Each user turn is an ``### Instruction:`` block followed by ``### Response:``;
    an assistant turn is the text after its ``### Response:`` header (blank line
    after it); system text (all system messages, in order) leads the first
    instruction, before a blank line. One user message without a system message
    gives exactly ``format_prompt(message)``. A conversation ending with a user
    turn ends with the open ``### Response:`` header the model answers after;
    one ending with an assistant turn is continued.
    """
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out, pending_system = [], system
    for m in messages:
        if m["role"] == "user":
            text = f"{pending_system}\n\n{m['content']}" if pending_system else m["content"]
            pending_system = ""
            out.append(PROMPT_NO_INPUT.format_map({"instruction": text}))
        elif m["role"] == "assistant":
            if not out:
                raise ValueError("the conversation starts with an assistant message")
            out[-1] += m["content"]
            if m is not messages[-1]:
                out[-1] += "\n\n"
    if not out:
        raise ValueError("the conversation has no user message")
    return "".join(out)


def format_choices(choices: Mapping) -> str:
    """ARC choices ``{"text": [...], "label": [...]}`` -> "\\nA: ...\\nB: ...\\nC: ...\\nD: ..."."""
    if not isinstance(choices, Mapping) or "text" not in choices or "label" not in choices:
        raise ValueError("choices must be a dict with 'text' and 'label' lists")
    texts, labels = list(choices["text"]), list(choices["label"])
    if len(texts) != len(labels):
        raise ValueError(f"choices have {len(texts)} texts but {len(labels)} labels")
    shown: dict[str, str] = {}
    for label, text in zip(labels, texts):
        letter = _CHOICE_LETTER.get(str(label))
        if letter is not None:
            shown[letter] = text
    missing = [x for x in "ABC" if x not in shown]
    if missing:
        raise ValueError(f"choices lack option(s) {missing} (labels {labels})")
    shown.setdefault("D", "")
    return "\nA: {0}\nB: {1}\nC: {2}\nD: {3}".format(shown["A"], shown["B"], shown["C"], shown["D"])


def task_instruction(task: str | None, question: str, choices: Mapping | None = None) -> str:
    """The instruction text for ``question`` under ``task``, as the released scripts build it."""
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    task = canonical_task(task)
    if task is None or task in BARE_QUESTION_TASKS:
        return question
    instruction = TASK_INSTRUCTIONS[task]
    if task in CHOICE_TASKS:
        if choices is None:
            raise ValueError(f"task {task!r} needs the answer choices")
        return instruction + "\n\n### Input:\n" + question + format_choices(choices)
    if task in LONG_FORM_TASKS:
        return instruction + "## Input:\n\n" + question
    return instruction + "\n\n## Input:\n\n" + question


def format_passage(p: Passage) -> str:
    """The text appended to the prompt for one passage."""
    return f"{T.RETRIEVAL}{T.PARAGRAPH_START}{p.title}\n{p.text}{T.PARAGRAPH_END}"


_REMOVED = (*T.ADDITIONAL_SPECIAL_TOKENS, "</s>", "\n", "<|endoftext|>")


def postprocess_answer(text: str) -> str:
    """Remove reflection/markup tokens, ``</s>``, newlines; then drop ONE leading ``#`` or ``:``."""
    for tok in _REMOVED:
        text = text.replace(tok, "")
    if text[:1] in ("#", ":"):
        text = text[1:]
    return text


def normalize_closed_answer(text: str, task: str) -> str:
    """fever/pubhealth: contains SUPPORTS -> "true", else contains REFUTES -> "false"; else unchanged."""
    task = canonical_task(task)
    if task == "fever":
        if "SUPPORTS" in text:
            return "true"
        if "REFUTES" in text:
            return "false"
    return text
