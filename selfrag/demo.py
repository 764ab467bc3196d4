"""``python -m selfrag.demo``: the model card demo's entry point (the demo is selfrag/cli/demo.py)."""
import sys

from selfrag.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
