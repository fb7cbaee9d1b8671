"""The streaming merge (issue 9, section 2): shard by shard from the base's safetensors files, output
bit-identical to the in-memory merge for every method with a per-tensor merge, sharded bases with
their index, --no-verify, --dtype, tied embeddings, and every bad input as one line, exit 2, nothing
left behind. Adapters are randomised (not trained) so that every adapter tensor is non-trivial."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors import safe_open
from typer.testing import CliRunner

from peftcli import adapter_io, streaming
from peftcli.cli import app
from peftcli.merge import base_model_cfg, merge_adapter
from peftcli.methods import build_method
from peftcli.models import fingerprint

runner = CliRunner()
TASK = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "seq-cls"}


def save_base(path: Path, arch: str, task: str | None = None, **kw) -> Path:
    tiny_model(arch, task or TASK[arch]).save_pretrained(path, **kw)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_adapter(out: Path, base: Path, arch: str, opts: dict, task: str | None = None, prune: int | None = None,
                 model=None) -> Path:
    """A peftcli adapter for the saved base with every trainable tensor randomised (B != 0, scales != 1)."""
    task = task or TASK[arch]
    model = model if model is not None else tiny_model(arch, task)
    fp = fingerprint(model)
    method = build_method(opts)
    method.apply(model, task)
    if opts.get("mode") == "f":  # Child-Tuning F installs its dense deltas at the start of training
        method.install(model, None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        if prune is not None:  # AdaLoRA pruned to `prune` triplets per module: stored resized, with rank_pattern
            for w in method.wrappers(model).values():
                w.rank_mask[prune:] = False
                w.apply_mask()
    meta = {"base": {"name_or_path": str(base), "task": task, "dtype": "float32", "fingerprint": fp}}
    adapter_io.write_adapter(out, method, model, meta)
    return out


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))
    for k in ta:
        x, y = ta[k], tb[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), f"{k} differs"
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    assert ca == cb


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: save_base(root / arch, arch) for arch in TASK}


CASES = {
    "llama-lora-rslora": ("llama", {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "use_rslora": True}, None),
    "llama-pissa": ("llama", {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj", "down_proj"], "init": "pissa"}, None),
    "llama-dora": ("llama", {"name": "dora", "r": 4, "alpha": 8, "target_modules": "all-linear"}, None),
    "llama-ia3": ("llama", {"name": "ia3"}, None),
    "llama-adalora-pruned": ("llama", {"name": "adalora", "init_r": 6, "target_r": 2, "target_modules": "all-linear"}, 3),
    "gpt2-lora-conv1d-head": ("gpt2", {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear",
                                       "modules_to_save": ["lm_head"]}, None),
    "gpt2-dora": ("gpt2", {"name": "dora", "r": 4, "alpha": 8, "target_modules": "all-linear"}, None),
    "gpt2-ia3": ("gpt2", {"name": "ia3"}, None),
    "gpt2-adalora": ("gpt2", {"name": "adalora", "init_r": 4, "target_r": 2}, 1),
    "bert-lora-classifier": ("bert", {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}, None),
    "bert-bitfit": ("bert", {"name": "bitfit"}, None),
    "bert-hiwi-bias": ("bert", {"name": "hiwi"}, None),
    "llama-pafi": ("llama", {"name": "pafi", "density": 0.05}, None),
    "gpt2-pafi-conv1d-bias": ("gpt2", {"name": "pafi", "density": 0.05, "train_bias": True, "scope": "per_tensor"}, None),
    "bert-pafi-pooler": ("bert", {"name": "pafi", "density": 0.05}, None),
    "llama-child-tuning-f": ("llama", {"name": "child_tuning", "mode": "f"}, None),
    "gpt2-full-tied-head": ("gpt2", {"name": "full"}, None),
    "bert-freeze-last-block": ("bert", {"name": "freeze", "last_k": 1}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_equals_in_memory_bit_for_bit(tmp_path, bases, case):
    arch, opts, prune = CASES[case]
    adapter = make_adapter(tmp_path / "adapter", bases[arch], arch, opts, prune=prune)
    streamed = merge_adapter(adapter, tmp_path / "s", verify=case.startswith("llama-lora"))
    assert streamed["path"] == "streaming", streamed
    in_memory = merge_adapter(adapter, tmp_path / "m", in_memory=True)
    assert in_memory["path"] == "in-memory" and in_memory["max_abs_diff"] <= in_memory["tolerance"]
    assert_bit_identical(tmp_path / "s", tmp_path / "m")
    if streamed["verified"]:
        assert streamed["max_abs_diff"] == in_memory["max_abs_diff"]


def test_methods_without_a_per_tensor_merge_use_the_in_memory_path(tmp_path, bases):
    adapter = make_adapter(tmp_path / "adapter", bases["llama"], "llama", {"name": "hiwi", "form": "weight", "r": 2})
    res = merge_adapter(adapter, tmp_path / "out")
    assert res["path"] == "in-memory" and "weight form" in res["in_memory_reason"] and res["verified"]
    a = adapter_io.read_adapter(adapter)
    assert isinstance(streaming.plan_merge(a, base_model_cfg(a, None, None)), str)


def test_sharded_base_streams_shard_by_shard_with_index(tmp_path):
    base = save_base(tmp_path / "base", "llama", max_shard_size="600KB")
    index = json.loads((base / streaming.INDEX).read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) >= 3
    adapter = make_adapter(tmp_path / "adapter", base, "llama", {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"})
    result = runner.invoke(app, ["merge", str(adapter), "-o", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["path"] == "streaming" and res["shards"] == len(shard_names) and res["verified"]
    out = tmp_path / "s"
    out_index = json.loads((out / streaming.INDEX).read_text())
    assert sorted(set(out_index["weight_map"].values())) == shard_names  # the base's shard layout kept
    for name in shard_names:
        with safe_open(str(out / name), "pt") as f:
            assert sorted(f.keys()) == sorted(k for k, v in out_index["weight_map"].items() if v == name)
        with (out / name).open("rb") as f:  # 64-byte aligned data section, as the in-memory path writes
            assert (8 + int.from_bytes(f.read(8), "little")) % 64 == 0
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(out).values())
    merge_adapter(adapter, tmp_path / "m", in_memory=True)
    assert_bit_identical(out, tmp_path / "m")
    assert not list(tmp_path.glob(".*merge-*"))


def test_no_verify_and_dtype(tmp_path, bases):
    adapter = make_adapter(tmp_path / "adapter", bases["llama"], "llama", {"name": "dora", "r": 4, "alpha": 8})
    result = runner.invoke(app, ["merge", str(adapter), "-o", str(tmp_path / "s"), "--no-verify", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps at the terminal width
    assert "streamed shard by shard" in text and "not verified (--no-verify)" in text
    out = tensors(tmp_path / "s")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "s" / "config.json").read_text())["dtype"] == "bfloat16"
    merge_adapter(adapter, tmp_path / "m", dtype="bfloat16", in_memory=True)
    assert_bit_identical(tmp_path / "s", tmp_path / "m")
    res = merge_adapter(adapter, tmp_path / "v", dtype="bfloat16")  # verified by default: within bf16's bound
    assert res["verified"] and res["max_abs_diff"] <= res["tolerance"]


def test_merge_into_a_tied_head_unties_the_output(tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    base = tmp_path / "base"
    model.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    assert "lm_head.weight" not in tensors(base)
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tmp_path / "adapter", base, "llama", {"name": "lora", "r": 4, "alpha": 8,
                                                                 "target_modules": ["q_proj", "lm_head"]},
                           model=AutoModelForCausalLM.from_pretrained(base))
    res = merge_adapter(adapter, tmp_path / "s")
    assert res["path"] == "streaming" and res["verified"] and res["untied"] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert res["layout"] == "rewritten"  # an extra tensor (lm_head.weight): the early copy was discarded
    assert json.loads((tmp_path / "s" / "config.json").read_text())["tie_word_embeddings"] is False
    out = tensors(tmp_path / "s")
    assert torch.equal(out["model.embed_tokens.weight"], tensors(base)["model.embed_tokens.weight"])  # the embedding kept
    assert not torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    merge_adapter(adapter, tmp_path / "m", in_memory=True)  # the in-memory path unties the same way now
    assert_bit_identical(tmp_path / "s", tmp_path / "m")


# ------------------------------------------------------------------ bad input


def assert_one_line_exit_2(result, *fragments) -> None:
    detail = f"exit {result.exit_code}, exception {result.exception!r}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.exit_code == 2, detail
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, detail
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def assert_nothing_left(parent: Path, before: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == before, "a partial output or temp directory was left behind"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    base = save_base(root / "base", "llama", max_shard_size="600KB")
    adapter = make_adapter(root / "adapter", base, "llama", {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"})
    return {"base": base, "adapter": adapter}


def broken_copy(tmp_path: Path, sharded: dict, edit) -> Path:
    base = Path(shutil.copytree(sharded["base"], tmp_path / "base"))
    edit(base)
    return base


def _drop_shard(base: Path) -> None:
    shard = sorted(set(json.loads((base / streaming.INDEX).read_text())["weight_map"].values()))[1]
    (base / shard).unlink()


def _truncate(base: Path) -> None:
    shard = sorted(base.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])


def _config_mismatch(base: Path) -> None:
    cfg = json.loads((base / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (base / "config.json").write_text(json.dumps(cfg))


BAD_BASES = {
    "index-lists-missing-shard": (_drop_shard, ["lists shard", "missing"]),
    "truncated-shard": (_truncate, ["corrupt or truncated safetensors file", "truncated"]),
    "shapes-do-not-match-config": (_config_mismatch, ["has shape", "do not match the config"]),
}


@pytest.mark.parametrize("case", list(BAD_BASES))
def test_bad_base_files_are_one_line_exit_2(tmp_path, sharded, case):
    edit, fragments = BAD_BASES[case]
    base = broken_copy(tmp_path, sharded, edit)
    before = {p.name for p in tmp_path.iterdir()}
    result = runner.invoke(app, ["merge", str(sharded["adapter"]), "-o", str(tmp_path / "out" / "merged"), "--base", str(base),
                                 "--force"])
    assert_one_line_exit_2(result, *fragments)
    assert_nothing_left(tmp_path, before)


def test_adapter_for_another_architecture_or_size(tmp_path, sharded, bases):
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "out"
    gpt2 = make_adapter(tmp_path / "gpt2-adapter", bases["gpt2"], "gpt2", {"name": "lora", "r": 4, "alpha": 8})
    before = {p.name for p in tmp_path.iterdir()}
    assert_one_line_exit_2(runner.invoke(app, ["merge", str(gpt2), "-o", str(out), "--base", str(sharded["base"])]),
                           "is not the base this adapter was trained on", "--force")
    assert_one_line_exit_2(runner.invoke(app, ["merge", str(gpt2), "-o", str(out), "--base", str(sharded["base"]), "--force"]),
                           "does not fit the base", "llama, hidden size 32")
    wide = tiny_model("llama")
    wide.config.hidden_size = 64
    from transformers import LlamaForCausalLM

    big = tmp_path / "llama-64"
    torch.manual_seed(0)
    LlamaForCausalLM(wide.config).save_pretrained(big)
    tiny_tokenizer().save_pretrained(big)
    before = {p.name for p in tmp_path.iterdir()}
    assert_one_line_exit_2(runner.invoke(app, ["merge", str(sharded["adapter"]), "-o", str(out), "--base", str(big), "--force"]),
                           "does not fit the base", "has shape")
    assert_nothing_left(tmp_path, before)


def test_existing_output_is_refused_and_kept(tmp_path, sharded):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = {p.name for p in tmp_path.iterdir()}
    assert_one_line_exit_2(runner.invoke(app, ["merge", str(sharded["adapter"]), "-o", str(out)]), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert_nothing_left(tmp_path, before)


def test_a_failure_mid_write_leaves_nothing(tmp_path, sharded, monkeypatch):
    from peftcli.methods import lora

    calls, real = [], lora.lora_merge

    def boom(*a, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(lora, "lora_merge", boom)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapter(sharded["adapter"], tmp_path / "new" / "dir" / "merged", verify=False)
    assert len(calls) > 3
    assert_nothing_left(tmp_path, before)


@pytest.mark.parametrize("guess", ["adapter", "nothing", "everything"])
def test_copy_while_planning_keeps_the_output_exact_whatever_it_guessed(tmp_path, monkeypatch, guess):
    """The base is copied into the output while the merge plans, leaving out the tensors the adapter's
    modules probably change; the plan then patches those in. A wrong guess (copy what the merge changes,
    or copy nothing) must cost time only: the output stays bit-identical to the in-memory merge."""
    base = save_base(tmp_path / "base", "llama", max_shard_size="600KB")
    adapter = make_adapter(tmp_path / "adapter", base, "llama", {"name": "lora", "r": 4, "alpha": 8,
                                                                  "target_modules": ["q_proj", "v_proj"]})
    real = streaming._guess_changed
    seen = {}

    def spy(keys, files):
        changed = real(keys, files)
        seen["adapter"] = changed
        return {"adapter": changed, "nothing": set(), "everything": set(files.where)}[guess]

    monkeypatch.setattr(streaming, "_guess_changed", spy)
    res = merge_adapter(adapter, tmp_path / "s", verify=False)
    assert res["path"] == "streaming" and res["layout"].startswith("base layout"), res
    # the guess for a q,v LoRA is exactly the q and v weights
    assert seen["adapter"] == {n for n in streaming.base_files(base).where if n.endswith(("q_proj.weight", "v_proj.weight"))}
    merge_adapter(adapter, tmp_path / "m", in_memory=True)
    assert_bit_identical(tmp_path / "s", tmp_path / "m")
    for f in (tmp_path / "s").glob("*.safetensors"):  # aligned although the base's header is not
        with f.open("rb") as fh:
            assert (8 + int.from_bytes(fh.read(8), "little")) % 64 == 0


def test_no_early_copy_when_the_output_dtype_differs(tmp_path, bases, monkeypatch):
    adapter = make_adapter(tmp_path / "adapter", bases["llama"], "llama", {"name": "lora", "r": 4, "alpha": 8})
    started = []
    monkeypatch.setattr(streaming.Prefill, "_run", lambda self, skip: started.append(1))
    res = merge_adapter(adapter, tmp_path / "s", dtype="bfloat16", verify=False)  # fp32 base -> bf16 files
    assert res["layout"] == "rewritten" and not started


def test_every_streaming_method_has_a_bit_identity_case():
    """A method that declares `streams` gets a CASES row (FISH and LT-SFT choose their mask from data and
    store it like PaFi: the same SparseDeltaLinear.tensor_merges, covered by the pafi rows)."""
    from peftcli.methods import available_methods, get_method

    streaming_methods = {n for n in available_methods() if get_method(n).streams}
    assert {"lora", "dora", "ia3", "adalora", "bitfit", "hiwi", "pafi", "child_tuning"} <= streaming_methods
    assert streaming_methods - {opts["name"] for _, opts, _ in CASES.values()} <= {"fish", "lt_sft"}
