"""Memory-lean building blocks for the training step, in plain PyTorch (CPU and GPU alike).

A small model's activation memory is dominated by a few tensors autograd saves but could recompute
for almost nothing. Measured on SmolLM2-135M (batch 4 x 256, 643 real tokens, see bench/): of about
1 GB saved per step, the vocabulary head's fp32 logits, softmax and logit gradient took ~290 MB at the
forward/backward turn, and SiLU's output in every MLP another 118 MB.

- `linear_cross_entropy`: mean cross-entropy of `hidden @ W^T` without ever holding the logits of all
  rows: row chunks are projected, reduced to their loss and their gradients at once, and dropped.
- `fuse_swiglu`: `down(silu(gate(x)) * up(x))` with SiLU recomputed in backward (one extra elementwise
  pass) instead of stored.
- `fuse_rmsnorm`, `fuse_rope`: RMSNorm and rotary embeddings as single autograd nodes with hand-written
  backward passes. Autograd's versions take ~8 elementwise passes per norm and, for RoPE's `rotate_half`,
  allocate a zero-filled full-size gradient per slice; these take 3-4 and none.
- `cache_autocast_weights`: under autocast, frozen linear weights cast to bf16 once per weight version
  instead of at every call (autocast caches only trainable leaves).
- `fuse_kernels`: all of the above on a model (what peftcli.loss does for training).

In a bf16 run (autocast or a bf16 base) the elementwise kernels keep the activations' dtype: RMSNorm reduces
in fp32 and rounds once, as transformers does; the head projects in the autocast dtype, its softmax in fp32.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 32 << 20  # fp32 logits per chunk: a few chunks per step, each small against the activations


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in here: the autocast dtype when autocast is on for its device."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


VOCAB_BLOCK = 4096  # head rows per product in _project


def _project(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits `h @ w.T`, one vocabulary block at a time into the output's columns. With a large
    vocabulary and few rows one product spends its time writing the output (SmolLM2's 170 x 49152 at
    ~120 GFLOP/s on one core); blocks of 4096 head rows run at ~140-160, the backward's rate."""
    if w.shape[0] <= 2 * VOCAB_BLOCK:
        return (h @ w.T).float()
    out = torch.empty(h.shape[0], w.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, w.shape[0], VOCAB_BLOCK):
        if h.dtype == torch.float32:
            torch.mm(h, w[s:s + VOCAB_BLOCK].T, out=out[:, s:s + VOCAB_BLOCK])
        else:
            out[:, s:s + VOCAB_BLOCK] = h @ w[s:s + VOCAB_BLOCK].T
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, dtype):
        # One cast of the head (not one per chunk under autocast) and every product in `dtype`; softmax in fp32.
        n = targets.numel()
        w, hid = weight.to(dtype), hidden.to(dtype)
        grad_h = torch.empty_like(hid) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk_rows):
            h, t = hid[a:a + chunk_rows], targets[a:a + chunk_rows]
            logits = _project(h, w)
            # softmax in one fused kernel (logsumexp, then subtracting and exponentiating, took five passes);
            # loss = -log p_t, exact unless p_t underflows (a target ~100 nats below the best): those rows
            # take lse - logit_t
            rows = torch.arange(len(t), device=t.device)
            p = torch.softmax(logits, dim=-1)
            p_t = p[rows, t]
            nll = -p_t.log()
            if not bool(torch.isfinite(nll).all()):
                bad = ~torch.isfinite(nll)
                nll[bad] = torch.logsumexp(logits[bad], dim=-1) - logits[bad, t[bad]]
            total += nll.sum()
            del logits
            # d(mean loss)/d logits = (softmax - onehot) / n, in place over the softmax
            p[rows, t] = p_t - 1.0
            g = p.div_(n).to(dtype)
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[a:a + chunk_rows])
            if grad_w is not None:
                grad_w += (g.T @ h).float()
        ctx.weight_dtype, ctx.hidden_dtype = weight.dtype, hidden.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out.to(grad_h.dtype)).to(ctx.hidden_dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
    """`F.cross_entropy((hidden @ weight.T).float(), targets)` (mean; no ignored rows: select them first).
    Gradients are computed during the forward pass, chunk by chunk, so backward costs one multiply.
    Under autocast the products run in the autocast dtype (as `hidden @ weight.T` would)."""
    rows = max(1, (chunk_bytes or CHUNK_BYTES) // (4 * weight.shape[0]))
    dtype = compute_dtype(hidden)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        with torch.autocast(hidden.device.type, enabled=False):
            return _LinearCrossEntropy.apply(hidden, weight, targets, rows, dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    w = weight.to(dtype)
    for a in range(0, targets.numel(), rows):
        loss += F.cross_entropy((hidden[a:a + rows].to(dtype) @ w.T).float(), targets[a:a + rows], reduction="sum")
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


class _RMSNorm(torch.autograd.Function):
    """transformers' Llama RMSNorm, `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)` (statistics in fp32),
    saving x and the per-row 1/rms only. Backward: with xh = x/rms, u = g*w,
    dx = (u - xh * mean(u * xh)) / rms; dw = sum over rows of g * xh.
    `out_dtype` (the autocast dtype): the output rounded once here. Every consumer of a Llama norm is a linear
    layer that autocast would feed the same rounded values, once per consumer (q, k, v, and both LoRA paths: six
    casts of one tensor, and six conversions of its gradient back)."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        out = weight * (xf * rstd).to(x.dtype)
        return out if out_dtype is None else out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xh = x.float() * rstd
        u = (grad * weight).float()
        dot = (u * xh).mean(-1, keepdim=True)
        gx = u.sub_(xh.mul_(dot)).mul_(rstd).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            xh = x.float() * rstd
            gw = (grad.float() * xh.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return gx, gw, None, None


RMSNORM_TYPES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # weight * normed, not (1 + weight)


def _rmsnorm_forward(self, x):
    dev = x.device.type
    lowp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon, lowp)


def fuse_rmsnorm(model: nn.Module) -> int:
    """Give every Llama-style RMSNorm the fused forward/backward; returns how many."""
    n = 0
    for m in model.modules():
        if type(m).__name__ in RMSNORM_TYPES and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_rmsnorm_forward, m)
            n += 1
    return n


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x * c + rotate_half(x) * s with rotate_half(x) = cat(-x2, x1), in three passes and no temporaries beyond
    the output; `transpose`: the adjoint map g -> g * c + rotate_half^T(g * s) (the gradient), where
    rotate_half^T(v) = cat(v2, -v1)."""
    h = x.shape[-1] // 2
    out = x * c
    if transpose:
        out[..., :h].addcmul_(x[..., h:], s[..., h:])
        out[..., h:].addcmul_(x[..., :h], s[..., :h], value=-1.0)
    else:
        out[..., :h].addcmul_(x[..., h:], s[..., :h], value=-1.0)
        out[..., h:].addcmul_(x[..., :h], s[..., h:])
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        return (_rotate(gq, cos, sin, transpose=True) if gq is not None else None,
                _rotate(gk, cos, sin, transpose=True) if gk is not None else None, None, None)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Drop-in for transformers' Llama `apply_rotary_pos_emb`, in the activations' dtype (cos/sin cast to it)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim).to(q.dtype), sin.unsqueeze(unsqueeze_dim).to(q.dtype)
    if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad):
        return _rotate(q, cos, sin), _rotate(k, cos, sin)
    return _Rope.apply(q, k, cos, sin)


ROPE_MODULES = ("llama", "mistral", "qwen2", "qwen3")


def fuse_rope(model: nn.Module) -> bool:
    """Point the model's modeling module at the fused rotary embedding (the attention forward looks the
    function up there at each call, as Liger-Kernel patches it). Architectures other than ROPE_MODULES,
    whose RoPE may differ (partial rotary, interleaved pairs), are left alone; returns whether it applied."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ROPE_MODULES:
        return False
    mod = sys.modules.get(f"transformers.models.{mt}.modeling_{mt}")
    if mod is None or not hasattr(mod, "apply_rotary_pos_emb"):
        return False
    mod.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def _autocast_cached_linear(self, x):
    """nn.Linear under autocast with the frozen weight's low-precision copy made once per weight version,
    not at every call (autocast caches casts of trainable leaves only): the same values, ~1 byte/param moved
    per step less, and no cast copy saved for backward."""
    dev = x.device.type
    w = self.weight
    if w.requires_grad or not torch.is_autocast_enabled(dev) or not w.is_floating_point():
        return F.linear(x, w, self.bias)
    dt = torch.get_autocast_dtype(dev)
    key = (w.data_ptr(), w._version, dt)
    cached = self.__dict__.get("_autocast_weight")
    if cached is None or cached[0] != key:
        cached = (key, w.detach().to(dt))
        self.__dict__["_autocast_weight"] = cached  # a plain attribute: not a buffer, never saved
    with torch.autocast(dev, enabled=False):
        return F.linear(x.to(dt), cached[1], None if self.bias is None else self.bias.to(dt))


def cache_autocast_weights(model: nn.Module) -> int:
    """Give every frozen nn.Linear the autocast cast cache; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and not m.weight.requires_grad:
            m.forward = types.MethodType(_autocast_cached_linear, m)
            n += 1
    return n


def fuse_kernels(model: nn.Module) -> dict:
    """Every fused kernel that fits the model (for training; outputs equal to float rounding)."""
    return {"swiglu": fuse_swiglu(model), "rmsnorm": fuse_rmsnorm(model), "rope": fuse_rope(model),
            "autocast_weights": cache_autocast_weights(model)}
