"""Memory-lean building blocks for the training step, in plain PyTorch (CPU and GPU alike).

A small model's activation memory is dominated by a few tensors autograd saves but could recompute
for almost nothing. Measured on SmolLM2-135M (batch 4 x 256, 643 real tokens, see bench/): of about
1 GB saved per step, the vocabulary head's fp32 logits, softmax and logit gradient took ~290 MB at the
forward/backward turn, and SiLU's output in every MLP another 118 MB.

- `linear_cross_entropy`: mean cross-entropy of `hidden @ W^T` without ever holding the logits of all
  rows: row chunks are projected, reduced to their loss and their gradients at once, and dropped.
- `fuse_swiglu`: `down(silu(gate(x)) * up(x))` with SiLU recomputed in backward (one extra elementwise
  pass) instead of stored.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 32 << 20  # fp32 logits per chunk: a few chunks per step, each small against the activations


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        n = targets.numel()
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk_rows):
            h, t = hidden[a:a + chunk_rows], targets[a:a + chunk_rows]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # d(mean loss)/d logits = (softmax - onehot) / n, in place over the chunk's logits
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=t.device), t] -= 1.0
            g = g.div_(n).to(hidden.dtype)
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[a:a + chunk_rows])
            if grad_w is not None:
                grad_w += (g.T @ h).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
    """`F.cross_entropy((hidden @ weight.T).float(), targets)` (mean; no ignored rows: select them first).
    Gradients are computed during the forward pass, chunk by chunk, so backward costs one multiply."""
    rows = max(1, (chunk_bytes or CHUNK_BYTES) // (4 * weight.shape[0]))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, rows)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for a in range(0, targets.numel(), rows):
        loss += F.cross_entropy((hidden[a:a + rows] @ weight.T).float(), targets[a:a + rows], reduction="sum")
    return loss / targets.numel()


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _swiglu_forward(self, x):
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_swiglu(model: nn.Module) -> int:
    """Give every gated-SiLU MLP (Llama, Mistral, Qwen: `down(act(gate(x)) * up(x))`) the recomputing
    forward; returns how many. Same outputs and gradients; the model's state dict is untouched."""
    from transformers.activations import SiLUActivation

    n = 0
    for m in model.modules():
        if (type(m).__name__.endswith("MLP") and all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj"))
                and type(getattr(m, "act_fn", None)) in (nn.SiLU, SiLUActivation)):
            m.forward = types.MethodType(_swiglu_forward, m)
            n += 1
    return n
