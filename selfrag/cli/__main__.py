"""``python -m selfrag.cli``: the ``selfrag`` command."""
from selfrag.cli import entry

entry()
