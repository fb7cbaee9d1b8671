"""No traceback on any input: every user mistake ends in exit code 2 with one line on stderr that names
the file or key and the fix, and nothing is written. Each case goes through the CLI (CliRunner keeps
stderr apart from stdout); the property-based test at the end mutates a valid recipe into invalid ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import copy_task_rows, recipe_dict, write_jsonl, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from peftcli.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments, absent: Path | None = None) -> str:
    """Exit 2, exactly one non-empty line on stderr holding every fragment, no traceback, `absent` not created."""
    detail = f"exit {result.exit_code}, exception {result.exception!r}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.exit_code == 2, detail
    assert "Traceback" not in result.output and "Traceback" not in result.stderr, detail
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("error: ") and len(line) > len("error: ") + 10, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    if absent is not None:
        assert not absent.exists(), f"{absent} was written"
    return line


# ------------------------------------------------------------------ recipes


@pytest.fixture()
def train_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", copy_task_rows(8))


@pytest.fixture()
def good(tmp_path, train_file, tiny_llama_dir) -> dict:
    """A valid recipe dict (tiny Llama, alpaca data, eval from the train file)."""
    return recipe_dict(tiny_llama_dir, train_file, None, tmp_path / "out", data={"eval_ratio": 0.25},
                       train={"max_steps": 2, "eval_every": None, "save_every": None})


def recipe_file(tmp_path, d: dict, name: str = "r.yaml") -> Path:
    return write_recipe(tmp_path / name, d)


def test_valid_recipe_passes(tmp_path, good):
    """The baseline the error tests mutate is itself valid (so they fail for the reason they claim)."""
    result = invoke("inspect", recipe_file(tmp_path, good), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["trainable_params"] > 0


@pytest.mark.parametrize("content", [
    bytes(range(256)),  # arbitrary bytes
    "model:\n  name_or_path: caf\u00e9\n".encode("latin-1"),  # latin-1 text
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01",  # a binary file
], ids=["random", "latin1", "binary"])
@pytest.mark.parametrize("command", ["train", "inspect"])
def test_recipe_not_utf8(tmp_path, content, command):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    line = assert_user_error(invoke(command, path), "r.yaml", "not UTF-8", absent=tmp_path / "out")
    assert "offset" in line


@pytest.mark.parametrize("content, fragments", [
    ("", ["r.yaml", "empty"]),
    ("- model\n- method\n", ["r.yaml", "YAML list, not a mapping"]),
    ("just a string\n", ["r.yaml", "YAML str, not a mapping"]),
    ("model: [a, b\n", ["r.yaml:2", "YAML syntax error"]),
    ("model:\n\tname_or_path: x\n", ["r.yaml:2", "YAML syntax error"]),
    ("a\x00b: 1\n", ["r.yaml", "YAML syntax error"]),  # UTF-8, but a control character
    ("[" * 5000, ["r.yaml"]),  # nested too deeply for the parser's recursion
])
def test_recipe_not_a_mapping(tmp_path, content, fragments):
    path = tmp_path / "r.yaml"
    path.write_text(content)
    assert_user_error(invoke("train", path), *fragments, absent=tmp_path / "out")


def test_recipe_is_a_directory(tmp_path):
    (tmp_path / "r.yaml").mkdir()
    assert_user_error(invoke("train", tmp_path / "r.yaml"), "r.yaml", "is a directory")
    assert_user_error(invoke("inspect", tmp_path / "r.yaml"), "r.yaml", "is a directory")


def test_capitalised_unknown_key_is_named(tmp_path, good):
    good["model"]["Dtype"] = "float32"
    line = assert_user_error(invoke("train", recipe_file(tmp_path, good)), "unknown key 'model.Dtype'",
                             "did you mean 'dtype'", "r.yaml:", absent=tmp_path / "out")
    assert "unknown key 'model'" not in line


def test_capitalised_unknown_method_option(tmp_path, good):
    good["method"]["R"] = 4
    assert_user_error(invoke("train", recipe_file(tmp_path, good)), "unknown key 'method.R'", "did you mean 'r'")


def test_union_type_error_names_the_key(tmp_path, good):
    good["method"]["target_modules"] = 3
    assert_user_error(invoke("train", recipe_file(tmp_path, good)), "method.target_modules: expected str or list[str]",
                      "(got 3)")


def test_rich_markup_in_a_value_is_printed_verbatim(tmp_path, good):
    good["method"]["name"] = "[/]:smile:"
    assert_user_error(invoke("train", recipe_file(tmp_path, good)), "unknown method.name '[/]:smile:'")


def test_newline_in_a_key_stays_on_one_line(tmp_path, good):
    good["train"]["a\nb\rc"] = 1
    assert_user_error(invoke("train", recipe_file(tmp_path, good)), "unknown key 'train.a\\nb\\rc'")


# ------------------------------------------------------------------ --set


@pytest.mark.parametrize("how", ["set", "file"])
def test_mixed_precision_no_is_accepted(tmp_path, good, how):
    """`no` is the documented value; YAML 1.1 reads it as false."""
    from peftcli.recipe import load_recipe

    path = recipe_file(tmp_path, good)
    overrides = ["train.mixed_precision=no"]
    if how == "file":
        path.write_text(path.read_text().replace("\ntrain:\n", "\ntrain:\n  mixed_precision: no\n"))
        assert "  mixed_precision: no\n" in path.read_text()
        overrides = []
    assert load_recipe(path, overrides).train.mixed_precision == "no"
    result = invoke("inspect", path, *(f"--set={o}" for o in overrides), "--json")
    assert result.exit_code == 0, result.output


def test_yes_no_still_work_for_bool_keys(tmp_path, good):
    from peftcli.recipe import load_recipe

    r = load_recipe(recipe_file(tmp_path, good), ["train.gradient_checkpointing=yes", "model.trust_remote_code=off"])
    assert r.train.gradient_checkpointing is True and r.model.trust_remote_code is False


@pytest.mark.parametrize("item, fragments", [
    ("train.mixed_precision=maybe", ["--set train.mixed_precision=maybe: train.mixed_precision", "'maybe'"]),
    ("train.lr=-1", ["--set train.lr=-1: train.lr", "greater than 0"]),
    ("train.batch_size=[1, 2]", ["--set train.batch_size=[1, 2]: train.batch_size"]),
    ("train.lerning_rate=1", ["--set train.lerning_rate=1: unknown key 'train.lerning_rate'"]),
    ("method.name=lorra", ["--set method.name=lorra: unknown method.name 'lorra'", "did you mean 'lora'"]),
    ("method.r=0", ["--set method.r=0: method.r"]),
    ("train=3", ["--set train=3: train"]),
    ("model.name_or_path.x=1", ["--set model.name_or_path.x=1: model.name_or_path is a str", "set model.name_or_path=VALUE"]),
    ("train.lr", ["--set train.lr: expected KEY.PATH=VALUE"]),
    ("=3", ["empty key path"]),
])
def test_set_errors_point_at_the_set(tmp_path, good, item, fragments):
    line = assert_user_error(invoke("train", recipe_file(tmp_path, good), "--set", item), *fragments, absent=tmp_path / "out")
    assert "r.yaml:" not in line, "the --set caused it, not a line of the file"


# ------------------------------------------------------------------ data


def train_with_data(tmp_path, good, rows_or_path, fmt="alpaca", **data):
    path = rows_or_path if isinstance(rows_or_path, Path) else write_jsonl(tmp_path / "d.jsonl", rows_or_path)
    good["data"] = {**good["data"], "train": {"path": str(path), "format": fmt}, "format": fmt, **data}
    return invoke("train", recipe_file(tmp_path, good))


@pytest.mark.parametrize("n, ratio", [(1, 0.5), (2, 0.9), (3, 0.99)])
def test_eval_ratio_on_too_few_rows(tmp_path, good, n, ratio):
    result = train_with_data(tmp_path, good, copy_task_rows(n), eval_ratio=ratio)
    assert_user_error(result, "data.eval_ratio", f"{n} row(s)", "d.jsonl", absent=tmp_path / "out")


@pytest.mark.parametrize("bad_row, fragments", [
    ({"instruction": None, "output": "x"}, ["'instruction' is null"]),
    ({"instruction": "x", "output": None}, ["'output' is null"]),
    ({"instruction": "x", "input": "y"}, ["'output' is null"]),  # a missing key: null in a column that exists
])
def test_alpaca_null_fields_name_file_and_row(tmp_path, good, bad_row, fragments):
    rows = copy_task_rows(3) + [bad_row] + copy_task_rows(2)
    assert_user_error(train_with_data(tmp_path, good, rows), "data.train", "d.jsonl row 4", *fragments, absent=tmp_path / "out")


def test_alpaca_non_string_values(tmp_path, good):
    rows = [{"instruction": "a", "output": 1}, {"instruction": "b", "output": 2}]
    assert_user_error(train_with_data(tmp_path, good, rows, eval_ratio=None), "d.jsonl row 1", "'output' is a int",
                      absent=tmp_path / "out")


CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("rows, fragments", [
    ([{"messages": "hi"}, {"messages": "hello"}], ["row 1", "'messages' is a str"]),
    ([{"messages": ["hi", "there"]}], ["row 1", "message 1 is not a {role, content} pair"]),
    ([CHAT_OK, {"messages": [{"role": "user"}]}], ["row 2", "message 1 is not a {role, content} pair"]),
    ([CHAT_OK, {"messages": [{"role": "user", "content": None}]}], ["row 2", "message 1 is not a {role, content} pair"]),
    ([CHAT_OK, CHAT_OK, {"messages": [{"role": "user", "content": "hi"}]}], ["row 3", "no message with role 'assistant'"]),
    ([CHAT_OK, {"messages": []}], ["row 2", "'messages' is empty"]),
    ([CHAT_OK, {"messages": CHAT_OK["messages"][::-1]}], ["row 2", "message 1 has role 'assistant'"]),
    ([CHAT_OK, {"messages": None}], ["row 2", "'messages' is null"]),
], ids=["string", "list-of-strings", "no-content", "null-content", "no-assistant", "empty", "assistant-first", "null"])
def test_chat_messages_malformed(tmp_path, good, rows, fragments):
    assert_user_error(train_with_data(tmp_path, good, rows, fmt="chat", eval_ratio=None), "data.train", "d.jsonl",
                      *fragments, absent=tmp_path / "out")


def test_chat_format_without_chat_template(tmp_path, good, tiny_llama_dir):
    model = tmp_path / "no-template"
    shutil.copytree(tiny_llama_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    good["model"]["name_or_path"] = str(model)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
    assert_user_error(train_with_data(tmp_path, good, rows, fmt="chat"), "data.format: chat", "no chat template",
                      "alpaca", absent=tmp_path / "out")


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def test_chat_template_that_rejects_a_row(tmp_path, good, tiny_llama_dir):
    model = tmp_path / "strict"
    shutil.copytree(tiny_llama_dir, model)
    (model / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    good["model"]["name_or_path"] = str(model)
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    result = train_with_data(tmp_path, good, [CHAT_OK, CHAT_OK, bad], fmt="chat", eval_ratio=None)
    assert_user_error(result, "data.train: ", "d.jsonl row 3", "chat template rejects it", "roles must alternate",
                      absent=tmp_path / "out")


def test_data_file_is_a_directory(tmp_path, good):
    (tmp_path / "data.jsonl").mkdir()
    assert_user_error(train_with_data(tmp_path, good, tmp_path / "data.jsonl"), "data.train.path", "is a directory",
                      absent=tmp_path / "out")


def test_jsonl_with_a_broken_line(tmp_path, good):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(copy_task_rows(1)[0]) + "\n{\"instruction\": \"x\", \"outp\n")
    assert_user_error(train_with_data(tmp_path, good, path), "data.train.path", "cannot parse", "broken.jsonl",
                      absent=tmp_path / "out")


@pytest.mark.parametrize("command", ["train", "inspect"])
def test_label_column_missing(tmp_path, tiny_bert_dir, command):
    rows = [{"text": f"film {i}", "sentiment": "pos"} for i in range(4)]
    path = write_jsonl(tmp_path / "cls.jsonl", rows)
    d = recipe_dict(tiny_bert_dir, path, None, tmp_path / "out", model={"task": "seq-cls"},
                    method={"target_modules": ["query", "value"]},
                    data={"train": {"path": str(path), "format": "classification"}, "format": "classification"})
    assert_user_error(invoke(command, recipe_file(tmp_path, d)), "data.train", "'label' missing", "cls.jsonl",
                      absent=tmp_path / "out")


def test_classification_null_text(tmp_path, tiny_bert_dir):
    rows = [{"text": "good film", "label": "pos"}, {"text": None, "label": "neg"}]
    path = write_jsonl(tmp_path / "cls.jsonl", rows)
    d = recipe_dict(tiny_bert_dir, path, None, tmp_path / "out", model={"task": "seq-cls"},
                    method={"target_modules": ["query", "value"]},
                    data={"train": {"path": str(path), "format": "classification"}, "format": "classification"})
    assert_user_error(invoke("train", recipe_file(tmp_path, d)), "cls.jsonl row 2", "'text' is null", absent=tmp_path / "out")


# ------------------------------------------------------------------ generation_eval


@pytest.mark.parametrize("change, fragments", [
    ({"data": {"format": "text", "train": {"format": "text"}}}, ["format 'text'"]),
    ({"data": {"eval_ratio": None}}, ["needs held-out rows", "data.eval_ratio"]),
    ({"model": {"task": "seq-cls"}}, ["seq-cls model cannot"]),
])
def test_generation_eval_without_generatable_data(tmp_path, good, change, fragments):
    good["train"]["generation_eval"] = {"samples": 2}
    for section, values in change.items():
        for k, v in values.items():
            good[section][k] = {**good[section][k], **v} if isinstance(v, dict) else v
    assert_user_error(invoke("train", recipe_file(tmp_path, good)), "r.yaml:", "train.generation_eval", *fragments,
                      absent=tmp_path / "out")


def test_generation_eval_static_check_names_the_set(tmp_path, good):
    good["data"]["eval_ratio"] = None
    assert_user_error(invoke("train", recipe_file(tmp_path, good), "--set", "train.generation_eval={samples: 2}"),
                      "--set train.generation_eval={samples: 2}: train.generation_eval needs held-out rows")


def test_error_in_a_section_created_by_set_names_the_set(tmp_path, good):
    good["data"]["eval_ratio"] = None
    assert_user_error(invoke("train", recipe_file(tmp_path, good), "--set", "train.generation_eval.samples=3"),
                      "--set train.generation_eval.samples=3: train.generation_eval needs held-out rows")


def test_generation_eval_on_chat_rows_without_a_reference(tmp_path, good):
    """Found only once the data is read: train.py calls generation.check_generation_eval after prepare."""
    good["train"]["generation_eval"] = {"samples": 2}
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "bye"}]}
    eval_path = write_jsonl(tmp_path / "e.jsonl", [ok, bad])
    good["data"]["eval_ratio"] = None
    good["data"]["eval"] = {"path": str(eval_path), "format": "chat"}
    result = train_with_data(tmp_path, good, [ok] * 4, fmt="chat", eval_ratio=None)
    assert_user_error(result, "train.generation_eval: data.eval:", "e.jsonl row 2", "does not end with an assistant message",
                      absent=tmp_path / "out")


def test_check_generation_eval_direct(tmp_path, good):
    from peftcli.data import Prepared
    from peftcli.errors import UserError
    from peftcli.generation import check_generation_eval
    from peftcli.recipe import load_recipe

    recipe = load_recipe(recipe_file(tmp_path, good), ["train.generation_eval={samples: 2}"])
    check_generation_eval(recipe, Prepared([], [], eval_rows=[{"instruction": "a", "output": "b"}]))
    with pytest.raises(UserError, match=r"^train\.generation_eval: the eval data gave no alpaca/chat rows"):
        check_generation_eval(recipe, Prepared([], None, eval_rows=[]))
    recipe = load_recipe(recipe_file(tmp_path, good))  # no generation_eval: nothing to check
    check_generation_eval(recipe, Prepared([], None))


# ------------------------------------------------------------------ adapter directories


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A LoRA adapter for the tiny Llama, written as `peftcli train` writes one (no training needed)."""
    from peftcli import adapter_io
    from peftcli.methods import build_method
    from peftcli.models import fingerprint, load_model
    from peftcli.recipe import ModelCfg

    loaded = load_model(ModelCfg(name_or_path=str(tiny_llama_dir)))
    base_fp = fingerprint(loaded.model)
    method = build_method({"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]})
    method.apply(loaded.model)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    meta = {"base": {"name_or_path": str(tiny_llama_dir), "task": "causal-lm", "dtype": "float32", "fingerprint": base_fp,
                     "label_names": None, "new_modules": [], "gguf_file": None, "trust_remote_code": False}}
    adapter_io.write_adapter(out, method, loaded.model, meta)
    return out


@pytest.fixture()
def adapter(tmp_path, adapter_dir) -> Path:
    """A fresh copy to hand-edit."""
    return Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))


COMMANDS = {
    "inspect": lambda a, out: ("inspect", a),
    "merge": lambda a, out: ("merge", a, "-o", out),
    "export-peft": lambda a, out: ("export", a, "--format", "peft", "-o", out),
    "export-merged": lambda a, out: ("export", a, "--format", "merged", "-o", out),
}


def test_pristine_adapter_works(tmp_path, adapter):
    """The fixture is a valid adapter: the broken copies below fail for what was broken."""
    assert invoke(*COMMANDS["inspect"](adapter, None)).exit_code == 0
    assert invoke(*COMMANDS["export-peft"](adapter, tmp_path / "o1")).exit_code == 0
    result = invoke(*COMMANDS["merge"](adapter, tmp_path / "o2"))
    assert result.exit_code == 0, result.output


def edit_meta(adapter: Path, fn) -> None:
    meta = json.loads((adapter / "peftcli.json").read_text())
    meta = fn(meta)
    (adapter / "peftcli.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))


def _pop(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


META_EDITS = {
    "invalid-json": (lambda m: json.dumps(m)[:-5], ["not valid JSON"]),
    "not-an-object": (lambda m: [m], ["expected a JSON object", "got a JSON list"]),
    "no-method": (_pop("method"), ["missing required key 'method'"]),
    "method-not-dict": (lambda m: {**m, "method": "lora"}, ["method: Input should be a valid dictionary", "'lora'"]),
    "unknown-method": (lambda m: {**m, "method": {**m["method"], "name": "lorra"}}, ["method.name 'lorra'", "did you mean 'lora'"]),
    "bad-option": (lambda m: {**m, "method": {**m["method"], "r": "big"}}, ["method.r", "'big'"]),
    "unknown-option": (lambda m: {**m, "method": {**m["method"], "rank": 2}}, ["unknown key 'method.rank'"]),
    "no-base": (_pop("base"), ["missing required key 'base'"]),
    "base-not-dict": (lambda m: {**m, "base": "tiny"}, ["base: Input should be a valid dictionary"]),
    "bad-task": (lambda m: {**m, "base": {**m["base"], "task": "translate"}}, ["base.task", "'translate'"]),
}


@pytest.mark.parametrize("edit", list(META_EDITS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_hand_edited_peftcli_json(tmp_path, adapter, edit, command):
    fn, fragments = META_EDITS[edit]
    edit_meta(adapter, fn)
    out = tmp_path / "out"
    line = assert_user_error(invoke(*COMMANDS[command](adapter, out)), "peftcli.json", *fragments, absent=out)
    assert "re-train" in line or "re-export" in line


def foreign(adapter: Path, **changes) -> None:
    """Turn the copy into an adapter written by another tool: no peftcli.json, edited adapter_config.json."""
    (adapter / "peftcli.json").unlink()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for k, v in changes.items():
        cfg.pop(k) if v is None else cfg.__setitem__(k, v)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, fragments", [
    ({"r": None}, ["missing required field 'r'", "LORA"]),
    ({"r": "big"}, ["r:", "'big'"]),
    ({"lora_dropout": 2}, [": lora_dropout: ", "(got 2)"]),
    ({"peft_type": "MULTITASK_PROMPT_TUNING"}, ["multitask prompt tuning (MULTITASK_PROMPT_TUNING) adapters are not supported",
                                               "ADALORA, IA3, LORA"]),
    ({"peft_type": "VERA"}, ["peft_type 'VERA' is not supported (supported: ADALORA, IA3, LORA"]),
    ({"peft_type": None}, ["peft_type None is not supported"]),
])
@pytest.mark.parametrize("command", ["inspect", "merge", "export-peft"])
def test_foreign_adapter_config_missing_fields(tmp_path, adapter, changes, fragments, command):
    foreign(adapter, **changes)
    out = tmp_path / "out"
    assert_user_error(invoke(*COMMANDS[command](adapter, out)), "adapter_config.json", *fragments, absent=out)


def test_foreign_adapter_config_that_is_fine(adapter):
    foreign(adapter)
    assert invoke("inspect", adapter).exit_code == 0


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_corrupt_safetensors(tmp_path, adapter, damage, command):
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\xff" * 64 + data[64:]}[damage])
    out = tmp_path / "out"
    assert_user_error(invoke(*COMMANDS[command](adapter, out)), "adapter_model.safetensors", "re-export", absent=out)


def test_corrupt_adapter_config_json(tmp_path, adapter):
    (adapter / "adapter_config.json").write_bytes(b"\xff\xfe{")
    assert_user_error(invoke("merge", adapter, "-o", tmp_path / "out"), "adapter_config.json", "not valid JSON",
                      absent=tmp_path / "out")


def test_adapter_path_is_a_file(tmp_path):
    (tmp_path / "a").write_text("x")
    assert_user_error(invoke("merge", tmp_path / "a", "-o", tmp_path / "out"), "is a file", absent=tmp_path / "out")


# ------------------------------------------------------------------ property-based: mutated recipes

VALID = {
    "model": {"name_or_path": "some/model", "task": "causal-lm", "dtype": "float32"},
    "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    "data": {"train": {"path": "train.jsonl", "format": "alpaca"}, "eval_ratio": 0.25, "max_length": 64},
    "train": {"max_steps": 2, "batch_size": 8, "lr": 5e-3, "eval_every": 1, "warmup_ratio": 0.0},
    "output": {"dir": "out"},
}
SECTIONS = list(VALID)
INT_KEYS = [("method", "r"), ("data", "max_length"), ("train", "max_steps"), ("train", "batch_size"), ("train", "eval_every"),
            ("train", "grad_accum"), ("train", "seed")]
FLOAT_KEYS = [("method", "alpha"), ("data", "eval_ratio"), ("train", "lr"), ("train", "warmup_ratio"), ("method", "dropout")]
STR_KEYS = [("model", "name_or_path"), ("model", "task"), ("model", "dtype"), ("data", "format"), ("output", "dir"),
            ("train", "scheduler"), ("train", "mixed_precision")]
OUT_OF_RANGE = [
    ("train", "lr", -1e-4), ("train", "lr", 0), ("train", "batch_size", 0), ("train", "batch_size", -3),
    ("data", "eval_ratio", 1.5), ("data", "eval_ratio", 0), ("data", "eval_ratio", -0.1), ("data", "max_length", 1),
    ("train", "max_steps", 0), ("train", "warmup_ratio", 1.0), ("train", "grad_accum", 0), ("method", "r", 0),
    ("method", "dropout", 1.5), ("train", "lr", float("inf")), ("train", "lr", float("nan")), ("train", "weight_decay", -1),
    ("train", "scheduler", "cosin"), ("train", "mixed_precision", "fp8"), ("model", "task", "translation"),
    ("data", "padding", "shortest"), ("data", "template", "llama"), ("train", "eval_every", 0),
]


def known_keys(section: str | None) -> set[str]:
    """Every key the schema accepts there (not only those VALID uses), so an 'unknown' key really is one."""
    from peftcli.methods import get_method
    from peftcli.recipe import Recipe

    if section is None:
        return set(Recipe.model_fields) | {"source"}
    if section == "method":
        return set(get_method("lora").Options.model_fields)
    return set(Recipe.model_fields[section].annotation.model_fields)


def method_names() -> set[str]:
    from peftcli.methods import available_methods

    return set(available_methods())


ident = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,11}", fullmatch=True)
word = st.from_regex(r"[a-z]{1,8}", fullmatch=True)
a_list = st.lists(st.integers(-5, 5), min_size=1, max_size=3)
a_dict = st.dictionaries(ident, st.integers(), min_size=1, max_size=2)
not_a_number = st.one_of(word, a_list, a_dict)
not_a_string = st.one_of(a_list, a_dict, st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False))
not_an_int = st.one_of(not_a_number, st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()))


def _type_mutation():
    """A value of the wrong type for a key, or a whole section that is not a mapping."""
    leaf = st.one_of(st.tuples(st.sampled_from(INT_KEYS), not_an_int), st.tuples(st.sampled_from(FLOAT_KEYS), not_a_number),
                     st.tuples(st.sampled_from(STR_KEYS), not_a_string))
    section = st.tuples(st.sampled_from(SECTIONS).map(lambda s: (s, None)), st.one_of(word, a_list, st.integers(), st.booleans()))
    return st.one_of(leaf, section).map(lambda kv: ("type", kv[0][0], kv[0][1], kv[1]))


def _unknown_key_mutation():
    anywhere = st.tuples(st.sampled_from([None, *SECTIONS]), ident)
    capitalised = st.sampled_from(INT_KEYS + FLOAT_KEYS + STR_KEYS).map(lambda sk: (sk[0], sk[1][:1].upper() + sk[1][1:]))
    return st.one_of(anywhere, capitalised).filter(lambda sk: sk[1] not in known_keys(sk[0])).map(
        lambda sk: ("unknown", sk[0], sk[1], 1))


def _method_mutation():
    bad_name = word.filter(lambda n: n not in method_names())
    bad_option = ident.filter(lambda k: k not in known_keys("method"))
    return st.one_of(bad_name.map(lambda n: ("method-name", "method", "name", n)),
                     bad_option.map(lambda k: ("method-option", "method", k, 1)))


def _range_mutation():
    return st.sampled_from(OUT_OF_RANGE).map(lambda t: ("range", *t))


def _line_start(text: str, n: int) -> int:
    starts = [0] + [i + 1 for i, c in enumerate(text[:-1]) if c == "\n"]
    return starts[n % len(starts)]


SYNTAX_BREAKERS = {
    "open-bracket": lambda text, n: text[:_line_start(text, n)] + "[" + text[_line_start(text, n):],
    "open-brace": lambda text, n: text[:_line_start(text, n)] + "{" + text[_line_start(text, n):],
    "close-bracket": lambda text, n: text[:_line_start(text, n)] + "]" + text[_line_start(text, n):],
    "tab-indent": lambda text, n: text.replace("\n  ", "\n\t", 1 + n % 3),
    "bad-indent": lambda text, n: text.replace("\n  ", "\n      ", 1),
    "unterminated-quote": lambda text, n: text[:_line_start(text, n)] + '"' + text[_line_start(text, n):],
    "list-in-mapping": lambda text, n: text.replace("\n  ", "\n  - x\n  ", 1),
    "double-colon": lambda text, n: text.replace(": ", ": a: ", 1),
}


def _syntax_mutation():
    return st.tuples(st.sampled_from(sorted(SYNTAX_BREAKERS)), st.integers(0, 100)).map(lambda t: ("syntax", t[0], t[1], None))


def _bytes_mutation():
    return st.one_of(st.binary(max_size=200), st.binary(max_size=50).map(lambda b: b"\xff" + b),
                     st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass"))).map(lambda b: ("bytes", None, None, b))


def render(mutation) -> tuple[bytes, list[str]]:
    """The recipe file's bytes and the fragments its one-line error must contain."""
    kind, section, key, value = mutation
    d = json.loads(json.dumps(VALID))
    if kind == "bytes":
        return value, ["r.yaml"]
    if kind == "syntax":
        text = SYNTAX_BREAKERS[section](yaml.safe_dump(d, sort_keys=False), key)
        return text.encode(), ["r.yaml:", "YAML syntax error"]
    if section is None:
        d[key] = value
    elif key is None:
        d[section] = value
    else:
        d[section][key] = value
    path = section if key is None else (key if section is None else f"{section}.{key}")
    expect = {"type": f": {path}: ", "range": f": {path}: ", "unknown": f"unknown key '{path}'",
              "method-name": f"unknown method.name {value!r}", "method-option": f"unknown key 'method.{key}'"}[kind]
    return yaml.safe_dump(d, sort_keys=False).encode(), ["r.yaml:", expect]


mutations = st.one_of(_type_mutation(), _unknown_key_mutation(), _method_mutation(), _range_mutation(), _syntax_mutation(),
                      _bytes_mutation())


def test_render_of_the_unmutated_recipe_is_valid(tmp_path):
    from peftcli.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(VALID, sort_keys=False))
    assert load_recipe(tmp_path / "r.yaml").method_options.r == 4


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations)
def test_mutated_recipes_fail_cleanly(tmp_path, mutation):
    """Every mutation makes the recipe invalid; each must be caught while reading the recipe (the model
    'some/model' does not exist, so a mutation that got further would fail on the model instead)."""
    content, fragments = render(mutation)
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    out = tmp_path / "out"
    assert_user_error(runner.invoke(app, ["train", str(path), "--output-dir", str(out)]), *fragments, absent=out)
    assert_user_error(runner.invoke(app, ["inspect", str(path)]), *fragments)


@pytest.mark.parametrize("breaker", sorted(SYNTAX_BREAKERS))
@pytest.mark.parametrize("n", [0, 3, 11])
def test_every_syntax_breaker_fails_cleanly(tmp_path, breaker, n):
    """Each breakage at several places (hypothesis draws these less often than the other mutations)."""
    test_mutated_recipes_fail_cleanly.hypothesis.inner_test(tmp_path, ("syntax", breaker, n, None))


@pytest.mark.parametrize("section, key, value", OUT_OF_RANGE)
def test_every_out_of_range_value_fails_cleanly(tmp_path, section, key, value):
    test_mutated_recipes_fail_cleanly.hypothesis.inner_test(tmp_path, ("range", section, key, value))


def test_text_format_null_text(tmp_path, good):
    result = train_with_data(tmp_path, good, [{"text": "a b c"}, {"text": "d e"}, {"text": None}], fmt="text", eval_ratio=None)
    assert_user_error(result, "data.train: ", "d.jsonl row 3", "'text' is null", absent=tmp_path / "out")
