"""Baselines for a sweep's ceiling and floor rows: `full` fine-tuning (every weight trainable) and `freeze`
(the "partial" family's simplest member: train only the last k transformer blocks and/or named modules,
the rest frozen).

Nothing is wrapped: the trained tensors are the weights, so the stored checkpoint is merge-ready as it is
(`full` stores every tensor, `freeze` only the ones it changed) and `merge` has nothing to fold: loading the
tensors over the base *is* the merged model (streamed shard by shard: every stored tensor replaces its base
tensor). Stored as `base_model.model.<parameter name>` (peftcli-only
layout: HF PEFT has no full fine-tuning adapter). Tied weights (an output head sharing the embedding) are
one parameter, stored once under its first name; loading it sets both, as the trained model had it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import register
from peftcli.methods.base import PREFIX, Method, MethodOptions, TargetSpec
from peftcli.methods.targets import match_list, transformer_blocks


class _Dense(Method):
    """Trains existing weights in place; state_dict holds the trainable ones under their own names."""

    family = "partial"
    mergeable = True
    streams = True  # `merge` streams shard by shard: each stored tensor replaces its base tensor
    peft_type = None

    def __init__(self, options):
        super().__init__(options)
        self.trained: list[str] = []  # parameter names trained (first name of a tied parameter)

    def trainable_modules(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def inject(self, model: nn.Module) -> None:
        paths = self.trainable_modules(model)
        for path in paths:
            for p in (model.get_submodule(path) if path else model).parameters():
                p.requires_grad_(True)

    def _trained_names(self, model: nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad]

    def apply(self, model: nn.Module, task: str = "causal-lm", also_save=()) -> nn.Module:
        model = super().apply(model, task, also_save)
        self.trained = self._trained_names(model)
        return model

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        return {f"{PREFIX}{n}": params[n].detach() for n in self.trained}

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # the trained tensors are the weights already

    def replaced_tensors(self, model: nn.Module) -> list[str]:
        saved = tuple(f"{m}." for m in self.saved_modules)  # a head's tensors: modules_to_save's own edits
        return [n for n in self.trained if not n.startswith(saved)]

    def describe(self, model: nn.Module) -> dict:
        return {**super().describe(model), "trained_tensors": len(self.trained)}


class FullOptions(MethodOptions):
    name: Literal["full"] = "full"


@register
class Full(_Dense):
    name = "full"
    summary = "full fine-tuning: every weight trainable, every tensor stored (the baseline ceiling)"
    Options = FullOptions

    def trainable_modules(self, model: nn.Module) -> list[str]:
        return [""]


class FreezeOptions(MethodOptions):
    name: Literal["freeze"] = "freeze"
    last_k: int | None = Field(1, ge=1, description="train the last k transformer blocks in full (null: only method.modules)")
    modules: TargetSpec = Field(None, description="more modules trained in full: regex (fullmatch) or list (exact/suffix), "
                                                  "e.g. [norm, lm_head]")


@register
class Freeze(_Dense):
    name = "freeze"
    summary = "train the last k transformer blocks (and named modules) in full, the rest frozen"
    Options = FreezeOptions

    def trainable_modules(self, model: nn.Module) -> list[str]:
        opts, paths = self.opts, []
        if opts.last_k is not None:
            stack, n = transformer_blocks(model, "freeze", "name the modules to train with method.modules and set method.last_k: null")
            if opts.last_k > n:
                raise UserError(f"method.last_k: {opts.last_k} blocks asked, the model has {n} ({stack}); use at most {n}")
            paths += [f"{stack}.{i}" for i in range(n - opts.last_k, n)]
        if isinstance(opts.modules, str):
            import re

            picked = [n for n, _ in model.named_modules() if n and re.fullmatch(opts.modules, n)]
            if not picked:
                raise UserError(f"method.modules: regex {opts.modules!r} matches no module (it must match the full path)")
            paths += picked
        elif opts.modules:
            paths += match_list(model, list(opts.modules), key="method.modules")
        if not paths:
            raise UserError("method 'freeze': nothing to train; set method.last_k or method.modules")
        return paths
