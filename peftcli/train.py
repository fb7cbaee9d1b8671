"""The training path, straight through: recipe -> tokenizer -> data -> model -> method -> loop -> save.

One `Trainer` with named parts: `setup` (model, method, data order, optimizer; everything that can fail
fails here, before a previous run is deleted), `train_step` (one optimizer step), `evaluate`,
`save_state` / `load_state` (checkpoints, peftcli.checkpoint) and `run`, the loop itself.

Runs on one CPU, one GPU, or N processes (torchrun, `accelerate launch`, `peftcli train --num-processes N`):
DDP over NCCL on GPUs, over gloo on CPUs. Only the main process prints and writes. Every process sees the
same global batch order (peftcli.distributed), and the loss is normalised by the number of label tokens
of the whole optimizer step over all processes and micro-batches, so N processes x b rows, 1 process x N*b
rows and grad_accum N x b rows make the same update. Methods plug in through `extra_loss`,
`on_optimizer_step` and `training_state`, never by editing the loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from peftcli import adapter_io, checkpoint
from peftcli.errors import UserError
from peftcli.recipe import Recipe, recipe_from_dict


class TrainingStopped(Exception):
    """Training cannot go on (a NaN loss); the message names the step and the checkpoint kept."""


def check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir: {path} exists and is a file; choose another --output-dir")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        hint = ", --resume to continue it" if checkpoint.latest(path) else ""
        raise UserError(f"output.dir: {path} already holds a run; pass --overwrite to replace it{hint} or choose another --output-dir")


def mmap_large_tensors() -> None:
    """glibc raises its mmap threshold after large frees, so activation memory freed by one step stays
    in the heap and fragments. A fixed 1 MiB threshold serves large tensors from mmap and returns them on
    free: SmolLM2 batch 4x256, 10 steps, peak RSS 3.1 -> 2.6 GB. The price is a page fault per touched page
    of every new tensor: 1.45x slower steps there, 1.6x on MiniLM (batch 32x64), hence opt-in
    (train.mmap_large_tensors) for when memory, not time, is the limit."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass  # not glibc (musl, ...): nothing to tune


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on a GPU, so that a clock read next counts them (CUDA runs asynchronously:
    without this a step's time would end when its last kernel was queued, not when it ran)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_memory(device: torch.device) -> dict:
    """The GPU's peak memory held by tensors so far in this process (torch.cuda.max_memory_allocated, MiB);
    nothing on CPU, where the process's peak RSS is the measure."""
    if device.type != "cuda":
        return {}
    return {"max_memory_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def _scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _loss_sum(mean: torch.Tensor, n: int) -> torch.Tensor:
    """A batch's summed loss from its mean over n label terms; an all-masked batch adds nothing (but keeps
    the graph, so DDP still sees every parameter)."""
    return mean.float() * n if n else mean.float().nan_to_num() * 0.0


def _recipe_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _recipe_diff(x, y, f"{prefix}{k}.")
        elif x != y:
            keys.append(f"{prefix}{k}")
    return keys


class Trainer:
    def __init__(self, recipe: Recipe, output_dir: str | None = None, overwrite: bool = False, resume: bool = False,
                 console=None):
        from rich.console import Console

        self.recipe, self.overwrite = recipe, overwrite
        self.resume = resume or recipe.train.resume == "auto"
        self.console = console or Console()
        self.out_dir = Path(output_dir or recipe.output.dir)
        self.tcfg, self.mcfg = recipe.train, recipe.model

    # ------------------------------------------------------------- set-up
    def setup(self) -> None:
        from accelerate.utils import gather_object, set_seed

        from peftcli.data import Collator, prepare
        from peftcli.distributed import has_gpu, make_accelerator, single_process_launch_warning
        from peftcli.generation import check_generation_eval
        from peftcli.methods import build_method
        from peftcli.models import fingerprint, load_model, load_tokenizer, quiet_transformers

        quiet_transformers()
        tcfg, mcfg, out_dir = self.tcfg, self.mcfg, self.out_dir
        if not self.resume:
            check_output_dir(out_dir, self.overwrite)
        if tcfg.report_to == "tensorboard":
            from peftcli.report import require_tensorboard

            require_tensorboard()
        if tcfg.mixed_precision == "fp16" and not has_gpu():
            raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on CPU")
        if tcfg.tf32:  # process-wide; run() puts back the previous setting when it returns
            torch.set_float32_matmul_precision("high")
        self.accelerator = acc = make_accelerator(tcfg.mixed_precision, tcfg.distributed, tcfg.deepspeed_config)
        self.main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.say = self.console.print if self.main else (lambda *a, **k: None)
        if (warning := single_process_launch_warning()) is not None:
            self.say(f"[yellow]warning:[/] {warning}")
        set_seed(tcfg.seed)
        if tcfg.mmap_large_tensors:
            mmap_large_tensors()

        # Cheap failures first: tokenizer and data before the (slow) model.
        self.tokenizer = load_tokenizer(mcfg)
        self.data = data = prepare(self.recipe.data, self.tokenizer, mcfg.task, seed=tcfg.seed)
        check_generation_eval(self.recipe, data)
        loaded = load_model(mcfg, self.tokenizer, label_names=data.label_names, seed=tcfg.seed)
        self.inner = model = loaded.model
        base_fp = fingerprint(model, exclude=loaded.new_modules)
        self.method = method = build_method(self.recipe.method_options)
        method.apply(model, mcfg.task, also_save=loaded.new_modules)
        if method.opts.init_from:  # continue an adapter (peftcli's or HF PEFT's): its tensors, before the optimizer
            adapter_io.continue_from(method, model, method.opts.init_from, base_fp)
        if self.recipe.data.packing:
            from peftcli.loss import packing_problem

            if (problem := packing_problem(model, mcfg.task)) is not None:
                raise UserError(problem)
        if tcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph

        self._plan()
        self.recipe_resolved = self.recipe.resolved()
        self.start_ckpt = self._find_checkpoint()

        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())
        eff = self.batches.global_size
        self.say(f"[bold]{method.name}[/] on {mcfg.name_or_path}: {n_train:,} trainable of {n_total:,} parameters "
                 f"({100 * n_train / n_total:.4f}%), "
                 + (f"{data.rows} train rows packed into {len(data.train)} blocks" if self.recipe.data.packing else f"{len(data.train)} train")
                 + f" / {len(data.eval or [])} eval examples"
                 + (f", {data.dropped} rows dropped (prompt longer than data.max_length)" if data.dropped else "")
                 + f"; {self.world} process{'es' if self.world > 1 else ''} ({acc.distributed_type.value}, {acc.device.type}), "
                 f"effective batch {eff} = {tcfg.batch_size} per process x {self.world} x {tcfg.grad_accum} accumulation")

        # Everything that can fail on the user's input has run: only now may the old run go.
        if self.main and self.overwrite and self.start_ckpt is None and out_dir.is_dir():
            shutil.rmtree(out_dir)
        if self.main:
            out_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()

        self._assemble(Collator(self.tokenizer.pad_token_id,
                                self.recipe.data.max_length if self.recipe.data.padding == "max_length" else None))
        if (n_now := sum(p.numel() for p in model.parameters() if p.requires_grad)) != n_train:  # data-chosen masks
            n_train = n_now
            self.say(f"{method.name}: {n_train:,} trainable parameters ({100 * n_train / n_total:.4f}%) after choosing the mask")

        processes = gather_object([{
            "rank": acc.process_index, "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "pid": os.getpid(), "device": str(acc.device)}])
        self.meta = {
            "base": {"name_or_path": mcfg.name_or_path, "gguf_file": mcfg.gguf_file, "task": mcfg.task, "dtype": mcfg.dtype,
                     "fingerprint": base_fp, "label_names": data.label_names, "new_modules": loaded.new_modules,
                     "trust_remote_code": mcfg.trust_remote_code},
            "trainable_params": n_train, "total_params": n_total,
            "num_processes": self.world, "effective_batch": eff,
            "distributed": {"type": acc.distributed_type.value, "mode": tcfg.distributed if self.world > 1 else None,
                            "processes": processes},
        }
        self.recipe_yaml = yaml.safe_dump(self.recipe_resolved, sort_keys=False)

    def _plan(self) -> None:
        """The global batch order and the step count; the method checks it can work with them."""
        from peftcli.distributed import GlobalBatches, label_count

        tcfg, data = self.tcfg, self.data
        self.batches = GlobalBatches(len(data.train), tcfg.batch_size, self.world, tcfg.grad_accum, tcfg.seed)
        self.counts = [label_count(ex) for ex in data.train]
        self.eval_counts = [label_count(ex) for ex in data.eval] if data.eval else []
        self.total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * self.batches.steps_per_epoch))
        self.method.validate_training(self.total_steps)

    def _assemble(self, collate) -> None:
        """The method's data-dependent part, then optimizer and schedule on the trainable parameters and the
        loss model wrapped by Accelerate."""
        from peftcli.loss import LossModel

        self.collate = collate
        self.loss_module = LossModel(self.inner, self.mcfg.task)
        self.method.before_training(self.inner, self)
        params = [p for p in self.inner.parameters() if p.requires_grad]
        # fused AdamW: one kernel per parameter; the default per-tensor loop costs ~10 small ops per LoRA matrix,
        # 0.2 s a step on SmolLM2 at one CPU thread (several seconds on a loaded one). Not with sharded parameters.
        fused = self.tcfg.distributed == "ddp" and all(p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(params, lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay, fused=fused or None)
        # the scheduler stays unprepared: Accelerate would step it once per process per optimizer step
        self.scheduler = _scheduler(optimizer, self.tcfg, self.total_steps)
        # self.model: Accelerate's wrapper (DDP) for training; self.loss_module, the same module unwrapped (with
        # Accelerate's autocast), for evaluation and method phases: no DDP collectives on uneven shards
        self.model, self.optimizer = self.accelerator.prepare(self.loss_module, optimizer)
        self.params = [p for p in self.inner.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters

    @classmethod
    def for_model(cls, model, method, rows: list[dict], task: str = "causal-lm", pad_id: int = 0, **train) -> Trainer:
        """A trainer on an in-memory model with `method` applied and tokenized rows ({input_ids, labels}):
        the same train_step as `peftcli train`, for tests and notebooks. `train`: train.* recipe keys."""
        from peftcli.data import Collator, Prepared
        from peftcli.distributed import make_accelerator
        from peftcli.recipe import ModelCfg, TrainCfg

        self = cls.__new__(cls)
        self.tcfg, self.mcfg = TrainCfg(**train), ModelCfg(name_or_path="(in memory)", task=task)
        self.accelerator = make_accelerator(self.tcfg.mixed_precision)
        self.main, self.rank, self.world = True, 0, 1
        self.inner, self.method, self.data = model, method, Prepared(rows, None)
        self.out_dir, self.console = None, None
        self._plan()
        self._assemble(Collator(pad_id))
        return self

    def _find_checkpoint(self) -> Path | None:
        if not self.resume:
            return None
        out = self.out_dir
        if (out / adapter_io.META).is_file():
            if self.overwrite:
                return None
            raise UserError(f"output.dir: {out} holds a finished run; pass --overwrite to train again")
        ckpt = checkpoint.latest(out)
        if ckpt is None:
            if out.is_dir() and any(p.name != "checkpoints" for p in out.iterdir()):
                raise UserError(f"--resume: {out} has no complete checkpoint to continue from; pass --overwrite to start over")
            self.say(f"no checkpoint in {out}: starting from step 0")
            return None
        try:
            saved = yaml.safe_load((ckpt / adapter_io.RECIPE).read_text())
        except (OSError, yaml.YAMLError):
            saved = None
        if not isinstance(saved, dict):
            raise UserError(f"--resume: {ckpt} has no readable {adapter_io.RECIPE}; pass --overwrite to start over")
        try:  # today's defaults for keys a newer peftcli added since the checkpoint was written (train.tf32)
            saved = recipe_from_dict(saved, str(ckpt / adapter_io.RECIPE)).resolved()
        except UserError:
            pass  # a key since removed or renamed: compared as written, so the diff names it
        mine = dict(self.recipe_resolved)
        mine["train"] = {**mine["train"], "resume": saved.get("train", {}).get("resume")}
        diff = _recipe_diff(saved, mine)
        if diff:
            raise UserError(f"--resume: the recipe differs from the one {ckpt} was trained with at {', '.join(diff[:5])}; "
                            "resume with the same recipe or pass --overwrite to start over")
        return ckpt

    # ------------------------------------------------------------- one optimizer step
    def collated(self, rows: list[dict]) -> dict:
        return {k: v.to(self.accelerator.device) for k, v in self.collate(rows).items()}

    def sample_rows(self, n: int) -> list[dict]:
        """The first n training rows in the run's (seeded) order, the same on every process."""
        order = self.batches.order(0)
        return [self.data.train[i] for i in order[:n]]

    def dense_phase(self, optimizer, steps: int, label: str) -> None:
        """A method's own phase before the main run (LT-SFT's full fine-tuning): steps over the run's first
        global batches with the same loss normalisation, on the unwrapped model, identical on every process."""
        from peftcli.progress import TrainProgress

        tcfg, data = self.tcfg, self.data
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.loss_module.train()
        with TrainProgress(steps, enabled=self.main, console=self.console, label=label) as progress:
            for step in range(steps):
                t0 = time.perf_counter()
                idx = self.batches.step_indices(step)
                total, loss_sum, tokens = sum(self.counts[i] for i in idx), 0.0, 0
                for a in range(0, len(idx), tcfg.batch_size):
                    chunk = idx[a:a + tcfg.batch_size]
                    batch = self.collated([data.train[i] for i in chunk])
                    n = sum(self.counts[i] for i in chunk)
                    mean, _ = self.loss_module(**batch)
                    part = _loss_sum(mean, n)
                    (part / max(total, 1)).backward()
                    loss_sum, tokens = loss_sum + part.item(), tokens + int(batch["attention_mask"].sum())
                if tcfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                progress.update(step + 1, loss=loss_sum / max(total, 1), lr=optimizer.param_groups[0]["lr"],
                                tps=tokens / max(time.perf_counter() - t0, 1e-9))

    def train_step(self, step: int) -> dict:
        """Optimizer step number `step + 1` over this process's micro-batches of global batch `step`.
        Returns the step's mean loss over all its label tokens (all processes), its tokens, and whether the
        update was skipped (train.on_nan: skip)."""
        acc, tcfg, data = self.accelerator, self.tcfg, self.data
        micro = self.batches.micro_batches(step, self.rank)
        total = sum(self.counts[i] for i in self.batches.step_indices(step))  # over all processes
        scale = self.world / max(total, 1)  # DDP averages over processes: undo it, then divide by the step's tokens
        nan_fault = checkpoint.fault("nan_at_step") == step + 1
        loss_sum = torch.zeros((), device=acc.device)
        tokens = 0
        self.model.train()
        for m, idx in enumerate(micro):
            batch = self.collated([data.train[i] for i in idx])
            n = sum(self.counts[i] for i in idx)
            sync = m == len(micro) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                mean, _ = self.model(**batch)
                part = _loss_sum(mean, n)
                if nan_fault:
                    part = part * float("nan")
                loss = part * scale
                extra = self.method.extra_loss(self.inner)
                if extra is not None:
                    loss = loss + extra / len(micro)
                acc.backward(loss)
            loss_sum += part.detach()
            tokens += int(batch["attention_mask"].sum())
        stats = torch.stack([loss_sum, torch.tensor(float(tokens), device=acc.device)])
        if self.world > 1:
            stats = acc.reduce(stats, reduction="sum")
        step_loss, tokens = (stats[0] / max(total, 1)).item(), int(stats[1].item())
        norm = acc.clip_grad_norm_(self.params, tcfg.max_grad_norm) if tcfg.max_grad_norm else None
        finite = math.isfinite(step_loss) and (norm is None or bool(torch.isfinite(torch.as_tensor(norm))))
        skipped = False
        if not finite:
            if tcfg.on_nan == "stop":
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingStopped(self._nan_message(step + 1, step_loss))
            skipped = True  # the data position and the schedule go on; the weights stay
        else:
            self.method.before_optimizer_step(self.inner, step + 1)
            self.optimizer.step()
            self.method.on_optimizer_step(self.inner, step + 1, self.total_steps)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": step_loss, "tokens": tokens, "skipped": skipped}

    def _nan_message(self, step: int, value: float) -> str:
        last = checkpoint.latest(self.out_dir) if self.out_dir is not None else None
        keep = (f"the last good checkpoint {last} is kept (resume it with --resume after lowering train.lr)"
                if last else "no checkpoint was written yet")
        return f"loss became {value} at step {step}; {keep}, or set train.on_nan: skip to skip such updates"

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Eval loss (mean over label tokens) and seq-cls accuracy over all processes' shards."""
        from peftcli.distributed import shard

        acc, data = self.accelerator, self.data
        bs = self.tcfg.eval_batch_size or self.tcfg.batch_size
        rows = shard(len(data.eval), self.rank, self.world)
        n_batches = math.ceil(math.ceil(len(data.eval) / self.world) / bs)  # the same on every process
        sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # loss sum, label terms, correct, seen
        self.loss_module.eval()
        for b in range(n_batches):
            idx = rows[b * bs:(b + 1) * bs]
            batch = self.collated([data.eval[i] for i in idx or [0]])  # a shorter shard runs a dummy batch, counted 0
            mean, logits = self.loss_module(**batch)
            if not idx:
                continue
            n = sum(self.eval_counts[i] for i in idx)
            if n:
                sums[0] += mean.double() * n
                sums[1] += n
            if self.mcfg.task == "seq-cls":
                sums[2] += (logits.argmax(-1) == batch["labels"]).sum()
                sums[3] += batch["labels"].numel()
        self.loss_module.train()
        if self.world > 1:
            sums = acc.reduce(sums, reduction="sum")
        result = {"eval_loss": (sums[0] / sums[1].clamp(min=1)).item()}
        if self.mcfg.task == "seq-cls":
            result["eval_accuracy"] = (sums[2] / sums[3].clamp(min=1)).item()
        return result

    # ------------------------------------------------------------- checkpoints
    def save_state(self, step: int) -> None:
        # gathered on every process (collectives under FSDP), written by the main one
        tensors = adapter_io.adapter_tensors(self.method, self.inner)
        trainable = {n: adapter_io.full_tensor(p) for n, p in self.inner.named_parameters() if p.requires_grad}
        optim = checkpoint.optimizer_state(self.inner, self.optimizer.optimizer)

        def write_main(tmp: Path) -> None:
            adapter_io.write_adapter(tmp, self.method, self.inner, {**self.meta, "step": step}, self.recipe_yaml, tensors)
            state = {
                "step": step, "num_processes": self.world, "effective_batch": self.batches.global_size,
                "trainable": trainable, "optimizer": optim, "scheduler": self.scheduler.state_dict(),
                "method": self.method.training_state(self.inner),
            }
            checkpoint.torch_save(state, tmp / checkpoint.STATE)

        checkpoint.save(self.out_dir, step, self.accelerator, write_main, self.tcfg.keep_checkpoints)

    def load_state(self, ckpt: Path) -> int:
        state, rng = checkpoint.load_state(ckpt, self.rank)
        if state.get("num_processes") != self.world:
            raise UserError(f"--resume: {ckpt} was written by {state.get('num_processes')} process(es), this run has "
                            f"{self.world}; resume with the same number of processes")
        params = dict(self.inner.named_parameters())
        for name, value in state["trainable"].items():
            if name not in params:
                raise UserError(f"--resume: {ckpt} does not fit this model (no parameter {name}); pass --overwrite to start over")
            checkpoint.load_parameter(params[name], value)
        checkpoint.load_optimizer_state(self.inner, self.optimizer.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_training_state(self.inner, state["method"])
        checkpoint.set_rng_state(rng)
        return int(state["step"])

    # ------------------------------------------------------------- the loop
    def run(self) -> dict:
        precision = torch.get_float32_matmul_precision()  # train.tf32 changes it for this run only
        try:
            return self._run()
        finally:
            torch.set_float32_matmul_precision(precision)

    def _run(self) -> dict:
        from peftcli.generation import generation_eval
        from peftcli.progress import TrainProgress

        self.setup()
        tcfg, acc, data, out_dir = self.tcfg, self.accelerator, self.data, self.out_dir
        metrics_path = out_dir / "metrics.jsonl"
        summary: dict = {}
        step = 0
        if self.start_ckpt is not None:
            step = self.load_state(self.start_ckpt)
            if self.main:
                checkpoint.remove_partial(out_dir)
                summary.update(self._trim_metrics(metrics_path, step))
            self.say(f"resumed from {self.start_ckpt} at step {step} of {self.total_steps}")

        from peftcli import report

        reporter = report.Reporter(tcfg.report_to, out_dir, self.main)  # TensorBoard, when train.report_to asks

        def log(entry: dict) -> None:
            if self.main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
                reporter.log(entry)

        gen_cfg = tcfg.generation_eval
        if gen_cfg and gen_cfg.before and data.eval_rows and self.main and step == 0:
            before = generation_eval(self.inner, self.tokenizer, self.recipe.data, data.eval_rows, gen_cfg)
            summary["generation_before"] = before["score"]
            self.say(f"generation eval before training: {gen_cfg.metric} = {before['score']:.3f} on {before['n']} examples")
            log({"step": 0, "generation_score": before["score"]})

        delay = checkpoint.fault("step_delay") or 0.0
        tokens, t0, cpu0 = 0, time.perf_counter(), time.process_time()
        last_loss, skipped = float("nan"), 0
        progress = TrainProgress(self.total_steps, enabled=self.main, console=self.console)
        with progress:
            while step < self.total_steps:
                t_step = time.perf_counter()
                result = self.train_step(step)
                step += 1
                if delay:
                    time.sleep(delay)
                synchronize(acc.device)  # the step's GPU work is inside its time
                now = time.perf_counter()
                tokens += result["tokens"]
                tps = result["tokens"] / max(now - t_step, 1e-9)
                lr = self.scheduler.get_last_lr()[0]
                if result["skipped"]:
                    skipped += 1
                    log({"step": step, "skipped": "non-finite loss or gradient", "loss": str(result["loss"])})
                    progress.note(f"step {step}: loss {result['loss']}, update skipped (train.on_nan: skip)")
                else:
                    last_loss = result["loss"]
                progress.update(step, loss=last_loss, lr=lr, tps=tps)
                if not result["skipped"] and (step % tcfg.log_every == 0 or step == self.total_steps):
                    log({"step": step, "loss": last_loss, "lr": lr, "tokens": result["tokens"], "tokens_per_s": tps, "elapsed_s": now - t0,
                         "cpu_s": time.process_time() - cpu0, **device_memory(acc.device)})
                if data.eval and tcfg.eval_every and step % tcfg.eval_every == 0 and step < self.total_steps:
                    ev = self.evaluate()
                    log({"step": step, **ev})
                    progress.note(_fmt_eval(step, ev))
                if tcfg.save_every and step % tcfg.save_every == 0 and step < self.total_steps:
                    self.save_state(step)
        train_time = time.perf_counter() - t0
        summary.update(steps=step, train_loss=last_loss, train_time_s=round(train_time, 2),
                       tokens_per_s=round(tokens / max(train_time, 1e-9), 1), num_processes=self.world,
                       effective_batch=self.batches.global_size, **device_memory(acc.device))
        if skipped:
            summary["skipped_steps"] = skipped
        if data.eval:
            ev = self.evaluate()
            log({"step": step, **ev})
            summary.update(ev)
            self.say(_fmt_eval(step, ev))
        if gen_cfg and data.eval_rows and self.main:
            after = generation_eval(self.inner, self.tokenizer, self.recipe.data, data.eval_rows, gen_cfg)
            summary["generation_after"] = after["score"]
            log({"step": step, "generation_score": after["score"]})
            before_s = f"{summary['generation_before']:.3f} -> " if "generation_before" in summary else ""
            self.say(f"generation eval ({gen_cfg.metric}, {after['n']} held-out examples): {before_s}{after['score']:.3f}")
            for ex in after["examples"][:2]:
                self.say(f"  [dim]output:[/]    {ex['output'][:120]}\n  [dim]reference:[/] {ex['reference'][:120]}")
        tensors = adapter_io.adapter_tensors(self.method, self.inner)
        if self.main:
            reporter.close()
            report.plot_curve(out_dir)  # before the model card, which shows it
            adapter_io.write_adapter(out_dir, self.method, self.inner, {**self.meta, "metrics": summary}, self.recipe_yaml, tensors)
            self.say(f"adapter written to [bold]{out_dir}[/] ({(out_dir / adapter_io.WEIGHTS).stat().st_size:,} bytes) "
                     f"in {train_time:.1f}s, {summary['tokens_per_s']:.0f} tokens/s")
        acc.wait_for_everyone()
        acc.end_training()
        return {"output_dir": str(out_dir), **summary}

    @staticmethod
    def _trim_metrics(path: Path, step: int) -> dict:
        """Drop what a killed run logged after its last checkpoint; recover the before-training score."""
        if not path.is_file():
            return {}
        kept, found = [], {}
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if entry.get("step", 0) <= step:
                kept.append(line)
                if entry.get("step") == 0 and "generation_score" in entry:
                    found["generation_before"] = entry["generation_score"]
        adapter_io.atomic_write(path, "".join(line + "\n" for line in kept))
        return found


def run_training(recipe: Recipe, output_dir: str | None = None, overwrite: bool = False, console=None,
                 resume: bool = False) -> dict:
    return Trainer(recipe, output_dir, overwrite, resume, console).run()


def _fmt_eval(step: int, result: dict) -> str:
    return f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
