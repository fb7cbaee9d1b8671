"""`peftcli sweep`: one recipe, several methods (and seeds), one comparison table and plot.

Each run is `peftcli train` in its own process (so its peak memory is its own: the child's max RSS from
wait4), on the recipe with `method:` replaced by the method's defaults (the recipe's own method keeps its
options), `train.seed` = the recipe's seed + i, into DIR/<method>-seed<seed>. A run whose directory holds
a finished adapter (peftcli.json) is skipped, one with a checkpoint resumes, so an interrupted sweep
continues where it stopped. Results: DIR/sweep.json, DIR/sweep.md and DIR/sweep.png (metric vs
trainable %, marker area by peak memory), in the spirit of the PEFT review's comparison tables.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from peftcli.errors import UserError, did_you_mean, one_line

RUN_INFO = "sweep-run.json"  # beside the adapter: wall time and peak memory of the run that wrote it
# what the table ranks by, first found in the runs' final metrics (higher is better unless noted)
METRIC_ORDER = ("eval_accuracy", "generation_after", "eval_loss", "train_loss")
LOWER_IS_BETTER = {"eval_loss", "train_loss"}


def parse_methods(text: str) -> list[str]:
    from peftcli.methods import available_methods

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UserError("--methods: give at least one method, e.g. --methods lora,ia3,bitfit")
    known = available_methods()
    for m in names:
        if m not in known:
            raise UserError(f"--methods: unknown method {m!r}{did_you_mean(m, known)}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise UserError(f"--methods: {text} names a method twice")
    return names


def split_overrides(items: list[str] | None, methods: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """--set KEY=V applies to every run; --set METHOD:KEY=V to that method's runs only."""
    common, per = [], {m: [] for m in methods}
    for item in items or []:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head and "." not in head:
            if head not in per:
                raise UserError(f"--set {one_line(item)}: {head!r} is not one of the swept methods ({', '.join(methods)})")
            per[head].append(rest)
        else:
            common.append(item)
    return common, per


def plan_runs(recipe_path: Path, methods: list[str], seeds: int, overrides: list[str] | None, out: Path) -> list[dict]:
    """Every run's recipe, validated before the first one starts (a typo fails the sweep at once)."""
    from peftcli.recipe import apply_overrides, load_recipe, recipe_from_dict, yaml_load

    base = load_recipe(recipe_path)  # the file as written (errors name its lines)
    raw = yaml_load(Path(recipe_path).read_text(encoding="utf-8-sig"))
    common, per = split_overrides(overrides, methods)
    runs = []
    for m in methods:
        for i in range(seeds):
            d = copy.deepcopy(raw)
            d["method"] = copy.deepcopy(raw["method"]) if base.method.get("name") == m else {"name": m}
            seed = base.train.seed + i
            d.setdefault("train", {})
            d["train"] = {**(d["train"] or {}), "seed": seed}
            d = apply_overrides(d, common + per[m])
            name = f"{m}-seed{seed}"
            d.setdefault("output", {})
            d["output"] = {**(d["output"] or {}), "dir": str(out / name)}
            recipe_from_dict(copy.deepcopy(d), source=f"{recipe_path} ({name})")
            runs.append({"name": name, "method": m, "seed": seed, "dir": out / name, "recipe": d})
    return runs


def run_child(recipe_file: Path, run_dir: Path, resume: bool) -> tuple[int, dict | None, float, int, str]:
    """`peftcli train` in a child process: (exit code, its JSON summary, wall seconds, the child's peak RSS
    in bytes, its last stderr line). The peak is the child's own, from wait4 (Linux/macOS)."""
    import tempfile

    flags = ["--resume"] if resume else ["--overwrite"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "peftcli", "train", str(recipe_file), "-o", str(run_dir), "--json", *flags],
                                stdout=out, stderr=err, text=True)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        # ru_maxrss: kilobytes on Linux, bytes on macOS
        peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    summary = None
    if proc.returncode == 0:
        try:
            summary = json.loads(stdout)
        except json.JSONDecodeError:
            summary = None
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    return proc.returncode, summary, wall, peak, last


def finished(run_dir: Path) -> bool:
    from peftcli.adapter_io import META, WEIGHTS

    return (run_dir / META).is_file() and (run_dir / WEIGHTS).is_file() and (run_dir / RUN_INFO).is_file()


def collect(run: dict) -> dict:
    """One row of the table from a finished run directory."""
    from peftcli.adapter_io import META, WEIGHTS

    d = run["dir"]
    meta = json.loads((d / META).read_text())
    info = json.loads((d / RUN_INFO).read_text())
    trainable, total = meta.get("trainable_params"), meta.get("total_params")
    return {"run": run["name"], "method": run["method"], "seed": run["seed"], "dir": str(d),
            "metrics": meta.get("metrics") or {}, "trainable_params": trainable, "total_params": total,
            "trainable_percent": 100.0 * trainable / total if trainable and total else None,
            "stored_bytes": (d / WEIGHTS).stat().st_size, "peak_rss_bytes": info.get("peak_rss_bytes"),
            "wall_s": info.get("wall_s")}


def pick_metric(rows: list[dict], wanted: str | None) -> str:
    have = set.intersection(*(set(r["metrics"]) for r in rows)) if rows else set()
    if wanted:
        if wanted not in have:
            raise UserError(f"--metric {wanted}: not in every run's final metrics (they have: {', '.join(sorted(have)) or 'none'})")
        return wanted
    return next((m for m in METRIC_ORDER if m in have), "train_loss")


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def summarize(rows: list[dict], metric: str) -> list[dict]:
    """Per method: the metric's mean and std over seeds, and the costs (trainable %, bytes: per run; memory, time: mean)."""
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        mean, std = _mean_std([float(r["metrics"][metric]) for r in rs])
        out.append({"method": m, "seeds": len(rs), "metric": metric, "mean": mean, "std": std,
                    "trainable_params": rs[0]["trainable_params"], "trainable_percent": rs[0]["trainable_percent"],
                    "stored_bytes": rs[0]["stored_bytes"],
                    "peak_rss_bytes": int(sum(r["peak_rss_bytes"] or 0 for r in rs) / len(rs)),
                    "wall_s": round(sum(r["wall_s"] or 0 for r in rs) / len(rs), 2)})
    out.sort(key=lambda s: s["mean"], reverse=metric not in LOWER_IS_BETTER)
    return out


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def markdown(summary: list[dict], recipe: str) -> str:
    metric = summary[0]["metric"] if summary else "metric"
    arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    lines = [f"# Sweep of {recipe}", "", f"{metric} ({arrow}); mean ± std over seeds; peak memory: the training "
             "process's peak RSS; wall: the whole `peftcli train` run.", "",
             f"| method | {metric} | seeds | trainable params | trainable % | stored | peak memory | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        score = f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["seeds"] > 1 else "")
        pct = f"{s['trainable_percent']:.4f}" if s["trainable_percent"] is not None else "-"
        lines.append(f"| {s['method']} | {score} | {s['seeds']} | {s['trainable_params']:,} | {pct} | {_bytes(s['stored_bytes'])} | "
                     f"{_bytes(s['peak_rss_bytes'])} | {s['wall_s']:.1f} s |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> Path:
    """Metric vs trainable % (log scale), marker area proportional to peak memory, seeds' std as error bars."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("peftcli sweep draws its plot with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=110)
    mem = [s["peak_rss_bytes"] or 1 for s in summary]
    top = max(mem)
    for s, m in zip(summary, mem, strict=True):
        x = max(s["trainable_percent"] or 1e-6, 1e-6)
        ax.errorbar(x, s["mean"], yerr=s["std"] or None, fmt="none", ecolor="gray", capsize=3, zorder=1)
        ax.scatter([x], [s["mean"]], s=60 + 540 * m / top, alpha=0.6, zorder=2, label=f"{s['method']} ({_bytes(m)})")
        ax.annotate(s["method"], (x, s["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel(summary[0]["metric"] if summary else "metric")
    ax.set_title(title + "\nmarker area: peak memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best", markerscale=0.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def run_sweep(recipe: str | Path, methods: str, seeds: int = 1, out: str | Path | None = None, overrides: list[str] | None = None,
              metric: str | None = None, say=print) -> dict:
    from peftcli import checkpoint
    from peftcli.adapter_io import atomic_write

    recipe = Path(recipe)
    names = parse_methods(methods)
    if seeds < 1:
        raise UserError("--seeds: at least 1")
    out = Path(out) if out else Path("sweeps") / recipe.stem
    runs = plan_runs(recipe, names, seeds, overrides, out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"trained": 0, "resumed": 0, "skipped": 0, "failed": 0}
    failures = []
    for i, run in enumerate(runs, 1):
        d = run["dir"]
        if finished(d):
            counts["skipped"] += 1
            say(f"[{i}/{len(runs)}] {run['name']}: finished earlier, skipped ({d})")
            continue
        resume = d.is_dir() and checkpoint.latest(d) is not None
        recipe_file = out / f"{run['name']}.yaml"
        atomic_write(recipe_file, yaml.safe_dump(run["recipe"], sort_keys=False))
        say(f"[{i}/{len(runs)}] {run['name']}: {'resuming' if resume else 'training'} -> {d}")
        code, summary, wall, peak, last = run_child(recipe_file, d, resume)
        if code != 0 or summary is None:
            counts["failed"] += 1
            failures.append(f"{run['name']}: {last or f'exit {code}'}")
            say(f"[{i}/{len(runs)}] {run['name']}: failed (exit {code}): {last}")
            continue
        counts["resumed" if resume else "trained"] += 1
        atomic_write(d / RUN_INFO, json.dumps({"wall_s": round(wall, 2), "peak_rss_bytes": peak, "resumed": resume}) + "\n")
        say(f"[{i}/{len(runs)}] {run['name']}: done in {wall:.1f}s, peak RSS {_bytes(peak)}")
    rows = [collect(r) for r in runs if finished(r["dir"])]
    result: dict = {"recipe": str(recipe), "output": str(out), "methods": names, "seeds": seeds, "counts": counts,
                    "failures": failures, "runs": rows}
    if rows:
        chosen = pick_metric(rows, metric)
        summary = summarize(rows, chosen)
        result.update(metric=chosen, summary=summary, table=str(out / "sweep.md"), plot=str(out / "sweep.png"))
        atomic_write(out / "sweep.md", markdown(summary, recipe.name))
        plot(summary, out / "sweep.png", f"{recipe.name}: {chosen} vs trainable %")
    atomic_write(out / "sweep.json", json.dumps(result, indent=2, default=str) + "\n")
    return result
