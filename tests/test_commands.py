"""The practitioner's commands through the CLI on tiny models: eval, generate, sweep, recipe new/check,
the `full` / `freeze` baselines, and the run directory's report (curve, model card, TensorBoard)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_task_rows, recipe_dict, write_jsonl, write_recipe
from typer.testing import CliRunner

from peftcli.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *fragments):
    """exit 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, (f, err)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama_dir):
    """A LoRA run on the copy task that learns enough to generate (tiny Llama, 40 steps)."""
    tmp = tmp_path_factory.mktemp("cmd")
    train = write_jsonl(tmp / "train.jsonl", copy_task_rows(64))
    eval_ = write_jsonl(tmp / "eval.jsonl", copy_task_rows(8, seed=1))
    recipe = write_recipe(tmp / "recipe.yaml", recipe_dict(tiny_llama_dir, train, eval_, tmp / "lora",
                                                           train={"max_steps": 40, "eval_every": 20, "save_every": None, "lr": 1e-2}))
    result = invoke("train", recipe, "--json")
    assert result.exit_code == 0, result.output
    return {"tmp": tmp, "run": tmp / "lora", "recipe": recipe, "train": train, "eval": eval_, "summary": json.loads(result.stdout)}


# ---------------------------------------------------------------- run directory report

def test_run_report_curve_and_model_card(lora_run):
    from PIL import Image

    run = lora_run["run"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41)) and [r["step"] for r in rows if "eval_loss" in r] == [20, 40]
    with Image.open(run / "training_curve.png") as im:
        assert im.size[0] >= 400 and im.size[1] >= 300
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # lines, labels and legend drawn, not a blank canvas
    card = (run / "README.md").read_text()
    meta = json.loads((run / "peftcli.json").read_text())
    pct = 100 * meta["trainable_params"] / meta["total_params"]
    for fragment in (str(lora_run["train"]), f"{meta['trainable_params']:,}", f"{pct:.4f}%", "PeftModel.from_pretrained",
                     "training_curve.png", f"| eval_loss | {meta['metrics']['eval_loss']:.4g} |", "r=4"):
        assert fragment in card, fragment


def test_tensorboard_logs_every_entry_or_one_line_error(lora_run, tmp_path, monkeypatch):
    import importlib.util

    from peftcli import report

    d = yaml.safe_load(lora_run["recipe"].read_text())
    d["train"] = {**d["train"], "max_steps": 3, "eval_every": 2, "report_to": "tensorboard"}
    d["output"]["dir"] = str(tmp_path / "tb")
    recipe = write_recipe(tmp_path / "tb.yaml", d)
    if importlib.util.find_spec("tensorboard") is None:
        assert_user_error(runner.invoke(app, ["train", str(recipe)]), "train.report_to", "pip install tensorboard")
        assert not (tmp_path / "tb").exists()

    scalars = []

    class Writer:  # stands in for SummaryWriter: records what the run logs
        def add_scalar(self, tag, value, step):
            scalars.append((tag, step, value))

        def close(self):
            scalars.append("closed")

    monkeypatch.setattr(report, "require_tensorboard", lambda: None)
    monkeypatch.setattr(report, "tensorboard_writer", lambda log_dir: Writer())
    assert invoke("train", recipe).exit_code == 0
    logged = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    expected = [(("eval/" if k.startswith("eval_") else "train/") + k, e["step"], v) for e in logged for k, v in e.items() if k != "step"]
    assert scalars == expected + ["closed"]


# ---------------------------------------------------------------- full / freeze

@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "freeze", "last_k": 1, "modules": ["norm"]}])
def test_full_and_freeze_store_changed_tensors_and_merge(lora_run, tiny_llama_dir, tmp_path, method):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d = recipe_dict(tiny_llama_dir, lora_run["train"], None, tmp_path / "run",
                    train={"max_steps": 2, "eval_every": None, "save_every": None, "lr": 1e-3})
    d["method"] = method
    assert invoke("train", write_recipe(tmp_path / "r.yaml", d)).exit_code == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base_sd = base.state_dict()
    if method["name"] == "full":
        expected = set(base_sd)
    else:  # the last of the 2 blocks and the final norm
        expected = {k for k in base_sd if k.startswith(("model.layers.1.", "model.norm."))}
    meta = json.loads((tmp_path / "run" / "peftcli.json").read_text())
    assert meta["trainable_params"] == sum(base_sd[k].numel() for k in expected)
    stored = {k.removeprefix("base_model.model."): v for k, v in load_file(tmp_path / "run" / "adapter_model.safetensors").items()}
    assert set(stored) == expected
    assert all(not torch.equal(stored[k], base_sd[k]) for k in expected if k.endswith("proj.weight"))  # trained

    res = json.loads(invoke("merge", tmp_path / "run", "-o", tmp_path / "merged", "--json").stdout)
    assert res["verified"] and res["max_abs_diff"] == 0.0  # the stored tensors are the weights: nothing to round
    assert res["path"] == "streaming"  # shard by shard, the stored tensors replacing the base's
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert set(merged) == set(base_sd)
    assert all(torch.equal(merged[k], stored[k] if k in expected else base_sd[k]) for k in base_sd)
    exported = json.loads(invoke("export", tmp_path / "run", "--format", "merged", "-o", tmp_path / "exp", "--json").stdout)
    assert exported["max_abs_diff"] == 0.0
    card = (tmp_path / "run" / "README.md").read_text()
    assert "peftcli-only layout" in card and "peftcli merge" in card


def test_freeze_bad_options(lora_run, tiny_llama_dir, tmp_path):
    d = recipe_dict(tiny_llama_dir, lora_run["train"], None, tmp_path / "o")
    d["method"] = {"name": "freeze", "last_k": 3}
    assert_user_error(runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", d))]), "method.last_k", "at most 2")


# ---------------------------------------------------------------- recipe new / check

@pytest.mark.parametrize(("method", "task"), [("lora", None), ("ia3", "seq-cls"), ("freeze", "causal-lm")])
def test_recipe_new_is_complete_and_reads_back_to_defaults(tmp_path, method, task):
    from peftcli.methods import get_method
    from peftcli.recipe import DataCfg, ModelCfg, TrainCfg, load_recipe, recipe_from_dict

    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(2))
    result = invoke("recipe", "new", "--model", "demo:minilm", "--method", method, "--data", data, *(["--task", task] if task else []))
    assert result.exit_code == 0, result.output
    path = tmp_path / "my.yaml"
    path.write_text(result.stdout)
    minimal = {"model": {"name_or_path": "demo:minilm", **({"task": task} if task else {})}, "method": {"name": method},
               "data": {"train": {"path": str(data)}, **({"format": "classification"} if task == "seq-cls" else {})},
               "output": {"dir": f"runs/{method}"}}
    assert load_recipe(path).resolved() == recipe_from_dict(minimal).resolved()
    keys = {line.split(":")[0].strip().lstrip("#").strip() for line in result.stdout.splitlines()}
    for cls in (ModelCfg, DataCfg, TrainCfg, get_method(method).Options):
        missing = set(cls.model_fields) - keys
        assert not missing, (cls.__name__, missing)
    assert "# rank" in result.stdout or method != "lora"  # field descriptions become comments
    # check: the resolved recipe, as YAML and as JSON
    check = invoke("recipe", "check", path, "--json")
    assert json.loads(check.stdout) == load_recipe(path).resolved()


def test_recipe_check_errors(tmp_path):
    assert_user_error(runner.invoke(app, ["recipe", "new", "--model", "m", "--method", "lorra"]), "unknown method", "'lora'")
    text = invoke("recipe", "new", "--model", "demo:minilm").stdout.replace("lr: 0.0002", "lr: -1")
    (tmp_path / "bad.yaml").write_text(text)
    assert_user_error(runner.invoke(app, ["recipe", "check", str(tmp_path / "bad.yaml")]), "train.lr", "bad.yaml:")
    ok = invoke("recipe", "check", tmp_path / "bad.yaml", "--set", "train.lr=1e-3")
    assert ok.exit_code == 2 and "data/train.jsonl not found" in ok.stderr  # the data file is checked too
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        good = invoke("recipe", "check", "bad.yaml", "--set", "train.lr=1e-3")
    finally:
        os.chdir(cwd)
    assert good.exit_code == 0 and yaml.safe_load(good.stdout)["train"]["lr"] == 1e-3 and "valid recipe" in good.stderr


# ---------------------------------------------------------------- eval

def test_eval_adapter_merged_and_base(lora_run, tiny_llama_dir, tmp_path):
    run, ev = lora_run["run"], lora_run["eval"]
    res = json.loads(invoke("eval", run, "--data", ev, "--metrics", "loss,exact_match,accuracy", "--json",
                            "-o", tmp_path / "m.json").stdout)
    assert json.loads((tmp_path / "m.json").read_text()) == res
    # the same loss as the training run's final eval (same rows, same template, same model)
    assert res["metrics"]["loss"] == pytest.approx(lora_run["summary"]["eval_loss"], rel=1e-5)
    refs = [r["output"] for r in copy_task_rows(8, seed=1)]
    assert res["n"] == 8 and res["labels"] == sorted(set(refs))
    ex = res["examples"]
    assert [e["reference"] for e in ex] == refs[:3]
    # exact match counts the generated answers equal to the reference; accuracy maps answers to labels
    assert res["metrics"]["exact_match"] <= res["metrics"]["accuracy"]
    merged = tmp_path / "merged"
    assert invoke("merge", run, "-o", merged).exit_code == 0
    res_m = json.loads(invoke("eval", merged, "--data", ev, "--metrics", "loss,exact_match", "--json").stdout)
    assert res_m["kind"] == "model" and res_m["metrics"]["loss"] == pytest.approx(res["metrics"]["loss"], abs=1e-4)
    assert res_m["metrics"]["exact_match"] == res["metrics"]["exact_match"]
    base = json.loads(invoke("eval", tiny_llama_dir, "--data", ev, "--metrics", "loss", "--json").stdout)
    assert base["metrics"]["loss"] > res["metrics"]["loss"] + 1.0  # the adapter learned the task
    table = invoke("eval", run, "--data", ev, "--metrics", "loss").stdout
    assert "loss" in table and f"{res['metrics']['loss']:.4f}" in table


def test_eval_exact_match_counts_generated_answers(lora_run, monkeypatch):
    """exact_match and generation accuracy are the fractions of rows whose generated answer matches."""
    import peftcli.generation as gen

    refs = [r["output"] for r in copy_task_rows(8, seed=1)]
    answers = [refs[0], refs[1] + " extra", "nonsense", *refs[3:]]  # 6 exact, 7 start with their label
    monkeypatch.setattr(gen, "generate", lambda model, tok, prompts, n, bs: answers[: len(prompts)])
    res = json.loads(invoke("eval", lora_run["run"], "--data", lora_run["eval"], "--metrics", "exact_match,accuracy",
                            "--json").stdout)
    assert res["metrics"] == {"exact_match": 6 / 8, "accuracy": 7 / 8}


def test_eval_seq_cls_accuracy_uses_the_label_map(tmp_path, tiny_bert_dir):
    rows = [{"text": f"{w} film", "label": "pos" if w in ("good", "great") else "neg"} for w in ["good", "bad", "great", "awful"] * 6]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    ev = write_jsonl(tmp_path / "e.jsonl", rows[:8])
    d = recipe_dict(tiny_bert_dir, train, None, tmp_path / "cls", model={"task": "seq-cls"},
                    method={"target_modules": ["query", "value"]},
                    data={"train": {"path": str(train), "format": "classification"}, "format": "classification",
                          "eval": {"path": str(ev), "format": "classification"}},
                    train={"max_steps": 3, "eval_every": None, "save_every": None})
    summary = json.loads(invoke("train", write_recipe(tmp_path / "r.yaml", d), "--json").stdout)
    res = json.loads(invoke("eval", tmp_path / "cls", "--data", ev, "--json").stdout)
    assert set(res["metrics"]) == {"loss", "accuracy"}
    assert res["metrics"]["accuracy"] == pytest.approx(summary["eval_accuracy"])
    assert res["metrics"]["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    # labels outside the adapter's label map: one line naming them and the map
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "fine film", "label": "meh"}])
    assert_user_error(runner.invoke(app, ["eval", str(tmp_path / "cls"), "--data", str(other)]), "['meh']", "['neg', 'pos']")


def test_eval_bad_input(lora_run, tmp_path):
    run, ev = lora_run["run"], lora_run["eval"]
    assert_user_error(runner.invoke(app, ["eval", str(tmp_path / "nope"), "--data", str(ev)]), "not found")
    assert_user_error(runner.invoke(app, ["eval", str(run), "--data", str(ev), "--metrics", "loss,bleu"]),
                      "unknown metric 'bleu'", "exact_match")
    cls = write_jsonl(tmp_path / "cls.jsonl", [{"text": "good film", "label": "pos"}])
    assert_user_error(runner.invoke(app, ["eval", str(run), "--data", str(cls)]), "'instruction'", "missing")
    assert_user_error(runner.invoke(app, ["eval", str(run), "--data", str(tmp_path / "none.jsonl")]), "not found")
    assert_user_error(runner.invoke(app, ["eval", str(run), "--data", str(ev), "--format", "text", "--metrics", "exact_match"]),
                      "exact_match", "reference response")


# ---------------------------------------------------------------- generate

def test_generate_streams_and_compares_with_base(lora_run, tiny_llama_dir, tmp_path):
    run = lora_run["run"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "repeat the word", "input": "stone"},
                                                 {"prompt": "repeat the word\n\nriver"},
                                                 {"messages": [{"role": "user", "content": "repeat the word\n\ntiger"}]}])
    rows = json.loads(invoke("generate", run, "--file", prompts, "--max-new-tokens", "6", "--json").stdout)
    assert [r["prompt"].split("word")[-1].split()[0] for r in rows] == ["stone", "river", "tiger"]
    # the chat template is applied (the tiny tokenizer's <user> ... <assistant> markers)
    assert all("< user >" in r["prompt"] and "< assistant >" in r["prompt"] for r in rows)
    # alpaca rows give the same prompts and answers as eval's batched generation on them
    ev = json.loads(invoke("eval", run, "--data", lora_run["eval"], "--metrics", "exact_match", "--json",
                           "--max-new-tokens", "6").stdout)
    same = json.loads(invoke("generate", run, "--file", lora_run["eval"], "--max-new-tokens", "6", "--json").stdout)
    assert [(r["prompt"], r["output"]) for r in same[:3]] == [(e["prompt"], e["output"]) for e in ev["examples"]]
    # streamed to the terminal: the same text, printed token by token after the prompt line
    streamed = invoke("generate", run, "--prompt", "repeat the word\n\nstone", "--max-new-tokens", "6")
    assert streamed.exit_code == 0 and "prompt 1:" in streamed.stdout and rows[0]["output"].strip() in streamed.stdout
    # --compare-base: the base's answers are the plain base model's own
    cmp_rows = json.loads(invoke("generate", run, "--file", prompts, "--max-new-tokens", "6", "--compare-base", "--json").stdout)
    base_rows = json.loads(invoke("generate", tiny_llama_dir, "--file", prompts, "--max-new-tokens", "6", "--json").stdout)
    assert [r["output"] for r in cmp_rows] == [r["output"] for r in rows]
    assert [r["base_output"] for r in cmp_rows] == [r["output"] for r in base_rows]
    assert [r["base_output"] for r in cmp_rows] != [r["output"] for r in cmp_rows]
    table = invoke("generate", run, "--prompt", "repeat the word\n\nstone", "--max-new-tokens", "6", "--compare-base").stdout
    assert "fine-tuned" in table and "base" in table


def test_generate_bad_input(lora_run, tiny_llama_dir, tmp_path):
    run = lora_run["run"]
    assert_user_error(runner.invoke(app, ["generate", str(run)]), "--prompt")
    assert_user_error(runner.invoke(app, ["generate", str(tmp_path / "nope"), "-p", "hi"]), "not found")
    assert_user_error(runner.invoke(app, ["generate", str(tiny_llama_dir), "-p", "hi", "--compare-base"]), "not an adapter directory")
    (tmp_path / "p.jsonl").write_text('{"question": "hi"}\n')
    assert_user_error(runner.invoke(app, ["generate", str(run), "-f", str(tmp_path / "p.jsonl")]), "line 1", "'prompt'")


# ---------------------------------------------------------------- sweep

def test_sweep_table_plot_and_resume(lora_run, tmp_path):
    import matplotlib.image

    d = yaml.safe_load(lora_run["recipe"].read_text())
    d["train"] = {**d["train"], "max_steps": 2, "eval_every": None}
    recipe = write_recipe(tmp_path / "sweep.yaml", d)
    out = tmp_path / "sw"
    first = invoke("sweep", recipe, "--methods", "lora,ia3", "-o", out, "--json", "--set", "lora:method.r=2")
    assert first.exit_code == 0, first.output
    res = json.loads(first.stdout)
    assert res["counts"] == {"trained": 2, "resumed": 0, "skipped": 0, "failed": 0}
    assert res["metric"] == "eval_loss" and [s["method"] for s in res["summary"]] == sorted(
        ["lora", "ia3"], key=lambda m: next(s["mean"] for s in res["summary"] if s["method"] == m))
    from conftest import tiny_model

    from peftcli.methods.targets import is_linear, linear_shape

    lora = next(r for r in res["runs"] if r["method"] == "lora")
    formula = sum(2 * sum(linear_shape(m)) for n, m in tiny_model("llama").named_modules() if is_linear(m) and n != "lm_head")
    assert lora["trainable_params"] == formula  # the per-method --set (r=2) reached the LoRA run
    assert yaml.safe_load((out / "ia3-seed0" / "recipe.yaml").read_text())["method"]["name"] == "ia3"
    for r in res["runs"]:
        meta = json.loads((Path(r["dir"]) / "peftcli.json").read_text())
        assert r["stored_bytes"] == (Path(r["dir"]) / "adapter_model.safetensors").stat().st_size
        assert r["trainable_params"] == meta["trainable_params"] and r["peak_rss_bytes"] > 50e6 and r["wall_s"] > 0
    table = (out / "sweep.md").read_text()
    assert table.count("\n| ") == 3 and "| lora |" in table and "| ia3 |" in table and "trainable %" in table
    img = matplotlib.image.imread(out / "sweep.png")
    assert img.shape[0] >= 400 and img.shape[1] >= 600
    assert (img[..., :3] < 0.9).any(axis=-1).mean() > 0.01  # points, axes and labels drawn on the white canvas
    # a second invocation retrains nothing: the finished runs are detected and skipped
    stamp = {r["run"]: (Path(r["dir"]) / "adapter_model.safetensors").stat().st_mtime_ns for r in res["runs"]}
    again = invoke("sweep", recipe, "--methods", "lora,ia3", "-o", out, "--set", "lora:method.r=2")
    assert again.exit_code == 0 and again.stdout.count("finished earlier, skipped") == 2
    assert {r["run"]: (Path(r["dir"]) / "adapter_model.safetensors").stat().st_mtime_ns for r in res["runs"]} == stamp
    assert json.loads((out / "sweep.json").read_text())["counts"]["skipped"] == 2


def test_sweep_bad_input(lora_run, tmp_path):
    assert_user_error(runner.invoke(app, ["sweep", str(lora_run["recipe"]), "--methods", "lora,lorra", "-o", str(tmp_path / "s")]),
                      "unknown method 'lorra'", "'lora'")
    assert_user_error(runner.invoke(app, ["sweep", str(lora_run["recipe"]), "--methods", "lora", "--set", "dora:method.r=2",
                                          "-o", str(tmp_path / "s")]), "not one of the swept methods")
    assert not (tmp_path / "s").exists()


def test_eval_and_generate_a_non_mergeable_method(lora_run, tiny_llama_dir, tmp_path):
    """Prompt tuning (virtual tokens, no merge): eval reproduces the run's eval loss, generate answers and
    --compare-base shows the plain base's answers."""
    d = recipe_dict(tiny_llama_dir, lora_run["train"], lora_run["eval"], tmp_path / "pt",
                    train={"max_steps": 2, "eval_every": None, "save_every": None})
    d["method"] = {"name": "prompt_tuning", "num_virtual_tokens": 4}
    summary = json.loads(invoke("train", write_recipe(tmp_path / "r.yaml", d), "--json").stdout)
    res = json.loads(invoke("eval", tmp_path / "pt", "--data", lora_run["eval"], "--metrics", "loss", "--json").stdout)
    assert res["method"] == "prompt_tuning" and res["metrics"]["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    rows = json.loads(invoke("generate", tmp_path / "pt", "--file", lora_run["eval"], "--max-new-tokens", "4",
                             "--compare-base", "--json").stdout)
    base = json.loads(invoke("generate", tiny_llama_dir, "--file", lora_run["eval"], "--max-new-tokens", "4", "--json").stdout)
    assert [r["base_output"] for r in rows] == [r["output"] for r in base]
    assert [r["output"] for r in rows] != [r["output"] for r in base]  # the virtual tokens change the answers


def test_sweep_resumes_an_interrupted_run(lora_run, tmp_path, monkeypatch):
    from peftcli import checkpoint

    d = yaml.safe_load(lora_run["recipe"].read_text())
    d["train"] = {**d["train"], "max_steps": 6, "save_every": 2, "eval_every": None}
    recipe = write_recipe(tmp_path / "sweep.yaml", d)
    out, run = tmp_path / "sw", tmp_path / "sw" / "lora-seed0"
    monkeypatch.setenv("PEFTCLI_FAULT", "kill_in_save=4")  # the training process dies while saving step 4
    first = runner.invoke(app, ["sweep", str(recipe), "--methods", "lora", "-o", str(out)])
    assert first.exit_code == 1 and "1 run(s) failed" in first.stderr
    assert checkpoint.latest(run).name == "step-2" and not (run / "peftcli.json").exists()
    monkeypatch.delenv("PEFTCLI_FAULT")
    second = invoke("sweep", recipe, "--methods", "lora", "-o", out)
    assert second.exit_code == 0 and "lora-seed0: resuming" in second.stdout
    assert json.loads((out / "sweep.json").read_text())["counts"] == {"trained": 0, "resumed": 1, "skipped": 0, "failed": 0}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "loss" in e] == [1, 2, 3, 4, 5, 6]  # from step 2 on: the killed run's 3-4 dropped
