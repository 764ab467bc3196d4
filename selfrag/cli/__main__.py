"""``python -m selfrag.cli``: the ``selfrag`` command."""
import sys

from selfrag.cli import main

sys.exit(main())
