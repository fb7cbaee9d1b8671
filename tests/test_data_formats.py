"""Data as users have it (issue 12): per-file column mapping (GSM8K as it ships), ShareGPT conversations,
hub datasets with a config name, several training files mixed by weight, sequence packing (same loss and
gradients as unpacked, no attention across rows) and seq2seq models (T5-shaped: labels on the target,
generation eval, LoRA/IA3, merge; the virtual-token methods: test_prompts_seq2seq.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    copy_task_rows,
    recipe_dict,
    shared_data,
    tiny_model,
    tiny_tokenizer,
    write_jsonl,
    write_recipe,
)
from typer.testing import CliRunner

from peftcli.cli import app
from peftcli.data import IGNORE, Collator, pack, prepare
from peftcli.distributed import label_count
from peftcli.errors import UserError
from peftcli.recipe import DataCfg

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def user_error(result, *fragments) -> str:
    """exit 2, one line on stderr holding every fragment."""
    detail = f"exit {result.exit_code}, {result.exception!r}\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, detail
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def data_cfg(train, **kw) -> DataCfg:
    return DataCfg.model_validate({"train": train, "max_length": 128, **kw})


def labelled(tok, ex) -> str:
    return tok.decode([t for t in ex["labels"] if t != IGNORE])


def quick_recipe(tmp_path, model_dir, data: dict, **sections) -> Path:
    d = recipe_dict(model_dir, tmp_path / "unused.jsonl", None, tmp_path / "out",
                    train={"max_steps": 2, "eval_every": None, "save_every": None, "batch_size": 4}, **sections)
    d["data"] = {"max_length": 96, **data}
    return write_recipe(tmp_path / "r.yaml", d)


# ------------------------------------------------------------------ column mapping

def test_gsm8k_trains_as_shipped_with_a_column_mapping(tmp_path, tiny_llama_dir):
    gsm = shared_data() / "gsm8k" / "train.jsonl"
    first = json.loads(gsm.open().readline())
    train = {"path": str(gsm), "format": "alpaca", "columns": {"prompt": "question", "response": "answer"}, "limit": 8}
    ex = prepare(data_cfg(train, max_length=512), tiny_tokenizer(), "causal-lm").train[0]
    tok = tiny_tokenizer()
    assert labelled(tok, ex) == tok.decode(tok(first["answer"], add_special_tokens=False)["input_ids"]) + " [SEP]"
    assert tok.decode(tok(first["question"], add_special_tokens=False)["input_ids"]) in tok.decode(ex["input_ids"])
    result = invoke("train", quick_recipe(tmp_path, tiny_llama_dir, {"train": train}), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2


def test_columns_for_system_text_and_label_and_the_old_keys(tmp_path):
    tok = tiny_tokenizer()
    f = write_jsonl(tmp_path / "a.jsonl", [{"q": "add", "ctx": "two and two", "a": "four", "sys": "be terse", "output": "x"}])
    ex = prepare(data_cfg({"path": str(f), "format": "alpaca",
                           "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys"}}), tok, "causal-lm").train[0]
    text = tok.decode(ex["input_ids"])
    assert labelled(tok, ex) == "four [SEP]" and "be terse" in text and "two and two" in text  # 'a', not the file's 'output'
    rows = [{"review": "good film", "stars": "pos"}, {"review": "bad film", "stars": "neg"}]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    new = prepare(data_cfg({"path": str(f), "format": "classification", "columns": {"text": "review", "label": "stars"}}), tok, "seq-cls")
    old = prepare(data_cfg({"path": str(f), "format": "classification", "text_column": "review", "label_column": "stars"}), tok, "seq-cls")
    assert new.label_names == old.label_names == ["neg", "pos"] and new.train == old.train
    assert [e["labels"] for e in new.train] == [1, 0]


def test_column_mapping_errors_name_the_key_and_the_files_columns(tmp_path, tiny_llama_dir):
    f = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a"}])
    bad_role = quick_recipe(tmp_path, tiny_llama_dir, {"train": {"path": str(f), "columns": {"promt": "question"}}})
    user_error(invoke("train", bad_role), "data.train.columns.promt: unknown role", "prompt, query, response",
               "columns of", "question, answer")
    bad_col = quick_recipe(tmp_path, tiny_llama_dir, {"train": {"path": str(f), "columns": {"prompt": "query", "response": "answer"}}})
    user_error(invoke("train", bad_col), "data.train.columns.prompt: column 'query' missing", "(columns: question, answer)")
    unmapped = quick_recipe(tmp_path, tiny_llama_dir, {"train": {"path": str(f)}})
    user_error(invoke("train", unmapped), "'instruction', 'output' missing for format 'alpaca'", "data.train.columns")


# ------------------------------------------------------------------ ShareGPT

def sharegpt_rows():
    return [{"conversations": [{"from": "human", "value": "one"}, {"from": "gpt", "value": "uno"},
                               {"from": "human", "value": "two"}, {"from": "gpt", "value": "dos"}], "system": "translate"}]


def test_sharegpt_loss_on_assistant_turns_and_custom_tags(tmp_path):
    tok = tiny_tokenizer()
    f = write_jsonl(tmp_path / "s.jsonl", sharegpt_rows())
    ex = prepare(data_cfg({"path": str(f), "format": "sharegpt"}), tok, "causal-lm").train[0]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "translate"}, {"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "two"}, {"role": "assistant", "content": "dos"}]}])
    assert ex == prepare(data_cfg({"path": str(chat), "format": "chat"}), tok, "causal-lm").train[0]  # = the chat format
    assert labelled(tok, ex) == "uno [SEP] dos [SEP]"
    custom = [{"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "hello"}]}]
    f2 = write_jsonl(tmp_path / "t.jsonl", custom)
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}
    ex2 = prepare(data_cfg({"path": str(f2), "format": "sharegpt", "columns": {"messages": "dialog"}, "tags": tags}), tok,
                  "causal-lm").train[0]
    assert labelled(tok, ex2) == "hello [SEP]" and "hi" in tok.decode(ex2["input_ids"])


def test_sharegpt_unknown_role_names_file_row_and_turn(tmp_path, tiny_llama_dir):
    rows = sharegpt_rows() + [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}]
    f = write_jsonl(tmp_path / "s.jsonl", rows)
    r = quick_recipe(tmp_path, tiny_llama_dir, {"train": {"path": str(f), "format": "sharegpt"}})
    user_error(invoke("train", r), f"data.train: {f} row 2: turn 2 has role tag 'bot'", "human, gpt", "data.train.tags")


# ------------------------------------------------------------------ hub datasets

def test_hub_dataset_with_config_reaches_load_dataset(tmp_path, monkeypatch, tiny_bert_dir):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, **kw):
        calls.append((path, name, split, kw))
        return datasets.Dataset.from_dict({"sentence": ["a fine film", "a dull film"], "label": [1, 0], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train = {"path": "glue", "config": "sst2", "split": "validation", "format": "classification", "columns": {"text": "sentence"}}
    p = prepare(data_cfg(train), tiny_tokenizer(), "seq-cls")
    assert calls == [("glue", "sst2", "validation", {})] and p.label_names == ["0", "1"] and len(p.train) == 2

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    r = quick_recipe(tmp_path, tiny_bert_dir, {"train": train, "format": "classification"},
                     model={"task": "seq-cls"})
    user_error(invoke("train", r), "data.train.path: glue (config sst2, split validation)", "Couldn't reach 'glue'", "network")


# ------------------------------------------------------------------ mixed files

def test_weighted_mix_repeats_and_samples_deterministically(tmp_path, tiny_llama_dir):
    tok = tiny_tokenizer()
    a = write_jsonl(tmp_path / "a.jsonl", copy_task_rows(6))
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"count {i}", "output": str(i)} for i in range(10)])
    train = [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}]
    p1 = prepare(data_cfg(train), tok, "causal-lm", seed=1)
    assert len(p1.train) == 2 * 6 + 5 and p1.rows == 17
    p2, p3 = prepare(data_cfg(train), tok, "causal-lm", seed=1), prepare(data_cfg(train), tok, "causal-lm", seed=2)
    picked = lambda p: [labelled(tok, e) for e in p.train[12:]]  # noqa: E731 - b's sampled half
    assert picked(p1) == picked(p2) and picked(p1) != picked(p3) and len(set(picked(p1))) == 5
    assert p1.train[:6] == p1.train[6:12]  # every row of a, twice
    result = invoke("train", quick_recipe(tmp_path, tiny_llama_dir, {"train": train}), "--json")
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "weight: 0.5" in saved and "weight: 2" in saved


def test_mix_eval_ratio_holds_out_from_each_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", copy_task_rows(10))
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"count {i}", "output": str(i)} for i in range(10)])
    p = prepare(data_cfg([{"path": str(a)}, {"path": str(b)}], eval_ratio=0.2), tiny_tokenizer(), "causal-lm")
    assert len(p.train) == 16 and len(p.eval) == 4
    assert sum(r["instruction"].startswith("count") for r in p.eval_rows) == 2


# ------------------------------------------------------------------ packing

def lora_llama():
    from peftcli.methods import build_method

    model = tiny_model("llama").train()
    build_method({"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}).apply(model, "causal-lm")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model


def packing_rows(n=7):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        k = 5 + 3 * i % 11
        ids = torch.randint(5, 1000, (k,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * (i % 3) + ids[i % 3:]})
    return rows


def summed_loss_and_grads(model, batches):
    from peftcli.loss import LossModel

    lm = LossModel(model, "causal-lm")
    model.zero_grad()
    total = 0.0
    for batch, n in batches:
        mean, _ = lm(**batch)
        part = mean * n
        part.backward()
        total += float(part.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_loss_and_gradients_equal_unpacked():
    rows = packing_rows()
    blocks = pack(rows, max_length=24, seed=0)
    assert 1 < len(blocks) < len(rows) and all(len(b["input_ids"]) <= 24 for b in blocks)
    assert sum(map(label_count, blocks)) == sum(map(label_count, rows))  # the trainer's normaliser is unchanged
    model = lora_llama()
    packed = [(Collator(0)(blocks), sum(map(label_count, blocks)))]
    assert packed[0][0]["input_ids"].shape[0] == 1 and "position_ids" in packed[0][0]
    unpacked = [(Collator(0)(rows[i:i + 3]), sum(map(label_count, rows[i:i + 3]))) for i in range(0, len(rows), 3)]
    loss_p, grads_p = summed_loss_and_grads(model, packed)
    loss_u, grads_u = summed_loss_and_grads(copy.deepcopy(model), unpacked)
    assert loss_p == pytest.approx(loss_u, rel=1e-5, abs=1e-5) and len(grads_p) == 2 * 7 * 2
    for n, g in grads_p.items():  # within 1e-5 of the gradient's scale (fp32 sums in another order; |g| reaches ~50)
        assert (g - grads_u[n]).abs().max() <= 1e-5 * grads_u[n].abs().max(), (n, float((g - grads_u[n]).abs().max() / grads_u[n].abs().max()))


def test_packed_rows_do_not_attend_to_each_other():
    from peftcli.loss import LossModel

    model = lora_llama().eval()
    LossModel(model, "causal-lm")  # installs per-segment attention
    a, b = packing_rows(2)
    block = pack([a, b], max_length=64, seed=0)[0]
    first = block["input_ids"][:len(a["input_ids"])] == a["input_ids"]
    k = len(a["input_ids"]) if first else len(b["input_ids"])
    other = b if first else a

    def hidden(ids, pos):
        return model.base_model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos])).last_hidden_state[0]

    with torch.no_grad():
        packed = hidden(block["input_ids"], block["position_ids"])[k:]
        alone = hidden(other["input_ids"], list(range(len(other["input_ids"]))))
        changed = [t + 1 for t in block["input_ids"][:k]] + block["input_ids"][k:]  # another first row
        again = hidden(changed, block["position_ids"])[k:]
    assert torch.allclose(packed, alone, atol=1e-5) and torch.allclose(again, packed, atol=1e-6)


def test_packing_through_the_cli_and_where_it_cannot_run(tmp_path, tiny_llama_dir):
    f = write_jsonl(tmp_path / "t.jsonl", copy_task_rows(24))
    r = quick_recipe(tmp_path, tiny_llama_dir, {"train": {"path": str(f)}, "packing": True})
    result = invoke("train", r)
    assert result.exit_code == 0, result.output
    assert "24 train rows packed into" in " ".join(result.output.split())
    from peftcli.loss import packing_problem

    assert "data.packing" in packing_problem(tiny_model("gpt2"), "causal-lm")
    with pytest.raises(UserError, match="data.packing: concatenates rows for causal LMs"):
        prepare(data_cfg({"path": str(f)}, packing=True), tiny_tokenizer(), "seq2seq")


# ------------------------------------------------------------------ seq2seq

@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   initializer_factor=1.0, dropout_rate=0.0)
    path = tmp_path_factory.mktemp("models") / "tiny-t5"
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_seq2seq_labels_are_the_target():
    tok = tiny_tokenizer()
    cfg = data_cfg({"path": "unused.jsonl", "format": "alpaca"})
    from peftcli.data import Renderer

    src, tgt = Renderer(tok, cfg, "seq2seq").example({"instruction": "say hi", "input": "to bob", "output": "hello bob"}, "alpaca")
    assert tok.decode(src, skip_special_tokens=True) == "say hi to bob" and tok.decode(tgt, skip_special_tokens=True) == "hello bob"
    ex = {"input_ids": src, "labels": tgt, "seq2seq": True}
    assert label_count(ex) == len(tgt)
    batch = Collator(0)([ex, {"input_ids": [5, 6], "labels": [7], "seq2seq": True}])
    assert batch["labels"].shape == (2, len(tgt)) and batch["labels"][1].tolist() == [7] + [IGNORE] * (len(tgt) - 1)


def test_seq2seq_lora_trains_evaluates_by_generation_and_merges(tmp_path, tiny_t5_dir):
    from peftcli.merge import merge_adapter

    train = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(32))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", copy_task_rows(4, seed=1))
    d = recipe_dict(tiny_t5_dir, train, eval_, tmp_path / "out", model={"task": "seq2seq"},
                    method={"target_modules": ["q", "k", "v", "o", "wi", "wo"]},
                    train={"max_steps": 8, "eval_every": None, "save_every": None, "lr": 2e-2,
                           "generation_eval": {"samples": 4, "max_new_tokens": 6, "batch_size": 4}})
    result = invoke("train", write_recipe(tmp_path / "r.yaml", d), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert "generation_after" in summary and summary["eval_loss"] > 0
    meta = json.loads((tmp_path / "out" / "peftcli.json").read_text())
    assert meta["base"]["task"] == "seq2seq"
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]

    merged = merge_adapter(str(tmp_path / "out"), str(tmp_path / "merged"))
    from transformers import AutoModelForSeq2SeqLM

    from peftcli.merge import load_adapted

    adapted = load_adapted(str(tmp_path / "out")).loaded.model
    full = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[101, 2360, 1996, 2773, 102]])
    dec = torch.tensor([[0, 2360, 1996]])
    with torch.no_grad():
        a = adapted(input_ids=ids, decoder_input_ids=dec).logits
        b = full(input_ids=ids, decoder_input_ids=dec).logits
        base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)(input_ids=ids, decoder_input_ids=dec).logits
    assert merged is not None and torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, base, atol=1e-3)
    from peft import PeftModel  # the adapter directory is HF PEFT's SEQ_2_SEQ_LM layout

    peft_model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir), tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids, decoder_input_ids=dec).logits, a, atol=1e-5)


def test_seq2seq_ia3_trains(tiny_t5_dir):
    from transformers import AutoModelForSeq2SeqLM

    from peftcli.methods import build_method
    from peftcli.train import Trainer

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).train()
    ids = torch.tensor([[101, 2360, 1996, 102]])
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).logits
    method = build_method({"name": "ia3"})
    method.apply(model, "seq2seq")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, labels=ids).logits, before, atol=1e-6)  # IA3 starts at identity
    rows = [{"input_ids": [101, 7 + i, 102], "labels": [7 + i, 102], "seq2seq": True} for i in range(8)]
    trainer = Trainer.for_model(model, method, rows, task="seq2seq", max_steps=4, batch_size=4, lr=5e-2)
    first = trainer.train_step(0)["loss"]
    for s in range(1, 4):
        last = trainer.train_step(s)["loss"]
    assert last < first and any(n for n, p in model.named_parameters() if p.requires_grad and "ia3" in n)
