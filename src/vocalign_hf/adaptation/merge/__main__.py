"""`python -m vocalign_hf.adaptation.merge`: the `vocalign-merge` command (see `--help`)."""

from . import cli

if __name__ == "__main__":
    raise SystemExit(cli())  # a bad input: one line and exit status 2 (`-v`: the traceback)
