"""SAID and DID (Aghajanyan et al. 2020, "Intrinsic dimensionality explains the effectiveness of
language model fine-tuning"): fine-tune in a random d-dimensional subspace.

Only a vector theta_d (zeros) is trained. Every chosen tensor i becomes
`theta_i = theta0_i + lambda_i * P_i(theta_d)` where P_i is a Fastfood transform with its own random
draw (seeded from `seed` and i): pad theta_d to L_i, multiply by B_i (+-1 diagonal), Walsh-Hadamard
transform H, permute (Pi_i), multiply by G_i (N(0,1) diagonal), H again, keep the first numel_i
entries, divide by `sqrt(L_i * sum(G_i^2)) * sqrt(numel_i / L_i)`, reshape. theta0 stays frozen.
- DID: lambda_i = 1 fixed; theta_d has d entries.
- SAID: one learned scalar lambda_i per tensor (init 1), counted in the budget: theta_d has d - n entries.
Our choices: L_i = 2^ceil(log2(max(numel_i, |theta_d|))): when theta_d is longer than a tensor, the
Fastfood block grows to cover all of theta_d (every entry reaches every tensor; nothing is truncated)
and its first numel_i outputs are kept. Default tensors: the weights and biases of the linear layers
inside the transformer blocks; norms and embeddings are options (tied embeddings are refused, since
their other user would keep theta0). The WHT is a butterfly over log2(L) vectorised stages; its
backward is itself (H is symmetric), so autograd stores nothing for it.

Mechanics: torch parametrizations make each tensor a function of theta_d; forward hooks compute all
projections once per forward (tensors of the same L in one batched transform) and drop them after it
(without autograd, e.g. evaluation, they are kept until theta_d or lambda change).
The hooks sit on every module from the model down to the targets' common ancestor, so whichever of them
the caller enters (the model, or its backbone `model.base_model` as the causal-LM loss does) fills the
cache; a depth count keeps the nested ones from filling it again.
Storage (peftcli-only, peft_type None): `<name>.theta_d`, `said.lambda` and `<name>.seed` only
(kilobytes); loading regenerates the projections from the seed. Merge folds theta_i into the
weights and removes the parametrizations: plain base modules remain.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from peftcli.errors import UserError
from peftcli.methods import register
from peftcli.methods.base import Method, MethodOptions, values_device
from peftcli.methods.targets import is_linear, layer_index, output_head_names

_BLOCK = 64  # the lowest log2(64) butterfly stages run as one dense 64x64 GEMM (faster than 6 passes)
_HADAMARD: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, device)
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=dtype, device=device)
        while h.shape[0] < n:  # Sylvester: H_2n = [[H, H], [H, -H]]
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = h
    return _HADAMARD[key]


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dim (a power of 2), O(L log L):
    H_L = H_{L/k} (x) H_k, so the k-block is one GEMM and the rest are log2(L/k) butterfly stages."""
    length = x.shape[-1]
    if length & (length - 1):
        raise ValueError(f"WHT length {length} is not a power of 2")
    k = min(length, _BLOCK)
    src = (x.reshape(-1, k) @ _hadamard(k, x.dtype, x.device)).view(-1, length)
    bufs = [torch.empty_like(src), src]
    h, i = k, 0
    while h < length:
        a = src.view(-1, length // (2 * h), 2, h)
        dst = bufs[i % 2]
        d = dst.view(-1, length // (2 * h), 2, h)
        torch.add(a[:, :, 0], a[:, :, 1], out=d[:, :, 0])
        torch.sub(a[:, :, 0], a[:, :, 1], out=d[:, :, 1])
        src, h, i = dst, h * 2, i + 1
    return src.view(x.shape)


class _WHT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _fwht(x)

    @staticmethod
    def backward(ctx, grad):
        return _fwht(grad)  # H is symmetric


def fwht(x: torch.Tensor) -> torch.Tensor:
    return _WHT.apply(x)


def _draw(seed: int, index: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B (+-1), Pi (a permutation) and G (N(0,1)) of tensor `index`: the same for the same seed."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    b = torch.randint(0, 2, (length,), generator=g, dtype=torch.int8) * 2 - 1
    perm = torch.randperm(length, generator=g)
    gauss = torch.randn(length, generator=g)
    return b, perm, gauss


class _Projector(nn.Module):
    """Holds theta_d (and lambda) and the Fastfood draws; attached to the model as `said` / `did`."""

    def __init__(self, shapes: list[torch.Size], d_theta: int, seed: int, learn_lambda: bool, device):
        super().__init__()
        self.theta_d = nn.Parameter(torch.zeros(d_theta, device=device))
        if learn_lambda:
            self.register_parameter("lambda", nn.Parameter(torch.ones(len(shapes), device=values_device(device))))
        self.shapes = shapes
        self.numels = [math.prod(s) for s in shapes]
        self.lengths = [1 << max(0, math.ceil(math.log2(max(n, d_theta)))) for n in self.numels]
        # tensors of the same L are transformed together: group -> rows (tensor indices)
        self.groups: dict[int, list[int]] = {}
        for i, length in enumerate(self.lengths):
            self.groups.setdefault(length, []).append(i)
        self.where: dict[int, tuple[int, int]] = {}  # tensor -> (L, row)
        # B v is zero beyond M = 2^ceil(log2 |theta_d|) <= L, and H_L = H_{L/M} (x) H_M, so H_L (B v) is
        # H_M (B v)[:M] tiled L/M times (exact): the first transform costs O(M log M), and the
        # permutation reads entry Pi(j) mod M of that small transform.
        self.small = 1 << max(0, math.ceil(math.log2(d_theta)))
        for length, rows in self.groups.items():
            bs, idx, gs = [], [], []
            for row, i in enumerate(rows):
                b, perm, gauss = _draw(seed, i, length)
                bs.append(b[: self.small]), idx.append(perm % self.small + row * self.small), gs.append(gauss)
                self.where[i] = (length, row)
            gs = torch.stack(gs)
            numel = torch.tensor([self.numels[i] for i in rows], dtype=torch.float32)
            norm = torch.sqrt(length * gs.pow(2).sum(1)) * torch.sqrt(numel / length)
            # non-persistent: regenerated from the seed, never in the model's state_dict
            self.register_buffer(f"B_{length}", torch.stack(bs).to(device), persistent=False)
            self.register_buffer(f"P_{length}", torch.cat(idx).to(torch.int32).to(device), persistent=False)
            self.register_buffer(f"G_{length}", gs.to(device), persistent=False)
            self.register_buffer(f"N_{length}", norm.to(device), persistent=False)
        self._cache: list[torch.Tensor] | None = None
        self._kept: tuple[tuple, list[torch.Tensor]] | None = None  # no-grad projections, by theta_d/lambda version
        self._depth = 0  # nested hooked modules entered: the outermost fills and clears the cache

    def _scale(self) -> torch.Tensor | None:
        return getattr(self, "lambda", None)

    def _project_group(self, length: int) -> dict[int, torch.Tensor]:
        rows = self.groups[length]
        v = F.pad(self.theta_d, (0, self.small - self.theta_d.numel()))
        h = fwht(getattr(self, f"B_{length}") * v)  # (rows, M): H_L (B v) is h tiled
        x = h.reshape(-1).index_select(0, getattr(self, f"P_{length}")).view(len(rows), length)
        x = fwht(x * getattr(self, f"G_{length}"))
        coef = 1.0 / getattr(self, f"N_{length}")
        lam = self._scale()
        if lam is not None:
            coef = coef * lam[rows]
        # unbind, not x[row]: each indexing backward would allocate the whole (rows, L) gradient
        return {i: (xr[: self.numels[i]] * coef[row]).view(self.shapes[i]) for row, (i, xr) in enumerate(zip(rows, x.unbind(0), strict=True))}

    def project_all(self) -> list[torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for length in self.groups:
            out.update(self._project_group(length))
        return [out[i] for i in range(len(self.shapes))]

    def _version(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in (self.theta_d, self._scale()) if t is not None)

    def fill(self, *_args) -> None:
        if torch.is_grad_enabled():
            self._kept = None
            self._cache = self.project_all()
            return
        # inference (no graph to keep): the projections stay valid until theta_d or lambda change, so
        # evaluation and generation project once, not once per forward
        if self._kept is None or self._kept[0] != self._version():
            self._kept = (self._version(), self.project_all())
        self._cache = self._kept[1]

    def clear(self, *_args) -> None:
        self._cache = None

    def enter(self, *_args) -> None:
        self._depth += 1  # first: the exit hook runs (always_call) even if the projection raises
        if self._depth == 1:
            self.fill()

    def exit(self, *_args) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self.clear()

    def delta(self, i: int) -> torch.Tensor:
        if self._cache is None:  # a tensor read outside a model forward: compute its group only
            return self._project_group(self.where[i][0])[i]
        return self._cache[i]


def _entry_modules(model: nn.Module, paths: list[str]) -> list[nn.Module]:
    """The model and each module on the way down to the deepest one holding every target (for a Llama:
    the model, `model`, `model.layers`): the modules a forward over all targets can start from."""
    common = paths[0].split(".")
    for path in paths[1:]:
        parts = path.split(".")
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return [model] + [model.get_submodule(".".join(common[:k])) for k in range(1, len(common) + 1)]


class _Reparam(nn.Module):
    """theta_i = theta0_i + lambda_i P_i(theta_d), as a torch parametrization of tensor i."""

    def __init__(self, projector: _Projector, index: int):
        super().__init__()
        object.__setattr__(self, "projector", projector)  # not a submodule: theta_d is stored once
        self.index = index

    def forward(self, theta0: torch.Tensor) -> torch.Tensor:
        return theta0 + self.projector.delta(self.index).to(theta0.dtype)


class SaidOptions(MethodOptions):
    name: Literal["said"] = "said"
    d: int = Field(1000, ge=1, description="intrinsic dimension: the number of trained values (SAID: lambdas included)")
    seed: int = Field(0, ge=0, description="seed of the random projections (stored with the adapter)")
    include_norms: bool = Field(False, description="also project the LayerNorm/RMSNorm tensors of the blocks")
    include_embeddings: bool = Field(False, description="also project the embedding tables")


class DidOptions(SaidOptions):
    name: Literal["did"] = "did"


@register
class SAID(Method):
    name = "said"
    family = "reparameterized"
    peft_type = None
    summary = "train a d-dim vector theta_d; every tensor moves by lambda_i * Fastfood_i(theta_d) (structure-aware)"
    Options = SaidOptions
    learn_lambda = True

    def __init__(self, options: SaidOptions):
        super().__init__(options)
        self.targets: list[tuple[str, str]] = []  # (module path, parameter name)
        self._hooks: list = []

    def _choose(self, model: nn.Module) -> list[tuple[str, str]]:
        o = self.opts
        heads = output_head_names(model)
        chosen = []
        for path, mod in model.named_modules():
            if path in heads or path.rsplit(".", 1)[-1] in heads:
                continue
            in_block = layer_index(path) is not None
            if isinstance(mod, nn.Embedding):
                take = o.include_embeddings
            elif is_linear(mod):
                take = in_block
            elif "norm" in type(mod).__name__.lower():
                take = in_block and o.include_norms
            else:
                take = False
            if take:
                chosen += [(path, n) for n, p in mod.named_parameters(recurse=False) if p is not None]
        if not chosen:
            raise UserError(f"{self.name}: no tensors to project in this model (no linear layers inside numbered blocks)")
        counts: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        shared = [f"{m}.{n}" for m, n in chosen if counts[id(getattr(model.get_submodule(m), n))] > 1]
        if shared:
            raise UserError(f"{self.name}: {shared[0]} is tied to another module (tied embeddings); "
                            "set method.include_embeddings: false")
        return chosen

    def inject(self, model: nn.Module) -> None:
        o = self.opts
        self.targets = self._choose(model)
        n = len(self.targets)
        d_theta = o.d - n if self.learn_lambda else o.d
        if d_theta < 1:
            raise UserError(f"{self.name}: d={o.d} leaves no room for theta_d: the {n} projected tensors take one "
                            f"lambda each from the budget; use d > {n}")
        params = [getattr(model.get_submodule(m), p) for m, p in self.targets]
        projector = _Projector([p.shape for p in params], d_theta, o.seed, self.learn_lambda, params[0].device)
        model.add_module(self.name, projector)
        for i, (path, pname) in enumerate(self.targets):
            # unsafe: skip the registration-time shape check, which would run a projection per tensor
            parametrize.register_parametrization(model.get_submodule(path), pname, _Reparam(projector, i), unsafe=True)
        self._hooks = []
        for entry in _entry_modules(model, [path for path, _ in self.targets]):
            self._hooks += [entry.register_forward_pre_hook(projector.enter),
                            entry.register_forward_hook(projector.exit, always_call=True)]

    def projector(self, model: nn.Module) -> _Projector:
        return model.get_submodule(self.name)

    # ------------------------------------------------------------- storage
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = super().state_dict(model)  # modules_to_save (the task head)
        proj = self.projector(model)
        sd[f"{self.name}.theta_d"] = proj.theta_d.detach()
        if self.learn_lambda:
            sd[f"{self.name}.lambda"] = getattr(proj, "lambda").detach()
        sd[f"{self.name}.seed"] = torch.tensor([self.opts.seed], dtype=torch.int64)
        return sd

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        seed = sd.get(f"{self.name}.seed")
        if seed is not None and int(seed.view(-1)[0]) != self.opts.seed:
            raise UserError(f"{self.name}: the adapter was trained with seed {int(seed.view(-1)[0])}, the method has "
                            f"seed {self.opts.seed}: its projections would differ")
        super().load_state_dict(model, sd)  # theta_d and lambda are views: copied in place

    def merge(self, model: nn.Module) -> nn.Module:
        proj = self.projector(model)
        with torch.no_grad():
            proj.fill()
            for path, pname in self.targets:
                parametrize.remove_parametrizations(model.get_submodule(path), pname, leave_parametrized=True)
            proj.clear()
        for h in self._hooks:
            h.remove()
        delattr(model, self.name)
        self.targets, self._hooks = [], []
        return model

    # ------------------------------------------------------------- description
    def describe(self, model: nn.Module) -> dict[str, Any]:
        d = super().describe(model)
        proj = self.projector(model) if self.targets else None
        d.update({
            "d": self.opts.d, "seed": self.opts.seed, "projected_tensors": len(self.targets),
            "theta_d_size": proj.theta_d.numel() if proj is not None else None,
            "projected_params": sum(proj.numels) if proj is not None else None,
            "targets": [f"{m}.{p}" for m, p in self.targets],
        })
        if proj is not None and self.learn_lambda:
            lam = getattr(proj, "lambda").detach()
            d["lambda_range"] = [float(lam.min()), float(lam.max())]
        return d


@register
class DID(SAID):
    name = "did"
    summary = "train a d-dim vector theta_d; every tensor moves by Fastfood_i(theta_d) (direct intrinsic dimension)"
    Options = DidOptions
    learn_lambda = False
