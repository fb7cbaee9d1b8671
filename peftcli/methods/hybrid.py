"""Several methods in one model: hybrid recipes (`method:` a list of method sections) and MAM.

`Hybrid` applies its parts in order to the same model and owns the union of their trainable tensors;
every training hook (extra_loss, before_training, before/on_optimizer_step, validate_training, training
state) is forwarded to each part. Parts must not collide: two parts wrapping the same module (or one
wrapping a module inside the other's), two parts training the same tensor, a part targeting modules
another part created, or two parts adding virtual tokens are a recipe error naming both key paths
(`method.0.target_modules` vs `method.1.target_modules`). Each part's targets are resolved on the model
as the base defines it: modules earlier parts created are hidden while a part picks its targets, so
`all-linear` means the base's linear layers, not an adapter's projections.

Layout of a hybrid adapter directory (one directory for all parts):
  adapter_model.safetensors  each part's tensors under `part<i>.` + the key that part writes alone
                             (`part0.base_model.model.<path>.lora_A.weight`, ...); modules_to_save
                             (the classification head) once, unprefixed (`base_model.model.classifier.weight`)
  adapter_config.json        peft_type HYBRID (MAM for mam) and `parts`: each part's own adapter_config
                             (its peft_type and options) with its `key_prefix`
  peftcli.json               method: {name: hybrid, parts: [<each part's options>]} (mam: its own options)
So part i alone is `strip("part<i>.")` + the head: `merge --partial` writes the unmergeable parts as such.

MAM (He et al. 2021, "Towards a unified view"): prefix tuning in attention (30 virtual tokens, MLP
reparameterisation width 800) + a scaled parallel adapter at the FFN (bottleneck 512, s = 4).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, SerializeAsAny, field_validator
from torch import nn

from peftcli.errors import UserError, one_line
from peftcli.methods import get_method, register
from peftcli.methods.base import PREFIX, Method, MethodOptions

PART_KEY = re.compile(r"part(\d+)\.(.+)")
# option fields that name what a part adapts, first found wins (for collision messages)
_TARGET_FIELDS = ("target_modules", "bias_modules", "placement", "feedforward_modules")
# what a method costs at inference, from its describe() (prompts.py, adapters.py): the parts' costs add up
COST_KEYS = ("added_flops_per_token", "virtual_tokens", "added_sequence_length", "added_kv_per_layer")


def part_problem(options: MethodOptions | dict) -> str | None:
    """Why a method cannot be a hybrid part (None: it can)."""
    name = options.get("name") if isinstance(options, dict) else options.name
    if issubclass(get_method(name), Hybrid):
        return f"{name} is itself a combination of methods; list its parts instead"
    return None


def adds_tokens(cls: type) -> bool:
    """Whether a method class adds virtual tokens (prompt / prefix / p-tuning): a model takes one set."""
    try:
        from peftcli.methods.prompts import VirtualTokens
    except ImportError:
        return False
    return issubclass(cls, VirtualTokens)


class HybridOptions(MethodOptions):
    name: Literal["hybrid"] = "hybrid"
    parts: list[SerializeAsAny[MethodOptions]] = Field(
        min_length=2, description="the methods, applied in this order; each a method section with its own `name`")

    @field_validator("parts", mode="before")
    @classmethod
    def _parts(cls, v):
        """Each part validated by its own method's options (the recipe checks them first with key paths)."""
        if not isinstance(v, list):
            return v
        out = []
        for i, item in enumerate(v):
            if isinstance(item, MethodOptions):
                out.append(item)
                continue
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ValueError(f"parts.{i}: expected a method section with a name")
            try:
                problem = part_problem(item)
                opts = get_method(item["name"]).Options.model_validate(item)
            except UserError as exc:
                raise ValueError(f"parts.{i}: {exc}") from None
            except ValueError as exc:  # pydantic's ValidationError: the first problem, as one line
                errs = getattr(exc, "errors", lambda: [])()
                detail = f"{'.'.join(map(str, errs[0]['loc']))}: {errs[0]['msg']}" if errs else str(exc)
                raise ValueError(f"parts.{i}.{one_line(detail)}") from None
            if problem:
                raise ValueError(f"parts.{i}.name: {problem}")
            out.append(opts)
        return out


def hybrid_options(sections: list[dict]) -> HybridOptions:
    """The options of a recipe's `method:` list; the parts' modules_to_save are the hybrid's."""
    parts = [get_method(s.get("name")).Options.model_validate(s) for s in sections]
    save = list(dict.fromkeys(m for p in parts for m in p.modules_to_save or []))
    return HybridOptions(parts=parts, modules_to_save=save or None)


def check_parts(parts: list[MethodOptions], key) -> None:
    """Collisions visible from the options alone. `key(i)` names part i's key path."""
    if len(parts) < 2:
        raise UserError(f"{key(0).rsplit('.', 1)[0]}: a list of methods needs at least two; write a single method as a mapping")
    for i, p in enumerate(parts):
        problem = part_problem(p)
        if problem:
            raise UserError(f"{key(i)}.name: {problem}")
        if p.init_from:
            raise UserError(f"{key(i)}.init_from: a hybrid continues an adapter as a whole; "
                            "use the {name: hybrid, parts: [...], init_from: DIR} form")
    tokens = [i for i, p in enumerate(parts) if adds_tokens(get_method(p.name))]
    if len(tokens) > 1:
        a, b = tokens[:2]
        raise UserError(f"{key(a)}.name ({parts[a].name}) and {key(b)}.name ({parts[b].name}) both add virtual tokens; "
                        "a model takes one set: keep one of them")


@register
class Hybrid(Method):
    name = "hybrid"
    family = "hybrid"
    mergeable = False  # per instance: True when every part merges
    summary = "several methods at once (`method:` a list); merges when every part does, `merge --partial` otherwise"
    Options = HybridOptions
    peft_label: ClassVar[str] = "HYBRID"

    def __init__(self, options: MethodOptions):
        super().__init__(options)
        self.parts: list[Method] = [get_method(p.name)(p) for p in self.part_options()]
        check_parts([p.opts for p in self.parts], self.part_key)
        self.mergeable = all(p.mergeable for p in self.parts)

    def part_options(self) -> list[MethodOptions]:
        return list(self.opts.parts)

    def part_key(self, i: int) -> str:
        """The recipe key path of part i, for messages."""
        return f"method.{i}"

    def _target_key(self, i: int) -> str:
        fields = type(self.parts[i].opts).model_fields
        return f"{self.part_key(i)}.{next((f for f in _TARGET_FIELDS if f in fields), 'name')}"

    # ------------------------------------------------------------- lifecycle
    def inject(self, model: nn.Module) -> None:
        touched: list[set[int]] = []  # per part: ids of the base tensors it wraps or trains, and its own
        added: list[list] = []  # per part: (parent, name, module) of the modules it attached beside the base's
        names = {id(p): n for n, p in model.named_parameters()}
        for i, part in enumerate(self.parts):
            hidden = _hide(model, self.parts[:i], added)
            try:
                before = dict(model.named_modules())
                grad = {id(p) for p in model.parameters() if p.requires_grad}
                try:  # the part's own set-up (it freezes the model: what earlier parts train is restored below)
                    part.apply(model, self.task)
                except UserError as exc:  # the part's own message, with its key path in the list
                    raise UserError(re.sub(r"(?<![\w.])method\.", f"{self.part_key(i)}.", str(exc))) from None
                for name in part.saved_modules:  # the task head is the hybrid's, stored once
                    for p in model.get_submodule(name).parameters():
                        p.requires_grad_(id(p) in grad)
                part.saved_modules = []
                for p in model.parameters():
                    if id(p) in grad:
                        p.requires_grad_(True)
                after = dict(model.named_modules())
                replaced = [m for n, m in before.items() if n and after.get(n) is not m]
                mine = {id(p) for m in replaced for p in m.parameters()}
                mine |= {id(p) for p in model.parameters() if p.requires_grad and id(p) not in grad}
                for j, theirs in enumerate(touched):
                    shared = mine & theirs
                    if shared:
                        what = sorted(names.get(k, "a module another part created.") for k in shared)[0].rpartition(".")[0]
                        raise UserError(f"{self._target_key(j)} and {self._target_key(i)} both adapt {what}; "
                                        "give the parts disjoint targets")
                touched.append(mine)
                added.append([(before[n.rpartition(".")[0]], n.rpartition(".")[2], m) for n, m in after.items()
                              if n and n not in before and before.get(n.rpartition(".")[0]) is after.get(n.rpartition(".")[0])])
            finally:
                _restore(hidden)
        self.wrapped = [w for part in self.parts for w in part.wrapped]

    def wrappers(self, model: nn.Module) -> dict:
        return {k: v for part in self.parts for k, v in part.wrappers(model).items()}

    # ------------------------------------------------------------- training hooks
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        losses = [x for x in (p.extra_loss(model) for p in self.parts) if x is not None]
        return sum(losses[1:], losses[0]) if losses else None

    def on_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        for p in self.parts:
            p.on_optimizer_step(model, step, total_steps)

    def before_training(self, model: nn.Module, trainer) -> None:
        for p in self.parts:
            p.before_training(model, trainer)

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        for p in self.parts:
            p.before_optimizer_step(model, step)

    def validate_training(self, total_steps: int) -> None:
        for i, p in enumerate(self.parts):
            try:
                p.validate_training(total_steps)
            except UserError as exc:
                raise UserError(re.sub(r"(?<![\w.])method\.", f"{self.part_key(i)}.", str(exc))) from None

    def training_state(self, model: nn.Module) -> dict[str, Any]:
        return {str(i): p.training_state(model) for i, p in enumerate(self.parts)}

    def load_training_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        for i, p in enumerate(self.parts):
            p.load_training_state(model, state.get(str(i), {}))

    # ------------------------------------------------------------- storage
    def _saved_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{path}.{local}": p.detach() for path in self.saved_modules
                for local, p in model.get_submodule(path).named_parameters()}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = {f"part{i}.{k}": v for i, p in enumerate(self.parts) for k, v in p.state_dict(model).items()}
        return {**sd, **self._saved_state(model)}

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        subs: list[dict] = [{} for _ in self.parts]
        rest = {}
        for k, v in sd.items():
            m = PART_KEY.fullmatch(k)
            if m and int(m.group(1)) < len(self.parts):
                subs[int(m.group(1))][m.group(2)] = v
            else:
                rest[k] = v
        own = self._saved_state(model)
        if set(rest) != set(own):
            extra = sorted(set(rest) ^ set(own))
            raise UserError(f"adapter tensors do not fit this hybrid ({'unexpected' if extra[0] in rest else 'missing'} "
                            f"{extra[:3]}); is this adapter for this base model and these methods?")
        for i, p in enumerate(self.parts):
            try:
                p.load_state_dict(model, subs[i])
            except UserError as exc:
                raise UserError(f"{self.part_key(i)} ({p.name}): {exc}") from None
        with torch.no_grad():
            for k, t in own.items():
                if tuple(rest[k].shape) != tuple(t.shape):
                    raise UserError(f"adapter tensor {k} has shape {tuple(rest[k].shape)}, the model expects {tuple(t.shape)}")
                t.copy_(rest[k].to(t.dtype))

    def part_state(self, sd: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
        """The stored tensors of the sub-method `subset(indices)`: one part's own keys, or renumbered parts."""
        out = {k: v for k, v in sd.items() if not PART_KEY.fullmatch(k)}  # modules_to_save
        for new, i in enumerate(indices):
            pre = f"part{i}."
            for k, v in sd.items():
                if k.startswith(pre):
                    out[(k[len(pre):] if len(indices) == 1 else f"part{new}.{k[len(pre):]}")] = v
        return out

    def subset(self, indices: list[int]) -> Method:
        """A fresh method made of some parts: the part itself for one, a hybrid of them for several."""
        parts = [self.parts[i].saved_options() for i in indices]
        if len(parts) == 1:
            return get_method(parts[0].name)(parts[0].model_copy(update={"modules_to_save": self.opts.modules_to_save}))
        return Hybrid(HybridOptions(parts=parts, modules_to_save=self.opts.modules_to_save))

    def saved_options(self) -> MethodOptions:
        if type(self) is not Hybrid:
            return self.opts
        return self.opts.model_copy(update={"parts": [p.saved_options() for p in self.parts]})

    def check_continuation(self, other: Method, model: nn.Module) -> str | None:
        for i, (mine, theirs) in enumerate(zip(self.parts, getattr(other, "parts", []), strict=False)):
            problem = mine.check_continuation(theirs, model) if mine.name == theirs.name else None
            if problem:
                return f"{self.part_key(i)}: {problem}"
        return None

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            raise UserError(self.merge_refusal())
        for p in reversed(self.parts):
            p.merge(model)
        self.wrapped = []
        return model

    def mergeable_parts(self) -> tuple[list[int], list[int]]:
        keep = [i for i, p in enumerate(self.parts) if p.mergeable]
        return keep, [i for i in range(len(self.parts)) if i not in keep]

    def merge_refusal(self) -> str:
        keep, rest = self.mergeable_parts()
        named = ", ".join(f"{self.part_key(i)} ({self.parts[i].name})" for i in rest)
        if not keep:
            return (f"method {self.name!r}: {named} add modules or virtual tokens that cannot be folded into the base "
                    "weights; deploy the adapter directory unmerged with peftcli (train/eval/generate/inspect read it)")
        kept = ", ".join(f"{self.part_key(i)} ({self.parts[i].name})" for i in keep)
        return (f"method {self.name!r}: {named} cannot be folded into the base weights; pass --partial to merge {kept} "
                "and write the rest as an adapter directory for the merged model, or deploy the adapter directory unmerged")

    # ------------------------------------------------------------- description
    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict[str, Any]:
        parts = []
        for i, p in enumerate(self.parts):
            cfg = p.adapter_config(model, base_name)
            cfg.pop("base_model_name_or_path", None)
            cfg.pop("modules_to_save", None)
            parts.append({"key_prefix": f"part{i}.", "method": p.name, **cfg})
        return {"peft_type": self.peft_label, "base_model_name_or_path": base_name,
                "modules_to_save": self.saved_modules or None, "parts": parts}

    def describe(self, model: nn.Module) -> dict[str, Any]:
        parts = [{"key": self.part_key(i), "method": p.name, "mergeable": p.mergeable, **p.describe(model)}
                 for i, p in enumerate(self.parts)]
        return {**super().describe(model), **inference_cost(parts), "parts": parts}


def inference_cost(facts: list[dict]) -> dict[str, int]:
    """The inference costs (COST_KEYS) of several methods' describe() added up."""
    total: dict[str, int] = {}
    for d in facts:
        for k in COST_KEYS:
            if isinstance(d.get(k), int | float):
                total[k] = total.get(k, 0) + d[k]
    return total


def _hide(model: nn.Module, parts: list[Method], added: list[list]) -> list[tuple[nn.Module, str, nn.Module | None]]:
    """Hide what earlier parts created, so the next part resolves its targets on the base model's own
    modules: base modules back where wrappers stand, attached modules (a prompt encoder) detached.
    Returns what _restore puts back."""
    hidden: list[tuple[nn.Module, str, nn.Module | None]] = []
    for part, attached in zip(parts, added, strict=True):
        for path in part.wrapped:
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapper = getattr(parent, child)
            hidden.append((parent, child, wrapper))
            setattr(parent, child, wrapper.base_layer)
        for parent, child, module in attached:
            hidden.append((parent, child, module))
            delattr(parent, child)
    return hidden


def _restore(hidden: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, child, module in reversed(hidden):
        if child in parent._modules:
            setattr(parent, child, module)
        else:
            parent.add_module(child, module)


class MAMOptions(MethodOptions):
    name: Literal["mam"] = "mam"
    prefix_length: int = Field(30, ge=1, le=1024, description="virtual keys/values prepended in every layer's attention")
    prefix_hidden: int = Field(800, ge=1, description="width of the prefix's MLP reparameterisation (training only)")
    bottleneck: int = Field(512, ge=1, description="size r of the parallel adapter at the FFN")
    scale: float = Field(4.0, description="s: the parallel adapter's output is multiplied by s")


@register
class MAM(Hybrid):
    """Two fixed parts built from MAM's own options: `prefix_tuning` then `parallel` at the FFN."""

    name = "mam"
    summary = "prefix tuning in attention + scaled parallel adapter at the FFN (He et al. 2021's MAM)"
    Options = MAMOptions
    peft_label = "MAM"

    def part_options(self) -> list[MethodOptions]:
        o = self.opts
        return [get_method("prefix_tuning").Options(num_virtual_tokens=o.prefix_length, encoder_hidden_size=o.prefix_hidden),
                get_method("parallel").Options(bottleneck=o.bottleneck, scale=o.scale, placement=["ffn"])]

    def part_key(self, i: int) -> str:
        return "method"  # the user wrote mam's options, not the parts'

    def merge_refusal(self) -> str:
        return ("method 'mam' adds virtual keys/values and parallel adapters that cannot be folded into the base weights; "
                "deploy the adapter directory unmerged with peftcli (train/eval/generate/inspect read it)")
