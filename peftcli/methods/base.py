"""The interface every PEFT method implements, and the shared machinery most of them reuse.

A method's life: `apply(model)` freezes the base and injects its parameters; training calls
`extra_loss` and `on_optimizer_step`; `state_dict` gives the tensors to store (HF PEFT names where a
PEFT layout exists); `load_state_dict` puts them back; `merge` folds them into the base weights and
restores the base model's own module types. Methods that wrap modules subclass `AdapterModule`
and get state_dict / load / merge for free. What a new method sets and overrides: `Method`'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from peftcli.errors import UserError
from peftcli.methods.targets import is_linear, linear_shape

PREFIX = "base_model.model."  # HF PEFT's key prefix in adapter_model.safetensors
TargetSpec = str | list[str] | None  # a target option: regex (fullmatch), list (exact/suffix), 'all-linear', null


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """dtype of a method's new tensors for `base`: half-precision bases keep fp32 adapters (small, and
    numerically safer to train)."""
    w = getattr(base, "weight", None)
    dtype = w.dtype if isinstance(w, torch.Tensor) else next(base.parameters()).dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class MethodOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    modules_to_save: list[str] | None = Field(
        None, description="modules trained and stored in full (a classification head is added automatically)"
    )
    init_from: str | None = Field(
        None, description="train: start from this adapter directory's tensors (written by peftcli or HF PEFT; same method and options)"
    )


def values_device(device):
    """Where a method keeps the small tensors its report reads (AdaLoRA's rank mask, SAID's lambda): `device`, or
    the CPU when the base is on the meta device (inspect's skeleton), so that they have values there too."""
    return "cpu" if torch.device(device).type == "meta" else device


def init_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """nn.init.normal_, skipped on a meta tensor (inspect's skeleton of the base): there it has no values to
    fill and would import torch._dynamo, 1.3 s of an inspect that otherwise takes 2."""
    return t if t.is_meta else nn.init.normal_(t, std=std)


class AdapterModule(nn.Module):
    """A wrapper around one base module; `base_layer` keeps the original (frozen) module.

    `AdapterModule.__init__(self, base)` does the start-up every wrapper shares: `base_layer`, and for a
    linear base (nn.Linear or GPT-2's Conv1D) `in_features`, `out_features` and `fan_in_fan_out` (Conv1D
    stores W as (in, out)). Use `factory_kwargs` for new tensors (the base's device, `adapter_dtype`),
    `base_weight()` / `set_base_weight()` to read and write W in (out, in) layout whatever the storage."""

    base_layer: nn.Module

    def __init__(self, base: nn.Module | None = None):
        super().__init__()
        if base is None:
            return
        self.base_layer = base
        if is_linear(base):
            self.in_features, self.out_features = linear_shape(base)
            self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D stores W transposed

    def __getattr__(self, name: str):
        # `weight` of a wrapper without its own is the base's, as for HF PEFT's layers: models read it
        # (T5's feed-forward checks wo.weight.dtype before its last projection)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "weight" and "base_layer" in self._modules:
                return self._modules["base_layer"].weight
            raise

    @property
    def factory_kwargs(self) -> dict[str, Any]:
        """device and dtype for the wrapper's own tensors."""
        base = self.base_layer
        w = getattr(base, "weight", None)
        device = w.device if isinstance(w, torch.Tensor) else next(base.parameters()).device
        return {"device": device, "dtype": adapter_dtype(base)}

    def base_weight(self) -> torch.Tensor:
        """The base weight in (out, in) layout (a view: no copy, the base's dtype)."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def set_base_weight(self, w: torch.Tensor) -> None:
        """Replace the base weight's data by `w` given in (out, in) layout, in the base's dtype and storage layout."""
        base = self.base_layer
        base.weight.data = (w.T if self.fan_in_fan_out else w).contiguous().to(base.weight.dtype)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Local name -> parameter, for everything this wrapper stores (trainable or not)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    def delta_weight(self) -> torch.Tensor:
        """The additive weight update in (out, in) layout, fp32 (for methods of the form W + delta)."""
        raise NotImplementedError

    def tensor_merges(self, stored: Callable[[str], torch.Tensor]) -> dict[str, tuple[str, Any]] | str:
        """`merged_module` one tensor at a time, for the streaming merge (which never builds the model):
        {local tensor name ("weight", "bias"): ("modify", fn) | ("replace", tensor)}, where fn maps the base
        tensor (the model's dtype, its storage layout: (in, out) for Conv1D) to the merged one (a new tensor:
        the base tensor is a view of the mapped file, whose pages are released before the write), and
        `stored(name)` gives this wrapper's stored tensors by local name ("lora_A.weight"). It must repeat
        `merged_module`'s operations in order (the output is checked bit for bit against the in-memory merge).
        A string says why there is none: the in-memory path merges."""
        return f"{type(self).__name__} has no per-tensor merge"

    def merged_module(self) -> nn.Module:
        """The base module with this adapter folded into its weights (default: W += delta_weight())."""
        self.set_base_weight(self.base_weight().float() + self.delta_weight())
        return self.base_layer


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
    """One PEFT method. A method is one module in peftcli/methods/ that subclasses this and registers
    itself with `@register`; nothing outside that module names it (adapter I/O, the model card, export,
    `peftcli methods` and `inspect` all read the registry and these attributes).

    A new method SETS (class attributes):
      name        the recipe's `method.name`; also the `name` Literal of its Options
      family      additive | partial | reparameterized | hybrid | unified (Xu et al. 2023)
      mergeable   False when `merge` cannot fold it into the base (the default `merge` then refuses)
      summary     one line for `peftcli methods`
      Options     a MethodOptions subclass: its fields are the recipe's `method:` keys
      peft_type   HF PEFT's peft_type when the stored adapter IS HF PEFT's layout (PeftModel loads it);
                  None for a peftcli-only layout (adapter_config.json then says `name.upper()`)
      peft_types  the peft_types it reads from adapters written by other tools (default: (peft_type,));
                  `reads_peft_config(cfg)` picks among methods sharing one (LORA: lora or dora)
      wrapper_cls the AdapterModule it wraps targets with, for methods that wrap modules
      default_targets  {model_type: targets} used when `target_modules` is null (None: LoRA's, HF PEFT's)
      training_only    option names that shape training but not the stored function (init_from may
                  continue an adapter whose values differ there)
      streams     True when `peftcli merge` may stream it: its wrappers implement `tensor_merges`

    and OVERRIDES:
      inject(model)   required unless the default fits: it wraps `target_paths(model)` with `make_wrapper`
      make_wrapper(base, path)  the wrapper for one target (default: wrapper_cls(base))
      state_dict / load_state_dict  only when the stored tensors are not the wrappers' own parameters
      merge           only when merging is more than replacing each wrapper by `merged_module()`
      replaced_tensors(model)  base tensors stored whole outside wrappers and modules_to_save (BitFit's
                  biases): the streaming merge writes the stored value in their place
      merge_refusal() a non-mergeable method's one-line reason and how to deploy it (default: says so for
                  `peft_type` methods via `export --format peft`, else the adapter directory)
      adapter_config(model, base)  HF PEFT's fields for a method with a peft_type (default: options dump)
      from_adapter_config(cfg)  options from another tool's adapter_config.json (methods with peft_types)
      saved_options() options under which the stored tensors reload (default: the options; PiSSA differs)
      check_continuation(other, model)  extra per-module checks for `method.init_from` (default: none)
      describe(model) facts for `inspect` (call super and add); an additive method reports its inference
                  cost as `added_flops_per_token` (and `virtual_tokens` / `added_sequence_length` /
                  `added_kv_per_layer` for virtual tokens)
      training hooks (optional): extra_loss, before_training, before_optimizer_step, on_optimizer_step,
                  validate_training, training_state / load_training_state
    Wrappers subclass AdapterModule, call `super().__init__(base)` and implement `forward` and either
    `delta_weight()` (W + delta methods) or `merged_module()`, and `tensor_merges()` when the method streams.
    Tests: a method adds its rows to tests/test_contract.py (each of Llama, GPT-2, BERT: the closed-form
    count, or the asserted refusal); its own behaviour goes to its family's test file.
    """

    name: ClassVar[str]
    family: ClassVar[str]  # additive | partial | reparameterized | hybrid | unified (Xu et al. 2023)
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = None  # HF PEFT's peft_type when the adapter loads there
    peft_types: ClassVar[tuple[str, ...] | None] = None  # peft_types read from other tools (None: (peft_type,))
    summary: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    wrapper_cls: ClassVar[type[AdapterModule] | None] = None
    default_targets: ClassVar[dict[str, Any] | None] = None
    training_only: ClassVar[frozenset[str]] = frozenset()
    streams: ClassVar[bool] = False

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
        """Default: wrap every target module (`target_paths`) with `make_wrapper`."""
        if self.wrapper_cls is None:
            raise NotImplementedError(f"{type(self).__name__} must set wrapper_cls or override inject")
        self.wrapped = self.target_paths(model)
        for path in self.wrapped:
            replace_module(model, path, self.make_wrapper(model.get_submodule(path), path))

    def target_paths(self, model: nn.Module) -> list[str]:
        """Module paths chosen by the usual target options (target_modules, exclude_modules,
        layers_to_transform, layers_pattern; absent ones count as null), in model order."""
        from peftcli.methods.targets import resolve_targets

        o = self.opts
        return resolve_targets(model, getattr(o, "target_modules", None), getattr(o, "exclude_modules", None),
                               getattr(o, "layers_to_transform", None), getattr(o, "layers_pattern", None),
                               default_map=self.default_targets)

    def make_wrapper(self, base: nn.Module, path: str = "") -> AdapterModule:
        """The wrapper for the target `base` at `path`."""
        return self.wrapper_cls(base)

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

    def saved_options(self) -> MethodOptions:
        """Options under which the stored tensors reload (written to peftcli.json)."""
        return self.opts

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            raise UserError(self.merge_refusal())
        with torch.no_grad():
            for path, mod in self.wrappers(model).items():
                replace_module(model, path, mod.merged_module())
        self.wrapped = []
        return model

    def replaced_tensors(self, model: nn.Module) -> list[str]:
        """Base tensors (full names) the adapter stores whole, besides its wrappers and modules_to_save."""
        return []

    def merge_refusal(self) -> str:
        """Why `merge` refuses a non-mergeable method, and how to deploy it unmerged (one line)."""
        where = ("`peftcli export --format peft` (HF PEFT loads it)" if self.peft_type
                 else "the adapter directory with peftcli (its layout is peftcli's own)")
        return f"method {self.name!r} adds modules that cannot be folded into the base weights; deploy it unmerged: {where}"

    # ------------------------------------------------------------- description
    def fan_in_fan_out(self, model: nn.Module) -> bool:
        """adapter_config.json's fan_in_fan_out: some wrapped module stores W as (in, out) (Conv1D)."""
        return any(getattr(w, "fan_in_fan_out", False) for w in self.wrappers(model).values())

    def peft_target_spec(self, model: nn.Module) -> tuple[list[str] | str, bool]:
        """target_modules for adapter_config.json that selects exactly the wrapped modules under HF PEFT's
        rules: the short names when they do (readable, PEFT's own style), else an exact regex. The bool:
        whether the filters (exclude_modules, layers_to_transform, layers_pattern) must be written too."""
        from peftcli.methods.targets import exact_regex, filter_targets

        short = sorted({p.rsplit(".", 1)[-1] for p in self.wrapped})
        o = self.opts
        kind = self.wrapper_cls or AdapterModule
        cand = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in short and (is_linear(m) or isinstance(m, kind))]
        cand = filter_targets(cand, getattr(o, "exclude_modules", None), getattr(o, "layers_to_transform", None),
                              getattr(o, "layers_pattern", None))
        if sorted(cand) == sorted(self.wrapped):
            return short, True
        return exact_regex(self.wrapped), False

    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict[str, Any]:
        """adapter_config.json content (HF PEFT field names where the method exists there)."""
        return {"peft_type": self.peft_type or self.name.upper(), "base_model_name_or_path": base_name,
                "modules_to_save": self.saved_modules or None, **self.opts.model_dump(mode="json")}

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Extra facts for `inspect` (targets, per-module ranks, ...)."""
        return {"targets": list(self.wrapped), "modules_to_save": list(self.saved_modules)}

    @classmethod
    def reads_peft_types(cls) -> tuple[str, ...]:
        """The HF PEFT peft_types this method reads from adapters written by other tools."""
        if cls.peft_types is not None:
            return cls.peft_types
        return (cls.peft_type,) if cls.peft_type else ()

    @classmethod
    def reads_peft_config(cls, cfg: dict) -> bool:
        """Whether this method reads the foreign adapter_config `cfg` (override where methods share a peft_type)."""
        return cfg.get("peft_type") in cls.reads_peft_types()

    @classmethod
    def from_adapter_config(cls, cfg: dict) -> MethodOptions:
        """Options from a foreign (HF PEFT) adapter_config.json; methods with a PEFT layout override."""
        raise UserError(f"cannot read a {cfg.get('peft_type')} adapter written by another tool")

    def check_continuation(self, other: Method, model: nn.Module) -> str | None:
        """`method.init_from`: `other` (built from the adapter's options) has passed the option comparison;
        return why its tensors would still compute something else on `model` (None: they fit)."""
        return None
