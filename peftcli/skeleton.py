"""The base model as a meta-device module tree without transformers, for `peftcli inspect`.

Importing transformers' modeling code costs more than torch itself (about 1.4 s on 2 cores: model
classes, masking utilities, torch.distributed.tensor), so `inspect` first builds a *skeleton*: the same
module paths, module types (nn.Linear, nn.Embedding, nn.LayerNorm, GPT-2's `Conv1D`, `LlamaRMSNorm`,
...), parameter shapes, dtypes and tied weights as `AutoModelFor*.from_config` on the meta device, made
from the config.json (or a GGUF file's metadata) read as a plain dict. peftcli's own `Method.apply` then
runs on it, so the counts come from the code that trains.

Only architectures described here are built (`ARCHS`: Llama, GPT-2, BERT, and the tasks each supports);
for anything else `skeleton_model` returns None and the caller takes transformers' meta model. A
skeleton has no forward: a method that needs one (prefix tuning's attention function) or real weights
fails on it, and the caller falls back the same way. tests/test_inspect_skeleton.py proves the reports
equal for every registered method's contract rows.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcli.models import DTYPES


# ----------------------------------------------------------------------------- config
class SkeletonConfig:
    """A config dict as attributes, with the architecture's defaults and attribute aliases (GPT-2's
    hidden_size is n_embd), as the transformers config class would give them."""

    def __init__(self, values: dict[str, Any], aliases: dict[str, str] | None = None):
        self.__dict__.update(values)
        object.__setattr__(self, "_aliases", aliases or {})

    def __getattr__(self, name: str):
        aliases = self.__dict__.get("_aliases", {})
        if name in aliases:
            return getattr(self, aliases[name])
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        self.__dict__[self._aliases.get(name, name)] = value

    def get_text_config(self, *_a, **_k) -> SkeletonConfig:
        return self

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_aliases"}


# what the transformers config classes default to, for the fields a skeleton is built from
# (config.json leaves out values equal to the class defaults)
_COMMON = {"is_encoder_decoder": False, "num_labels": 2}
_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False},
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
             "layer_norm_epsilon": 1e-5, "add_cross_attention": False, "tie_word_embeddings": True},
    "bert": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
             "is_decoder": False, "add_cross_attention": False, "tie_word_embeddings": True},
}
_ALIASES = {"gpt2": {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                     "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}}


def make_config(raw: dict[str, Any]) -> SkeletonConfig | None:
    """The config of a supported architecture, or None."""
    model_type = raw.get("model_type")
    if model_type not in _DEFAULTS:
        return None
    values = {**_COMMON, **raw}
    for key, default in _DEFAULTS[model_type].items():
        if values.get(key) is None:
            values[key] = default
    if isinstance(raw.get("id2label"), dict) and raw["id2label"]:
        values["num_labels"] = len(raw["id2label"])
    config = SkeletonConfig(values, _ALIASES.get(model_type))
    if model_type in ("gpt2", "bert") and config.hidden_size % config.num_attention_heads:
        return None  # transformers refuses to build it: let it say so
    if model_type == "llama":
        config.num_key_value_heads = values["num_key_value_heads"] or values["num_attention_heads"]
        config.head_dim = values["head_dim"] or values["hidden_size"] // values["num_attention_heads"]
    return config


# ----------------------------------------------------------------------------- GGUF metadata
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# transformers' GGUF_CONFIG_MAPPING["llama"] (integrations/ggml.py)
_GGUF_LLAMA = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size", "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_GGUF_GENERAL = {"general.name": "_model_name_or_path", "tokenizer.ggml.bos_token_id": "bos_token_id",
                 "tokenizer.ggml.eos_token_id": "eos_token_id", "tokenizer.ggml.unknown_token_id": "unk_token_id",
                 "tokenizer.ggml.padding_token_id": "pad_token_id"}


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def read_gguf_header(buf) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], int]:
    """(metadata, {tensor name: torch-order shape}, end of the tensor table) of a GGUF file's bytes (a memory
    map: only the header's pages are touched). Arrays of strings (the vocabulary, the merges) and long scalar
    arrays are stepped over and given as their length (transformers' reader parses every string: seconds)."""
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF v{version}")
    pos, size = 24, len(buf)

    def string(pos: int) -> tuple[str, int]:
        (n,) = _U64.unpack_from(buf, pos)
        if pos + 8 + n > size:
            raise ValueError("truncated GGUF header")
        return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = _U32.unpack_from(buf, pos)
        pos += 4
        if kind in _GGUF_SCALARS:
            (meta[key],) = struct.unpack_from(_GGUF_SCALARS[kind], buf, pos)
            pos += struct.calcsize(_GGUF_SCALARS[kind])
        elif kind == 8:
            meta[key], pos = string(pos)
        elif kind == 9:
            elem, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if elem == 8:  # each string is its u64 length, then its bytes: step over them
                unpack = _U64.unpack_from
                for _ in range(count):
                    pos += 8 + unpack(buf, pos)[0]
                meta[key] = count
            elif elem in _GGUF_SCALARS:
                width = struct.calcsize(_GGUF_SCALARS[elem])
                meta[key] = (list(struct.unpack_from(f"<{count}{_GGUF_SCALARS[elem][1]}", buf, pos)) if count <= 64
                             else count)
                pos += width * count
            else:
                raise ValueError(f"GGUF array of type {elem}")
        else:
            raise ValueError(f"GGUF value type {kind}")
        if pos > size:
            raise ValueError("truncated GGUF header")
    shapes: dict[str, tuple[int, ...]] = {}
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = _U32.unpack_from(buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims + 12  # then the ggml type (u32) and the data offset (u64)
        shapes[name] = tuple(reversed(dims))  # ggml lists the fastest-moving dimension first
    return meta, shapes, pos


def gguf_config(file: str | Path) -> dict[str, Any] | None:
    """A Llama GGUF file's config dict (transformers' key mapping), None for other architectures."""
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        meta, shapes, _ = read_gguf_header(buf)
    arch = meta.get("general.architecture")
    if arch != "llama" or meta.get("general.name") == "mistral":  # transformers special-cases those (AutoConfig)
        return None
    config: dict[str, Any] = {"model_type": "llama", "tie_word_embeddings": "output.weight" not in shapes}
    for rest, new in _GGUF_LLAMA.items():
        value = meta.get(f"llama.{rest}")
        if value is not None:
            config[new] = value[0] if isinstance(value, list) and len(value) == 1 else value
    for key, new in _GGUF_GENERAL.items():
        if meta.get(key) is not None:
            config[new] = meta[key]
    if "vocab_size" not in config and isinstance(meta.get("tokenizer.ggml.tokens"), int):
        config["vocab_size"] = meta["tokenizer.ggml.tokens"]
    return config


def raw_config(cfg) -> dict[str, Any] | None:
    """The base's config as a plain dict, from a local config.json or GGUF file (None: a hub id, remote code)."""
    from peftcli.models import resolve_path

    path, gguf = resolve_path(cfg)
    if gguf:
        file = Path(path) / gguf
        return gguf_config(file) if file.is_file() else None
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    raw = json.loads(file.read_text())
    if not isinstance(raw, dict) or (raw.get("auto_map") and cfg.trust_remote_code):
        return None
    return raw


# ----------------------------------------------------------------------------- modules
_CLASSES: dict[tuple[str, type], type] = {}


def _cls(name: str, base: type = nn.Module) -> type:
    """A class named like the transformers one (methods test type names: "norm" in it, "Conv1D")."""
    if (name, base) not in _CLASSES:
        _CLASSES[name, base] = type(name, (base,), {"__module__": __name__})
    return _CLASSES[name, base]


def _node(name: str, **children: nn.Module) -> nn.Module:
    module = _cls(name)()
    for key, child in children.items():
        module.add_module(key, child)
    return module


class _Backbone(nn.Module):
    embed_path = ""

    def get_input_embeddings(self) -> nn.Module:
        return self.get_submodule(self.embed_path)


class _Model(nn.Module):
    """The task model: `base_model_prefix`, `base_model`, input/output embeddings as PreTrainedModel has them."""

    base_model_prefix = ""

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self._modules.get("lm_head")


class _Parts:
    def __init__(self, dtype: torch.dtype):
        self.fk = {"device": "meta", "dtype": dtype}

    # parameters are left uninitialised: on the meta device an init is no-op work, and normal_ there
    # imports torch._dynamo (1.3 s)
    def linear(self, i: int, o: int, bias: bool = True) -> nn.Linear:
        m = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(m)
        m.in_features, m.out_features = i, o
        m.weight = nn.Parameter(torch.empty(o, i, **self.fk))
        m.register_parameter("bias", nn.Parameter(torch.empty(o, **self.fk)) if bias else None)
        return m

    def embedding(self, n: int, d: int) -> nn.Embedding:
        return nn.Embedding(n, d, _weight=torch.empty(n, d, **self.fk))

    def layer_norm(self, d: int, eps: float) -> nn.LayerNorm:
        return nn.LayerNorm(d, eps=eps, **self.fk)

    def rms_norm(self, name: str, d: int) -> nn.Module:
        m = _cls(name)()
        m.weight = nn.Parameter(torch.empty(d, **self.fk))
        return m

    def conv1d(self, nf: int, nx: int) -> nn.Module:
        """GPT-2's Conv1D: a linear layer storing W as (in, out)."""
        m = _cls("Conv1D")()
        m.nf, m.nx = nf, nx
        m.weight = nn.Parameter(torch.empty(nx, nf, **self.fk))
        m.bias = nn.Parameter(torch.empty(nf, **self.fk))
        return m


def _llama(c: SkeletonConfig, p: _Parts) -> nn.Module:
    h, hd = c.hidden_size, c.head_dim

    def layer() -> nn.Module:
        attn = _node("LlamaAttention", q_proj=p.linear(h, c.num_attention_heads * hd, c.attention_bias),
                     k_proj=p.linear(h, c.num_key_value_heads * hd, c.attention_bias),
                     v_proj=p.linear(h, c.num_key_value_heads * hd, c.attention_bias),
                     o_proj=p.linear(c.num_attention_heads * hd, h, c.attention_bias))
        mlp = _node("LlamaMLP", gate_proj=p.linear(h, c.intermediate_size, c.mlp_bias),
                    up_proj=p.linear(h, c.intermediate_size, c.mlp_bias),
                    down_proj=p.linear(c.intermediate_size, h, c.mlp_bias), act_fn=_node("Activation"))
        return _node("LlamaDecoderLayer", self_attn=attn, mlp=mlp, input_layernorm=p.rms_norm("LlamaRMSNorm", h),
                     post_attention_layernorm=p.rms_norm("LlamaRMSNorm", h))

    model = _cls("LlamaModel", _Backbone)()
    model.embed_path = "embed_tokens"
    model.embed_tokens = p.embedding(c.vocab_size, h)
    model.layers = nn.ModuleList(layer() for _ in range(c.num_hidden_layers))
    model.norm = p.rms_norm("LlamaRMSNorm", h)
    model.rotary_emb = _node("LlamaRotaryEmbedding")
    return model


def _gpt2(c: SkeletonConfig, p: _Parts) -> nn.Module | None:
    if c.add_cross_attention:
        return None
    h, inner = c.n_embd, c.n_inner or 4 * c.n_embd

    def block() -> nn.Module:
        attn = _node("GPT2Attention", c_attn=p.conv1d(3 * h, h), c_proj=p.conv1d(h, h), attn_dropout=nn.Dropout(),
                     resid_dropout=nn.Dropout())
        mlp = _node("GPT2MLP", c_fc=p.conv1d(inner, h), c_proj=p.conv1d(h, inner), act=_node("Activation"),
                    dropout=nn.Dropout())
        return _node("GPT2Block", ln_1=p.layer_norm(h, c.layer_norm_epsilon), attn=attn,
                     ln_2=p.layer_norm(h, c.layer_norm_epsilon), mlp=mlp)

    model = _cls("GPT2Model", _Backbone)()
    model.embed_path = "wte"
    model.wte = p.embedding(c.vocab_size, h)
    model.wpe = p.embedding(c.n_positions, h)
    model.drop = nn.Dropout()
    model.h = nn.ModuleList(block() for _ in range(c.n_layer))
    model.ln_f = p.layer_norm(h, c.layer_norm_epsilon)
    return model


def _bert(c: SkeletonConfig, p: _Parts) -> nn.Module | None:
    if c.is_decoder or c.add_cross_attention:
        return None
    h, eps = c.hidden_size, c.layer_norm_eps

    def layer() -> nn.Module:
        attention = _node("BertAttention",
                          self=_node("BertSelfAttention", query=p.linear(h, h), key=p.linear(h, h), value=p.linear(h, h),
                                     dropout=nn.Dropout()),
                          output=_node("BertSelfOutput", dense=p.linear(h, h), LayerNorm=p.layer_norm(h, eps),
                                       dropout=nn.Dropout()))
        return _node("BertLayer", attention=attention,
                     intermediate=_node("BertIntermediate", dense=p.linear(h, c.intermediate_size),
                                        intermediate_act_fn=_node("Activation")),
                     output=_node("BertOutput", dense=p.linear(c.intermediate_size, h), LayerNorm=p.layer_norm(h, eps),
                                  dropout=nn.Dropout()))

    model = _cls("BertModel", _Backbone)()
    model.embed_path = "embeddings.word_embeddings"
    model.embeddings = _node("BertEmbeddings", word_embeddings=p.embedding(c.vocab_size, h),
                             position_embeddings=p.embedding(c.max_position_embeddings, h),
                             token_type_embeddings=p.embedding(c.type_vocab_size, h), LayerNorm=p.layer_norm(h, eps),
                             dropout=nn.Dropout())
    model.encoder = _node("BertEncoder", layer=nn.ModuleList(layer() for _ in range(c.num_hidden_layers)))
    model.pooler = _node("BertPooler", dense=p.linear(h, h), activation=nn.Tanh())
    return model


# model_type -> (backbone builder, base_model_prefix, {task: (class name, head)}); head: "lm" (lm_head, tied
# when tie_word_embeddings), "score" (Linear, no bias), "classifier" (dropout + Linear with bias)
ARCHS = {
    "llama": (_llama, "model", {"causal-lm": ("LlamaForCausalLM", "lm"), "seq-cls": ("LlamaForSequenceClassification", "score")}),
    "gpt2": (_gpt2, "transformer", {"causal-lm": ("GPT2LMHeadModel", "lm"), "seq-cls": ("GPT2ForSequenceClassification", "score")}),
    "bert": (_bert, "bert", {"seq-cls": ("BertForSequenceClassification", "classifier")}),
}


def build(config: SkeletonConfig, task: str, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """The skeleton of `AutoModelFor<task>.from_config(config)` (task "base": `AutoModel`), or None when
    this architecture or task is not described here."""
    make_backbone, prefix, heads = ARCHS[config.model_type]
    if task != "base" and task not in heads:
        return None
    p = _Parts(dtype)
    backbone = make_backbone(config, p)
    if backbone is None:
        return None
    backbone.config = config
    if task == "base":
        return backbone
    name, head = heads[task]
    model = _cls(name, _Model)()
    model.base_model_prefix = prefix
    model.config = config
    model.add_module(prefix, backbone)
    h = config.hidden_size
    if head == "lm":
        model.lm_head = p.linear(h, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            model.lm_head.weight = backbone.get_input_embeddings().weight
    elif head == "score":
        model.score = p.linear(h, config.num_labels, bias=False)
    else:
        model.dropout = nn.Dropout()
        model.classifier = p.linear(h, config.num_labels)
    return model


def skeleton_model(cfg, label_names: list[str] | None = None, task: str | None = None) -> nn.Module | None:
    """The recipe's model (a ModelCfg) as a skeleton, as `inspect.meta_model` builds it with transformers
    (same num_labels rule, same dtype); None when the base is not described here."""
    raw = raw_config(cfg)
    config = make_config(raw) if raw is not None else None
    if config is None:
        return None
    task = task or cfg.task
    if task == "seq-cls":
        config.num_labels = len(label_names) if label_names else (cfg.num_labels or 2)
    return build(config, task, DTYPES.get(cfg.dtype, torch.float32))
