"""Hybrid recipes (`method:` a list): collisions are one-line recipe errors, a hybrid trains and
round-trips through its adapter directory, counts add up, `merge` refuses what cannot fold and
`merge --partial` splits it into a merged model + an adapter that together compute the same logits,
`inspect` reports the added inference cost. Tiny random models; the CLI where the user would be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import copy_task_rows, recipe_dict, tiny_model, write_jsonl, write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.methods import build_method
from peftcli.methods.hybrid import hybrid_options

runner = CliRunner()
N_VIRTUAL = 4
PREFIX = {"name": "prefix_tuning", "num_virtual_tokens": N_VIRTUAL, "encoder_hidden_size": 16}
LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid")
    return tmp, write_jsonl(tmp / "train.jsonl", copy_task_rows(48)), write_jsonl(tmp / "eval.jsonl", copy_task_rows(8, seed=1))


def hybrid_recipe(tmp: Path, model_dir, train, eval_, method, name: str, **train_cfg) -> Path:
    d = recipe_dict(model_dir, train, eval_, tmp / name, train={"max_steps": 30, "eval_every": 30, "save_every": 100,
                                                                   "lr": 1e-2, **train_cfg})
    d["method"] = method
    return write_recipe(tmp / f"{name}.yaml", d)


@pytest.fixture(scope="module")
def prefix_lora(data, tiny_llama_dir):
    """prefix tuning + LoRA on q/v, trained through the CLI (with a --set into the list)."""
    tmp, train, eval_ = data
    recipe = hybrid_recipe(tmp, tiny_llama_dir, train, eval_, [PREFIX, LORA], "prefix-lora")
    result = invoke("train", recipe, "--set", "method.1.r=8", "--json")
    assert result.exit_code == 0, result.output
    return tmp / "prefix-lora"


def test_collision_is_a_one_line_recipe_error(data, tiny_llama_dir):
    tmp, train, eval_ = data
    same = hybrid_recipe(tmp, tiny_llama_dir, train, eval_, [LORA, {"name": "ia3", "target_modules": ["q_proj"]}], "clash")
    line = one_error_line(invoke("train", same))
    assert ("method.0.target_modules and method.1.target_modules both adapt model.layers.0.self_attn.q_proj" in line), line
    assert not (tmp / "clash").exists()
    two = hybrid_recipe(tmp, tiny_llama_dir, train, eval_, [PREFIX, {"name": "prompt_tuning"}], "tokens")
    line = one_error_line(invoke("train", two))
    assert "method.0.name (prefix_tuning) and method.1.name (prompt_tuning) both add virtual tokens" in line, line
    assert not (tmp / "tokens").exists()
    line = one_error_line(invoke("train", hybrid_recipe(tmp, tiny_llama_dir, train, eval_, [LORA, PREFIX], "bad-set"),
                                 "--set", "method.2.r=8"))
    assert "--set method.2.r=8: method is a list of 2" in line, line


def test_hybrid_trains_and_stores_its_parts(prefix_lora):
    m = [json.loads(x) for x in (prefix_lora / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in m if "loss" in e]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    meta = json.loads((prefix_lora / "peftcli.json").read_text())
    assert meta["method"]["name"] == "hybrid" and [p["name"] for p in meta["method"]["parts"]] == ["prefix_tuning", "lora"]
    assert meta["method"]["parts"][1]["r"] == 8  # --set method.1.r=8
    cfg = json.loads((prefix_lora / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "HYBRID"
    assert [(p["key_prefix"], p["peft_type"]) for p in cfg["parts"]] == [("part0.", "PREFIX_TUNING"), ("part1.", "LORA")]
    from safetensors import safe_open

    with safe_open(str(prefix_lora / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "part0.prompt_embeddings" in keys
    assert "part1.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert all(k.startswith(("part0.", "part1.")) for k in keys)


MAM = {"name": "mam", "prefix_length": 3, "prefix_hidden": 8, "bottleneck": 4}


def saved_adapter(directory: Path, model_dir: Path, options):
    """`options` applied to the model in `model_dir`, moved away from init, written as an adapter directory;
    returns (method, model)."""
    from peftcli import adapter_io
    from peftcli.models import fingerprint, load_model
    from peftcli.recipe import ModelCfg

    loaded = load_model(ModelCfg(name_or_path=str(model_dir)))
    fp = fingerprint(loaded.model)
    method = build_method(options)
    method.apply(loaded.model)
    torch.manual_seed(1)
    with torch.no_grad():  # away from init, so a part that failed to load would show
        for p in loaded.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    adapter_io.write_adapter(directory, method, loaded.model,
                             {"base": {"name_or_path": str(model_dir), "task": "causal-lm", "fingerprint": fp}})
    return method, loaded.model.eval()


@pytest.mark.parametrize("options", [hybrid_options([PREFIX, LORA, {"name": "ia3", "target_modules": ["down_proj"]}]), MAM],
                         ids=["prefix+lora+ia3", "mam"])
def test_save_load_gives_identical_logits(tmp_path, tiny_llama_dir, options):
    from peftcli.merge import load_adapted
    from peftcli.models import load_model
    from peftcli.recipe import ModelCfg

    _, model = saved_adapter(tmp_path / "a", tiny_llama_dir, options)
    ids = torch.randint(5, 1000, (2, 9))
    before = model(input_ids=ids).logits
    after = load_adapted(tmp_path / "a").loaded.model(input_ids=ids).logits
    assert torch.equal(before, after)
    base = load_model(ModelCfg(name_or_path=str(tiny_llama_dir))).model.eval()(input_ids=ids).logits
    assert not torch.allclose(base, after, atol=1e-3)


def test_mam_is_prefix_plus_parallel_adapter_with_the_papers_defaults(tmp_path, tiny_llama_dir):
    from peftcli.methods.hybrid import MAMOptions

    o = MAMOptions()
    assert (o.prefix_length, o.prefix_hidden, o.bottleneck, o.scale) == (30, 800, 512, 4.0)  # He et al. 2021
    method, model = saved_adapter(tmp_path / "mam", tiny_llama_dir, MAM)
    prefix, parallel = method.parts
    assert (prefix.name, prefix.opts.num_virtual_tokens, prefix.opts.encoder_hidden_size) == ("prefix_tuning", 3, 8)
    assert (parallel.name, parallel.opts.bottleneck, parallel.opts.scale, parallel.opts.placement) == ("parallel", 4, 4.0, ["ffn"])
    n, h, kv, layers, d, r = 3, 8, 16, 2, 32, 4
    prefix_count = n * kv + (kv * h + h) + (h * layers * 2 * kv + layers * 2 * kv)  # P', MLP (trained; only its output kept)
    parallel_count = layers * (d * r + r + r * d + d)  # W_down, b_down, W_up, b_up at each FFN
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == prefix_count + parallel_count
    heads, head_dim = 4, 8
    assert method.describe(model)["added_flops_per_token"] == (4 * n * heads * head_dim * layers
                                                               + layers * (4 * d * r + 2 * r + 2 * d))
    out = tmp_path / "merged"
    for extra in ((), ("--partial",)):
        line = one_error_line(invoke("merge", tmp_path / "mam", "-o", out, *extra))
        assert "method 'mam' adds virtual keys/values and parallel adapters that cannot be folded" in line, line
        assert "deploy the adapter directory unmerged" in line and not out.exists()


def test_param_count_is_the_sum_of_the_parts_formulas():
    model = tiny_model("llama")  # hidden 32, 2 layers, 4 heads / 2 kv heads (head 8), FFN 64
    method = build_method(hybrid_options([LORA, {"name": "ia3", "target_modules": ["k_proj", "down_proj"]}]))
    method.apply(model)
    r, d, kv, ff, layers = 4, 32, 16, 64, 2
    lora = layers * (r * (d + d) + r * (d + kv))  # q: 32->32, v: 32->16
    ia3 = layers * (kv + ff)  # k scales its 16 outputs, down_proj (feed-forward) its 64 inputs
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora + ia3


def test_mergeable_hybrid_merges_exactly():
    from peftcli.merge import layout

    model = tiny_model("gpt2")
    base = layout(model)
    method = build_method(hybrid_options([{"name": "lora", "r": 4, "target_modules": ["c_attn"]},
                                          {"name": "ia3", "target_modules": ["mlp.c_proj"]}]))
    method.apply(model)
    assert method.mergeable
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(5, 1000, (2, 9))
    before = model(input_ids=ids).logits
    method.merge(model)
    assert layout(model) == base
    assert (model(input_ids=ids).logits - before).abs().max() <= 1e-4


def test_merge_refuses_and_partial_merge_is_equivalent(prefix_lora, tmp_path, tiny_llama_dir):
    from peftcli.merge import load_adapted, probe_logits

    out = tmp_path / "merged"
    line = one_error_line(invoke("merge", prefix_lora, "-o", out))
    assert "method.0 (prefix_tuning) cannot be folded into the base weights; pass --partial" in line, line
    assert not out.exists() and not list(tmp_path.iterdir())
    line = one_error_line(invoke("export", prefix_lora, "--format", "peft", "-o", out))
    assert "a HYBRID adapter has no HF PEFT layout; deploy the adapter directory with peftcli, or `peftcli merge --partial`" in line
    assert not out.exists()
    result = invoke("merge", prefix_lora, "-o", out, "--partial", "--json")
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["merged"] == ["method.1 (lora)"] and res["remaining"] == ["method.0 (prefix_tuning)"] and res["verified"]
    # the merged model is a plain Llama whose q/v weights moved; the rest is a prefix-tuning adapter for it
    from safetensors.torch import load_file

    merged_w = load_file(str(out / "model.safetensors"))
    base_w = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert set(merged_w) == set(base_w)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged_w[q], base_w[q]) and torch.equal(merged_w["model.layers.0.mlp.up_proj.weight"],
                                                                     base_w["model.layers.0.mlp.up_proj.weight"])
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    full = load_adapted(prefix_lora)
    split = load_adapted(out / "adapter")
    tok = full.loaded.tokenizer
    tok.pad_token = tok.pad_token or tok.eos_token
    a, b = probe_logits(full.loaded.model, tok), probe_logits(split.loaded.model, tok)
    assert (a - b).abs().max() <= 1e-4
    base = load_adapted(prefix_lora)  # without the prefix the merged model alone differs: the adapter is needed
    with base.method.parts[0].disabled():
        assert (probe_logits(base.loaded.model, tok) - a).abs().max() > 1e-3


def test_inspect_reports_the_inference_cost(data, tiny_llama_dir, prefix_lora):
    tmp, train, eval_ = data
    recipe = hybrid_recipe(tmp, tiny_llama_dir, train, eval_, [PREFIX, LORA], "inspect")
    layers, heads, head_dim = 2, 4, 8
    for target in (recipe, prefix_lora):  # a recipe, and the trained adapter directory
        result = invoke("inspect", target, "--json")
        assert result.exit_code == 0, result.output
        rep = json.loads(result.stdout)
        assert rep["virtual_tokens"] == N_VIRTUAL
        assert rep["added_flops_per_token"] == 4 * N_VIRTUAL * heads * head_dim * layers  # q.k and a.v over n more keys
        assert rep["inference_cost"]["added_flops_per_token"] == rep["added_flops_per_token"]
        assert [p["method"] for p in rep["parts"]] == ["prefix_tuning", "lora"]
    table = invoke("inspect", recipe).output
    assert f"+{4 * N_VIRTUAL * heads * head_dim * layers:,} FLOPs per token" in table, table
    assert f"{N_VIRTUAL} virtual tokens" in table, table


def test_every_training_hook_reaches_every_part():
    from conftest import toy_trainer

    model = tiny_model("llama")
    method = build_method(hybrid_options([LORA, {"name": "ia3", "target_modules": ["down_proj"]}]))
    method.apply(model)
    calls: list[tuple[int, str]] = []
    for i, part in enumerate(method.parts):
        for hook in ("validate_training", "before_training", "extra_loss", "before_optimizer_step", "on_optimizer_step",
                     "training_state", "load_training_state"):
            def record(*args, _i=i, _hook=hook, _orig=getattr(part, hook)):
                calls.append((_i, _hook))
                return _orig(*args)
            setattr(part, hook, record)
    trainer = toy_trainer(model, method, "llama", steps=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train_step(0)
    method.load_training_state(model, method.training_state(model))
    for i in range(2):
        for hook in ("validate_training", "before_training", "extra_loss", "before_optimizer_step", "on_optimizer_step",
                     "training_state", "load_training_state"):
            assert (i, hook) in calls, (i, hook)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".lora_B." in n for n in moved) and any(n.endswith(".ia3_l") for n in moved)  # both parts in the optimizer


def test_mam_without_its_prefix_is_its_parallel_adapter():
    """The parts compose: MAM with the prefix switched off computes what its parallel part alone computes."""
    from conftest import perturb

    mam, model = build_method(MAM), tiny_model("llama")
    mam.apply(model)
    perturb(model)
    ids = torch.randint(5, 1000, (2, 9))
    alone, base = build_method(mam.parts[1].opts), tiny_model("llama")
    alone.apply(base)
    alone.load_state_dict(base, mam.part_state(mam.state_dict(model), [1]))
    with torch.no_grad(), mam.parts[0].disabled():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with torch.no_grad():  # and the prefix is what makes them differ
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3
