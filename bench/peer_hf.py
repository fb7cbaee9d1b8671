"""The anchor side of the benchmark: Hugging Face PEFT (`peft` + plain transformers + a plain torch loop).

This is meant to be an honest best use of `peft`: its documented API (`get_peft_model`, `LoraConfig`,
`PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`), torch's fused AdamW (what
transformers' Trainer uses by default with torch >= 2.8, `optim="adamw_torch_fused"`; peftcli uses it
too), transformers' default attention (SDPA), no gradient checkpointing, no handicaps. Every hyperparameter is read from the same recipe YAML (plus the same --set overrides) that
peftcli trains from, so both sides get identical settings.

Subcommands (each run is its own process, so the parent measures its peak RSS):
  train    LoRA on SmolLM2-135M, alpaca (response-only labels) or plain text (every token labelled), per-step
           metrics.jsonl (same keys as peftcli's); train.mixed_precision: bf16 runs the forward under
           torch.autocast (bf16), model.dtype: bfloat16 loads a bf16 base (PEFT keeps the adapters in fp32),
           train.tf32: true sets torch.set_float32_matmul_precision("high") (TF32 matmuls on a GPU)
  cls      SST-2 sequence classification with MiniLM: lora | ia3 | prompt | prefix | full
  merge    PeftModel.from_pretrained + merge_and_unload + save_pretrained
  latency  forward tokens/s of base vs merged vs unmerged adapter (interleaved rounds)
  versions print the versions in use

Devices: train and cls take --device auto|cpu|cuda (auto: cuda when torch.cuda.is_available()); the model and
every batch go there, autocast runs on that device type, on cuda the clock is read after torch.cuda.synchronize()
and each metrics line carries torch.cuda.max_memory_allocated (`max_memory_allocated_mb`, as peftcli logs it).
merge and latency run on the CPU.

Token counting (the same on both sides): each step logs its non-pad tokens (`tokens`), token positions
(batch x padded length, `positions`), positions that carry a next-token label (`label_tokens`) and the
causal query-key pairs of its sequences (`attn_pairs`, sum of L(L+1)/2), from which bench/run.py derives
the model FLOPs of the step (bench/README.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    data_file,
    get,
    load_recipe,
    minilm_location,
    peak_rss_mb_self,
    smollm2_location,
    train_hparams,
    versions,
    warmup_steps,
)

T0 = time.perf_counter()


def emit(out: Path, result: dict) -> None:
    result["peak_rss_mb_self"] = round(peak_rss_mb_self(), 1)
    result["process_s"] = round(time.perf_counter() - T0, 2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result))


def pick_device(choice: str):
    """torch.device for --device auto|cpu|cuda (auto: cuda when available); cuda without a GPU is an error."""
    import torch

    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    return torch.device(choice)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def synchronize(device) -> None:
    """On a GPU, wait for the queued kernels before a clock is read (CUDA runs asynchronously)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_memory(device) -> dict:
    """Peak GPU memory held by tensors in this process so far (MiB), the key peftcli logs; nothing on CPU."""
    import torch

    if device.type != "cuda":
        return {}
    return {"max_memory_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_data_path(p: str) -> Path:
    """Recipes may name data relative to the shared data folder (e.g. alpaca/alpaca_en_demo.json)."""
    path = Path(p)
    if path.is_absolute() and path.is_file():
        return path
    if path.is_file():
        return path.resolve()
    return data_file(str(p).removeprefix("../shared/data/"))


def make_optimizer(params, hp: dict):
    import torch
    from transformers import get_scheduler

    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"], fused=True)
    sched = get_scheduler(hp["scheduler"], opt, num_warmup_steps=warmup_steps(hp), num_training_steps=hp["max_steps"])
    return opt, sched


def loader(data: list[dict], bs: int, seed: int, collate):
    """Shuffled batches from a seeded generator, as peftcli's loop does (same seed -> same batches)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_size=bs, shuffle=True, generator=g, collate_fn=collate)


def batches(dl, n: int):
    """`n` batches, cycling through epochs."""
    done = 0
    while done < n:
        for b in dl:
            yield b
            done += 1
            if done == n:
                return


def seeded_load(fn, seed: int):
    """Load with the RNG seeded for a fresh head, leaving the caller's RNG stream untouched."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def collate(pad_id: int, pad_to: int | None):
    import torch

    def fn(rows: list[dict]) -> dict:
        width = pad_to or max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        seq = isinstance(rows[0]["labels"], list)
        labels = torch.full((len(rows), width), -100, dtype=torch.long) if seq else None
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            if seq:
                labels[i, :n] = torch.tensor(r["labels"])
        if not seq:
            labels = torch.tensor([r["labels"] for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return fn


# ---------------------------------------------------------------- causal LM (training throughput)

def encode_alpaca(tok, row: dict, max_length: int, system_prompt: str | None) -> dict | None:
    """SmolLM2 chat template; user = instruction (+ "\\n\\n" + input), assistant = output.
    Loss on the response tokens only (labels = the tokens after the common prefix of the generation
    prompt and the full conversation); truncated at max_length; rows with no response token left dropped."""
    user = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": user}]
    prompt = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    full_text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": row["output"]}], tokenize=False)
    full = tok(full_text, add_special_tokens=False)["input_ids"]
    n = 0
    for x, y in zip(prompt, full, strict=False):
        if x != y:
            break
        n += 1
    ids, labels = full[:max_length], ([-100] * n + full[n:])[:max_length]
    if all(x == -100 for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def encode_text(tok, text: str, max_length: int) -> dict:
    """Plain-text language modelling as peftcli's `format: text`: the tokenizer's special tokens, EOS
    appended, truncated at max_length, every token labelled."""
    ids = tok(text, add_special_tokens=True)["input_ids"]
    ids = (ids + ([tok.eos_token_id] if tok.eos_token_id is not None else []))[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def read_rows(path: Path) -> list[dict]:
    """A JSON list or JSON lines."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def model_dims(model) -> dict:
    """What bench/run.py needs for the model FLOPs of a step: parameters of the decoder's linear layers
    (frozen base), of the output head, the attention width and the layer count."""
    from torch import nn

    cfg = model.config
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and m is not head and "lora_" not in n)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"linear_params": linear, "head_params": head.weight.numel(), "layers": cfg.num_hidden_layers,
            "attn_width": heads * head_dim}


def load_smollm2(dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = smollm2_location()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=getattr(torch, dtype))
    q = getattr(model, "hf_quantizer", None)
    if q is not None and type(q).__name__ == "GgufHfQuantizer" and not getattr(q, "packed_modules", None):
        # transformers 5 keeps a GGUF quantizer on a model it has fully dequantised, and then refuses
        # save_pretrained ("quantized with gguf and is not serializable"); the weights are plain fp32.
        q.remove_quantization_config(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def lora_config_from(method: dict, task_type: str):
    from peft import LoraConfig

    kw = {
        "r": int(method.get("r", 8)),
        "lora_alpha": float(method.get("alpha", 16)),
        "lora_dropout": float(method.get("dropout", 0.0)),
        "target_modules": method.get("target_modules"),
        "use_rslora": bool(method.get("use_rslora", False)),
        "task_type": task_type,
    }
    for ours, theirs in (("exclude_modules", "exclude_modules"), ("layers_to_transform", "layers_to_transform"),
                         ("layers_pattern", "layers_pattern")):
        if method.get(ours) is not None:
            kw[theirs] = method[ours]
    if method.get("modules_to_save"):
        kw["modules_to_save"] = method["modules_to_save"]
    return LoraConfig(**kw)


def train_loop(model, dl, hp: dict, metrics_path: Path, autocast: bool = False, device=None) -> tuple[float, float]:
    """The plain loop: each batch moved to `device` (default: the model's), forward (under torch.autocast bf16
    on that device type with `autocast`, as PyTorch's AMP recipe has it: backward outside), backward, clip,
    AdamW step, scheduler step; one metrics line per step (lr logged after the scheduler step, like peftcli),
    its clock read after the device finished the step. Returns (train seconds, last loss)."""
    import contextlib

    import torch

    device = device or next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, hp)
    accum = hp["grad_accum"]
    model.train()
    synchronize(device)
    start = t_prev = time.perf_counter()
    cpu0 = time.process_time()
    loss_v = float("nan")
    it = batches(dl, hp["max_steps"] * accum)
    with open(metrics_path, "w") as mf:
        for step in range(1, hp["max_steps"] + 1):
            tokens = positions = label_tokens = pairs = 0
            for _ in range(accum):
                batch = next(it)
                # the step's counts from the host copy: no device round trip for them
                lengths = batch["attention_mask"].sum(-1)
                tokens += int(lengths.sum())
                positions += batch["input_ids"].numel()
                if batch["labels"].dim() == 2:
                    label_tokens += int((batch["labels"][:, 1:] != -100).sum())
                pairs += int((lengths * (lengths + 1) // 2).sum())
                batch = to_device(batch, device)
                with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                    loss = model(**batch).loss
                (loss / accum if accum > 1 else loss).backward()
                loss_v = loss.item()
            if hp["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)  # the step's GPU work is inside its time
            now = time.perf_counter()
            mf.write(json.dumps({
                "step": step, "loss": loss_v, "lr": sched.get_last_lr()[0],
                "tokens_per_s": tokens / (now - t_prev), "elapsed_s": now - start, "cpu_s": time.process_time() - cpu0,
                "tokens": tokens, "positions": positions, "label_tokens": label_tokens, "attn_pairs": pairs,
                **device_memory(device),
            }) + "\n")
            mf.flush()
            t_prev = now
    return time.perf_counter() - start, loss_v


def cmd_train(a) -> None:
    import torch
    from peft import get_peft_model

    recipe = load_recipe(a.recipe, a.set)
    hp = train_hparams(recipe)
    method = recipe.get("method") or {}
    if method.get("name", "lora") != "lora":
        raise SystemExit("peer train supports method.name=lora only")
    max_length = int(get(recipe, "data.max_length", 512))
    pad_to = max_length if get(recipe, "data.padding", "longest") == "max_length" else None
    device = pick_device(a.device)
    tf32 = bool(get(recipe, "train.tf32", False))
    if tf32:
        torch.set_float32_matmul_precision("high")
    seed_all(hp["seed"])
    t = time.perf_counter()
    tok, model = seeded_load(lambda: load_smollm2(get(recipe, "model.dtype", "float32")), hp["seed"])
    model = get_peft_model(model, lora_config_from(method, "CAUSAL_LM")).to(device)
    load_s = time.perf_counter() - t
    rss_after_load = peak_rss_mb_self()
    trainable, total = model.get_nb_trainable_parameters()

    t = time.perf_counter()
    rows = read_rows(resolve_data_path(get(recipe, "data.train.path")))
    limit = get(recipe, "data.train.limit")
    rows = rows[:limit] if limit else rows
    if (get(recipe, "data.train.format") or get(recipe, "data.format", "alpaca")) == "text":
        col = get(recipe, "data.train.text_column", "text")
        data = [encode_text(tok, r[col], max_length) for r in rows]
    else:
        system_prompt = get(recipe, "data.system_prompt")
        data = [e for e in (encode_alpaca(tok, r, max_length, system_prompt) for r in rows) if e is not None]
    if not data:
        raise SystemExit(f"every row is longer than data.max_length={max_length} before its response; raise it")
    data_s = time.perf_counter() - t

    dl = loader(data, hp["batch_size"], hp["seed"], collate(tok.pad_token_id, pad_to))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mp = get(recipe, "train.mixed_precision", "no")
    if mp not in ("no", False, "bf16"):
        raise SystemExit(f"peer train: train.mixed_precision {mp!r} (no or bf16)")
    train_s, _ = train_loop(model, dl, hp, out / "metrics.jsonl", autocast=mp == "bf16", device=device)
    if a.save:
        model.save_pretrained(out / "adapter")
    emit(out, {
        "side": "peft", "versions": versions(), "trainable_params": trainable, "total_params": total,
        "load_s": round(load_s, 2), "data_s": round(data_s, 2), "train_s": round(train_s, 2),
        "examples": len(data), "rss_after_load_mb": round(rss_after_load, 1),
        "dims": {**model_dims(model), "adapter_params": trainable}, "mixed_precision": mp,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "device": str(device), "tf32": tf32, **device_memory(device),
    })


# ---------------------------------------------------------------- SST-2 classification

def read_tsv(path: Path, text_col: str, label_col: str, limit: int | None) -> tuple[list[str], list[int]]:
    import csv

    texts, labels = [], []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts.append(row[text_col].strip())
            labels.append(int(row[label_col]))
            if limit and len(texts) >= limit:
                break
    return texts, labels


def peft_cls_config(kind: str, method: dict):
    import peft

    task = "SEQ_CLS"
    if kind == "lora":
        return lora_config_from(method, task)
    if kind == "ia3":
        kw = {"task_type": task}
        for k in ("target_modules", "feedforward_modules"):
            if method.get(k) is not None:
                kw[k] = method[k]
        return peft.IA3Config(**kw)
    if kind == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=int(method.get("num_virtual_tokens", 20)))
    if kind == "prefix":
        return peft.PrefixTuningConfig(
            task_type=task, num_virtual_tokens=int(method.get("num_virtual_tokens", 20)),
            prefix_projection=bool(method.get("prefix_projection", False)),
        )
    raise SystemExit(f"unknown peer method {kind!r}")


def cmd_cls(a) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = load_recipe(a.recipe, a.set)
    hp = train_hparams(recipe)
    method = recipe.get("method") or {}
    max_length = int(get(recipe, "data.max_length", 128))
    pad_to = max_length if get(recipe, "data.padding", "longest") == "max_length" else None
    device = pick_device(a.device)
    seed_all(hp["seed"])
    t = time.perf_counter()
    folder = minilm_location()
    tok = AutoTokenizer.from_pretrained(folder)
    model = seeded_load(lambda: AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2), hp["seed"])
    base_params = sum(p.numel() for p in model.parameters())
    if a.method == "full":
        trainable = base_params
    else:
        from peft import get_peft_model

        model = get_peft_model(model, peft_cls_config(a.method, method))
        trainable, _ = model.get_nb_trainable_parameters()
    model = model.to(device)
    load_s = time.perf_counter() - t

    def read(df: dict) -> list[dict]:
        texts, labels = read_tsv(resolve_data_path(df["path"]), df.get("text_column") or "sentence",
                                 df.get("label_column") or "label", df.get("limit"))
        enc = tok(texts, truncation=True, max_length=max_length)["input_ids"]
        return [{"input_ids": ids, "labels": y} for ids, y in zip(enc, labels, strict=True)]

    train_rows, eval_rows = read(get(recipe, "data.train")), read(get(recipe, "data.eval"))
    coll = collate(tok.pad_token_id, pad_to)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train_s, last_loss = train_loop(model, loader(train_rows, hp["batch_size"], hp["seed"], coll), hp, out / "metrics.jsonl",
                                    device=device)
    model.eval()
    correct, ev_loss = 0, 0.0
    ebs = int(hp["eval_batch_size"] or hp["batch_size"])
    with torch.inference_mode():
        for b in torch.utils.data.DataLoader(eval_rows, batch_size=ebs, collate_fn=coll):
            b = to_device(b, device)
            o = model(**b)
            ev_loss += o.loss.item() * len(b["labels"])
            correct += int((o.logits.argmax(-1) == b["labels"]).sum())
    acc = correct / len(eval_rows)
    with open(out / "metrics.jsonl", "a") as mf:
        mf.write(json.dumps({"step": hp["max_steps"], "eval_loss": ev_loss / len(eval_rows), "eval_accuracy": acc}) + "\n")
    save_dir = out / ("model" if a.method == "full" else "adapter")
    model.save_pretrained(save_dir)
    stored = sum(f.stat().st_size for f in save_dir.glob("*.safetensors"))
    emit(out, {
        "side": "peft" if a.method != "full" else "transformers", "method": a.method, "seed": hp["seed"],
        "eval_accuracy": acc, "trainable_params": trainable, "base_params": base_params,
        "trainable_pct": 100.0 * trainable / base_params, "stored_bytes": stored,
        "train_s": round(train_s, 2), "load_s": round(load_s, 2), "train_rows": len(train_rows),
        "eval_rows": len(eval_rows), "final_loss": last_loss, "versions": versions(), "device": str(device),
    })


# ---------------------------------------------------------------- merge

def cmd_merge(a) -> None:
    import torch
    from peft import PeftModel

    t = time.perf_counter()
    tok, base = load_smollm2()
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    model = PeftModel.from_pretrained(base, a.adapter)
    adapter_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        merged = model.merge_and_unload()
    merge_s = time.perf_counter() - t
    t = time.perf_counter()
    merged.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    save_s = time.perf_counter() - t
    emit(Path(a.out), {
        "side": "peft", "load_base_s": round(load_s, 2), "load_adapter_s": round(adapter_s, 2),
        "merge_s": round(merge_s, 3), "save_s": round(save_s, 2),
        "out_bytes": sum(f.stat().st_size for f in Path(a.out).glob("*.safetensors")),
    })


# ---------------------------------------------------------------- latency

def cmd_latency(a) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    _, base = load_smollm2()
    variants = {"base": base.eval()}
    if a.merged:
        variants["merged"] = AutoModelForCausalLM.from_pretrained(a.merged, dtype=torch.float32).eval()
    if a.adapter:
        from peft import PeftModel

        variants["unmerged"] = PeftModel.from_pretrained(copy.deepcopy(base), a.adapter).eval()
    load_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g)
    mask = torch.ones_like(ids)
    with torch.inference_mode():  # keep the logits for the merge checks
        logits = {n: m(input_ids=ids, attention_mask=mask, use_cache=False).logits.float() for n, m in variants.items()}
    times = time_variants(variants, {"input_ids": ids, "attention_mask": mask, "use_cache": False}, a.rounds)
    names = list(variants)
    tok_n = a.batch * a.seq
    res = {"batch": a.batch, "seq": a.seq, "rounds": a.rounds, "load_s": round(load_s, 2), "variants": {}}
    for n in names:
        ts = sorted(times[n])
        med = ts[len(ts) // 2] if len(ts) % 2 else (ts[len(ts) // 2 - 1] + ts[len(ts) // 2]) / 2
        res["variants"][n] = {"median_s": med, "tokens_per_s": tok_n / med, "times_s": times[n]}
    if "merged" in logits and "unmerged" in logits:
        res["max_abs_logit_diff_merged_vs_unmerged"] = float((logits["merged"] - logits["unmerged"]).abs().max())
    if "merged" in logits:
        res["max_abs_logit_diff_merged_vs_base"] = float((logits["merged"] - logits["base"]).abs().max())
    emit(Path(a.out), res)


def time_variants(variants: dict, inputs: dict, rounds: int) -> dict[str, list[float]]:
    """Interleaved timing: one warm-up forward each, then `rounds` rounds with a rotating order."""
    import torch

    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            variants[n](**inputs)
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                t = time.perf_counter()
                variants[n](**inputs)
                times[n].append(time.perf_counter() - t)
    return times


def cmd_latency_cls(a) -> None:
    """MiniLM seq-cls: base vs each peftcli-merged SST-2 model vs its unmerged adapter (peftcli's own
    wrappers, loaded with peftcli.merge.load_adapted: several methods have no HF PEFT form)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from peftcli.merge import load_adapted

    base = AutoModelForSequenceClassification.from_pretrained(minilm_location(), num_labels=2).eval()
    variants = {"base": base}
    for spec in a.pair:
        method, merged, adapter = spec.split("=", 1)[0], *spec.split("=", 1)[1].split(",")
        variants[f"{method}:merged"] = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).eval()
        variants[f"{method}:unmerged"] = load_adapted(adapter).loaded.model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, base.config.vocab_size, (a.batch, a.seq), generator=g)
    times = time_variants(variants, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, a.rounds)
    res = {"batch": a.batch, "seq": a.seq, "rounds": a.rounds, "variants": {}}
    for n, ts in times.items():
        ts = sorted(ts)
        med = ts[len(ts) // 2] if len(ts) % 2 else (ts[len(ts) // 2 - 1] + ts[len(ts) // 2]) / 2
        res["variants"][n] = {"median_s": med, "tokens_per_s": a.batch * a.seq / med, "times_s": times[n]}
    emit(Path(a.out), res)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.peer_hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("train")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--recipe", required=True)
    s.add_argument("--set", action="append", default=[])
    s.add_argument("--out", required=True)
    s.add_argument("--save", action="store_true", help="save the adapter at the end")
    s = sub.add_parser("cls")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--recipe", required=True)
    s.add_argument("--method", required=True, choices=["lora", "ia3", "prompt", "prefix", "full"])
    s.add_argument("--set", action="append", default=[])
    s.add_argument("--out", required=True)
    s = sub.add_parser("merge")
    s.add_argument("--adapter", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("latency")
    s.add_argument("--merged")
    s.add_argument("--adapter")
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--out", required=True)
    s = sub.add_parser("latency-cls")
    s.add_argument("--pair", action="append", default=[], help="METHOD=MERGED_DIR,ADAPTER_DIR (repeatable)")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--seq", type=int, default=64)
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--out", required=True)
    sub.add_parser("versions")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.cmd == "versions":
        print(json.dumps(versions()))
        return
    {"train": cmd_train, "cls": cmd_cls, "merge": cmd_merge, "latency": cmd_latency, "latency-cls": cmd_latency_cls}[a.cmd](a)


if __name__ == "__main__":
    main()
