"""The run directory's report: the model card (README.md), the loss/eval curve (training_curve.png) and the
optional TensorBoard log. metrics.jsonl (one line per logged step and per eval) is written by the training
loop; everything here reads what the run already recorded, so it also works on an old run directory."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from peftcli.errors import UserError

CURVE = "training_curve.png"
AUTO_CLASS = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
              "seq2seq": "AutoModelForSeq2SeqLM"}


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return rows


def plot_curve(run_dir: Path) -> Path | None:
    """training_curve.png from metrics.jsonl: train loss (and eval loss) by step, eval accuracy / generation
    score on a second axis. None when there is nothing to plot."""
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), int | float)]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed (and none on a server)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1.2)
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    score = [(r["step"], r["eval_accuracy"], "eval accuracy") for r in rows if "eval_accuracy" in r] or \
            [(r["step"], r["generation_score"], "generation score") for r in rows if "generation_score" in r]
    if score:
        ax2 = ax.twinx()
        ax2.plot([s for s, _, _ in score], [v for _, v, _ in score], "s--", color="tab:green", label=score[0][2])
        ax2.set_ylabel(score[0][2])
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / CURVE
    tmp = out.with_name(f".{CURVE}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def _data_line(recipe: dict) -> str:
    data = recipe.get("data") or {}
    files = []
    for key in ("train", "eval"):
        value = data.get(key)
        for df in value if isinstance(value, list) else [value] if value else []:
            if isinstance(df, dict):
                files.append(f"{key}: `{df.get('path')}` ({df.get('format') or data.get('format')})")
    if data.get("eval_ratio"):
        files.append(f"eval: {data['eval_ratio']:.0%} of the training rows held out")
    return "; ".join(files) + (f"; max_length {data['max_length']}" if data.get("max_length") else "")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(config: dict, meta: dict, recipe_yaml: str | None = None, run_dir: Path | None = None,
               peft_loads: bool = False, mergeable: bool = True) -> str:
    """README.md of an adapter directory: what was trained on what, how well, and how to load it (with
    `peft` where `peft_loads`: the stored layout is HF PEFT's own)."""
    base = config.get("base_model_name_or_path")
    base_meta = meta.get("base") or {}
    method = meta.get("method") or {}
    name = method.get("name", "adapter")
    task = base_meta.get("task", "causal-lm")
    recipe = {}
    if recipe_yaml:
        try:
            recipe = yaml.safe_load(recipe_yaml) or {}
        except yaml.YAMLError:
            recipe = {}
    m = meta.get("metrics") or {}
    trainable, total = meta.get("trainable_params"), meta.get("total_params")
    options = {k: v for k, v in method.items() if k != "name" and v not in (None, [], {})}
    lines = ["---", f"base_model: {base}", f"library_name: {'peft' if peft_loads else 'peftcli'}",
             f"tags: [peftcli, {name}]", "---", "",
             f"# {name} adapter for {base_meta.get('name_or_path') or base}", "",
             f"Trained with peftcli {meta.get('peftcli_version')}.", "",
             "| | |", "|---|---|",
             f"| base model | `{base_meta.get('name_or_path') or base}` ({task}, {base_meta.get('dtype', 'float32')}) |",
             f"| method | `{name}` ({config.get('peft_type')} layout) |",
             f"| options | {', '.join(f'{k}={v}' for k, v in options.items()) or 'defaults'} |"]
    if recipe:
        lines.append(f"| data | {_data_line(recipe)} |")
        t = recipe.get("train") or {}
        lines.append(f"| training | {m.get('steps', t.get('max_steps'))} steps, lr {t.get('lr')}, batch {t.get('batch_size')} x "
                     f"{t.get('grad_accum', 1)}, seed {t.get('seed')} |")
    if trainable and total:
        lines.append(f"| trainable parameters | {trainable:,} of {total:,} ({100 * trainable / total:.4f}%) |")
    if base_meta.get("label_names"):
        lines.append(f"| labels | {', '.join(map(str, base_meta['label_names']))} |")
    lines.append("")
    if m:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in m.items()] + [""]
    if run_dir is not None and (Path(run_dir) / CURVE).is_file():
        lines += [f"![training curve]({CURVE})", ""]
    auto = AUTO_CLASS.get(task, "AutoModelForCausalLM")
    lines += ["## Use it", "", "With peftcli (any method):", "", "```bash",
              *(["peftcli generate THIS_DIR --prompt \"...\"          # stream answers (--compare-base: base beside it)"]
                if task != "seq-cls" else []),
              "peftcli eval THIS_DIR --data held_out.jsonl       # loss, accuracy, exact match",
              *(["peftcli merge THIS_DIR -o merged                 # fold into the base weights (verified)"]
                if mergeable else []), "```", ""]
    if peft_loads:
        lines += ["With `peft` and transformers:", "", "```python", f"from transformers import {auto}",
                  "from peft import PeftModel", "", f"base = {auto}.from_pretrained({base!r})",
                  "model = PeftModel.from_pretrained(base, \"THIS_DIR\")", "```", ""]
    else:
        lines += [f"This adapter uses a peftcli-only layout (`{config.get('peft_type')}`); `peft` cannot load it. "
                  "Merge it, then load the merged directory with transformers alone:", "", "```python",
                  f"from transformers import {auto}", "", f"model = {auto}.from_pretrained(\"merged\")", "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- TensorBoard (optional)

def require_tensorboard() -> None:
    """A one-line UserError when the tensorboard package is missing (it is not a dependency)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("train.report_to: tensorboard needs the tensorboard package (pip install tensorboard), "
                        "or set train.report_to: none")


def tensorboard_writer(log_dir: Path):
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


class Reporter:
    """Where logged entries go besides metrics.jsonl: TensorBoard scalars under RUN/tensorboard."""

    def __init__(self, report_to: str | None, run_dir: Path, enabled: bool = True):
        self.writer = tensorboard_writer(Path(run_dir) / "tensorboard") if enabled and report_to == "tensorboard" else None

    def log(self, entry: dict) -> None:
        if self.writer is None:
            return
        step = entry.get("step", 0)
        for k, v in entry.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                self.writer.add_scalar(("eval/" if k.startswith(("eval_", "generation_")) else "train/") + k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
