"""The recipe: YAML -> validated, typed sections (model / method / data / train / output).

Errors name the key path and the YAML line, and unknown keys get a "did you mean" suggestion.
The `method` section is validated by the chosen method's own options model (see methods/).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from peftcli.errors import UserError, did_you_mean, one_line


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelCfg(_Section):
    name_or_path: str = Field(description="transformers model dir, hub id, or a demo alias (demo:smollm2, demo:minilm)")
    gguf_file: str | None = None
    task: Literal["causal-lm", "seq-cls", "seq2seq"] = Field(
        "causal-lm", description="seq2seq: encoder-decoder models (T5, BART); loss on the target, generation-based eval")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    num_labels: int | None = Field(None, description="seq-cls only; inferred from the data when null")
    trust_remote_code: bool = False


FORMATS = Literal["text", "alpaca", "chat", "sharegpt", "classification"]


class ShareGPTTags(_Section):
    """Keys and role tags of ShareGPT-style conversations (LLaMA-Factory's dataset_info `tags`)."""

    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    system_tag: str = "system"
    observation_tag: str = Field("observation", description="tool results; rendered with role 'tool'")
    function_tag: str = Field("function_call", description="the model's tool calls; rendered as assistant turns (trained on)")


class DataFile(_Section):
    path: str
    format: FORMATS | None = None
    split: str = "train"
    config: str | None = Field(None, description="hub datasets: the configuration name (path: glue, config: sst2)")
    columns: dict[str, str] | None = Field(
        None, description="peftcli role -> this file's column: prompt, query, response, system, messages, text, label "
        "(e.g. {prompt: question, response: answer} for GSM8K)")
    tags: ShareGPTTags | None = Field(None, description="format sharegpt: role/content keys and role tags (defaults: from, value, human, gpt, ...)")
    text_column: str | None = Field(None, description="same as columns.text (kept for older recipes)")
    label_column: str = Field("label", description="same as columns.label (kept for older recipes)")
    weight: float = Field(1.0, gt=0, description="in a list of train files: repeat factor (2 = every row twice, "
                          "0.5 = a seeded half of the rows)")
    limit: int | None = Field(None, ge=1, description="use only the first N rows")


# one file or a list; tagged by the input's shape so an error names the key inside (data.train.1.path),
# not the union ("expected DataFile or list[DataFile]")
TrainFiles = Annotated[Annotated[DataFile, Tag("one-file")] | Annotated[list[DataFile], Field(min_length=1), Tag("file-list")],
                       Discriminator(lambda v: "file-list" if isinstance(v, list) else "one-file")]


class DataCfg(_Section):
    train: TrainFiles = Field(description="one file, or a list of files mixed by their weight")
    eval: DataFile | None = None
    eval_ratio: float | None = Field(None, gt=0, lt=1)
    format: FORMATS = "alpaca"
    template: Literal["auto", "chat", "alpaca"] = "auto"
    system_prompt: str | None = None
    max_length: int = Field(512, ge=8)
    padding: Literal["longest", "max_length"] = Field("longest", description="pad each batch to its longest row, or always to max_length")
    packing: bool = Field(False, description="causal LMs: concatenate training rows into max_length blocks, attention "
                          "kept inside each row (llama, mistral, qwen2, qwen3)")

    @model_validator(mode="after")
    def _one_eval_source(self):
        if self.eval is not None and self.eval_ratio is not None:
            raise ValueError("give either data.eval or data.eval_ratio, not both")
        return self

    @property
    def train_files(self) -> list[DataFile]:
        return self.train if isinstance(self.train, list) else [self.train]

    @property
    def first_train(self) -> DataFile:
        """The (first) training file: its format stands for the training data in checks and messages."""
        return self.train_files[0]


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
    tf32: bool = Field(False, description="TF32 matmuls for fp32 tensors (torch.set_float32_matmul_precision('high')): "
                       "faster fp32 training on NVIDIA Ampere or newer; no effect where no TF32 kernel exists (CPUs)")
    mmap_large_tensors: bool = Field(False, description="Linux/glibc, CPU: give freed activation memory back to the OS; "
                                     "lower peak RSS for large models, slower steps for small ones (see README)")
    eval_every: int | None = Field(50, ge=1)
    save_every: int | None = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept; the newest is never deleted")
    resume: Literal["never", "auto"] = Field("never", description="auto: continue from the newest complete checkpoint (same as --resume)")
    on_nan: Literal["stop", "skip"] = Field("stop", description="a NaN/inf loss or gradient: stop (last good checkpoint kept) or skip the update")
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="under several processes: DDP (adapter replicated), FSDP2 (base sharded) or DeepSpeed ZeRO-2")
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON config (train.distributed: deepspeed)")
    log_every: int = Field(1, ge=1)
    report_to: Literal["none", "tensorboard"] = Field(
        "none", description="tensorboard: also log to RUN/tensorboard (needs the tensorboard package); metrics.jsonl is always written")
    seed: int = 42
    generation_eval: GenerationEval | None = None

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_false(cls, v):
        return "no" if v is False else v  # `mixed_precision: no` read by a YAML 1.1 parser (yaml.safe_load)

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


class OutputCfg(_Section):
    dir: str = "runs/default"


class Recipe(_Section):
    model: ModelCfg
    method: dict[str, Any] | list[dict[str, Any]]  # a list: several methods at once (methods/hybrid.py)
    data: DataCfg
    train: TrainCfg = TrainCfg()
    output: OutputCfg = OutputCfg()
    # Set by load_recipe: where the recipe came from (private, so a `source:` key in a recipe is unknown).
    _source: str | None = PrivateAttr(None)

    @property
    def source(self) -> str | None:
        return self._source

    @property
    def method_options(self):
        from peftcli.methods import get_method

        if isinstance(self.method, list):
            from peftcli.methods.hybrid import hybrid_options

            return hybrid_options(self.method)
        return get_method(self.method.get("name")).Options.model_validate(self.method)

    def resolved(self) -> dict:
        """The recipe with every default filled in (what the run directory stores)."""
        d = self.model_dump(mode="json")
        d["method"] = self.method_options.model_dump(mode="json")
        return d


# ---------------------------------------------------------------- loading

class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are bools. PyYAML follows YAML 1.1, where yes/no/on/off
    are bools too, so `mixed_precision: no` (a documented value) arrived as False. Bool fields still accept
    yes/no/on/off: pydantic reads those strings as bools."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def yaml_load(text: str):
    """Parse recipe YAML (YAML 1.2 booleans); raises yaml.YAMLError or RecursionError."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _line_index(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML text to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    continue
                p = path + (k.value,)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        walk(yaml.compose(text, Loader=_Loader), ())
    except (yaml.YAMLError, RecursionError):
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


# parts of a pydantic error loc that are not keys: validator wrappers and the tags of TrainFiles' branches
_TRANSPARENT = ("function-", "one-file", "file-list")


def _split_loc(loc: tuple, data: Any, missing: bool) -> tuple[tuple, str | None]:
    """Split a pydantic error loc into the key path the user wrote and the first union branch pydantic
    adds after it ('str', 'list[str]', a model name, ...; these were once told apart by a capital letter,
    which also dropped capitalised user keys). A part is a key only where the input has it (or, for a
    missing key, where it is the last part); the key path stops at the first branch."""
    loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith(_TRANSPARENT)))
    path, node = [], data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list | tuple) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
        elif not (missing and i == len(loc) - 1 and isinstance(node, dict)):
            return tuple(path), str(part)
        path.append(part)
    return tuple(path), None


def _value_at(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def _where(loc: tuple, lines: dict, source: str, set_by: dict | None) -> str:
    """`--set ITEM` when an override set this key (or a section above it), else `file:line`."""
    for n in range(len(loc), 0, -1):
        if set_by and loc[:n] in set_by:
            return f"--set {one_line(set_by[loc[:n]])}"
    if loc and loc not in lines:  # not in the file: a --set below it created it (--set train.generation_eval.samples=3)
        for path, item in (set_by or {}).items():
            if path[: len(loc)] == loc:
                return f"--set {one_line(item)}"
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{source}:{lines[loc[:n]]}"
    return source


def _format_errors(err: ValidationError, model_cls, lines: dict, source: str, prefix: tuple = (),
                   data: Any = None, set_by: dict | None = None) -> str:
    """The first validation error as one line: where (file:line or --set), the key path, the problem."""
    errors = err.errors()
    if data is None:  # no input to tell keys from union branches: the loc as pydantic gives it
        split = [(tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(_TRANSPARENT))), None) for e in errors]
    else:
        split = [_split_loc(e["loc"], data, e["type"] == "missing") for e in errors]
    e, (path, branch) = errors[0], split[0]
    loc = prefix + path
    key = one_line(".".join(str(p) for p in loc) or "(top level)")
    where = _where(loc, lines, source, set_by)
    if e["type"] == "extra_forbidden":
        msg = f"unknown key '{key}'" + did_you_mean(loc[-1], _fields_at(model_cls, loc[len(prefix):-1]))
    elif e["type"] == "missing":
        msg = f"missing required key '{key}'"
    elif branch == "[key]":
        msg = f"{key}: keys must be text (got {one_line(repr(loc[-1]), 80)})"
    elif branch is not None and data is not None:
        # a union (e.g. str | list[str]): name every accepted type rather than the first branch's complaint
        kinds = list(dict.fromkeys(b for p, b in split if p == path and b is not None))
        got = _value_at(data, path)
        got_s = "" if isinstance(got, dict | list) else f" (got {one_line(repr(got), 80)})"
        msg = f"{key}: expected {' or '.join(kinds)}{got_s}"
    else:
        got = e.get("input")
        got_s = "" if isinstance(got, dict | list) else f" (got {one_line(repr(got), 80)})"
        msg = f"{key}: {one_line(e['msg'])}{got_s}"
    more = len({p for p, _ in split}) - 1
    return f"{where}: {msg}" + (f" [+{more} more problem(s)]" if more > 0 else "")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {one_line(item)}: expected KEY.PATH=VALUE, e.g. --set train.lr=1e-4")
    key, _, raw = item.partition("=")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return [k for k in key.strip().split(".") if k], value


def apply_overrides(data: dict, overrides: list[str], set_by: dict | None = None) -> dict:
    """Apply `--set a.b=c` items to the recipe dict; `set_by` (if given) maps each key path set to its
    item, so validation errors can point at the --set rather than at a line of the file."""
    for item in overrides or []:
        path, value = parse_override(item)
        if not path:
            raise UserError(f"--set {one_line(item)}: empty key path; expected KEY.PATH=VALUE, e.g. --set train.lr=1e-4")
        node = data
        for i, part in enumerate(path):
            if isinstance(node, list):  # a list of sections (method: [...]): the key is an index, method.0.r=8
                if not (part.isdigit() and int(part) < len(node)):
                    above = ".".join(path[:i])
                    raise UserError(f"--set {one_line(item)}: {above} is a list of {len(node)}; "
                                    f"index it by position, e.g. {above}.0.KEY=VALUE")
                path[i] = part = int(part)
            if i == len(path) - 1:
                break
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict | list):
                above = ".".join(map(str, path[: i + 1]))
                raise UserError(f"--set {one_line(item)}: {above} is a {type(node[part]).__name__}, not a section with keys; "
                                f"set {above}=VALUE instead")
            node = node[part]
        node[path[-1]] = value
        if set_by is not None:
            set_by[tuple(path)] = item
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {path} is a directory; give the path to a .yaml recipe file, e.g. recipes/quickstart.yaml")
    if not path.is_file():
        raise UserError(f"recipe not found: {path} (give the path to a .yaml recipe, e.g. recipes/quickstart.yaml)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "a recipe is a YAML file saved as UTF-8") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}{line}: YAML syntax error: {one_line(problem)}; fix the recipe file") from None
    except RecursionError:
        raise UserError(f"{path}: YAML nested too deeply to be a recipe; fix the recipe file") from None
    if data is None:
        raise UserError(f"{path}: the recipe is empty; a recipe is a YAML mapping with sections model, method, data, train, output")
    if not isinstance(data, dict):
        raise UserError(f"{path}: the recipe is a YAML {type(data).__name__}, not a mapping; a recipe is a YAML mapping "
                        "with sections model, method, data, train, output")
    set_by: dict[tuple, str] = {}
    data = apply_overrides(data, overrides or [], set_by)
    return recipe_from_dict(data, source=str(path), lines=_line_index(text), set_by=set_by)


def generation_eval_problem(recipe: Recipe) -> str | None:
    """Why train.generation_eval cannot run on this recipe's data, as far as the recipe alone tells; None if it can.
    Generation needs held-out rows of a prompt/response format (alpaca, chat or sharegpt) on a causal LM or seq2seq model."""
    if recipe.train.generation_eval is None:
        return None
    data = recipe.data
    if recipe.model.task == "seq-cls":
        return (f"generates text, which a {recipe.model.task} model cannot do; remove train.generation_eval "
                "(eval_every reports accuracy for seq-cls)")
    if data.eval is None and data.eval_ratio is None:
        return "needs held-out rows; set data.eval (a file) or data.eval_ratio, or remove train.generation_eval"
    fmt = (data.eval or data.first_train).format or data.format
    if fmt not in ("alpaca", "chat", "sharegpt"):
        return (f"needs eval rows with a reference response (format alpaca, chat or sharegpt), but the eval data is format {fmt!r}; "
                "remove train.generation_eval or use alpaca/chat data")
    return None


def recipe_from_dict(data: dict, source: str = "recipe", lines: dict | None = None, set_by: dict | None = None) -> Recipe:
    from peftcli.methods import available_methods, get_method

    lines = lines or {}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise UserError(_format_errors(exc, Recipe, lines, source, data=data, set_by=set_by)) from None
    if isinstance(recipe.method, list):
        sections = [(("method", i), s) for i, s in enumerate(recipe.method)]
    else:  # {name: hybrid, parts: [...]}: each part first, so an error names its key (method.parts.0.r)
        inner = recipe.method.get("parts") if recipe.method.get("name") == "hybrid" else None
        inner = inner if isinstance(inner, list) and all(isinstance(x, dict) for x in inner) else []
        sections = [(("method", "parts", i), s) for i, s in enumerate(inner)] + [(("method",), recipe.method)]
    parts = []
    for prefix, section in sections:
        key = ".".join(map(str, prefix))
        name = section.get("name")
        if name not in available_methods():
            where = _where(prefix + ("name",), lines, source, set_by)
            shown = one_line(repr(name), 80)
            hint = did_you_mean(name, available_methods()) if isinstance(name, str) else ""
            missing = f"missing required key '{key}.name'" if name is None else f"unknown {key}.name {shown}{hint}"
            raise UserError(f"{where}: {missing}; choose one of: {', '.join(available_methods())} (see `peftcli methods`)")
        options_cls = get_method(name).Options
        try:
            parts.append(options_cls.model_validate(section))
        except ValidationError as exc:
            raise UserError(_format_errors(exc, options_cls, lines, source, prefix=prefix, data=section,
                                           set_by=set_by)) from None
    if isinstance(recipe.method, list):  # collisions the options show (the rest show when applied to the model)
        from peftcli.methods.hybrid import check_parts

        try:
            check_parts(parts, lambda i: f"method.{i}")
        except UserError as exc:
            raise UserError(f"{_where(('method',), lines, source, set_by)}: {exc}") from None
    problem = generation_eval_problem(recipe)
    if problem:
        raise UserError(f"{_where(('train', 'generation_eval'), lines, source, set_by)}: train.generation_eval {problem}")
    recipe._source = source
    return recipe
