"""`python -m vocalign_hf.demo`: start the demo on 127.0.0.1 (see `--help`)."""

from ..errors import run_program
from .segmenter import DemoSetupError
from .ui import main

if __name__ == "__main__":
    raise SystemExit(run_program(main, extra_errors=(DemoSetupError,)))  # a missing model: one line and exit status 2
