"""Processes and batches: the Accelerator for this machine, the hand-over to Accelerate's launcher, and
the global batch order that makes N processes x b rows, 1 process x N*b rows and grad_accum k x b rows
the same optimizer step.

Batches are cut from one seeded permutation per epoch that does not depend on the number of processes:
optimizer step s takes the global batch of G = batch_size x num_processes x grad_accum rows at
[s*G, (s+1)*G) of the epoch's order (the last one of an epoch wraps to its start, as torch's
DistributedSampler pads), and micro-batch m of rank r is its slice [(m*N + r)*b, (m*N + r + 1)*b). So the
data position of a run is just its step count: resuming needs no sampler state.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch

from peftcli.data import IGNORE
from peftcli.errors import UserError


def has_gpu() -> bool:
    """A GPU to train on: CUDA is available and ACCELERATE_USE_CPU (Accelerate's own switch, which its
    AcceleratorState honours too) does not ask for the CPU. `ACCELERATE_USE_CPU=1 peftcli train ...` keeps a
    run on the CPU of a GPU machine."""
    from accelerate.utils import parse_flag_from_env

    return torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")


def make_accelerator(mixed_precision: str, distributed: str = "ddp", deepspeed_config: str | None = None):
    """One process, DDP over NCCL (GPUs) or gloo (CPUs, `cpu=True` picks MULTI_CPU), or FSDP2."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # accelerate keeps one global state per process; a second run in the same process (tests, notebooks)
    # may ask for another precision, so forget the previous run's (the process group stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    kw: dict = {"mixed_precision": mixed_precision, "cpu": not has_gpu(),
                "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=False)]}
    if distributed == "fsdp" and in_distributed_launch():
        if not has_gpu():
            # Accelerate enables FSDP for GPU backends only and would silently fall back to DDP
            raise UserError("train.distributed: fsdp runs on GPUs only (Accelerate does not shard over gloo); "
                            "use train.distributed: ddp on CPU machines")
        from accelerate.utils import FullyShardedDataParallelPlugin

        kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                           auto_wrap_policy="transformer_based_wrap")
    elif distributed == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("train.distributed: deepspeed needs the deepspeed package (pip install deepspeed) and GPUs; "
                            "use train.distributed: ddp or fsdp")
        if in_distributed_launch():
            from accelerate.utils import DeepSpeedPlugin

            kw["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config, zero_stage=2)
    return Accelerator(**kw)


def in_distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_command(num_processes: int, argv: list[str], mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` for N local processes running `peftcli <argv>`. Its multi-process launcher is
    torchrun's; on a machine without GPUs peftcli then picks gloo (Accelerate's own --cpu launcher starts one
    process only)."""
    return [sys.executable, "-m", "peftcli.distributed", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
            "--main_process_port", "0", "-m", "peftcli", *argv]


def launch_main(args: list[str]) -> int:
    """Accelerate's `launch`, with one change: a failed process ends the launcher with that process's exit
    code (2 for a user error, whose one line the process already printed) instead of torchrun's traceback."""
    import logging

    from accelerate.commands.launch import launch_command as accelerate_launch
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        accelerate_launch(launch_command_parser().parse_args(args))
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode and f.exitcode > 0]
        return codes[0] if codes else 1
    return 0



def single_process_launch_warning() -> str | None:
    """`accelerate launch --num_processes N` without --multi_gpu on a machine without GPUs runs ONE process;
    say so instead of training N times slower than the user thinks."""
    if in_distributed_launch() or "ACCELERATE_USE_CPU" not in os.environ:
        return None
    try:
        import psutil

        parent = psutil.Process(os.getppid()).cmdline()
    except Exception:
        return None
    args = " ".join(parent)
    if "launch" not in args or "--num_processes" not in parent:
        return None
    try:
        n = int(parent[parent.index("--num_processes") + 1])
    except (ValueError, IndexError):
        return None
    if n <= 1:
        return None
    return (f"accelerate launch asked for {n} processes but started one (its --cpu launcher is single-process); "
            f"for {n} processes use `peftcli train RECIPE --num-processes {n}`, `torchrun --nproc_per_node {n} -m peftcli "
            f"train RECIPE` or `accelerate launch --multi_gpu --num_processes {n} -m peftcli train RECIPE`")


def label_count(example: dict) -> int:
    """Loss terms one example contributes: its next-token targets (labels[1:]), every target token of a
    seq2seq example (the decoder predicts each one), or 1 for a class label."""
    labels = example["labels"]
    if isinstance(labels, list):
        return sum(1 for t in labels[0 if example.get("seq2seq") else 1:] if t != IGNORE)
    return 1


@dataclass
class GlobalBatches:
    n_rows: int
    batch_size: int  # per process, per micro-batch
    num_processes: int
    grad_accum: int
    seed: int

    @property
    def global_size(self) -> int:
        return self.batch_size * self.num_processes * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_rows / self.global_size))

    def order(self, epoch: int) -> list[int]:
        """The epoch's permutation: the one torch's DataLoader(shuffle=True, generator=manual_seed(seed))
        gives (per epoch its iterator draws a shared seed, then the RandomSampler a permutation, and an unused
        one at the epoch's end), so a plain torch loop with the same seed (the bench's HF PEFT peer) sees the
        same batches."""
        cached = getattr(self, "_cached", None)
        if cached is None or cached[0] > epoch:
            cached = (-1, None, torch.Generator().manual_seed(self.seed))
        e, perm, g = cached
        while e < epoch:
            if e >= 0:
                torch.randperm(self.n_rows, generator=g)  # the sampler's empty tail draw of the previous epoch
            torch.empty((), dtype=torch.int64).random_(generator=g)  # the iterator's shared seed
            perm, e = torch.randperm(self.n_rows, generator=g).tolist(), e + 1
        self._cached = (e, perm, g)
        return perm

    def step_indices(self, step: int) -> list[int]:
        """Row indices of optimizer step `step` (0-based), all processes and micro-batches together."""
        epoch, j = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        start = j * self.global_size
        return [order[(start + t) % self.n_rows] for t in range(self.global_size)]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's grad_accum micro-batches of step `step`."""
        idx = self.step_indices(step)
        b, n = self.batch_size, self.num_processes
        return [idx[(m * n + rank) * b:(m * n + rank + 1) * b] for m in range(self.grad_accum)]


def shard(n_rows: int, rank: int, num_processes: int) -> list[int]:
    """Rows of an evaluation set for this rank (strided; every row once over all ranks)."""
    return list(range(rank, n_rows, num_processes))


if __name__ == "__main__":
    sys.exit(launch_main(sys.argv[1:]))
