"""DoRA, PiSSA-initialised LoRA, LoRA-FA, (IA)^3 and BitFit on tiny random Llama / GPT-2 / BERT models:
init leaves outputs unchanged, trainable counts match closed formulas, merge == unmerged, training
lowers the loss, stored tensors round-trip, and the PEFT-layout adapters load in HF PEFT itself."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from peftcli.errors import UserError
from peftcli.methods import build_method
from peftcli.methods.targets import linear_shape

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def make(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, num_labels=2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = BertForSequenceClassification(cfg)
    with torch.no_grad():  # random biases so that bias-related paths (DoRA, IA3 merge) are exercised
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def task(arch):
    return "seq-cls" if arch == "bert" else "causal-lm"


IDS = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def shapes(model, suffixes):
    """(path, in, out) of the base model's modules whose path ends in one of the suffixes."""
    return [(n, *linear_shape(m)) for n, m in model.named_modules()
            if any(n == s or n.endswith("." + s) for s in suffixes)]


def head_count(model, arch):
    return sum(p.numel() for p in model.classifier.parameters()) if arch == "bert" else 0


# ------------------------------------------------------------------ cases: options, arch, closed-form count
R = 4


def count_lora(suffixes, per):
    return lambda base, arch: sum(per(i, o) for _, i, o in shapes(base, suffixes)) + head_count(base, arch)


def count_ia3(targets, ff):
    def f(base, arch):
        return sum(i if any(n.endswith(s) for s in ff) else o for n, i, o in shapes(base, targets)) + head_count(base, arch)
    return f


def count_bias(base, arch):
    heads = ("lm_head", "classifier")
    return sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias") and not n.startswith(heads)) + head_count(base, arch)


CASES = {
    "dora-llama": ({"name": "dora", "r": R, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}, "llama",
                   count_lora(["q_proj", "v_proj", "down_proj"], lambda i, o: R * (i + o) + o)),
    "dora-gpt2": ({"name": "dora", "r": R, "target_modules": ["c_attn", "c_fc"]}, "gpt2",
                  count_lora(["c_attn", "c_fc"], lambda i, o: R * (i + o) + o)),
    "pissa-llama": ({"name": "lora", "r": R, "init": "pissa", "target_modules": "all-linear"}, "llama",
                    count_lora(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lambda i, o: R * (i + o))),
    "pissa-gpt2": ({"name": "lora", "r": R, "init": "pissa", "use_rslora": True}, "gpt2",
                   count_lora(["c_attn"], lambda i, o: R * (i + o))),
    "lorafa-llama": ({"name": "lora", "r": R, "freeze_a": True}, "llama",
                     count_lora(["q_proj", "v_proj"], lambda i, o: o * R)),
    "ia3-llama": ({"name": "ia3"}, "llama", count_ia3(["k_proj", "v_proj", "down_proj"], ["down_proj"])),
    "ia3-llama-layer1": ({"name": "ia3", "layers_to_transform": [1]}, "llama",
                         count_ia3([f"layers.1.{s}" for s in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")], ["down_proj"])),
    "ia3-gpt2": ({"name": "ia3"}, "gpt2", count_ia3(["c_attn", "mlp.c_proj"], ["mlp.c_proj"])),
    "ia3-bert": ({"name": "ia3"}, "bert", count_ia3(["key", "value", "output.dense"], ["output.dense"])),
    "bitfit-gpt2": ({"name": "bitfit"}, "gpt2", count_bias),
    "bitfit-bert": ({"name": "bitfit"}, "bert", count_bias),
}
PEFT_CASES = ["dora-llama", "dora-gpt2", "pissa-llama", "pissa-gpt2", "ia3-llama", "ia3-llama-layer1", "ia3-gpt2"]


def applied(case):
    opts, arch, _ = CASES[case]
    model = make(arch)
    method = build_method(dict(opts))
    method.apply(model, task=task(arch))
    return method, model, arch


def perturb(model, scale=0.1):
    """Move every trainable parameter away from its init (a trained adapter, not a zero one)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", list(CASES))
def test_init_keeps_outputs_and_count_matches_formula(case):
    _, arch, formula = CASES[case]
    base = make(arch)
    method, model, _ = applied(case)
    assert (logits(model) - logits(base)).abs().max().item() <= 1e-5
    assert n_trainable(model) == formula(base, arch)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_unmerged_and_restores_base_layout(case):
    base = make(CASES[case][1])
    method, model, _ = applied(case)
    perturb(model)
    before = logits(model)
    assert (before - logits(base)).abs().max().item() > 1e-3  # the adapter really changes the model
    merged = method.merge(model)
    assert (logits(merged) - before).abs().max().item() <= 1e-4
    assert [(n, p.shape) for n, p in merged.named_parameters()] == [(n, p.shape) for n, p in base.named_parameters()]
    assert [(n, type(m)) for n, m in merged.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]


@pytest.mark.parametrize("case", list(CASES))
def test_training_lowers_loss(case):
    method, model, arch = applied(case)
    torch.manual_seed(3)
    lr = 1e-1 if method.name == "ia3" else 1e-2  # (IA)^3's few scalars need a larger step to move a random GPT-2
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    labels = torch.tensor([0, 1, 1, 0]) if arch == "bert" else IDS
    losses = []
    for _ in range(6):
        loss = model(input_ids=IDS, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


def test_lora_fa_trains_b_only():
    method, model, _ = applied("lorafa-llama")
    wrappers = method.wrappers(model)
    a0 = {n: w.lora_A.weight.detach().clone() for n, w in wrappers.items()}
    b0 = {n: w.lora_B.weight.detach().clone() for n, w in wrappers.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, w in wrappers.items():
        assert torch.equal(w.lora_A.weight, a0[n])
        assert not torch.equal(w.lora_B.weight, b0[n])
        assert sum(p.numel() for p in w.parameters() if p.requires_grad) == w.out_features * R


def saved_options(method):
    return method.saved_options() if hasattr(method, "saved_options") else method.opts


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_gives_same_merged_weights(case):
    method, model, arch = applied(case)
    perturb(model)
    sd = {k: v.clone() for k, v in method.state_dict(model).items()}
    want = method.merge(model).state_dict()

    fresh = make(arch)  # the untouched base, as a user's loader sees it
    again = build_method(saved_options(method).model_dump())
    again.apply(fresh, task=task(arch))
    again.load_state_dict(fresh, sd)
    got = again.merge(fresh).state_dict()
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-5


def test_pissa_model_refuses_stored_tensors_and_doubles_rank():
    method, model, _ = applied("pissa-llama")
    sd = method.state_dict(model)
    a = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (2 * R, 32)
    opts = method.saved_options()
    assert (opts.r, opts.alpha, opts.init) == (2 * R, 2 * method.opts.alpha, "default")
    with pytest.raises(UserError, match="PiSSA"):
        method.load_state_dict(model, sd)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_adapter_loads_in_hf_peft_with_same_logits(case, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    method, model, arch = applied(case)
    perturb(model)
    want = logits(model)
    sd = {k: v.detach().contiguous() for k, v in method.state_dict(model).items()}
    save_file(sd, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {**method.adapter_config(model, None), "task_type": "CAUSAL_LM", "inference_mode": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))

    peft_model = PeftModel.from_pretrained(make(arch), str(tmp_path)).eval()
    assert set(get_peft_model_state_dict(peft_model)) == set(sd)  # PEFT adapted exactly our modules
    assert (logits(peft_model) - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["dora-llama", "dora-gpt2"])
def test_dora_gradients_match_hf_peft(case, tmp_path):
    """Same gradients as PEFT's DoRA: the row norm is detached in backward in both."""
    from peft import PeftModel, get_peft_model_state_dict

    method, model, arch = applied(case)
    perturb(model)
    sd = {k: v.detach().contiguous() for k, v in method.state_dict(model).items()}
    save_file(sd, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {**method.adapter_config(model, None), "task_type": "CAUSAL_LM", "inference_mode": False}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    peft_model = PeftModel.from_pretrained(make(arch), str(tmp_path), is_trainable=True).eval()
    for m in (model, peft_model):
        m(input_ids=IDS, labels=IDS).loss.backward()
    ours = {f"base_model.model.{n}": p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = get_peft_model_state_dict(peft_model, state_dict={n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5


def test_dora_from_lora_config_dispatch():
    from peftcli.methods.dora import DoRA, DoraOptions
    from peftcli.methods.lora import LoraOptions

    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True}
    assert isinstance(DoRA.from_lora_config(cfg), DoraOptions)
    assert type(DoRA.from_lora_config({**cfg, "use_dora": False})) is LoraOptions


def test_ia3_from_adapter_config_round_trip():
    from peftcli.methods.ia3 import IA3

    method, model, _ = applied("ia3-gpt2")
    opts = IA3.from_adapter_config(method.adapter_config(model, None))
    again = build_method(opts)
    again.apply(make("gpt2"))
    assert again.wrapped == method.wrapped and again.feedforward == method.feedforward


def test_dora_rejects_pissa_and_bitfit_on_llama_is_a_user_error():
    with pytest.raises(Exception, match="init"):
        build_method({"name": "dora", "init": "pissa"})
    with pytest.raises(UserError, match="no bias terms"):
        build_method({"name": "bitfit"}).apply(make("llama"))


def test_bitfit_bias_modules_narrows_and_names_tensors():
    base = make("gpt2")
    model = copy.deepcopy(base)
    method = build_method({"name": "bitfit", "bias_modules": ["c_attn", "c_fc"]})
    method.apply(model)
    keys = sorted(method.state_dict(model))
    assert keys[0] == "base_model.model.transformer.h.0.attn.c_attn.bias" and len(keys) == 4
    assert n_trainable(model) == 2 * (3 * 32 + 4 * 32)
