"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form with an adaptive, importance-driven rank budget.

Per target linear layer: `y = base(x) + s * dropout(x) (Q * E)^T P^T`, i.e. `W + s * P diag(E) Q` with
P = `lora_B` (out, r), E = `lora_E` (r, 1), Q = `lora_A` (r, in), r = init_r.
Init as HF PEFT: E zeros (so the model starts unchanged), P and Q normal(0, 0.02).
s = alpha / (ranknum + 1e-5) with ranknum = init_r kept fixed after pruning (PEFT's scaling, kept
exactly so merged weights agree with PEFT's; alpha defaults to PEFT's 8).

Training (the loop adds `extra_loss` and calls `on_optimizer_step` after each optimizer step):
- `extra_loss` = orth_reg_weight * mean over all P and Q matrices of `||P^T P - I||_F` / `||Q Q^T - I||_F`
  (PEFT divides the sum by the number of matrices, 2 per module; we do the same).
- importance of every entry w of P, E, Q: I = |w * grad w|; sensitivity EMA I_bar = b1 I_bar + (1-b1) I,
  uncertainty EMA U_bar = b2 U_bar + (1-b2) |I - I_bar|; score = I_bar * U_bar. Triplet i's score =
  score(E_i) + mean_j score(Q_ij) + mean_j score(P_ji).
- budget b(t) (total rank over all modules): init_r * n for t <= tinit; target_r * n for
  t > T - tfinal; in between the cubic `target + (init - target) * (1 - (t - tinit)/(T - tfinal - tinit))^3`.
  Every deltaT steps in the budgeting phase (and once at t = T - tfinal) the mask keeps the b(t)
  highest-scoring triplets over all modules; the E entries of the others are set to zero. As in the
  paper and PEFT, a masked E still gets gradients (it can be re-selected at the next allocation);
  our choice: the current mask is re-applied after every optimizer step, so the model seen by the
  loop, the stored adapter and the merged model are always the same function.
  `step` is the number of optimizer steps done (1..total_steps); T = total_steps from the loop.

Storage (HF PEFT layout, peft_type ADALORA): `<path>.lora_A`, `.lora_B`, `.lora_E` restricted to the
kept triplets, and `rank_pattern` (kept mask per `<path>.lora_E`) in adapter_config.json, so PEFT's
own resize-on-load applies. `ranknum` is not stored (PEFT does not store it either: it is init_r).
Our choice: a module pruned to rank 0 still stores one triplet with E = 0 (no empty tensors on disk);
it contributes nothing, but after a reload it reports rank 1. PEFT writes such a module as empty
tensors; those load as rank 0.
Merge: W += s * P diag(E * mask) Q.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import register
from peftcli.methods.base import (
    PREFIX,
    AdapterModule,
    Method,
    MethodOptions,
    TargetSpec,
    init_normal_,
    values_device,
)
from peftcli.methods.lora import LoRA


class AdaLoraOptions(MethodOptions):
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1, description="initial rank of every module")
    target_r: int = Field(8, ge=0, description="final average rank (budget = target_r * modules)")
    alpha: float = Field(8.0, gt=0, description="scaling s = alpha / init_r (PEFT's lora_alpha)")
    dropout: float = Field(0.0, ge=0, lt=1)
    tinit: int = Field(0, ge=0, description="warm-up steps at full rank before pruning starts")
    tfinal: int = Field(0, ge=0, description="final steps at the target budget with a fixed mask")
    deltaT: int = Field(1, ge=1, description="steps between two budget allocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonality penalty")
    target_modules: TargetSpec = Field(None, description="as for LoRA; null: the architecture default")
    exclude_modules: TargetSpec = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None

    @model_validator(mode="after")
    def _ranks(self):
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        return self


def adalora_merge(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, E: torch.Tensor, init_r: int, alpha: float,
                  fan_in_fan_out: bool) -> torch.Tensor:
    """W + alpha/(init_r + 1e-5) P diag(E) Q for the streaming merge (SVDLinear.delta_weight). Stored tensors
    hold only the kept triplets; the loaded module puts them in the first k of init_r slots and masks the
    rest, so the product runs over init_r (the same summation as the in-memory merge) with zeros there."""
    k = E.shape[0]
    mask = torch.zeros(init_r, dtype=torch.bool)
    mask[:k] = True
    if k < init_r:
        A = torch.cat([A, A.new_zeros(init_r - k, A.shape[1])], 0)
        E = torch.cat([E, E.new_zeros(init_r - k, E.shape[1])], 0)
        B = torch.cat([B, B.new_zeros(B.shape[0], init_r - k)], 1)
    ranknum = torch.tensor([float(init_r)], dtype=torch.float32)
    e = E.float() * mask.unsqueeze(1)
    delta = B.float() @ (A.float() * e)
    delta.mul_(alpha / (ranknum.float() + 1e-5))
    if fan_in_fan_out:
        delta = delta.T
    return delta.add_(w.float()).to(w.dtype)


class SVDLinear(AdapterModule):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        kw = self.factory_kwargs
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        init_normal_(self.lora_A, 0.02)
        init_normal_(self.lora_B, 0.02)
        # PEFT's ranknum: fixed at init_r; a buffer, not stored (PEFT does not store it either)
        self.register_buffer("ranknum", torch.tensor([float(r)], **kw), persistent=False)
        # the mask decides ranks and stored shapes
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=values_device(kw["device"])), persistent=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r = r
        self.scaling = alpha
        self._scale = float(torch.tensor(alpha, dtype=torch.float32) / (torch.tensor([float(r)]) + 1e-5))  # on CPU, also for meta

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    @property
    def rank(self) -> int:
        return int(self.rank_mask.sum())

    def apply_mask(self) -> None:
        with torch.no_grad():
            self.lora_E.masked_fill_(~self.rank_mask.unsqueeze(1), 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        out = self.base_layer(x)
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        qe = h @ (self.lora_A * self.lora_E).T
        if type(self.base_layer) is nn.Linear and out.dtype == qe.dtype:
            # the update added in place with its scale folded into the product, as LoRA's: no full-size
            # temporaries (_scale = scaling / (ranknum + 1e-5), ranknum fixed at init_r, in fp32 as PEFT)
            out.addmm_(qe, self.lora_B.T, alpha=self._scale)
        else:
            out = out + ((qe @ self.lora_B.T) * (self.scaling / (self.ranknum + 1e-5))).to(out.dtype)
        return out.view(*lead, out.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        """s P diag(E * mask) Q in (out, in) layout, fp32."""
        e = self.lora_E.float() * self.rank_mask.unsqueeze(1)
        return self.lora_B.float() @ (self.lora_A.float() * e) * (self.scaling / (self.ranknum.float() + 1e-5))

    def tensor_merges(self, stored):
        return {"weight": ("modify", functools.partial(adalora_merge, A=stored("lora_A"), B=stored("lora_B"), E=stored("lora_E"),
                                                       init_r=self.r, alpha=self.scaling, fan_in_fan_out=self.fan_in_fan_out))}

    def orth_penalty(self) -> torch.Tensor:
        eye = torch.eye(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        return torch.linalg.matrix_norm(self.lora_A @ self.lora_A.T - eye) + torch.linalg.matrix_norm(self.lora_B.T @ self.lora_B - eye)


class _RankAllocator:
    """Importance EMAs and the cubic budget schedule (PEFT's RankAllocator, on our wrappers)."""

    def __init__(self, opts: AdaLoraOptions, wrappers: dict[str, SVDLinear]):
        self.o = opts
        self.init_bgt = sum(w.r for w in wrappers.values())
        self.target_bgt = opts.target_r * len(wrappers)
        self.ipt: dict[int, torch.Tensor] = {}
        self.unc: dict[int, torch.Tensor] = {}
        self.budget = self.init_bgt

    def schedule(self, step: int, total: int) -> tuple[int, bool]:
        """(budget, whether to re-allocate now)."""
        o = self.o
        if step <= o.tinit:
            return self.init_bgt, False
        end = total - o.tfinal
        if step >= end:
            return self.target_bgt, step == end
        frac = 1 - (step - o.tinit) / (end - o.tinit)
        return int((self.init_bgt - self.target_bgt) * frac**3 + self.target_bgt), step % o.deltaT == 0

    def update(self, wrappers: dict[str, SVDLinear]) -> None:
        o = self.o
        with torch.no_grad():
            for w in wrappers.values():
                for p in (w.lora_A, w.lora_E, w.lora_B):
                    if p.grad is None:
                        continue
                    cur = (p * p.grad).abs()
                    key = id(p)
                    avg = self.ipt.get(key, torch.zeros_like(p))
                    unc = self.unc.get(key, torch.zeros_like(p))
                    avg = o.beta1 * avg + (1 - o.beta1) * cur
                    self.unc[key] = o.beta2 * unc + (1 - o.beta2) * (cur - avg).abs()
                    self.ipt[key] = avg

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        key = id(p)
        if key not in self.ipt:
            return torch.zeros_like(p)
        return self.ipt[key] * self.unc[key]

    def allocate(self, wrappers: dict[str, SVDLinear], budget: int) -> None:
        """Keep the `budget` triplets with the highest scores over all modules."""
        mods = list(wrappers.values())
        scores = [
            self._score(w.lora_E).view(-1) + self._score(w.lora_A).mean(1) + self._score(w.lora_B).mean(0)
            for w in mods
        ]
        drop = self.init_bgt - budget
        if drop <= 0:
            keep = [torch.ones_like(s, dtype=torch.bool) for s in scores]
        else:
            threshold = torch.kthvalue(torch.cat(scores).float().cpu(), drop).values.item()
            keep = [s > threshold for s in scores]  # PEFT's rule: ties at the threshold go
        for w, k in zip(mods, keep, strict=True):
            w.rank_mask.copy_(k)
        self.budget = budget


@register
class AdaLoRA(LoRA):
    name = "adalora"
    family = "reparameterized"
    peft_type = "ADALORA"
    summary = "SVD-form LoRA W + s P diag(E) Q whose ranks are pruned by importance to a target budget"
    Options = AdaLoraOptions
    wrapper_cls = SVDLinear
    training_only = frozenset({"target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight"})

    @classmethod
    def reads_peft_config(cls, cfg: dict) -> bool:
        return cfg.get("peft_type") == "ADALORA"

    def check_continuation(self, other: Method, model: nn.Module) -> str | None:
        return None  # one rank (init_r) and alpha for every module, compared as options (not LoRA's per-module rule)

    def __init__(self, options: AdaLoraOptions):
        super().__init__(options)
        self.allocator: _RankAllocator | None = None
        self.total_steps: int | None = None

    def make_wrapper(self, base: nn.Module, path: str = "") -> AdapterModule:
        o = self.opts
        return SVDLinear(base, o.init_r, o.alpha, o.dropout)

    # ------------------------------------------------------------- training hooks
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        mods = list(self.wrappers(model).values())
        if not mods or self.opts.orth_reg_weight == 0:
            return None
        total = sum(w.orth_penalty() for w in mods)
        return self.opts.orth_reg_weight * total / (2 * len(mods))

    def validate_training(self, total_steps: int) -> None:
        o = self.opts
        if o.tinit >= total_steps - o.tfinal:
            raise UserError(
                f"method.tinit ({o.tinit}) + method.tfinal ({o.tfinal}) leave no pruning phase in {total_steps} "
                "training steps; lower them or train longer"
            )

    def on_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        o = self.opts
        wrappers = self.wrappers(model)
        if self.allocator is None:
            self.validate_training(total_steps)
            self.allocator = _RankAllocator(o, wrappers)
        self.total_steps = total_steps
        alloc = self.allocator
        if step < total_steps - o.tfinal:
            alloc.update(wrappers)
        budget, now = alloc.schedule(step, total_steps)
        if now:
            alloc.allocate(wrappers, budget)
            if step == total_steps - o.tfinal:
                alloc.ipt.clear(), alloc.unc.clear()  # mask fixed from here on (PEFT)
        for w in wrappers.values():
            w.apply_mask()

    def training_state(self, model: nn.Module) -> dict[str, Any]:
        """Rank masks, importance EMAs (by parameter name) and budget: what an exact resume needs."""
        wrappers = self.wrappers(model)
        state: dict[str, Any] = {"masks": {p: w.rank_mask.detach().cpu().clone() for p, w in wrappers.items()},
                                 "total_steps": self.total_steps}
        alloc = self.allocator
        if alloc is not None:
            names = {id(getattr(w, n)): f"{p}.{n}" for p, w in wrappers.items() for n in ("lora_A", "lora_E", "lora_B")}
            state.update(budget=alloc.budget, ipt={names[k]: v.cpu().clone() for k, v in alloc.ipt.items()},
                         unc={names[k]: v.cpu().clone() for k, v in alloc.unc.items()})
        return state

    def load_training_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        wrappers = self.wrappers(model)
        for path, mask in state.get("masks", {}).items():
            wrappers[path].rank_mask.copy_(mask)
        self.total_steps = state.get("total_steps")
        if "budget" in state:
            self.allocator = alloc = _RankAllocator(self.opts, wrappers)
            alloc.budget = state["budget"]
            params = {f"{p}.{n}": getattr(w, n) for p, w in wrappers.items() for n in ("lora_A", "lora_E", "lora_B")}
            alloc.ipt = {id(params[k]): v.to(params[k].device) for k, v in state["ipt"].items()}
            alloc.unc = {id(params[k]): v.to(params[k].device) for k, v in state["unc"].items()}

    # ------------------------------------------------------------- storage
    def _kept(self, w: SVDLinear) -> torch.Tensor:
        idx = w.rank_mask.nonzero().view(-1)
        return idx if idx.numel() else torch.zeros(1, dtype=torch.long, device=idx.device)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = super().state_dict(model)  # full-rank views of the parameters (load_state_dict copies into them)
        for path, w in self.wrappers(model).items():
            if bool(w.rank_mask.all()):
                continue
            idx = self._kept(w)
            sd[f"{PREFIX}{path}.lora_A"] = w.lora_A.detach()[idx]
            sd[f"{PREFIX}{path}.lora_E"] = (w.lora_E * w.rank_mask.unsqueeze(1)).detach()[idx]
            sd[f"{PREFIX}{path}.lora_B"] = w.lora_B.detach()[:, idx]
        return sd

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        """Stored triplets go into the first k slots; the other slots are masked (E = 0)."""
        wrappers = self.wrappers(model)
        padded, ranks = dict(sd), {}
        for path, w in wrappers.items():
            key = f"{PREFIX}{path}.lora_E"
            k = sd[key].shape[0] if key in sd else w.r
            if not 0 <= k <= w.r:  # 0: PEFT pruned the module away (its rank_pattern all False)
                raise UserError(f"adapter tensor {key} has rank {k}; this method's init_r is {w.r}")
            ranks[path] = k
            for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                full_key = f"{PREFIX}{path}.{name}"
                src = sd.get(full_key)
                if src is None or src.shape[dim] == w.r:
                    continue  # missing: reported below; full rank: loads as is
                t = getattr(w, name).detach().clone()
                t.narrow(dim, 0, k).copy_(src.to(t.dtype))
                padded[full_key] = t
            w.rank_mask.fill_(True)  # so state_dict() hands out full-size views to copy into
        super().load_state_dict(model, padded)
        for path, w in wrappers.items():
            w.rank_mask.fill_(False)
            w.rank_mask[: ranks[path]] = True
            w.apply_mask()

    # ------------------------------------------------------------- description
    def rank_pattern(self, model: nn.Module) -> dict[str, list[bool]]:
        """PEFT's rank_pattern for the stored (already resized) tensors: all kept entries True."""
        out = {}
        for path, w in self.wrappers(model).items():
            k = len(self._kept(w))
            out[f"{path}.lora_E"] = [True] * k + [False] * (w.r - k)
        return out

    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict[str, Any]:
        o = self.opts
        targets, keep_filters = self.peft_target_spec(model)
        # PEFT refuses a config without a budgeting phase; before training we only know the options
        total = self.total_steps or (o.tinit + o.tfinal + 1)
        # "r" is ignored by PEFT for AdaLoRA and warns unless it is its default 8
        return {
            "peft_type": "ADALORA", "base_model_name_or_path": base_name,
            "r": 8, "lora_alpha": o.alpha, "lora_dropout": o.dropout, "target_modules": targets,
            "exclude_modules": o.exclude_modules if keep_filters else None,
            "layers_to_transform": o.layers_to_transform if keep_filters else None,
            "layers_pattern": o.layers_pattern if keep_filters else None,
            "bias": "none", "fan_in_fan_out": self.fan_in_fan_out(model),
            "modules_to_save": self.saved_modules or None, "init_lora_weights": True,
            "init_r": o.init_r, "target_r": o.target_r, "tinit": o.tinit, "tfinal": o.tfinal, "deltaT": o.deltaT,
            "beta1": o.beta1, "beta2": o.beta2, "orth_reg_weight": o.orth_reg_weight, "total_step": total,
            "rank_pattern": self.rank_pattern(model),
        }

    @classmethod
    def from_adapter_config(cls, cfg: dict) -> AdaLoraOptions:
        if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
            raise UserError("AdaLoRA adapters with trained biases are not supported")
        keys = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")
        return cls.Options(
            **{k: cfg[k] for k in keys if cfg.get(k) is not None},
            alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout", 0.0),
            target_modules=cfg.get("target_modules"), exclude_modules=cfg.get("exclude_modules"),
            layers_to_transform=cfg.get("layers_to_transform"), layers_pattern=cfg.get("layers_pattern"),
            modules_to_save=cfg.get("modules_to_save"),
        )

    def describe(self, model: nn.Module) -> dict[str, Any]:
        d = Method.describe(self, model)
        ranks = {path: w.rank for path, w in self.wrappers(model).items()}
        d.update({
            "init_r": self.opts.init_r, "target_r": self.opts.target_r, "ranks": ranks,
            "total_rank": sum(ranks.values()),
            "budget": self.allocator.budget if self.allocator else None,
            "scaling": self.opts.alpha / (self.opts.init_r + 1e-5),
        })
        return d
