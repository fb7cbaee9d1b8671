"""The memory-lean training pieces change no number: chunked linear cross-entropy, the recomputing
SwiGLU MLP, LoRA's fused in-place update, and the whole padding-free training step, gradients included."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import padded_lm_batch, tiny_model

from peftcli import kernels
from peftcli.loss import LossModel
from peftcli.methods import build_method


@pytest.mark.parametrize("weight_grad", [False, True])
def test_linear_cross_entropy_matches_reference(weight_grad):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=weight_grad)
    t = torch.randint(0, 300, (37,), generator=g)
    ref = F.cross_entropy((h @ w.T).float(), t)
    ours = kernels.linear_cross_entropy(h, w, t, chunk_bytes=4 * 300 * 5)  # 8 chunks, the last one short
    assert torch.allclose(ours, ref, atol=1e-6)
    inputs = (h, w) if weight_grad else (h,)
    for a, b in zip(torch.autograd.grad(2.5 * ref, inputs), torch.autograd.grad(2.5 * ours, inputs), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(kernels.linear_cross_entropy(h, w, t, chunk_bytes=4 * 300 * 5), ref, atol=1e-6)


def test_fused_swiglu_same_outputs_and_gradients():
    ref = tiny_model("llama").train()
    model = copy.deepcopy(ref)
    assert kernels.fuse_swiglu(model) == 2
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    a, b = ref(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss
    assert torch.allclose(a, b, atol=1e-6)
    a.backward()
    b.backward()
    for (n, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n


def test_lora_fused_update_equals_formula():
    model = tiny_model("llama")
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj"]})
    method.apply(model, "causal-lm")
    layer = model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = layer(x)
    ref = layer.base_layer(x) + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    params = (x, layer.lora_A.weight, layer.lora_B.weight)
    for a, b in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_training_step_gradients_equal_transformers(monkeypatch):
    """LossModel (padding-free, selective chunked head, fused SwiGLU, fused LoRA) vs the plain transformers
    loss on the padded batch: same loss, same LoRA gradients."""
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 4 * 30522 * 4)  # 4 rows per chunk
    ref = tiny_model("llama").train()
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"})
    method.apply(ref, "causal-lm")
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model = copy.deepcopy(ref)
    ids, mask, labels = padded_lm_batch()
    wrapped = LossModel(model, "causal-lm")
    assert wrapped.padding_free
    ours, _ = wrapped(ids, mask, labels)
    theirs = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5)
    ours.backward()
    theirs.backward()
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(ref.named_parameters(), model.parameters(), strict=True) if p.requires_grad]
    assert len(grads) == 2 * 7 * 2
    for n, a, b in grads:
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), n
