"""The commands end to end on tiny models saved as real directories: train -> inspect -> merge ->
export, and the one-line exit-2 errors for bad input (nothing written or overwritten)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_task_rows, recipe_dict, write_jsonl, write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.methods.targets import is_linear, linear_shape

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """One real training run shared by the tests below (tiny Llama, LoRA on all linear layers)."""
    tmp = tmp_path_factory.mktemp("run")
    train = write_jsonl(tmp / "train.jsonl", copy_task_rows(64))
    eval_ = write_jsonl(tmp / "eval.jsonl", copy_task_rows(8, seed=1))
    recipe = write_recipe(tmp / "recipe.yaml", recipe_dict(tiny_llama_dir, train, eval_, tmp / "out",
                                                           train={"max_steps": 30, "eval_every": 10, "save_every": 10, "lr": 1e-2}))
    result = invoke("train", recipe, "--json")
    assert result.exit_code == 0, result.output
    return {"recipe": recipe, "run": tmp / "out", "tmp": tmp, "summary": json.loads(result.stdout)}


def test_train_writes_peft_layout_and_learns(trained):
    run = trained["run"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "peftcli.json", "recipe.yaml", "metrics.jsonl", "README.md"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-20"]
    m = metrics(run)
    losses = [e["loss"] for e in m if "loss" in e]
    evals = [e["eval_loss"] for e in m if "eval_loss" in e]
    assert len(losses) == 30 and all(e["tokens_per_s"] > 0 for e in m if "loss" in e)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, "training must lower the loss on a learnable task"
    assert evals[-1] < evals[0] and trained["summary"]["eval_loss"] == pytest.approx(evals[-1])
    meta = json.loads((run / "peftcli.json").read_text())
    assert meta["base"]["fingerprint"] and meta["method"]["name"] == "lora" and meta["metrics"]["steps"] == 30


def test_inspect_recipe_counts_match_formula(trained, tiny_llama_dir):
    from conftest import tiny_model

    result = invoke("inspect", trained["recipe"], "--json")
    report = json.loads(result.stdout)
    base = tiny_model("llama")
    formula = sum(4 * sum(linear_shape(m)) for n, m in base.named_modules() if is_linear(m) and n != "lm_head")
    assert report["trainable_params"] == formula == sum(r["trainable"] for r in report["rows"])
    assert report["total_params"] == sum(p.numel() for p in base.parameters()) + formula
    assert report["adapter_bytes"] >= formula * 4 and len(report["targets"]) == 14
    by_layer = json.loads(invoke("inspect", trained["recipe"], "--json", "--by", "layer").stdout)
    assert {r["group"] for r in by_layer["rows"] if r["trainable"]} == {"layer 0", "layer 1"}
    table = invoke("inspect", trained["recipe"]).stdout
    assert "trainable params:" in table and "self_attn.q_proj" in table


def test_inspect_adapter_and_model_dirs(trained, tiny_llama_dir):
    report = json.loads(invoke("inspect", trained["run"], "--json").stdout)
    assert report["adapter_bytes"] == (trained["run"] / "adapter_model.safetensors").stat().st_size
    assert report["kind"] == "adapter" and report["metrics"]["steps"] == 30
    model_report = json.loads(invoke("inspect", tiny_llama_dir, "--json").stdout)
    assert model_report["kind"] == "model" and model_report["trainable_params"] == model_report["total_params"]


def test_merge_matches_adapter_and_base_layout(trained, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = invoke("merge", trained["run"], "--output", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["max_abs_diff"] <= 1e-4
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    with (out / "model.safetensors").open("rb") as f:  # data section 64-byte aligned: weights mapped at aligned addresses
        assert (8 + int.from_bytes(f.read(8), "little")) % 64 == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert [(n, type(m)) for n, m in merged.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    assert {n: p.shape for n, p in merged.named_parameters()} == {n: p.shape for n, p in base.named_parameters()}
    ids = torch.randint(5, 1000, (2, 9))
    with torch.no_grad():
        adapter_logits = PeftModel.from_pretrained(base, trained["run"]).eval()(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - adapter_logits).abs().max() <= 1e-4


def test_merge_failure_exits_1_and_writes_nothing(trained, tmp_path, monkeypatch):
    import peftcli.merge as merge_mod

    monkeypatch.setitem(merge_mod.TOLERANCE, "float32", (-1.0, 0.0))  # no merge can pass a negative bound
    result = runner.invoke(app, ["merge", str(trained["run"]), "--output", str(tmp_path / "m")])
    assert result.exit_code == 1 and "merge failed" in result.output
    assert list(tmp_path.iterdir()) == []


def test_export_peft_loads_in_peft(trained, tmp_path):
    from conftest import tiny_model
    from peft import PeftModel

    result = invoke("export", trained["run"], "--format", "peft", "--output", tmp_path / "peft")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft")
    assert runner.invoke(app, ["export", str(trained["run"]), "--format", "gguf", "-o", str(tmp_path / "g")]).exit_code == 2


def test_methods_lists_taxonomy():
    rows = json.loads(invoke("methods", "--json").stdout)
    lora = next(r for r in rows if r["name"] == "lora")
    assert lora["family"] == "reparameterized" and lora["mergeable"] and "r" in lora["options"]
    assert {r["family"] for r in rows} <= {"additive", "partial", "reparameterized", "hybrid", "unified"}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "peftcli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for f in fragments:
        assert f in proc.stderr, (f, proc.stderr)


def test_bad_input_is_one_line_exit_2(trained, tmp_path, tiny_llama_dir):
    assert_user_error(cli("train", tmp_path / "missing.yaml"), "recipe not found")
    bad = write_recipe(tmp_path / "bad.yaml", recipe_dict(tiny_llama_dir, trained["tmp"] / "train.jsonl", None, tmp_path / "o",
                                                          method={"target_modules": ["q_proj", "qq_proj"]}))
    assert_user_error(cli("train", bad), "'qq_proj'", "closest")
    assert not (tmp_path / "o").exists()
    nodata = write_recipe(tmp_path / "nodata.yaml", recipe_dict(tiny_llama_dir, tmp_path / "none.jsonl", None, tmp_path / "o"))
    assert_user_error(cli("train", nodata), "not found")
    # an existing run is refused without --overwrite and left intact
    before = (trained["run"] / "adapter_model.safetensors").read_bytes()
    assert_user_error(cli("train", trained["recipe"]), "already holds a run", "--overwrite")
    assert (trained["run"] / "adapter_model.safetensors").read_bytes() == before


def test_merge_refuses_a_different_base(trained, tmp_path):
    from conftest import tiny_model

    other = tmp_path / "other-llama"
    tiny_model("llama", seed=1).save_pretrained(other)
    from conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(other)  # the tokenizer comes from the base dir
    proc = cli("merge", trained["run"], "--output", tmp_path / "m", "--base", other)
    assert_user_error(proc, "not the base this adapter was trained on", "--force")
    assert not (tmp_path / "m").exists()
    assert cli("merge", trained["run"], "--output", tmp_path / "m", "--base", other, "--force").returncode == 0


def test_seq_cls_run_reports_accuracy_and_saves_head(tmp_path, tiny_bert_dir):
    rows = [{"text": f"{w} film", "label": "pos" if w in ("good", "great") else "neg"} for w in ["good", "bad", "great", "awful"] * 8]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    recipe = recipe_dict(tiny_bert_dir, train, None, tmp_path / "out", model={"task": "seq-cls"},
                         method={"target_modules": ["query", "value"]},
                         data={"train": {"path": str(train), "format": "classification"}, "format": "classification", "eval_ratio": 0.25},
                         train={"max_steps": 4})
    result = invoke("train", write_recipe(tmp_path / "r.yaml", recipe), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    acc = summary["eval_accuracy"]  # over the 8 held-out rows (eval_ratio 0.25 of 32): a count of 8
    assert 0.0 <= acc <= 1.0 and acc * 8 == round(acc * 8), acc
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"
    assert json.loads((tmp_path / "out" / "peftcli.json").read_text())["base"]["label_names"] == ["neg", "pos"]
    merged = invoke("merge", tmp_path / "out", "--output", tmp_path / "merged", "--json")
    assert json.loads(merged.stdout)["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("overrides", [
    {"train": {"mixed_precision": "bf16", "gradient_checkpointing": True}},  # CPU autocast + recompute
    {"model": {"dtype": "bfloat16"}},  # a bf16 base: fp32 adapters, merge within the stated bf16 bound
])
def test_bf16_and_gradient_checkpointing(tmp_path, tiny_llama_dir, overrides):
    from conftest import tiny_model, tiny_tokenizer

    model_dir = tiny_llama_dir
    if "model" in overrides:
        # The shared tiny model's 0.3 init range amplifies bf16 rounding through the layers (merge differences
        # of 5-6% of max|logit| for some data orders); a pretrained-like 0.02 range shows the bound's real margin.
        model_dir = tmp_path / "llama-0.02"
        tiny_model("llama", init=0.02).save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
    train = write_jsonl(tmp_path / "t.jsonl", copy_task_rows(32))
    d = recipe_dict(model_dir, train, None, tmp_path / "out", train={"max_steps": 4, "save_every": None, "eval_every": None})
    for section, values in overrides.items():
        d[section] = {**d[section], **values}
    result = invoke("train", write_recipe(tmp_path / "r.yaml", d), "--json")
    assert result.exit_code == 0, result.output
    losses = [e["loss"] for e in metrics(tmp_path / "out") if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses) and len(set(losses)) > 1  # finite, and training moves it
    merged = json.loads(invoke("merge", tmp_path / "out", "--output", tmp_path / "m", "--json").stdout)
    assert merged["max_abs_diff"] <= merged["tolerance"]
    if overrides.get("model", {}).get("dtype") == "bfloat16":
        assert merged["dtype"] == "bfloat16" and merged["tolerance"] > 1e-4  # rtol 5e-2 of max |logit|
        assert merged["max_abs_diff"] > 0  # really merged in bf16, not an exact fp32 path


def test_align_safetensors_keeps_every_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from peftcli.merge import align_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, dtype=torch.bfloat16)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    align_safetensors(path)
    with path.open("rb") as f:
        assert (8 + int.from_bytes(f.read(8), "little")) % 64 == 0
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert not list(tmp_path.glob("*.aligning"))
