"""Checkpoints that survive a kill: `checkpoints/step-N/` is built in `.step-N.tmp/`, closed by a
`COMPLETE` marker and renamed, so a directory named step-N is always whole. Resume takes the newest
complete one and ignores (and removes) half-written temp directories.

A checkpoint holds the adapter (a loadable adapter directory, so any checkpoint can be merged) and
`trainer_state.pt`: the raw trainable tensors (PiSSA's before conversion), optimizer, scheduler, the
method's own state (e.g. AdaLoRA's importance EMAs and rank masks), the step (= data position, see
peftcli.distributed) and the run's shape; plus `rng-RANK.pt` per process (torch, CUDA, numpy, python).

Fault injection for tests: PEFTCLI_FAULT="kill_in_save=N,disk_full_in_save=N,nan_at_step=N,step_delay=S".
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
from pathlib import Path

import torch

from peftcli.adapter_io import _fsync_dir, atomic_write
from peftcli.errors import UserError

MARKER = "COMPLETE"
STATE = "trainer_state.pt"


def fault(name: str) -> float | None:
    """The value of fault `name` in PEFTCLI_FAULT, or None."""
    for item in os.environ.get("PEFTCLI_FAULT", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    r = root(run_dir)
    if not r.is_dir():
        return []
    found = [p for p in r.glob("step-*") if p.is_dir() and (p / MARKER).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest(run_dir: Path) -> Path | None:
    found = complete(run_dir)
    return found[-1] if found else None


def remove_partial(run_dir: Path) -> None:
    r = root(run_dir)
    if r.is_dir():
        for p in r.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def torch_save(obj, path: Path) -> None:
    """torch.save through atomic_write: a reader never sees half a file."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sharded(model) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def optimizer_state(model, optimizer) -> dict:
    """The whole optimizer state on CPU. Under FSDP2 the moments are shards: gathered (a collective, so
    every process calls this), else the optimizer's own state_dict."""
    if not _sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Inverse of optimizer_state: whole tensors are re-sharded under FSDP2."""
    if not _sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_parameter(param, value: torch.Tensor) -> None:
    """Copy a whole saved tensor into a parameter, re-sharding it if the parameter is an FSDP2 shard."""
    with torch.no_grad():
        if type(param).__name__ == "DTensor":
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
            param.copy_(value)
        else:
            param.copy_(value.to(param.device, param.dtype))


def save(run_dir: Path, step: int, accelerator, write_main, keep: int) -> Path:
    """Every process calls this at the same step. `write_main(tmp_dir)` writes the shared files (main
    process only); each process adds its RNG state. A failure leaves the previous checkpoints untouched."""
    r = root(run_dir)
    tmp, final = r / f".step-{step}.tmp", r / f"step-{step}"
    main = accelerator.is_main_process
    if main:
        r.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    error: OSError | None = None
    try:
        torch_save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if main:
            write_main(tmp)
            if fault("disk_full_in_save") == step:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if fault("kill_in_save") == step:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash between the files and the marker
    except OSError as exc:
        error = exc
    # every process learns whether the checkpoint is whole before the main one commits it
    failed = _any(accelerator, error is not None)
    if failed:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = latest(run_dir)
        why = f": {error.strerror or error}" if error is not None else " on another process"
        raise UserError(f"could not write checkpoint step-{step}{why}; "
                        + (f"{prev} is intact, free space and rerun with --resume" if prev else "no earlier checkpoint exists")) from None
    if main:
        atomic_write(tmp / MARKER, f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(r)
        for old in complete(run_dir)[:-max(keep, 1)]:  # the newest complete one always stays
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _any(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def load_state(ckpt: Path, rank: int) -> tuple[dict, dict]:
    """(trainer state, this process's RNG state)."""
    try:
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=False)
        rng = torch.load(ckpt / f"rng-{rank}.pt", map_location="cpu", weights_only=False)
    except FileNotFoundError as exc:
        raise UserError(f"checkpoint {ckpt} lacks {Path(exc.filename).name}: it was written by a run with another number "
                        "of processes or by an older peftcli; resume with the same --num-processes or start over with --overwrite") from None
    except Exception as exc:
        raise UserError(f"checkpoint {ckpt} is unreadable ({type(exc).__name__}); delete it to resume from an earlier one") from None
    return state, rng
