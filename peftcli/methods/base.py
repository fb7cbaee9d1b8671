"""The interface every PEFT method implements, and the shared machinery most of them reuse.

A method's life: `apply(model)` freezes the base and injects its parameters; training calls
`extra_loss` and `on_optimizer_step`; `state_dict` gives the tensors to store (HF PEFT names where a
PEFT layout exists); `load_state_dict` puts them back; `merge` folds them into the base weights and
restores the base model's own module types. Methods that wrap modules subclass `AdapterModule`
and get state_dict / load / merge for free.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from peftcli.errors import UserError

PREFIX = "base_model.model."  # HF PEFT's key prefix in adapter_model.safetensors


class MethodOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    modules_to_save: list[str] | None = Field(
        None, description="modules trained and stored in full (a classification head is added automatically)"
    )
    init_from: str | None = Field(
        None, description="train: start from this adapter directory's tensors (written by peftcli or HF PEFT; same method and options)"
    )


class AdapterModule(nn.Module):
    """A wrapper around one base module; `base_layer` keeps the original (frozen) module."""

    base_layer: nn.Module

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Local name -> parameter, for everything this wrapper stores (trainable or not)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    def delta_weight(self) -> torch.Tensor:
        """The additive weight update in (out, in) layout, fp32 (for methods of the form W + delta)."""
        raise NotImplementedError

    def merged_module(self) -> nn.Module:
        """The base module with this adapter folded into its weights (default: W += delta_weight())."""
        base = self.base_layer
        delta = self.delta_weight()
        if not isinstance(base, nn.Linear):  # GPT-2's Conv1D stores W as (in, out)
            delta = delta.T
        base.weight.data = (base.weight.float() + delta).to(base.weight.dtype)
        return base


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_parent(model, name)
    setattr(parent, child, new)


HEADS = ("classifier", "score")


def head_module_names(model: nn.Module) -> list[str]:
    """Classification heads, which a seq-cls fine-tune must train in full (as HF PEFT does)."""
    return [h for h in HEADS if isinstance(getattr(model, h, None), nn.Module)]


class Method:
    name: ClassVar[str]
    family: ClassVar[str]  # additive | partial | reparameterized | hybrid | unified (Xu et al. 2023)
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = None  # HF PEFT's peft_type when the adapter loads there
    summary: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, options: MethodOptions):
        self.opts = options
        self.wrapped: list[str] = []  # module paths replaced by AdapterModules
        self.saved_modules: list[str] = []  # modules trained and stored in full
        self.task = "causal-lm"

    # ------------------------------------------------------------- lifecycle
    def apply(self, model: nn.Module, task: str = "causal-lm", also_save: list[str] | tuple = ()) -> nn.Module:
        """Freeze the base model, inject the method, make modules_to_save trainable."""
        self.task = task
        for p in model.parameters():
            p.requires_grad_(False)
        self.inject(model)
        wanted = list(self.opts.modules_to_save or [])
        # HF PEFT writes modules_to_save ["classifier", "score"] for any SEQ_CLS model: keep the one that exists
        heads = [h for h in HEADS if h in wanted or task == "seq-cls"]
        wanted = [m for m in wanted if m not in HEADS] + [h for h in head_module_names(model) if h in heads]
        wanted += list(also_save)
        self.saved_modules = self._resolve_saved(model, wanted)
        for name in self.saved_modules:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        self.check_trainable(model)
        return model

    def inject(self, model: nn.Module) -> None:
        raise NotImplementedError

    def check_trainable(self, model: nn.Module) -> None:
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError(f"method {self.name!r} found nothing to train in this model; check method.target_modules")

    def _resolve_saved(self, model: nn.Module, wanted: list[str]) -> list[str]:
        from peftcli.methods.targets import match_list

        out: list[str] = []
        for name in match_list(model, dict.fromkeys(wanted), key="method.modules_to_save"):
            if not any(name.startswith(w + ".") or name == w for w in self.wrapped) and name not in out:
                out.append(name)
        return out

    # ------------------------------------------------------------- training hooks
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def on_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimizer step, before gradients are zeroed."""

    def before_training(self, model: nn.Module, trainer) -> None:
        """Called once after the data is ready and before the optimizer exists: methods whose trainable
        tensors depend on the data (Fisher masks, LT-SFT's first phase) create them here. `trainer` offers
        sample_rows(n), collated(rows), loss_module, dense_phase(optimizer, steps, label), tcfg, total_steps."""

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called with the step's gradients complete (after clipping), before the optimizer uses them."""

    def validate_training(self, total_steps: int) -> None:
        """Raise UserError if the options cannot work for a run of `total_steps` optimizer steps; called
        before anything is written or deleted."""

    def training_state(self, model: nn.Module) -> dict[str, Any]:
        """State beyond the trainable parameters that an exact resume needs (EMAs, masks, budgets)."""
        return {}

    def load_training_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Put back what `training_state` returned."""

    # ------------------------------------------------------------- storage
    def wrappers(self, model: nn.Module) -> dict[str, AdapterModule]:
        return {n: model.get_submodule(n) for n in self.wrapped}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for path, mod in self.wrappers(model).items():
            for local, p in mod.adapter_parameters().items():
                sd[f"{PREFIX}{path}.{local}"] = p.detach()
        for path in self.saved_modules:
            for local, p in model.get_submodule(path).named_parameters():
                sd[f"{PREFIX}{path}.{local}"] = p.detach()
        return sd

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        own = self.state_dict(model)
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise UserError(
                f"adapter tensors do not fit this model ({detail}); is this adapter for this base model and method?"
            )
        with torch.no_grad():
            for key, target in own.items():
                src = sd[key]
                if tuple(src.shape) != tuple(target.shape):
                    raise UserError(f"adapter tensor {key} has shape {tuple(src.shape)}, the model expects {tuple(target.shape)}")
                target.copy_(src.to(target.dtype))

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            raise UserError(f"method {self.name!r} adds modules that cannot be folded into the base; use `peftcli export --format peft`")
        with torch.no_grad():
            for path, mod in self.wrappers(model).items():
                replace_module(model, path, mod.merged_module())
        self.wrapped = []
        return model

    # ------------------------------------------------------------- description
    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict[str, Any]:
        """adapter_config.json content (HF PEFT field names where the method exists there)."""
        return {"peft_type": self.peft_type or self.name.upper(), "base_model_name_or_path": base_name,
                "modules_to_save": self.saved_modules or None, **self.opts.model_dump(mode="json")}

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Extra facts for `inspect` (targets, per-module ranks, ...)."""
        return {"targets": list(self.wrapped), "modules_to_save": list(self.saved_modules)}

    @classmethod
    def from_adapter_config(cls, cfg: dict) -> MethodOptions:
        """Options from a foreign (HF PEFT) adapter_config.json; methods with a PEFT layout override."""
        raise UserError(f"cannot read a {cfg.get('peft_type')} adapter written by another tool")
