"""`peftcli recipe new` and `peftcli recipe check`.

`new` writes a complete, commented recipe: every key of every section with its default, generated from
the pydantic models' fields and descriptions (recipe.py and the method's Options), so it cannot drift from
what load_recipe accepts. Optional sub-sections that are off by default (data.eval, train.generation_eval)
are written as `null` with their keys in comments. `check` validates a recipe without loading the model.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from peftcli.errors import UserError
from peftcli.recipe import DataCfg, ModelCfg, OutputCfg, Recipe, TrainCfg, load_recipe, recipe_from_dict

SECTIONS: dict[str, tuple[type[BaseModel] | None, str]] = {
    "model": (ModelCfg, "the base model"),
    "method": (None, "the PEFT method and its options (`peftcli methods` lists them all)"),
    "data": (DataCfg, "training and evaluation data"),
    "train": (TrainCfg, "the training loop"),
    "output": (OutputCfg, "where the run directory goes"),
}
TASK_FORMAT = {"seq-cls": "classification"}  # other tasks keep data.format's default


def _submodel(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (X, X | None, list[X] | X), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _type_hint(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_hint(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is not None:
        args = ", ".join(_type_hint(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip().removesuffix("\n...").strip()


def _emit(model_cls: type[BaseModel], values: dict, indent: int) -> list[str]:
    """YAML lines for `values` (every field of model_cls), each key preceded by its description and type."""
    pad, lines = "  " * indent, []
    for name, field in model_cls.model_fields.items():
        value = values.get(name)
        comment = f"{field.description}; " if field.description else ""
        required = field.is_required() and name not in values
        lines.append(f"{pad}# {comment}{_type_hint(field.annotation)}{' (required)' if required else ''}")
        sub = _submodel(field.annotation)
        if sub is not None and isinstance(value, dict):
            lines.append(f"{pad}{name}:")
            lines += _emit(sub, value, indent + 1)
        elif sub is not None and value is None:
            lines.append(f"{pad}{name}: null  # off; to use it, replace null with these keys:")
            example = {k: (None if f.is_required() else f.get_default(call_default_factory=True)) for k, f in sub.model_fields.items()}
            lines += [f"{pad}#   {k}: {_scalar(v)}" for k, v in example.items()]
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")
    return lines


def new_recipe(model: str, method: str, task: str | None = None, data: str = "data/train.jsonl",
               output: str | None = None) -> str:
    """A complete, commented recipe for MODEL x METHOD x TASK that load_recipe reads back to the defaults."""
    from peftcli.methods import get_method

    options = get_method(method).Options  # unknown method: UserError naming the choices
    required = [k for k, f in options.model_fields.items() if f.is_required() and k != "name"]
    if required:  # hybrid: its parts are the recipe's own choice, there is no default to write
        raise UserError(f"--method {method}: method.{required[0]} has no default to write; generate the recipe for one of "
                        f"its parts and edit the method section (hybrid recipes list methods: method: [{{name: lora}}, {{name: ia3}}])")
    base = {"model": {"name_or_path": model, **({"task": task} if task else {})},
            "method": {"name": method}, "data": {"train": {"path": data}},
            "output": {"dir": output or f"runs/{method}"}}
    if task in TASK_FORMAT:
        base["data"]["format"] = TASK_FORMAT[task]
    recipe = recipe_from_dict(base, source="the generated recipe")  # the choices are valid together
    resolved = recipe.resolved()
    lines = [f"# peftcli recipe: {method} on {model}. Every key is shown with its default; delete what you do not change.",
             "# Check it with `peftcli recipe check FILE`, inspect it with `peftcli inspect FILE`, run it with `peftcli train FILE`.", ""]
    for section, (cls, what) in SECTIONS.items():
        lines.append(f"# --- {section}: {what}")
        lines.append(f"{section}:")
        lines += _emit(cls or options, resolved[section], 1)
        lines.append("")
    text = "\n".join(lines)
    if load_from_text(text).resolved() != resolved:  # a generator bug, not a user error
        raise RuntimeError("recipe new: the generated recipe does not read back to its defaults")
    return text


def load_from_text(text: str) -> Recipe:
    from peftcli.recipe import yaml_load

    return recipe_from_dict(yaml_load(text), source="the generated recipe")


def check_recipe(path, overrides: list[str] | None = None) -> dict:
    """Validate a recipe (keys, values, method options) without loading the model; the resolved recipe
    with every default filled in. The data files are checked to exist (a hub dataset name passes)."""
    from pathlib import Path

    recipe = load_recipe(path, overrides)
    for key, df in _data_files(recipe):
        p = Path(df.path).expanduser()
        if p.suffix.lower() in (".json", ".jsonl", ".csv", ".tsv", ".parquet") and not p.is_file():
            raise UserError(f"{key}.path: data file {df.path} not found (paths are relative to the current directory)")
    return recipe.resolved()


def _data_files(recipe: Recipe):
    for key in ("train", "eval"):
        value = getattr(recipe.data, key, None)
        for i, df in enumerate(value if isinstance(value, list) else [value] if value is not None else []):
            if hasattr(df, "path"):
                yield (f"data.{key}" + (f"[{i}]" if isinstance(value, list) else "")), df
