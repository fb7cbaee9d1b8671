"""LoRA, its variants (LoRA-FA, PiSSA, DoRA) and target matching on tiny Llama / GPT-2 / BERT models: init is a
no-op, merge equals unmerged, counts match r*(in+out), HF PEFT's matching rules, the PEFT layout round trip,
PiSSA's SVD init and DoRA's gradients against PEFT's. (Every method's contract: test_contract.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ARCH_TASK, make, padded_lm_batch, tiny_model, toy_trainer
from conftest import IDS as CONTRACT_IDS
from conftest import perturb as perturb_all
from pydantic import ValidationError

from peftcli import adapter_io
from peftcli.errors import UserError
from peftcli.loss import LossModel
from peftcli.merge import layout
from peftcli.methods import build_method
from peftcli.methods.targets import is_linear, linear_shape, resolve_targets

IDS = torch.randint(5, 1000, (3, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora(model, task="causal-lm", **opts):
    method = build_method({"name": "lora", "r": 4, "alpha": 8, **opts})
    method.apply(model, task)
    return method


def perturb(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("arch,task", [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "seq-cls")])
def test_init_noop_merge_equivalence_and_count(arch, task):
    model = tiny_model(arch, task)
    base_layout = layout(model)
    ref = logits(model)
    shapes = {n: linear_shape(m) for n, m in model.named_modules() if is_linear(m)}
    method = lora(model, task, target_modules="all-linear")
    assert torch.equal(logits(model), ref), "LoRA at init (B = 0) must not change outputs"
    formula = sum(4 * (shapes[n][0] + shapes[n][1]) for n in method.wrapped)
    head = sum(p.numel() for n in method.saved_modules for p in model.get_submodule(n).parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == formula + head
    perturb(model)
    unmerged = logits(model)
    assert (unmerged - ref).abs().max() > 1e-3
    method.merge(model)
    assert (logits(model) - unmerged).abs().max() <= 1e-4
    assert layout(model) == base_layout, "merged model must have the base's names, shapes and module types"


def test_rslora_scaling_and_lora_fa_freezes_a():
    model = tiny_model("llama")
    m = lora(model, target_modules=["q_proj"], r=16, alpha=8, use_rslora=True, freeze_a=True)
    w = model.model.layers[0].self_attn.q_proj
    assert w.scaling == pytest.approx(8 / 4) and not w.lora_A.weight.requires_grad and w.lora_B.weight.requires_grad
    assert m.opts.use_rslora


def test_target_rules():
    model = tiny_model("llama")
    # list: exact or suffix; regex: fullmatch; default per architecture; layers_to_transform; exclude
    assert resolve_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert resolve_targets(model, r".*\.1\.mlp\.up_proj") == ["model.layers.1.mlp.up_proj"]
    with pytest.raises(UserError, match="matches no module"):
        resolve_targets(model, "q_proj")
    assert [n.rsplit(".", 1)[-1] for n in resolve_targets(model, None)] == ["q_proj", "v_proj"] * 2
    assert resolve_targets(model, ["v_proj"], layers_to_transform=1) == ["model.layers.1.self_attn.v_proj"]
    all_lin = resolve_targets(model, "all-linear", exclude_modules=["down_proj"])
    assert "lm_head" not in all_lin and not any(n.endswith("down_proj") for n in all_lin) and len(all_lin) == 12


def test_unmatched_entries_are_named_with_closest():
    model = tiny_model("llama")
    with pytest.raises(UserError) as exc:
        resolve_targets(model, ["q_proj", "qproj", "v_prj"])
    msg = str(exc.value)
    assert "'qproj'" in msg and "'v_prj'" in msg and "q_proj" in msg and "v_proj" in msg and "'q_proj' (" not in msg


def test_unsupported_module_type_is_refused():
    with pytest.raises(UserError, match="cannot wrap"):
        resolve_targets(tiny_model("llama"), ["input_layernorm"])


def test_selective_head_loss_equals_transformers_loss():
    model = tiny_model("llama")
    labels = IDS.clone()
    labels[:, :5] = -100  # a masked prompt
    mask = torch.ones_like(IDS)
    wrapped = LossModel(model, "causal-lm")
    assert wrapped.selective
    ours, _ = wrapped(IDS, mask, labels)
    theirs = model(input_ids=IDS, attention_mask=mask, labels=labels).loss
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("arch,task,targets", [("llama", "causal-lm", "all-linear"), ("gpt2", "causal-lm", None),
                                               ("bert", "seq-cls", ["query", "value"]),
                                               ("llama", "causal-lm", {"list": ["v_proj"], "layers": [1]})])
def test_peft_loads_our_adapter_with_same_logits(tmp_path, arch, task, targets):
    from peft import PeftModel

    extra = {}
    if isinstance(targets, dict):
        extra = {"layers_to_transform": targets["layers"]}
        targets = targets["list"]
    model = tiny_model(arch, task)
    method = lora(model, task, target_modules=targets, **extra)
    perturb(model)
    with torch.no_grad():  # a trained head too, saved through modules_to_save
        for n in method.saved_modules:
            for p in model.get_submodule(n).parameters():
                p.add_(0.3)
    ours = logits(model)
    adapter_io.write_adapter(tmp_path, method, model, {"base": {"name_or_path": "tiny", "task": task}})
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == ("SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(tiny_model(arch, task), tmp_path).eval()
    assert (logits(peft_model) - ours).abs().max() <= 1e-5
    wrapped = {n.removeprefix("base_model.model.") for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert {n.removesuffix(".lora_A") for n in wrapped} == set(method.wrapped)


def test_we_read_adapters_written_by_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    ref = logits(peft_model.eval())
    peft_model.save_pretrained(tmp_path)
    adapter = adapter_io.read_adapter(tmp_path)
    method = adapter_io.method_for(adapter)
    model = tiny_model("llama")
    method.apply(model)
    method.load_state_dict(model, adapter_io.load_tensors(adapter))
    assert (logits(model) - ref).abs().max() <= 1e-5


def test_atomic_write_leaves_no_temp_files(tmp_path):
    adapter_io.atomic_write(tmp_path / "a.json", "{}")
    adapter_io.atomic_write(tmp_path / "a.json", '{"x": 1}')
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"] and json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_we_read_peft_seq_cls_adapters(tmp_path):
    """PEFT lists modules_to_save ["classifier", "score"] for any SEQ_CLS model; the one that exists is loaded."""
    from peft import LoraConfig, TaskType, get_peft_model

    peft_model = get_peft_model(tiny_model("bert", "seq-cls"), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query"],
                                                                         init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "classifier" in n and p.requires_grad:
                p.add_(0.5)
    ref = logits(peft_model.eval())
    peft_model.save_pretrained(tmp_path)
    adapter = adapter_io.read_adapter(tmp_path)
    method = adapter_io.method_for(adapter)
    model = tiny_model("bert", "seq-cls")
    method.apply(model, "seq-cls")
    method.load_state_dict(model, adapter_io.load_tensors(adapter))
    assert method.saved_modules == ["classifier"] and (logits(model) - ref).abs().max() <= 1e-5


def test_padding_free_loss_equals_padded_loss():
    """Flattening a right-padded batch into one row (block-causal via position_ids) changes no number."""
    model = tiny_model("llama")
    ids, mask, labels = padded_lm_batch()
    wrapped = LossModel(model, "causal-lm")
    assert wrapped.padding_free
    ours, _ = wrapped(ids, mask, labels)
    theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)


# ---------------------------------------------------------------- LoRA-FA, PiSSA, DoRA
def _applied(arch: str, **opts):
    base = make(arch)
    model = copy.deepcopy(base)
    method = build_method({"r": 4, **opts})
    method.apply(model, ARCH_TASK[arch])
    return base, model, method


def test_lora_fa_trains_b_only():
    _, model, method = _applied("llama", name="lora", freeze_a=True)
    wrappers = method.wrappers(model)
    a0 = {n: w.lora_A.weight.detach().clone() for n, w in wrappers.items()}
    b0 = {n: w.lora_B.weight.detach().clone() for n, w in wrappers.items()}
    trainer = toy_trainer(model, method, "llama", steps=3)
    for step in range(3):
        trainer.train_step(step)
    for n, w in wrappers.items():
        assert torch.equal(w.lora_A.weight, a0[n])
        assert not torch.equal(w.lora_B.weight, b0[n])
        assert sum(p.numel() for p in w.parameters() if p.requires_grad) == w.out_features * 4


@pytest.mark.parametrize("arch,opts", [("llama", {"target_modules": "all-linear"}), ("gpt2", {"use_rslora": True})])
def test_pissa_init_is_the_top_r_svd_part_of_w(arch, opts):
    """s B A must be the rank-r truncated SVD of the original W and the base must hold the residual: any A, B
    would leave outputs unchanged (W - sBA + sBA), so this is what makes it PiSSA."""
    base, model, method = _applied(arch, name="lora", init="pissa", **opts)
    for path, w in method.wrappers(model).items():
        w0 = base.get_submodule(path).weight.detach().double()
        w0 = w0.T if w.fan_in_fan_out else w0  # (out, in)
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        sba = w.scaling * (w.lora_B.weight.double() @ w.lora_A.weight.double())
        torch.testing.assert_close(sba, top, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w.base_weight().double(), w0 - top, atol=1e-5, rtol=1e-5)
        a, b = w.lora_A.weight.double(), w.lora_B.weight.double()  # A's rows orthogonal, B's columns orthogonal
        torch.testing.assert_close(a @ a.T, torch.diag(s[:4] / w.scaling), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.T @ b, torch.diag(s[:4] / w.scaling), atol=1e-5, rtol=1e-5)


def test_pissa_model_refuses_stored_tensors_and_doubles_rank():
    _, model, method = _applied("llama", name="lora", init="pissa", target_modules="all-linear")
    sd = method.state_dict(model)
    a = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (8, 32)
    opts = method.saved_options()
    assert (opts.r, opts.alpha, opts.init) == (8, 2 * method.opts.alpha, "default")
    with pytest.raises(UserError, match="PiSSA"):
        method.load_state_dict(model, sd)


def test_dora_rejects_pissa():
    with pytest.raises(ValidationError, match="init"):
        build_method({"name": "dora", "init": "pissa"})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_gradients_match_hf_peft(arch, tmp_path):
    """Same gradients as PEFT's DoRA: the row norm is detached in backward in both."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file

    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    base, model, method = _applied(arch, name="dora", target_modules=targets)
    perturb_all(model)
    sd = {k: v.detach().contiguous() for k, v in method.state_dict(model).items()}
    save_file(sd, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {**method.adapter_config(model, None), "task_type": "CAUSAL_LM", "inference_mode": False}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True).eval()
    for m in (model, peft_model):
        m(input_ids=CONTRACT_IDS, labels=CONTRACT_IDS).loss.backward()
    ours = {f"base_model.model.{n}": p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = get_peft_model_state_dict(peft_model, state_dict={n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert ours.keys() == theirs.keys()
    assert all(ours[k].abs().max() > 0 for k in ours)  # every tensor gets a gradient: the comparison is not 0 == 0
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5


def test_peft_lora_config_goes_to_lora_or_dora_by_use_dora():
    from peftcli.methods import method_for_peft_config
    from peftcli.methods.dora import DoRA, DoraOptions
    from peftcli.methods.lora import LoRA, LoraOptions

    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True}
    assert method_for_peft_config(cfg) is DoRA and method_for_peft_config({**cfg, "use_dora": False}) is LoRA
    assert isinstance(DoRA.from_lora_config(cfg), DoraOptions)
    assert type(DoRA.from_lora_config({**cfg, "use_dora": False})) is LoraOptions
