"""The training objective, as one module that accelerate (and DDP) can wrap.

For causal LMs the vocabulary projection is the costliest single layer of a small model (SmolLM2:
49k x 576), and instruction tuning masks most positions. So the head runs only on the positions
that carry a label: the hidden states are gathered first, then projected, then cross-entropy in fp32.
Same loss as transformers' (mean over label tokens), a fraction of the logits memory and FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


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

    def forward(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean loss over label tokens, logits for seq-cls else None)."""
        if not self.selective:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return out.loss, out.logits if labels.dim() == 1 else None
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if not keep.any():
            return hidden.sum() * 0.0, None  # keeps the graph (and DDP) intact on an all-masked batch
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep]), None
