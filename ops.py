"""The model's speed-sensitive operations, each one function: attention, dropout, GELU and the
lookup of a small table by many indices.

The model calls these and nothing else; each chooses here between the reference operation
(SDPA, F.dropout, F.gelu, F.embedding) and a form that computes the same function faster on a CPU:
- dropout on a CPU cuts its masks from 64-bit random numbers, four 16-bit draws each, where
  aten's CPU dropout draws one 32-bit number an element (a quarter of a compiled training step);
- attention whose weights are dropped on a CPU is written out, so the weights go through that
  dropout; compiled for a CPU over a short window its two products become broadcast sums that
  inductor fuses with the softmax and masks, instead of thousands of tiny batched GEMMs;
- GELU (tanh approximation) compiled for a CPU is written as x * sigmoid(2z), the same
  function, because inductor's vectorised exp is several times faster there than its tanh;
- a small table looked up at every query-key pair (the relative attention biases) sums its
  gradient on a CPU with index_add_, where F.embedding's backward sorts the millions of indices.
tests/test_ops.py checks each fast form against its reference. Measurements:
benchmarks/README.md.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

# Compiled for a CPU, broadcast sums beat GEMMs at 4 to 7 positions and lose 9-13x from 8 on.
BROADCAST_MAX_POSITIONS = 7


def is_compiling_for_cpu(x: torch.Tensor) -> bool:
    """Whether inductor is compiling this for a CPU, where the written-out forms suit its kernels."""
    return torch.compiler.is_compiling() and x.device.type == "cpu"


def is_broadcast(q: torch.Tensor) -> bool:
    """Whether attention over q's positions is written as broadcast sums: compiled for a CPU, short."""
    return is_compiling_for_cpu(q) and q.shape[-2] <= BROADCAST_MAX_POSITIONS


def is_packed_dropout(x: torch.Tensor, p: float, training: bool) -> bool:
    """Whether dropout() cuts its own masks for x: training, on a CPU, 0 < p < 1."""
    return training and x.device.type == "cpu" and 0.0 < p < 1.0


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout; on a CPU the drop probability is p rounded to a multiple of 1/65536."""
    if not is_packed_dropout(x, p, training):
        return F.dropout(x, p, training)
    n, threshold = x.numel(), min(round(p * 65536), 65535)
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold - 32768
    return torch.where(keep, x * (65536 / (65536 - threshold)), 0.0)


def causal_mask(q: torch.Tensor) -> torch.Tensor:
    """Bool [T, T], True where a query may attend: itself and the positions before it."""
    t = q.shape[-2]
    return torch.ones(t, t, dtype=torch.bool, device=q.device).tril()


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                          dropout_p: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal softmax attention written out, its weights through dropout(); the products are
    broadcast sums when compiled for a CPU over at most BROADCAST_MAX_POSITIONS, else matmuls."""
    mask = causal_mask(q) if mask is None else mask
    broadcast = is_broadcast(q)
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) if broadcast else q @ k.transpose(-2, -1)
    scores = scores * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias.to(scores.dtype)  # under bf16 autocast the scores stay bf16, as without a bias
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    weights = dropout(weights, dropout_p, True)
    return (weights.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2) if broadcast else weights @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              dropout_p: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention over [B, H, T, d/H]; mask: bool [B, 1, T, T], True where a query may
    attend (causal already), or None for plain causal attention. dropout_p: 0 in evaluation.
    bias: float [B, H, T, T] added to the scores before the softmax (a relative attention bias);
    SDPA takes it, with the mask, as one additive mask and stays fused."""
    if is_packed_dropout(q, dropout_p, True) or is_broadcast(q):
        return written_out_attention(q, k, v, mask, dropout_p, bias)
    if bias is not None:
        mask = bias.to(q.dtype).masked_fill(~(causal_mask(q) if mask is None else mask), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (the post's)."""
    if is_compiling_for_cpu(x):
        return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


class _SmallTableLookup(torch.autograd.Function):
    """table[index], its table gradient summed with index_add_."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return F.embedding(index, table)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        width = grad.shape[-1]
        summed = torch.zeros(ctx.rows, width, dtype=grad.dtype, device=grad.device)
        return summed.index_add_(0, index.reshape(-1), grad.reshape(-1, width)), None


def small_table_lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """F.embedding(index, table) for a table of few rows and many indices; on a CPU its backward
    sums with index_add_ (what F.embedding's backward computes, 20x faster at ML-1M's 64 x 200 x
    200 indices)."""
    if index.device.type != "cpu":
        return F.embedding(index, table)
    return _SmallTableLookup.apply(table, index)
