"""AdaLoRA, HiWi, SAID and DID on tiny random Llama / GPT-2 / BERT models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from peftcli.errors import UserError
from peftcli.methods import build_method
from peftcli.methods.said import _draw, _hadamard, _Projector, fwht
from peftcli.train import Trainer

H, LAYERS, VOCAB, INTER = 32, 2, 128, 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models gain nothing from threads, and on a shared busy CPU spinning OpenMP threads made
    # this file ~10x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(arch: str, seq_cls: bool = False):
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=2, n_positions=64,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    else:
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=2,
                         intermediate_size=INTER, max_position_embeddings=64, num_labels=2,
                         hidden_dropout_prob=0, attention_probs_dropout_prob=0)  # train mode stays deterministic
        model = BertForSequenceClassification(cfg) if seq_cls else BertForMaskedLM(cfg)
    with torch.no_grad():  # pretrained models have non-zero biases (HiWi's bias form feeds on them)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


IDS = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
# learnable toy batch: each sequence repeats one token, so shifting the output distribution pays off
TOY = torch.tensor([5, 9, 5, 9]).unsqueeze(1).repeat(1, 12)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# (case id, architecture, options, closed-form trainable count)
R = 4
CASES = [
    ("adalora-llama", "llama", {"name": "adalora", "init_r": R, "target_r": 2},
     LAYERS * 2 * (R * (H + H) + R)),  # q_proj, v_proj: (32 -> 32)
    ("adalora-gpt2", "gpt2", {"name": "adalora", "init_r": R, "target_r": 2, "target_modules": ["c_attn", "mlp.c_proj"]},
     LAYERS * (R * (H + 3 * H) + R + R * (4 * H + H) + R)),  # Conv1D c_attn 32 -> 96, mlp.c_proj 128 -> 32
    ("hiwi-bias-bert", "bert", {"name": "hiwi", "r": R},
     LAYERS * (2 * R * INTER + 2 * R * H)),  # intermediate.dense (out 64), output.dense (out 32)
    ("hiwi-bias-gpt2", "gpt2", {"name": "hiwi", "r": R},
     LAYERS * (2 * R * 4 * H + 2 * R * H)),  # mlp.c_fc (out 128), mlp.c_proj (out 32)
    ("hiwi-weight-llama", "llama", {"name": "hiwi", "r": R},
     LAYERS * 2 * R * (INTER + INTER + H)),  # the paper's tokens have the output size: gate/up (out 64), down (out 32)
    ("hiwi-weight-bert", "bert", {"name": "hiwi", "r": R, "form": "weight", "activation": "tanh", "init": "normal"},
     LAYERS * 2 * R * (INTER + H)),  # intermediate.dense (out 64), output.dense (out 32); [W; b] rows
    ("hiwi-weight_in-llama", "llama", {"name": "hiwi", "r": R, "form": "weight_in"},
     LAYERS * 2 * R * (H + H + INTER)),  # rows of torch's weight: gate/up (in 32), down (in 64)
    ("said-bert", "bert", {"name": "said", "d": 300}, 300),
    ("said-gpt2", "gpt2", {"name": "said", "d": 300, "include_norms": True}, 300),
    ("did-llama", "llama", {"name": "did", "d": 300}, 300),
]
IDS_ = [c[0] for c in CASES]


def applied(arch, opts):
    base = make(arch)
    model = copy.deepcopy(base)
    method = build_method(dict(opts))
    method.apply(model)
    return base, model, method


def perturb(model, seed=3):
    """Move every trainable parameter away from its init (scaled to each tensor's role)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.05 if "theta_d" in name else 0.3
                p.add_(torch.randn(p.shape, generator=g) * scale)


def base_signature(model):
    return ([(n, tuple(p.shape)) for n, p in model.named_parameters()], [(n, type(m)) for n, m in model.named_modules()])


def train(model, method, steps, lr=1e-2):
    """`steps` optimizer steps on TOY through peftcli's own train_step (constant lr, no clipping)."""
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in TOY]
    trainer = Trainer.for_model(model, method, rows, max_steps=steps, batch_size=len(rows), lr=lr, scheduler="constant",
                                warmup_steps=0, max_grad_norm=None)
    losses = [trainer.train_step(step)["loss"] for step in range(steps)]
    model.eval()
    return losses


@pytest.mark.parametrize("case", CASES, ids=IDS_)
def test_init_leaves_logits_unchanged(case):
    _, arch, opts, _ = case
    base, model, _ = applied(arch, opts)
    assert torch.equal(logits(model), logits(base))


@pytest.mark.parametrize("case", CASES, ids=IDS_)
def test_trainable_count_matches_formula(case):
    _, arch, opts, expected = case
    _, model, _ = applied(arch, opts)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("case", CASES, ids=IDS_)
def test_merge_equals_unmerged_and_restores_base_architecture(case):
    _, arch, opts, _ = case
    base, model, method = applied(arch, opts)
    perturb(model)
    before = logits(model)
    assert (before - logits(base)).abs().max() > 1e-3  # the perturbation matters
    merged = method.merge(model)
    assert (logits(merged) - before).abs().max() <= 1e-4
    assert base_signature(merged) == base_signature(base)


@pytest.mark.parametrize("case", CASES, ids=IDS_)
def test_training_lowers_loss(case):
    _, arch, opts, _ = case
    _, model, method = applied(arch, opts)
    if opts["name"] == "adalora":
        opts = {**opts, "tinit": 2, "tfinal": 2}
        method = build_method(opts)
        model = make(arch)
        method.apply(model)
    # AdaLoRA starts with E = 0 and P, Q ~ 0.02: its first gradients are tiny, so a larger toy lr
    lr = {"adalora": 5e-2, "hiwi": 5e-2}.get(opts["name"], 5e-3)
    losses = train(model, method, steps=8, lr=lr)
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.parametrize("case", CASES, ids=IDS_)
def test_state_dict_roundtrip_gives_same_merged_weights(case):
    _, arch, opts, _ = case
    base, model, method = applied(arch, opts)
    perturb(model)
    sd = {k: v.clone() for k, v in method.state_dict(model).items()}
    fresh = copy.deepcopy(base)
    method2 = build_method(dict(opts))
    method2.apply(fresh)
    method2.load_state_dict(fresh, sd)
    assert (logits(fresh) - logits(model)).abs().max() <= 1e-5
    a, b = method.merge(model).state_dict(), method2.merge(fresh).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


# ----------------------------------------------------------------- AdaLoRA
def test_adalora_budget_reaches_target_and_ranks_are_reported_and_stored():
    base = make("bert", seq_cls=True)
    model = copy.deepcopy(base)
    method = build_method({"name": "adalora", "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 1,
                           "target_modules": ["query", "value", "intermediate.dense"]})
    method.apply(model, task="seq-cls")
    rows = [{"input_ids": ids.tolist(), "labels": label} for ids, label in zip(IDS, [0, 1, 1, 0], strict=True)]
    total, budgets = 12, []
    trainer = Trainer.for_model(model, method, rows, task="seq-cls", max_steps=total, batch_size=4, lr=1e-2,
                                scheduler="constant", warmup_steps=0, max_grad_norm=None)
    for step in range(total):
        trainer.train_step(step)
        budgets.append(method.describe(model)["total_rank"])
    model.eval()
    n = len(method.wrapped)
    assert n == 6
    assert budgets[0] == 6 * n  # warm-up at full rank
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] <= 2 * n < budgets[0]
    info = method.describe(model)
    assert set(info["ranks"]) == set(method.wrapped) and sum(info["ranks"].values()) == info["total_rank"]
    assert len(set(info["ranks"].values())) > 1 or n == 1  # ranks differ per module
    sd = method.state_dict(model)
    cfg = method.adapter_config(model, None)
    for path, rank in info["ranks"].items():
        assert sd[f"base_model.model.{path}.lora_E"].shape == (max(rank, 1), 1)
        assert sum(cfg["rank_pattern"][f"{path}.lora_E"]) == max(rank, 1)
    json.dumps(cfg)
    # merged == unmerged with the masked E
    before = logits(model)
    fresh = copy.deepcopy(base)
    method2 = build_method(method.opts.model_dump())
    method2.apply(fresh, task="seq-cls")
    method2.load_state_dict(fresh, sd)
    assert (logits(fresh) - before).abs().max() <= 1e-5
    assert method2.describe(fresh)["ranks"] == {p: max(r, 1) for p, r in info["ranks"].items()}
    assert (logits(method.merge(model)) - before).abs().max() <= 1e-4


def test_adalora_orthogonality_penalty_and_schedule_validation():
    _, model, method = applied("llama", {"name": "adalora", "init_r": R, "target_r": 2, "tinit": 5, "tfinal": 5})
    reg = method.extra_loss(model)
    wrappers = list(method.wrappers(model).values())
    eye = torch.eye(R)
    manual = sum(torch.linalg.matrix_norm(w.lora_A @ w.lora_A.T - eye) + torch.linalg.matrix_norm(w.lora_B.T @ w.lora_B - eye)
                 for w in wrappers) / (2 * len(wrappers))
    torch.testing.assert_close(reg, 0.5 * manual)
    with pytest.raises(UserError, match="no pruning phase"):
        method.on_optimizer_step(model, 1, 10)
    with pytest.raises(ValueError):
        build_method({"name": "adalora", "init_r": 4, "target_r": 8})


def test_adalora_adapter_loads_in_hf_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file

    base = make("bert", seq_cls=True)
    model = copy.deepcopy(base)
    method = build_method({"name": "adalora", "init_r": R, "target_r": 2, "tinit": 1, "tfinal": 1})
    method.apply(model, task="seq-cls")
    perturb(model)
    for w in method.wrappers(model).values():  # a pruned state: PEFT must resize by rank_pattern
        w.rank_mask[1:3] = False
        w.apply_mask()
    ours = logits(model)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**method.adapter_config(model, None), "task_type": "SEQ_CLS"}))
    save_file({k: v.contiguous() for k, v in method.state_dict(model).items()}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.warns():  # PEFT warns that AdaLoRA's rank_pattern keys are not LoRA rank regexes
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert (logits(theirs) - ours).abs().max() <= 1e-5


# ----------------------------------------------------------------- HiWi
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_hiwi_bias_storage_is_the_new_biases_only_independent_of_r(arch):
    sizes = []
    for r in (4, 16):
        _, model, method = applied(arch, {"name": "hiwi", "r": r})
        perturb(model)
        sd = method.state_dict(model)
        assert all(k.endswith(".bias") for k in sd)
        expected = sum(method.wrappers(model)[p].base_layer.bias.numel() for p in method.wrapped) * 4
        sizes.append(sum(v.numel() * v.element_size() for v in sd.values()))
        assert sizes[-1] == expected
    assert sizes[0] == sizes[1]


def test_hiwi_default_targets_are_the_ffn_and_bias_form_needs_biases():
    _, model, method = applied("bert", {"name": "hiwi"})
    assert method.wrapped == [f"bert.encoder.layer.{i}.{m}.dense" for i in range(LAYERS) for m in ("intermediate", "output")]
    _, model, method = applied("llama", {"name": "hiwi"})
    assert method.form == "weight" and all(p.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") for p in method.wrapped)
    with pytest.raises(UserError, match="form: bias needs biases"):
        build_method({"name": "hiwi", "form": "bias"}).apply(make("llama"))
    with pytest.raises(ValueError):
        build_method({"name": "hiwi", "activation": "swish"})


def test_hiwi_reloaded_bias_adapter_continues_from_the_stored_bias():
    base, model, method = applied("bert", {"name": "hiwi", "r": R})
    perturb(model)
    sd = method.state_dict(model)
    fresh = copy.deepcopy(base)
    method2 = build_method({"name": "hiwi", "r": R})
    method2.apply(fresh)
    method2.load_state_dict(fresh, sd)
    losses = train(fresh, method2, steps=5)  # still trainable, starting from b'
    assert losses[0] == pytest.approx(train(model, method, steps=1)[0], abs=1e-5)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------- SAID / DID
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
    _, model, method = applied("bert", {"name": "said", "d": 300})
    n = len(method.targets)
    assert n == LAYERS * 6 * 2  # q, k, v, attention.output, intermediate, output: weight + bias
    sd = method.state_dict(model)
    assert sd["said.theta_d"].numel() == 300 - n and sd["said.lambda"].numel() == n
    assert sum(v.numel() * v.element_size() for v in sd.values()) < 2000  # d floats + the seed
    assert method.describe(model)["projected_tensors"] == n
    with pytest.raises(UserError, match="use d >"):
        build_method({"name": "said", "d": n}).apply(make("bert"))
    wrong = build_method({"name": "said", "d": 300, "seed": 5})
    fresh = make("bert")
    wrong.apply(fresh)
    with pytest.raises(UserError, match="seed"):
        wrong.load_state_dict(fresh, sd)
    with pytest.raises(UserError, match="tied"):
        build_method({"name": "did", "d": 300, "include_embeddings": True}).apply(make("gpt2"))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("form", ["bias", "weight", "weight_in"])
def test_hiwi_forms_match_the_hand_written_formula(arch, form):
    """Each form against the formula written out here (paper notation: h = x W + b, W (in, out)), in the
    forward pass and in the merged module, with a trained-like adapter (not the module's own new_weight)."""
    _, model, method = applied(arch, {"name": "hiwi", "r": R, "form": form, "activation": "tanh"})
    path, w = next(iter(method.wrappers(model).items()))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w.hiwi_down.copy_(torch.randn(w.hiwi_down.shape, generator=g) * 0.3)
        w.hiwi_up.copy_(torch.randn(w.hiwi_up.shape, generator=g) * 0.3)
    base = w.base_layer
    W = base.weight.detach() if not isinstance(base, torch.nn.Linear) else base.weight.detach().T  # (in, out)
    b = base.bias.detach()
    down, up = w.hiwi_down.detach(), w.hiwi_up.detach()
    if form == "bias":
        W2, b2 = W, b + torch.tanh(b @ down) @ up
    elif form == "weight":
        M = torch.cat([W, b[None]])  # the bias is one more row: tokens of the output size
        M2 = M + torch.tanh(M @ down) @ up
        W2, b2 = M2[:-1], M2[-1]
    else:
        Wt = W.T  # torch's (out, in) rows: tokens of the input size
        W2, b2 = (Wt + torch.tanh(Wt @ down) @ up).T, b
    x = torch.randn(3, W.shape[0], generator=g)
    with torch.no_grad():
        assert torch.allclose(w(x), x @ W2 + b2, atol=1e-5)
        merged = w.merged_module()
    got_w = merged.weight if not isinstance(merged, torch.nn.Linear) else merged.weight.T
    assert torch.allclose(got_w, W2, atol=1e-6) and torch.allclose(merged.bias, b2, atol=1e-6)
    assert down.shape[0] == (W.shape[0] if form == "weight_in" else W.shape[1])
