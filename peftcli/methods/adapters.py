"""Bottleneck adapters: Houlsby (2019), Pfeiffer (2021) and the scaled parallel adapter (He et al. 2021).

An adapter is `A(h) = f(h W_down + b_down) W_up + b_up` with W_down (d, r), W_up (r, d); it sits at a
*site* of a transformer block, the attention sublayer or the FFN sublayer:
- serial (`houlsby`: attention and FFN, block LayerNorms trained too; `pfeiffer`: FFN only):
  `y <- y + s * A(y)` on the sublayer's output y, before the residual add (and BERT's post-LayerNorm);
- parallel (`parallel`, FFN by default, scale s = 4): `y <- y + s * A(x)` with x the sublayer's input,
  computed beside the sublayer.
W_up and b_up start at zero, so the model is unchanged at init. W_down: kaiming-uniform(a=sqrt 5) as
LoRA's A (`init: kaiming`) or normal(std `init_std`). r = `bottleneck`, or d // `reduction_factor`.

Where a site lives is one table, `SITES`: per model_type, the block-relative linear layers whose input
is the sublayer's input (`*_in`) and whose output is the sublayer's output before the residual (`*_out`).
The `*_out` layer is wrapped (`AdapterSite`); a parallel site reads its input with a forward pre-hook on
the `*_in` layer. No model code is copied.

Not mergeable (the adapter is a non-linear function of the hidden state): deploy the adapter directory
with peftcli. Layout (peftcli's own, peft_type HOULSBY / PFEIFFER / PARALLEL in adapter_config.json,
which also lists the sites): `base_model.model.<site>.adapter_down.{weight,bias}`,
`base_model.model.<site>.adapter_up.{weight,bias}` (torch Linear layout: (out, in)) and, for trained
LayerNorms, `base_model.model.<norm>.{weight,bias}`.
Inference cost per token and site: 4 d r + 2 r + 2 d FLOPs (two matmuls at 2 FLOPs per multiply-add,
the biases, the activation, the residual add), reported by `describe` as `added_flops_per_token`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import register
from peftcli.methods.base import PREFIX, AdapterModule, Method, MethodOptions, init_normal_, replace_module
from peftcli.methods.targets import linear_shape, transformer_blocks


@dataclass(frozen=True)
class Sites:
    """Block-relative paths of the linear layers that bound each sublayer."""

    attn_in: str  # its input is the attention sublayer's input
    attn_out: str  # its output is the attention sublayer's output (before the residual)
    ffn_in: str
    ffn_out: str


_LLAMA = Sites("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
_BERT = Sites("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")
SITES: dict[str, Sites] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "gpt2": Sites("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "bert": _BERT, "roberta": _BERT,
}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh, "identity": lambda t: t}
Placement = Literal["attn", "ffn"]


class BottleneckOptions(MethodOptions):
    bottleneck: int | None = Field(None, ge=1, description="adapter size r; null: hidden size // reduction_factor")
    reduction_factor: int = Field(16, ge=1, description="r = hidden size // reduction_factor when bottleneck is null")
    activation: Literal["relu", "gelu", "swish", "tanh", "identity"] = "relu"
    init: Literal["kaiming", "normal"] = Field("kaiming", description="init of W_down (W_up starts at zero)")
    init_std: float = Field(1e-3, gt=0, description="std of W_down for init: normal")
    scale: float = Field(1.0, description="s: the adapter's output is multiplied by s")
    placement: list[Placement] = Field(["ffn"], min_length=1, description="sublayers that get an adapter: attn, ffn")
    train_layernorms: bool = Field(False, description="also train the blocks' LayerNorms (Houlsby)")
    layers_to_transform: int | list[int] | None = Field(None, description="block indices that get adapters; null: all")


class HoulsbyOptions(BottleneckOptions):
    name: Literal["houlsby"] = "houlsby"
    activation: Literal["relu", "gelu", "swish", "tanh", "identity"] = "gelu"
    placement: list[Placement] = Field(["attn", "ffn"], min_length=1, description="sublayers that get an adapter: attn, ffn")
    train_layernorms: bool = Field(True, description="also train the blocks' LayerNorms (Houlsby)")


class PfeifferOptions(BottleneckOptions):
    name: Literal["pfeiffer"] = "pfeiffer"


class ParallelOptions(BottleneckOptions):
    name: Literal["parallel"] = "parallel"
    scale: float = Field(4.0, description="s: the adapter's output is multiplied by s (He et al.'s best: 4)")


class AdapterSite(AdapterModule):
    """A sublayer's output layer plus its adapter: y + s * A(y) (serial) or y + s * A(x) (parallel, x
    captured from the sublayer's input layer by `capture`)."""

    def __init__(self, base: nn.Module, r: int, activation: str, scale: float, init: str, init_std: float, parallel: bool):
        super().__init__(base)
        d = self.out_features
        kw = self.factory_kwargs
        self.adapter_down = nn.Linear(d, r, **kw)
        self.adapter_up = nn.Linear(r, d, **kw)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        else:
            init_normal_(self.adapter_down.weight, init_std)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.act = ACTIVATIONS[activation]
        self.scale = scale
        self.parallel = parallel
        self.r = r
        self._input: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the sublayer's input layer: keep x for this site's parallel adapter."""
        self._input = args[0]

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.act(self.adapter_down(h.to(self.adapter_down.weight.dtype)))) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.parallel:
            h, self._input = self._input, None
            if h is None:
                raise RuntimeError("parallel adapter: the sublayer's input layer did not run before its output layer")
        else:
            h = y
        return y + self.adapter(h).to(y.dtype)

    def flops_per_token(self) -> int:
        d, r = self.out_features, self.r
        return 4 * d * r + 2 * r + 2 * d


class Bottleneck(Method):
    """The shared mechanism; subclasses set the defaults (placement, activation, scale, LayerNorms)."""

    family = "additive"
    mergeable = False
    peft_type = None
    parallel = False
    wrapper_cls = AdapterSite

    def __init__(self, options: BottleneckOptions):
        super().__init__(options)
        self.norms: list[str] = []  # block LayerNorm modules trained in full (train_layernorms)
        self.inputs: dict[str, str] = {}  # parallel: site -> the layer whose input feeds its adapter
        self._hooks: list = []

    def sites(self, model: nn.Module) -> tuple[list[str], list[tuple[str, str]]]:
        """(adapted block paths, (output layer, input layer) paths of every adapter site), in model order."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SITES:
            raise UserError(f"method {self.name!r} has no adapter sites for model type {model_type!r} "
                            f"(supported: {', '.join(sorted(SITES))}); choose another method (e.g. lora)")
        table = SITES[model_type]
        stack, n = transformer_blocks(model, self.name)
        layers = self.opts.layers_to_transform
        wanted = range(n) if layers is None else ([layers] if isinstance(layers, int) else layers)
        bad = [i for i in wanted if not 0 <= i < n]
        if bad:
            raise UserError(f"method.layers_to_transform: block {bad[0]} does not exist (the model has {n}: 0..{n - 1})")
        blocks = [f"{stack}.{i}" for i in sorted(set(wanted))]
        places = [w for w in ("attn", "ffn") if w in self.opts.placement]
        return blocks, [(f"{b}.{getattr(table, w + '_out')}", f"{b}.{getattr(table, w + '_in')}") for b in blocks for w in places]

    def inject(self, model: nn.Module) -> None:
        o = self.opts
        blocks, sites = self.sites(model)
        self.wrapped = [out for out, _ in sites]
        for out, inp in sites:
            base = model.get_submodule(out)
            r = o.bottleneck or max(1, linear_shape(base)[1] // o.reduction_factor)
            site = AdapterSite(base, r, o.activation, o.scale, o.init, o.init_std, self.parallel)
            replace_module(model, out, site)
            if self.parallel:
                self.inputs[out] = inp
                self._hooks.append(model.get_submodule(inp).register_forward_pre_hook(site.capture))
        if o.train_layernorms:  # the adapted blocks' LayerNorms / RMSNorms
            self.norms = [n for n, m in model.named_modules()
                          if "norm" in type(m).__name__.lower() and any(n.startswith(b + ".") for b in blocks)]
            for n in self.norms:
                for p in model.get_submodule(n).parameters():
                    p.requires_grad_(True)

    # ------------------------------------------------------------- storage
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = super().state_dict(model)
        for path in self.norms:
            for local, p in model.get_submodule(path).named_parameters():
                sd[f"{PREFIX}{path}.{local}"] = p.detach()
        return sd

    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict[str, Any]:
        return {**super().adapter_config(model, base_name), "layout": "peftcli", "sites": list(self.wrapped),
                "inputs": dict(self.inputs) or None, "layernorms": list(self.norms) or None,
                "r": self.describe(model)["bottleneck"]}

    # ------------------------------------------------------------- description
    def describe(self, model: nn.Module) -> dict[str, Any]:
        wrappers = self.wrappers(model).values()
        return {**super().describe(model), "bottleneck": next(iter(wrappers)).r if wrappers else None,
                "scale": self.opts.scale, "parallel": self.parallel, "sites": len(self.wrapped),
                "layernorms": list(self.norms),
                "added_flops_per_token": sum(w.flops_per_token() for w in wrappers)}


@register
class Houlsby(Bottleneck):
    name = "houlsby"
    summary = "bottleneck adapters after the attention and FFN outputs, block LayerNorms trained (Houlsby et al. 2019)"
    Options = HoulsbyOptions


@register
class Pfeiffer(Bottleneck):
    name = "pfeiffer"
    summary = "one bottleneck adapter after each FFN output (Pfeiffer et al. 2021)"
    Options = PfeifferOptions


@register
class Parallel(Bottleneck):
    name = "parallel"
    summary = "scaled parallel adapter beside the FFN (or attention): y + s * A(x) (He et al. 2021)"
    Options = ParallelOptions
    parallel = True


def parallel_ffn_adapter(bottleneck: int = 512, scale: float = 4.0, **options) -> Parallel:
    """MAM's adapter half: a `parallel` method at the FFN with the given size and scale (He et al.'s
    defaults); `options` are further ParallelOptions fields. Apply it with `.apply(model)` or as a hybrid part."""
    return Parallel(ParallelOptions(bottleneck=bottleneck, scale=scale, placement=["ffn"], **options))
