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


def meta_model(cfg, label_names: list[str] | None = None):
    """The recipe's model built from its config on the meta device: shapes without weights, so a
    recipe is inspected in seconds instead of loading (or dequantising) the checkpoint."""
    from transformers import AutoConfig

    from peftcli.models import DTYPES, _from_pretrained, model_class_for, resolve_path

    path, gguf = resolve_path(cfg)
    config = _from_pretrained(AutoConfig, path, trust_remote_code=cfg.trust_remote_code, **({"gguf_file": gguf} if gguf else {}))
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


def inspect_target(target: str, by: str = "type", overrides: list[str] | None = None, base: str | None = None) -> dict:
    from peftcli.models import load_model, load_tokenizer, quiet_transformers

    quiet_transformers()
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or (path.is_file() and not path.is_dir()):
        from peftcli.methods import build_method
        from peftcli.recipe import load_recipe

        recipe = load_recipe(path, overrides)
        label_names = None
        if recipe.model.task == "seq-cls" and recipe.model.num_labels is None:
            from peftcli.data import training_labels

            label_names = training_labels(recipe.data)
        method = build_method(recipe.method_options)
        try:
            model = meta_model(recipe.model, label_names)
            method.apply(model, recipe.model.task)
        except (NotImplementedError, RuntimeError):
            # a method whose init needs real weights (PiSSA's SVD, ...): count on the loaded model
            loaded = load_model(recipe.model, load_tokenizer(recipe.model), num_labels=recipe.model.num_labels,
                                label_names=label_names, seed=recipe.train.seed)
            model, method = loaded.model, build_method(recipe.method_options)
            method.apply(model, recipe.model.task, also_save=loaded.new_modules)
        return _report(model, by, "recipe", str(path), method, stored_bytes(method, model))
    if (path / "adapter_config.json").is_file():
        from peftcli.merge import load_adapted

        a = load_adapted(path, base=base)
        extra = {"metrics": (a.adapter.meta or {}).get("metrics")} if a.adapter.meta else {}
        return _report(a.loaded.model, by, "adapter", str(path), a.method, a.adapter.size_bytes, extra)
    if (path / "config.json").is_file():
        from transformers import AutoModel

        from peftcli.models import _from_pretrained

        return _report(_from_pretrained(AutoModel, str(path)), by, "model", str(path))
    raise UserError(f"{target}: not a recipe (.yaml), an adapter directory (adapter_config.json) or a model directory (config.json)")
