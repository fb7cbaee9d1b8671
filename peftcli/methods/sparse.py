"""Sparse fine-tuning: train a chosen subset of the pretrained entries; the trained values are the
weights, so merge adds no latency. One mechanism, four ways to choose the subset (`method.name`):

- `pafi` (Liao, Meng, Monz, ACL 2023): the entries with the smallest |theta|; no data, deterministic,
  the same mask for every task.
- `fish` (Sung et al. 2021): the entries with the largest empirical Fisher, mean over `num_samples`
  training examples of (d log p(y|x) / d theta)^2 (one example per backward pass by default).
- `lt_sft` (Ansell et al. 2022): full fine-tuning of the eligible tensors for `full_steps` steps, keep the
  entries that moved most (|theta - theta0|), reset everything to theta0, then the sparse phase; both
  phases inside one `peftcli train` run.
- `child_tuning` (Xu et al. 2021): `mode: d` is the Fisher mask keeping `reserve_p` of the entries;
  `mode: f` trains every eligible entry with a per-step Bernoulli(reserve_p) gradient mask scaled by
  1/reserve_p. F is dense by nature: its delta and AdamW moments are as large as the eligible tensors,
  and it stores the full delta.

The mechanism: each eligible linear layer is wrapped in `SparseDeltaLinear`, which holds the frozen base
weight, `sparse_indices` (flat positions in the base weight's own storage layout, int64 buffer) and
`sparse_values`, the only trainable tensor (k entries, zero at init: outputs unchanged). So the
parameters and the optimizer's moments scale with k, not with the dense tensors. The trained values are the
weights: the selected entries of the frozen weight hold base + values (rewritten after each update), so the
layer runs as a plain linear layer with no copy of its weight; backward computes the k value gradients
alone, as a sampled matmul at the mask's entries: no weight-size gradient exists.
(A layer whose mask holds 5% or more of its entries, e.g. Child-Tuning's 30%, takes one transient dense
matmul instead, one layer at a time.) Fish and Child-Tuning D need
dense gradients of every eligible tensor while the mask is computed (before training), LT-SFT's first phase
is a dense fine-tune: both cost dense memory once, and are re-done identically on --resume.

Options shared by all four: `density` (fraction of eligible entries, default 0.005), `scope`
(`global`: one threshold over all eligible entries; `per_tensor`: the same fraction of each tensor),
which tensors are eligible (`target_modules`, default every linear layer of the transformer blocks:
no embeddings, norms or output head), `train_bias` (the eligible layers' biases fully trainable) and
`train_head` (a classification head, with BERT's pooler, fully trainable; or eligible for the mask like any tensor).

Storage (peftcli-only layout): `<path>.sparse_indices` (int32 where the tensor has < 2^31 entries) and
`<path>.sparse_values` per tensor (`<path>.sparse_delta`, dense, for Child-Tuning F), biases as
`<path>.bias`, the head as modules_to_save. Merge scatters the values into the base weight in place:
unselected entries stay bit-identical.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import register
from peftcli.methods.base import (
    HEADS,
    PREFIX,
    AdapterModule,
    Method,
    MethodOptions,
    TargetSpec,
    replace_module,
)
from peftcli.methods.targets import is_linear, layer_index, resolve_targets


class SparseOptions(MethodOptions):
    density: float = Field(0.005, gt=0, le=1, description="fraction of the eligible entries that are trained")
    scope: Literal["global", "per_tensor"] = Field("global", description="one threshold over all eligible entries, or per tensor")
    target_modules: TargetSpec = Field(None, description="eligible layers (their weight matrices): regex, list, all-linear, "
                                       "or null: every linear layer inside the transformer blocks")
    exclude_modules: TargetSpec = None
    train_bias: bool = Field(False, description="train the eligible layers' biases in full")
    train_head: bool = Field(True, description="a classification head trained in full (else it is eligible for the mask)")


class PafiOptions(SparseOptions):
    name: Literal["pafi"] = "pafi"


class FishOptions(SparseOptions):
    name: Literal["fish"] = "fish"
    num_samples: int = Field(1024, ge=1, description="training examples for the empirical Fisher")
    fisher_batch_size: int = Field(1, ge=1, description="examples per backward pass (1: the exact per-example Fisher)")


class LtSftOptions(SparseOptions):
    name: Literal["lt_sft"] = "lt_sft"
    full_steps: int | None = Field(None, ge=1, description="steps of the full fine-tuning phase; null: a quarter of train steps")
    full_lr: float | None = Field(None, gt=0, description="learning rate of the full phase; null: train.lr / 10")


class ChildTuningOptions(SparseOptions):
    name: Literal["child_tuning"] = "child_tuning"
    mode: Literal["d", "f"] = Field("d", description="d: Fisher mask computed once; f: per-step Bernoulli gradient mask (dense)")
    reserve_p: float = Field(0.3, gt=0, le=1, description="fraction kept (d: of the entries, f: per step)")
    num_samples: int = Field(1024, ge=1, description="mode d: training examples for the Fisher")
    fisher_batch_size: int = Field(1, ge=1)
    density: float | None = Field(None, gt=0, le=1, description="ignored: reserve_p is Child-Tuning's density")

    @model_validator(mode="after")
    def _density(self):
        self.density = self.reserve_p
        return self


SAMPLED_BELOW = 0.05  # below this density a layer's value gradients come from a sampled matmul, above it a dense one


class _SparseLinear(torch.autograd.Function):
    """y = x W'^T + b where W' is the layer's weight with the delta already in it (a sparse mask keeps the
    selected entries of the weight itself at base + values, see SparseDeltaLinear.sync) or, for a dense
    delta, W + values built for the call. Saves x, not a copy of the weight.

    The values' gradient is dW'[out_j, in_j] = sum_t g[t, out_j] x[t, in_j]. For a sparse mask it is computed
    at the k selected entries only, as a sampled dense-dense matmul (torch.sparse.sampled_addmm over the mask in
    CSR form): no weight-size tensor, and faster than the dense weight gradient up to ~5% density (SmolLM2's
    1536 x 576 layer, 1024 tokens: 4.3 ms at 0.5%, 8.7 ms at 5%, dense 11 ms); denser masks take the dense matmul.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, crow, col, transposed, dense):
        w = weight + values.view_as(weight).to(weight.dtype) if dense else weight
        out = F.linear(x, w.T if transposed else w, bias)
        ctx.save_for_backward(x, weight, values if dense else None, indices, crow, col)
        ctx.transposed, ctx.dense, ctx.values_dtype, ctx.k = transposed, dense, values.dtype, values.numel()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, values, indices, crow, col = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            w = weight + values.view_as(weight).to(weight.dtype) if ctx.dense else weight
            grad_x = grad_out @ (w.T if ctx.transposed else w).to(grad_out.dtype)
        if ctx.needs_input_grad[3]:
            dt = ctx.values_dtype
            g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dt), x.reshape(-1, x.shape[-1]).to(dt)
            a, b = (x2.T, g2) if ctx.transposed else (g2.T, x2)  # the gradient in the weight's storage layout = a @ b
            if ctx.dense or ctx.k >= SAMPLED_BELOW * weight.numel():
                full = (a @ b).reshape(-1)  # one layer's weight-size gradient, transient
                grad_values = full if ctx.dense else full.index_select(0, indices)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                    mask = torch.sparse_csr_tensor(crow, col, torch.zeros(ctx.k, dtype=dt, device=a.device),
                                                   size=(a.shape[0], b.shape[1]), check_invariants=False)
                    grad_values = torch.sparse.sampled_addmm(mask, a, b, beta=0.0).values()
        return grad_x, None, None, grad_values, None, None, None, None, None


def sparse_merge(w: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """Selected entries (flat positions in the stored layout) = base + values, the others untouched
    (SparseDeltaLinear.sync), for the streaming merge; indices None: a dense delta (Child-Tuning F). A new
    tensor: `w` may be a view of the mapped base file."""
    if indices is None:
        return (w.float() + values.float().view_as(w)).to(w.dtype)
    out = w.clone()
    flat = out.view(-1)
    flat[indices] = (flat[indices].float() + values.float()).to(w.dtype)
    return out


class SparseDeltaLinear(AdapterModule):
    """A Linear/Conv1D trained at `sparse_indices` only: the trained values are the weights. The selected
    entries of the (frozen, not trainable) base weight hold base + sparse_values, rewritten whenever the
    values changed (`sync`, checked by the values' version counter at every forward): the layer runs as a
    plain linear layer, with no copy of its weight. `sparse_base` keeps the k pretrained values, so merge,
    storage and a reload all see base + values. indices None: a dense delta (Child-Tuning F), added per call."""

    def __init__(self, base: nn.Module, indices: torch.Tensor | None):
        super().__init__(base)
        w = base.weight
        self.dense = indices is None
        self.register_buffer("sparse_indices", torch.empty(0, dtype=torch.long, device=w.device) if self.dense
                             else indices.to(device=w.device, dtype=torch.long), persistent=False)
        n = w.numel() if self.dense else self.sparse_indices.numel()
        self.sparse_values = nn.Parameter(torch.zeros(n, device=w.device, dtype=self.factory_kwargs["dtype"]))
        self.register_buffer("sparse_base", None if self.dense else w.detach().reshape(-1)[self.sparse_indices].clone(),
                             persistent=False)
        # the mask in CSR form over the weight's storage layout (indices are sorted: row-major order)
        rows = self.sparse_indices // w.shape[1]
        crow = torch.zeros(w.shape[0] + 1, dtype=torch.long, device=w.device)
        if not w.is_meta:  # the streaming merge's skeleton needs the shapes only
            crow[1:] = torch.bincount(rows, minlength=w.shape[0]).cumsum(0)
        self.register_buffer("sparse_crow", crow, persistent=False)
        self.register_buffer("sparse_col", self.sparse_indices % w.shape[1], persistent=False)
        self._synced: tuple | None = None

    def sync(self) -> None:
        """Selected entries of the weight = base + values (the same arithmetic as the merge)."""
        v = self.sparse_values
        if self.dense or self._synced == (id(v), v._version):
            return
        with torch.no_grad():
            w = self.base_layer.weight
            w.view(-1)[self.sparse_indices] = (self.sparse_base.float() + v.float()).to(w.dtype)
        self._synced = (id(v), v._version)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync()
        b = self.base_layer
        return _SparseLinear.apply(x, b.weight, b.bias, self.sparse_values, self.sparse_indices, self.sparse_crow,
                                   self.sparse_col, self.fan_in_fan_out, self.dense)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"sparse_values": self.sparse_values}

    def delta_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        delta = torch.zeros(w.numel(), dtype=torch.float32, device=w.device)
        if self.dense:
            delta += self.sparse_values.float()
        else:
            delta.index_add_(0, self.sparse_indices, self.sparse_values.float())
        delta = delta.view_as(w)
        return delta.T if self.fan_in_fan_out else delta

    def tensor_merges(self, stored):
        if self.dense:
            return {"weight": ("modify", functools.partial(sparse_merge, values=stored("sparse_delta"), indices=None))}
        return {"weight": ("modify", functools.partial(sparse_merge, values=stored("sparse_values"),
                                                       indices=stored("sparse_indices").long()))}

    def merged_module(self) -> nn.Module:
        base = self.base_layer
        with torch.no_grad():
            if self.dense:
                base.weight.data = (base.weight.float() + self.sparse_values.float().view_as(base.weight)).to(base.weight.dtype)
            else:  # only the selected entries are touched: the others stay bit-identical
                self._synced = None
                self.sync()
        return base


def select_smallest(scores: dict[str, torch.Tensor], density: float, scope: str, largest: bool = False) -> dict[str, torch.Tensor]:
    """Sorted flat indices per tensor of the k entries with the smallest (largest) score; scores are >= 0.
    Global scope: one k over all entries, ties at the threshold to the earliest tensor and position. The
    threshold is found by bisection on the float bit patterns (monotonic for non-negative floats), one
    tensor at a time: no concatenation of every eligible entry (400 MB on SmolLM2)."""
    if scope == "per_tensor":
        return {name: _take(s.reshape(-1).float(), max(1, round(density * s.numel())), largest)
                for name, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    k = max(1, round(density * total))
    bits = {n: s.reshape(-1).float().view(torch.int32) for n, s in scores.items()}

    def count(b: int) -> int:  # entries on the selected side of b, b included
        return sum(int(((t >= b) if largest else (t <= b)).sum()) for t in bits.values())

    lo, hi = 0, 0x7F800000  # +0.0 .. +inf
    while lo < hi:  # smallest: the least b with count >= k; largest: the greatest such b
        mid = (lo + hi + (1 if largest else 0)) // 2
        if (count(mid) >= k) != largest:
            hi = mid if not largest else mid - 1
        else:
            lo = mid + 1 if not largest else mid
    out, left = {}, k - (count(lo + 1) if largest else count(lo - 1))  # ties still to take, in order
    for name, t in bits.items():
        strict = ((t > lo) if largest else (t < lo)).nonzero().view(-1)
        ties = (t == lo).nonzero().view(-1)[: max(left, 0)]
        left -= ties.numel()
        out[name] = torch.cat([strict, ties]).sort().values
    return out


def _take(flat: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Sorted positions of the k smallest (largest) values of one tensor; ties broken by position."""
    key = -flat if largest else flat
    kth = torch.kthvalue(key, k).values
    below = (key < kth).nonzero().view(-1)
    ties = (key == kth).nonzero().view(-1)[: k - below.numel()]
    return torch.cat([below, ties]).sort().values


class SparseMethod(Method):
    """The shared mechanism; subclasses choose the mask in `scores` (data-free) or `before_training`."""

    family = "partial"
    mergeable = True
    peft_type = None
    needs_data = False
    streams = True

    def __init__(self, options: SparseOptions):
        super().__init__(options)
        self.eligible: list[str] = []  # layers whose weight can be selected
        self.bias_paths: list[str] = []

    # ------------------------------------------------------------- which tensors
    def inject(self, model: nn.Module) -> None:
        o = self.opts
        self.eligible = resolve_targets(model, o.target_modules or "all-linear", o.exclude_modules, supported=is_linear)
        if o.target_modules is None:  # the blocks only: no pooler or other layers outside them
            self.eligible = [p for p in self.eligible if layer_index(p) is not None]
        if not o.train_head:
            self.eligible += [h for h in HEADS if is_linear(getattr(model, h, None) or nn.Identity())]
        if o.train_bias:
            self.bias_paths = [p for p in self.eligible if isinstance(getattr(model.get_submodule(p), "bias", None), nn.Parameter)]
        if not self._mask_later(model):
            self.install(model, self.scores(model))

    def _mask_later(self, model: nn.Module) -> bool:
        """The mask comes from the data (before_training) or, on a meta-device skeleton (the streaming
        merge's plan), from the stored indices (load_state_dict)."""
        return self.needs_data or next(model.parameters()).is_meta

    def apply(self, model: nn.Module, task: str = "causal-lm", also_save=()) -> nn.Module:
        if task == "seq-cls" and self.opts.train_head:
            # BERT-style models classify from a pretrained pooler over [CLS]: it belongs to the task head (the
            # paper's RoBERTa head has its own dense layer), so it is trained in full with the classifier
            also_save = [*also_save, *(n for n, m in model.named_modules() if n.endswith("pooler") and next(m.parameters(), None) is not None)]
        super().apply(model, task, also_save)
        if not self.opts.train_head:  # the head is in the mask: not also trained in full
            for name in [s for s in self.saved_modules if s in HEADS]:
                self.saved_modules.remove(name)
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(False)
        return model

    def check_trainable(self, model: nn.Module) -> None:
        if not self._mask_later(model):
            super().check_trainable(model)

    def on_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        # an optimizer may update the values in place without bumping their version counter (fused AdamW does
        # not): the next forward rewrites the selected entries regardless
        for w in self.wrappers(model).values():
            w._synced = None

    def scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def replaced_tensors(self, model: nn.Module) -> list[str]:
        return [f"{p}.bias" for p in self.bias_paths]  # train_bias

    def install(self, model: nn.Module, scores: dict[str, torch.Tensor] | None, largest: bool = False) -> None:
        """Wrap every eligible layer with its selected entries (scores None: dense delta)."""
        picks = select_smallest(scores, self.opts.density, self.opts.scope, largest) if scores is not None else {}
        # a layer with no selected entry (global scope) stays as it is, unless its bias is trained
        self.wrapped = [p for p in self.eligible if scores is None or picks[p].numel() or p in self.bias_paths]
        for path in self.wrapped:
            idx = None if scores is None else picks[path]
            replace_module(model, path, SparseDeltaLinear(model.get_submodule(path), idx))
        for path in self.bias_paths:
            model.get_submodule(path).base_layer.bias.requires_grad_(True)

    # ------------------------------------------------------------- storage
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for path, w in self.wrappers(model).items():
            if w.dense:
                sd[f"{PREFIX}{path}.sparse_delta"] = w.sparse_values.detach()
                continue
            small = w.base_layer.weight.numel() < 2**31
            sd[f"{PREFIX}{path}.sparse_indices"] = w.sparse_indices.to(torch.int32 if small else torch.int64)
            sd[f"{PREFIX}{path}.sparse_values"] = w.sparse_values.detach()
        for path in self.bias_paths:
            sd[f"{PREFIX}{path}.bias"] = model.get_submodule(path).base_layer.bias.detach()
        for path in self.saved_modules:
            for local, p in model.get_submodule(path).named_parameters():
                sd[f"{PREFIX}{path}.{local}"] = p.detach()
        return sd

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        """The stored indices define the mask (a reloaded adapter needs neither data nor the mask rule)."""
        self.wrapped = []
        for path in self.eligible:
            idx = sd.get(f"{PREFIX}{path}.sparse_indices")
            if idx is None and f"{PREFIX}{path}.sparse_delta" not in sd:
                continue  # no entry of this layer was selected
            module = model.get_submodule(path)
            base = module.base_layer if isinstance(module, SparseDeltaLinear) else module
            if isinstance(module, SparseDeltaLinear) and not module.dense:
                with torch.no_grad():  # the pretrained values back before another mask takes the layer
                    base.weight.view(-1)[module.sparse_indices] = module.sparse_base
            if idx is not None and idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < base.weight.numel()):
                raise UserError(f"adapter tensor {PREFIX}{path}.sparse_indices points outside the {tuple(base.weight.shape)} weight")
            replace_module(model, path, SparseDeltaLinear(base, None if idx is None else idx.long()))
            self.wrapped.append(path)
        if not self.wrapped:
            raise UserError(f"adapter tensors do not fit this model (no {self.name} entries for its layers); "
                            "is this adapter for this base model and method?")
        for path in self.bias_paths:
            model.get_submodule(path).base_layer.bias.requires_grad_(True)
        own = self.state_dict(model)
        with torch.no_grad():
            for key, target in own.items():
                if key.endswith(".sparse_indices"):
                    continue
                if key not in sd:
                    raise UserError(f"adapter tensors do not fit this model (missing {key}); is this adapter for this base model and method?")
                if tuple(sd[key].shape) != tuple(target.shape):
                    raise UserError(f"adapter tensor {key} has shape {tuple(sd[key].shape)}, the model expects {tuple(target.shape)}")
                target.copy_(sd[key].to(target.dtype))

    def merge(self, model: nn.Module) -> nn.Module:
        model = super().merge(model)
        self.bias_paths = []
        return model

    def describe(self, model: nn.Module) -> dict[str, Any]:
        wrappers = self.wrappers(model)
        selected = {p: w.sparse_values.numel() for p, w in wrappers.items()}
        layers = [model.get_submodule(p) for p in self.eligible]
        eligible = sum((m.base_layer if isinstance(m, SparseDeltaLinear) else m).weight.numel() for m in layers)
        d = {**super().describe(model), "selected_entries": sum(selected.values()), "eligible_entries": eligible,
             "density": sum(selected.values()) / max(eligible, 1), "selected_per_tensor": selected,
             "trained_biases": list(self.bias_paths)}
        if self.needs_data and not wrappers:  # a recipe: the mask is chosen from the data when training starts
            d["planned_entries"] = round(self.opts.density * eligible)
            d["mask"] = "chosen from the training data when training starts (not counted above)"
        return d

    def training_state(self, model: nn.Module) -> dict[str, Any]:
        return {"indices": {p: w.sparse_indices.cpu().clone() for p, w in self.wrappers(model).items()}}

    def load_training_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """The mask is recomputed on resume (deterministically); a different one would not continue the run."""
        for path, w in self.wrappers(model).items():
            saved = state.get("indices", {}).get(path)
            if saved is not None and not torch.equal(saved, w.sparse_indices.cpu()):
                raise UserError(f"--resume: the recomputed {self.name} mask of {path} differs from the checkpoint's "
                                "(data or model changed); pass --overwrite to start over")


# ----------------------------------------------------------------- the four mask rules
@register
class PaFi(SparseMethod):
    name = "pafi"
    summary = "train the k smallest-magnitude pretrained entries (task-agnostic mask, no data); merged in place"
    Options = PafiOptions

    def scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {p: model.get_submodule(p).weight.detach().abs() for p in self.eligible}


class FisherMask(SparseMethod):
    """Masks from the empirical Fisher of the training data, computed before training."""

    needs_data = True

    def fisher(self, model: nn.Module, trainer) -> dict[str, torch.Tensor]:
        """mean over num_samples examples of (d loss / d W)^2 for every eligible weight (dense, once)."""
        o = self.opts
        weights = {p: model.get_submodule(p).weight for p in self.eligible}
        flags = {p: w.requires_grad for p, w in weights.items()}
        fisher = {p: torch.zeros_like(w, dtype=torch.float32) for p, w in weights.items()}
        for w in weights.values():
            w.requires_grad_(True)
        rows = trainer.sample_rows(o.num_samples)
        was_training = model.training
        model.eval()  # no dropout: the Fisher of the model itself
        for a in range(0, len(rows), o.fisher_batch_size):
            loss, _ = trainer.loss_module(**trainer.collated(rows[a:a + o.fisher_batch_size]))
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for p, g in zip(weights, grads, strict=True):
                if g is not None:
                    fisher[p] += g.float().square()
        model.train(was_training)
        for p, w in weights.items():
            w.requires_grad_(flags[p])
        n = max(1, math.ceil(len(rows) / o.fisher_batch_size))
        return {p: f / n for p, f in fisher.items()}

    def before_training(self, model: nn.Module, trainer) -> None:
        self.install(model, self.fisher(model, trainer), largest=True)
        super().check_trainable(model)


@register
class Fish(FisherMask):
    name = "fish"
    summary = "train the k entries with the largest empirical Fisher on the task data (FISH mask)"
    Options = FishOptions


@register
class ChildTuning(FisherMask):
    name = "child_tuning"
    summary = "Child-Tuning: D = Fisher mask keeping reserve_p; F = per-step Bernoulli gradient mask (dense delta)"
    Options = ChildTuningOptions

    def before_training(self, model: nn.Module, trainer) -> None:
        if self.opts.mode == "d":
            return super().before_training(model, trainer)
        self.install(model, None)  # F: every eligible entry, its gradient masked before each update
        self.seed = trainer.tcfg.seed
        super().check_trainable(model)

    def before_optimizer_step(self, model: nn.Module, step: int) -> None:
        """F: keep each gradient entry with probability reserve_p, scaled by 1/reserve_p. The draw depends on
        (seed, step) only: the same on every process and after a resume."""
        if self.opts.mode != "f":
            return
        p = self.opts.reserve_p
        g = torch.Generator().manual_seed(getattr(self, "seed", 0) * 1_000_003 + step)
        for w in self.wrappers(model).values():
            if w.sparse_values.grad is not None:
                keep = torch.rand(w.sparse_values.shape, generator=g) < p
                w.sparse_values.grad.mul_(keep.to(w.sparse_values.grad.device) / p)


@register
class LtSft(SparseMethod):
    name = "lt_sft"
    summary = "LT-SFT: full fine-tuning phase, keep the entries that moved most, reset, sparse phase"
    Options = LtSftOptions
    needs_data = True

    def before_training(self, model: nn.Module, trainer) -> None:
        o = self.opts
        steps = o.full_steps or max(1, trainer.total_steps // 4)
        weights = {p: model.get_submodule(p).weight for p in self.eligible}
        extra = [p for p in model.parameters() if p.requires_grad]  # head, biases: trained in both phases
        start = {p: w.detach().clone() for p, w in weights.items()}
        start_extra = [p.detach().clone() for p in extra]
        for w in weights.values():
            w.requires_grad_(True)
        optimizer = torch.optim.AdamW([*weights.values(), *extra], lr=o.full_lr or trainer.tcfg.lr / 10,
                                      weight_decay=trainer.tcfg.weight_decay)
        trainer.dense_phase(optimizer, steps, label="phase 1/2: full fine-tuning")
        with torch.no_grad():
            moved = {p: (w - start[p]).abs() for p, w in weights.items()}
            for p, w in weights.items():  # reset: the sparse phase starts from the pretrained model
                w.copy_(start[p])
                w.requires_grad_(False)
            for p, s in zip(extra, start_extra, strict=True):
                p.copy_(s)
        del optimizer, start, start_extra
        self.install(model, moved, largest=True)
        super().check_trainable(model)
