"""Bottleneck adapters (houlsby, pfeiffer, parallel): the sites table per architecture, each adapter's output
against the formula written out here (serial on the sublayer output, parallel on its input), the inference
cost `inspect` reports, and the CLI path (train -> inspect -> merge refusal, nothing written).
(Zero-init no-op, counts, round trip, merge refusal, training: test_contract.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCH_TASK, IDS, copy_task_rows, make, perturb, recipe_dict, write_jsonl, write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.errors import UserError
from peftcli.methods import build_method
from peftcli.methods.adapters import Parallel, parallel_ffn_adapter

H = 32

SITES = {  # (attention site, FFN site) of block 0: the layer whose output gets the adapter, the layer whose input feeds it
    "llama": (("model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj"),
              ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj")),
    "gpt2": (("transformer.h.0.attn.c_proj", "transformer.h.0.attn.c_attn"),
             ("transformer.h.0.mlp.c_proj", "transformer.h.0.mlp.c_fc")),
    "bert": (("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.attention.self.query"),
             ("bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.intermediate.dense")),
}


def applied(arch, **opts):
    base = make(arch)
    model = copy.deepcopy(base)
    method = build_method(opts)
    method.apply(model, ARCH_TASK[arch])
    return base, model, method


@pytest.mark.parametrize("arch", list(SITES))
def test_sites_are_the_sublayer_boundaries_of_each_architecture(arch):
    (attn_out, attn_in), (ffn_out, ffn_in) = SITES[arch]
    _, model, houlsby = applied(arch, name="houlsby")
    assert houlsby.wrapped == [attn_out, ffn_out, attn_out.replace(".0.", ".1."), ffn_out.replace(".0.", ".1.")]
    kinds = {type(model.get_submodule(n)).__name__ for n in houlsby.norms}
    assert kinds <= {"LayerNorm", "LlamaRMSNorm"} and len(houlsby.norms) == 4  # two per block
    _, _, pfeiffer = applied(arch, name="pfeiffer")
    assert pfeiffer.wrapped == [ffn_out, ffn_out.replace(".0.", ".1.")] and not pfeiffer.norms
    _, _, parallel = applied(arch, name="parallel", placement=["attn", "ffn"], layers_to_transform=0)
    assert parallel.inputs == {attn_out: attn_in, ffn_out: ffn_in}


@pytest.mark.parametrize("arch", list(SITES))
@pytest.mark.parametrize("name", ["houlsby", "parallel"])
def test_adapter_output_is_the_formula(arch, name):
    """Serial: y + s A(y) on the sublayer's output; parallel: y + s A(x) with x the sublayer's input (what its
    input layer receives), A(h) = f(h W_down^T + b_down) W_up^T + b_up."""
    _, model, method = applied(arch, name=name, placement=["attn", "ffn"], activation="gelu", scale=3.0)
    perturb(model, scale=0.3)
    seen = {}
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: seen.__setitem__(f"in:{p}", a[0]))
             for p in method.wrapped + list(method.inputs.values())]
    hooks += [model.get_submodule(p).base_layer.register_forward_hook(lambda m, a, y, p=p: seen.__setitem__(f"y:{p}", y))
              for p in method.wrapped]
    hooks += [model.get_submodule(p).register_forward_hook(lambda m, a, y, p=p: seen.__setitem__(f"out:{p}", y))
              for p in method.wrapped]
    with torch.no_grad():
        model(input_ids=IDS)
    for h in hooks:
        h.remove()
    for path, site in method.wrappers(model).items():
        y = seen[f"y:{path}"]
        h = seen[f"in:{method.inputs[path]}"] if name == "parallel" else y
        down, up = site.adapter_down, site.adapter_up
        want = y + 3.0 * (F.gelu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)
        torch.testing.assert_close(seen[f"out:{path}"], want, atol=1e-5, rtol=1e-5)
        assert (want - y).abs().max() > 1e-3  # the adapter contributes


def test_added_flops_per_token_and_the_reusable_parallel_adapter():
    _, model, method = applied("llama", name="houlsby", bottleneck=4)
    r, sites = 4, 4
    assert method.describe(model)["added_flops_per_token"] == sites * (4 * H * r + 2 * r + 2 * H)
    mam_half = parallel_ffn_adapter(bottleneck=8, scale=4.0)  # what MAM puts beside the FFN
    assert isinstance(mam_half, Parallel) and mam_half.opts.placement == ["ffn"]
    model = make("gpt2")
    mam_half.apply(model)
    assert mam_half.wrapped == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert mam_half.describe(model)["bottleneck"] == 8 and mam_half.describe(model)["scale"] == 4.0


def test_unknown_architecture_and_missing_block_are_one_line_errors():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                   word_embed_proj_dim=16, max_position_embeddings=32))
    with pytest.raises(UserError, match="no adapter sites for model type 'opt' \\(supported: .*llama"):
        build_method({"name": "pfeiffer"}).apply(opt)
    with pytest.raises(UserError, match="block 5 does not exist \\(the model has 2: 0..1\\)"):
        build_method({"name": "pfeiffer", "layers_to_transform": [5]}).apply(make("llama"))


def test_cli_train_inspect_and_merge_refusal(tmp_path, tiny_llama_dir):
    runner = CliRunner()
    train = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(16))
    recipe = recipe_dict(tiny_llama_dir, train, None, tmp_path / "out", train={"max_steps": 3, "save_every": None, "eval_every": None})
    recipe["method"] = {"name": "parallel", "bottleneck": 4}
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--json"])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PARALLEL" and cfg["layout"] == "peftcli" and cfg["r"] == 4
    assert cfg["sites"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    report = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "out"), "--json"]).stdout)
    assert report["method"] == "parallel" and report["trainable_params"] == 2 * (2 * H * 4 + 4 + H)
    assert report["added_flops_per_token"] == 2 * (4 * H * 4 + 2 * 4 + 2 * H)
    result = runner.invoke(app, ["merge", str(tmp_path / "out"), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 2 and not (tmp_path / "merged").exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot be folded into the base weights" in lines[0] and "adapter directory" in lines[0]
