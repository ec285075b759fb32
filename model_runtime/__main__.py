"""`python -m model_runtime chat ...` and `python -m model_runtime make-tiny DIR` (see cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
