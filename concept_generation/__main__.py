"""``python -m concept_generation``: see :func:`concept_generation.cli.main`."""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
