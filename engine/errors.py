"""Exceptions raised by the engine.

Every error a user can cause is a ``ValueError`` subclass, so code written for
vLLM (which raises ``ValueError`` for bad requests) keeps working.
"""


class CheckpointError(ValueError):
    """A checkpoint directory, config or weight file is unusable.

    The message always names the file and, where one is involved, the tensor.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        full = f"{message} ({', '.join(where)})" if where else message
        super().__init__(full)
        self.file = file
        self.tensor = tensor


class ConfigError(CheckpointError):
    """config.json is missing, unreadable or lacks a required field."""


class InvalidRequestError(ValueError):
    """A request (prompt or sampling parameters) cannot be served."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus at least one generated token) does not fit max_model_len."""


class RequestFailedError(InvalidRequestError):
    """One request failed while it ran (a logits processor raised, returned a bad
    tensor, NaN, or masked every token; its output could not be processed). The
    request ended with ``finish_reason="error"``; the other requests were not
    affected. ``LLM.stream`` raises it; ``step``/``generate`` return the output,
    whose ``error`` holds this message."""


class EngineDeadError(RuntimeError):
    """The engine itself failed (e.g. a device error in a forward pass): every later
    call raises this error, naming the original one. Build a new ``LLM``."""


def read_json(path, what: str, error: type[CheckpointError] = CheckpointError):
    """Parses the JSON file ``path``; any failure raises ``error`` naming the file.

    ``what`` names the file's role in messages ("config", "index", ...).
    """
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON: {e}", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what}: {e}", file=str(path)) from None
