"""HiWi specifics: each form against the formula written out here (forward and merged module), the whole
model's merge against that formula, bias-form storage, default targets, and continued training from a stored
bias. (Init, counts, round trip, merged == unmerged logits, training: test_contract.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits, make, perturb, toy_trainer
from pydantic import ValidationError

from peftcli.errors import UserError
from peftcli.methods import build_method

R = 4


def applied(arch, **opts):
    base = make(arch)
    model = copy.deepcopy(base)
    method = build_method({"name": "hiwi", "r": R, **opts})
    method.apply(model, "seq-cls" if arch == "bert" else "causal-lm")
    return base, model, method


def formula(base_layer, form, down, up, act=torch.tanh):
    """(W', b') in the paper's notation h = x W + b, W (in, out), from the adapter's W_down and W_up."""
    lin = isinstance(base_layer, torch.nn.Linear)
    W = base_layer.weight.detach().T if lin else base_layer.weight.detach()  # (in, out)
    b = base_layer.bias.detach() if base_layer.bias is not None else None
    if form == "bias":
        return W, b + act(b @ down) @ up
    if form == "weight":
        M = W if b is None else torch.cat([W, b[None]])  # the bias is one more row: tokens of the output size
        M2 = M + act(M @ down) @ up
        return (M2, None) if b is None else (M2[:-1], M2[-1])
    Wt = W.T  # torch's (out, in) rows: tokens of the input size
    return (Wt + act(Wt @ down) @ up).T, b


def randomize(w, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w.hiwi_down.copy_(torch.randn(w.hiwi_down.shape, generator=g) * 0.3)
        w.hiwi_up.copy_(torch.randn(w.hiwi_up.shape, generator=g) * 0.3)


def in_out(module):
    """(W (in, out), b) of a Linear or Conv1D."""
    w = module.weight.detach()
    return (w.T if isinstance(module, torch.nn.Linear) else w), module.bias


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("form", ["bias", "weight", "weight_in"])
def test_hiwi_forms_match_the_hand_written_formula(arch, form):
    """Each form against the formula written out here, in the forward pass and in the merged module, with a
    trained-like adapter (not the module's own new_weight)."""
    _, model, method = applied(arch, form=form, activation="tanh")
    path, w = next(iter(method.wrappers(model).items()))
    randomize(w)
    W2, b2 = formula(w.base_layer, form, w.hiwi_down.detach(), w.hiwi_up.detach())
    x = torch.randn(3, W2.shape[0], generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(w(x), x @ W2 + b2, atol=1e-5)
        merged = w.merged_module()
    got_w, got_b = in_out(merged)
    assert torch.allclose(got_w, W2, atol=1e-6) and torch.allclose(got_b, b2, atol=1e-6)
    assert w.hiwi_down.shape[0] == (W2.shape[0] if form == "weight_in" else W2.shape[1])


@pytest.mark.parametrize("arch,form", [("llama", "weight"), ("gpt2", "bias"), ("bert", "weight_in")])
def test_merged_model_holds_the_formula_weights(arch, form):
    """The whole model's merge writes, in every target, the weights the formula gives for the trained adapter
    (merged == unmerged logits alone would not catch a wrong formula used by both forward and merge)."""
    base, model, method = applied(arch, form=form, activation="tanh")
    perturb(model, scale=0.3)
    want = {p: formula(base.get_submodule(p), form, w.hiwi_down.detach(), w.hiwi_up.detach())
            for p, w in method.wrappers(model).items()}
    merged = method.merge(model)
    for p, (W2, b2) in want.items():
        got_w, got_b = in_out(merged.get_submodule(p))
        torch.testing.assert_close(got_w, W2, atol=1e-6, rtol=0)
        if b2 is not None:
            torch.testing.assert_close(got_b.detach(), b2, atol=1e-6, rtol=0)
        assert not torch.allclose(got_w, in_out(base.get_submodule(p))[0]) or form == "bias"  # the weights moved


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_hiwi_bias_storage_is_the_new_biases_only_independent_of_r(arch):
    sizes = []
    for r in (4, 16):
        _, model, method = applied(arch, r=r)
        perturb(model)
        sd = {k: v for k, v in method.state_dict(model).items() if "classifier" not in k}
        assert sd and all(k.endswith(".bias") for k in sd)
        expected = sum(method.wrappers(model)[p].base_layer.bias.numel() for p in method.wrapped) * 4
        sizes.append(sum(v.numel() * v.element_size() for v in sd.values()))
        assert sizes[-1] == expected
    assert sizes[0] == sizes[1]


def test_hiwi_default_targets_are_the_ffn_and_bias_form_needs_biases():
    _, _, method = applied("bert")
    assert method.wrapped == [f"bert.encoder.layer.{i}.{m}.dense" for i in range(2) for m in ("intermediate", "output")]
    _, _, method = applied("llama")
    assert method.form == "weight" and all(p.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") for p in method.wrapped)
    assert len(method.wrapped) == 6
    with pytest.raises(UserError, match="form: bias needs biases"):
        build_method({"name": "hiwi", "form": "bias"}).apply(make("llama"))
    with pytest.raises(ValidationError, match="activation"):
        build_method({"name": "hiwi", "activation": "swish"})


def test_hiwi_reloaded_bias_adapter_continues_from_the_stored_bias():
    base, model, method = applied("gpt2")
    perturb(model)
    sd = method.state_dict(model)
    fresh = copy.deepcopy(base)
    method2 = build_method({"name": "hiwi", "r": R})
    method2.apply(fresh)
    method2.load_state_dict(fresh, sd)
    assert torch.equal(logits(fresh), logits(model))  # b' reproduced exactly
    trainer = toy_trainer(fresh, method2, "gpt2", steps=5, lr=5e-2)
    losses = [trainer.train_step(step)["loss"] for step in range(5)]  # still trainable, starting from b'
    assert losses[0] == pytest.approx(toy_trainer(model, method, "gpt2", steps=1, lr=5e-2).train_step(0)["loss"], abs=1e-5)
    assert losses[-1] < losses[0] - 1e-2
