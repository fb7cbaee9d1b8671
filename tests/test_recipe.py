"""Recipe loading: defaults, overrides, and the one-line errors users see for bad recipes."""

from __future__ import annotations

import pytest

from peftcli.errors import UserError
from peftcli.recipe import load_recipe

GOOD = """\
model:
  name_or_path: some/model
method:
  name: lora
  r: 16
data:
  train: {path: data/train.jsonl, format: alpaca}
  eval_ratio: 0.1
train:
  max_steps: 10
  lr: 2.0e-4
output:
  dir: runs/x
"""


def load_text(tmp_path, text, overrides=None):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return load_recipe(p, overrides)


def error_of(tmp_path, text, overrides=None) -> str:
    with pytest.raises(UserError) as exc:
        load_text(tmp_path, text, overrides)
    msg = str(exc.value)
    assert "\n" not in msg, "user errors are one line"
    return msg


def test_defaults_and_method_options(tmp_path):
    r = load_text(tmp_path, GOOD)
    assert r.train.batch_size == 8 and r.train.scheduler == "cosine" and r.model.dtype == "float32"
    opts = r.method_options
    assert opts.r == 16 and opts.alpha == 16.0 and opts.target_modules is None
    resolved = r.resolved()
    assert resolved["method"]["dropout"] == 0.0 and resolved["train"]["max_steps"] == 10


def test_set_overrides_parse_yaml_scalars(tmp_path):
    r = load_text(tmp_path, GOOD, ["train.lr=1e-4", "method.r=8", "method.target_modules=[q_proj, v_proj]",
                                   "train.gradient_checkpointing=true", "output.dir=runs/y"])
    assert r.train.lr == 1e-4 and r.method_options.r == 8 and r.method_options.target_modules == ["q_proj", "v_proj"]
    assert r.train.gradient_checkpointing is True and r.output.dir == "runs/y"


def test_epochs_default_when_no_max_steps(tmp_path):
    r = load_text(tmp_path, GOOD.replace("  max_steps: 10\n", ""))
    assert r.train.max_steps is None and r.train.epochs == 1.0


def test_missing_recipe(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  r: 16", "  r: [16"))
    assert "YAML syntax error" in msg and "r.yaml:" in msg


def test_unknown_key_suggests(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  lr: 2.0e-4", "  learning_rat: 2.0e-4"))
    assert "unknown key 'train.learning_rat'" in msg and "r.yaml:11" in msg


def test_unknown_method_option_suggests(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  r: 16", "  rank: 16"))
    assert "method.rank" in msg and "r.yaml:5" in msg


def test_wrong_type_names_key_and_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("lr: 2.0e-4", "lr: fast"))
    assert "train.lr" in msg and "r.yaml:11" in msg and "'fast'" in msg


def test_unknown_method(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("name: lora", "name: lorra"))
    assert "unknown method.name 'lorra'" in msg and "did you mean 'lora'" in msg and "r.yaml:4" in msg


def test_unknown_task(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  name_or_path: some/model", "  name_or_path: some/model\n  task: translation"))
    assert "model.task" in msg and "r.yaml:3" in msg


def test_missing_section(tmp_path):
    msg = error_of(tmp_path, GOOD.split("method:")[0])
    assert "missing required key 'method'" in msg


def test_bad_override(tmp_path):
    with pytest.raises(UserError, match="KEY.PATH=VALUE"):
        load_text(tmp_path, GOOD, ["train.lr"])


def test_recipes_in_repo_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.method_options.name == recipe.method["name"], path
