"""Data-parallel runs through accelerate: one process per GPU, or N gloo processes on CPU.

`accelerate launch -m qsvd finetune …` starts the processes, and `qsvd finetune --num-processes N`
starts them the same way. Each process trains on its share of every global batch
(N × --batch-size × --grad-accum rows) and DDP averages the gradients. The one-off work is the
main process's: it builds the prepared model while the others wait and then load it, and it
alone writes checkpoints, evaluates and publishes the run.
"""

import os
import subprocess
import sys
from datetime import timedelta

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from .console import console
from .errors import QSVDError

# How long a process waits at a barrier, or on any collective, before the group aborts. NCCL's
# default is 10 minutes, but the waiting ranks sit at a barrier while the main process alone
# fetches or converts the model, splits it (an exact split of a 7B model takes longer than that)
# and later scores --eval-data; Trainer's `ddp_timeout` never applies, as the group exists first.
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)


def processes() -> PartialState:
    """This process's place among the launched ones (a single process when none were launched).

    Without a GPU the processes run on CPU and talk over gloo. Non-main processes print nothing.
    FSDP is refused: torch's FSDP2 shards each weight as a DTensor, which drops bitsandbytes'
    quantization state even with a float `quant_storage` (the 4-bit forward then fails with
    "quant_state is required"; tests/test_multiprocess.py tries it), and FSDP1 flattens only
    tensors of one dtype, where qsvd's adapters are fp32 beside a bf16/fp16 base.
    """
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):  # read as accelerate itself reads it
        raise QSVDError("FSDP is not supported with a 4-bit base: torch's FSDP2 drops bitsandbytes' quantization "
                        "state when it shards a 4-bit weight; use data parallel (--num-processes N, or an "
                        "accelerate config with distributed_type: MULTI_GPU), which keeps a whole model on each GPU")
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=PROCESS_GROUP_TIMEOUT)
    if not state.is_main_process:
        console.quiet = True
        datasets.disable_progress_bars()
    return state


def launched() -> bool:
    """Whether a launcher (accelerate launch, torchrun) started this process."""
    return "LOCAL_RANK" in os.environ


def relaunch(num_processes: int, argv: list[str]) -> int:
    """Run `qsvd *argv` in `num_processes` processes through `accelerate launch`; its exit code."""
    if torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        raise QSVDError(f"--num-processes {num_processes}: this machine has {torch.cuda.device_count()} GPU(s)")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--num_processes", str(num_processes), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "qsvd", *argv]
    return subprocess.run(command).returncode


def without_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` or `name=VALUE`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept
