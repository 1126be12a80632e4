"""Holds an output folder's lock in a process of its own, for tests/test_run_safety.py.

    python tests/lock_probe.py FOLDER

Takes the lock with `vocalign_hf.output_lock.lock_output_dir`, prints `held <pid>`, and keeps it until its stdin
closes (then it releases it as a run does) or it is killed (then the OS releases it).
"""

import sys
import types
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# The lock module needs only `vocalign_hf.errors`: skip the package's __init__ (torch, transformers: seconds).
package = types.ModuleType("vocalign_hf")
package.__path__ = [str(SRC / "vocalign_hf")]
sys.modules["vocalign_hf"] = package

from vocalign_hf.output_lock import lock_output_dir  # noqa: E402


def main() -> None:
    import os

    with lock_output_dir(sys.argv[1]):
        print(f"held {os.getpid()}", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
