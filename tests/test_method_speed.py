"""Speed mechanisms of the slower methods, asserted as counts and exact values (never timings):
SAID/DID compute each Fastfood group once per forward on every entry point, DoRA's cheaper norm is
the same function and gradient."""

from __future__ import annotations

import pytest
import torch

from peftcli.loss import LossModel
from peftcli.methods import build_method
from peftcli.methods.said import _Projector
from peftcli.train import Trainer
from tests.conftest import tiny_model

ROWS = [{"input_ids": ids, "labels": ids} for ids in ([5, 9, 11, 7, 5, 9, 13], [8, 6, 4, 2, 8], [3, 3, 5, 5, 7, 7, 9, 9])]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _count_projections(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = _Projector._project_group

    def counted(self, length):
        calls.append(length)
        return original(self, length)

    monkeypatch.setattr(_Projector, "_project_group", counted)
    return calls


@pytest.mark.parametrize("name", ["said", "did"])
@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_said_projects_each_group_once_per_forward_through_the_train_path(monkeypatch, name, task):
    model = tiny_model("llama", task)
    method = build_method({"name": name, "d": 300})
    method.apply(model, task)
    rows = ROWS if task == "causal-lm" else [{"input_ids": r["input_ids"], "labels": i % 2} for i, r in enumerate(ROWS)]
    # two micro-batches per optimizer step: two forwards
    trainer = Trainer.for_model(model, method, rows, task=task, max_steps=2, batch_size=2, grad_accum=2, lr=1e-2,
                                warmup_steps=0)
    groups = sorted(method.projector(model).groups)
    assert len(groups) >= 2  # the tiny Llama has tensors of several Fastfood lengths
    if task == "causal-lm":
        assert trainer.loss_module.selective  # the path that calls model.base_model, not the hooked model
    calls = _count_projections(monkeypatch)
    for step in range(2):
        calls.clear()
        trainer.train_step(step)
        assert sorted(calls) == sorted(groups * 2), f"step {step}: {len(calls)} projections for {len(groups)} groups x 2 forwards"
    # the cache lives for one forward only: nothing is held between forwards
    assert method.projector(model)._cache is None


@pytest.mark.parametrize("name", ["said", "did"])
def test_said_cached_gradients_equal_the_uncached_computation(monkeypatch, name):
    model = tiny_model("llama")
    method = build_method({"name": name, "d": 300})
    method.apply(model)
    proj = method.projector(model)
    with torch.no_grad():
        proj.theta_d.normal_(0, 0.05)
    loss_model = LossModel(model, "causal-lm").train()
    ids = torch.tensor([r["input_ids"][:5] for r in ROWS])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def grads():
        model.zero_grad(set_to_none=True)
        loss, _ = loss_model(**batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    cached_loss, cached = grads()
    calls = _count_projections(monkeypatch)
    monkeypatch.setattr(_Projector, "fill", lambda self, *a: None)  # every weight read projects its own group
    plain_loss, plain = grads()
    assert len(calls) > len(proj.groups)  # the uncached run really recomputed per read
    torch.testing.assert_close(cached_loss, plain_loss, rtol=0, atol=1e-6)
    assert cached.keys() == plain.keys() and cached
    for k in cached:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-5, atol=1e-7)


def test_dora_fast_forward_equals_the_paper_formula_and_tracks_w():
    from torch import nn

    from peftcli.methods.dora import DoraLinear

    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    layer = DoraLinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(40) + 0.5)
    x = torch.randn(3, 5, 24, requires_grad=True)
    trained = [layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector]

    def reference():
        a, b, m, s = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.scaling
        norm = torch.linalg.norm(base.weight + s * (b @ a), dim=1).detach()  # the paper's detached norm
        return (m / norm) * (x @ base.weight.T + s * (x @ a.T) @ b.T) + base.bias

    for _ in range(2):  # the second time with W changed in place: the cached ||W||^2 must follow
        y, ref = layer(x), reference()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *trained], g)
        want = torch.autograd.grad(ref, [x, *trained], g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            base.weight.mul_(1.5)


def test_adalora_in_place_update_equals_the_formula():
    from torch import nn

    from peftcli.methods.adalora import SVDLinear

    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(24, 40), r=6, alpha=8.0)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(2, 7, 24, requires_grad=True)
    trained = [x, layer.lora_A, layer.lora_E, layer.lora_B]
    y = layer(x)
    ref = layer.base_layer(x) + (x @ (layer.lora_A * layer.lora_E).T) @ layer.lora_B.T * (layer.scaling / (layer.ranknum + 1e-5))
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, trained, g), torch.autograd.grad(ref, trained, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_said_inference_projects_once_until_theta_changes(monkeypatch):
    model = tiny_model("llama")
    method = build_method({"name": "said", "d": 300})
    method.apply(model)
    proj = method.projector(model)
    ids = torch.tensor([ROWS[0]["input_ids"]])
    calls = _count_projections(monkeypatch)
    with torch.no_grad():
        first = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        assert len(calls) == len(proj.groups) and torch.equal(first, again)  # the second forward projected nothing
        proj.theta_d.add_(0.05)  # an optimizer step or a load: in place, so its version moves
        moved = model(input_ids=ids).logits
    assert len(calls) == 2 * len(proj.groups)
    monkeypatch.setattr(_Projector, "fill", lambda self, *a: None)  # the uncached computation
    with torch.no_grad():
        torch.testing.assert_close(moved, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert not torch.allclose(moved, first)
