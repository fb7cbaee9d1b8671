"""DoRA (Liu et al. 2024): weight-decomposed LoRA.

`W' = m * (W + s B A) / ||W + s B A||_row`: the norm is per output row, over the input dimension, and
is detached in backward (the paper's eq. 5, section 4.3); `m` (one value per output row) starts at
`||W||_row`, so outputs are unchanged at init. A, B, s, rsLoRA and LoRA-FA are LoRA's.

The forward pass follows HF PEFT's DoraLinearLayer exactly (so adapters move between the two with the
same logits): `y = base(x) + (m/n - 1) * (x W^T) + (m/n) * s * dropout(x) A^T B^T`, where in training
with dropout active `x W^T` uses the dropped-out x (PEFT's convention), otherwise the base output
minus its bias. Merge computes W' once and returns the plain base module (bias untouched).
Stored with PEFT's names: `<path>.lora_A.weight`, `<path>.lora_B.weight`, `<path>.lora_magnitude_vector`;
adapter_config is a LORA config with `use_dora: true`.
Our choice: PiSSA init is not offered with DoRA (its saved form on the original W would not be a DoRA).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peftcli.methods import register
from peftcli.methods.lora import LoRA, LoraLinear, LoraOptions


class DoraOptions(LoraOptions):
    name: Literal["dora"] = "dora"
    init: Literal["default"] = Field("default", description="DoRA starts from LoRA's default init (no PiSSA)")


class DoraLinear(LoraLinear):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base, r, alpha, dropout, use_rslora)
        with torch.no_grad():
            norm = self.weight_norm(self._base_weight())  # B = 0 at init, so this is ||W||_row
        self.lora_magnitude_vector = nn.Parameter(norm)

    def _base_weight(self) -> torch.Tensor:
        """W in (out, in) layout, in the adapter's dtype."""
        return self.base_weight().to(self.lora_A.weight.dtype)

    def weight_norm(self, w: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row, with B A treated as a constant (PEFT detaches it as well)."""
        lora_w = self.lora_B.weight.detach() @ self.lora_A.weight.detach()
        return torch.linalg.norm(w + self.scaling * lora_w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        xa = x.to(self.lora_A.weight.dtype)
        w = self._base_weight()
        scale = (self.lora_magnitude_vector / self.weight_norm(w).detach()).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            h = xa
            bias = self.base_layer.bias
            base_result = out.to(xa.dtype) - (bias.to(xa.dtype) if bias is not None else 0)
        else:  # PEFT recomputes x W^T on the dropped-out input
            h = self.lora_dropout(xa)
            base_result = F.linear(h, w)
        lora = self.lora_B(self.lora_A(h))
        return out + ((scale - 1) * base_result + scale * lora * self.scaling).to(out.dtype)

    def merged_module(self) -> nn.Module:
        directed = self.base_weight().float() + self.delta_weight()
        self.set_base_weight((self.lora_magnitude_vector.float() / torch.linalg.norm(directed, dim=1))[:, None] * directed)
        return self.base_layer


@register
class DoRA(LoRA):
    name = "dora"
    summary = "LoRA with a learned per-row magnitude: m * (W + s B A) / ||W + s B A||_row"
    Options = DoraOptions
    wrapper_cls = DoraLinear

    @classmethod
    def reads_peft_config(cls, cfg: dict) -> bool:
        return cfg.get("peft_type") == "LORA" and bool(cfg.get("use_dora"))

    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict:
        return {**super().adapter_config(model, base_name), "use_dora": True}

    @classmethod
    def from_lora_config(cls, cfg: dict) -> LoraOptions:
        """Options for a foreign peft_type LORA adapter_config: DoraOptions when `use_dora` is set, else LoraOptions."""
        return (cls if cfg.get("use_dora") else LoRA).from_adapter_config(cfg)
