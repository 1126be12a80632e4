"""Runs `recipes/adapt.py` in this process and kills the process (SIGKILL: no clean-up, no `finally`) in the middle
of writing a checkpoint, for tests/test_resume.py.

    python tests/kill_probe.py STEP [adapt.py flags]

The process dies right after the Trainer's `save_model` wrote `checkpoint-STEP`'s adapter and `vocalign.json`, before
the optimiser, RNG and trainer state: what a kill or a full disk leaves. Nothing else is changed.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

from vocalign_hf.adaptation import VocAlignTrainer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    step, *flags = sys.argv[1:]
    save_model = VocAlignTrainer.save_model

    def save_then_die(self, output_dir=None, _internal_call=False):
        save_model(self, output_dir, _internal_call=_internal_call)
        if output_dir is not None and Path(output_dir).name == f"checkpoint-{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    VocAlignTrainer.save_model = save_then_die
    sys.argv = [str(ROOT / "recipes" / "adapt.py"), *flags]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
