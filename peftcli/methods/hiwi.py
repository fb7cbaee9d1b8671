"""HiWi (Liao, Meng, Monz, ACL 2023, "Parameter-efficient fine-tuning without introducing new latency").

The adapter is applied to the pretrained *parameters* of a linear layer, not to its hidden states. In the
paper's notation the layer is `h = x W + b` with W of shape (in, out) (torch's (out, in) weight transposed),
and the bias is "one more row" of W, so every token has the layer's output size:
- `form: bias`:   b' = b + f(b W_down) W_up, the bias b (out,) is one token; W_down (out, r), W_up (r, out).
- `form: weight` (the paper's): M = [W; b] ((in + 1, out), or (in, out) without a bias), every row a token:
  M' = M + f(M W_down) W_up with the same W_down (out, r), W_up (r, out) as the bias form: one adapter
  serves the weight and the bias together.
- `form: weight_in` (our earlier choice, kept as an option): each row of torch's (out, in) weight is a
  token of the input size: W' = W + f(W W_down) W_up with W_down (in, r), W_up (r, in); the bias is untouched.
The layer then computes `x W' + b'`. W_up starts at zero, so
training starts exactly at the pretrained model. Our choices (the paper leaves them open):
W_down init `kaiming` (kaiming-uniform(a=sqrt 5) with fan-in = the token size, as LoRA's A) or
`normal` (std `init_std`); activation f relu by default (gelu, tanh, identity); default targets the
feed-forward projections of the architecture; default form `bias` when every target has a bias,
`weight` otherwise. (An all-zero bias gives the adapter a zero input, f(0) = 0 for every offered f,
so the bias form learns nothing on a freshly initialised model: it is meant for pretrained biases.)

Storage (peftcli-only layout, peft_type None): the bias form stores b' only, as
`base_model.model.<path>.bias` (its size does not depend on r). A reloaded bias-form adapter holds b'
as a fixed override of b, with W_up zeroed: the layer computes exactly b', merge writes b', and
continued training restarts the adapter from b'. The weight form stores the small adapter
(`<path>.hiwi_down`, `<path>.hiwi_up`) and computes W' at merge. Merge puts b' (or W') into the base
module, which replaces the wrapper: no new latency.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import register
from peftcli.methods.base import PREFIX, AdapterModule, Method, MethodOptions, TargetSpec, init_normal_

_FFN = ["gate_proj", "up_proj", "down_proj"]
# The feed-forward projections per model_type. BERT's FFN output is `output.dense`, which a suffix
# match would confuse with the attention's `attention.output.dense`: hence a regex.
HIWI_TARGETS = {
    "llama": _FFN, "mistral": _FFN, "qwen2": _FFN, "qwen3": _FFN, "gemma": _FFN, "gemma2": _FFN,
    "bert": r".*\.layer\.\d+\.(intermediate|output)\.dense", "roberta": r".*\.layer\.\d+\.(intermediate|output)\.dense",
    "gpt2": ["mlp.c_fc", "mlp.c_proj"], "distilbert": ["ffn.lin1", "ffn.lin2"], "opt": ["fc1", "fc2"],
}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "identity": lambda t: t}


class HiwiOptions(MethodOptions):
    name: Literal["hiwi"] = "hiwi"
    r: int = Field(8, ge=1, description="adapter bottleneck")
    form: Literal["bias", "weight", "weight_in"] | None = Field(
        None, description="bias: the bias vectors; weight: the paper's (in+1, out) [W; b] rows; weight_in: torch's weight rows; "
        "null: bias when every target has a bias")
    activation: Literal["relu", "gelu", "tanh", "identity"] = "relu"
    init: Literal["kaiming", "normal"] = Field("kaiming", description="init of W_down (W_up starts at zero)")
    init_std: float = Field(0.02, gt=0, description="std of W_down for init: normal")
    target_modules: TargetSpec = Field(None, description="as for LoRA; null: the feed-forward projections")
    exclude_modules: TargetSpec = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None


class HiwiLinear(AdapterModule):
    def __init__(self, base: nn.Module, form: str, r: int, activation: str, init: str, init_std: float):
        super().__init__(base)
        self.form = form
        self.act = ACTIVATIONS[activation]
        n = self.in_features if form == "weight_in" else self.out_features  # token size
        kw = self.factory_kwargs
        down = torch.empty(r, n, **kw)  # laid out as a Linear(n, r) weight, so fan-in is n
        if init == "kaiming":
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        else:
            init_normal_(down, init_std)
        self.hiwi_down = nn.Parameter(down.T.contiguous())
        self.hiwi_up = nn.Parameter(torch.zeros(r, n, **kw))
        # After loading a stored bias-form adapter: b' replaces b as the adapter's input (fixed)
        self.register_buffer("hiwi_b0", None, persistent=False)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        # the bias form stores b' (HiWi.state_dict), not the adapter
        return {} if self.form == "bias" else {"hiwi_down": self.hiwi_down, "hiwi_up": self.hiwi_up}

    def new_bias(self) -> torch.Tensor:
        b = self.hiwi_b0 if self.hiwi_b0 is not None else self.base_layer.bias
        if b.is_meta:  # inspect's skeleton: shapes only (a meta matmul would import torch's symbolic shapes, 1 s)
            return torch.empty(b.shape, dtype=b.dtype, device=b.device)
        b32 = b.to(self.hiwi_up.dtype)
        return (b32 + self.act(b32 @ self.hiwi_down) @ self.hiwi_up).to(b.dtype)

    def new_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W' in torch's (out, in) layout, b') for the weight forms."""
        w, b = self.base_weight(), self.base_layer.bias
        dt = self.hiwi_up.dtype
        if self.form == "weight_in":
            w32 = w.to(dt)
            return (w32 + self.act(w32 @ self.hiwi_down) @ self.hiwi_up).to(w.dtype), b
        m = w.T.to(dt) if b is None else torch.cat([w.T.to(dt), b.to(dt)[None]])  # (in [+ 1], out): rows are tokens
        m = m + self.act(m @ self.hiwi_down) @ self.hiwi_up
        return m[: self.in_features].T.to(w.dtype), None if b is None else m[self.in_features].to(b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "bias":
            return F.linear(x, self.base_weight(), self.new_bias())
        return F.linear(x, *self.new_weight())

    def tensor_merges(self, stored):
        if self.form != "bias":
            return f"HiWi's {self.form} form has no per-tensor merge"
        # the stored b' replaces b; the loaded layer computes b' + f(b' W_down) 0 = b' exactly
        return {"bias": ("replace", stored("bias"))}

    def merged_module(self) -> nn.Module:
        base = self.base_layer
        if self.form == "bias":
            base.bias.data = self.new_bias().detach()
        else:
            w, b = self.new_weight()
            self.set_base_weight(w.detach())
            if b is not None:
                base.bias.data = b.detach()
        return base


@register
class HiWi(Method):
    streams = True  # the bias form; the weight forms say why not (tensor_merges)
    name = "hiwi"
    family = "partial"
    peft_type = None
    summary = "adapter on the pretrained FFN biases (or weight rows), folded away after training: b' = b + f(b W_down) W_up"
    Options = HiwiOptions
    wrapper_cls = HiwiLinear
    default_targets = HIWI_TARGETS

    def inject(self, model: nn.Module) -> None:
        paths = self.target_paths(model)
        no_bias = [p for p in paths if model.get_submodule(p).bias is None]
        form = self.opts.form or ("weight" if no_bias else "bias")
        if form == "bias" and no_bias:
            raise UserError(
                f"hiwi form: bias needs biases, but {no_bias[0]!r} ({len(no_bias)} of {len(paths)} targets) has none; "
                "use method.form: weight (works on any linear layer)"
            )
        self.form = form
        super().inject(model)

    def make_wrapper(self, base: nn.Module, path: str = "") -> AdapterModule:
        o = self.opts
        return HiwiLinear(base, self.form, o.r, o.activation, o.init, o.init_std)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = super().state_dict(model)
        for path, w in self.wrappers(model).items():
            if w.form == "bias":
                sd[f"{PREFIX}{path}.bias"] = w.new_bias().detach()
        return sd

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for path, w in self.wrappers(model).items():
                key = f"{PREFIX}{path}.bias"
                if w.form != "bias" or key not in sd:
                    continue  # a missing key is reported by Method.load_state_dict
                if tuple(sd[key].shape) != (w.out_features,):
                    raise UserError(f"adapter tensor {key} has shape {tuple(sd[key].shape)}, the model expects ({w.out_features},)")
                w.hiwi_b0 = sd[key].to(w.base_layer.bias.dtype).to(w.base_layer.bias.device).clone()
                w.hiwi_up.zero_()  # so the layer computes exactly the stored b'
        # checks keys and loads the weight form's adapter and modules_to_save; the bias keys now
        # read back as the values just set
        super().load_state_dict(model, sd)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        d = super().describe(model)
        wrappers = self.wrappers(model).values()
        d.update({
            "form": getattr(self, "form", self.opts.form), "r": self.opts.r, "activation": self.opts.activation,
            "trainable_adapter_params": sum(w.hiwi_down.numel() + w.hiwi_up.numel() for w in wrappers),
            "stored_adapter_params": sum(w.out_features if w.form == "bias" else w.hiwi_down.numel() + w.hiwi_up.numel()
                                         for w in wrappers),
        })
        return d
