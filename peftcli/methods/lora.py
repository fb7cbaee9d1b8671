"""LoRA (Hu et al. 2021) and its cheap variants: rsLoRA scaling, LoRA-FA (frozen A), PiSSA init.

`y = base(x) + s * dropout(x) A^T B^T` with A (r, in) kaiming-uniform(a=sqrt 5), B (out, r) zeros,
s = alpha/r (alpha/sqrt(r) with use_rslora). Merge: W += s B A. Stored with HF PEFT's names
(`<path>.lora_A.weight`, `<path>.lora_B.weight`), so `peft.PeftModel.from_pretrained` loads it.

PiSSA (init: pissa; Meng et al. 2024): `W = U S V^T` in fp32, `B = U_r (S_r/s)^1/2`, `A = (S_r/s)^1/2 V_r^T`
(S divided by the scaling as HF PEFT does, so s B A is exactly the top-r part of W) and W is replaced by
the residual `W - s B A`: outputs are unchanged at init. Our choice: the stored adapter always works on
the ORIGINAL base (what users load in PEFT/vLLM), converted like PEFT's
`path_initial_model_for_weight_conversion`: `s (B A - B0 A0)` as a plain rank-2r LoRA `[B, -B0] / [A; A0]`
with alpha scaled to keep s (`saved_options()` gives the options that reload it).

`rank_pattern` / `alpha_pattern` (HF PEFT's): per-module r and alpha, keys are regexes matched against the
module path as `(.*\.)?(key)$`, the first matching key wins (PEFT's `get_pattern_key`); unmatched modules
take `r` / `alpha`. Written to and read from adapter_config.json unchanged.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import register
from peftcli.methods.base import PREFIX, AdapterModule, Method, MethodOptions, TargetSpec

__all__ = ["LoRA", "LoraLinear", "LoraOptions", "TargetSpec", "pattern_key"]
# adapter_config.json fields of PEFT's LoRA that change what the adapter computes and peftcli does not model
FOREIGN_LORA_FIELDS = ("target_parameters", "trainable_token_indices", "layer_replication", "alora_invocation_tokens",
                       "use_qalora", "use_bdlora", "arrow_config")


class LoraOptions(MethodOptions):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: s = alpha/r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: TargetSpec = Field(None, description="regex (fullmatch), list (exact/suffix), 'all-linear', or null for the architecture default")
    exclude_modules: TargetSpec = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    use_rslora: bool = Field(False, description="scale by alpha/sqrt(r) (rsLoRA)")
    freeze_a: bool = Field(False, description="LoRA-FA: keep A at its random init, train B only")
    init: Literal["default", "pissa"] = Field(
        "default", description="pissa: A, B from the top-r singular vectors of W, W replaced by the residual; saved as a plain rank-2r LoRA on the original W"
    )
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="per-module rank: {regex: r}, PEFT's rule (.*\\.)?(key)$, first match wins")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="per-module alpha: {regex: alpha}, matched as rank_pattern")

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, v: dict, info):
        for key, value in v.items():
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"key {key!r} is not a valid regex ({exc})") from None
            if value <= 0 or (info.field_name == "rank_pattern" and value < 1):
                raise ValueError(f"{key!r}: {value} must be positive")
        return v


def pattern_key(keys, path: str) -> str | None:
    """The first key matching the module path `path` as HF PEFT's get_pattern_key does, or None."""
    return next((k for k in keys if re.match(rf"(.*\.)?({k})$", path)), None)


def lora_merge(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """W + s B A for the streaming merge (delta_weight + AdapterModule.merged_module, in their order). PiSSA
    adapters are stored as a plain rank-2r LoRA on the original W and merge the same way."""
    delta = B.float() @ A.float()
    delta.mul_(scaling)  # = (B A) * s without a second temporary; the same rounding
    if fan_in_fan_out:
        delta = delta.T
    return delta.add_(w.float()).to(w.dtype)  # = W + delta: addition commutes exactly in IEEE arithmetic


class LoraLinear(AdapterModule):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__(base)
        kw = self.factory_kwargs
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.train(base.training)  # injected into an eval-mode model, the dropout must not switch on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # 2D, so the in-place update below needs no view bookkeeping in autograd
        out = self.base_layer(x)
        if type(self.base_layer) is nn.Linear:
            # out += s * (x A^T) B^T as one op in place: no full-size temporaries for B's output, its scaled copy
            # and the sum, nor for the scaled gradient in backward. Safe: linear saves its input, not its output.
            # The low-rank products run in the base's output dtype (bf16 base or autocast: bf16 matmuls; A and
            # B stay fp32 masters, their casts are tiny and hand back fp32 gradients).
            dt = out.dtype
            a = F.linear(self.lora_dropout(x.to(dt)), self.lora_A.weight.to(dt))
            out.addmm_(a, self.lora_B.weight.to(dt).t(), alpha=self.scaling)
        else:  # Conv1D or quantized bases: the plain sum
            a = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
            out = out + (self.lora_B(a) * self.scaling).to(out.dtype)
        return out.view(*lead, out.shape[-1])

    def pissa_init(self) -> None:
        """PiSSA: A, B from the top-r SVD of W (fp32, as HF PEFT's pissa_init), W <- W - s B A.
        Copies A0, B0 are kept (non-persistent buffers) to convert the trained adapter back to the original W."""
        w = self.base_weight().float()
        if self.r > min(w.shape):
            raise UserError(f"method.r={self.r} exceeds the rank of a {tuple(w.shape)} weight; PiSSA needs r <= {min(w.shape)}")
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        root = (sv[: self.r] / self.scaling).sqrt()
        a, b = root[:, None] * vh[: self.r], u[:, : self.r] * root[None, :]
        self.lora_A.weight.data.copy_(a)
        self.lora_B.weight.data.copy_(b)
        self.register_buffer("lora_A0", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("lora_B0", self.lora_B.weight.detach().clone(), persistent=False)
        self.set_base_weight(w - self.scaling * (b @ a))

    def delta_weight(self) -> torch.Tensor:
        """s B A in (out, in) layout, fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def tensor_merges(self, stored):
        return {"weight": ("modify", functools.partial(lora_merge, A=stored("lora_A.weight"), B=stored("lora_B.weight"),
                                                       scaling=self.scaling, fan_in_fan_out=self.fan_in_fan_out))}


@register
class LoRA(Method):
    name = "lora"
    family = "reparameterized"
    peft_type = "LORA"
    summary = "low-rank update W + (alpha/r) B A on chosen linear layers; rsLoRA and LoRA-FA as options"
    Options = LoraOptions
    wrapper_cls = LoraLinear
    streams = True
    # r and alpha are compared module by module (check_continuation), through rank_pattern / alpha_pattern
    training_only = frozenset({"freeze_a", "r", "alpha", "rank_pattern", "alpha_pattern"})

    @classmethod
    def reads_peft_config(cls, cfg: dict) -> bool:
        return cfg.get("peft_type") == "LORA" and not cfg.get("use_dora")

    def module_r_alpha(self, path: str) -> tuple[int, float]:
        """r and alpha of the module at `path` (rank_pattern / alpha_pattern, else r / alpha)."""
        o = self.opts
        rk, ak = pattern_key(o.rank_pattern, path), pattern_key(o.alpha_pattern, path)
        return (o.rank_pattern[rk] if rk is not None else o.r), (o.alpha_pattern[ak] if ak is not None else o.alpha)

    def make_wrapper(self, base: nn.Module, path: str = "") -> AdapterModule:
        o = self.opts
        r, alpha = self.module_r_alpha(path)
        wrapper = self.wrapper_cls(base, r, alpha, o.dropout, o.use_rslora)
        if getattr(o, "init", "default") == "pissa":
            wrapper.pissa_init()
        return wrapper

    def inject(self, model: nn.Module) -> None:
        super().inject(model)
        if getattr(self.opts, "freeze_a", False):
            for wrapper in self.wrappers(model).values():
                wrapper.lora_A.weight.requires_grad_(False)

    def saved_options(self) -> LoraOptions:
        """Options under which the stored tensors reload on the original base (PiSSA: rank 2r, same scaling)."""
        o = self.opts
        if getattr(o, "init", "default") != "pissa":
            return o
        f = math.sqrt(2) if o.use_rslora else 2  # s = alpha/r or alpha/sqrt(r) stays put
        return o.model_copy(update={"r": 2 * o.r, "alpha": o.alpha * f, "init": "default",
                                    "rank_pattern": {k: 2 * v for k, v in o.rank_pattern.items()},
                                    "alpha_pattern": {k: v * f for k, v in o.alpha_pattern.items()}})

    def check_continuation(self, other: Method, model: nn.Module) -> str | None:
        if getattr(self.opts, "init", "default") == "pissa":
            return ("PiSSA replaces the base weights by a residual at init, so it cannot start from an adapter; "
                    "continue it as a plain LoRA (method.init: default with the adapter's r and alpha)")
        for p in self.wrapped:
            if other.module_r_alpha(p) != self.module_r_alpha(p):
                (r1, a1), (r2, a2) = other.module_r_alpha(p), self.module_r_alpha(p)
                return (f"module {p} has r={r1}, alpha={a1} in the adapter, r={r2}, alpha={a2} in the recipe "
                        "(method.r/alpha/rank_pattern/alpha_pattern); make them equal to continue training it")
        return None

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = super().state_dict(model)
        if getattr(self.opts, "init", "default") == "pissa":
            # W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0]: a plain LoRA on the original W
            for path, w in self.wrappers(model).items():
                sd[f"{PREFIX}{path}.lora_A.weight"] = torch.cat([w.lora_A.weight.detach(), w.lora_A0], 0)
                sd[f"{PREFIX}{path}.lora_B.weight"] = torch.cat([w.lora_B.weight.detach(), -w.lora_B0], 1)
        return sd

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        if getattr(self.opts, "init", "default") == "pissa":
            raise UserError("a PiSSA-initialised model cannot take stored tensors (its W was replaced by the residual); "
                            "load the saved adapter with its adapter_config (a plain LoRA of rank 2r) on the original base")
        super().load_state_dict(model, sd)

    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict:
        o = self.saved_options()
        targets, keep_filters = self.peft_target_spec(model)
        return {
            "peft_type": "LORA",
            "base_model_name_or_path": base_name,
            "r": o.r,
            "lora_alpha": o.alpha,
            "lora_dropout": o.dropout,
            "target_modules": targets,
            "exclude_modules": o.exclude_modules if keep_filters else None,
            "layers_to_transform": o.layers_to_transform if keep_filters else None,
            "layers_pattern": o.layers_pattern if keep_filters else None,
            "bias": "none",
            "fan_in_fan_out": self.fan_in_fan_out(model),
            "modules_to_save": self.saved_modules or None,
            "init_lora_weights": True,
            "use_rslora": o.use_rslora,
            "use_dora": False,
            "rank_pattern": dict(o.rank_pattern),
            "alpha_pattern": dict(o.alpha_pattern),
            "lora_bias": False,
        }

    @classmethod
    def from_adapter_config(cls, cfg: dict) -> LoraOptions:
        unsupported = [k for k in FOREIGN_LORA_FIELDS if cfg.get(k)]
        if unsupported:
            raise UserError(f"LoRA adapters with {unsupported[0]}={cfg[unsupported[0]]!r} are not supported "
                            f"(peftcli reads plain, rsLoRA, DoRA, rank_pattern/alpha_pattern and modules_to_save LoRA)")
        if str(cfg.get("init_lora_weights", True)).lower().startswith(("pissa", "corda", "olora", "lora_ga")):
            raise UserError("this adapter was saved against a residual base (init_lora_weights="
                            f"{cfg['init_lora_weights']}); re-save it with PEFT's path_initial_model_for_weight_conversion")
        if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
            raise UserError("LoRA adapters with trained biases (bias/lora_bias) are not supported yet")
        return cls.Options(
            r=cfg["r"], alpha=cfg.get("lora_alpha", cfg["r"]), dropout=cfg.get("lora_dropout", 0.0),
            target_modules=cfg.get("target_modules"), exclude_modules=cfg.get("exclude_modules"),
            layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
            use_rslora=bool(cfg.get("use_rslora", False)), modules_to_save=cfg.get("modules_to_save"),
            rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {},
        )

    def describe(self, model: nn.Module) -> dict:
        d = super().describe(model)
        d["rank"] = self.opts.r
        d["scaling"] = next(iter(self.wrappers(model).values())).scaling if self.wrapped else None
        if self.opts.rank_pattern or self.opts.alpha_pattern:
            d["ranks"] = {p: w.r for p, w in self.wrappers(model).items()}
            d["scalings"] = {p: w.scaling for p, w in self.wrappers(model).items()}
        return d

