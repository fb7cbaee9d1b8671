"""The command line. Thin on purpose: each command parses options and calls one function.
Heavy imports (torch, transformers) happen inside commands so that `peftcli --help` is instant."""

from __future__ import annotations

import functools
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="peftcli",
    help="Parameter-efficient fine-tuning from a YAML recipe, merged back into the base with no latency.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, powershell)
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON")]


def user_errors(fn):
    """UserError -> one red line on stderr, exit 2; a failed merge proof -> exit 1. No tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from peftcli.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            _say_once(f"[bold red]error:[/] {_plain(exc)}")
            raise typer.Exit(2) from None
        except Exception as exc:
            label = {"MergeMismatch": "merge failed", "TrainingStopped": "training stopped"}.get(type(exc).__name__)
            if label is None:
                raise
            _say_once(f"[bold red]{label}:[/] {_plain(exc)}")
            raise typer.Exit(1) from None

    return wrapper


def _plain(exc: Exception) -> str:
    """The message as literal text on one line: it quotes user input (keys, values, paths), where a
    newline or rich markup ("[/]") would break the one-line error or raise inside rich."""
    from rich.markup import escape

    from peftcli.errors import one_line

    return escape(one_line(exc, limit=2000))


def _say_once(text: str) -> None:
    """One line on stderr, from the main process only when several run the same command."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        err_console.print(text, highlight=False, soft_wrap=True, emoji=False)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command()
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (sections model, method, data, train, output)")],
    set_: SetOpt = None,
    output_dir: Annotated[str | None, typer.Option("--output-dir", "-o", help="run directory (default: output.dir)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in the output directory")] = False,
    resume: Annotated[bool, typer.Option(help="continue from the newest complete checkpoint in the output directory")] = False,
    num_processes: Annotated[int, typer.Option("--num-processes", min=1,
                                               help="train on N local processes (hands over to `accelerate launch`)")] = 1,
    as_json: JsonOpt = False,
):
    """Train the recipe's method and write an adapter directory (HF PEFT layout)."""
    import os

    from peftcli.recipe import load_recipe

    r = load_recipe(recipe, set_)  # a bad recipe fails here, once, before any process starts
    from peftcli.distributed import in_distributed_launch, launch_command

    if num_processes > 1 and not in_distributed_launch():
        import subprocess

        argv = ["train", str(recipe), *[f"--set={s}" for s in set_ or []], *(["--output-dir", output_dir] if output_dir else []),
                *(["--overwrite"] if overwrite else []), *(["--resume"] if resume else []), *(["--json"] if as_json else [])]
        raise typer.Exit(subprocess.run(launch_command(num_processes, argv, r.train.mixed_precision)).returncode)
    from peftcli.train import run_training

    result = run_training(r, output_dir, overwrite, console=err_console if as_json else console, resume=resume)  # --json: stdout is the JSON only
    if as_json and int(os.environ.get("RANK", "0")) == 0:
        _print_json(result)


class By(StrEnum):
    type = "type"
    layer = "layer"
    module = "module"


@app.command()
@user_errors
def inspect(
    target: Annotated[str, typer.Argument(help="a recipe .yaml, an adapter directory or a model directory")],
    by: Annotated[By, typer.Option(help="group rows by module type, layer or module")] = By.type,
    set_: SetOpt = None,
    base: Annotated[str | None, typer.Option(help="base model for an adapter (default: the one it names)")] = None,
    as_json: JsonOpt = False,
):
    """Total and trainable parameters per module type / layer, trainable %, stored adapter size."""
    from peftcli.inspect import inspect_target

    report = inspect_target(target, by.value, set_, base)
    if as_json:
        _print_json(report)
        return
    from rich.table import Table

    table = Table(title=f"{report['kind']}: {report['source']}", show_footer=True)
    table.add_column(by.value, footer="total")
    table.add_column("params", justify="right", footer=f"{report['total_params']:,}")
    table.add_column("trainable", justify="right", footer=f"{report['trainable_params']:,}")
    table.add_column("trainable %", justify="right", footer=f"{report['trainable_percent']:.4f}")
    for row in report["rows"]:
        pct = 100.0 * row["trainable"] / max(row["total"], 1)
        table.add_row(row["group"], f"{row['total']:,}", f"{row['trainable']:,}" if row["trainable"] else "-", f"{pct:.2f}" if row["trainable"] else "")
    console.print(table)
    console.print(f"trainable params: {report['trainable_params']:,} || all params: {report['total_params']:,} "
                  f"|| trainable%: {report['trainable_percent']:.4f}")
    if "method" in report:
        targets = report.get("targets") or []
        console.print(f"method [bold]{report['method']}[/]: {len(targets)} targeted modules"
                      + (f" ({', '.join(sorted({t.rsplit('.', 1)[-1] for t in targets}))})" if targets else "")
                      + (f", modules_to_save {report['modules_to_save']}" if report.get("modules_to_save") else "")
                      + (f"; stored adapter {report['adapter_bytes']:,} bytes" if report.get("adapter_bytes") else ""))
        if report.get("inference_cost"):
            console.print(f"inference cost: {_cost_text(report['inference_cost'])}")
        for part in report.get("parts") or []:  # a hybrid
            console.print(f"  {part['key']} {part['method']}: {len(part.get('targets') or [])} targeted modules, "
                          f"{'merges' if part['mergeable'] else 'does not merge'}"
                          + (f"; {_cost_text(part)}" if any(k.startswith(('added_', 'virtual_')) for k in part) else ""))
        shown = {"targets", "modules_to_save", "method", "adapter_bytes", "metrics", "parts", "inference_cost", "virtual_tokens",
                 "added_flops_per_token", "added_sequence_length", "added_kv_per_layer"}
        for key in sorted(set(report) - shown - {"source", "kind", "total_params", "trainable_params", "trainable_percent", "by", "rows"}):
            console.print(f"  {key}: {report[key]}")


def _cost_text(cost: dict) -> str:
    """What an additive method adds to inference: FLOPs per token (and their share of the base's), virtual tokens."""
    parts = []
    if cost.get("added_flops_per_token") is not None:
        base = cost.get("base_flops_per_token")
        share = f" ({100 * cost['added_flops_per_token'] / base:.2f}% of the base's ~{base:,})" if base else ""
        parts.append(f"+{cost['added_flops_per_token']:,} FLOPs per token{share}")
    if cost.get("virtual_tokens"):
        where = (f"+{cost['added_sequence_length']} sequence length" if cost.get("added_sequence_length")
                 else f"+{cost.get('added_kv_per_layer', cost['virtual_tokens'])} keys/values per layer")
        parts.append(f"{cost['virtual_tokens']} virtual tokens ({where})")
    return ", ".join(parts) or "none"


class Dtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


MergeOut = Annotated[Path, typer.Option("--output", "-o", help="directory for the merged model")]
BaseOpt = Annotated[str | None, typer.Option(help="base model (default: the one the adapter was trained on)")]
DtypeOpt = Annotated[Dtype | None, typer.Option(help="dtype to merge in (default: the training dtype)")]
ForceOpt = Annotated[bool, typer.Option(help="merge even if the base weights differ from the training base")]
OverwriteOpt = Annotated[bool, typer.Option(help="replace an existing output directory")]


def _merge(adapter: Path, output: Path, base, dtype, force, overwrite, as_json, verify=None, in_memory=False,
           partial=False) -> None:
    from peftcli.merge import merge_adapter

    def progress(name: str, i: int, n: int) -> None:
        if n > 1 and not as_json:
            err_console.print(f"merging shard {i}/{n}: {name}", highlight=False)

    res = merge_adapter(adapter, output, base, dtype.value if dtype else None, force, overwrite, verify, in_memory, progress,
                        partial)
    if as_json:
        _print_json(res)
        return
    how = "streamed shard by shard" if res.get("path") == "streaming" else "in memory"
    check = (f"max |logit difference| {res['max_abs_diff']:.3g} (tolerance {res['tolerance']:.3g})" if res.get("verified")
             else f"not verified ({res.get('verify_skipped')})")
    what = f"{', '.join(res['merged'])} of {res['method']}" if "merged" in res else res["method"]
    console.print(f"merged {what} into the base ({res['dtype']}, {how}): {check} -> [bold]{res['output']}[/] in {res['seconds']}s")
    if "remaining" in res:  # merge --partial
        console.print(f"not merged: {', '.join(res['remaining'])}, written as an adapter for the merged model -> "
                      f"[bold]{res['remaining_adapter']}[/]")


@app.command()
@user_errors
def merge(
    adapter: Annotated[Path, typer.Argument(help="adapter directory written by `peftcli train` (or HF PEFT)")],
    output: MergeOut,
    base: BaseOpt = None,
    dtype: DtypeOpt = None,
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
    verify: Annotated[bool | None, typer.Option("--verify/--no-verify", help="compare logits of the unmerged adapter and the "
                                                "merged model (default: when the model fits in memory)")] = None,
    in_memory: Annotated[bool, typer.Option("--in-memory", help="load the whole model and merge with the method's own merge "
                                            "(default: stream shard by shard when the adapter allows)")] = False,
    partial: Annotated[bool, typer.Option("--partial", help="hybrid adapters: merge the mergeable parts, write the others "
                                          "as an adapter directory for the merged model (OUTPUT/adapter)")] = False,
    as_json: JsonOpt = False,
):
    """Fold the adapter into the base weights (shard by shard from the base's safetensors files when every
    part of the adapter merges per tensor); verify merged logits equal the adapter's. --dtype: output precision."""
    _merge(adapter, output, base, dtype, force, overwrite, as_json, verify, in_memory, partial)


class Format(StrEnum):
    peft = "peft"
    merged = "merged"
    gguf = "gguf"
    gguf_lora = "gguf-lora"


@app.command()
@user_errors
def export(
    adapter: Annotated[Path, typer.Argument(help="adapter directory (--format gguf: or a merged model directory)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output directory (peft, merged) or .gguf file (gguf, gguf-lora)")],
    format: Annotated[Format, typer.Option("--format", "-f", help="peft: HF PEFT adapter dir; merged: safetensors model; "
                                           "gguf: llama.cpp model file (Llama family); gguf-lora: llama.cpp LoRA adapter file")] = Format.peft,
    base: BaseOpt = None,
    dtype: Annotated[str | None, typer.Option(help="merged: float32|bfloat16|float16; gguf, gguf-lora: f32|f16|bf16|q8_0 "
                                              "(default: the model's dtype; f32 for gguf-lora)")] = None,
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
    verify: Annotated[bool, typer.Option(help="gguf: reload the file through transformers and compare logits, "
                                         "encodings and chat template before it is renamed into place")] = True,
    as_json: JsonOpt = False,
):
    """Write what deployment tools read: the HF PEFT adapter layout, a merged model, or GGUF for llama.cpp."""
    from peftcli.errors import UserError

    if format in (Format.gguf, Format.gguf_lora):
        from peftcli.gguf_export import export_gguf, export_gguf_lora

        if format is Format.gguf:
            res = export_gguf(adapter, output, dtype, base, force, overwrite, verify)
            check = f": max |logit difference| {res['max_abs_diff']:.3g} (tolerance {res['tolerance']:.3g})" if verify else " (not verified)"
            text = f"GGUF ({res['dtype']}, {res['source']}){check} -> [bold]{res['output']}[/] in {res['seconds']}s"
        else:
            res = export_gguf_lora(adapter, output, dtype, base, force, overwrite)
            text = (f"llama.cpp LoRA adapter ({res['modules']} modules, r={res['rank']}, alpha={res['alpha']:.6g}, {res['dtype']}) "
                    f"-> [bold]{res['output']}[/]")
        return _print_json(res) if as_json else console.print(text)
    if dtype is not None:
        dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
        if dtype not in Dtype.__members__:
            raise UserError(f"--dtype {dtype}: --format {format.value} takes one of {', '.join(Dtype.__members__)}")
        dtype = Dtype(dtype)
    if format is Format.merged:
        return _merge(adapter, output, base, dtype, force, overwrite, as_json)
    from peftcli.export import export_peft

    res = export_peft(adapter, output, overwrite)
    _print_json(res) if as_json else console.print(f"HF PEFT adapter ({res['peft_type']}) written to [bold]{res['output']}[/]")


@app.command()
@user_errors
def methods(as_json: JsonOpt = False):
    """List the methods: family (Xu et al. 2023 taxonomy), whether they merge, their options."""
    from peftcli.methods import available_methods, get_method

    rows = []
    for name in available_methods():
        cls = get_method(name)
        opts = {k: (None if f.is_required() else f.default) for k, f in cls.Options.model_fields.items() if k != "name"}
        rows.append({"name": name, "family": cls.family, "mergeable": cls.mergeable, "peft_type": cls.peft_type,
                     "summary": cls.summary, "options": opts})
    if as_json:
        return _print_json(rows)
    from rich.table import Table

    table = Table(title="peftcli methods")
    for col in ("method", "family", "merges", "HF PEFT", "what it trains", "options (defaults)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["family"], "yes" if r["mergeable"] else "no", r["peft_type"] or "-", r["summary"],
                      ", ".join(f"{k}={v}" for k, v in r["options"].items()))
    console.print(table)


# ---------------------------------------------------------------- the practitioner's commands (logic in their own modules)
MetricsOut = Annotated[Path | None, typer.Option("--output", "-o", help="also write the JSON to this file")]


@app.command("eval")
@user_errors
def eval_(
    target: Annotated[str, typer.Argument(help="adapter directory (any method) or model directory (merged, base)")],
    data: Annotated[Path, typer.Option("--data", help="data file in a training format (jsonl, json, csv, tsv, parquet)")],
    format: Annotated[str | None, typer.Option("--format", help="text | alpaca | chat | classification (default: the "
                                               "training recipe's; classification for seq-cls)")] = None,
    metrics: Annotated[str | None, typer.Option(help="comma-separated: loss, accuracy, exact_match, json_match "
                                                "(default: loss,accuracy for seq-cls; loss,exact_match for alpaca/chat)")] = None,
    labels: Annotated[str | None, typer.Option(help="causal-LM accuracy: the label names an answer may start with "
                                               "(default: the distinct references)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="evaluate the first N rows")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    base: BaseOpt = None,
    output: MetricsOut = None,
    as_json: JsonOpt = False,
):
    """Loss, accuracy and generation metrics (exact match, JSON match) of an adapter or a model on a data file."""
    from peftcli.adapter_io import atomic_write
    from peftcli.evaluate import evaluate

    res = evaluate(target, str(data), format, metrics, base, batch_size, max_new_tokens, limit, labels)
    if output is not None:
        atomic_write(output, json.dumps(res, indent=2) + "\n")
    if as_json:
        return _print_json(res)
    from rich.table import Table

    console.print(f"{res['kind']} [bold]{res['target']}[/] ({res['method'] or res['task']}) on {res['data']}: "
                  f"{res['n']} rows, format {res['format']}", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in res["metrics"].items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    for ex in res.get("examples", []):
        console.print(f"  [dim]output:[/] {ex['output'][:100]!r}  [dim]reference:[/] {ex['reference'][:100]!r}", highlight=False)


@app.command()
@user_errors
def generate(
    target: Annotated[str, typer.Argument(help="adapter directory (any method) or model directory")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="one prompt")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="prompts: .jsonl of {prompt} / {instruction, input} / "
                                              "{messages} rows, or a text file with one prompt per line")] = None,
    compare_base: Annotated[bool, typer.Option("--compare-base", help="also answer with the base model; show both side by side")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    base: BaseOpt = None,
    as_json: JsonOpt = False,
):
    """Greedy answers to prompts, rendered with the training template (the chat template where the model has one), streamed."""
    from peftcli.generate_cmd import run_generate

    def header(i: int, text: str) -> None:
        console.print(f"[bold]prompt {i + 1}:[/] {text.strip()[-200:]}", highlight=False)

    rows = run_generate(target, prompt, str(file) if file else None, compare_base, max_new_tokens, batch_size, base,
                        stream=None if as_json else header)
    if as_json:
        return _print_json(rows)
    if compare_base:
        from rich.table import Table

        table = Table(title=f"{target} vs its base", show_lines=True)
        for col in ("prompt", "base", "fine-tuned"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(r["prompt"].strip()[-200:], r["base_output"], r["output"])
        console.print(table)


@app.command()
@user_errors
def sweep(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe; its method section is replaced per run")],
    methods: Annotated[str, typer.Option(help="comma-separated methods, e.g. lora,dora,ia3,bitfit,full")],
    seeds: Annotated[int, typer.Option(min=1, help="runs per method, seeds train.seed, train.seed+1, ...")] = 1,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="sweep directory (default: sweeps/RECIPE_NAME)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key in every run (train.max_steps=100), or in "
                                                   "one method's runs (lora:method.r=16); repeatable")] = None,
    metric: Annotated[str | None, typer.Option(help="final metric to compare (default: eval_accuracy, generation_after, "
                                               "eval_loss or train_loss, the first every run has)")] = None,
    as_json: JsonOpt = False,
):
    """Train the recipe once per method (and seed), then compare: a table (metric, trainable %, stored bytes, peak
    memory, wall time) as markdown and JSON, and a plot. Finished runs are skipped: rerun to resume a sweep."""
    from peftcli.sweep import markdown, run_sweep

    say = (lambda text: err_console.print(text, highlight=False)) if as_json else (lambda text: console.print(text, highlight=False))
    res = run_sweep(recipe, methods, seeds, output, set_, metric, say=say)
    if as_json:
        _print_json(res)
    elif res.get("summary"):
        from rich.markdown import Markdown

        console.print(Markdown(markdown(res["summary"], recipe.name)))
        console.print(f"table {res['table']}, plot {res['plot']}, all results {res['output']}/sweep.json", highlight=False)
    if res["failures"]:
        _say_once(f"[bold red]{len(res['failures'])} run(s) failed:[/] " + "; ".join(_plain(Exception(f)) for f in res["failures"]))
        raise typer.Exit(1)


recipe_app = typer.Typer(help="Write a complete recipe, or check one without loading the model.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("new")
@user_errors
def recipe_new(
    model: Annotated[str, typer.Option(help="model directory, hub id or demo alias (demo:smollm2, demo:minilm)")],
    method: Annotated[str, typer.Option(help="method name (`peftcli methods`)")] = "lora",
    task: Annotated[str | None, typer.Option(help="causal-lm | seq-cls (default: causal-lm)")] = None,
    data: Annotated[str, typer.Option(help="training data file")] = "data/train.jsonl",
    output_dir: Annotated[str | None, typer.Option("--output-dir", help="output.dir (default: runs/METHOD)")] = None,
):
    """Print a complete, commented recipe: every key with its default (from the recipe's own schema)."""
    from peftcli.recipe_cmd import new_recipe

    sys.stdout.write(new_recipe(model, method, task, data, output_dir))


@recipe_app.command("check")
@user_errors
def recipe_check(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    set_: SetOpt = None,
    as_json: JsonOpt = False,
):
    """Validate a recipe (keys, values, method options, data files) without loading the model; print it resolved."""
    import yaml

    from peftcli.recipe_cmd import check_recipe

    resolved = check_recipe(recipe, set_)
    if as_json:
        return _print_json(resolved)
    err_console.print(f"[green]ok:[/] {recipe} is a valid recipe; resolved, with every default:", highlight=False)
    sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False))


def main() -> None:
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # library progress bars (GGUF conversion, ...) would fight ours
    app()


if __name__ == "__main__":
    main()
