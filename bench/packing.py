"""Sequence packing throughput (issue 12): SmolLM2-135M fp32 + LoRA r=16 on every linear layer, the
alpaca demo data, the trainer's own train_step (Trainer.for_model), three ways of batching the same rows:

- padded:  4 rows per step, padded to max_length (the padding-free path drops the pads from the linear
           layers and attention of Llama-family models, so they cost little compute)
- dynamic: 4 rows per step, padded to the longest row of the batch
- packed:  data.packing, rows in max_length blocks (best-fit decreasing), `--packed-batch` blocks per step,
           chosen so a step holds about as many real tokens as 4 rows

The variants take turns step by step (one step each per round), so load from other processes on the
machine hits all three alike; the first round is warm-up. Reports real (non-pad) tokens per second and
the steps an epoch takes; writes bench/results/packing.json.

    python -m bench.packing [--rounds 8] [--max-length 512] [--packed-batch 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from bench.common import BENCH, data_file, machine_info


def main() -> None:
    import torch

    from peftcli.data import Collator, pack, prepare
    from peftcli.methods import build_method
    from peftcli.models import load_model, load_tokenizer, quiet_transformers
    from peftcli.recipe import DataCfg, ModelCfg
    from peftcli.train import Trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--packed-batch", type=int, default=2, help="blocks per step when packed")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    quiet_transformers()
    mcfg = ModelCfg(name_or_path="demo:smollm2")
    tok = load_tokenizer(mcfg)
    base = load_model(mcfg, tok).model
    data = DataCfg.model_validate({"train": {"path": str(data_file("alpaca/alpaca_en_demo.json"))}, "max_length": a.max_length})
    rows = prepare(data, tok, "causal-lm").train
    blocks = pack(rows, a.max_length, seed=42)
    fill = sum(len(b["input_ids"]) for b in blocks) / (a.max_length * len(blocks))

    def trainer(examples, batch_size, pad_to=None):
        model = copy.deepcopy(base).train()
        method = build_method({"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"})
        method.apply(model, "causal-lm")
        t = Trainer.for_model(model, method, examples, pad_id=tok.pad_token_id, batch_size=batch_size, max_steps=10_000,
                              lr=1e-5, warmup_steps=0, seed=42)
        t.collate = Collator(tok.pad_token_id, pad_to)
        return t

    variants = {"padded": trainer(rows, 4, a.max_length), "dynamic": trainer(rows, 4), "packed": trainer(blocks, a.packed_batch)}
    stats = {name: {"tokens": 0, "seconds": 0.0} for name in variants}
    for r in range(a.rounds + 1):
        for name, t in variants.items():
            t0 = time.perf_counter()
            out = t.train_step(r)
            if r:  # round 0: warm-up
                stats[name]["tokens"] += out["tokens"]
                stats[name]["seconds"] += time.perf_counter() - t0
    runs = [{"name": name, "batch_size": t.tcfg.batch_size, "steps_per_epoch": t.batches.steps_per_epoch,
             "tokens_per_s": round(s["tokens"] / s["seconds"], 1), "tokens": s["tokens"], "seconds": round(s["seconds"], 2)}
            for (name, t), s in zip(variants.items(), stats.values(), strict=True)]
    tps = {r["name"]: r["tokens_per_s"] for r in runs}
    result = {"what": "SmolLM2-135M fp32 + LoRA r=16 all-linear, alpaca demo (999 rows), CPU, real tokens/s",
              "max_length": a.max_length, "rounds": a.rounds, "threads": a.threads, "rows": len(rows), "blocks": len(blocks),
              "block_fill": round(fill, 4), "runs": runs,
              "packed_vs_dynamic": round(tps["packed"] / tps["dynamic"], 3),
              "packed_vs_padded": round(tps["packed"] / tps["padded"], 3), "machine": machine_info()}
    path = BENCH / "results" / "packing.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
