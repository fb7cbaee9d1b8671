"""What `eval` and `generate` run: an adapter directory (any method, on its base) or a plain model directory
(a merged model, a base model, a demo alias), loaded the same way for both commands."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftcli.errors import UserError


@dataclass
class Target:
    model: object
    tokenizer: object
    task: str
    kind: str  # adapter | model
    source: str
    label_names: list[str] | None = None
    method: str | None = None
    data: dict = field(default_factory=dict)  # the training recipe's data section (template, system prompt, ...)
    base_cfg: object = None  # ModelCfg of the base, for an adapter (generate --compare-base loads it)


def _task_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "seq-cls"
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal-lm"


def load_target(target: str, base: str | None = None, need_adapter: bool = False) -> Target:
    """Load ADAPTER_OR_MODEL: an adapter dir (adapter_config.json), else a model dir (config.json) or a demo alias."""
    from peftcli.models import DEMO_MODELS, load_model, quiet_transformers
    from peftcli.recipe import ModelCfg

    quiet_transformers()
    path = Path(target)
    if (path / "adapter_config.json").is_file():
        from peftcli.merge import load_adapted

        a = load_adapted(path, base=base)
        recipe = {}
        if (path / "recipe.yaml").is_file():
            try:
                recipe = yaml.safe_load((path / "recipe.yaml").read_text()) or {}
            except yaml.YAMLError:
                recipe = {}
        meta_base = (a.adapter.meta or {}).get("base", {})
        from peftcli.merge import base_model_cfg

        return Target(a.loaded.model, a.loaded.tokenizer, a.task, "adapter", str(path), meta_base.get("label_names"),
                      a.method.name, recipe.get("data") or {}, base_model_cfg(a.adapter, base, None))
    if need_adapter:
        raise UserError(f"{target}: not an adapter directory (no adapter_config.json)")
    if not ((path / "config.json").is_file() or target in DEMO_MODELS):
        what = "not found" if not path.exists() else "has neither adapter_config.json nor config.json"
        raise UserError(f"{target}: {what}; give an adapter directory (from `peftcli train`) or a model directory")
    from transformers import AutoConfig

    from peftcli.models import _from_pretrained, resolve_path

    cfg = ModelCfg(name_or_path=target)
    where, gguf = resolve_path(cfg)
    config = _from_pretrained(AutoConfig, where, **({"gguf_file": gguf} if gguf else {}))
    task = _task_of(config)
    labels = None
    if task == "seq-cls":
        id2label = getattr(config, "id2label", None) or {}
        labels = [str(id2label[i]) for i in sorted(id2label)] or None
    cfg = ModelCfg(name_or_path=target, task=task)
    loaded = load_model(cfg, label_names=labels)
    return Target(loaded.model.eval(), loaded.tokenizer, task, "model", target, labels)


def data_cfg(target: Target, file: str, fmt: str | None, max_length: int | None = None):
    """A DataCfg reading FILE as the training run read its data (template, system prompt, max_length from
    the adapter's recipe), FILE as both train and eval so prepare() returns raw rows for generation."""
    from pydantic import ValidationError

    from peftcli.recipe import DataCfg

    data = target.data or {}
    base = {k: v for k, v in data.items() if k not in ("train", "eval", "eval_ratio", "packing")}
    # the file is read like the run's eval (else first training) file: its column mapping, text/label columns
    like = data.get("eval") or data.get("train") or {}
    like = (like[0] if like else {}) if isinstance(like, list) else like
    like_fmt = like.get("format") or data.get("format") if isinstance(like, dict) else None
    if fmt is None:
        fmt = "classification" if target.task == "seq-cls" else (like_fmt or "alpaca")
    entry = {k: v for k, v in like.items() if k not in ("path", "format", "split", "config", "weight", "limit")} \
        if isinstance(like, dict) and like_fmt == fmt else {}
    entry.update(path=str(file), format=fmt)
    d = {**base, "format": fmt, "train": entry, "eval": entry}
    if max_length is not None:
        d["max_length"] = max_length
    try:
        return DataCfg.model_validate(d)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"--format {fmt}: {err['msg']}") from None
