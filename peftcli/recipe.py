"""The recipe: YAML -> validated, typed sections (model / method / data / train / output).

Errors name the key path and the YAML line, and unknown keys get a "did you mean" suggestion.
The `method` section is validated by the chosen method's own options model (see methods/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from peftcli.errors import UserError, did_you_mean


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Section):
    name_or_path: str = Field(description="transformers model dir, hub id, or a demo alias (demo:smollm2, demo:minilm)")
    gguf_file: str | None = None
    task: Literal["causal-lm", "seq-cls"] = "causal-lm"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    num_labels: int | None = Field(None, description="seq-cls only; inferred from the data when null")
    trust_remote_code: bool = False


class DataFile(_Section):
    path: str
    format: Literal["text", "alpaca", "chat", "classification"] | None = None
    split: str = "train"
    text_column: str | None = None
    label_column: str = "label"
    limit: int | None = Field(None, ge=1, description="use only the first N rows")


class DataCfg(_Section):
    train: DataFile
    eval: DataFile | None = None
    eval_ratio: float | None = Field(None, gt=0, lt=1)
    format: Literal["text", "alpaca", "chat", "classification"] = "alpaca"
    template: Literal["auto", "chat", "alpaca"] = "auto"
    system_prompt: str | None = None
    max_length: int = Field(512, ge=8)
    padding: Literal["longest", "max_length"] = Field("longest", description="pad each batch to its longest row, or always to max_length")

    @model_validator(mode="after")
    def _one_eval_source(self):
        if self.eval is not None and self.eval_ratio is not None:
            raise ValueError("give either data.eval or data.eval_ratio, not both")
        return self


class GenerationEval(_Section):
    """Greedy generation on held-out prompts, scored against the reference response."""

    samples: int = Field(64, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    metric: Literal["exact", "json"] = "exact"
    batch_size: int = Field(16, ge=1)
    before: bool = True


class TrainCfg(_Section):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    mmap_large_tensors: bool = Field(False, description="Linux/glibc, CPU: give freed activation memory back to the OS; "
                                     "lower peak RSS for large models, slower steps for small ones (see README)")
    eval_every: int | None = Field(50, ge=1)
    save_every: int | None = Field(100, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = 42
    num_workers: int = Field(0, ge=0)
    generation_eval: GenerationEval | None = None

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


class OutputCfg(_Section):
    dir: str = "runs/default"


class Recipe(_Section):
    model: ModelCfg
    method: dict[str, Any]
    data: DataCfg
    train: TrainCfg = TrainCfg()
    output: OutputCfg = OutputCfg()
    # Set by load_recipe: the method's validated options and where the recipe came from.
    source: str | None = Field(None, exclude=True)

    @property
    def method_options(self):
        from peftcli.methods import get_method

        return get_method(self.method.get("name")).Options.model_validate(self.method)

    def resolved(self) -> dict:
        """The recipe with every default filled in (what the run directory stores)."""
        d = self.model_dump(mode="json", exclude={"source"})
        d["method"] = self.method_options.model_dump(mode="json")
        return d


# ---------------------------------------------------------------- loading

def _line_index(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML text to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _fields_at(model_cls, loc: tuple) -> list[str]:
    """Field names of the pydantic model found by walking `loc` from `model_cls`."""
    cls = model_cls
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                ann = cand
                break
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        cls = ann
    return list(getattr(cls, "model_fields", {}))


def _format_errors(err: ValidationError, model_cls, lines: dict, source: str, prefix: tuple = ()) -> str:
    e = err.errors()[0]
    loc = prefix + tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # pydantic puts union branch names into loc (e.g. 'DataFile'); drop them from the key path
    loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper()))
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = None
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            line = lines[loc[:n]]
            break
    where = f"{source}:{line}" if line else source
    if e["type"] == "extra_forbidden":
        msg = f"unknown key '{key}'" + did_you_mean(loc[-1], _fields_at(model_cls, loc[len(prefix):-1]))
    elif e["type"] == "missing":
        msg = f"missing required key '{key}'"
    else:
        got = e.get("input")
        got_s = "" if isinstance(got, dict | list) else f" (got {got!r})"
        msg = f"{key}: {e['msg']}{got_s}"
    more = len(err.errors()) - 1
    return f"{where}: {msg}" + (f" [+{more} more problem(s)]" if more else "")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.lr=1e-4")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return [k for k in key.strip().split(".") if k], value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        path, value = parse_override(item)
        if not path:
            raise UserError(f"--set {item!r}: empty key path")
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path} (give the path to a .yaml recipe, e.g. recipes/quickstart.yaml)")
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}{line}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with sections model, method, data, train, output")
    return recipe_from_dict(apply_overrides(data, overrides or []), source=str(path), lines=_line_index(text))


def recipe_from_dict(data: dict, source: str = "recipe", lines: dict | None = None) -> Recipe:
    from peftcli.methods import available_methods, get_method

    lines = lines or {}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(_format_errors(exc, Recipe, lines, source)) from None
    name = recipe.method.get("name")
    if name not in available_methods():
        where = f"{source}:{lines[('method', 'name')]}" if ("method", "name") in lines else source
        raise UserError(
            f"{where}: unknown method.name {name!r}{did_you_mean(name, available_methods())}; "
            f"choose one of: {', '.join(available_methods())} (see `peftcli methods`)"
        )
    options_cls = get_method(name).Options
    try:
        options_cls.model_validate(recipe.method)
    except ValidationError as exc:
        raise UserError(_format_errors(exc, options_cls, lines, source, prefix=("method",))) from None
    recipe.source = source
    return recipe
