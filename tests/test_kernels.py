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


@pytest.mark.parametrize("vocab_block", [None, 64], ids=["one-product", "vocab-blocks"])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_linear_cross_entropy_matches_reference(weight_grad, vocab_block, monkeypatch):
    if vocab_block:  # 300 head rows in 5 blocks of 64, the last one short
        monkeypatch.setattr(kernels, "VOCAB_BLOCK", vocab_block)
        calls = []
        real_mm = torch.mm
        monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(a[1].shape[1]) or real_mm(*a, **k))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=weight_grad)
    t = torch.randint(0, 300, (37,), generator=g)
    ref = F.cross_entropy((h @ w.T).float(), t)
    ours = kernels.linear_cross_entropy(h, w, t, chunk_bytes=4 * 300 * 5)  # 8 chunks, the last one short
    assert torch.allclose(ours, ref, atol=1e-6)
    if vocab_block:  # the logits were projected block by block
        assert 64 in calls and 300 - 4 * 64 in calls and 300 not in calls
    inputs = (h, w) if weight_grad else (h,)
    for a, b in zip(torch.autograd.grad(2.5 * ref, inputs), torch.autograd.grad(2.5 * ours, inputs), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(kernels.linear_cross_entropy(h, w, t, chunk_bytes=4 * 300 * 5), ref, atol=1e-6)


def test_linear_cross_entropy_target_far_below_the_best():
    """A target whose probability underflows fp32 (logit 200 nats below the best) still gets its exact loss."""
    h = torch.eye(3, requires_grad=True)
    w = torch.zeros(5, 3)
    w[0, 0] = w[1, 1] = 200.0
    t = torch.tensor([4, 4, 2])
    ref = F.cross_entropy((h @ w.T).float(), t)
    ours = kernels.linear_cross_entropy(h, w, t)
    assert torch.isfinite(ours) and torch.allclose(ours, ref, rtol=1e-6)
    (ga,), (gb,) = torch.autograd.grad(ref, (h,)), torch.autograd.grad(ours, (h,))
    assert torch.allclose(ga, gb, atol=1e-6)


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


TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # bf16: 8 mantissa bits, a few roundings per value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(24, eps=1e-5).to(dtype)
    torch.nn.init.normal_(ref.weight, 1.0, 0.3)
    ours = copy.deepcopy(ref)
    assert kernels.fuse_rmsnorm(torch.nn.Sequential(ours)) == 1
    x = (3 * torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(0))).to(dtype).requires_grad_()
    a, b = ref(x), ours(x)
    assert a.dtype == b.dtype == dtype and torch.equal(a, b)  # the same operations forward: bit-identical
    g = torch.randn_like(a)
    (ga, gwa), (gb, gwb) = torch.autograd.grad(a, (x, ref.weight), g), torch.autograd.grad(b, (x, ours.weight), g)
    assert gb.dtype == dtype and gwb.dtype == dtype
    assert torch.allclose(ga.float(), gb.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.allclose(gwa.float(), gwb.float(), atol=TOL[dtype] * 10, rtol=TOL[dtype])


def test_fused_rmsnorm_under_autocast_rounds_once_for_its_consumers():
    """Under autocast the fused norm hands its linear consumers the bf16 values autocast would cast them to."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(24, eps=1e-5)
    torch.nn.init.normal_(ref.weight, 1.0, 0.3)
    ours = copy.deepcopy(ref)
    kernels.fuse_rmsnorm(torch.nn.Sequential(ours))
    x = (3 * torch.randn(5, 24, generator=torch.Generator().manual_seed(0))).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x), ours(x)
    assert a.dtype == torch.float32 and b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b)
    g = torch.randn(5, 24).to(torch.bfloat16)
    (ga,), (gb,) = torch.autograd.grad(a, (x,), g.float()), torch.autograd.grad(b, (x,), g)
    assert gb.dtype == torch.float32 and torch.allclose(ga, gb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import rotate_half

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 9, 16, generator=gen).to(dtype).requires_grad_()
    ang = torch.randn(2, 9, 16, generator=gen)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    ref = tuple(t * cos[:, None] + rotate_half(t) * sin[:, None] for t in (q, k))  # transformers' formula
    ours = kernels.apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(ref, ours, strict=True):
        assert b.dtype == dtype and torch.allclose(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    da = torch.autograd.grad(ref, (q, k), (gq, gk))
    db = torch.autograd.grad(ours, (q, k), (gq, gk))
    for a, b in zip(da, db, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])
    with torch.no_grad():  # inference takes the same formula without the autograd node
        assert torch.allclose(kernels.apply_rotary_pos_emb(q, k, cos, sin)[0].float(), ref[0].float(), atol=TOL[dtype])


def test_fuse_kernels_reaches_the_model():
    """fuse_kernels rewires every RMSNorm and MLP of a Llama and the RoPE function its attention calls."""
    import transformers.models.llama.modeling_llama as modeling

    model = tiny_model("llama")
    model.requires_grad_(False)
    done = kernels.fuse_kernels(model)
    assert done == {"swiglu": 2, "rmsnorm": 2 * 2 + 1, "rope": True, "autocast_weights": 2 * 7 + 1}
    assert modeling.apply_rotary_pos_emb is kernels.apply_rotary_pos_emb


def _lora_layer(dtype):
    model = tiny_model("llama").to(dtype)
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj"]})
    method.apply(model, "causal-lm")
    layer = model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B.weight)
    return layer


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_bf16_path_matches_fp32(autocast):
    """bf16 base (or autocast on an fp32 one): the low-rank products run in bf16 on bf16 copies of the fp32
    A and B, whose gradients stay fp32 and agree with the fp32 computation within bf16 rounding."""
    ref = _lora_layer(torch.float32)
    layer = copy.deepcopy(ref) if autocast else _lora_layer(torch.bfloat16)
    if not autocast:
        layer.load_state_dict(ref.state_dict())
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x if autocast else x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    expect = ref(x)
    assert torch.allclose(out.float(), expect, atol=0.05, rtol=0.02)
    grads = torch.autograd.grad(out.float().square().sum(), (layer.lora_A.weight, layer.lora_B.weight))
    want = torch.autograd.grad(expect.square().sum(), (ref.lora_A.weight, ref.lora_B.weight))
    for a, b in zip(grads, want, strict=True):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 0.03 * b.norm()


@pytest.mark.parametrize("vocab_block", [None, 64], ids=["one-product", "vocab-blocks"])
def test_linear_cross_entropy_under_autocast(vocab_block, monkeypatch):
    """Under autocast the head's products run in bf16 (as `hidden @ weight.T` would), the loss and softmax in
    fp32, and the hidden gradient comes back in the hidden states' dtype."""
    if vocab_block:
        monkeypatch.setattr(kernels, "VOCAB_BLOCK", vocab_block)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g)
    t = torch.randint(0, 300, (37,), generator=g)
    ref = F.cross_entropy((h @ w.T).float(), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = kernels.linear_cross_entropy(h, w, t, chunk_bytes=4 * 300 * 5)
        expect = F.cross_entropy((h @ w.T).float(), t)  # autocast's own bf16 product
    assert ours.dtype == torch.float32 and torch.allclose(ours, expect, atol=1e-3)
    assert not torch.allclose(ours, ref, atol=1e-6)  # it did compute in bf16
    (gh,) = torch.autograd.grad(ours, (h,))
    (want,) = torch.autograd.grad(ref, (h,))
    assert gh.dtype == torch.float32 and (gh - want).norm() <= 0.02 * want.norm()


def test_autocast_weight_cache_same_values_and_follows_weight_changes():
    """A frozen linear under autocast gives autocast's own result from a cast made once, and re-casts after the
    weight changes in place (merge, PiSSA)."""
    lin = torch.nn.Linear(16, 8).requires_grad_(False)
    ref = copy.deepcopy(lin)
    assert kernels.cache_autocast_weights(torch.nn.Sequential(lin)) == 1
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x), lin(x)
        assert b.dtype == torch.bfloat16 and torch.equal(a, b)
        first = lin._autocast_weight[1]
        lin(x)
        assert lin._autocast_weight[1] is first  # no second cast
        with torch.no_grad():
            lin.weight.mul_(2)
            ref.weight.mul_(2)
        assert torch.equal(ref(x), lin(x))
    (ga,), (gb,) = torch.autograd.grad(a.float().sum(), (x,)), torch.autograd.grad(b.float().sum(), (x,))
    assert torch.equal(ga, gb)
    assert torch.equal(lin(x), ref(x))  # without autocast: the fp32 weight itself


def test_segment_attention_bf16_runs_in_fp32():
    """bf16 q/k/v (autocast or a bf16 base) on CPU: per-sequence causal attention computed in fp32, handed back
    in bf16, equal to the fp32 computation rounded once; gradients in bf16."""
    from types import SimpleNamespace

    from peftcli.loss import segment_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 9, 8, generator=gen) for h in (4, 2, 2))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    mod = SimpleNamespace(training=True)
    ref, _ = segment_attention(mod, q, k, v, None, scaling=0.3, position_ids=pos)
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = segment_attention(mod, qb, kb, vb, None, scaling=0.3, position_ids=pos)
    exact, _ = segment_attention(mod, qb.float(), kb.float(), vb.float(), None, scaling=0.3, position_ids=pos)
    assert out.dtype == torch.bfloat16 and out.is_contiguous() and torch.equal(out, exact.to(torch.bfloat16))
    assert torch.allclose(out.float(), ref, atol=3e-2)
    grads = torch.autograd.grad(out.float().sum(), (qb, kb, vb))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
