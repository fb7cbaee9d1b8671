"""GGUF export: `--format gguf` (a Llama-family model as one llama.cpp file) and `--format gguf-lora` (a LoRA
adapter as a llama.cpp adapter file).

The tiny model here is a random Llama with a small byte-level BPE tokenizer (conftest's tiny models carry
BERT's WordPiece tokenizer, which llama.cpp's `gpt2` vocabulary cannot express; that case is a refusal
test). Every GGUF file is read back independently of the exporter's own proof: through transformers'
GGUF loader (logits, encodings, chat template) and with `gguf.GGUFReader` (names, shapes, metadata)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_task_rows, recipe_dict, save_tiny, write_jsonl, write_recipe
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.gguf_export import TOLERANCE, permute_qk, unpermute_qk

runner = CliRunner()
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "repeat the word apple", "Numbers 12345, naïve café ✓ 日本語",
         "<|im_start|>user\nhi<|im_end|>\n", "  spaces\tand\nnewlines  "]
LAYERS, HEADS, KV_HEADS = 2, 4, 2


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def bpe_tokenizer():
    """A 400-token byte-level BPE (the GPT-2 / SmolLM2 / Llama 3 kind) with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    words = [f"{r['instruction']} {r['input']} {r['output']}" for r in copy_task_rows(40)]
    t.train_from_iterator(words + TEXTS[:2] * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT
    return tok


def save_bpe_llama(path: Path, seed: int = 0, hidden: int = 64, tie: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    torch.manual_seed(seed)
    # vocab padded past the tokenizer (as real checkpoints often are); init 0.1 keeps the random logits
    # spread out without the chaotic sensitivity a larger init gives to rounding
    cfg = LlamaConfig(vocab_size=416, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      tie_word_embeddings=tie, initializer_range=0.1, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_bpe_llama(tmp_path_factory.mktemp("models") / "bpe-llama")


def make_adapter(base: Path, out: Path, seed: int = 1, **options) -> Path:
    """An adapter as `peftcli train` writes one, with random (non-zero) weights instead of training."""
    from peftcli import adapter_io
    from peftcli.methods import build_method
    from peftcli.models import fingerprint, load_model
    from peftcli.recipe import ModelCfg

    loaded = load_model(ModelCfg(name_or_path=str(base)))
    base_fp = fingerprint(loaded.model)
    method = build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", **options})
    torch.manual_seed(seed)
    method.apply(loaded.model)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "modules_to_save" in name or "ia3" in name):
                p.add_(torch.randn_like(p) * 0.05)
    meta = {"base": {"name_or_path": str(base), "task": "causal-lm", "dtype": "float32", "fingerprint": base_fp,
                     "label_names": None, "new_modules": [], "gguf_file": None, "trust_remote_code": False}}
    adapter_io.write_adapter(out, method, loaded.model, meta)
    return out


def gguf_fields(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (type name, shape as torch writes it, data))."""
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        meta[k] = f.contents() if f.types and f.types[0] != GGUFValueType.ARRAY or k.startswith(("tokenizer", "general")) else None
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in reversed(t.shape)), t) for t in r.tensors}
    return meta, tensors


def dequant(t) -> torch.Tensor:
    from gguf import dequantize

    return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(tuple(int(x) for x in reversed(t.shape)))


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tok


@torch.no_grad()
def logits(model, tok) -> torch.Tensor:
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return model(**enc).logits.float()


def left_over(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------- --format gguf
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_round_trip_through_transformers(llama_dir, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model.gguf"
    res = invoke("export", llama_dir, "--format", "gguf", "-o", out, "--dtype", dtype, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert left_over(tmp_path) == ["model.gguf"] and report["dtype"] == dtype

    ref_tok = AutoTokenizer.from_pretrained(llama_dir)
    ref = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    model, tok = load_gguf(out)
    # tokenizer and chat template survive
    assert tok.chat_template == ref_tok.chat_template == CHAT
    for text in TEXTS + [ref_tok.apply_chat_template([{"role": "user", "content": "hi 42"}], tokenize=False, add_generation_prompt=True)]:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref_tok.bos_token, ref_tok.eos_token, ref_tok.pad_token)
    # logits within the dtype's tolerance, relative to the largest logit
    want, got = logits(ref, ref_tok), logits(model, ref_tok)
    atol, rtol = TOLERANCE[dtype]
    diff = (got - want).abs().max().item()
    assert diff <= atol + rtol * want.abs().max().item(), (dtype, diff, want.abs().max().item())
    assert report["max_abs_diff"] <= report["tolerance"]  # the exporter's own proof (on merge's probe texts)
    if dtype == "f32":
        assert diff <= 1e-4
    # the layout, exactly: the file's weights are the model's rounded once (quantised q/k rows permuted)
    import gguf

    meta, tensors = gguf_fields(out)
    qtype = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert tensors["blk.0.attn_q.weight"][0] == qtype and tensors["blk.0.attn_norm.weight"][0] == "F32"
    w = ref.model.layers[1].self_attn.k_proj.weight.detach()
    rounded = torch.from_numpy(np.array(gguf.quants.dequantize(gguf.quants.quantize(permute_qk(w, KV_HEADS).numpy(), gguf.GGMLQuantizationType[qtype]),
                                                               gguf.GGMLQuantizationType[qtype]), dtype=np.float32))
    assert torch.equal(dequant(tensors["blk.1.attn_k.weight"][2]), rounded.reshape(w.shape))
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, unpermute_qk(rounded.reshape(w.shape), KV_HEADS))


def test_gguf_metadata_is_llama_cpps(llama_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "m.gguf"
    assert invoke("export", llama_dir, "--format", "gguf", "-o", out).exit_code == 0
    meta, tensors = gguf_fields(out)
    cfg, tok = AutoConfig.from_pretrained(llama_dir), AutoTokenizer.from_pretrained(llama_dir)
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"]) == (LAYERS, 64, 128)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"], meta["llama.rope.dimension_count"]) == (HEADS, KV_HEADS, 16)
    assert meta["llama.context_length"] == 128 and meta["llama.vocab_size"] == 416
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"][: len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert meta["tokenizer.ggml.tokens"][-1] == "[PAD415]" and meta["tokenizer.ggml.token_type"][-1] == 5  # UNUSED
    assert meta["tokenizer.ggml.token_type"][tok.eos_token_id] == 3  # CONTROL
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.padding_token_id"]) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert meta["tokenizer.chat_template"] == CHAT and meta["tokenizer.ggml.merges"][0].count(" ") == 1
    names = {f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in
             ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names | {"token_embd.weight", "output_norm.weight", "output.weight"}
    assert tensors["blk.0.attn_k.weight"][1] == (KV_HEADS * 16, 64) and tensors["token_embd.weight"][1] == (416, 64)


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    base = save_bpe_llama(tmp_path / "tied", tie=True)
    out = tmp_path / "tied.gguf"
    res = invoke("export", base, "--format", "gguf", "-o", out, "--dtype", "f16", "--json")
    assert res.exit_code == 0, res.output
    assert "output.weight" not in gguf_fields(out)[1]
    assert load_gguf(out)[0].config.tie_word_embeddings


def test_train_merge_gguf_round_trip_tiny(llama_dir, tmp_path):
    """Tiny round trip: train -> merge -> GGUF, and the adapter directory straight to GGUF (merged in
    memory): both files give the merged model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(32))
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(llama_dir, train, None, tmp_path / "run",
                                                            train={"max_steps": 4, "eval_every": 4, "save_every": 4, "lr": 1e-2}))
    assert (res := invoke("train", recipe, "--json")).exit_code == 0, res.output
    assert (res := invoke("merge", tmp_path / "run", "-o", tmp_path / "merged", "--json")).exit_code == 0, res.output
    assert (res := invoke("export", tmp_path / "merged", "--format", "gguf", "-o", tmp_path / "a.gguf", "--json")).exit_code == 0, res.output
    assert (res := invoke("export", tmp_path / "run", "--format", "gguf", "-o", tmp_path / "b.gguf", "--json")).exit_code == 0, res.output
    assert "adapter merged into" in json.loads(res.stdout)["source"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval(), tok)
    base = logits(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval(), tok)
    assert (merged - base).abs().max() > 1e-3, "training must have changed the model"
    for name in ("a.gguf", "b.gguf"):
        assert (logits(load_gguf(tmp_path / name)[0], tok) - merged).abs().max() <= 1e-4


def test_failed_proof_exits_1_and_writes_nothing(llama_dir, tmp_path, monkeypatch):
    import peftcli.gguf_export as g

    monkeypatch.setitem(g.TOLERANCE, "f32", (-1.0, 0.0))
    res = invoke("export", llama_dir, "--format", "gguf", "-o", tmp_path / "m.gguf", "--dtype", "f32")
    assert res.exit_code == 1 and "nothing written" in res.output
    assert left_over(tmp_path) == []


# ---------------------------------------------------------------------------------------- --format gguf-lora
@pytest.mark.parametrize("rslora", [False, True])
def test_gguf_lora_layout_alpha_and_deltas(llama_dir, tmp_path, rslora):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(llama_dir, tmp_path / "lora", use_rslora=rslora)
    out = tmp_path / "lora.gguf"
    res = invoke("export", adapter, "--format", "gguf-lora", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    meta, tensors = gguf_fields(out)
    r, alpha = 4, 8.0
    want_alpha = alpha * math.sqrt(r) if rslora else alpha  # llama.cpp scales by alpha / r
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(want_alpha) and json.loads(res.stdout)["alpha"] == pytest.approx(want_alpha)
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    assert set(tensors) == {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(LAYERS) for n in hf for ab in "ab"}
    # the delta each module adds, from the file alone, equals what the merge folds into the base
    merged_dir = tmp_path / "merged"
    assert invoke("merge", adapter, "-o", merged_dir).exit_code == 0
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).state_dict()
    stored = load_file(adapter / "adapter_model.safetensors")
    for i in range(LAYERS):
        for g, h in hf.items():
            (ta, sa, a), (tb, sb, b) = tensors[f"blk.{i}.{g}.weight.lora_a"], tensors[f"blk.{i}.{g}.weight.lora_b"]
            w = base[f"model.layers.{i}.{h}.weight"]
            assert ta == tb == "F32" and sa == (r, w.shape[1]) and sb == (w.shape[0], r)  # A (r, in), B (out, r)
            A, B = dequant(a), dequant(b)
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(g)
            if heads:  # B's rows are permuted like the base weight's (convert_lora_to_gguf.py)
                B = unpermute_qk(B, heads)
            assert torch.equal(A, stored[f"base_model.model.model.layers.{i}.{h}.lora_A.weight"])
            delta = (B @ A) * (want_alpha / r)
            torch.testing.assert_close(delta, merged[f"model.layers.{i}.{h}.weight"] - w, atol=1e-5, rtol=1e-4)


def test_gguf_lora_of_pissa_is_the_stored_plain_lora(llama_dir, tmp_path):
    """PiSSA mutates the base while training, but what peftcli stores is a plain rank-2r LoRA on the
    ORIGINAL base: that is expressible, and the file's delta is the stored one."""
    adapter = make_adapter(llama_dir, tmp_path / "pissa", init="pissa", target_modules=["q_proj", "down_proj"])
    stored_meta = json.loads((adapter / "peftcli.json").read_text())["method"]
    assert stored_meta["init"] == "default" and stored_meta["r"] == 8
    res = invoke("export", adapter, "--format", "gguf-lora", "-o", tmp_path / "p.gguf", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rank"] == 8 and json.loads(res.stdout)["alpha"] == pytest.approx(16.0)
    assert gguf_fields(tmp_path / "p.gguf")[1]["blk.0.attn_q.weight.lora_a"][1] == (8, 64)


@pytest.mark.parametrize("kind,options,words", [
    ("dora", {"name": "dora"}, "DoRA"),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ("ia3", {"name": "ia3", "target_modules": None}, "not a LoRA"),
])
def test_gguf_lora_refuses_what_llama_cpp_cannot_express(llama_dir, tmp_path, kind, options, words):
    opts = dict(options)
    if opts.get("name") == "ia3":
        opts = {"name": "ia3"}
        from peftcli import adapter_io
        from peftcli.methods import build_method
        from peftcli.models import load_model
        from peftcli.recipe import ModelCfg

        loaded = load_model(ModelCfg(name_or_path=str(llama_dir)))
        method = build_method(opts)
        method.apply(loaded.model)
        adapter = tmp_path / kind
        adapter_io.write_adapter(adapter, method, loaded.model, {"base": {"name_or_path": str(llama_dir), "task": "causal-lm"}})
    else:
        adapter = make_adapter(llama_dir, tmp_path / kind, **opts)
    out = tmp_path / "out"
    out.mkdir()
    res = invoke("export", adapter, "--format", "gguf-lora", "-o", out / "x.gguf")
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and words in line and "merged model" in line, line
    assert left_over(out) == []
    if kind != "ia3":  # the merged route works for them
        assert invoke("export", adapter, "--format", "gguf", "-o", out / "m.gguf").exit_code == 0


# ---------------------------------------------------------------------------------------- bad input
def test_existing_output_needs_overwrite(llama_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    for fmt, src in (("gguf", llama_dir),):
        res = invoke("export", src, "--format", fmt, "-o", out)
        assert res.exit_code == 2 and "already exists" in res.output and "--overwrite" in res.output
        assert out.read_bytes() == b"keep me" and left_over(tmp_path) == ["m.gguf"]
    res = invoke("export", llama_dir, "--format", "gguf", "-o", out, "--overwrite", "--dtype", "f16")
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"GGUF" and left_over(tmp_path) == ["m.gguf"]
    res = invoke("export", llama_dir, "--format", "gguf", "-o", tmp_path, "--overwrite")
    assert res.exit_code == 2 and "is a directory" in res.output


def test_bad_dtype_is_one_line(llama_dir, tmp_path):
    res = invoke("export", llama_dir, "--format", "gguf", "-o", tmp_path / "m.gguf", "--dtype", "q4_0")
    assert res.exit_code == 2 and "f32, f16, bf16, q8_0" in res.output and len(res.output.strip().splitlines()) == 1
    assert left_over(tmp_path) == []


def test_non_llama_architecture_is_refused(tmp_path):
    gpt2 = save_tiny(tmp_path / "gpt2", "gpt2")
    adapter = make_adapter(gpt2, tmp_path / "gpt2-lora", target_modules=["c_attn"])
    out = tmp_path / "out"
    out.mkdir()
    for fmt, src in (("gguf", gpt2), ("gguf", adapter), ("gguf-lora", adapter)):
        res = invoke("export", src, "--format", fmt, "-o", out / "x.gguf")
        assert res.exit_code == 2, res.output
        assert "Llama-family" in res.output and "'gpt2'" in res.output and len(res.output.strip().splitlines()) == 1
    assert left_over(out) == []


def test_wordpiece_tokenizer_is_refused(tiny_llama_dir, tmp_path):
    res = invoke("export", tiny_llama_dir, "--format", "gguf", "-o", tmp_path / "x.gguf")
    assert res.exit_code == 2 and "byte-level BPE" in res.output and len(res.output.strip().splitlines()) == 1
    assert left_over(tmp_path) == []


def test_adapter_for_another_base_is_refused(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, tmp_path / "lora")
    other = save_bpe_llama(tmp_path / "other", seed=7)  # same shapes, other weights
    wider = save_bpe_llama(tmp_path / "wider", hidden=96)  # other shapes
    out = tmp_path / "out"
    out.mkdir()
    for fmt in ("gguf", "gguf-lora"):
        res = invoke("export", adapter, "--format", fmt, "--base", other, "-o", out / "x.gguf")
        assert res.exit_code == 2 and "not the base this adapter was trained on" in res.output, res.output
        res = invoke("export", adapter, "--format", fmt, "--base", wider, "-o", out / "x.gguf", "--force")
        assert res.exit_code == 2 and "shape" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert left_over(out) == []


# ---------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_gguf_train_merge_gguf_round_trip(tmp_path):
    """The installed SmolLM2-135M-Instruct (a Q4_1 GGUF, dequantised) -> 2 LoRA steps -> `peftcli merge` (in
    memory: a GGUF base, verified) -> `export --format gguf` f32, proven by the exporter against the merged
    model (transformers' GGUF loader: logits, SmolLM2's 49152-token tokenizer on the probe texts, its ChatML
    template). gguf-lora and the adapter-to-GGUF shortcut run on the tiny model above (another base load each)."""
    from safetensors.torch import load_file

    rows = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(4))
    recipe = recipe_dict("demo:smollm2", rows, None, tmp_path / "run",
                         method={"target_modules": ["q_proj", "v_proj"]}, data={"max_length": 96},
                         train={"max_steps": 2, "batch_size": 2, "lr": 1e-2, "eval_every": None, "save_every": None})
    assert (res := invoke("train", write_recipe(tmp_path / "r.yaml", recipe), "--json")).exit_code == 0, res.output
    lora_b = [t for k, t in load_file(tmp_path / "run" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert len(lora_b) == 2 * 30 and all(t.abs().max() > 0 for t in lora_b)  # trained: B left its zero init
    assert (res := invoke("merge", tmp_path / "run", "-o", tmp_path / "merged", "--json")).exit_code == 0, res.output
    merged = json.loads(res.stdout)
    assert merged["verified"] and merged["max_abs_diff"] <= merged["tolerance"], merged
    res = invoke("export", tmp_path / "merged", "--format", "gguf", "-o", tmp_path / "smol.gguf", "--dtype", "f32", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["tokens"] == 49152 and report["merges"] == 48900 and report["chat_template"], report
    assert report["max_abs_diff"] <= 1e-4 and report["max_abs_logit"] > 10, report
    meta, tensors = gguf_fields(tmp_path / "smol.gguf")
    assert "output.weight" not in tensors and len(tensors) == 1 + 30 * 9 + 1  # SmolLM2 ties its head to token_embd
    assert "<|im_start|>" in meta["tokenizer.chat_template"] and meta["tokenizer.ggml.eos_token_id"] == 2
