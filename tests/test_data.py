"""Data formats: prompt masking for alpaca and chat, label mapping for classification, clear errors."""

from __future__ import annotations

import pytest
from conftest import tiny_tokenizer, write_jsonl

from peftcli.data import IGNORE, Collator, prepare
from peftcli.errors import UserError
from peftcli.recipe import DataCfg


def cfg(train, fmt, **kw):
    return DataCfg.model_validate({"train": {"path": str(train), "format": fmt}, "format": fmt, "max_length": 64, **kw})


def decode_labels(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE])


def test_alpaca_loss_on_response_only(tmp_path):
    tok = tiny_tokenizer()
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "say hi", "input": "to bob", "output": "hello bob"}])
    ex = prepare(cfg(f, "alpaca"), tok, "causal-lm").train[0]
    assert decode_labels(tok, ex) == "hello bob [SEP]"
    assert "to bob" in tok.decode(ex["input_ids"]) and ex["labels"][0] == IGNORE


def test_alpaca_plain_template_without_chat_template(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "say hi", "input": "", "output": "hello"}])
    ex = prepare(cfg(f, "alpaca"), tok, "causal-lm").train[0]
    assert "# # # response : hello" in tok.decode(ex["input_ids"]) and decode_labels(tok, ex) == "hello [SEP]"


def test_chat_labels_every_assistant_turn(tmp_path):
    tok = tiny_tokenizer()
    msgs = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "dos"}]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    ex = prepare(cfg(f, "chat"), tok, "causal-lm").train[0]
    labelled = decode_labels(tok, ex)
    assert "uno" in labelled and "dos" in labelled and "one" not in labelled and "two" not in labelled


def test_text_format_and_truncation(tmp_path):
    tok = tiny_tokenizer()
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 200}])
    ex = prepare(cfg(f, "text"), tok, "causal-lm").train[0]
    assert len(ex["input_ids"]) == 64 and ex["labels"] == ex["input_ids"]


def test_classification_maps_label_names(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}, {"text": "fine", "label": "pos"}]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    p = prepare(cfg(f, "classification", eval_ratio=0.3), tok, "seq-cls")
    assert p.label_names == ["neg", "pos"] and len(p.train) == 2 and len(p.eval) == 1
    assert {ex["labels"] for ex in p.train + p.eval} <= {0, 1}


def test_tsv_and_csv(tmp_path):
    tok = tiny_tokenizer()
    (tmp_path / "d.tsv").write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n")
    p = prepare(cfg(tmp_path / "d.tsv", "classification"), tok, "seq-cls")
    assert p.label_names == ["0", "1"] and [e["labels"] for e in p.train] == [1, 0]
    (tmp_path / "d.csv").write_text("text\nhello there\n")
    assert len(prepare(cfg(tmp_path / "d.csv", "text"), tok, "causal-lm").train) == 1


def test_missing_column_and_file_errors(tmp_path):
    tok = tiny_tokenizer()
    f = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"column\(s\) 'instruction', 'output' missing for format 'alpaca'"):
        prepare(cfg(f, "alpaca"), tok, "causal-lm")
    with pytest.raises(UserError, match="data file .* not found"):
        prepare(cfg(tmp_path / "nope.jsonl", "alpaca"), tok, "causal-lm")
    with pytest.raises(UserError, match="needs format classification"):
        prepare(cfg(f, "alpaca"), tok, "seq-cls")


def test_collator_pads_dynamic_or_fixed():
    batch = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    out = Collator(pad_id=0)(batch)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]] and out["labels"].tolist()[1] == [4, IGNORE, IGNORE]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert Collator(pad_id=0, pad_to=8)(batch)["input_ids"].shape == (2, 8)
