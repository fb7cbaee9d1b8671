"""Where peftcli trains and what it reports about the device: ACCELERATE_USE_CPU keeps a run on the CPU of a
GPU machine, train.tf32 sets TF32 matmuls for the run only, a step's clock is read after the device finished,
and on a GPU every metrics line carries torch.cuda.max_memory_allocated (the bench's memory measure there).
The GPU itself is faked (this suite runs on CPUs): the tests pin which calls are made and what is logged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peftcli import train as train_mod
from peftcli.recipe import TrainCfg
from peftcli.train import Trainer, device_memory, synchronize
from tests.conftest import ROOT, recipe_dict, write_recipe

FAKE_GPU = """
import torch
torch.cuda.is_available = lambda: True  # a GPU machine, as far as device selection can tell
from peftcli.distributed import has_gpu, make_accelerator
print(has_gpu(), make_accelerator("no").device.type)
"""


@pytest.mark.parametrize("flag, expected", [("1", "False cpu"), ("0", "True cuda")])
def test_accelerate_use_cpu_keeps_peftcli_on_the_cpu_of_a_gpu_machine(flag, expected):
    # a fresh process: Accelerate keeps one device per process
    out = subprocess.run([sys.executable, "-c", FAKE_GPU], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**_env(), "ACCELERATE_USE_CPU": flag})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}


def test_train_tf32_is_a_validated_recipe_key():
    assert TrainCfg().tf32 is False
    assert TrainCfg(tf32=True).tf32 is True
    with pytest.raises(ValueError):
        TrainCfg(tf32="maybe")


def test_device_helpers_on_cpu_do_nothing_and_on_cuda_synchronize_and_read_the_peak(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append(("peak", device)) or 3 * 2**20)
    cpu = torch.device("cpu")
    synchronize(cpu)
    assert device_memory(cpu) == {} and calls == []
    gpu = torch.device("cuda", 0)
    synchronize(gpu)
    assert device_memory(gpu) == {"max_memory_allocated_mb": 3.0}
    assert calls == [("sync", gpu), ("peak", gpu)]


def test_run_applies_tf32_logs_device_memory_and_synchronizes_each_step(tmp_path, tiny_llama_dir, alpaca_files,
                                                                        monkeypatch):
    from peftcli.recipe import load_recipe

    train, _ = alpaca_files
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(
        tiny_llama_dir, train, None, tmp_path / "run",
        train={"max_steps": 3, "batch_size": 4, "eval_every": None, "save_every": None, "tf32": True}))
    seen, synced = [], []
    original = Trainer.train_step

    def step(self, i):
        seen.append(torch.get_float32_matmul_precision())
        return original(self, i)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(train_mod, "synchronize", lambda device: synced.append(device))
    monkeypatch.setattr(train_mod, "device_memory", lambda device: {"max_memory_allocated_mb": 12.5})
    assert torch.get_float32_matmul_precision() == "highest"
    summary = Trainer(load_recipe(recipe)).run()
    assert seen == ["high"] * 3  # TF32 matmuls while training
    assert torch.get_float32_matmul_precision() == "highest"  # and the process's setting back afterwards
    assert synced == [torch.device("cpu")] * 3  # one wait per step, before its clock is read
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 3 and all(x["max_memory_allocated_mb"] == 12.5 for x in steps)
    assert summary["max_memory_allocated_mb"] == 12.5


def test_run_without_tf32_leaves_the_precision_alone(tmp_path, tiny_llama_dir, alpaca_files, monkeypatch):
    from peftcli.recipe import load_recipe

    train, _ = alpaca_files
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(
        tiny_llama_dir, train, None, tmp_path / "run",
        train={"max_steps": 1, "batch_size": 4, "eval_every": None, "save_every": None}))
    seen = []
    original = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, i: seen.append(torch.get_float32_matmul_precision()) or original(self, i))
    summary = Trainer(load_recipe(recipe)).run()
    assert seen == ["highest"]
    assert "max_memory_allocated_mb" not in summary  # CPU: the process's RSS is the measure, nothing logged
