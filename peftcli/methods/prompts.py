"""Virtual-token methods: prompt tuning (Lester et al. 2021), P-tuning (Liu et al. 2021) and prefix
tuning (Li & Liang 2021). They add tokens the model attends to, so they never fold into the weights.

One mechanism for every architecture (Llama, GPT-2, BERT, ...), in this file:
- a forward pre-hook on the backbone (`model.base_model`: LlamaModel, GPT2Model, BertModel) rewrites its
  inputs, and a forward hook rewrites its outputs. Whoever calls the backbone (the task model's forward,
  `generate`, peftcli's selective-head loss that calls `model.base_model` directly) goes through them.
- prompt tuning / P-tuning: the pre-hook prepends the n virtual embeddings to the input embeddings and
  n ones to the attention mask; the forward hook drops the n virtual positions from the hidden states,
  so the head sees the real tokens only: logits have the real length, labels need no padding, and
  sequence classification pools the real last token / [CLS] (BERT's pooler is re-run on the real
  [CLS]; HF PEFT pools the first virtual token there). In generation the KV cache holds the virtual
  tokens after the first step, so later steps only get the mask prefix.
- prefix tuning: the pre-hook computes the per-layer keys/values once per forward, and an attention
  function registered with transformers' AttentionInterface (`peftcli_prefix`, SDPA underneath)
  concatenates them before the real keys/values in every self-attention layer, extending the mask
  with n visible columns. No cache argument is needed (BertModel has none), and the cache holds only
  real tokens.
- positions: the virtual tokens occupy positions 0..n-1 and the real tokens follow (n + their index
  among the real tokens, so left padding does not shift them), as in HF PEFT, whose logits we match.

Encoder-decoders (T5, BART; `model.task: seq2seq`) follow HF PEFT's SEQ_2_SEQ_LM prompt learning, whose
logits (and adapters, both ways) we match; the hooks sit on `model.get_encoder()` / `model.get_decoder()`:
- prompt tuning / P-tuning: the stored tensor has 2n rows (PEFT's num_transformer_submodules = 2; P-tuning's
  encoder runs over all 2n) and the encoder's pre-hook prepends the first n to its input embeddings and n
  ones to its mask. The encoder outputs keep the n positions (the decoder cross-attends to them), and the
  decoder's pre-hook extends the cross-attention mask while it has the real length: `generate` runs the
  encoder once, then passes the original mask with every decoder step.
- prefix tuning: the decoder's pre-hook puts the keys/values in its self-attention cache (a new cache, or
  `generate`'s while still empty), so the model's own code positions them (T5's relative bias, BART's learned
  positions shift by n, as in PEFT); the encoder and cross-attention get none, and decoder layer i reads
  stored slices 4i and 4i+1 (mod 2L), PEFT's order (`decoder_prefix`). Gradient checkpointing drops caches:
  refused (PEFT refuses too).

Stored in HF PEFT's layout: one tensor `prompt_embeddings` (prompt: (n, d), (2n, d) on seq2seq; prefix:
(n, layers*2*kv_dim), per token [k_0, v_0, k_1, v_1, ...] each (kv_heads, head_dim)); P-tuning's encoder and
prefix tuning's MLP reparameterisation exist during training only, their output is what is stored.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from peftcli.errors import UserError
from peftcli.loss import PADDING_FREE_MARK
from peftcli.methods import register
from peftcli.methods.base import Method, MethodOptions

VIRTUAL = "peftcli_virtual"  # the backbone's submodule holding the method's tensors (so optimizers and .to() see them)
ATTENTION = "peftcli_prefix"  # the registered attention function of prefix tuning
KEY = "prompt_embeddings"  # HF PEFT's tensor name
HEAD_PREFIX = "base_model."  # HF PEFT's prompt-learning key prefix for modules_to_save (no LoraModel in between)
CHECKPOINTING = ("prefix_tuning on an encoder-decoder keeps its prefix in the decoder's cache, which gradient checkpointing "
                 "drops (HF PEFT refuses it too); set train.gradient_checkpointing: false or use prompt_tuning")


# ----------------------------------------------------------------------------- options
class PromptText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, description="init from the embeddings of this text's tokens (repeated/truncated)")


class VirtualOptions(MethodOptions):
    num_virtual_tokens: int = Field(20, ge=1, le=1024, description="number of virtual tokens")


class PromptTuningOptions(VirtualOptions):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    init: Literal["random", "sample_vocab"] | PromptText = Field(
        "random", description="random (normal, the embedding matrix's std), sample_vocab (random vocabulary rows), or {text: ...}")
    tokenizer_name_or_path: str | None = Field(None, description="tokenizer for init text (default: the model's)")


class PTuningOptions(VirtualOptions):
    name: Literal["p_tuning"] = "p_tuning"
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="prompt encoder: MLP, or BiLSTM + MLP (HF PEFT's)")
    encoder_hidden_size: int | None = Field(None, ge=1, description="encoder width (default: the model's hidden size)")
    encoder_num_layers: int = Field(2, ge=1, description="BiLSTM layers (lstm only)")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="BiLSTM dropout (lstm only)")


class PrefixTuningOptions(VirtualOptions):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    projection: bool = Field(True, description="train the prefixes through MLP(P') (Linear, tanh, Linear); only MLP(P') is kept")
    encoder_hidden_size: int = Field(512, ge=1, description="width of the reparameterisation MLP")


# ----------------------------------------------------------------------------- tensors
class Direct(nn.Module):
    """The kept tensor itself, trained directly (prompt tuning; any method after loading)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(value)

    def forward(self) -> torch.Tensor:
        return self.weight


class PromptEncoder(nn.Module):
    """P-tuning's encoder, as HF PEFT's PromptEncoder: embedding -> MLP (3 layers), or -> BiLSTM -> MLP."""

    def __init__(self, n: int, d: int, hidden: int, kind: str, layers: int, dropout: float, **factory):
        super().__init__()
        self.embedding = nn.Embedding(n, d, **factory)
        self.lstm_head = None
        if kind == "lstm":
            self.lstm_head = nn.LSTM(d, hidden, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True, **factory)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(), nn.Linear(2 * hidden, d, **factory))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, hidden, **factory), nn.ReLU(), nn.Linear(hidden, hidden, **factory),
                                          nn.ReLU(), nn.Linear(hidden, d, **factory))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight[None]
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


class PrefixMLP(nn.Module):
    """Li & Liang's reparameterisation, as HF PEFT's PrefixEncoder: P' (n, kv_dim) -> Linear, tanh, Linear."""

    def __init__(self, n: int, token_dim: int, hidden: int, out: int, **factory):
        super().__init__()
        self.embedding = nn.Embedding(n, token_dim, **factory)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden, **factory), nn.Tanh(), nn.Linear(hidden, out, **factory))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


# ----------------------------------------------------------------------------- model facts
def backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def dims(model: nn.Module) -> dict[str, int]:
    """hidden size, layers, heads, key/value heads and head size from the model's config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    return {"d": d, "layers": cfg.num_hidden_layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "kv_dim": kv_heads * head_dim}


def _learned_positions(model: nn.Module, module: nn.Module, emb: nn.Module) -> int | None:
    """max_position_embeddings when `module` has learned absolute positions (GPT-2, BERT; BART's table has 2 more
    rows, an offset), else None: the virtual tokens take n of those positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return None
    found = any(isinstance(m, nn.Embedding) and m is not emb and limit <= m.num_embeddings <= limit + 2 for m in module.modules())
    return limit if found else None


def _prepend(rows: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The virtual tokens' embeddings (n, d) in front of every row of `embeds` (batch, length, d)."""
    return torch.cat([rows.to(embeds.dtype)[None].expand(embeds.shape[0], -1, -1), embeds], dim=1)


def _ones_before(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A 2D padding mask with n visible (virtual) positions in front."""
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (GPT-2's head passes input_ids positionally)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    extra = next((k for k, p in inspect.signature(module.forward).parameters.items() if p.kind is p.VAR_KEYWORD), None)
    out = {k: v for k, v in bound.items() if k != extra}
    out.update(bound.get(extra, {}) if extra else {})
    return out


def _real_positions(mask: torch.Tensor | None, batch: int, length: int, past: int, device) -> torch.Tensor:
    """Positions of this call's tokens among the real tokens: from the 2D mask (left padding aware) when there is one."""
    if mask is not None and mask.dim() == 2:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    return (torch.arange(length, device=device) + past)[None].expand(batch, length)


def _with_prefix_columns(mask: torch.Tensor | None, n: int, q: int, k: int, causal: bool, device) -> torch.Tensor | None:
    """The attention mask with n always-visible key columns in front (bool or additive float masks)."""
    if mask is None:
        if not causal or q == 1:
            return None  # every key visible: the prefix too
        mask = torch.ones(q, k, dtype=torch.bool, device=device).tril(k - q)[None, None]
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros
    front = visible(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device)
    return torch.cat([front, mask], dim=-1)


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """Self-attention with the layer's prefix keys/values in front of the real ones (then transformers' SDPA)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    link = getattr(module, "peftcli_prefix", None)
    kv = link[0].layer_prefix(link[1], key) if link is not None else None
    if kv is not None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        attention_mask = _with_prefix_columns(attention_mask, kv[0].shape[2], query.shape[2], key.shape[2], causal, query.device)
        key, value = torch.cat([kv[0], key], dim=2), torch.cat([kv[1], value], dim=2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_prefix_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, prefix_attention)
    AttentionMaskInterface.register(ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])


# ----------------------------------------------------------------------------- the family
class VirtualTokens(Method):
    """Shared by the three methods: the hooks, storage in HF PEFT's layout, refusal to merge.
    Subclasses set `kind` ("input": tokens at the input embeddings; "prefix": keys/values in every layer)
    and build the training-time tensor source in `make_source`."""

    family = "additive"
    mergeable = False
    padding_free = False  # the padding-free loss flattens a batch into one row: no per-sequence virtual tokens
    kind: ClassVar[str] = "input"

    def __init__(self, options):
        super().__init__(options)
        self.n = options.num_virtual_tokens
        self.enabled = True
        self._strip = 0  # virtual positions the current backbone call prepended
        self._kv: torch.Tensor | None = None  # prefix keys/values of the current forward, (layers*2, kv_heads, n, head_dim)
        self._hooks: list = []
        self._max_positions: int | None = None
        self.seq2seq = False  # an encoder-decoder (T5, BART): hooks on its encoder and decoder instead of the backbone
        self.rows = self.n  # rows of the stored tensor: HF PEFT keeps 2n for prompt / P-tuning on seq2seq
        self._decoder_layers = 0
        self._prefix_decoder: nn.Module | None = None
        self._drop_cache = False  # the decoder's pre-hook made a cache the call did not ask for

    # ------------------------------------------------------------- injection
    def make_source(self, model: nn.Module, factory: dict) -> nn.Module:
        raise NotImplementedError

    def width(self, model: nn.Module) -> int:
        """Columns of the stored tensor."""
        g = dims(model)
        return g["layers"] * 2 * g["kv_dim"] if self.kind == "prefix" else g["d"]

    def inject(self, model: nn.Module) -> None:
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.rows = 2 * self.n if self.seq2seq and self.kind == "input" else self.n  # PEFT's num_transformer_submodules * n
        self.dims = dims(model)
        if self.seq2seq:
            self._check_seq2seq(model)
        emb = backbone(model).get_input_embeddings()
        half = emb.weight.dtype in (torch.float16, torch.bfloat16)  # half-precision bases train fp32 prompts
        factory = {"device": emb.weight.device, "dtype": torch.float32 if half else emb.weight.dtype}
        holder = self._holder(model)
        holder.add_module(VIRTUAL, self.make_source(model, factory))
        setattr(model, PADDING_FREE_MARK, False)  # LossModel: no flattened (padding-free) batches
        if self.seq2seq:
            self._inject_seq2seq(model)
        else:
            self._inject_backbone(model)
        for p in self.source(model).parameters():
            p.requires_grad_(True)

    def _inject_backbone(self, model: nn.Module) -> None:
        bb = backbone(model)
        emb = bb.get_input_embeddings()
        if self.kind == "prefix":
            attn = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "is_causal")
                    and not getattr(m, "is_cross_attention", False)]
            if sorted(m.layer_idx for m in attn) != list(range(self.dims["layers"])):
                raise UserError(f"prefix_tuning: found no self-attention module per layer in {type(model).__name__} "
                                "(it needs transformers' attention interface); use prompt_tuning or lora")
            _register_prefix_attention()
            try:
                model.set_attn_implementation(ATTENTION)
            except (ValueError, KeyError, AttributeError) as exc:
                raise UserError(f"prefix_tuning: {type(model).__name__} cannot take a custom attention function ({exc}); "
                                "use prompt_tuning or lora") from None
            for m in attn:
                m.peftcli_prefix = (self, m.layer_idx)
        # learned absolute positions (GPT-2, BERT) end at max_position_embeddings: the virtual tokens take n of them
        self._max_positions = _learned_positions(model, bb, emb)
        self._hooks = [bb.register_forward_pre_hook(self._before, with_kwargs=True),
                       bb.register_forward_hook(self._after, with_kwargs=True)]

    # ------------------------------------------------------------- encoder-decoder (seq2seq)
    def _holder(self, model: nn.Module) -> nn.Module:
        """The module that holds VIRTUAL: the backbone; on seq2seq the encoder (input tokens) or the decoder (prefix),
        whose hook reads it."""
        if not self.seq2seq:
            return backbone(model)
        return model.get_encoder() if self.kind == "input" else model.get_decoder()

    def _check_seq2seq(self, model: nn.Module) -> None:
        name = type(model).__name__
        if not (callable(getattr(model, "get_encoder", None)) and callable(getattr(model, "get_decoder", None))):
            raise UserError(f"{self.name}: {name} has no get_encoder()/get_decoder(); use lora or ia3 with model.task: seq2seq")
        cfg = model.config
        self._decoder_layers = getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "decoder_layers", None) or self.dims["layers"]
        if self.kind == "prefix":
            heads = getattr(cfg, "decoder_attention_heads", None) or self.dims["heads"]
            if self._decoder_layers != self.dims["layers"] or heads != self.dims["heads"]:
                raise UserError(f"prefix_tuning: {name}'s decoder ({self._decoder_layers} layers, {heads} heads) differs from "
                                f"its encoder ({self.dims['layers']} layers, {self.dims['heads']} heads); HF PEFT's layout sizes "
                                "the prefixes by the encoder: use prompt_tuning or lora")

    def _inject_seq2seq(self, model: nn.Module) -> None:
        """Prompt / P-tuning: the encoder's pre-hook prepends the first n prompt rows to its input embeddings and
        n ones to its mask; its outputs keep the n positions (the decoder cross-attends to them), and the
        decoder's pre-hook extends the cross-attention mask where it still has the real length (`generate`
        runs the encoder itself, then passes the original mask with every decoder step).
        Prefix tuning: the decoder's pre-hook puts the prefix keys/values in its self-attention cache (a new
        cache, or `generate`'s empty one), as HF PEFT does; the encoder gets none."""
        enc, dec = model.get_encoder(), model.get_decoder()
        emb = model.get_input_embeddings()
        if self.kind == "input":
            self._max_positions = _learned_positions(model, enc, emb)
            self._hooks = [enc.register_forward_pre_hook(self._encoder_before, with_kwargs=True)]
        else:
            self._max_positions = _learned_positions(model, dec, emb)
            self._hooks = []
            self._prefix_decoder = dec  # validate_training: gradient checkpointing drops the decoder's cache
            self._hooks.append(dec.register_forward_hook(self._decoder_after))
        self._hooks.append(dec.register_forward_pre_hook(self._decoder_before, with_kwargs=True))

    def _check_room(self, tokens: int, what: str = "tokens") -> None:
        """Learned absolute positions end at max_position_embeddings, and the virtual tokens take n of them."""
        if self._max_positions and self.n + tokens > self._max_positions:
            raise UserError(f"{self.name}: {self.n} virtual tokens + {tokens} {what} exceed the model's "
                            f"{self._max_positions} positions; lower data.max_length or method.num_virtual_tokens")

    def _check_mask(self, mask: torch.Tensor | None) -> None:
        if mask is not None and mask.dim() != 2:
            raise UserError(f"{self.name}: a {mask.dim()}D attention mask is not supported; pass the 2D padding mask")

    def _encoder_before(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.enabled:
            return None
        kw = _bind(module, args, kwargs)
        ids, embeds, n = kw.get("input_ids"), kw.get("inputs_embeds"), self.n
        batch, length = (ids if ids is not None else embeds).shape[:2]
        self._check_room(length, "encoder tokens")
        if embeds is None:
            embeds = module.get_input_embeddings()(ids)
        # HF PEFT: the encoder takes the first n rows
        kw["inputs_embeds"], kw["input_ids"] = _prepend(getattr(module, VIRTUAL)()[:n], embeds), None
        mask = kw.get("attention_mask")
        self._check_mask(mask)
        if mask is not None:
            kw["attention_mask"] = _ones_before(mask, n)
        return (), kw

    def _decoder_before(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.enabled:
            return None
        kw = _bind(module, args, kwargs)
        n = self.n
        if self.kind == "input":  # the cross-attention mask: n visible virtual positions in front, once
            states, mask = kw.get("encoder_hidden_states"), kw.get("encoder_attention_mask")
            if states is None or mask is None or mask.dim() != 2 or mask.shape[-1] != states.shape[1] - n:
                return None
            kw["encoder_attention_mask"] = _ones_before(mask, n)
            return (), kw
        if module.training and torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
            raise UserError(CHECKPOINTING)
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        batch, length = (ids if ids is not None else embeds).shape[:2]
        key = "past_key_values" if "past_key_values" in kw and "cache" not in kw else "cache"
        cache, self._drop_cache = kw.get(key), False
        if cache is None:
            cache = kw[key] = EncoderDecoderCache(DynamicCache(), DynamicCache())
            use = kw.get("use_cache")
            self._drop_cache = not (getattr(module.config, "use_cache", True) if use is None else use)
        own = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        if own.get_seq_length() == 0:  # the first call of this sequence: the prefix goes in first
            dtype = module.get_input_embeddings().weight.dtype
            for layer, (k, v) in enumerate(self.decoder_prefix(getattr(module, VIRTUAL)())):
                own.update(k[None].expand(batch, -1, -1, -1).to(dtype), v[None].expand(batch, -1, -1, -1).to(dtype), layer)
        past = own.get_seq_length() - n  # real tokens before this call
        self._check_room(past + length, "decoder tokens")
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[-1] == past + length:
            kw["attention_mask"] = _ones_before(mask, n)
        return (), kw

    def _decoder_after(self, module: nn.Module, args: tuple, output):
        """A cache the pre-hook made for a call without use_cache is not returned (generate would carry it on)."""
        if self._drop_cache:
            self._drop_cache = False
            for name in [k for k in output.keys() if k in ("cache", "past_key_values")] if isinstance(output, dict) else []:
                output[name] = None
        return None

    def decoder_prefix(self, stored: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's (keys, values), (kv_heads, n, head_dim), from the stored (n, layers*2*kv_dim) tensor,
        as HF PEFT builds them for seq2seq: it stacks the 2L per-layer slices twice (for self- and
        cross-attention) and cuts the stack in groups of 4, so decoder layer i reads slices 4i and 4i+1 (mod 2L),
        and then drops the cross-attention part. For L=2 both layers read layer 0's slices."""
        g, n = self.dims, self.n
        kv = stored.view(n, 2 * g["layers"], g["kv_heads"], g["head_dim"]).permute(1, 2, 0, 3)
        total = 2 * g["layers"]
        return [(kv[(4 * i) % total], kv[(4 * i + 1) % total]) for i in range(self._decoder_layers)]

    def validate_training(self, total_steps: int) -> None:
        decoder = self._prefix_decoder
        if decoder is not None and any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules()):
            raise UserError(CHECKPOINTING)

    def source(self, model: nn.Module) -> nn.Module:
        """The module that produces the virtual tensor (an attribute of the backbone; of the encoder or decoder on seq2seq)."""
        return getattr(self._holder(model), VIRTUAL)

    @contextlib.contextmanager
    def disabled(self):
        """The base model's behaviour: no virtual tokens (the hooks pass everything through)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    # ------------------------------------------------------------- the hooks
    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        self._strip = 0
        if not self.enabled:
            return None
        kw = _bind(module, args, kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        batch, length = (ids if ids is not None else embeds).shape[:2]
        device = (ids if ids is not None else embeds).device
        cache = kw.get("cache", kw.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask, n = kw.get("attention_mask"), self.n
        self._check_mask(mask)
        pos = kw.get("position_ids")
        inject = self.kind == "input" and past == 0  # with a cache, the virtual tokens are in it after the first step
        real_past = past - n if self.kind == "input" and past else past
        self._check_room(real_past + length)
        if pos is None:
            pos = _real_positions(mask, batch, length, real_past, device)
        pos = pos + n
        source = getattr(module, VIRTUAL)
        if self.kind == "prefix":
            g = self.dims
            kv = source()
            self._kv = kv.view(n, 2 * g["layers"], g["kv_heads"], g["head_dim"]).permute(1, 2, 0, 3)
        elif inject:
            if embeds is None:
                embeds = module.get_input_embeddings()(ids)
            kw["inputs_embeds"], kw["input_ids"] = _prepend(source(), embeds), None
            pos = torch.cat([torch.arange(n, device=device)[None].expand(batch, n), pos], dim=1)
            if kw.get("token_type_ids") is not None:
                tt = kw["token_type_ids"]
                kw["token_type_ids"] = torch.cat([tt.new_zeros(batch, n), tt], dim=1)
            self._strip = n
        if self.kind == "input":
            if mask is not None:
                kw["attention_mask"] = _ones_before(mask, n)
            kw.pop("cache_position", None)  # the model derives it from the cache, which holds the virtual tokens
        kw["position_ids"] = pos
        return (), kw

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        n, self._strip = self._strip, 0
        if not n:
            return None
        if isinstance(output, tuple):
            return (output[0][:, n:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, n:]
        if output.get("hidden_states") is not None:
            output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        if output.get("pooler_output") is not None and getattr(module, "pooler", None) is not None:
            output.pooler_output = module.pooler(output.last_hidden_state)  # the real [CLS], not a virtual token
        return output

    def layer_prefix(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) of `layer`'s prefix, (batch, kv_heads, n, head_dim), or None when disabled."""
        if not self.enabled or self._kv is None:
            return None
        b = key.shape[0]
        k, v = self._kv[2 * layer], self._kv[2 * layer + 1]
        return k[None].expand(b, -1, -1, -1).to(key.dtype), v[None].expand(b, -1, -1, -1).to(key.dtype)

    # ------------------------------------------------------------- storage
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            sd = {KEY: self.source(model)().detach()}
        for path in self.saved_modules:
            for local, p in model.get_submodule(path).named_parameters():
                sd[f"{HEAD_PREFIX}{path}.{local}"] = p.detach()
        return sd

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        """The stored prompts become the trained tensor (an encoder/MLP, if any, is dropped: its output is kept)."""
        heads = {f"{HEAD_PREFIX}{path}.{local}": p for path in self.saved_modules
                 for local, p in model.get_submodule(path).named_parameters()}
        expected = {KEY, *heads}
        if set(sd) != expected:
            missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise UserError(f"adapter tensors do not fit this model ({detail}); is this adapter for this base model and method?")
        shape = (self.rows, self.width(model))
        if tuple(sd[KEY].shape) != shape:
            rows = f"{self.n} virtual tokens" if self.rows == self.n else f"2 x {self.n} virtual tokens, HF PEFT's encoder-decoder layout"
            raise UserError(f"adapter tensor {KEY} has shape {tuple(sd[KEY].shape)}, the model expects {shape} "
                            f"({rows} x {shape[1]})")
        ref = next(self.source(model).parameters())
        setattr(self._holder(model), VIRTUAL, Direct(sd[KEY].detach().to(ref.device, ref.dtype).clone()))
        with torch.no_grad():
            for key, p in heads.items():
                if tuple(sd[key].shape) != tuple(p.shape):
                    raise UserError(f"adapter tensor {key} has shape {tuple(sd[key].shape)}, the model expects {tuple(p.shape)}")
                p.copy_(sd[key].to(p.dtype))

    def merge_refusal(self) -> str:
        return (f"method {self.name!r} adds virtual tokens the model attends to, which cannot be folded into the base "
                "weights; deploy it unmerged with `peftcli export --format peft` (HF PEFT loads it)")

    def merge(self, model: nn.Module) -> nn.Module:
        raise UserError(self.merge_refusal())

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        g = dims(model)
        return {"num_virtual_tokens": self.n, "token_dim": g["d"], "num_transformer_submodules": 2 if self.seq2seq else 1,
                "num_attention_heads": g["heads"], "num_layers": g["layers"]}

    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "base_model_name_or_path": base_name,
                "modules_to_save": self.saved_modules or None, **self.peft_fields(model)}

    def describe(self, model: nn.Module) -> dict[str, Any]:
        g = dims(model)
        n = self.n
        layers = g["layers"]
        if self.seq2seq:  # encoder self-attention + decoder cross-attention (input), decoder self-attention (prefix)
            layers = g["layers"] + self._decoder_layers if self.kind == "input" else self._decoder_layers
        extra = {"virtual_tokens": n, "stored_shape": [self.rows, self.width(model)],
                 # each real token attends n more keys in every layer: q.k and a.v, 2 FLOPs per multiply-add
                 # (seq2seq: per encoder token plus per decoder token)
                 "added_flops_per_token": 4 * n * g["heads"] * g["head_dim"] * layers}
        if self.kind == "input":
            extra["added_sequence_length"] = n  # every (encoder) layer processes n more positions (once per sequence)
            bb = model.get_encoder() if self.seq2seq else backbone(model)
            skip = {id(p) for m in bb.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
            skip |= {id(p) for p in self.source(model).parameters()}
            body = sum(p.numel() for p in bb.parameters() if id(p) not in skip)
            extra["added_flops_per_sequence"] = 2 * n * body  # the n positions through the body's weights (prefill)
        else:
            extra["added_kv_per_layer"] = n
        return {**super().describe(model), **extra}


@register
class PromptTuning(VirtualTokens):
    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    summary = "n learned input embeddings prepended to every sequence (Lester et al.)"
    Options = PromptTuningOptions
    training_only = frozenset({"init", "tokenizer_name_or_path"})

    def make_source(self, model: nn.Module, factory: dict) -> nn.Module:
        o, n = self.opts, self.rows
        emb = backbone(model).get_input_embeddings().weight
        if o.init == "random":  # scaled like the vocabulary (HF PEFT's N(0, 1) dwarfs real embeddings)
            gen = torch.Generator(device="cpu").manual_seed(0)
            value = torch.randn(n, emb.shape[1], generator=gen) * emb.float().std().item()
        else:
            if o.init == "sample_vocab":
                ids = torch.randint(0, emb.shape[0], (n,))
            else:
                ids = torch.tensor((self._text_ids(model, o.init.text) * n)[:n])
            value = emb.detach()[ids.to(emb.device)].float()
        return Direct(value.to(**factory))

    def _text_ids(self, model: nn.Module, text: str) -> list[int]:
        from transformers import AutoTokenizer

        name = self.opts.tokenizer_name_or_path or getattr(model, "name_or_path", None)
        if not name:
            raise UserError("method.init.text needs a tokenizer: set method.tokenizer_name_or_path")
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise UserError(f"method.init.text: cannot load the tokenizer {name} ({str(exc).splitlines()[0]}); "
                            "set method.tokenizer_name_or_path") from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"method.init.text: {text!r} gives no tokens")
        return ids * math.ceil(self.rows / len(ids))

    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict[str, Any]:
        init = self.opts.init
        return {**super().adapter_config(model, base_name),
                "prompt_tuning_init": "TEXT" if isinstance(init, PromptText) else init.upper(),
                "prompt_tuning_init_text": init.text if isinstance(init, PromptText) else None,
                "tokenizer_name_or_path": self.opts.tokenizer_name_or_path, "tokenizer_kwargs": None}

    def saved_options(self):
        return self.opts.model_copy(update={"init": "random"})  # the stored prompts need no tokenizer to reload

    @classmethod
    def from_adapter_config(cls, cfg: dict) -> MethodOptions:
        return cls.Options(num_virtual_tokens=cfg["num_virtual_tokens"], modules_to_save=_heads(cfg))


@register
class PTuning(VirtualTokens):
    name = "p_tuning"
    peft_type = "P_TUNING"
    summary = "input prompts produced by an MLP or BiLSTM+MLP encoder; only the prompts are kept (Liu et al.)"
    Options = PTuningOptions
    training_only = frozenset({"encoder", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"})

    def make_source(self, model: nn.Module, factory: dict) -> nn.Module:
        o, d = self.opts, dims(model)["d"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return PromptEncoder(self.rows, d, o.encoder_hidden_size or d, o.encoder, o.encoder_num_layers, o.encoder_dropout, **factory)

    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict[str, Any]:
        o = self.opts
        return {**super().adapter_config(model, base_name), "encoder_reparameterization_type": o.encoder.upper(),
                "encoder_hidden_size": o.encoder_hidden_size or dims(model)["d"], "encoder_num_layers": o.encoder_num_layers,
                "encoder_dropout": o.encoder_dropout}

    @classmethod
    def from_adapter_config(cls, cfg: dict) -> MethodOptions:
        kind = str(cfg.get("encoder_reparameterization_type") or "MLP").lower()
        return cls.Options(num_virtual_tokens=cfg["num_virtual_tokens"], encoder=kind, modules_to_save=_heads(cfg))


@register
class PrefixTuning(VirtualTokens):
    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    summary = "learned keys/values prepended in every attention layer, trained through an MLP (Li & Liang)"
    Options = PrefixTuningOptions
    kind = "prefix"
    training_only = frozenset({"projection", "encoder_hidden_size"})

    def make_source(self, model: nn.Module, factory: dict) -> nn.Module:
        o, g = self.opts, dims(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if o.projection:
                return PrefixMLP(self.n, g["kv_dim"], o.encoder_hidden_size, self.width(model), **factory)
            return Direct(torch.randn(self.n, self.width(model), **factory))  # nn.Embedding's init, as HF PEFT

    def peft_fields(self, model: nn.Module) -> dict[str, Any]:
        g = dims(model)  # HF PEFT sizes prefixes by the key/value heads (grouped-query attention)
        return {**super().peft_fields(model), "token_dim": g["kv_dim"], "num_attention_heads": g["kv_heads"]}

    def adapter_config(self, model: nn.Module, base_name: str | None) -> dict[str, Any]:
        return {**super().adapter_config(model, base_name), "encoder_hidden_size": self.opts.encoder_hidden_size,
                "prefix_projection": self.opts.projection}

    @classmethod
    def from_adapter_config(cls, cfg: dict) -> MethodOptions:
        return cls.Options(num_virtual_tokens=cfg["num_virtual_tokens"], projection=bool(cfg.get("prefix_projection")),
                           encoder_hidden_size=cfg.get("encoder_hidden_size") or 512, modules_to_save=_heads(cfg))


def _heads(cfg: dict) -> list[str] | None:
    return cfg.get("modules_to_save") or None
