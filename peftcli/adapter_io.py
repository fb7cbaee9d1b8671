"""Adapter directories in the Hugging Face PEFT layout, written atomically.

A directory holds `adapter_config.json` + `adapter_model.safetensors` (PEFT's names, so peft, vLLM and
transformers load it) and peftcli's own files beside them: `peftcli.json` (method options, base model
and its fingerprint, label names, metrics) and `recipe.yaml` (the resolved recipe).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from peftcli import __version__
from peftcli.errors import UserError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
META = "peftcli.json"
RECIPE = "recipe.yaml"
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}
# HF PEFT peft_type -> peftcli method, for adapters written by other tools
FOREIGN = {"LORA": lambda c: "dora" if c.get("use_dora") else "lora", "IA3": lambda c: "ia3", "ADALORA": lambda c: "adalora"}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def adapter_tensors(method, model) -> dict[str, torch.Tensor]:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in method.state_dict(model).items()}
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    if not tensors or empty:
        # ZeRO-3/FSDP shards show up as empty tensors: refuse rather than write a useless adapter.
        raise RuntimeError(f"refusing to save an empty adapter tensor ({empty[:2] or 'no tensors'}); gather parameters first")
    return tensors


def peft_config(method, model, base_name: str | None, task: str) -> dict:
    cfg = method.adapter_config(model, base_name)
    cfg.update(task_type=TASK_TYPES.get(task), inference_mode=True, revision=None, peft_version=_peft_version())
    return cfg


def _peft_version() -> str:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return "0.17.0"  # the oldest PEFT layout we write


def write_adapter(directory: Path, method, model, meta: dict, recipe_yaml: str | None = None) -> None:
    """Write (or atomically replace) every file of an adapter directory."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(method, model)
    config = peft_config(method, model, meta.get("base", {}).get("name_or_path"), meta.get("base", {}).get("task", "causal-lm"))
    saved_opts = method.saved_options() if hasattr(method, "saved_options") else method.opts
    meta = {**meta, "peftcli_version": __version__, "method": saved_opts.model_dump(mode="json"),
            "saved_modules": method.saved_modules, "describe": method.describe(model)}
    atomic_write(directory / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic_write(directory / META, json.dumps(meta, indent=2) + "\n")
    if recipe_yaml is not None:
        atomic_write(directory / RECIPE, recipe_yaml)
    atomic_write(directory / "README.md", _model_card(config, meta))


def _model_card(config: dict, meta: dict) -> str:
    base = config.get("base_model_name_or_path")
    m = meta.get("metrics") or {}
    lines = [
        "---", f"base_model: {base}", "library_name: peft", "tags: [peftcli]", "---", "",
        f"# {meta.get('method', {}).get('name', 'adapter')} adapter for {base}", "",
        f"Trained with peftcli {meta.get('peftcli_version')}. Load with `peft.PeftModel.from_pretrained(base, this_dir)`"
        if config.get("peft_type") in ("LORA", "IA3", "ADALORA") else
        "This adapter uses a peftcli-only layout: fold it into the base with `peftcli merge`.", "",
    ]
    if m:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in m.items()] + [""]
    return "\n".join(lines)


@dataclass
class AdapterDir:
    path: Path
    config: dict
    meta: dict | None  # None for adapters written by other tools

    @property
    def size_bytes(self) -> int:
        return (self.path / WEIGHTS).stat().st_size


def read_adapter(path: str | Path) -> AdapterDir:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"adapter directory {path} not found")
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        hint = " (legacy adapter_model.bin is not supported; re-save it as safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise UserError(f"{path} is not an adapter directory: it needs {CONFIG} and {WEIGHTS}{hint}")
    try:
        config = json.loads((path / CONFIG).read_text())
        meta = json.loads((path / META).read_text()) if (path / META).is_file() else None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: corrupt JSON ({exc})") from None
    return AdapterDir(path, config, meta)


def method_for(adapter: AdapterDir):
    """The method instance that reads this adapter's tensors."""
    from peftcli.methods import build_method, get_method

    if adapter.meta is not None:
        return build_method(adapter.meta["method"])
    peft_type = adapter.config.get("peft_type")
    if peft_type not in FOREIGN:
        raise UserError(f"{adapter.path}: peft_type {peft_type!r} is not supported (supported: {', '.join(FOREIGN)})")
    name = FOREIGN[peft_type](adapter.config)
    return build_method(get_method(name).from_adapter_config(adapter.config))


def load_tensors(adapter: AdapterDir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter.path / WEIGHTS))
