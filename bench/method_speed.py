"""Per-method training speed on SmolLM2 (`make bench-methods`): every method trains the same short run as
the LoRA workload of the train section (bench/recipes/smollm2-lora-alpaca.yaml: alpaca, batch 4 x 256
padded, fp32, AdamW), each run a fresh `peftcli train` process (peak RSS from wait4), steady-state step
time after the warm-up steps. LoRA runs again between every few methods (L A B C L D E F L ...), and each
method's ratio is taken against the mean of the LoRA runs just before and after it, so a machine whose
load drifts slows both sides of a ratio alike. `uptime`'s load is recorded beside every run.

The base is the demo GGUF, dequantised once to a float32 safetensors folder under bench/work/ (loading
a GGUF costs ~30 s per run and is not what is measured here).

    python -m bench.method_speed                        # all methods, 2 warm-up + 8 measured steps
    python -m bench.method_speed --methods lora,dora --steps 4 --out bench/work/methods-smoke
    python -m bench.method_speed --profile said,lora      # torch.profiler table of one step per method

`--profile` runs in this process: the prepared base, 4 rows of 256 tokens (every token labelled), one
warm-up step through peftcli's Trainer.for_model, then one profiled step; the op table (self CPU time)
goes to <out>/profile-<method>.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import yaml

from bench.common import (
    BENCH,
    ROOT,
    data_file,
    load_recipe,
    machine_info,
    median,
    read_jsonl,
    run_measured,
    versions,
)
from bench.run import peftcli_cmd, steady_state

RECIPE = BENCH / "recipes" / "smollm2-lora-alpaca.yaml"
LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
# each method at the recipe's LoRA budget where it has one (rank 16 on every linear layer), else its defaults
METHODS: dict[str, dict] = {
    "lora": LORA,
    "dora": {**LORA, "name": "dora"},
    "pissa": {**LORA, "init": "pissa"},
    "adalora": {"name": "adalora", "init_r": 16, "target_r": 8, "alpha": 32, "target_modules": "all-linear"},
    "ia3": {"name": "ia3"},
    "hiwi": {"name": "hiwi"},
    "said": {"name": "said"},
    "did": {"name": "did"},
    "pafi": {"name": "pafi"},
    "bitfit": {"name": "bitfit"},  # Llama has no biases: recorded as not applicable
}
NOT_APPLICABLE = {"bitfit": "Llama (SmolLM2) has no bias terms"}


def prepare_base(work: Path) -> Path:
    """The demo SmolLM2 as a float32 safetensors folder with its tokenizer (made once, in a child process)."""
    target = work / "smollm2-f32"
    if (target / "config.json").is_file():
        return target
    code = ("import sys; from peftcli.models import load_model; from peftcli.recipe import ModelCfg; "
            "m = load_model(ModelCfg(name_or_path='demo:smollm2', dtype='float32')); "
            "m.model.save_pretrained(sys.argv[1]); m.tokenizer.save_pretrained(sys.argv[1])")
    r = run_measured([sys.executable, "-c", code, str(target)], work / "logs" / "prepare.log")
    if r["rc"] != 0:
        raise SystemExit(f"bench: error: could not write {target} (see {r['log']})")
    return target


def order(methods: list[str], every: int) -> list[str]:
    """LoRA first, then after every `every` other methods, and last: L A B C L D E F L."""
    others = [m for m in methods if m != "lora"]
    seq = ["lora"]
    for i in range(0, len(others), every):
        seq += others[i:i + every] + ["lora"]
    return seq


def run_one(name: str, base: Path, work: Path, steps: int, warmup: int, idx: int, env: dict) -> dict:
    recipe = load_recipe(RECIPE, [f"data.train.path={data_file('alpaca/alpaca_en_demo.json')}",
                                  f"train.max_steps={warmup + steps}", f"model.name_or_path={base}"])
    recipe["method"] = dict(METHODS[name])
    out = work / "runs" / f"{idx:02d}-{name}"
    recipe["output"] = {"dir": str(out)}
    path = work / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    load_before = os.getloadavg()
    r = run_measured(peftcli_cmd() + ["train", str(path), "--overwrite"], work / "logs" / f"{idx:02d}-{name}.log", env=env)
    r.update(method=name, index=idx, loadavg_before=[round(x, 2) for x in load_before],
             loadavg_after=[round(x, 2) for x in os.getloadavg()])
    if r["rc"] == 0:
        r.update(steady_state(read_jsonl(out / "metrics.jsonl"), warmup, positions_per_step=4 * 256))
    return r


def profile(name: str, base: Path, out: Path, threads: int | None) -> Path:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from transformers import AutoModelForCausalLM

    from peftcli.methods import build_method
    from peftcli.train import Trainer

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    method = build_method(dict(METHODS[name]))
    method.apply(model, "causal-lm")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(10, 40000, (8, 256), generator=g).tolist()]
    trainer = Trainer.for_model(model, method, rows, max_steps=2, batch_size=4, lr=2e-4, warmup_steps=0)
    trainer.train_step(0)
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        trainer.train_step(1)
        wall = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    path = out / f"profile-{name}.txt"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {name}: one training step of SmolLM2 (4 x 256 tokens, fp32), {wall:.2f} s under the profiler, "
                    f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}\n{table}\n")
    return path


def summarise(runs: list[dict], methods: list[str]) -> dict:
    lora_at = [(i, r["s_per_step"]) for i, r in enumerate(runs) if r["method"] == "lora" and r.get("s_per_step")]
    rows = {}
    for name in methods:
        if name in NOT_APPLICABLE:
            rows[name] = {"not_applicable": NOT_APPLICABLE[name]}
            continue
        mine = [(i, r) for i, r in enumerate(runs) if r["method"] == name]
        ratios = []
        for i, r in mine:
            near = [t for j, t in lora_at if j != i]
            before = [t for j, t in lora_at if j < i][-1:]
            after = [t for j, t in lora_at if j > i][:1]
            ref = (before + after) or near
            if r.get("s_per_step") and ref:
                ratios.append(r["s_per_step"] / (sum(ref) / len(ref)))
        ok = [r for _, r in mine if r.get("s_per_step")]
        rows[name] = {
            "s_per_step": median([r["s_per_step"] for r in ok]),
            "nonpad_tokens_per_s": median([r["nonpad_tokens_per_s"] for r in ok]),
            "tokens_per_s": median([r["tokens_per_s"] for r in ok]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in ok]),
            "step_vs_lora": median(ratios) if name != "lora" else 1.0,
            "loadavg": [r["loadavg_before"][0] for _, r in mine],
            "failed": [r["log"] for _, r in mine if r["rc"] != 0],
        }
    return rows


def write_report(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["settings"]
    lines = [
        "# Per-method training speed on SmolLM2-135M (CPU, fp32)", "",
        f"{result['date']}, {result['machine'].get('cpu')}, {result['machine'].get('usable_cores')} usable cores, "
        f"torch {result['versions'].get('torch')}, peftcli {result['versions'].get('peftcli_commit')}.",
        f"Settings: {s['recipe']} (alpaca, batch 4 x 256 padded, fp32, AdamW), {s['warmup']} warm-up + {s['steps']} measured "
        f"steps per run, threads {s.get('threads') or 'torch default'}, one fresh process per run, run order "
        f"{' '.join(s['order'])}. `step / LoRA`: this method's "
        "step time over the mean of the LoRA runs right before and after it. Load: the 1-minute load average "
        "before each run (2 cores; other work was running on this machine).", "",
        "| method | s / step | step / LoRA | tokens/s (non-pad) | tokens/s (positions) | peak RSS MB | load |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in result["methods"].items():
        if "not_applicable" in row:
            lines.append(f"| {name} | n/a | | | | | {row['not_applicable']} |")
            continue
        if row["s_per_step"] is None:
            lines.append(f"| {name} | failed | | | | | {', '.join(row['failed'])} |")
            continue
        lines.append(f"| {name} | {row['s_per_step']:.2f} | {row['step_vs_lora']:.2f} | {row['nonpad_tokens_per_s']:.0f} | "
                     f"{row['tokens_per_s']:.0f} | {row['peak_rss_mb']:.0f} | {', '.join(f'{x:.1f}' for x in row['loadavg'])} |")
    lines += ["", "SAID and DID here are causal-LM runs (every linear weight of the blocks projected, d = 1000)."]
    (out / "METHODS.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--steps", type=int, default=8, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per run (not measured)")
    p.add_argument("--every", type=int, default=3, help="methods between two LoRA runs")
    p.add_argument("--profile", help="comma-separated methods to profile one step each (in this process)")
    p.add_argument("--threads", type=int, help="OMP/MKL threads of every run (a crowded machine: 1); default torch's")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "methods")
    p.add_argument("--work", type=Path, default=BENCH / "work" / "methods")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    env = {k: str(a.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if a.threads else {}
    base = prepare_base(a.work)
    if a.profile:
        for name in a.profile.split(","):
            print(f"wrote {profile(name.strip(), base, a.out, a.threads)}", flush=True)
        return 0
    seq = order([m for m in methods if m not in NOT_APPLICABLE], a.every)
    runs = []
    for idx, name in enumerate(seq):
        r = run_one(name, base, a.work, a.steps, a.warmup, idx, env)
        runs.append(r)
        print(f"[{idx + 1}/{len(seq)}] {name}: rc {r['rc']}, {r.get('s_per_step', float('nan')):.2f} s/step, "
              f"peak {r['peak_rss_mb']:.0f} MB, load {r['loadavg_before'][0]}", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(), "versions": versions(),
        "python": platform.python_version(),
        "settings": {"recipe": str(RECIPE.relative_to(ROOT)), "steps": a.steps, "warmup": a.warmup, "order": seq, "threads": a.threads,
                     "methods": {m: METHODS[m] for m in methods}},
        "methods": summarise(runs, methods), "runs": runs,
    }
    write_report(a.out, result)
    print(f"wrote {a.out / 'METHODS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
