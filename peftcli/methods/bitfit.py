"""BitFit (Ben Zaken et al. 2021): train only the bias terms (plus the task head, as every method does).

All biases of the model body count, LayerNorm biases included (the paper trains them too); the output
head is left to modules_to_save. `bias_modules` narrows the set with the usual target rules (e.g. the
paper's cheapest variant: `[query, intermediate.dense]`). Nothing is wrapped: the trained biases are
the weights, so merge has nothing to fold and the model keeps its own module types.
Stored as `base_model.model.<path>.bias`, a peftcli-only layout (HF PEFT has no BitFit).
A model without biases (the Llama family) is an error, not a run that trains nothing but the head.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import register
from peftcli.methods.base import PREFIX, Method, MethodOptions, TargetSpec
from peftcli.methods.targets import output_head_names, resolve_targets


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


class BitFitOptions(MethodOptions):
    name: Literal["bitfit"] = "bitfit"
    bias_modules: TargetSpec = Field(
        None, description="modules whose bias is trained: regex (fullmatch) or list (exact/suffix); null: every bias outside the output head"
    )


@register
class BitFit(Method):
    name = "bitfit"
    family = "partial"
    mergeable = True
    peft_type = None
    summary = "train only the bias terms (and the task head)"
    Options = BitFitOptions
    streams = True

    def __init__(self, options: BitFitOptions):
        super().__init__(options)
        self.bias_paths: list[str] = []  # modules whose .bias is trained

    def inject(self, model: nn.Module) -> None:
        spec = self.opts.bias_modules
        if spec is None:
            heads = output_head_names(model)
            self.bias_paths = [n for n, m in model.named_modules() if n and _has_bias(m)
                               and n not in heads and n.split(".", 1)[0] not in heads]
        else:
            self.bias_paths = resolve_targets(model, spec, supported=_has_bias, key="method.bias_modules")
        if not self.bias_paths:
            model_type = getattr(getattr(model, "config", None), "model_type", "this")
            raise UserError(f"method 'bitfit': the {model_type} model has no bias terms to train; choose another method (e.g. lora or ia3)")
        for path in self.bias_paths:
            model.get_submodule(path).bias.requires_grad_(True)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = {f"{PREFIX}{p}.bias": model.get_submodule(p).bias.detach() for p in self.bias_paths}
        return {**sd, **super().state_dict(model)}  # + modules_to_save (a head's own bias once, same key)

    def merge(self, model: nn.Module) -> nn.Module:
        model = super().merge(model)  # nothing wrapped: the model already has its own module types
        self.bias_paths = []
        return model

    def replaced_tensors(self, model: nn.Module) -> list[str]:
        return [f"{p}.bias" for p in self.bias_paths]

    def describe(self, model: nn.Module) -> dict:
        return {**super().describe(model), "targets": list(self.bias_paths)}
