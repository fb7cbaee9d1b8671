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
LEGACY_WEIGHTS = "adapter_model.bin"  # torch.save of the same dict, written by older PEFT versions (read only)
CONFIG = "adapter_config.json"
META = "peftcli.json"
RECIPE = "recipe.yaml"
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
# Which method reads an HF PEFT peft_type, and which peft_types load in HF PEFT, come from the registry
# (Method.peft_type / peft_types / reads_peft_config). HF PEFT methods that no registered method reads
# are named in the error instead of a bare "not supported":
NOT_YET = {"MULTITASK_PROMPT_TUNING": "multitask prompt tuning"}


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


def peft_base_name(name: str | None, gguf_file: str | None = None) -> str | None:
    """base_model_name_or_path for adapter_config.json: something transformers/AutoPeftModel can load.
    A demo alias becomes its resolved local folder, a local path an absolute one; a hub id stays. (For a
    GGUF base the folder holds the .gguf file: transformers needs gguf_file= besides the folder.)
    peftcli.json keeps the name as the recipe wrote it."""
    if not name:
        return name
    from peftcli.models import resolve_path
    from peftcli.recipe import ModelCfg

    try:
        path, _ = resolve_path(ModelCfg(name_or_path=name, gguf_file=gguf_file))
    except (UserError, ValueError):
        return name
    return str(Path(path).resolve()) if Path(path).exists() else path


def peft_config(method, model, base_name: str | None, task: str, gguf_file: str | None = None) -> dict:
    cfg = method.adapter_config(model, peft_base_name(base_name, gguf_file))
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
    base = meta.get("base", {})
    config = peft_config(method, model, base.get("name_or_path"), base.get("task", "causal-lm"), base.get("gguf_file"))
    meta = {**meta, "peftcli_version": __version__, "method": method.saved_options().model_dump(mode="json"),
            "saved_modules": method.saved_modules, "describe": method.describe(model)}
    atomic_write(directory / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic_write(directory / META, json.dumps(meta, indent=2) + "\n")
    if recipe_yaml is not None:
        atomic_write(directory / RECIPE, recipe_yaml)
    atomic_write(directory / "README.md", _model_card(config, meta, recipe_yaml, directory, method.mergeable))


def loads_in_peft(peft_type) -> bool:
    """Whether an adapter_config.json's peft_type is HF PEFT's own layout (written by a registered method)."""
    from peftcli.methods import peft_types_written

    return peft_type in peft_types_written()


def _model_card(config: dict, meta: dict, recipe_yaml: str | None = None, directory: Path | None = None,
                mergeable: bool = True) -> str:
    from peftcli.report import model_card  # the run report's card: data, trainable %, metrics, how to load

    return model_card(config, meta, recipe_yaml, directory, peft_loads=loads_in_peft(config.get("peft_type")), mergeable=mergeable)


@dataclass
class AdapterDir:
    path: Path
    config: dict
    meta: dict | None  # None for adapters written by other tools
    options: object = None  # the method's validated options (set by read_adapter)

    @property
    def weights(self) -> Path:
        """adapter_model.safetensors, or a legacy adapter_model.bin when only that exists."""
        return weights_file(self.path) or self.path / WEIGHTS

    @property
    def size_bytes(self) -> int:
        return self.weights.stat().st_size


def weights_file(path: Path) -> Path | None:
    for name in (WEIGHTS, LEGACY_WEIGHTS):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


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
    task: Literal["causal-lm", "seq-cls", "seq2seq"] = "causal-lm"
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
    from peftcli.methods import available_methods, get_method, method_for_peft_config, peft_types_read

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
    cls = method_for_peft_config(config)
    supported = ", ".join(peft_types_read())
    if cls is None and peft_type in NOT_YET:
        raise UserError(f"{file}: {NOT_YET[peft_type]} ({peft_type}) adapters are not supported: peftcli has no "
                        f"{NOT_YET[peft_type]} method yet (supported peft_type: {supported})")
    if cls is None:
        raise UserError(f"{file}: peft_type {one_line(repr(peft_type), 80)} is not supported "
                        f"(supported: {supported}) and the directory has no {META}")
    name = cls.name
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


def _load_legacy(file: Path) -> dict[str, torch.Tensor]:
    """A legacy adapter_model.bin: torch.load with weights_only=True (tensors only, no pickled code)."""
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (not plain tensors), a truncated zip, OSError
        raise UserError(f"{file}: not a readable torch state dict ({one_line(exc, 120)}); "
                        "re-export the adapter as safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{file}: expected a dict of tensor names to tensors; re-export the adapter as safetensors")
    return sd


def _check_weights(file: Path) -> None:
    """Parse the safetensors header, which also checks that the file is as long as the header says."""
    from safetensors import safe_open

    if file.name == LEGACY_WEIGHTS:
        _load_legacy(file)
        return
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
    if not (path / CONFIG).is_file() or weights_file(path) is None:
        raise UserError(f"{path} is not an adapter directory: it needs {CONFIG} and {WEIGHTS} (or a legacy {LEGACY_WEIGHTS})")
    config = _read_json(path / CONFIG, "the adapter config")
    meta = _read_json(path / META, "peftcli's metadata") if (path / META).is_file() else None
    adapter = AdapterDir(path, config, meta)
    adapter.options = adapter_options(path, config, meta)
    _check_weights(adapter.weights)
    return adapter


def method_for(adapter: AdapterDir):
    """The method instance that reads this adapter's tensors."""
    from peftcli.methods import build_method

    return build_method(adapter.options if adapter.options is not None else adapter_options(adapter.path, adapter.config, adapter.meta))


def load_tensors(adapter: AdapterDir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = adapter.weights
    if file.name == LEGACY_WEIGHTS:
        return _load_legacy(file)
    try:
        return load_file(str(file))
    except Exception as exc:  # SafetensorError, OSError: truncated or damaged since read_adapter
        raise UserError(f"{file}: corrupt or truncated safetensors file ({one_line(exc, 120)}); "
                        "re-export the adapter or re-train") from None


# options that shape only the training run, not the stored tensors or the function they compute (a method
# adds its own in Method.training_only); which modules are adapted is checked tensor by tensor
_TRAINING_ONLY = {"name", "init_from", "dropout", "modules_to_save", "target_modules", "exclude_modules",
                  "layers_to_transform", "layers_pattern"}


def continue_from(method, model, path: str | Path, fingerprint: str | None = None) -> AdapterDir:
    """`method.init_from`: put an adapter directory's tensors (peftcli's or HF PEFT's) into `method`, just
    applied to `model`. The adapter's method and the options that define its function must be the recipe's;
    which modules it covers is checked tensor by tensor. Any mismatch is a one-line UserError."""
    from peftcli.methods import build_method

    where = f"method.init_from: {path}"
    try:
        adapter = read_adapter(path)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    theirs, mine = adapter.options, method.opts
    if theirs.name != mine.name:
        raise UserError(f"{where} holds a {theirs.name} adapter, the recipe trains {mine.name}; set method.name: {theirs.name} "
                        "or drop method.init_from")
    problem = method.check_continuation(build_method(theirs), model)  # per-module checks of the method's own
    if problem:
        raise UserError(f"{where}: {problem}")
    a, b = theirs.model_dump(mode="json"), mine.model_dump(mode="json")
    for key in sorted(set(a) | set(b)):
        if key not in _TRAINING_ONLY | method.training_only and a.get(key) != b.get(key):
            raise UserError(f"{where}: the adapter has method.{key}={one_line(repr(a.get(key)), 80)}, the recipe "
                            f"{one_line(repr(b.get(key)), 80)}; make them equal to continue training it")
    expected = ((adapter.meta or {}).get("base") or {}).get("fingerprint")
    if expected and fingerprint and expected != fingerprint:
        raise UserError(f"{where} was trained on another base (weights fingerprint {expected} != {fingerprint}); "
                        "use the adapter's base model")
    try:
        method.load_state_dict(model, load_tensors(adapter))
    except UserError as exc:
        raise UserError(f"{where} does not fit the recipe's method on this model: {exc}") from None
    return adapter
