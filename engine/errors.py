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
