"""SAID / DID specifics: the fast Walsh-Hadamard transform and the Fastfood projection against dense
references, the budget (lambdas counted in d), kilobyte storage, and the errors (d too small, another seed,
tied embeddings). (Init, counts, round trip, merge, training: test_contract.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make

from peftcli.errors import UserError
from peftcli.methods import build_method
from peftcli.methods.said import _draw, _hadamard, _Projector, fwht


def test_fast_wht_equals_dense_hadamard_product():
    for n in (1, 2, 8, 64, 256, 1024):
        x = torch.randn(3, n, dtype=torch.float64)
        torch.testing.assert_close(fwht(x), x @ _hadamard(n, torch.float64, torch.device("cpu")))
    x = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fwht, (x,))


def _fastfood_reference(theta, seed, index, numel):
    """The formula, step by step with dense matrices (slow, small sizes only)."""
    d = theta.numel()
    length = 1 << math.ceil(math.log2(max(numel, d)))
    b, perm, g = _draw(seed, index, length)
    hm = _hadamard(length, torch.float64, torch.device("cpu"))
    x = torch.nn.functional.pad(theta.double(), (0, length - d)) * b
    x = hm @ ((hm @ x)[perm] * g.double())
    return x[:numel] / (math.sqrt(length * float(g.double().pow(2).sum())) * math.sqrt(numel / length))


def test_fastfood_projection_matches_formula_and_is_deterministic():
    shapes = [torch.Size([3, 5]), torch.Size([40]), torch.Size([7, 30]), torch.Size([2])]  # last: numel < d
    proj = _Projector(shapes, 20, 7, True, "cpu")
    lam = torch.tensor([1.0, 2.0, 0.5, 3.0])
    with torch.no_grad():
        proj.theta_d.normal_()
        getattr(proj, "lambda").copy_(lam)
    out = [t.detach() for t in proj.project_all()]
    for i, shape in enumerate(shapes):
        ref = _fastfood_reference(proj.theta_d.detach(), 7, i, shape.numel()) * lam[i]
        torch.testing.assert_close(out[i].reshape(-1).double(), ref, atol=1e-5, rtol=1e-5)
    # same seed: same projections; another seed: different ones
    again = _Projector(shapes, 20, 7, True, "cpu")
    other = _Projector(shapes, 20, 8, True, "cpu")
    for p in (again, other):
        with torch.no_grad():
            p.theta_d.copy_(proj.theta_d)
            getattr(p, "lambda").copy_(lam)
    assert all(torch.equal(a, b.detach()) for a, b in zip(out, again.project_all(), strict=True))
    assert not torch.allclose(out[2], other.project_all()[2].detach())


def test_said_budget_storage_and_errors():
    model = make("bert")
    method = build_method({"name": "said", "d": 300})
    method.apply(model, "seq-cls")
    n = len(method.targets)
    assert n == 2 * 6 * 2  # per layer: q, k, v, attention.output, intermediate, output: weight + bias
    sd = {k: v for k, v in method.state_dict(model).items() if "classifier" not in k}
    assert sd["said.theta_d"].numel() == 300 - n and sd["said.lambda"].numel() == n
    assert sum(v.numel() * v.element_size() for v in sd.values()) == 300 * 4 + 8  # d floats + the seed
    assert method.describe(model)["projected_tensors"] == n
    with pytest.raises(UserError, match="use d >"):
        build_method({"name": "said", "d": n}).apply(make("bert"), "seq-cls")
    wrong = build_method({"name": "said", "d": 300, "seed": 5})
    fresh = make("bert")
    wrong.apply(fresh, "seq-cls")
    with pytest.raises(UserError, match="seed 0, the method has seed 5"):
        wrong.load_state_dict(fresh, method.state_dict(model))
    with pytest.raises(UserError, match="tied"):
        build_method({"name": "did", "d": 300, "include_embeddings": True}).apply(make("gpt2"))
