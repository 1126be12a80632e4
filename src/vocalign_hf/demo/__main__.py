"""`python -m vocalign_hf.demo`: start the demo on 127.0.0.1 (see `--help`)."""

from .ui import main

if __name__ == "__main__":
    main()
