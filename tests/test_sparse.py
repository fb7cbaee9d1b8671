"""Sparse fine-tuning (pafi, fish, lt_sft, child_tuning) on tiny random models: the masks against brute
force, only selected entries move, merge == unmerged, optimizer state and storage scale with the mask."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import copy_task_rows, recipe_dict, tiny_model, write_jsonl, write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftcli import adapter_io
from peftcli.cli import app
from peftcli.methods import available_methods, build_method
from peftcli.methods.sparse import SparseDeltaLinear
from peftcli.methods.targets import is_linear
from peftcli.train import Trainer

IDS = torch.randint(5, 1000, (8, 12), generator=torch.Generator().manual_seed(0))
ROWS = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in IDS]


def eligible_weights(model) -> dict[str, torch.Tensor]:
    """Linear layers of the transformer blocks, by hand: no embeddings, norms or lm_head."""
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if is_linear(m) and ".layers." in n}


def applied(opts: dict, arch: str = "llama", task: str = "causal-lm"):
    base = tiny_model(arch, task)
    model = copy.deepcopy(base)
    method = build_method(opts)
    method.apply(model, task)
    return base, model, method


def trained(opts: dict, steps: int = 4, **train):
    base, model, method = applied(opts)
    trainer = Trainer.for_model(model, method, ROWS, max_steps=steps, batch_size=len(ROWS), lr=1e-2, warmup_steps=0, **train)
    losses = [trainer.train_step(s)["loss"] for s in range(steps)]
    return base, model, method, trainer, losses


def picked(method, model) -> dict[str, set[int]]:
    return {p: set(w.sparse_indices.tolist()) for p, w in method.wrappers(model).items()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_methods_lists_the_sparse_family():
    assert {"pafi", "fish", "lt_sft", "child_tuning"} <= set(available_methods())


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_pafi_mask_is_the_k_smallest_magnitudes(scope):
    base, model, method = applied({"name": "pafi", "density": 0.02, "scope": scope})
    weights = eligible_weights(base)
    assert method.eligible == list(weights)  # eligibility: block linears only
    if scope == "global":
        entries = sorted((w.abs().reshape(-1)[i].item(), n_i, i) for n_i, w in enumerate(weights.values())
                         for i in range(w.numel()))  # brute force, ties by tensor then position
        k = round(0.02 * sum(w.numel() for w in weights.values()))
        names = list(weights)
        want = {n: set() for n in names}
        for _, n_i, i in entries[:k]:
            want[names[n_i]].add(i)
    else:
        want = {n: set(w.abs().reshape(-1).argsort(stable=True)[:round(0.02 * w.numel())].tolist()) for n, w in weights.items()}
    got = picked(method, model)
    assert {n: s for n, s in want.items() if s} == got
    # deterministic and task-agnostic: a second build and the same body under a classification head agree
    _, model2, method2 = applied({"name": "pafi", "density": 0.02, "scope": scope})
    assert picked(method2, model2) == got
    cls_base, cls_model, cls_method = applied({"name": "pafi", "density": 0.02, "scope": scope}, task="seq-cls")
    assert all(torch.equal(eligible_weights(cls_base)[n], w) for n, w in weights.items())
    assert picked(cls_method, cls_model) == got and cls_method.saved_modules == ["score"]


def test_init_is_a_no_op_and_only_selected_entries_change():
    base, model, method, _, losses = trained({"name": "pafi", "density": 0.01})
    assert losses[-1] < losses[0]
    fresh = copy.deepcopy(base)
    build_method({"name": "pafi", "density": 0.01}).apply(fresh)
    assert torch.allclose(logits(fresh), logits(base), atol=1e-6)  # values start at zero
    unmerged = logits(model)
    sel = picked(method, model)
    method.merge(model)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in base.named_parameters()]
    assert not any(isinstance(m, SparseDeltaLinear) for m in model.modules())
    assert (logits(model) - unmerged).abs().max() <= 1e-4
    before, after = base.state_dict(), model.state_dict()
    changed = 0
    for name, w in before.items():
        layer = name.rsplit(".", 1)[0]
        idx = torch.tensor(sorted(sel.get(layer, set())), dtype=torch.long)
        keep = torch.ones(w.numel(), dtype=torch.bool)
        if name.endswith("weight") and idx.numel():
            keep[idx] = False
            changed += int((after[name].reshape(-1)[idx] != w.reshape(-1)[idx]).sum())
        assert torch.equal(after[name].reshape(-1)[keep], w.reshape(-1)[keep]), name  # bit-identical
    assert changed > 0.9 * sum(len(s) for s in sel.values())


@pytest.mark.parametrize("density", [0.01, 0.04])
def test_optimizer_state_scales_with_the_selected_count(density):
    _, model, method, trainer, _ = trained({"name": "pafi", "density": density}, steps=1)
    k = sum(len(s) for s in picked(method, model).values())
    held = sum(t.numel() for st in trainer.optimizer.optimizer.state.values() for t in st.values() if t.dim() > 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == k and held == 2 * k  # exp_avg and exp_avg_sq of the k entries, nothing dense
    assert k == round(density * sum(w.numel() for w in eligible_weights(model).values()))


def test_storage_is_proportional_to_density_and_round_trips(tmp_path):
    meta = {"base": {"name_or_path": "tiny", "task": "causal-lm"}}
    for density in (0.01, 0.04):
        base, model, method, _, _ = trained({"name": "pafi", "density": density}, steps=2)
        adapter_io.write_adapter(tmp_path / str(density), method, model, meta)
        path = tmp_path / str(density) / adapter_io.WEIGHTS
        header = int.from_bytes(path.read_bytes()[:8], "little")
        k = sum(w.sparse_values.numel() for w in method.wrappers(model).values())
        assert path.stat().st_size - 8 - header == 8 * k  # an int32 index and an fp32 value per selected entry
        sd = load_file(str(path))
        assert all(v.dtype == torch.int32 for k, v in sd.items() if k.endswith("sparse_indices"))
        reloaded = copy.deepcopy(base)
        m2 = build_method({"name": "fish", "density": density})  # the stored indices define the mask, not the rule
        m2.apply(reloaded)
        m2.load_state_dict(reloaded, sd)
        assert torch.equal(logits(reloaded), logits(model))


def test_fish_mask_is_the_top_k_empirical_fisher():
    base, model, method, _, _ = trained({"name": "fish", "density": 0.02, "num_samples": 6}, steps=1)
    weights = {n: m.weight for n, m in base.named_modules() if is_linear(m) and ".layers." in n}
    fisher = {n: torch.zeros_like(w) for n, w in weights.items()}
    from peftcli.loss import LossModel

    ref = copy.deepcopy(base)
    ref_weights = {n: m.weight for n, m in ref.named_modules() if n in weights}
    for w in ref_weights.values():
        w.requires_grad_(True)
    order = Trainer.for_model(copy.deepcopy(base), build_method({"name": "pafi"}), ROWS, max_steps=1, batch_size=4).batches.order(0)
    lm = LossModel(ref, "causal-lm").eval()
    for i in order[:6]:  # per-example gradients, squared, averaged
        batch = {"input_ids": IDS[i:i + 1], "attention_mask": torch.ones(1, 12, dtype=torch.long), "labels": IDS[i:i + 1]}
        grads = torch.autograd.grad(lm(**batch)[0], list(ref_weights.values()))
        for n, g in zip(ref_weights, grads, strict=True):
            fisher[n] += g.square() / 6
    flat = torch.cat([f.reshape(-1) for f in fisher.values()])
    k = round(0.02 * flat.numel())
    top = set(flat.argsort(descending=True, stable=True)[:k].tolist())
    got, start = set(), 0
    for n, w in weights.items():
        got |= {start + i for i in picked(method, model).get(n, set())}
        start += w.numel()
    assert len(got) == k and len(got & top) >= k - 2, len(got & top)  # float ties at the threshold aside


def test_child_tuning_d_keeps_reserve_p_and_f_masks_gradients_densely():
    _, model, method, _, _ = trained({"name": "child_tuning", "mode": "d", "reserve_p": 0.3, "num_samples": 4}, steps=1)
    info = method.describe(model)
    assert abs(info["density"] - 0.3) < 1e-3
    _, model, method, _, _ = trained({"name": "child_tuning", "mode": "f", "reserve_p": 0.3}, steps=1)
    wrappers = method.wrappers(model).values()
    assert all(w.dense and w.sparse_values.numel() == w.base_layer.weight.numel() for w in wrappers)
    moved = sum(int((w.sparse_values != 0).sum()) for w in wrappers)  # step 1: masked entries got no update
    total = sum(w.sparse_values.numel() for w in wrappers)
    assert 0.25 < moved / total < 0.35
    assert all(k.endswith("sparse_delta") or "lm_head" in k for k in method.state_dict(model))


def test_lt_sft_resets_after_the_full_phase_and_keeps_the_entries_that_moved(capsys):
    base, model, method, trainer, _ = trained({"name": "lt_sft", "density": 0.02, "full_steps": 3}, steps=1)
    assert "phase 1/2: full fine-tuning" in capsys.readouterr().out
    # the dense phase's weights were reset: merged with zero values the model is the base
    for w in method.wrappers(model).values():
        assert torch.count_nonzero(w.sparse_values) > 0  # one sparse step was taken
    k = sum(len(s) for s in picked(method, model).values())
    assert k == round(0.02 * sum(w.numel() for w in eligible_weights(base).values()))
    with torch.no_grad():
        for w in method.wrappers(model).values():
            w.sparse_values.zero_()
    assert torch.equal(logits(model), logits(base))
    # the kept entries are those the full phase moved most: redo the phase by hand
    ref = copy.deepcopy(base)
    m_ref = build_method({"name": "pafi", "density": 0.02})  # same eligibility; trained densely below
    weights = {n: m.weight for n, m in ref.named_modules() if n in eligible_weights(base)}
    start = {n: w.detach().clone() for n, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    t = Trainer.for_model(ref, m_ref, ROWS, max_steps=1, batch_size=len(ROWS), lr=1e-2, warmup_steps=0)
    opt = torch.optim.AdamW(list(weights.values()), lr=1e-3, weight_decay=0.0)  # lt_sft: train.lr / 10, train's decay
    t.dense_phase(opt, 3, label="reference")
    moved = torch.cat([(weights[n] - start[n]).abs().reshape(-1) for n in weights])
    top = set(moved.argsort(descending=True, stable=True)[:k].tolist())
    got, offset = set(), 0
    for n, w in start.items():
        got |= {offset + i for i in picked(method, model).get(n, set())}
        offset += w.numel()
    assert len(got & top) >= k - 2


def test_train_inspect_merge_through_the_cli(tmp_path, tiny_llama_dir):
    runner = CliRunner()
    train = write_jsonl(tmp_path / "t.jsonl", copy_task_rows(32))
    d = recipe_dict(tiny_llama_dir, train, None, tmp_path / "out",
                    method={"name": "pafi", "density": 0.01, "target_modules": "all-linear"},
                    train={"max_steps": 4, "save_every": None, "eval_every": None})
    d["method"] = {"name": "pafi", "density": 0.01}
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", d))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "out"), "--json"]).stdout)
    assert report["selected_entries"] == sum(report["selected_per_tensor"].values()) > 0
    assert report["adapter_bytes"] == (tmp_path / "out" / adapter_io.WEIGHTS).stat().st_size
    merged = runner.invoke(app, ["merge", str(tmp_path / "out"), "-o", str(tmp_path / "m"), "--json"])
    assert merged.exit_code == 0, merged.output
    assert json.loads(merged.stdout)["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # nn.Linear and GPT-2's transposed Conv1D
@pytest.mark.parametrize("sampled", [True, False])
def test_value_gradients_equal_the_dense_weight_gradient(arch, sampled, monkeypatch):
    from peftcli.methods import sparse

    monkeypatch.setattr(sparse, "SAMPLED_BELOW", 1.1 if sampled else 0.0)
    base = tiny_model(arch)
    layer = next(m for n, m in base.named_modules() if is_linear(m) and n.count(".") >= 3)
    w0 = layer.weight.detach().clone()  # the wrapper writes base + values into the selected entries
    idx = torch.randperm(layer.weight.numel(), generator=torch.Generator().manual_seed(1))[:40].sort().values
    wrapper = SparseDeltaLinear(layer, idx)
    with torch.no_grad():
        wrapper.sparse_values.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 7, layer.weight.shape[0] if arch == "gpt2" else layer.weight.shape[1], requires_grad=True)
    wrapper(x).square().sum().backward()
    # reference: autograd through a dense W + scatter(values)
    assert not torch.equal(layer.weight, w0) and torch.equal(layer.weight.reshape(-1)[idx], w0.reshape(-1)[idx] + wrapper.sparse_values)
    w = w0.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    eff = w + torch.zeros(w.numel()).index_add(0, idx, wrapper.sparse_values.detach()).view_as(w)
    out = x_ref @ eff + layer.bias if arch == "gpt2" else torch.nn.functional.linear(x_ref, eff, layer.bias)
    out.square().sum().backward()
    assert torch.allclose(wrapper.sparse_values.grad, w.grad.reshape(-1)[idx], rtol=1e-4, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
