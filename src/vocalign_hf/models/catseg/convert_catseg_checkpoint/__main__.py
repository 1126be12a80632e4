"""`python -m vocalign_hf.models.catseg.convert_catseg_checkpoint`: the `convert-catseg-checkpoint` command (see
`--help`)."""

from . import cli

if __name__ == "__main__":
    raise SystemExit(cli())  # a bad file: one line and exit status 2 (`-v`: the traceback)
