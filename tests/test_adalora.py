"""AdaLoRA specifics: the rank budget schedule, per-module ranks reported and stored, the orthogonality penalty,
schedule validation, and a pruned adapter loading in HF PEFT. (Init, counts, round trip, merge, training:
test_contract.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import logits as logits_of
from conftest import make, perturb, toy_trainer
from pydantic import ValidationError

from peftcli.errors import UserError
from peftcli.methods import build_method

R = 4


def test_adalora_budget_reaches_target_and_ranks_are_reported_and_stored():
    base = make("bert")
    model = copy.deepcopy(base)
    method = build_method({"name": "adalora", "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 1,
                           "target_modules": ["query", "value", "intermediate.dense"]})
    method.apply(model, task="seq-cls")
    total, budgets = 12, []
    trainer = toy_trainer(model, method, "bert", steps=total)
    for step in range(total):
        trainer.train_step(step)
        budgets.append(method.describe(model)["total_rank"])
    model.eval()
    n = len(method.wrapped)
    assert n == 6
    assert budgets[:2] == [6 * n] * 2  # warm-up (tinit) at full rank
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] <= 2 * n < budgets[0]
    assert budgets[-3:] == [budgets[-1]] * 3  # tfinal: the budget stays at the target
    info = method.describe(model)
    assert set(info["ranks"]) == set(method.wrapped) and sum(info["ranks"].values()) == info["total_rank"]
    assert len(set(info["ranks"].values())) > 1  # ranks differ per module
    sd = method.state_dict(model)
    cfg = method.adapter_config(model, None)
    for path, rank in info["ranks"].items():
        assert sd[f"base_model.model.{path}.lora_E"].shape == (max(rank, 1), 1)
        assert sum(cfg["rank_pattern"][f"{path}.lora_E"]) == max(rank, 1)
    assert json.loads(json.dumps(cfg))["rank_pattern"] == cfg["rank_pattern"]  # JSON-serialisable as written
    # the pruned adapter reloads with the same function and ranks, and merges to it
    before = logits_of(model)
    fresh = copy.deepcopy(base)
    method2 = build_method(method.opts.model_dump())
    method2.apply(fresh, task="seq-cls")
    method2.load_state_dict(fresh, sd)
    assert (logits_of(fresh) - before).abs().max() <= 1e-5
    assert method2.describe(fresh)["ranks"] == {p: max(r, 1) for p, r in info["ranks"].items()}
    assert (logits_of(method.merge(model)) - before).abs().max() <= 1e-4


def test_adalora_orthogonality_penalty_and_schedule_validation():
    model = make("llama")
    method = build_method({"name": "adalora", "init_r": R, "target_r": 2, "tinit": 5, "tfinal": 5})
    method.apply(model)
    reg = method.extra_loss(model)
    wrappers = list(method.wrappers(model).values())
    eye = torch.eye(R)
    manual = sum(torch.linalg.matrix_norm(w.lora_A @ w.lora_A.T - eye) + torch.linalg.matrix_norm(w.lora_B.T @ w.lora_B - eye)
                 for w in wrappers) / (2 * len(wrappers))
    assert manual > 0.1  # random P, Q are far from orthogonal: the comparison below is not 0 == 0
    torch.testing.assert_close(reg, 0.5 * manual)
    with pytest.raises(UserError, match="no pruning phase"):
        method.on_optimizer_step(model, 1, 10)
    with pytest.raises(ValidationError, match=r"target_r \(8\) must not exceed init_r \(4\)"):
        build_method({"name": "adalora", "init_r": 4, "target_r": 8})


def test_adalora_pruned_adapter_loads_in_hf_peft(tmp_path):
    import peft
    from safetensors.torch import save_file

    base = make("bert")
    model = copy.deepcopy(base)
    method = build_method({"name": "adalora", "init_r": R, "target_r": 2, "tinit": 1, "tfinal": 1})
    method.apply(model, task="seq-cls")
    perturb(model, scale=0.3)
    for w in method.wrappers(model).values():  # a pruned state: PEFT must resize by rank_pattern
        w.rank_mask[1:3] = False
        w.apply_mask()
    ours = logits_of(model)
    assert (ours - logits_of(base)).abs().max() > 1e-3
    (tmp_path / "adapter_config.json").write_text(json.dumps({**method.adapter_config(model, None), "task_type": "SEQ_CLS"}))
    save_file({k: v.contiguous() for k, v in method.state_dict(model).items()}, str(tmp_path / "adapter_model.safetensors"))
    # PEFT resizes by AdaLoRA's rank_pattern, then warns that those keys are not LoRA rank regexes
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match any targeted module"):
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert (logits_of(theirs) - ours).abs().max() <= 1e-5
