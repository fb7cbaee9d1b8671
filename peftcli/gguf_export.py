"""`peftcli export --format gguf|gguf-lora`: Llama-family models and LoRA adapters as llama.cpp reads them.

Written with the `gguf` package (no llama.cpp build), in the layout llama.cpp's own converters use:

* `gguf` (convert_hf_to_gguf.py's LlamaModel): `llama.*` hyperparameters, the tokenizer
  (`tokenizer.ggml.*`, byte-level BPE as `gpt2`) and `tokenizer.chat_template`, tensors under GGUF names
  (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`), with the rows of attn_q / attn_k permuted
  from HF's rotate-half RoPE layout to llama.cpp's interleaved one. 1-D tensors stay F32; 2-D tensors are
  f32, f16, bf16 or q8_0 (a row that is not a multiple of 32 falls back to f16, as llama.cpp does).
  Input: a merged model directory, or an adapter directory that is merged in memory first (fp32).
  The written file is proven before it is renamed into place: reloaded through transformers' GGUF loader,
  its logits must match the merged model's within the dtype's tolerance, its tokenizer must encode the probe
  texts identically and carry the same chat template.
* `gguf-lora` (convert_lora_to_gguf.py): `general.type=adapter`, `adapter.type=lora`,
  `adapter.lora.alpha`, tensors `<gguf name>.weight.lora_a` (A, r x in) and `.lora_b` (B, out x r), B's
  rows permuted for attn_q / attn_k like the base weight. llama.cpp scales by alpha/r, so rsLoRA
  (alpha/sqrt r) is written with alpha' = alpha * sqrt(r).

Every file is written to a temporary name next to the output and renamed at the end: an error or a failed
proof leaves nothing behind.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from peftcli import adapter_io
from peftcli.errors import UserError, one_line

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "auto": None}
# |gguf - merged| <= atol + rtol * max|merged logit|, per written dtype. fp32 is exact up to summation order;
# the others round every 2-D weight once (f16: 11-bit mantissa, bf16: 8-bit, q8_0: 8-bit per 32-block scale).
TOLERANCE = {"f32": (1e-4, 1e-5), "f16": (0.0, 1e-2), "bf16": (0.0, 5e-2), "q8_0": (0.0, 1e-1)}
ARCHITECTURES = ("llama",)
MERGED_HINT = "export a merged model instead (`peftcli export ADAPTER --format gguf`)"


class _Mismatch(Exception):
    """Raised as merge.MergeMismatch (exit 1) by the callers."""


# --------------------------------------------------------------------------- small helpers
def gguf_dtype(dtype: str | None, default: str) -> str:
    if dtype is None:
        return default
    d = ALIASES.get(dtype, dtype)
    if d is None:
        return default
    if d not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype}: a GGUF file is written as one of {', '.join(GGUF_DTYPES)}")
    return d


def _check_output(output: Path, overwrite: bool) -> Path:
    output = Path(output)
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; a GGUF export is one file (e.g. {output / 'model.gguf'})")
    if output.exists() and not overwrite:
        raise UserError(f"--output {output} already exists; pass --overwrite or choose another file")
    return output


def _llama_config(config, where: str):
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"{where}: GGUF export supports Llama-family models (model_type llama, e.g. SmolLM2, TinyLlama, "
                        f"Llama 2/3); this is a {model_type!r} model: export --format merged and use llama.cpp's "
                        "convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise UserError(f"{where}: RoPE scaling {rope_type!r} is not supported by the GGUF export (transformers' GGUF "
                        "loader would not restore it); export --format merged and use llama.cpp's convert_hf_to_gguf.py")
    return config


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py LlamaModel.permute;
    transformers' GGUF loader applies the inverse). Works on weights (out, in), biases (out,) and LoRA B (out, r)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute_heads(gguf_name: str, config) -> int | None:
    """The head count the q/k permutation uses for this tensor, or None when it is not permuted."""
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return config.num_key_value_heads or config.num_attention_heads
    return None


def _name_map(config):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def gguf_name(hf_name: str, name_map) -> str | None:
    """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight` (None when llama.cpp has no such tensor)."""
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _encode(arr: np.ndarray, qtype):
    """(data, ggml type) for a float32 array; q8_0 needs rows that are multiples of 32, else f16."""
    import gguf

    try:
        return gguf.quants.quantize(arr, qtype), qtype
    except (gguf.QuantError, ValueError):
        return arr.astype(np.float16), gguf.GGMLQuantizationType.F16


QTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _write_tensors(writer, tensors: list[tuple[str, callable, bool]], dtype: str) -> None:
    """Header, metadata, tensor infos, then each tensor converted and written in turn (one in memory at a time).
    `tensors`: (gguf name, () -> fp32 torch tensor, quantisable)."""
    import gguf

    want = gguf.GGMLQuantizationType[QTYPES[dtype]]
    F32 = gguf.GGMLQuantizationType.F32
    planned = []
    for name, get, quantisable in tensors:
        t = get()
        qtype = want if quantisable and t.ndim >= 2 else F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16  # llama.cpp's fallback for rows that are not whole blocks
        shape = tuple(t.shape)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
        writer.add_tensor_info(name, gguf.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        planned.append((get, qtype))
        del t
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for get, qtype in planned:
        data, got = _encode(get().detach().float().contiguous().numpy(), qtype)
        assert got == qtype
        writer.write_tensor_data(data)
    writer.close()


def _atomic_gguf(output: Path, write) -> Path:
    """Run write(tmp_path) and return the temp path; the caller renames (after its checks) or we clean up."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial.gguf")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(tmp: Path, output: Path) -> None:
    os.replace(tmp, output)
    adapter_io._fsync_dir(output.parent)


# --------------------------------------------------------------------------- tokenizer
def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE, from the tokenizer.json pre-tokenizer."""
    if not pre:
        raise UserError("the tokenizer has no pre-tokenizer; a byte-level BPE without one cannot be written to GGUF")
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name in ("llama-bpe", "qwen2", "gpt-4o", "tekken"):
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex:
                return name
    raise UserError(f"the tokenizer's pre-tokenizer ({'+'.join(map(str, kinds))}) is not one llama.cpp names "
                    "(gpt-2, smollm, llama-bpe, qwen2, gpt-4o, tekken); export --format merged and use convert_hf_to_gguf.py")


def tokenizer_fields(tok, vocab_size: int) -> dict:
    """What tokenizer.ggml.* and tokenizer.chat_template will hold, from a fast (tokenizers-backed) HF
    tokenizer; checked before anything is written. Byte-level BPE only (llama.cpp's `gpt2` model: GPT-2,
    SmolLM2, Llama 3, Qwen2 vocabularies), as convert_hf_to_gguf.py's get_vocab_base lays it out."""
    import gguf

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"the tokenizer ({type(tok).__name__}) has no tokenizer.json form; GGUF export needs a fast tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer")
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre or {}):
        raise UserError(f"the tokenizer is a {model.get('type')} model without byte-level pre-tokenization; the GGUF "
                        "export writes byte-level BPE tokenizers (llama.cpp's gpt2) only: export --format merged and use "
                        "llama.cpp's convert_hf_to_gguf.py")
    pre_name = _pre_tokenizer_name(pre)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = dict(tok.added_tokens_decoder)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:  # the embedding matrix is padded past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    probe = tok("a")["input_ids"]
    return {
        "pre": pre_name, "tokens": tokens, "types": types,
        "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        "ids": {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")},
        "add_bos": bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id),
        "add_eos": bool(tok.eos_token_id is not None and probe and probe[-1] == tok.eos_token_id),
        "chat_template": getattr(tok, "chat_template", None),
    }


def add_tokenizer(writer, f: dict) -> dict:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(f["pre"])
    writer.add_token_list(f["tokens"])
    writer.add_token_types(f["types"])
    writer.add_token_merges(f["merges"])
    for key, tid in f["ids"].items():
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(int(tid))
    writer.add_add_bos_token(f["add_bos"])
    writer.add_add_eos_token(f["add_eos"])
    writer.add_add_space_prefix(False)
    template = f["chat_template"]
    if isinstance(template, dict):  # named templates: llama.cpp reads tokenizer.chat_template.<name>
        writer.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
    elif template:
        writer.add_chat_template(template)
    return {"tokenizer": "gpt2", "pre": f["pre"], "tokens": len(f["tokens"]), "merges": len(f["merges"]),
            "chat_template": bool(template)}


# --------------------------------------------------------------------------- full model
def _add_llama_metadata(writer, config, name: str, dtype: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[dtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _model_tensors(model, config) -> list[tuple[str, callable, bool]]:
    """(gguf name, getter, quantisable) for every weight llama.cpp reads, q/k permuted; the tied output head
    is left out (llama.cpp and transformers reuse token_embd when `output.weight` is absent)."""
    name_map = _name_map(config)
    sd = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False)) and \
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    out = []
    for hf, t in sd.items():
        if hf.endswith("rotary_emb.inv_freq") or (tied and hf == "lm_head.weight"):
            continue
        name = gguf_name(hf, name_map)
        if name is None:
            raise UserError(f"model tensor {hf} has no llama.cpp counterpart; export --format merged and use convert_hf_to_gguf.py")
        heads = _permute_heads(name, config)

        def get(t=t, heads=heads):
            t = t.detach().float()
            return permute_qk(t, heads) if heads else t

        out.append((name, get, True))
    return out


def _base_config(cfg) -> None:
    """Refuse a non-Llama base before loading its weights. A GGUF base is checked after loading instead:
    transformers parses a GGUF's whole vocabulary just to read its config (~8 s for SmolLM2)."""
    from transformers import AutoConfig

    from peftcli.models import resolve_path

    path, gguf_file = resolve_path(cfg)
    if gguf_file:
        return
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"base model {cfg.name_or_path}: cannot read its config ({one_line(exc, 160)})") from None
    _llama_config(config, f"base model {cfg.name_or_path}")


def _saved_dtype(dtype) -> str:
    """float32 / bfloat16 / float16 (a name or a torch dtype) -> f32 / bf16 / f16."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return ALIASES.get(name) or "f32"


def _reference(source: Path, base, force) -> tuple:
    """(merged fp32 model, tokenizer, config, what, default dtype) from a merged model dir or an adapter dir;
    the default dtype is the one the model was saved in (merged dir) or trained in (adapter)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from peftcli import merge
    from peftcli.models import quiet_transformers

    quiet_transformers()
    if (source / adapter_io.CONFIG).is_file():
        adapter = adapter_io.read_adapter(source)
        cfg = merge.base_model_cfg(adapter, base, "float32")
        if cfg.task != "causal-lm":
            raise UserError(f"{source}: a {cfg.task} adapter has no GGUF form (llama.cpp runs causal LMs)")
        _base_config(cfg)
        a = merge.load_adapted(source, base, "float32", force)
        _llama_config(a.loaded.model.config, f"base model {cfg.name_or_path}")
        if not a.method.mergeable:
            raise UserError(f"method {a.method.name!r} cannot be folded into the base weights, so it has no GGUF form; "
                            "use `peftcli export --format peft`")
        a.method.merge(a.loaded.model)
        model, tok = a.loaded.model, a.loaded.tokenizer
        trained = ((adapter.meta or {}).get("base") or {}).get("dtype")
        return model.eval(), tok, model.config, f"{a.method.name} adapter merged into {cfg.name_or_path}", _saved_dtype(trained)
    if (source / "config.json").is_file():
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise UserError(f"{source}/config.json: cannot read ({one_line(exc, 160)})") from None
        _llama_config(config, str(source))
        try:
            tok = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise UserError(f"{source}: cannot load the model ({one_line(exc, 160)})") from None
        return model.eval(), tok, model.config, "merged model", _saved_dtype(getattr(config, "dtype", None))
    what = "not found" if not source.exists() else "is neither a merged model directory (config.json) nor an adapter directory (adapter_config.json)"
    raise UserError(f"{source} {what}")


def sample_texts(tok) -> list[str]:
    """Texts whose encodings must survive: the merge probes, digits and non-ASCII, the chat template rendered."""
    from peftcli.merge import PROBE_TEXTS

    texts = list(PROBE_TEXTS) + ["Numbers 12345 and 3.14159; naïve café — ünïcödé ✓ 日本語", "  two  spaces\n\ttab\n"]
    if getattr(tok, "chat_template", None):
        try:
            texts.append(tok.apply_chat_template([{"role": "user", "content": "Hello there!"},
                                                  {"role": "assistant", "content": "Hi. 1+1=2"}], tokenize=False))
        except Exception:  # a template that needs a system message or tools: the string check still runs
            pass
    return texts


def verify_gguf(path: Path, reference_logits: torch.Tensor, tok, dtype: str) -> dict:
    """Reload through transformers' GGUF loader; compare logits, encodings and the chat template."""
    import transformers.modeling_gguf_pytorch_utils as legacy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftcli.merge import probe_logits

    bar = legacy.tqdm  # its per-tensor progress bar ignores transformers' own switch
    legacy.tqdm = functools.partial(bar, disable=True)
    try:
        back_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    except Exception as exc:  # a file transformers cannot read is our bug, but say what happened in one line
        raise _Mismatch(f"the written GGUF does not load in transformers ({one_line(exc, 200)}); nothing written") from None
    finally:
        legacy.tqdm = bar
    for text in sample_texts(tok):
        want, got = tok(text)["input_ids"], back_tok(text)["input_ids"]
        if want != got:
            raise _Mismatch(f"the GGUF tokenizer encodes {one_line(text, 60)!r} as {got[:12]} instead of {want[:12]}; nothing written")
    if (getattr(tok, "chat_template", None) or None) != (getattr(back_tok, "chat_template", None) or None):
        raise _Mismatch("the GGUF file's chat template differs from the model's; nothing written")
    after = probe_logits(back, tok)
    max_diff = (after - reference_logits).abs().max().item()
    atol, rtol = TOLERANCE[dtype]
    tol = atol + rtol * reference_logits.abs().max().item()
    if not max_diff <= tol:
        raise _Mismatch(f"GGUF logits differ from the merged model's by {max_diff:.3g} > tolerance {tol:.3g} ({dtype}); nothing written")
    return {"max_abs_diff": max_diff, "tolerance": tol, "max_abs_logit": reference_logits.abs().max().item()}


def export_gguf(source: str | Path, output: str | Path, dtype: str | None = None, base: str | None = None,
                force: bool = False, overwrite: bool = False, verify: bool = True) -> dict:
    """A merged model dir, or an adapter dir (merged in memory in fp32), as one llama.cpp GGUF file."""
    import gguf

    from peftcli.merge import MergeMismatch, probe_logits

    t0 = time.perf_counter()
    source, output = Path(source), _check_output(Path(output), overwrite)
    if dtype is not None:
        gguf_dtype(dtype, "f32")  # reject a bad --dtype before loading anything
    model, tok, config, what, default = _reference(source, base, force)
    dtype = gguf_dtype(dtype, default)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    fields = tokenizer_fields(tok, config.vocab_size)
    tensors = _model_tensors(model, config)
    reference = probe_logits(model, tok) if verify else None

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _add_llama_metadata(writer, config, source.name, dtype)
        write.tokenizer = add_tokenizer(writer, fields)
        _write_tensors(writer, tensors, dtype)

    tmp = _atomic_gguf(output, write)
    try:
        tensors.clear()  # the getters hold the merged weights: free them before the file is loaded back
        del model
        check = verify_gguf(tmp, reference, tok, dtype) if verify else {}
        _commit(tmp, output)
    except _Mismatch as exc:
        tmp.unlink(missing_ok=True)
        raise MergeMismatch(str(exc)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"output": str(output), "format": "gguf", "source": what, "dtype": dtype, **write.tokenizer,
            "bytes": output.stat().st_size, **check, "seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------- LoRA adapter
def _lora_refusal(adapter: adapter_io.AdapterDir) -> str | None:
    """Why this adapter has no llama.cpp LoRA form, or None."""
    opts = adapter.options
    name = getattr(opts, "name", None)
    if name == "dora":
        return "a DoRA adapter rescales whole weight rows (its magnitude vector), which llama.cpp's LoRA cannot express"
    if name != "lora":
        return f"a {name} adapter is not a LoRA"
    if getattr(opts, "init", "default") != "default":
        return f"a {opts.init} LoRA replaces the base weights by a residual, which llama.cpp's LoRA cannot express"
    saved = list(opts.modules_to_save or []) + list((adapter.meta or {}).get("saved_modules") or [])
    if saved:
        return f"the adapter trains whole modules ({', '.join(sorted(set(saved)))}; modules_to_save), which a llama.cpp LoRA cannot carry"
    return None


def export_gguf_lora(source: str | Path, output: str | Path, dtype: str | None = None, base: str | None = None,
                     force: bool = False, overwrite: bool = False) -> dict:
    """The LoRA adapter alone as a llama.cpp adapter file (convert_lora_to_gguf.py's layout)."""
    import gguf

    from peftcli import merge

    t0 = time.perf_counter()
    source, output = Path(source), _check_output(Path(output), overwrite)
    dtype = gguf_dtype(dtype, "f32")
    if (source / "config.json").is_file() and not (source / adapter_io.CONFIG).is_file():
        raise UserError(f"{source} is a model directory; --format gguf-lora takes an adapter directory (use --format gguf for a model)")
    adapter = adapter_io.read_adapter(source)
    why = _lora_refusal(adapter)
    if why:
        raise UserError(f"{source}: {why}; {MERGED_HINT}")
    cfg = merge.base_model_cfg(adapter, base, "float32")
    if cfg.task != "causal-lm":
        raise UserError(f"{source}: a {cfg.task} adapter has no llama.cpp form (llama.cpp runs causal LMs)")
    _base_config(cfg)
    # Loading the adapter onto its base checks the base fingerprint (unless --force) and every tensor's shape.
    a = merge.load_adapted(source, base, "float32", force)
    config = _llama_config(a.loaded.model.config, f"base model {cfg.name_or_path}")
    tied = bool(getattr(a.loaded.model.config, "tie_word_embeddings", False))
    name_map = _name_map(config)
    rows, scalings = [], set()
    for path_, w in a.method.wrappers(a.loaded.model).items():
        name = gguf_name(f"{path_}.weight", name_map)
        if name is None or (tied and name == "output.weight"):
            why = "the output head is tied to the embeddings" if name else "llama.cpp has no such tensor"
            raise UserError(f"{source}: LoRA on {path_} cannot be written for llama.cpp ({why}); {MERGED_HINT}")
        A, B = w.lora_A.weight.detach().float(), w.lora_B.weight.detach().float()
        heads = _permute_heads(name, config)
        rows.append((name, A, permute_qk(B, heads) if heads else B))
        scalings.add((w.r, w.scaling))
    if len(scalings) != 1:
        raise UserError(f"{source}: modules use different ranks or scalings {sorted(scalings)}; llama.cpp has one alpha per adapter; {MERGED_HINT}")
    # llama.cpp scales by alpha / r (r = lora_a's rows): rsLoRA's alpha / sqrt(r) becomes alpha' = s * r
    r, scaling = scalings.pop()
    alpha = float(scaling * r)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(source.name)
        writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[dtype]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        items = []
        for name, A, B in rows:
            items.append((f"{name}.lora_a", lambda A=A: A, True))
            items.append((f"{name}.lora_b", lambda B=B: B, True))
        _write_tensors(writer, items, dtype)

    tmp = _atomic_gguf(output, write)
    try:
        _commit(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"output": str(output), "format": "gguf-lora", "dtype": dtype, "modules": len(rows), "rank": r,
            "alpha": alpha, "use_rslora": bool(getattr(adapter.options, "use_rslora", False)), "bytes": output.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 2)}
