"""Runs a recipe script in one process of an `accelerate launch` and records, for tests/test_multiprocess.py, what
this process did: its final student and teacher LoRA weights, the block masks its student saw, its student view
of a fixed image, how often it rendered the world or pretrained the source model, and which files it wrote.

    accelerate launch ... tests/multiprocess_probe.py PROBE_DIR WATCHED_DIR[,WATCHED_DIR...] SCRIPT [script flags]

Nothing is replaced: functions are wrapped to count their calls, forward pre-hooks only read the inputs, and a
`sys.addaudithook` hook lists writes (open for writing, mkdir of a new folder, rename, remove) under the watched
folders. The record goes to PROBE_DIR/rank<process index>.pt.
"""

import os
import runpy
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from vocalign_hf.adaptation import VocAlignTrainer
from vocalign_hf.adaptation.sharding import full, local
from vocalign_hf.models.catseg.pixel_normalization import normalize_pixels
from vocalign_hf.world import datasets as world_datasets
from vocalign_hf.world import pretrain as world_pretrain

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def fsdp_on_cpu() -> None:
    """Accelerate turns FSDP on only for accelerator devices: on CPU processes (gloo) its state stays MULTI_CPU and the
    Trainer wraps the model in DDP. Torch's FSDP2 runs on gloo, so here the state becomes FSDP when Accelerate was given
    an FSDP plugin (`accelerate launch` with an FSDP config), and the Trainer and Accelerate take their FSDP2 path
    (`fully_shard` of the model, sharded optimiser state) as on GPUs."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)  # each call copies PartialState's MULTI_CPU back
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin

    AcceleratorState.__init__ = init


def main() -> None:
    probe_dir, watched, script, *flags = sys.argv[1:]
    if os.environ.get("VOCALIGN_PROBE_CPU_FSDP") == "1":
        fsdp_on_cpu()
    roots = [os.path.realpath(folder) for folder in watched.split(",")]
    record = {"render_calls": 0, "pretrain_calls": 0, "writes": [], "masks": [], "trainers": []}

    def watched_path(path) -> str | None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return None
        real = os.path.realpath(os.fspath(path))
        return real if any(real == root or real.startswith(root + os.sep) for root in roots) else None

    def audit(event, args):
        if event == "open":
            path, mode, flags_ = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags_ or 0) & WRITE_FLAGS)
            if writing and (real := watched_path(path)):
                record["writes"].append(("open", real))
        elif event == "os.mkdir":
            if (real := watched_path(args[0])) and not os.path.exists(real):
                record["writes"].append(("mkdir", real))
        elif event in ("os.rename", "os.remove", "shutil.rmtree", "shutil.copyfile"):
            for path in args[:2]:
                if real := watched_path(path):
                    record["writes"].append((event, real))

    sys.addaudithook(audit)

    render, train = world_datasets._render_dataset, world_pretrain._train

    def counting_render(*args, **kwargs):
        record["render_calls"] += 1
        return render(*args, **kwargs)

    def counting_train(*args, **kwargs):
        record["pretrain_calls"] += 1
        return train(*args, **kwargs)

    world_datasets._render_dataset, world_pretrain._train = counting_render, counting_train

    init = VocAlignTrainer.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        record["trainers"].append(self)
        if self.teacher is not None:
            fill = torch.tensor(self._mask_fill).view(1, 3, 1, 1)

            def student_input(module, args_, kwargs_):
                if module.training:  # training steps only, not evaluation
                    record["masks"].append((kwargs_["pixel_values"].detach().cpu() == fill).all(dim=1))

            self.model.register_forward_pre_hook(student_input, with_kwargs=True)

    VocAlignTrainer.__init__ = recording_init

    sys.argv = [script, *flags]
    runpy.run_path(script, run_name="__main__")

    state = PartialState()
    adapting = [t for t in record["trainers"] if t.teacher is not None]
    result = {key: record[key] for key in ("render_calls", "pretrain_calls", "writes", "masks")}
    result.update(process_index=state.process_index, num_processes=state.num_processes)
    if adapting:
        trainer = adapting[-1]
        result["fsdp"] = trainer.is_fsdp_enabled
        lora = lambda model: {n: full(p).detach().cpu().clone() for n, p in model.named_parameters()
                              if "lora_" in n and ".teacher." not in n}  # the student's; the teacher's is its own
        result["student"] = lora(trainer.accelerator.unwrap_model(trainer.model))
        result["teacher"] = lora(trainer.teacher)
        # What each rank holds of the teacher's weights: its own shards under FSDP, whole weights under DDP.
        result["teacher_local_shapes"] = {n: tuple(local(p).shape) for n, p in trainer.teacher.named_parameters()}
        image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        result["fixed_view"] = trainer.student_view(normalize_pixels(image))
        result["mask_fill"] = torch.tensor(trainer._mask_fill)
    Path(probe_dir).mkdir(parents=True, exist_ok=True)
    torch.save(result, Path(probe_dir) / f"rank{state.process_index}.pt")


if __name__ == "__main__":
    main()
