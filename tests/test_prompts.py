"""Prompt tuning, P-tuning and prefix tuning on tiny random Llama, GPT-2 and BERT models: outputs change
only through the virtual tokens and stay aligned with the real tokens, closed-form counts, training through
the real train step, save -> load, batched left-padded generation, HF PEFT interop both ways, CLI runs and
the merge refusal."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    copy_task_rows,
    padded_lm_batch,
    recipe_dict,
    tiny_model,
    tiny_tokenizer,
    write_jsonl,
    write_recipe,
)

from peftcli import adapter_io
from peftcli.methods import build_method
from peftcli.methods.prompts import KEY
from peftcli.train import Trainer

N, H = 4, 8  # virtual tokens, encoder width
D, LAYERS = 32, 2  # tiny_model's hidden size and depth
KV = {"llama": 16, "gpt2": 32, "bert": 32}  # key/value width per layer (tiny Llama: 2 of 4 heads for keys/values)
TASK = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "seq-cls"}
HEAD = {"bert": 2 * D + 2}  # BERT's classifier, trained and stored in full
VARIANTS = {
    "prompt": {"name": "prompt_tuning", "num_virtual_tokens": N},
    "ptuning": {"name": "p_tuning", "num_virtual_tokens": N, "encoder_hidden_size": H},
    "ptuning-lstm": {"name": "p_tuning", "num_virtual_tokens": N, "encoder_hidden_size": H, "encoder": "lstm"},
    "prefix": {"name": "prefix_tuning", "num_virtual_tokens": N, "encoder_hidden_size": H},
    "prefix-direct": {"name": "prefix_tuning", "num_virtual_tokens": N, "projection": False},
}
MAIN = ["prompt", "ptuning", "prefix"]


def trainable_formula(variant: str, arch: str) -> int:
    kv = KV[arch]
    lstm = sum(2 * (4 * H * (i + H) + 8 * H) for i in (D, 2 * H))  # 2 layers x 2 directions: W_ih, W_hh, two biases
    return {
        "prompt": N * D,
        "ptuning": N * D + (D * H + H) + (H * H + H) + (H * D + D),
        "ptuning-lstm": N * D + lstm + (2 * H * 2 * H + 2 * H) + (2 * H * D + D),
        "prefix": N * kv + (kv * H + H) + (H * LAYERS * 2 * kv + LAYERS * 2 * kv),
        "prefix-direct": N * LAYERS * 2 * kv,
    }[variant] + HEAD.get(arch, 0)


def stored_formula(variant: str, arch: str) -> int:
    width = LAYERS * 2 * KV[arch] if variant.startswith("prefix") else D
    return N * width + HEAD.get(arch, 0)


def tiny(arch: str, seed: int = 0):
    if arch != "gpt2":
        return tiny_model(arch, TASK[arch], seed=seed)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)  # conftest's GPT-2 keeps the 0.02 init, whose near-uniform outputs a prompt can hardly move
    return GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=D, n_layer=LAYERS, n_head=4, n_positions=128, pad_token_id=0,
                                      initializer_range=0.3)).eval()


def applied(arch: str, variant: str, seed: int = 0):
    base = tiny(arch, seed)
    model = copy.deepcopy(base)
    method = build_method(dict(VARIANTS[variant]))
    method.apply(model, TASK[arch])
    return base, model.eval(), method


def batch():
    return padded_lm_batch()  # (ids, mask, labels): 3 rows of 12, two right-padded


@torch.no_grad()
def out(model, ids=None, mask=None):
    ids, mask = (batch()[:2]) if ids is None else (ids, mask)
    return model(input_ids=ids, attention_mask=mask).logits


# --------------------------------------------------------------------------- mechanism
@pytest.mark.parametrize("variant", MAIN)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_outputs_change_only_through_the_virtual_tokens(arch, variant):
    base, model, method = applied(arch, variant)
    ref = out(base)
    with method.disabled():  # every base module is untouched: without the virtual tokens the model is the base
        assert torch.equal(out(model), ref)
    got = out(model)
    assert got.shape == ref.shape  # logits for the real positions only (causal LM: (3, 12, vocab))
    assert (got - ref).abs().max() > 1e-3
    ids, mask = batch()[:2]
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert hidden.shape[1] == ids.shape[1]  # the backbone's outputs are aligned with the real tokens


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_counts_match_closed_formulas(arch, variant):
    _, model, method = applied(arch, variant)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable_formula(variant, arch)
    sd = method.state_dict(model)
    assert sum(t.numel() for t in sd.values()) == stored_formula(variant, arch)
    facts = method.describe(model)
    assert facts["virtual_tokens"] == N
    assert facts["added_flops_per_token"] == 4 * N * D * LAYERS  # q.k and a.v against n more keys in every layer
    if arch == "llama" and not variant.startswith("prefix"):  # n more positions through the body once per sequence
        body = LAYERS * (D * D * 2 + D * 16 * 2 + 3 * D * 64 + 2 * D) + D  # q, o; k, v (2 kv heads); MLP; norms; final norm
        assert facts["added_flops_per_sequence"] == 2 * N * body


@pytest.mark.parametrize("variant", ["prompt", "prefix"])
def test_selective_head_loss_equals_the_models_own_loss(variant):
    from peftcli.loss import LossModel

    _, model, _ = applied("llama", variant)
    ids, mask, labels = batch()
    lm = LossModel(model, "causal-lm")
    assert lm.selective and not lm.padding_free  # one set of virtual tokens per sequence: no flattened batches
    with torch.no_grad():
        ours, _ = lm(ids, mask, labels)
        theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_seq_cls_pools_the_real_tokens():
    # Llama pools the last real token: a row's logits do not depend on its right padding
    model = tiny_model("llama", "seq-cls")
    method = build_method(dict(VARIANTS["prompt"]))
    method.apply(model, "seq-cls")
    model.eval()
    ids, mask, _ = batch()
    padded = out(model, ids, mask)
    for i in range(3):
        n = int(mask[i].sum())
        torch.testing.assert_close(padded[i], out(model, ids[i:i + 1, :n], mask[i:i + 1, :n])[0], atol=1e-5, rtol=0)
    # BERT pools the real [CLS]: the pooler sees the first real position, not a virtual token
    _, bert, _ = applied("bert", "prompt")
    with torch.no_grad():
        o = bert.bert(input_ids=ids, attention_mask=mask)
        assert o.last_hidden_state.shape[1] == ids.shape[1]
        torch.testing.assert_close(o.pooler_output, bert.bert.pooler(o.last_hidden_state), atol=0, rtol=0)


# --------------------------------------------------------------------------- training, storage, generation
def rows_for(arch: str) -> list[dict]:
    toy = torch.tensor([5, 9, 5, 9]).unsqueeze(1).repeat(1, 12)  # each sequence repeats one token
    if TASK[arch] == "seq-cls":
        return [{"input_ids": r.tolist(), "labels": int(r[0] == 9)} for r in toy]
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in toy]


@pytest.mark.parametrize("variant", MAIN)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_training_lowers_the_loss(arch, variant):
    _, model, method = applied(arch, variant)
    trainer = Trainer.for_model(model, method, rows_for(arch), task=TASK[arch], max_steps=8, batch_size=4, lr=5e-2,
                                scheduler="constant", warmup_steps=0, max_grad_norm=None)
    losses = [trainer.train_step(step)["loss"] for step in range(8)]
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.parametrize("variant", MAIN)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_save_then_load_gives_identical_logits(arch, variant, tmp_path):
    base, model, method = applied(arch, variant)
    adapter_io.write_adapter(tmp_path, method, model, {"base": {"name_or_path": "tiny", "task": TASK[arch]}})
    adapter = adapter_io.read_adapter(tmp_path)
    assert adapter.config["peft_type"] == method.peft_type
    fresh = copy.deepcopy(base)
    again = adapter_io.method_for(adapter)
    again.apply(fresh, TASK[arch])
    again.load_state_dict(fresh, adapter_io.load_tensors(adapter))
    torch.testing.assert_close(out(fresh.eval()), out(model), atol=1e-6, rtol=0)
    # only the produced prompts are kept: the loaded method has no encoder / MLP left
    assert sum(p.numel() for p in fresh.parameters() if p.requires_grad) == stored_formula(variant, arch)


@pytest.mark.parametrize("variant", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_left_padded_generation_equals_one_by_one(arch, variant):
    from peftcli.generation import generate

    _, model, _ = applied(arch, variant)
    tok = tiny_tokenizer()
    prompts = [[1037, 2204, 3185, 2003, 1012], [2023, 2003], [1996, 4937, 2938]]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert batched == generate(model, tok, prompts, max_new_tokens=6, batch_size=1)
    # and the cached decoding equals greedy decoding recomputed from scratch at every step
    seq = list(prompts[0])
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    assert tok.decode(seq[len(prompts[0]):], skip_special_tokens=True) == batched[0]


# --------------------------------------------------------------------------- HF PEFT interop
IDS = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", ["prompt", "ptuning-lstm", "prefix"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_loads_ours_with_the_same_logits(arch, variant, tmp_path):
    from peft import PeftModel

    base, model, method = applied(arch, variant)
    adapter_io.write_adapter(tmp_path, method, model, {"base": {"name_or_path": "tiny", "task": "causal-lm"}})
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        ref = theirs(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits[:, -IDS.shape[1]:]  # PEFT returns virtual positions too
    torch.testing.assert_close(out(model, IDS, torch.ones_like(IDS)), ref, atol=1e-5, rtol=0)


def test_peft_loads_ours_seq_cls_llama(tmp_path):
    # (PEFT's prefix tuning refuses seq-cls models, and on BERT it pools the first virtual token where we pool [CLS])
    from peft import PeftModel

    base = tiny_model("llama", "seq-cls")
    model = copy.deepcopy(base)
    method = build_method(dict(VARIANTS["prompt"]))
    method.apply(model, "seq-cls")
    adapter_io.write_adapter(tmp_path, method, model.eval(), {"base": {"name_or_path": "tiny", "task": "seq-cls"}})
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        torch.testing.assert_close(out(model, IDS, mask), theirs(input_ids=IDS, attention_mask=mask).logits, atol=1e-5, rtol=0)


def peft_config(kind: str):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    return {"prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N),
            "ptuning": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N, encoder_hidden_size=H),
            "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N, prefix_projection=True,
                                         encoder_hidden_size=H)}[kind]


@pytest.mark.parametrize("kind", ["prompt", "ptuning", "prefix"])
def test_peft_written_adapters_load_in_peftcli(kind, tmp_path):
    from peft import get_peft_model

    base = tiny("llama")
    theirs = get_peft_model(copy.deepcopy(base), peft_config(kind)).eval()
    theirs.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = theirs(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits[:, -IDS.shape[1]:]
    adapter = adapter_io.read_adapter(tmp_path)
    assert adapter.meta is None and adapter.options.name == VARIANTS[kind]["name"]
    method = adapter_io.method_for(adapter)
    model = copy.deepcopy(base)
    method.apply(model)
    method.load_state_dict(model, adapter_io.load_tensors(adapter))
    torch.testing.assert_close(out(model.eval(), IDS, torch.ones_like(IDS)), ref, atol=1e-5, rtol=0)


def test_wrong_prompt_shape_is_a_user_error(tmp_path):
    from peftcli.errors import UserError

    _, model, method = applied("llama", "prompt")
    with pytest.raises(UserError, match=r"prompt_embeddings has shape \(5, 32\), the model expects \(4, 32\)"):
        method.load_state_dict(model, {KEY: torch.zeros(5, 32)})


def test_learned_positions_budget_is_a_user_error():
    from peftcli.errors import UserError

    _, model, _ = applied("gpt2", "prefix")  # 128 learned positions, 4 taken by the virtual tokens
    model(input_ids=torch.ones(1, 124, dtype=torch.long))
    with pytest.raises(UserError, match="4 virtual tokens \\+ 125 tokens exceed the model's 128 positions"):
        model(input_ids=torch.ones(1, 125, dtype=torch.long))


# --------------------------------------------------------------------------- CLI
def test_cli_trains_each_method_and_merge_refuses(tmp_path, tiny_llama_dir):
    import subprocess
    import sys

    from typer.testing import CliRunner

    from peftcli.cli import app

    train = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(16))
    runs = {}
    for name, opts in [("prompt_tuning", {"num_virtual_tokens": 4, "init": {"text": "repeat the word"}}),
                       ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 8}),
                       ("prefix_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 8})]:
        run = tmp_path / name
        recipe = recipe_dict(tiny_llama_dir, train, None, run, method={"name": name, **opts},
                             train={"max_steps": 3, "batch_size": 8, "lr": 3e-2, "eval_every": 100, "save_every": 100})
        recipe["method"] = {"name": name, **opts}  # no LoRA keys from the fixture's default
        result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / f"{name}.yaml", recipe)), "--json"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        config = json.loads((run / "adapter_config.json").read_text())
        assert config["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}[name]
        assert config["num_virtual_tokens"] == 4
        runs[name] = run
    # the text init is the embedding of the text's tokens, repeated to the length (stored after 3 steps: close to it)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    emb = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).get_input_embeddings().weight
    ids = (tiny_tokenizer()("repeat the word", add_special_tokens=False)["input_ids"] * 4)[:4]
    stored = load_file(str(runs["prompt_tuning"] / "adapter_model.safetensors"))[KEY]
    assert (stored - emb[ids]).abs().max() < 0.2 < (stored - emb[[7, 8, 9, 10]]).abs().max()
    out_dir = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "peftcli", "merge", str(runs["prefix_tuning"]), "--output", str(out_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot be folded" in proc.stderr and "peftcli export --format peft" in proc.stderr
    assert not out_dir.exists()
