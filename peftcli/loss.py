"""The training objective, as one module that accelerate (and DDP) can wrap.

For causal LMs the vocabulary projection is the costliest single layer of a small model (SmolLM2:
49k x 576), and instruction tuning masks most positions. So the head runs only on the positions
that carry a label: the hidden states are gathered first, then projected, then cross-entropy in fp32.
Same loss as transformers' (mean over label tokens), a fraction of the logits memory and FLOPs; the
projection and the loss run in row chunks (peftcli.kernels), so the fp32 logits never exist all at once.

Padding-free: for architectures whose attention goes through transformers' attention interface, the
padded batch is flattened into one row of real tokens with per-sequence position_ids, so the linear
layers (most of the FLOPs) see no pad positions, and attention runs per sequence with a plain causal
SDPA (CPU flash kernel, no mask). Same loss, fewer FLOPs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from peftcli.errors import UserError
from peftcli.kernels import fuse_kernels, linear_cross_entropy

IGNORE = -100


# model types whose attention layers pass position_ids through transformers' attention interface
PADDING_FREE_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
SEGMENT_ATTENTION = "peftcli_segments"
# set False on a model by methods whose tokens belong to each sequence (prompt/prefix tuning): flattening a
# batch into one row would give the whole row one set of virtual tokens
PADDING_FREE_MARK = "peftcli_padding_free"


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention per packed sequence (position_ids restart at 0), else transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    starts = (pos[0] == 0).nonzero().flatten().tolist() if pos is not None and query.shape[0] == 1 else []
    if len(starts) < 2 or starts[0] != 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    sizes = [b - a for a, b in zip(starts, starts[1:] + [query.shape[2]], strict=True)]
    gqa = query.shape[1] != key.shape[1]  # grouped-query heads stay unexpanded: autograd saves 1/groups of k and v
    dtype = query.dtype
    if query.device.type == "cpu" and dtype != torch.float32:
        # CPU's flash attention backward in bf16 took 3x its fp32 time (SmolLM2, 18.8 vs 6.7 ms a call): attention
        # runs in fp32 (more exact too), the projections around it stay in bf16
        query, key, value = query.float(), key.float(), value.float()
    # one split per tensor: its backward is one concatenation (slices would each zero-fill a full-size gradient)
    with torch.autocast("cpu", enabled=False) if dtype != query.dtype else contextlib.nullcontext():
        out = torch.cat([
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout if module.training else 0.0,
                                           enable_gqa=gqa)
            for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), strict=True)
        ], dim=2)
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), None


def _register_segment_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])


def supports_selective_head(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False  # logits post-processing we would have to replicate
    base = getattr(model, "base_model", model)
    return base is not model and callable(getattr(model, "get_output_embeddings", None)) and model.get_output_embeddings() is not None


def packing_problem(model: nn.Module, task: str = "causal-lm") -> str | None:
    """Why data.packing cannot run on this model (None if it can): packed rows need attention per segment,
    which the padding-free path gives only where position_ids reach the attention layers."""
    kind = getattr(model.config, "model_type", None)
    if not getattr(model, PADDING_FREE_MARK, True):
        return "data.packing: the method adds virtual tokens to each sequence, which packed rows would share; set data.packing: false"
    if task == "causal-lm" and supports_selective_head(model) and kind in PADDING_FREE_TYPES \
            and getattr(model.config, "_attn_implementation", None) in ("sdpa", SEGMENT_ATTENTION):
        return None
    return (f"data.packing: needs a causal LM whose attention keeps packed rows apart ({', '.join(sorted(PADDING_FREE_TYPES))} "
            f"with sdpa attention); this model is {kind!r}; set data.packing: false")


class LossModel(nn.Module):
    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model = model
        fuse_kernels(model)
        self.selective = task == "causal-lm" and supports_selective_head(model)
        self.padding_free = (self.selective and getattr(model.config, "model_type", None) in PADDING_FREE_TYPES
                             and getattr(model.config, "_attn_implementation", None) == "sdpa"
                             and getattr(model, PADDING_FREE_MARK, True))
        if self.padding_free:
            _register_segment_attention()
            model.set_attn_implementation(SEGMENT_ATTENTION)  # padded batches still go to SDPA

    def forward(self, input_ids, attention_mask, labels, position_ids=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean loss over label tokens, logits for seq-cls else None). position_ids: a packed row (data.packing),
        rows concatenated, positions restarting at each: the padding-free path without the flattening."""
        if position_ids is not None and not self.padding_free:  # rows would attend to each other
            raise UserError(packing_problem(self.model) or "data.packing: this model cannot run packed rows; set data.packing: false")
        if not self.selective:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return out.loss, out.logits if labels.dim() == 1 else None
        targets = torch.full_like(labels, IGNORE)
        targets[:, :-1] = labels[:, 1:]  # next-token targets, aligned with the positions that predict them
        if position_ids is not None:
            hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        elif self.padding_free and not bool(attention_mask.all()):
            real = attention_mask.bool()
            positions = (attention_mask.cumsum(-1) - 1)[real][None]
            hidden = self.model.base_model(input_ids=input_ids[real][None], position_ids=positions, use_cache=False).last_hidden_state[0]
            targets = targets[real]
        else:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        keep = targets != IGNORE
        if not keep.any():
            return hidden.sum() * 0.0, None  # keeps the graph (and DDP) intact on an all-masked batch
        head = self.model.get_output_embeddings()
        if type(head) is nn.Linear and head.bias is None:
            return linear_cross_entropy(hidden[keep], head.weight, targets[keep]), None
        return F.cross_entropy(head(hidden[keep]).float(), targets[keep]), None
