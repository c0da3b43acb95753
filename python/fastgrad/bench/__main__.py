"""``python -m fastgrad.bench``, as the single-file module allowed before it became a package."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
