"""Multi-process training and exact resume, on tiny Llama/BERT models saved as real directories.

Proofs asked of the trainer (tolerances: fp32 on CPU; different summation orders only):
- 2 processes x batch b == 1 process x batch 2b == 1 process x grad_accum 2 x batch b: the same lr at every
  step, losses within 1e-5, adapters within 1e-4 of the largest entry, eval loss within 1e-5, the same accuracy;
- every process reports its rank and world size from inside the run, and only the main one writes;
- a SIGKILL at an arbitrary moment, then --resume, gives a bit-identical adapter (1 and 2 processes); a kill
  inside a checkpoint write falls back to the previous one; a full disk keeps the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import copy_task_rows, recipe_dict, save_tiny, write_jsonl, write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftcli import checkpoint
from peftcli.cli import app
from peftcli.distributed import GlobalBatches

runner = CliRunner()
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "COLUMNS": "1000"}  # no wrapped lines


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)


def cli(*args, nproc: int = 1, env: dict | None = None, popen: bool = False):
    """`peftcli ARGS` in a fresh process, or under torchrun with `nproc` processes."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "peftcli", *map(str, args)]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m", "peftcli", *map(str, args)]
    env = {**ENV, **(env or {})}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter_model.safetensors"))


def varied_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows of clearly different lengths, so per-batch token counts differ."""
    rows = copy_task_rows(n, seed)
    rng = random.Random(seed)
    for r in rows:
        r["input"] = " ".join([r["input"]] * rng.randint(1, 6))
        r["output"] = " ".join([r["output"]] * rng.randint(1, 4))
    return rows


@pytest.fixture()
def lm_recipe(tmp_path, tiny_llama_dir):
    def make(out: str = "out", **train) -> Path:
        tr = write_jsonl(tmp_path / "train.jsonl", varied_rows(40))
        ev = write_jsonl(tmp_path / "eval.jsonl", varied_rows(7, seed=1))
        d = recipe_dict(tiny_llama_dir, tr, ev, tmp_path / out,
                        train={"max_steps": 6, "batch_size": 4, "lr": 5e-3, "eval_every": 3, "save_every": None, **train})
        return write_recipe(tmp_path / f"{out}.yaml", d)
    return make


# ----------------------------------------------------------------- the batch order
def test_global_batches_are_one_order_cut_by_process_and_micro_batch():
    one = GlobalBatches(n_rows=23, batch_size=8, num_processes=1, grad_accum=1, seed=3)
    two = GlobalBatches(n_rows=23, batch_size=4, num_processes=2, grad_accum=1, seed=3)
    acc = GlobalBatches(n_rows=23, batch_size=2, num_processes=2, grad_accum=2, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == acc.steps_per_epoch == 3
    for step in range(7):  # across epoch boundaries, with the wrapped last batch of each epoch
        ref = one.micro_batches(step, 0)[0]
        assert two.micro_batches(step, 0)[0] + two.micro_batches(step, 1)[0] == ref
        a0, a1 = acc.micro_batches(step, 0), acc.micro_batches(step, 1)
        assert a0[0] + a1[0] + a0[1] + a1[1] == ref
    epoch0 = [i for s in range(3) for i in one.step_indices(s)]
    assert sorted(set(epoch0)) == list(range(23)) and len(epoch0) == 24  # every row once, one wrapped to fill
    assert one.step_indices(0) != one.step_indices(3)  # a new order each epoch


# ----------------------------------------------------------------- 2 processes == 1 process
def test_two_processes_equal_one_process_and_grad_accum(lm_recipe, tmp_path):
    recipe = lm_recipe()
    runs = {"batch8": tmp_path / "b8", "accum2": tmp_path / "acc", "2proc": tmp_path / "dist"}
    assert invoke("train", recipe, "-o", runs["batch8"], "--set", "train.batch_size=8").exit_code == 0
    assert invoke("train", recipe, "-o", runs["accum2"], "--set", "train.grad_accum=2").exit_code == 0
    proc = cli("train", recipe, "-o", runs["2proc"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the processes, as each saw itself from inside the run; one writer
    meta = json.loads((runs["2proc"] / "peftcli.json").read_text())
    seen = meta["distributed"]["processes"]
    assert [p["rank"] for p in seen] == [0, 1] and [p["world_size"] for p in seen] == [2, 2]
    assert {p["backend"] for p in seen} == {"gloo"} and len({p["pid"] for p in seen}) == 2
    assert meta["distributed"]["type"] == "MULTI_CPU" and meta["num_processes"] == 2 and meta["effective_batch"] == 8
    assert proc.stdout.count("adapter written") == 1
    first = " ".join(proc.stdout.split())  # rich wraps at the terminal width
    assert "2 processes (MULTI_CPU" in first and "effective batch 8 = 4 per process x 2 x 1 accumulation" in first
    assert [e["step"] for e in metrics(runs["2proc"]) if "loss" in e] == list(range(1, 7))
    assert json.loads((runs["batch8"] / "peftcli.json").read_text())["distributed"]["processes"][0]["world_size"] == 1

    ref = metrics(runs["batch8"])
    ref_ad = adapter(runs["batch8"])
    assert max(t.abs().max().item() for k, t in ref_ad.items() if "lora_B" in k) > 1e-3  # training moved the adapter
    for name in ("accum2", "2proc"):
        m = metrics(runs[name])
        assert [e["lr"] for e in m if "lr" in e] == [e["lr"] for e in ref if "lr" in e], name
        losses = [(e["loss"], r["loss"]) for e, r in zip([e for e in m if "loss" in e], [r for r in ref if "loss" in r], strict=True)]
        assert max(abs(a - b) for a, b in losses) < 1e-5, (name, losses)
        evals = [(e["eval_loss"], r["eval_loss"]) for e, r in zip([e for e in m if "eval_loss" in e], [r for r in ref if "eval_loss" in r], strict=True)]
        assert len(evals) == 2 and max(abs(a - b) for a, b in evals) < 1e-5, (name, evals)
        ad = adapter(runs[name])
        rel = max(((ad[k] - ref_ad[k]).abs().max() / ref_ad[k].abs().max().clamp(min=1e-12)).item() for k in ref_ad)
        assert rel < 1e-4, (name, rel)


def test_two_process_eval_accuracy_is_gathered(tmp_path, tiny_bert_dir):
    bert = shutil.copytree(tiny_bert_dir, tmp_path / "bert")
    cfg = json.loads((bert / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout draws differ per process
    (bert / "config.json").write_text(json.dumps(cfg))
    rows = [{"sentence": f"{w} " * (1 + i % 5), "label": "pos" if w in ("good", "great") else "neg"}
            for i, w in enumerate(["good", "bad", "great", "awful"] * 10)]
    tr = write_jsonl(tmp_path / "train.jsonl", rows)
    ev = write_jsonl(tmp_path / "eval.jsonl", rows[:9])  # odd: the two shards differ in size
    d = recipe_dict(bert, tr, None, tmp_path / "one",
                    model={"task": "seq-cls"}, method={"target_modules": ["query", "value"]},
                    train={"max_steps": 4, "batch_size": 8, "eval_every": None, "save_every": None, "lr": 1e-2})
    d["data"] = {"train": {"path": str(tr), "format": "classification"}, "eval": {"path": str(ev), "format": "classification"},
                 "format": "classification", "max_length": 32}
    recipe = write_recipe(tmp_path / "r.yaml", d)
    one = invoke("train", recipe, "--json")
    assert one.exit_code == 0, one.output
    proc = cli("train", recipe, "-o", tmp_path / "two", "--set", "train.batch_size=4", "--num-processes", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(proc.stdout)  # one JSON document: only the main process prints
    assert b["num_processes"] == 2 and a["num_processes"] == 1
    assert b["eval_accuracy"] == a["eval_accuracy"] and abs(b["eval_loss"] - a["eval_loss"]) < 1e-5, (a, b)
    assert not (tmp_path / "two" / "checkpoints").exists()


def test_accelerate_launch_starts_two_processes(lm_recipe, tmp_path):
    recipe = lm_recipe(max_steps=2, eval_every=None)
    base = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "0"]
    proc = subprocess.run([*base, "--multi_gpu", "-m", "peftcli", "train", str(recipe)], capture_output=True, text=True,
                          timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((tmp_path / "out" / "peftcli.json").read_text())["distributed"]["processes"]
    assert [(p["rank"], p["world_size"]) for p in seen] == [(0, 2), (1, 2)]
    # Accelerate's --cpu launcher starts ONE process: peftcli says so instead of pretending
    proc = subprocess.run([*base, "--cpu", "-m", "peftcli", "train", str(recipe), "-o", str(tmp_path / "single")],
                          capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = " ".join(proc.stdout.split())
    assert "asked for 2 processes but started one" in said and "--num-processes 2" in said


# ----------------------------------------------------------------- resume
def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [parent, *parent.children(recursive=True)]:  # torchrun's workers live in their own session
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_is_bit_identical(lm_recipe, tmp_path, nproc):
    recipe = lm_recipe(max_steps=10, save_every=2, eval_every=4)
    ref = cli("train", recipe, "-o", tmp_path / "ref", nproc=nproc)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    proc = cli("train", recipe, "-o", run, nproc=nproc, env={"PEFTCLI_FAULT": "step_delay=0.25"}, popen=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step-4" / checkpoint.MARKER).exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.6))  # somewhere inside a step, an eval or the next checkpoint
    _kill_tree(proc)
    assert not (run / "peftcli.json").exists(), "killed too late: the run had finished"
    done = max(e["step"] for e in metrics(run))
    assert done < 10

    res = cli("train", recipe, "-o", run, "--resume", nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    got, want = adapter(run), adapter(tmp_path / "ref")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k  # bit-identical, not close
    steps = [e["step"] for e in metrics(run) if "loss" in e]
    assert steps == list(range(1, 11))  # what the killed run logged after its checkpoint was dropped
    assert [e["loss"] for e in metrics(run) if "loss" in e] == [e["loss"] for e in metrics(tmp_path / "ref") if "loss" in e]


def test_kill_inside_checkpoint_write_resumes_from_the_previous_one(lm_recipe, tmp_path):
    recipe = lm_recipe(max_steps=6, save_every=2, eval_every=None)
    ref = cli("train", recipe, "-o", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    proc = cli("train", recipe, "-o", run, env={"PEFTCLI_FAULT": "kill_in_save=4"})
    assert proc.returncode == -9
    ck = run / "checkpoints"
    assert (ck / "step-2" / checkpoint.MARKER).is_file() and not (ck / "step-4").exists()
    partial = ck / ".step-4.tmp"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / checkpoint.MARKER).exists()
    res = cli("train", recipe, "-o", run, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step-2 at step 2" in " ".join(res.stdout.split()) and not partial.exists()
    got, want = adapter(run), adapter(tmp_path / "ref")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("opts", [
    {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "target_modules": "all-linear"},  # EMAs, masks
    {"name": "lora", "r": 4, "init": "pissa", "target_modules": "all-linear"},  # residual base, rank-2r save form
    {"name": "lora", "r": 4, "dropout": 0.2, "target_modules": "all-linear"},  # the RNG stream
    {"name": "fish", "density": 0.02, "num_samples": 8},  # a data-chosen mask, recomputed on resume
    {"name": "lt_sft", "density": 0.02, "full_steps": 2},  # a first phase, re-run on resume
    {"name": "child_tuning", "mode": "f", "reserve_p": 0.5},  # per-step gradient masks
], ids=["adalora", "pissa", "lora-dropout", "fish", "lt_sft", "child_tuning_f"])
def test_resume_restores_method_state_and_rng(lm_recipe, tmp_path, opts):
    recipe = lm_recipe(max_steps=8, save_every=4, eval_every=None)
    method = ["--set", f"method={json.dumps(opts)}"]
    assert invoke("train", recipe, "-o", tmp_path / "ref", *method).exit_code == 0
    # the state a run killed after its step-4 checkpoint leaves behind
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step-4", tmp_path / "run" / "checkpoints" / "step-4")
    result = invoke("train", recipe, "-o", tmp_path / "run", "--resume", *method)
    assert result.exit_code == 0, result.output
    got, want = adapter(tmp_path / "run"), adapter(tmp_path / "ref")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_refuses_a_changed_recipe_and_a_finished_run(lm_recipe, tmp_path):
    recipe = lm_recipe(max_steps=4, save_every=2, eval_every=None)
    assert invoke("train", recipe).exit_code == 0
    shutil.copytree(tmp_path / "out" / "checkpoints", tmp_path / "part" / "checkpoints")
    changed = invoke("train", recipe, "-o", tmp_path / "part", "--resume", "--set", "train.lr=0.1")
    assert changed.exit_code == 2 and "train.lr" in changed.stderr and len(changed.stderr.strip().splitlines()) == 1
    finished = invoke("train", recipe, "--resume")
    assert finished.exit_code == 2 and "finished run" in finished.stderr
    fresh = invoke("train", recipe, "-o", tmp_path / "new", "--resume")  # nothing to resume: a new run
    assert fresh.exit_code == 0 and "starting from step 0" in " ".join(fresh.stdout.split())


def test_resume_of_a_checkpoint_from_an_older_peftcli(lm_recipe, tmp_path):
    """A checkpoint written before a recipe key existed (its stored recipe lacks train.tf32 and a method
    default) resumes: the stored recipe takes today's defaults. A key that is gone today is still named."""
    import yaml

    recipe = lm_recipe(max_steps=4, save_every=2, eval_every=None)
    assert invoke("train", recipe).exit_code == 0
    part = tmp_path / "part" / "checkpoints" / "step-2"
    shutil.copytree(tmp_path / "out" / "checkpoints" / "step-2", part)
    stored = part / "recipe.yaml"
    old = yaml.safe_load(stored.read_text())
    del old["train"]["tf32"], old["method"]["dropout"]
    stored.write_text(yaml.safe_dump(old))
    res = invoke("train", recipe, "-o", tmp_path / "part", "--resume")
    assert res.exit_code == 0, res.output
    assert "resumed from" in " ".join(res.stdout.split())
    got, want = adapter(tmp_path / "part"), adapter(tmp_path / "out")
    assert all(torch.equal(got[k], want[k]) for k in want)

    shutil.copytree(tmp_path / "out" / "checkpoints" / "step-2", tmp_path / "gone" / "checkpoints" / "step-2")
    old["train"]["warmup_epochs"] = 1  # a key this peftcli does not know
    (tmp_path / "gone" / "checkpoints" / "step-2" / "recipe.yaml").write_text(yaml.safe_dump(old))
    res = invoke("train", recipe, "-o", tmp_path / "gone", "--resume")
    assert res.exit_code == 2 and "train.warmup_epochs" in res.stderr


# ----------------------------------------------------------------- faults
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(lm_recipe, tmp_path):
    recipe = lm_recipe(max_steps=6, save_every=2, eval_every=None)
    result = invoke("train", recipe, env={"PEFTCLI_FAULT": "disk_full_in_save=4"})
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "No space left on device" in line and "step-2" in line, line
    ck = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-2"] and (ck / "step-2" / checkpoint.MARKER).is_file()
    state = torch.load(ck / "step-2" / checkpoint.STATE, weights_only=False)
    assert state["step"] == 2 and state["trainable"] and state["optimizer"]["state"]


def test_nan_loss_stops_naming_the_step_or_is_skipped(lm_recipe, tmp_path):
    recipe = lm_recipe(max_steps=5, save_every=2, eval_every=None)
    stop = invoke("train", recipe, env={"PEFTCLI_FAULT": "nan_at_step=3"})
    assert stop.exit_code == 1
    line = stop.stderr.strip()
    assert len(line.splitlines()) == 1 and "at step 3" in line and "step-2" in line and "Traceback" not in stop.output, line
    assert (tmp_path / "out" / "checkpoints" / "step-2" / checkpoint.MARKER).is_file()
    assert not (tmp_path / "out" / "peftcli.json").exists()

    skip = invoke("train", recipe, "-o", tmp_path / "skip", "--set", "train.on_nan=skip", "--json",
                  env={"PEFTCLI_FAULT": "nan_at_step=3"})
    assert skip.exit_code == 0, skip.output
    assert json.loads(skip.stdout)["skipped_steps"] == 1
    m = metrics(tmp_path / "skip")
    assert [e["step"] for e in m if "skipped" in e] == [3] and [e["step"] for e in m if "loss" in e and "skipped" not in e] == [1, 2, 4, 5]
    assert all(torch.isfinite(t).all() for t in adapter(tmp_path / "skip").values())


def test_keep_checkpoints_keeps_the_newest(lm_recipe, tmp_path):
    recipe = lm_recipe(max_steps=5, save_every=1, keep_checkpoints=2, eval_every=None)
    assert invoke("train", recipe).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_a_recipe_that_cannot_train_fails_before_overwrite_deletes(lm_recipe, tmp_path):
    recipe = lm_recipe()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("previous run")
    bad = ["--set", 'method={"name": "adalora", "tinit": 4, "tfinal": 3}']
    result = invoke("train", recipe, "--overwrite", *bad)
    assert result.exit_code == 2 and "method.tinit" in result.stderr
    assert (tmp_path / "out" / "precious.txt").read_text() == "previous run"


def test_fsdp_on_cpu_and_missing_deepspeed_are_clear_errors(lm_recipe, monkeypatch):
    from peftcli.distributed import make_accelerator
    from peftcli.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="fsdp runs on GPUs only"):
        make_accelerator("no", "fsdp")
    monkeypatch.delenv("WORLD_SIZE")
    result = invoke("train", lm_recipe(), "--set", "train.distributed=deepspeed")
    assert result.exit_code == 2 and "pip install deepspeed" in result.stderr


def test_fsdp2_sharded_adapter_and_resume_state_are_gathered_whole(tmp_path):
    """Accelerate runs FSDP on GPUs only, so this drives torch's fully_shard over gloo directly (2 processes)
    and checks the save path: every process gathers, the main one writes the same tensors a single process would;
    and the checkpoint's optimizer and parameter state round-trips through the shards."""
    save_tiny(tmp_path / "llama", "llama")
    worker = Path(__file__).parent / "fsdp_worker.py"
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert sharded.keys() == single.keys() and len(single) == 28
    for k in single:
        assert sharded[k].shape == single[k].shape and sharded[k].numel() > 0
        assert (sharded[k] - single[k]).abs().max() < 1e-5, k
    report = json.loads((tmp_path / "fsdp" / "sharded.json").read_text())
    assert report["lora_A_local_rows"] == 2  # it really was sharded (4 rows over 2 processes)
    # resume state: the gathered AdamW moments equal the unsharded run's; saved state loads back into the shards
    assert report["optim_max_diff"] < 1e-5 and report["optim_roundtrip"] and report["param_roundtrip"], report
