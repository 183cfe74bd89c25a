"""The single attention entry point of the pack.

Every attention site calls `attention(q, k, v, ...)` with `[B, L, H, D]` tensors. This first version
routes everything to PyTorch SDPA; the dispatch to flash-attn / SageAttention lives here too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_MODES = ("auto", "sdpa", "flash_attn", "sageattn", "sageattn_3", "sageattn_3_fp4", "sageattn_3_fp8")


def _key_padding_mask(k_lens: torch.Tensor, lk: int, device) -> torch.Tensor:
    """Boolean `[B, 1, 1, Lk]` mask, True where a key is real."""
    return (torch.arange(lk, device=device)[None, :] < k_lens.to(device)[:, None])[:, None, None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mode: str = "auto",
              k_lens: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Attention over `[B, L, H, D]` inputs; returns `[B, Lq, H, D]` in q's dtype.

    k_lens: `[B]` number of valid keys per batch item (the rest are padding).
    attn_mask: bool (True = attend) or additive float, broadcastable to `[B, H, Lq, Lk]`.
    """
    out_dtype = q.dtype
    compute_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    qh, kh, vh = (t.transpose(1, 2).to(compute_dtype) for t in (q, k, v))
    mask = attn_mask
    if k_lens is not None:
        pad = _key_padding_mask(k_lens, k.shape[1], q.device)
        mask = pad if mask is None else (mask & pad if mask.dtype == torch.bool
                                        else mask.masked_fill(~pad, float("-inf")))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).to(out_dtype)
