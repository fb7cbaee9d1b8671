"""Which modules a method targets, with HF PEFT's matching rules (users carry recipes over):
a string is a regex fullmatched against the module path, a list matches a path equal to an entry
or ending in "." + entry, "all-linear" is every linear layer but the output head. Unlike PEFT, a list
entry that matches nothing is an error naming it and the closest module names.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from peftcli.errors import UserError

# HF PEFT's defaults per model_type (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"],
}
LAYER_PATTERNS = ("layers", "h", "layer", "block", "blocks")


def is_linear(module: nn.Module) -> bool:
    # GPT-2's Conv1D is a linear layer with a transposed weight
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D stores (in, out)
    return w.shape[0], w.shape[1]


def exact_regex(paths: list[str]) -> str:
    """A regex that fullmatches exactly these module paths (for configs that take a regex)."""
    return "^(?:" + "|".join(map(re.escape, paths)) + ")$"


def output_head_names(model: nn.Module) -> set[str]:
    heads = {"lm_head", "classifier", "score"}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, mod in model.named_modules():
        if out is not None and mod is out:
            heads.add(name)
    return heads


def layer_index(name: str, patterns=None) -> int | None:
    pats = [patterns] if isinstance(patterns, str) else (patterns or LAYER_PATTERNS)
    m = re.search(r"(?:^|\.)(?:{})\.(\d+)(?:\.|$)".format("|".join(map(re.escape, pats))), name)
    return int(m.group(1)) if m else None


def transformer_blocks(model: nn.Module, method: str = "this method", fix: str = "") -> tuple[str, int]:
    """(path, count) of the model's stack of transformer blocks: the longest ModuleList named like one
    (LAYER_PATTERNS). `fix`: how the user gets around a model without one."""
    stacks = [(n, len(m)) for n, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] in LAYER_PATTERNS and len(m)]
    if not stacks:
        raise UserError(f"method {method!r}: found no stack of transformer blocks in this model" + (f"; {fix}" if fix else ""))
    return max(stacks, key=lambda s: s[1])


def _closest(entry: str, names: list[str]) -> str:
    short = sorted({n.rsplit(".", 1)[-1] for n in names if n} | set(names))
    close = difflib.get_close_matches(entry, short, n=3, cutoff=0.4)
    return ", ".join(close) if close else ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names if n})[:8])


def match_list(model: nn.Module, entries, key: str = "method.target_modules", names: list[str] | None = None) -> list[str]:
    """Module paths equal to an entry or ending in '.' + entry; every entry must match something."""
    names = names if names is not None else [n for n, _ in model.named_modules() if n]
    out, unmatched = [], []
    for entry in entries:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits:
            unmatched.append(entry)
        out += [h for h in hits if h not in out]
    if unmatched:
        hints = "; ".join(f"{e!r} (closest: {_closest(e, names)})" for e in unmatched)
        raise UserError(f"{key}: no module matches {hints}")
    return out


def matches(name: str, spec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == e or name.endswith("." + e) for e in spec)


def filter_targets(names: list[str], exclude_modules=None, layers_to_transform=None, layers_pattern=None) -> list[str]:
    """Drop excluded modules and those outside layers_to_transform (PEFT's rules for both)."""
    if exclude_modules:
        names = [n for n in names if not matches(n, exclude_modules)]
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        names = [n for n in names if layer_index(n, layers_pattern) in wanted]
    return names


def resolve_targets(
    model: nn.Module,
    target_modules=None,
    exclude_modules=None,
    layers_to_transform=None,
    layers_pattern=None,
    supported=is_linear,
    default_map: dict | None = None,
    key: str = "method.target_modules",
) -> list[str]:
    """Module paths a method should wrap, in model order."""
    all_modules = dict(model.named_modules())
    names = [n for n in all_modules if n]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules is None:
        default_map = DEFAULT_LORA_TARGETS if default_map is None else default_map
        if model_type not in default_map:
            raise UserError(
                f"{key}: no default targets for model type {model_type!r}; set it, e.g. {key}: all-linear"
            )
        target_modules = default_map[model_type]
    if target_modules == "all-linear":
        heads = output_head_names(model)
        picked = [n for n in names if supported(all_modules[n]) and n not in heads and n.rsplit(".", 1)[-1] not in heads]
    elif isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise UserError(f"{key}: {target_modules!r} is not a valid regex ({exc})") from None
        picked = [n for n in names if re.fullmatch(target_modules, n)]
        if not picked:
            raise UserError(f"{key}: regex {target_modules!r} matches no module (it must match the full path, e.g. '.*q_proj')")
    else:
        picked = match_list(model, list(target_modules), key=key, names=names)
    picked = filter_targets(picked, exclude_modules, layers_to_transform, layers_pattern)
    bad = [n for n in picked if not supported(all_modules[n])]
    if bad:
        raise UserError(
            f"{key}: {bad[0]!r} is a {type(all_modules[bad[0]]).__name__}, which this method cannot wrap; "
            f"target linear layers (e.g. {key}: all-linear)"
        )
    if not picked:
        raise UserError(f"{key}: the targets, after exclude_modules/layers_to_transform, leave no module to adapt")
    return sorted(picked, key=names.index)
