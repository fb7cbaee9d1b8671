"""The training objective, as one module that accelerate (and DDP) can wrap.

For causal LMs the vocabulary projection is the costliest single layer of a small model (SmolLM2:
49k x 576), and instruction tuning masks most positions. So the head runs only on the positions
that carry a label: the hidden states are gathered first, then projected, then cross-entropy in fp32.
Same loss as transformers' (mean over label tokens), a fraction of the logits memory and FLOPs.

Padding-free: for architectures whose attention masks come from transformers' masking_utils, the
padded batch is flattened into one row of real tokens with per-sequence position_ids; transformers
then builds a block-causal mask, so no compute is spent on pad positions and the loss is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


# model types whose mask builder honours packed position_ids (transformers' find_packed_sequence_indices)
PADDING_FREE_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def supports_selective_head(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False  # logits post-processing we would have to replicate
    base = getattr(model, "base_model", model)
    return base is not model and callable(getattr(model, "get_output_embeddings", None)) and model.get_output_embeddings() is not None


class LossModel(nn.Module):
    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model = model
        self.selective = task == "causal-lm" and supports_selective_head(model)
        self.padding_free = self.selective and getattr(model.config, "model_type", None) in PADDING_FREE_TYPES

    def forward(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean loss over label tokens, logits for seq-cls else None)."""
        if not self.selective:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return out.loss, out.logits if labels.dim() == 1 else None
        targets = torch.full_like(labels, IGNORE)
        targets[:, :-1] = labels[:, 1:]  # next-token targets, aligned with the positions that predict them
        if self.padding_free and not bool(attention_mask.all()):
            real = attention_mask.bool()
            positions = (attention_mask.cumsum(-1) - 1)[real][None]
            hidden = self.model.base_model(input_ids=input_ids[real][None], position_ids=positions, use_cache=False).last_hidden_state[0]
            targets = targets[real]
        else:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        keep = targets != IGNORE
        if not keep.any():
            return hidden.sum() * 0.0, None  # keeps the graph (and DDP) intact on an all-masked batch
        logits = self.model.get_output_embeddings()(hidden[keep])
        return F.cross_entropy(logits.float(), targets[keep]), None
