"""Trainable-parameter breakdown of a recipe, an adapter directory or a model directory."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import UserError
from peftcli.methods.hybrid import inference_cost
from peftcli.methods.targets import layer_index


def _group(name: str, by: str) -> str:
    if by == "module":
        return name.rpartition(".")[0] or name
    if by == "layer":
        idx = layer_index(name)
        return f"layer {idx}" if idx is not None else ("embeddings" if "embed" in name else "other")
    # by type: the module path without layer numbers, leading wrappers and `base_layer`,
    # e.g. self_attn.q_proj (the frozen base) and self_attn.q_proj.lora_A
    parts = name.split(".")[:-1]
    out: list[str] = []
    for i, p in enumerate(parts):
        if p.isdigit() or (i + 1 < len(parts) and parts[i + 1].isdigit()) or p == "base_layer":
            continue
        if not out and p in ("model", "base_model", "transformer", "bert", "encoder", "decoder", "roberta"):
            continue
        out.append(p)
    return ".".join(out) or name


def breakdown(model: nn.Module, by: str = "type") -> list[dict]:
    rows: OrderedDict[str, dict] = OrderedDict()
    for name, p in model.named_parameters():
        row = rows.setdefault(_group(name, by), {"group": _group(name, by), "total": 0, "trainable": 0})
        row["total"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
    return list(rows.values())


def stored_bytes(method, model) -> int:
    """Exact size of the adapter file this method would write (zeros stand in for meta tensors)."""
    from safetensors.torch import save

    tensors = {k: torch.zeros(v.shape, dtype=v.dtype) if v.is_meta else v.detach().cpu().contiguous()
               for k, v in method.state_dict(model).items()}
    return len(save(tensors, metadata={"format": "pt"}))


# GGUF architectures whose config transformers' legacy reader patches beyond the plain key mapping
_GGUF_SPECIAL = ("t5", "stablelm", "moe", "gpt_oss", "gpt-oss", "minimax", "gemma", "lfm2", "falcon", "bloom")


def gguf_config_dict(file: str) -> dict | None:
    """A GGUF file's transformers config dict from its metadata alone, the same as transformers' legacy
    reader gives (the one AutoConfig uses for Llama-family files), which first parses every vocabulary
    and merge string into numpy views: 5.5 s of SmolLM2's 7.5 s `inspect`. Here the string tables are
    stepped over. None for architectures that reader special-cases (the caller then uses AutoConfig)."""
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS, get_gguf_config, read_gguf_metadata

    metadata, names = read_gguf_metadata(file)
    arch = metadata["general.architecture"]
    if arch in GGUF_CONFIG_ARCHS:
        return get_gguf_config(metadata, names)
    if arch not in GGUF_CONFIG_MAPPING or any(s in arch for s in _GGUF_SPECIAL) or metadata.get("general.name") == "mistral":
        return None
    config = {"tie_word_embeddings": "output.weight" not in names, **GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {})}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        new = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest, -1)
        if new is not None and new != -1:
            config[new] = value[0] if isinstance(value, list) and len(value) == 1 else value
    if "vocab_size" not in config and isinstance(metadata.get("tokenizer.ggml.tokens"), int):
        config["vocab_size"] = metadata["tokenizer.ggml.tokens"]  # the reader gives a skipped table's length
    return config


def model_config(cfg):
    """The transformers config of a ModelCfg, without reading weights (GGUF: gguf_config_dict)."""
    from transformers import AutoConfig

    from peftcli.models import _from_pretrained, resolve_path

    path, gguf = resolve_path(cfg)
    if gguf and (Path(path) / gguf).is_file() and (d := gguf_config_dict(str(Path(path) / gguf))) is not None:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[d["model_type"]].from_dict(d)
    return _from_pretrained(AutoConfig, path, trust_remote_code=cfg.trust_remote_code, **({"gguf_file": gguf} if gguf else {}))


def meta_model(cfg, label_names: list[str] | None = None):
    """The recipe's model built from its config on the meta device: shapes without weights, so a
    recipe is inspected in seconds instead of loading (or dequantising) the checkpoint."""
    from peftcli.models import DTYPES, model_class_for

    config = model_config(cfg)
    if cfg.task == "seq-cls":
        config.num_labels = len(label_names) if label_names else (cfg.num_labels or 2)
    with torch.device("meta"):
        model = model_class_for(cfg.task).from_config(config, dtype=DTYPES.get(cfg.dtype, torch.float32))
    return model


def _report(model, by: str, kind: str, source: str, method=None, size: int | None = None, extra: dict | None = None) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = {"source": source, "kind": kind, "total_params": total, "trainable_params": trainable,
              "trainable_percent": 100.0 * trainable / max(total, 1), "by": by, "rows": breakdown(model, by)}
    if method is not None:
        report["method"] = method.name
        report["adapter_bytes"] = size
        report.update(method.describe(model))
        cost = inference_cost([report])
        if cost:  # additive methods: what they add to every forward, beside the base's ~2 FLOPs per weight
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            n_emb = sum(p.numel() for p in emb.parameters()) if emb is not None else 0
            report["inference_cost"] = {**cost, "base_flops_per_token": 2 * (total - trainable - n_emb)}
    report.update(extra or {})
    return report


def _on_skeleton(make, count) -> dict | None:
    """`count(model)` on the base's skeleton (peftcli/skeleton.py: no transformers import), or None when
    there is none for this base or anything fails on it: the caller then takes transformers' meta model,
    which gives the method's own error, or loads the base for a method that needs real weights."""
    try:
        model = make()
        return None if model is None else count(model)
    except Exception:
        return None


def _recipe_report(model, method, task: str, by: str, source: str) -> dict:
    method.apply(model, task)
    return _report(model, by, "recipe", source, method, stored_bytes(method, model))


def inspect_target(target: str, by: str = "type", overrides: list[str] | None = None, base: str | None = None) -> dict:
    from peftcli.models import load_model, load_tokenizer, quiet_transformers
    from peftcli.skeleton import skeleton_model

    path = Path(target)
    if path.suffix in (".yaml", ".yml") or (path.is_file() and not path.is_dir()):
        from peftcli.methods import build_method
        from peftcli.recipe import load_recipe

        recipe = load_recipe(path, overrides)
        label_names = None
        if recipe.model.task == "seq-cls" and recipe.model.num_labels is None:
            from peftcli.data import training_labels

            label_names = training_labels(recipe.data)
        task = recipe.model.task
        report = _on_skeleton(lambda: skeleton_model(recipe.model, label_names),
                              lambda model: _recipe_report(model, build_method(recipe.method_options), task, by, str(path)))
        if report is not None:
            return report
        quiet_transformers()
        try:
            return _recipe_report(meta_model(recipe.model, label_names), build_method(recipe.method_options), task, by, str(path))
        except (NotImplementedError, RuntimeError):
            # a method whose init or report needs real weights (PiSSA's SVD, ...): count on the loaded model
            loaded = load_model(recipe.model, load_tokenizer(recipe.model), num_labels=recipe.model.num_labels,
                                label_names=label_names, seed=recipe.train.seed)
            model, method = loaded.model, build_method(recipe.method_options)
            method.apply(model, task, also_save=loaded.new_modules)
            return _report(model, by, "recipe", str(path), method, stored_bytes(method, model))
    if (path / "adapter_config.json").is_file():
        return inspect_adapter(path, by, base)
    if (path / "config.json").is_file():
        from peftcli.recipe import ModelCfg

        report = _on_skeleton(lambda: skeleton_model(ModelCfg(name_or_path=str(path)), task="base"),
                              lambda model: _report(model, by, "model", str(path)))
        if report is not None:
            return report
        quiet_transformers()
        from transformers import AutoConfig, AutoModel

        from peftcli.models import _from_pretrained

        config = _from_pretrained(AutoConfig, str(path))
        with torch.device("meta"):  # counts need shapes only
            model = AutoModel.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
        return _report(model, by, "model", str(path))
    raise UserError(f"{target}: not a recipe (.yaml), an adapter directory (adapter_config.json) or a model directory (config.json)")


def inspect_adapter(path: Path, by: str = "type", base: str | None = None, load_base: bool = False) -> dict:
    """An adapter directory's report. The base is a skeleton (peftcli/skeleton.py) or, for a base it does
    not describe, transformers' model on the meta device, both built from the base's config; only the
    adapter's own tensors are real (read from the adapter file), so nothing of the base is loaded or
    dequantised; `load_base` (or a method that needs real base weights) takes the loaded path instead."""
    from peftcli import adapter_io
    from peftcli.merge import base_model_cfg
    from peftcli.skeleton import skeleton_model

    adapter = adapter_io.read_adapter(path)
    extra = {"metrics": (adapter.meta or {}).get("metrics")} if adapter.meta else {}
    cfg = base_model_cfg(adapter, base, None)
    meta_base = (adapter.meta or {}).get("base", {})
    new_modules = meta_base.get("new_modules")
    if not load_base and (new_modules is not None or cfg.task == "causal-lm"):
        stored: dict = {}

        def count(model) -> dict:
            method = adapter_io.method_for(adapter)
            base_ids = {id(t) for t in (*model.parameters(), *model.buffers())}
            method.apply(model, cfg.task, also_save=new_modules or [])
            _materialise_new(model, base_ids)
            stored.update(stored or adapter_io.load_tensors(adapter))
            method.load_state_dict(model, stored)
            return _report(model, by, "adapter", str(path), method, adapter.size_bytes, extra)

        report = _on_skeleton(lambda: skeleton_model(cfg, meta_base.get("label_names")), count)
        if report is not None:
            return report
        from peftcli.models import quiet_transformers

        quiet_transformers()
        try:
            return count(meta_model(cfg, meta_base.get("label_names")))
        except (NotImplementedError, RuntimeError):
            pass  # a method that needs the real base weights to take its tensors: load them
    from peftcli.merge import load_adapted

    a = load_adapted(path, base=base)
    return _report(a.loaded.model, by, "adapter", str(path), a.method, a.adapter.size_bytes, extra)


def _materialise_new(model: nn.Module, base_ids: set[int]) -> None:
    """Give the tensors a method added to a meta model (ids not in `base_ids`) real, uninitialised CPU
    memory, so the adapter's values can be loaded into them; the base stays on the meta device (and its
    tied weights stay tied)."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or not t.is_meta or id(t) in base_ids:
                    continue
                if id(t) not in made:
                    # empty_strided: empty_like of a meta tensor goes through torch._refs, whose first
                    # call imports sympy (0.5 s)
                    real = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
                    made[id(t)] = nn.Parameter(real, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else real
                store[name] = made[id(t)]
