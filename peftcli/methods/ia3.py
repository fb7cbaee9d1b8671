"""(IA)^3 (Liu et al. 2022): learned vectors rescale keys, values and the FFN intermediate activation.

`k <- l_k * k`, `v <- l_v * v` (the output of the key/value projections, `l` of shape (out, 1)) and
`h_ff <- l_ff * h_ff` (the input of the FFN down-projection, `l` of shape (1, in)); all init to ones,
so outputs are unchanged at init. Merge: scale the rows of W (and the bias) for output scaling, the
columns of W for feed-forward modules. Stored with HF PEFT's names (`<path>.ia3_l`) and IA3 config.

Default targets are HF PEFT's (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING), so the same adapter means the
same thing in both tools. Consequences we keep for compatibility: GPT-2's fused `c_attn` also scales
queries, and BERT's `output.dense` also matches `attention.output.dense` (treated as feed-forward).
"""

from __future__ import annotations

import functools
import re
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import register
from peftcli.methods.base import AdapterModule, Method, MethodOptions, TargetSpec
from peftcli.methods.targets import exact_regex, matches

# HF PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING
DEFAULT_IA3_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"], "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"], "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "fc2"], "bart": ["q_proj", "v_proj", "fc2"], "t5": ["k", "v", "wo"],
    "bert": ["key", "value", "output.dense"], "roberta": ["key", "value", "output.dense"],
}
DEFAULT_IA3_FEEDFORWARD = {
    "llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
    "gemma": ["down_proj"], "gemma2": ["down_proj"], "gpt2": ["mlp.c_proj"], "gpt_neox": ["dense_4h_to_h"],
    "opt": ["fc2"], "bart": ["fc2"], "t5": ["wo"], "bert": ["output.dense"], "roberta": ["output.dense"],
}


class IA3Options(MethodOptions):
    name: Literal["ia3"] = "ia3"
    target_modules: TargetSpec = Field(None, description="regex (fullmatch), list (exact/suffix), 'all-linear', or null for PEFT's per-architecture default")
    feedforward_modules: TargetSpec = Field(None, description="targets whose input is scaled (FFN down-projections); must be among target_modules; null: PEFT's default")
    exclude_modules: TargetSpec = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None


def ia3_weight_merge(w: torch.Tensor, scale: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """Rows (scale (out, 1)) or columns (feed-forward: scale (1, in)) of W times the vector, for the
    streaming merge (IA3Linear.merged_module)."""
    wf = w.float()
    wf = wf.T if fan_in_fan_out else wf
    wf = wf * scale.float()
    return (wf.T if fan_in_fan_out else wf).contiguous().to(w.dtype)


def ia3_bias_merge(b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (b.float() * scale.float().flatten()).to(b.dtype)


class IA3Linear(AdapterModule):
    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__(base)
        self.is_feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, **self.factory_kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        out = self.base_layer(x)
        return (out * scale).to(out.dtype)

    def tensor_merges(self, stored):
        scale = stored("ia3_l")
        out = {"weight": ("modify", functools.partial(ia3_weight_merge, scale=scale, fan_in_fan_out=self.fan_in_fan_out))}
        if not self.is_feedforward and self.base_layer.bias is not None:
            out["bias"] = ("modify", functools.partial(ia3_bias_merge, scale=scale))
        return out

    def merged_module(self) -> nn.Module:
        base = self.base_layer
        self.set_base_weight(self.base_weight().float() * self.ia3_l.float())  # (out, 1): rows; (1, in): columns
        if not self.is_feedforward and base.bias is not None:
            base.bias.data = (base.bias.float() * self.ia3_l.float().flatten()).to(base.bias.dtype)
        return base


@register
class IA3(Method):
    streams = True
    name = "ia3"
    family = "additive"  # Xu et al. file (IA)^3 under additive; unlike the others there it folds into W
    mergeable = True
    peft_type = "IA3"
    summary = "learned vectors rescale keys, values and the FFN intermediate activation (init ones)"
    Options = IA3Options
    wrapper_cls = IA3Linear
    default_targets = DEFAULT_IA3_TARGETS
    training_only = frozenset({"feedforward_modules"})  # compared module by module (check_continuation)

    def __init__(self, options: IA3Options):
        super().__init__(options)
        self.feedforward: list[str] = []  # wrapped paths whose input (not output) is scaled

    @staticmethod
    def feedforward_paths(model: nn.Module, paths: list[str], spec) -> list[str]:
        """The paths among `paths` whose input is scaled; as PEFT, the architecture's feed-forward default
        applies whenever none is given (spec None)."""
        if spec is None:
            spec = DEFAULT_IA3_FEEDFORWARD.get(getattr(getattr(model, "config", None), "model_type", None), [])
        return [p for p in paths if matches(p, spec)]

    def inject(self, model: nn.Module) -> None:
        o = self.opts
        self.feedforward = self.feedforward_paths(model, self.target_paths(model), o.feedforward_modules)
        if o.feedforward_modules and not self.feedforward:
            raise UserError(f"method.feedforward_modules: {o.feedforward_modules!r} matches none of the targets; "
                            "it must name some of method.target_modules")
        super().inject(model)

    def make_wrapper(self, base: nn.Module, path: str = "") -> AdapterModule:
        return IA3Linear(base, path in self.feedforward)

    def check_continuation(self, other: Method, model: nn.Module) -> str | None:
        ff = self.feedforward_paths(model, self.wrapped, other.opts.feedforward_modules)
        if ff != self.feedforward:
            diff = sorted(set(ff) ^ set(self.feedforward))
            return (f"method.feedforward_modules differ: {diff[0]} is feed-forward in "
                    f"{'the adapter' if diff[0] in ff else 'the recipe'} only; make them equal to continue training it")
        return None

    def _peft_feedforward(self, targets) -> list[str] | str:
        """feedforward_modules for adapter_config.json; PEFT matches a list with a plain `endswith`."""
        short = sorted({p.rsplit(".", 1)[-1] for p in self.feedforward})
        if [p for p in self.wrapped if any(p.endswith(s) for s in short)] == self.feedforward and isinstance(targets, list):
            return short
        return exact_regex(self.feedforward)

    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict:
        o = self.opts
        targets, keep_filters = self.peft_target_spec(model)
        if o.layers_to_transform is not None:  # PEFT's IA3Config has no layer filter: name the modules
            targets, keep_filters = exact_regex(self.wrapped), False
        return {
            "peft_type": "IA3",
            "base_model_name_or_path": base_name,
            "target_modules": targets,
            "feedforward_modules": self._peft_feedforward(targets),
            "exclude_modules": o.exclude_modules if keep_filters else None,
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "modules_to_save": self.saved_modules or None,
            "init_ia3_weights": True,
        }

    @classmethod
    def from_adapter_config(cls, cfg: dict) -> IA3Options:
        ff = cfg.get("feedforward_modules") or []
        if not isinstance(ff, str):  # PEFT matches a list entry with a plain endswith (no "." boundary)
            ff = ".*(?:" + "|".join(map(re.escape, ff)) + ")" if ff else []
        return cls.Options(
            target_modules=cfg.get("target_modules"), feedforward_modules=ff,
            exclude_modules=cfg.get("exclude_modules"), layers_to_transform=cfg.get("layers_to_transform"),
            layers_pattern=cfg.get("layers_pattern"), modules_to_save=cfg.get("modules_to_save"),
        )

    def describe(self, model: nn.Module) -> dict:
        return {**super().describe(model), "feedforward": list(self.feedforward)}
