"""Adapter directories in the Hugging Face PEFT layout, written atomically.

A directory holds `adapter_config.json` + `adapter_model.safetensors` (PEFT's names, so peft, vLLM and
transformers load it) and peftcli's own files beside them: `peftcli.json` (method options, base model
and its fingerprint, label names, metrics) and `recipe.yaml` (the resolved recipe).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peftcli import __version__
from peftcli.errors import UserError, did_you_mean, one_line

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


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of `t`; an FSDP2 shard (DTensor) is all-gathered first, so under FSDP every process
    must call this for the same tensors in the same order."""
    t = t.detach()
    if type(t).__name__ == "DTensor":
        t = t.full_tensor()
    return t.to("cpu").contiguous().clone()


def adapter_tensors(method, model) -> dict[str, torch.Tensor]:
    """The tensors to store, whole. A collective under FSDP: call it on every process."""
    tensors = {k: full_tensor(v) for k, v in method.state_dict(model).items()}
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    if not tensors or empty:
        # ZeRO-3 shards show up as empty tensors: refuse rather than write a useless adapter.
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


def write_adapter(directory: Path, method, model, meta: dict, recipe_yaml: str | None = None,
                  tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write (or atomically replace) every file of an adapter directory. `tensors`: adapter_tensors()
    gathered beforehand on every process (multi-process runs write from the main process only)."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(method, model) if tensors is None else tensors
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
    options: object = None  # the method's validated options (set by read_adapter)

    @property
    def size_bytes(self) -> int:
        return (self.path / WEIGHTS).stat().st_size


def _read_json(file: Path, what: str):
    try:
        data = json.loads(file.read_bytes())
    except OSError as exc:
        raise UserError(f"{file}: cannot read ({exc.strerror})") from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8 text
        raise UserError(f"{file}: not valid JSON ({one_line(exc, 120)}); restore the file or re-export the adapter") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a JSON object ({what}), got a JSON {type(data).__name__}; "
                        "restore the file or re-export the adapter")
    return data


class _MetaBase(BaseModel):
    """The `base` section of peftcli.json (written by `peftcli train`)."""

    model_config = ConfigDict(extra="allow")
    name_or_path: str = Field(min_length=1)
    gguf_file: str | None = None
    task: Literal["causal-lm", "seq-cls"] = "causal-lm"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    fingerprint: str | None = None
    label_names: list[str] | None = None
    new_modules: list[str] | None = None
    trust_remote_code: bool = False


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow")
    method: dict[str, Any]
    base: _MetaBase
    saved_modules: list[str] | None = None
    metrics: dict[str, Any] | None = None


def _check_options(file: Path, options_cls, data: dict, prefix: tuple, fix: str):
    from peftcli.recipe import _format_errors

    try:
        return options_cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{_format_errors(exc, options_cls, {}, str(file), prefix=prefix, data=data)}; {fix}") from None


def adapter_options(path: Path, config: dict, meta: dict | None):
    """The validated method options of an adapter directory: from peftcli.json, or for an adapter written
    by another tool from adapter_config.json. Any problem is a UserError naming the file and the key."""
    from peftcli.methods import available_methods, get_method

    if meta is not None:
        file, fix = path / META, "fix peftcli.json (or restore it from the run directory) or re-train"
        _check_options(file, _Meta, meta, (), fix)
        name = meta["method"].get("name")
        if not isinstance(name, str) or name not in available_methods():
            hint = did_you_mean(name, available_methods()) if isinstance(name, str) else ""
            raise UserError(f"{file}: method.name {one_line(repr(name), 80)} is not a peftcli method{hint} "
                            f"(known: {', '.join(available_methods())}); {fix}")
        return _check_options(file, get_method(name).Options, meta["method"], ("method",), fix)
    file = path / CONFIG
    peft_type = config.get("peft_type")
    if peft_type not in FOREIGN:
        raise UserError(f"{file}: peft_type {one_line(repr(peft_type), 80)} is not supported "
                        f"(supported: {', '.join(FOREIGN)}) and the directory has no {META}")
    name = FOREIGN[peft_type](config)
    fix = "fix the file or re-export the adapter"
    try:
        return get_method(name).from_adapter_config(config)
    except KeyError as exc:
        raise UserError(f"{file}: missing required field {one_line(repr(exc.args[0]), 80)} for a {peft_type} adapter; {fix}") from None
    except ValidationError as exc:
        from peftcli.recipe import _format_errors

        # the options are built from PEFT's field names: name the field as the file spells it (lora_alpha, ...)
        loc = exc.errors()[0]["loc"]
        field = next((f"{p}_{loc[0]}" for p in ("lora", "init") if loc and f"{p}_{loc[0]}" in config), loc[0] if loc else None)
        msg = _format_errors(exc, get_method(name).Options, {}, str(file))
        if field and loc and field != loc[0]:
            msg = msg.replace(f": {loc[0]}: ", f": {field}: ", 1)
        raise UserError(f"{msg}; {fix}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{file}: not a valid {peft_type} adapter config ({one_line(exc, 120)}); {fix}") from None


def _check_weights(file: Path) -> None:
    """Parse the safetensors header, which also checks that the file is as long as the header says."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            f.keys()
    except Exception as exc:  # SafetensorError, OSError: a truncated, empty or foreign file
        raise UserError(f"{file}: corrupt or truncated safetensors file ({one_line(exc, 120)}); "
                        "re-export the adapter or re-train") from None


def read_adapter(path: str | Path) -> AdapterDir:
    """An adapter directory, checked before any model is loaded: JSON files parse, peftcli.json (when
    present) has a known method with valid options and a base section, a foreign adapter_config.json has
    the fields its method needs, and the weights file is a complete safetensors file."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "not found"
        raise UserError(f"adapter directory {path} {what}")
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        hint = " (legacy adapter_model.bin is not supported; re-save it as safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise UserError(f"{path} is not an adapter directory: it needs {CONFIG} and {WEIGHTS}{hint}")
    config = _read_json(path / CONFIG, "the adapter config")
    meta = _read_json(path / META, "peftcli's metadata") if (path / META).is_file() else None
    adapter = AdapterDir(path, config, meta)
    adapter.options = adapter_options(path, config, meta)
    _check_weights(path / WEIGHTS)
    return adapter


def method_for(adapter: AdapterDir):
    """The method instance that reads this adapter's tensors."""
    from peftcli.methods import build_method

    return build_method(adapter.options if adapter.options is not None else adapter_options(adapter.path, adapter.config, adapter.meta))


def load_tensors(adapter: AdapterDir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = adapter.path / WEIGHTS
    try:
        return load_file(str(file))
    except Exception as exc:  # SafetensorError, OSError: truncated or damaged since read_adapter
        raise UserError(f"{file}: corrupt or truncated safetensors file ({one_line(exc, 120)}); "
                        "re-export the adapter or re-train") from None
