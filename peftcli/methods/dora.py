"""DoRA (Liu et al. 2024): weight-decomposed LoRA.

`W' = m * (W + s B A) / ||W + s B A||_row`: the norm is per output row, over the input dimension, and
is detached in backward (the paper's eq. 5, section 4.3); `m` (one value per output row) starts at
`||W||_row`, so outputs are unchanged at init. A, B, s, rsLoRA and LoRA-FA are LoRA's.

The forward pass follows HF PEFT's DoraLinearLayer exactly (so adapters move between the two with the
same logits): `y = base(x) + (m/n - 1) * (x W^T) + (m/n) * s * dropout(x) A^T B^T`, where in training
with dropout active `x W^T` uses the dropped-out x (PEFT's convention), otherwise the base output
minus its bias. Merge computes W' once and returns the plain base module (bias untouched).
Speed (our choice, same function): the row norm is computed without forming W + s B A, as
`||W||^2 + 2 s <W A^T, B>_row + s^2 <B (A A^T), B>_row` with ||W||^2 cached while W is unchanged (one
out x in x r product instead of three full-size temporaries per call), and without dropout the output is
`(m/n) (x W^T + s x A^T B^T) + b`, the LoRA update added in place: a single full-size multiply.
Stored with PEFT's names: `<path>.lora_A.weight`, `<path>.lora_B.weight`, `<path>.lora_magnitude_vector`;
adapter_config is a LORA config with `use_dora: true`.
Our choice: PiSSA init is not offered with DoRA (its saved form on the original W would not be a DoRA).
"""

from __future__ import annotations

import functools
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


def dora_merge(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
               fan_in_fan_out: bool) -> torch.Tensor:
    """m * (W + s B A) / ||W + s B A||_row for the streaming merge (DoraLinear.merged_module, in its order)."""
    wf = w.float()
    wf = wf.T if fan_in_fan_out else wf
    directed = wf + (B.float() @ A.float()) * scaling
    merged = (magnitude.float() / torch.linalg.norm(directed, dim=1))[:, None] * directed
    return (merged.T if fan_in_fan_out else merged).contiguous().to(w.dtype)


class DoraLinear(LoraLinear):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base, r, alpha, dropout, use_rslora)
        w = self._base_weight()
        if w.is_meta:  # inspect's skeleton: shapes only (a meta norm would import torch's symbolic shapes, 1 s)
            norm = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
        else:
            with torch.no_grad():
                norm = torch.linalg.norm(w, dim=1)  # B = 0 at init: ||W||_row, as PEFT
        self.lora_magnitude_vector = nn.Parameter(norm)
        self._w_sq: tuple[tuple, torch.Tensor] | None = None  # (W's identity and version, ||W||^2_row)

    def _base_weight(self) -> torch.Tensor:
        """W in (out, in) layout, in the adapter's dtype."""
        return self.base_weight().to(self.lora_A.weight.dtype)

    def weight_norm(self, w: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row, with B A treated as a constant (PEFT detaches it as well), expanded
        so that no (out, in) temporary is formed: ||W||^2 + 2 s <W A^T, B> + s^2 <B A A^T, B> per row."""
        a, b, s = self.lora_A.weight.detach(), self.lora_B.weight.detach(), self.scaling
        w = w.detach()
        src = self.base_layer.weight
        key = (src.data_ptr(), src._version, src.dtype, w.dtype, tuple(w.shape))
        if self._w_sq is None or self._w_sq[0] != key:
            self._w_sq = (key, w.pow(2).sum(1))
        sq = self._w_sq[1] + (2 * s) * ((w @ a.T) * b).sum(1) + (s * s) * ((b @ (a @ a.T)) * b).sum(1)
        return sq.clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if (type(base) is nn.Linear and x.dtype == base.weight.dtype == self.lora_A.weight.dtype
                and (isinstance(self.lora_dropout, nn.Identity) or not self.training)):
            lead = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1])
            scale = self.lora_magnitude_vector / self.weight_norm(base.weight)
            out = F.linear(x, base.weight)
            out.addmm_(self.lora_A(x), self.lora_B.weight.t(), alpha=self.scaling)  # safe: linear saves x, not out
            out = out * scale
            if base.bias is not None:
                out += base.bias  # on the product, which autograd does not keep
            return out.view(*lead, out.shape[-1])
        out = base(x)
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

    def tensor_merges(self, stored):
        return {"weight": ("modify", functools.partial(dora_merge, A=stored("lora_A.weight"), B=stored("lora_B.weight"),
                                                       magnitude=stored("lora_magnitude_vector"), scaling=self.scaling,
                                                       fan_in_fan_out=self.fan_in_fan_out))}

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
