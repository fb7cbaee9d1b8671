"""The training path, straight through: recipe -> tokenizer -> data -> model -> method -> loop -> save.

Runs on one CPU, one GPU, or many processes under `accelerate launch`; only the main process
prints and writes. Methods plug in through `extra_loss` and `on_optimizer_step`, never by editing
the loop.
"""

from __future__ import annotations

import ctypes
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from peftcli import adapter_io
from peftcli.errors import UserError
from peftcli.recipe import Recipe


def check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir: {path} exists and is a file; choose another --output-dir")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"output.dir: {path} already holds a run; pass --overwrite to replace it or choose another --output-dir")


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


def _scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@torch.no_grad()
def evaluate(model, loader, accelerator, task: str) -> dict:
    model.eval()
    loss_sum, count, correct, seen = 0.0, 0, 0, 0
    for batch in loader:
        loss, logits = model(**batch)
        if task == "seq-cls":
            preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
            correct += (preds == labels).sum().item()
            seen += labels.numel()
            n = batch["labels"].numel()
        else:
            n = (batch["labels"][:, 1:] != -100).sum().item()
        loss_sum += loss.item() * n
        count += n
    model.train()
    result = {"eval_loss": loss_sum / max(count, 1)}
    if task == "seq-cls":
        result["eval_accuracy"] = correct / max(seen, 1)
    return result


def run_training(recipe: Recipe, output_dir: str | None = None, overwrite: bool = False, console=None) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from rich.console import Console

    from peftcli.data import Collator, prepare
    from peftcli.generation import generation_eval
    from peftcli.loss import LossModel
    from peftcli.methods import build_method
    from peftcli.models import fingerprint, load_model, load_tokenizer, quiet_transformers
    from peftcli.progress import TrainProgress

    quiet_transformers()
    console = console or Console()
    tcfg, mcfg = recipe.train, recipe.model
    out_dir = Path(output_dir or recipe.output.dir)
    check_output_dir(out_dir, overwrite)
    if tcfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on CPU")
    # accelerate keeps one global state per process; a second run in the same process (tests, notebooks)
    # may ask for another precision, so forget the previous run's (the process group stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=tcfg.mixed_precision, gradient_accumulation_steps=tcfg.grad_accum)
    main = accelerator.is_main_process
    say = console.print if main else (lambda *a, **k: None)
    set_seed(tcfg.seed)
    if tcfg.mmap_large_tensors:
        mmap_large_tensors()

    # Cheap failures first: tokenizer and data before the (slow) model.
    tokenizer = load_tokenizer(mcfg)
    data = prepare(recipe.data, tokenizer, mcfg.task, seed=tcfg.seed)
    loaded = load_model(mcfg, tokenizer, label_names=data.label_names, seed=tcfg.seed)
    model = loaded.model
    base_fp = fingerprint(model, exclude=loaded.new_modules)
    method = build_method(recipe.method_options)
    method.apply(model, mcfg.task, also_save=loaded.new_modules)
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    say(f"[bold]{method.name}[/] on {mcfg.name_or_path}: {n_train:,} trainable of {n_total:,} parameters "
        f"({100 * n_train / n_total:.4f}%), {len(data.train)} train / {len(data.eval or [])} eval examples"
        + (f", {data.dropped} rows dropped (prompt longer than data.max_length)" if data.dropped else ""))

    if overwrite and main and out_dir.is_dir():
        shutil.rmtree(out_dir)  # only now: a recipe that fails validation never costs the old run
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    recipe_yaml = yaml.safe_dump(recipe.resolved(), sort_keys=False)

    collate = Collator(tokenizer.pad_token_id, recipe.data.max_length if recipe.data.padding == "max_length" else None)
    generator = torch.Generator().manual_seed(tcfg.seed)
    train_dl = torch.utils.data.DataLoader(data.train, batch_size=tcfg.batch_size, shuffle=True, collate_fn=collate,
                                           generator=generator, num_workers=tcfg.num_workers)
    eval_dl = (torch.utils.data.DataLoader(data.eval, batch_size=tcfg.eval_batch_size or tcfg.batch_size, collate_fn=collate)
               if data.eval else None)
    updates_per_epoch = max(1, math.ceil(len(train_dl) / (tcfg.grad_accum * accelerator.num_processes)))
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * updates_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = _scheduler(optimizer, tcfg, total_steps)
    inner = model
    model, optimizer, train_dl, scheduler = accelerator.prepare(LossModel(model, mcfg.task), optimizer, train_dl, scheduler)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)

    meta = {
        "base": {"name_or_path": mcfg.name_or_path, "gguf_file": mcfg.gguf_file, "task": mcfg.task, "dtype": mcfg.dtype,
                 "fingerprint": base_fp, "label_names": data.label_names, "new_modules": loaded.new_modules,
                 "trust_remote_code": mcfg.trust_remote_code},
        "trainable_params": n_train, "total_params": n_total,
    }
    metrics_path = out_dir / "metrics.jsonl"

    def log(entry: dict) -> None:
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    summary: dict = {}
    gen_cfg = tcfg.generation_eval
    if gen_cfg and gen_cfg.before and data.eval_rows and main:
        before = generation_eval(inner, tokenizer, recipe.data, data.eval_rows, gen_cfg)
        summary["generation_before"] = before["score"]
        say(f"generation eval before training: {gen_cfg.metric} = {before['score']:.3f} on {before['n']} examples")
        log({"step": 0, "generation_score": before["score"]})

    model.train()
    step, tokens, t0 = 0, 0, time.perf_counter()
    last_loss = float("nan")
    window_tokens, window_t = 0, time.perf_counter()
    progress = TrainProgress(total_steps, enabled=main, console=console)
    with progress:
        while step < total_steps:
            for batch in train_dl:
                with accelerator.accumulate(model):
                    task_loss, _ = model(**batch)
                    loss = task_loss
                    extra = method.extra_loss(inner)
                    if extra is not None:
                        loss = loss + extra
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tcfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, tcfg.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        method.on_optimizer_step(inner, step + 1, total_steps)
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                batch_tokens = int(batch["attention_mask"].sum()) * accelerator.num_processes
                tokens += batch_tokens
                window_tokens += batch_tokens
                last_loss = task_loss.item()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t, 1e-9)
                window_tokens, window_t = 0, now
                lr = scheduler.get_last_lr()[0]
                progress.update(step, loss=last_loss, lr=lr, tps=tps)
                if step % tcfg.log_every == 0 or step == total_steps:
                    log({"step": step, "loss": last_loss, "lr": lr, "tokens_per_s": tps, "elapsed_s": now - t0})
                if eval_dl is not None and tcfg.eval_every and step % tcfg.eval_every == 0 and step < total_steps:
                    result = evaluate(model, eval_dl, accelerator, mcfg.task)
                    log({"step": step, **result})
                    progress.note(_fmt_eval(step, result))
                if tcfg.save_every and step % tcfg.save_every == 0 and step < total_steps:
                    accelerator.wait_for_everyone()
                    if main:
                        adapter_io.write_checkpoint(out_dir, step, method, inner, meta)
                if step >= total_steps:
                    break
    train_time = time.perf_counter() - t0
    summary.update(steps=step, train_loss=last_loss, train_time_s=round(train_time, 2),
                   tokens_per_s=round(tokens / max(train_time, 1e-9), 1))
    if eval_dl is not None:
        result = evaluate(model, eval_dl, accelerator, mcfg.task)
        log({"step": step, **result})
        summary.update(result)
        say(_fmt_eval(step, result))
    if gen_cfg and data.eval_rows and main:
        after = generation_eval(inner, tokenizer, recipe.data, data.eval_rows, gen_cfg)
        summary["generation_after"] = after["score"]
        log({"step": step, "generation_score": after["score"]})
        before_s = f"{summary['generation_before']:.3f} -> " if "generation_before" in summary else ""
        say(f"generation eval ({gen_cfg.metric}, {after['n']} held-out examples): {before_s}{after['score']:.3f}")
        for ex in after["examples"][:2]:
            say(f"  [dim]output:[/]    {ex['output'][:120]}\n  [dim]reference:[/] {ex['reference'][:120]}")
    accelerator.wait_for_everyone()
    if main:
        meta["metrics"] = summary
        adapter_io.write_adapter(out_dir, method, inner, meta, recipe_yaml)
        say(f"adapter written to [bold]{out_dir}[/] ({(out_dir / adapter_io.WEIGHTS).stat().st_size:,} bytes) "
            f"in {train_time:.1f}s, {summary['tokens_per_s']:.0f} tokens/s")
    accelerator.end_training()
    return {"output_dir": str(out_dir), **summary}


def _fmt_eval(step: int, result: dict) -> str:
    return f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
