"""``python -m blastfx.cli``: the command line, kept at this path for the console script and ``-m``."""
from .llm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
